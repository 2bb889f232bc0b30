"""Vectors from elsewhere: read a vectors file (.npy, .safetensors, .parquet) and its item ids, prove by
re-embedding a sample of the images that they are the family's space, and only then stamp them as a
gallery (`hetero gallery import`; a Milvus collection's `adopt` uses the same proof)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from hetero.family import FamilyStore, MemberRecord, writing
from hetero.files import check_npy_size, check_output, sha256_file
from hetero.gallery.base import GalleryError, member_record
from hetero.gallery.build import clear_gallery, finish_gallery, plan_fingerprint, write_shard
from hetero.gallery.images import ImageFiles, embed_batches, in_batches, list_images

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
        for batch_names, _, embedded in embed_batches(dataset, in_batches(len(chosen), 64), model, entry.input_size):
            if embedded is not None:
                ours.append(embedded.numpy())
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
    plan_id = plan_fingerprint(plan)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise GalleryError(f"--out {out}: not empty; use --overwrite to replace what is there or choose another --out")
    with writing(out, "gallery import"):
        if overwrite:
            clear_gallery(out)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        shards = math.ceil(len(names) / shard_size)
        for shard in range(shards):
            rows = slice(shard * shard_size, (shard + 1) * shard_size)
            write_shard(out, shard, plan, plan_id, torch.from_numpy(matrix[rows]), names[rows], [])
        record = finish_gallery(out, plan, plan_id, shards, index, str(Path(vectors)), 0.0)
    return {**record, "proof": proof}


