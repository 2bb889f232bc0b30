"""Galleries: embed a folder or zip of images with the cloud member into sharded files, index them with
FAISS, and search them with any member of the family or any exported artifact of the same space.

A gallery directory holds::

    gallery.json                       space id, member, dim, source, plan, shards, index (written last)
    shards/shard-00000.safetensors     float32 "embeddings" [rows, dim]; metadata "hetero": space id, member
    shards/shard-00000.json            the names of its rows, unreadable images skipped, the tensor file's
                                       sha256: the shard's "done" marker, written after the tensor file
    index.faiss                        FAISS index over every row, rows numbered in shard order

Embedding streams: images are listed once (names only), decoded in batches by DataLoader workers, and
each shard is written as soon as it is full, so memory does not grow with the gallery (the FAISS index
itself, built afterwards, holds the vectors).  A build that stops keeps its finished shards; the next
build with the same plan skips them.  Under torchrun, rank r embeds shards r, r+N, ... and rank 0 builds
the index.  Batches never cross a shard and shard_size is a multiple of batch_size, so the batches (and
therefore every float) are the same however the build was split, interrupted or parallelised.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from hetero.data import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS, ImageError, decode_image, loader_context
from hetero.errors import HeteroError, ManifestError
from hetero.family import FamilyStore, MemberRecord, writing
from hetero.files import atomic_path, atomic_write_json, check_npy_size, check_output, resolve_inside, sha256_file

log = logging.getLogger("hetero.gallery")

GALLERY = "gallery.json"
FORMAT = "hetero-gallery/1"
INDEX_FILE = "index.faiss"

# Index choice by size, from benchmarks/gallery_search.py (d=128, 2 shared CPU cores): exact search over
# 100k vectors answers ~500-800 queries/s (1-2 ms each), good enough that an approximate index is not worth
# any recall loss below that; at 1M exact search falls to ~50-70 queries/s, while IVF-Flat with nlist ~
# sqrt(N) (1024) and nprobe 32 kept recall@1 at 0.978 of exact at 11.5-15.7x the speed (nprobe 16: 0.941).
# HNSW is as accurate, but its graph build took 79 s per 100k vectors here (~15 min per million): on
# request only (--index hnsw).
FLAT_MAX_ROWS = 100_000
IVF_NPROBE = 32
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 64
INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")


class GalleryError(ManifestError):
    """A gallery that cannot be built or searched as asked, with a message for people."""


def _faiss():
    try:
        import faiss
    except ImportError:
        raise GalleryError("gallery indexes need FAISS, which is not installed: pip install faiss-cpu "
                           "(or faiss-gpu-cu12)") from None
    return faiss


class SpaceMismatch(GalleryError):
    """A query model from another embedding space than the gallery's."""


# -------------------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class ImageEntry:
    name: str  # stable, unique name: path below the folder, or [zip name/]path inside the zip
    archive: str | None  # the zip that holds it, None for a plain file
    member: str  # path of the file (plain) or of the member inside `archive`


def _is_image(name: str) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return PurePosixPath(name).suffix.lower() in IMG_EXTENSIONS


def list_images(root: str | Path) -> list[ImageEntry]:
    """Every image (any file Pillow may read, by extension) below a folder, in a zip, or in zips in a folder.

    Unlike training data, gallery images need no class folders; names are sorted, so the same files give
    the same order (and the same shards) on every machine.  A folder with plain images ignores zips beside
    them (an extracted copy wins), as the training reader does.
    """
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".zip":
        archives, prefix = [root], False
    elif root.is_dir():
        plain = [p for p in root.rglob("*") if p.is_file() and _is_image(p.name)]
        if plain:
            entries = [ImageEntry(p.relative_to(root).as_posix(), None, str(p)) for p in plain]
            return sorted(entries, key=lambda e: e.name)
        archives, prefix = sorted(root.glob("*.zip")), True
    else:
        raise GalleryError(f"--images {root}: no such folder or .zip file")
    entries = []
    for archive in archives:
        try:
            with zipfile.ZipFile(archive) as handle:
                names = [i.filename for i in handle.infolist() if not i.is_dir() and _is_image(i.filename)]
        except zipfile.BadZipFile as err:
            raise GalleryError(f"{archive}: not a readable zip file ({err})") from None
        entries += [ImageEntry(f"{archive.name}/{n}" if prefix else n, str(archive), n) for n in names]
    if not entries:
        raise GalleryError(f"--images {root}: found no image files (by extension) there")
    return sorted(entries, key=lambda e: e.name)


class ImageFiles(torch.utils.data.Dataset):
    """Decoded uint8 images (3 x size x size) of a listing; None for a file that cannot be used."""

    def __init__(self, entries: list[ImageEntry], size: int, background=DEFAULT_BACKGROUND,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.entries, self.size, self.background, self.max_pixels = entries, size, background, max_pixels
        self._zips: dict[str, zipfile.ZipFile] = {}  # per worker process, opened on first use

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, entry: ImageEntry) -> bytes:
        if entry.archive is None:
            return Path(entry.member).read_bytes()
        if entry.archive not in self._zips:
            self._zips[entry.archive] = zipfile.ZipFile(entry.archive)
        return self._zips[entry.archive].read(entry.member)

    def __getitem__(self, index: int):
        from hetero.data import MAX_FILE_BYTES

        entry = self.entries[index]
        try:
            data = self._read(entry)
            if len(data) > MAX_FILE_BYTES:
                raise ImageError(f"{len(data):,} bytes, over the limit of {MAX_FILE_BYTES:,} for one image")
            pixels = torch.from_numpy(decode_image(data, self.size, self.background, self.max_pixels)).permute(2, 0, 1)
        except (ImageError, OSError, zipfile.BadZipFile, KeyError, EOFError, NotImplementedError) as err:
            log.warning("skipping unreadable image %s: %s", entry.name, err)
            return entry.name, None
        return entry.name, pixels


def collate_images(items):
    names = [name for name, pixels in items if pixels is not None]
    skipped = [name for name, pixels in items if pixels is None]
    pixels = [p for _, p in items if p is not None]
    return names, skipped, (torch.stack(pixels) if pixels else None)


class _ShardBatches(torch.utils.data.Sampler):
    """Batches of listing positions for the given shards, in order; no batch crosses a shard."""

    def __init__(self, shards: list[int], count: int, shard_size: int, batch_size: int):
        self.shards, self.count, self.shard_size, self.batch_size = shards, count, shard_size, batch_size

    def _ranges(self):
        for shard in self.shards:
            start, end = shard * self.shard_size, min((shard + 1) * self.shard_size, self.count)
            for begin in range(start, end, self.batch_size):
                yield list(range(begin, min(begin + self.batch_size, end)))

    def __iter__(self):
        return self._ranges()

    def __len__(self) -> int:
        return sum(1 for _ in self._ranges())


# --------------------------------------------------------------------------------------------- building


def _shard_paths(out: Path, shard: int) -> tuple[Path, Path]:
    stem = out / "shards" / f"shard-{shard:05d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _plan_id(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def _shard_done(out: Path, shard: int, plan_id: str) -> dict | None:
    """The shard's record when its files are complete, belong to this plan and are intact; else None."""
    tensor_path, record_path = _shard_paths(out, shard)
    if not (tensor_path.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("plan_id") != plan_id or record.get("sha256") != sha256_file(tensor_path):
        return None
    return record


def _write_shard(out: Path, shard: int, plan: dict, plan_id: str, embeddings: torch.Tensor, names: list[str],
                 skipped: list[str]) -> dict:
    """Write one shard: the tensor file first, then its record (the "done" marker), both atomically."""
    from safetensors.torch import save_file

    tensor_path, record_path = _shard_paths(out, shard)
    with atomic_path(tensor_path) as tmp:
        save_file({"embeddings": embeddings.contiguous()}, str(tmp),
                  # one metadata key: safetensors writes several in hash order, and shards should be bytewise
                  # reproducible
                  metadata={"hetero": json.dumps({"space_id": plan["space_id"], "member": plan["member"],
                                                  "shard": shard, "plan_id": plan_id})})
    record = {"shard": shard, "plan_id": plan_id, "file": tensor_path.name, "sha256": sha256_file(tensor_path),
              "rows": len(names), "names": names, "skipped": skipped}
    atomic_write_json(record_path, record)
    return record


def member_record(store: FamilyStore, member: str | None) -> MemberRecord:
    if member is None:
        return store.cloud
    try:
        return store.member(member)
    except ManifestError as err:
        raise GalleryError(f"--member: {err}") from None


def _check_plan(out: Path, plan: dict, overwrite: bool) -> None:
    path = out / GALLERY
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text()).get("plan", {})
    except json.JSONDecodeError as err:
        raise GalleryError(f"{path}: not valid JSON ({err}); remove it or build with --overwrite") from None
    differs = [f"{k}: {old.get(k)!r} -> {plan[k]!r}" for k in plan if old.get(k) != plan[k]]
    if differs and not overwrite:
        raise GalleryError(f"{path}: a gallery built with another plan is already here ({'; '.join(differs)}); "
                           f"use --overwrite to replace it or choose another --out")


def build_gallery(store: FamilyStore, images: str | Path, out: str | Path | None = None, *,
                  member: str | None = None, shard_size: int = 4096, batch_size: int = 256, workers: int = 0,
                  index: str = "auto", overwrite: bool = False, progress: bool = False) -> dict:
    """Embed every image under `images` with a member (the cloud by default) into a sharded gallery.

    Finished shards of an earlier build with the same plan are kept; under torchrun the shards are split
    over the ranks.  Returns the gallery record (also written to OUT/gallery.json; OUT defaults to
    FAMILY_DIR/gallery).  The family directory is locked while a gallery inside it is built; a gallery
    elsewhere locks its own directory.
    """
    from hetero import distributed

    out = Path(out) if out is not None else store.root / "gallery"
    if index not in INDEX_KINDS:
        raise GalleryError(f"--index {index!r}: choose one of {', '.join(INDEX_KINDS)}")
    if batch_size < 1 or shard_size < 1 or shard_size % batch_size or workers < 0:
        raise GalleryError(f"--shard-size {shard_size} must be a positive multiple of --batch-size {batch_size} "
                           f"(batches never cross shards, so every build gives the same floats), and --workers "
                           f">= 0 (got {workers})")
    check_output(out, "--out", folder=True)
    distributed.init_from_env()
    inside = out.resolve().is_relative_to(store.root.resolve())
    with writing(store.root if inside else out, "gallery build"):
        entry = member_record(store, member)
        entries = list_images(images)
        plan = _plan(store, entry, entries, shard_size, batch_size)
        plan_id = _plan_id(plan)
        _check_plan(out, plan, overwrite)
        if overwrite and distributed.is_main():  # start from scratch: no shard of an earlier build is reused
            shutil.rmtree(out / "shards", ignore_errors=True)
            for name in (GALLERY, INDEX_FILE):
                (out / name).unlink(missing_ok=True)
        distributed.barrier()
        (out / "shards").mkdir(parents=True, exist_ok=True)

        shards = math.ceil(len(entries) / shard_size)
        mine = list(distributed.shard_range(shards))
        pending = [s for s in mine if _shard_done(out, s, plan_id) is None]
        log.info("gallery %s: %d images, %d shards (%d mine, %d to embed)", out, len(entries), shards, len(mine),
                 len(pending))
        started = time.perf_counter()
        if pending:
            device = distributed.device()
            model = store.load_member(entry.name).to(device)
            data = store.config().data
            dataset = ImageFiles(entries, plan["load_size"], data.background, data.max_image_pixels)
            _embed_shards(out, model, dataset, pending, plan, plan_id, device, workers, progress)
        seconds = time.perf_counter() - started
        distributed.barrier()
        record = None
        if distributed.is_main():
            record = _finish(out, plan, plan_id, shards, index, str(Path(images)), seconds)
        distributed.barrier()
    return record if record is not None else json.loads((out / GALLERY).read_text())


def _plan(store: FamilyStore, entry: MemberRecord, entries: list[ImageEntry], shard_size: int,
          batch_size: int) -> dict:
    """Everything that decides the gallery's floats: a build with another plan cannot reuse its shards."""
    listing = hashlib.sha256("\n".join(e.name for e in entries).encode()).hexdigest()
    return {"space_id": store.space_id, "member": entry.name, "dim": entry.dim, "load_size": store.config().load_size,
            "images": len(entries), "listing_sha256": listing, "shard_size": shard_size, "batch_size": batch_size}


def _embed_shards(out: Path, model, dataset: ImageFiles, pending: list[int], plan: dict, plan_id: str,
                  device: torch.device, workers: int, progress: bool) -> None:
    from tqdm import tqdm

    from hetero.models import resize_to

    entries = dataset.entries
    shard_size, batch_size = plan["shard_size"], plan["batch_size"]
    sampler = _ShardBatches(pending, len(entries), shard_size, batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_images,
                                         multiprocessing_context=loader_context(workers))
    order = iter(pending)
    shard = next(order)
    end = min((shard + 1) * shard_size, len(entries))
    chunks, names, skipped, seen = [], [], [], shard * shard_size
    bar = tqdm(total=sum(min((s + 1) * shard_size, len(entries)) - s * shard_size for s in pending),
               desc=f"embedding {out.name}", unit="img", disable=not progress, leave=False)
    with torch.inference_mode():
        for batch_names, batch_skipped, pixels in loader:
            if pixels is not None:
                images = pixels.to(device).float().div(255.0)
                chunks.append(model(resize_to(images, model.input_size)).float().cpu())
            names += batch_names
            skipped += batch_skipped
            seen += len(batch_names) + len(batch_skipped)
            bar.update(len(batch_names) + len(batch_skipped))
            if seen == end:
                embeddings = torch.cat(chunks) if chunks else torch.zeros(0, plan["dim"])
                _write_shard(out, shard, plan, plan_id, embeddings, names, skipped)
                shard = next(order, None)
                if shard is not None:
                    end = min((shard + 1) * shard_size, len(entries))
                    chunks, names, skipped, seen = [], [], [], shard * shard_size
    bar.close()


def _finish(out: Path, plan: dict, plan_id: str, shards: int, index: str, source: str, seconds: float) -> dict:
    """Check every shard, build the FAISS index and write gallery.json (rank 0)."""
    records = []
    for shard in range(shards):
        record = _shard_done(out, shard, plan_id)
        if record is None:
            raise GalleryError(f"{_shard_paths(out, shard)[0]}: shard {shard} is missing or incomplete after the "
                               f"build; run the build again to finish it")
        records.append({k: record[k] for k in ("file", "sha256", "rows")} | {"skipped": len(record["skipped"])})
    rows = sum(r["rows"] for r in records)
    if rows == 0:
        raise GalleryError(f"--images {source}: none of the {plan['images']} images could be read")
    kind = choose_index(rows) if index == "auto" else index
    index_record = _build_index(out, records, plan["dim"], kind)
    gallery = {"format": FORMAT, "space_id": plan["space_id"], "member": plan["member"], "dim": plan["dim"],
               "rows": rows, "skipped": sum(r["skipped"] for r in records), "source": source, "plan": plan,
               "plan_id": plan_id, "shards": records, "index": index_record,
               "embed_seconds_last_run": round(seconds, 2)}
    atomic_write_json(out / GALLERY, gallery)
    return gallery


# ------------------------------------------------------------------------------------ vectors from elsewhere

COSINE_TO_ACCEPT = 0.999  # a stored vector and our re-embedding of its image: the same space, up to rounding
VECTOR_SUFFIXES = (".npy", ".safetensors", ".parquet")


def read_vectors(path: str | Path, ids: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """(item ids, float32 vectors) from .npy (ids from --ids, one per line), .safetensors (the one 2-D tensor, or
    "embeddings"; ids from --ids or its metadata "ids") or .parquet (columns "id" and "embedding")."""
    path = Path(path)
    if not path.is_file():
        raise GalleryError(f"--vectors {path}: no such file")
    suffix = path.suffix.lower()
    stated: list[str] | None = None
    try:
        if suffix == ".npy":
            with open(path, "rb") as handle:
                check_npy_size(handle, path.stat().st_size)
                handle.seek(0)
                vectors = np.load(handle, allow_pickle=False)
        elif suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as handle:
                keys = list(handle.keys())
                key = "embeddings" if "embeddings" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise GalleryError(f"--vectors {path}: holds tensors {keys}; name the vectors 'embeddings'")
                vectors = handle.get_tensor(key)
                meta = handle.metadata() or {}
            stated = _item_ids(json.loads(meta["ids"]), path) if "ids" in meta else None
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            missing = [c for c in ("id", "embedding") if c not in table.column_names]
            if missing:
                raise GalleryError(f"--vectors {path}: no column {missing[0]!r} (columns: {', '.join(table.column_names)}); "
                                   f"a parquet gallery needs 'id' and 'embedding'")
            stated = _item_ids(table.column("id").to_pylist(), path)
            vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
        else:
            raise GalleryError(f"--vectors {path}: cannot read {suffix!r} files; give {', '.join(VECTOR_SUFFIXES)}")
    except GalleryError:
        raise
    except ImportError as err:
        raise GalleryError(f"--vectors {path}: reading {suffix} needs {err.name} (pip install {err.name})") from None
    except Exception as err:  # numpy, safetensors and pyarrow each raise their own kinds for a damaged file
        raise GalleryError(f"--vectors {path}: cannot be read ({type(err).__name__}: {str(err)[:200]})") from None
    if ids is not None:
        stated = _read_ids(Path(ids))
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise GalleryError(f"--vectors {path}: holds {vectors.dtype} of shape {vectors.shape}; a gallery is a 2-D "
                           f"float array (items x dim)")
    if stated is None:
        raise GalleryError(f"--vectors {path}: no item ids; give --ids FILE (one id per line, in row order)")
    if len(stated) != len(vectors) or len(set(stated)) != len(stated):
        raise GalleryError(f"--vectors {path}: {len(vectors)} vectors but {len(stated)} ids "
                           f"({len(stated) - len(set(stated))} repeated); every row needs its own id")
    if not np.isfinite(vectors).all():
        raise GalleryError(f"--vectors {path}: holds NaN or infinite values (row {int(np.argwhere(~np.isfinite(vectors))[0][0])})")
    return stated, vectors.astype(np.float32)


def _item_ids(values, path: Path) -> list[str]:
    """The ids a vectors file states, one per row (text or whole numbers); a missing or unusable one is
    refused by its row: the ids name the images that prove the space, and the rows a search answers with."""
    if not isinstance(values, list):
        raise GalleryError(f"--vectors {path}: its ids are {type(values).__name__}, not a list of one id per row")
    for row, value in enumerate(values):
        if value is None:
            raise GalleryError(f"--vectors {path}: row {row} has no id (null); every row needs its own id")
        try:
            usable = isinstance(value, (str, int)) and not isinstance(value, bool) and bool(str(value).encode())
        except UnicodeEncodeError:  # a lone surrogate, which JSON can spell
            usable = False
        if not usable:
            raise GalleryError(f"--vectors {path}: row {row} has id {value!r}; ids are text or whole numbers")
    return [str(v) for v in values]


def _read_ids(path: Path) -> list[str]:
    """--ids: one item id per line, UTF-8 text; blank lines are skipped."""
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "no such file"
        raise GalleryError(f"--ids {path}: {problem}; give a text file with one item id per line, in row order")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise GalleryError(f"--ids {path}: cannot be read ({err.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise GalleryError(f"--ids {path}: not UTF-8 text (byte {err.start} is {raw[err.start:err.start + 1]!r}); "
                           f"save the ids as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def prove_space(store: FamilyStore, entry: MemberRecord, stored: dict[str, np.ndarray], images: str | Path,
                sample: int) -> dict:
    """Re-embed up to `sample` of the listed images that `stored` names; every stored vector must be within
    cosine 0.999 of ours, else GalleryError saying how far off they are and what preprocessing was tried."""
    from hetero.models import resize_to

    entries = [e for e in list_images(images) if e.name in stored]
    if not entries:
        raise GalleryError(f"none of the images under {images} is named like a stored item id; the ids must be the "
                           f"images' paths relative to {images}")
    chosen = [entries[i] for i in np.linspace(0, len(entries) - 1, min(sample, len(entries))).round().astype(int)]
    data = store.config().data
    model = store.load_member(entry.name)
    dataset = ImageFiles(chosen, store.config().load_size, data.background, data.max_image_pixels)
    names, ours = [], []
    with torch.inference_mode():
        for begin in range(0, len(chosen), 64):
            batch_names, _, pixels = collate_images([dataset[i] for i in range(begin, min(begin + 64, len(chosen)))])
            if pixels is not None:
                ours.append(model(resize_to(pixels.float().div(255.0), entry.input_size)).numpy())
                names += batch_names
    if not names:
        raise GalleryError(f"none of the {len(chosen)} sampled images under {images} could be read")
    ours = np.concatenate(ours)
    theirs = np.stack([stored[n] for n in names])
    cosine = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1) + 1e-12)
    if cosine.min() < COSINE_TO_ACCEPT:
        worst = names[int(cosine.argmin())]
        colour = f"colour order {entry.colour_order}, " if entry.kind == "external" else ""
        raise GalleryError(
            f"the stored vectors are not in the space of {store.name!r} / {entry.name!r}: over {len(names)} "
            f"re-embedded images the cosine to the stored vectors is min {cosine.min():.4f} ({worst}), mean "
            f"{cosine.mean():.4f}, needed >= {COSINE_TO_ACCEPT}. Tried: decode as RGB, composite transparency onto "
            f"{data.background}, resize to {store.config().load_size} px then {entry.input_size} px, {colour}"
            f"normalise with mean {np.round(entry.mean, 4).tolist()} / std {np.round(entry.std, 4).tolist()}. "
            f"Different preprocessing or another model is the usual cause; nothing was stamped.")
    return {"checked": len(names), "min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean())}


def import_gallery(store: FamilyStore, vectors: str | Path, images: str | Path, out: str | Path, *,
                   ids: str | Path | None = None, member: str | None = None, sample: int = 64, index: str = "auto",
                   overwrite: bool = False, shard_size: int = 4096) -> dict:
    """A gallery from vectors the user already has, stamped with the family's space id only after a sample
    of the listed images, re-embedded by the member (the cloud by default), proves they are its vectors."""
    out = check_output(out, "--out", folder=True)
    entry = member_record(store, member)
    names, matrix = read_vectors(vectors, ids)
    if matrix.shape[1] != entry.dim:
        raise GalleryError(f"--vectors {vectors}: {matrix.shape[1]}-d vectors; member {entry.name!r} embeds into "
                           f"{entry.dim} dimensions, so they cannot be its space")
    proof = prove_space(store, entry, dict(zip(names, matrix)), images, sample)
    matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    listing = hashlib.sha256("\n".join(names).encode()).hexdigest()
    plan = {"space_id": store.space_id, "member": entry.name, "dim": entry.dim, "imported": str(Path(vectors)),
            "vectors_sha256": sha256_file(Path(vectors)), "images": len(names), "listing_sha256": listing,
            "shard_size": shard_size}
    plan_id = _plan_id(plan)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise GalleryError(f"--out {out}: not empty; use --overwrite to replace what is there or choose another --out")
    with writing(out, "gallery import"):
        if overwrite:
            shutil.rmtree(out / "shards", ignore_errors=True)
            for name in (GALLERY, INDEX_FILE):
                (out / name).unlink(missing_ok=True)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        shards = math.ceil(len(names) / shard_size)
        for shard in range(shards):
            rows = slice(shard * shard_size, (shard + 1) * shard_size)
            _write_shard(out, shard, plan, plan_id, torch.from_numpy(matrix[rows]), names[rows], [])
        record = _finish(out, plan, plan_id, shards, index, str(Path(vectors)), 0.0)
    return {**record, "proof": proof}


def choose_index(rows: int) -> str:
    """flat (exact) up to FLAT_MAX_ROWS rows, IVF-Flat above (see the note at FLAT_MAX_ROWS)."""
    return "flat" if rows <= FLAT_MAX_ROWS else "ivf"


def ivf_lists(rows: int) -> int:
    """nlist ~ sqrt(rows), a power of two: ~1k vectors per list at 1M rows."""
    return max(1, 2 ** round(math.log2(max(1.0, math.sqrt(rows)))))


def iter_shards(out: Path, records: list[dict]):
    """(first row, float32 embeddings) of each shard in order, one shard in memory at a time."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    start = 0
    for record in records:
        path = resolve_inside(out / "shards", record["file"], f"{out / GALLERY}: shard file")
        try:
            embeddings = load_file(str(path))["embeddings"]
        except (SafetensorError, OSError, KeyError) as err:
            raise GalleryError(f"{path}: not a readable gallery shard ({type(err).__name__}: {err}); rebuild the "
                               f"gallery") from None
        yield start, embeddings
        start += record["rows"]


def make_index(kind: str, dim: int, rows: int, sample_fn=None):
    """An empty FAISS inner-product index of `kind` for `rows` vectors (IVF trained on `sample_fn()`)."""
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index, {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
    if kind == "ivf":
        nlist = ivf_lists(rows)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234
        index.train(np.ascontiguousarray(sample_fn(min(rows, 64 * nlist)), dtype=np.float32))
        index.nprobe = min(IVF_NPROBE, nlist)
        return index, {"nlist": nlist, "nprobe": index.nprobe}
    raise GalleryError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS[1:])}")


def _sample_rows(out: Path, records: list[dict], count: int) -> np.ndarray:
    """`count` rows spread evenly over the gallery, read shard by shard (IVF's training sample)."""
    total = sum(r["rows"] for r in records)
    wanted = np.unique(np.linspace(0, total - 1, count).round().astype(np.int64))
    parts = []
    for start, embeddings in iter_shards(out, records):
        local = wanted[(wanted >= start) & (wanted < start + len(embeddings))] - start
        parts.append(embeddings[local])
    return np.concatenate(parts)


def _build_index(out: Path, records: list[dict], dim: int, kind: str) -> dict:
    faiss = _faiss()
    rows = sum(r["rows"] for r in records)
    started = time.perf_counter()
    index, params = make_index(kind, dim, rows, lambda count: _sample_rows(out, records, count))
    for _, embeddings in iter_shards(out, records):
        if len(embeddings):
            index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    with atomic_path(out / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    return {"kind": kind, "file": INDEX_FILE, "sha256": sha256_file(out / INDEX_FILE), "rows": rows, **params,
            "build_seconds": round(time.perf_counter() - started, 2)}


# -------------------------------------------------------------------------------------------- searching


class _ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    sha256: str
    rows: int
    skipped: int


class _GalleryRecord(BaseModel):
    """gallery.json, validated before anything it names is read."""

    model_config = ConfigDict(extra="allow")
    format: str
    space_id: str
    member: str
    dim: int
    rows: int
    shards: list[_ShardEntry]
    index: dict


class Gallery:
    """A built gallery: its record, the FAISS index (loaded on first search) and row -> image name."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / GALLERY
        if not path.is_file():
            raise GalleryError(f"{path}: no gallery here; build one with `hetero gallery build`")
        try:
            self.record = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise GalleryError(f"{path}: not valid JSON ({type(err).__name__}: {err})") from None
        if not isinstance(self.record, dict) or self.record.get("format") != FORMAT:
            found = self.record.get("format") if isinstance(self.record, dict) else None
            raise GalleryError(f"{path}: format {found!r} is not {FORMAT!r}")
        try:
            checked = _GalleryRecord.model_validate(self.record)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in err.errors()[:5])
            raise GalleryError(f"{path}: not a hetero gallery record: {problems}") from None
        if sum(s.rows for s in checked.shards) != checked.rows:
            raise GalleryError(f"{path}: its shards hold {sum(s.rows for s in checked.shards)} rows, not "
                               f"{checked.rows}")
        self.space_id, self.dim, self.rows = checked.space_id, checked.dim, checked.rows
        self._starts = list(np.cumsum([0] + [s.rows for s in checked.shards])[:-1])
        self._names: dict[int, list[str]] = {}
        self._index = None

    def check_space(self, query_space: str | None, query: str) -> None:
        """Refuse queries embedded in another space (or by a model that does not say which)."""
        if query_space != self.space_id:
            raise SpaceMismatch(f"{query} embeds into space {query_space!r} but the gallery {self.directory} was "
                                f"embedded in space {self.space_id!r} (member {self.record['member']!r}); "
                                f"their vectors are not comparable. Query with a model of that family or "
                                f"rebuild the gallery with this one.")

    @property
    def index(self):
        if self._index is None:
            faiss = _faiss()
            entry = self.record["index"]
            path = resolve_inside(self.directory, entry.get("file"), f"{self.directory / GALLERY}: index file")
            if not path.is_file():
                raise GalleryError(f"{path}: the gallery's index file is missing; rebuild the gallery")
            actual = sha256_file(path)
            if actual != entry.get("sha256"):
                raise GalleryError(f"{path}: sha256 {actual} does not match gallery.json's {entry.get('sha256')}")
            self._index = faiss.read_index(str(path))
        return self._index

    def search(self, queries: np.ndarray, k: int, query_space: str | None, query: str = "the query model",
               nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each queries x k, best first; rows are -1 where fewer than k items exist."""
        self.check_space(query_space, query)
        if k < 1:
            raise GalleryError(f"-k {k}: must be >= 1")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise GalleryError(f"queries have shape {tuple(queries.shape)}; the gallery needs (n, {self.dim})")
        index = self.index
        if nprobe is not None and hasattr(index, "nprobe"):
            index.nprobe = nprobe
        if ef_search is not None and hasattr(index, "hnsw"):
            index.hnsw.efSearch = ef_search
        return index.search(queries, k)

    def nearest(self, queries: np.ndarray, k: int, query_space: str | None, query: str = "the query model",
                nprobe: int | None = None) -> list[list[dict]]:
        """Per query, its k nearest items as {"name", "row", "score"}, best first."""
        scores, rows = self.search(queries, k, query_space, query, nprobe=nprobe)
        return [[{"name": self.name(int(r)), "row": int(r), "score": float(s)} for s, r in zip(row_scores, row_ids)
                 if r >= 0] for row_scores, row_ids in zip(scores, rows)]

    def name(self, row: int) -> str:
        shard = bisect.bisect_right(self._starts, row) - 1
        if shard not in self._names:
            shard_file = Path(self.record["shards"][shard]["file"]).with_suffix(".json").as_posix()
            record_file = resolve_inside(self.directory / "shards", shard_file, f"{self.directory / GALLERY}: shard")
            try:
                self._names[shard] = json.loads(record_file.read_text())["names"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise GalleryError(f"{record_file}: cannot read the shard's image names ({err})") from None
        return self._names[shard][row - self._starts[shard]]

    def embeddings(self) -> np.ndarray:
        """Every row in order (for tests and small galleries: this one is not streamed)."""
        return np.concatenate([e for _, e in iter_shards(self.directory, self.record["shards"])])

    def names(self) -> list[str]:
        return [self.name(row) for row in range(self.rows)]


@dataclass
class QueryModel:
    """Anything that embeds query images: a torch member or an exported artifact's runtime."""

    label: str
    space_id: str | None
    input_size: int
    load_size: int
    encode: object  # callable: float32 NCHW images in [0, 1] at input_size -> unit vectors (numpy)
    background: tuple = DEFAULT_BACKGROUND
    max_pixels: int = DEFAULT_MAX_PIXELS


def open_query_model(store: FamilyStore | None = None, member: str | None = None,
                     artifact: str | Path | None = None) -> QueryModel:
    """A torch member of the family (the cloud by default), or an exported artifact file."""
    if artifact is not None:
        return _artifact_model(Path(artifact), store)
    if store is None:
        raise GalleryError("a query model needs a family directory (for --member) or --artifact FILE")
    entry = member_record(store, member)
    model = store.load_member(entry.name)

    def encode(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images)).numpy()

    data = store.config().data
    return QueryModel(f"member {entry.name!r} of {store.root}", store.space_id, entry.input_size,
                      store.config().load_size, encode, tuple(data.background), data.max_image_pixels)


def _artifact_model(path: Path, store: FamilyStore | None) -> QueryModel:
    from hetero import formats
    from hetero.profiles import load_profile

    if not path.exists():
        raise GalleryError(f"--artifact {path}: no such file")
    registered = store.artifact_for_file(path) if store is not None else None
    if registered is not None:
        spec, runtime_name = formats.get(registered.format), load_profile(registered.profile).verify.runtime
    else:
        spec = formats.for_path(path)
        if spec is None:
            raise GalleryError(f"--artifact {path}: cannot tell its format from suffix {path.suffix!r}; known: "
                               f"{', '.join(f.suffix for f in formats.FORMATS.values())}")
        runtime_name = spec.in_process()[0].name
    try:
        runtime = spec.open(path, runtime_name)
        int(runtime.metadata["input_size"])
    except HeteroError:
        raise
    except Exception as err:
        raise GalleryError(f"--artifact {path}: cannot be opened with {runtime_name} ({type(err).__name__}: "
                           f"{str(err).strip()[:300]})") from None
    meta = runtime.metadata
    load_size, background, max_pixels = meta["input_size"], DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS
    if store is not None:
        data = store.config().data
        load_size, background, max_pixels = store.config().load_size, tuple(data.background), data.max_image_pixels
    return QueryModel(f"artifact {path} ({meta.get('member')}, {runtime.name})", meta.get("space_id"),
                      meta["input_size"], load_size, runtime.embed, background, max_pixels)


def search_images(gallery, images: str | Path, model: QueryModel, k: int = 5, batch_size: int = 64,
                  nprobe: int | None = None) -> list[dict]:
    """Embed every image under `images` with `model` and return its k nearest gallery items.

    `gallery` is a FAISS gallery (a Gallery or its directory) or any store with the same `check_space` and
    `nearest` (a Milvus collection, :class:`hetero.gallery.stores.MilvusStore`); the space is checked before any
    image is read.
    """
    from hetero.models import resize_to

    gallery = Gallery(gallery) if isinstance(gallery, (str, Path)) else gallery
    gallery.check_space(model.space_id, model.label)
    entries = list_images(images)
    dataset = ImageFiles(entries, model.load_size, model.background, model.max_pixels)
    results = []
    for begin in range(0, len(entries), batch_size):
        names, skipped, pixels = collate_images([dataset[i] for i in range(begin, min(begin + batch_size, len(entries)))])
        results += [{"query": name, "skipped": True, "results": []} for name in skipped]
        if pixels is None:
            continue
        images_ = resize_to(pixels.float().div(255.0), model.input_size).numpy()
        found = gallery.nearest(model.encode(images_), k, model.space_id, model.label, nprobe)
        results += [{"query": name, "results": hits} for name, hits in zip(names, found)]
    return results
