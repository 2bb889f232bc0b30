"""Building a gallery from images: plan, embed shard by shard, then index and write gallery.json.

Embedding streams: images are listed once (names only), decoded in batches by DataLoader workers, and
each shard is written as soon as it is full, so memory does not grow with the gallery (the FAISS index
itself, built afterwards, holds the vectors).  A build that stops keeps its finished shards; the next
build with the same plan skips them.  Under torchrun, rank r embeds shards r, r+N, ... and rank 0 builds
the index.  Batches never cross a shard and shard_size is a multiple of batch_size, so the batches (and
therefore every float) are the same however the build was split, interrupted or parallelised.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from hetero.family import FamilyStore, MemberRecord, writing
from hetero.files import atomic_path, atomic_write_json, check_output, sha256_file
from hetero.gallery.base import FORMAT, GALLERY, INDEX_FILE, GalleryError, member_record
from hetero.gallery.images import ImageEntry, ImageFiles, embed_batches, list_images
from hetero.gallery.index import INDEX_KINDS, build_index, choose_index

log = logging.getLogger("hetero.gallery")


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
        plan_id = plan_fingerprint(plan)
        _check_plan(out, plan, overwrite)
        if overwrite and distributed.is_main():  # start from scratch: no shard of an earlier build is reused
            clear_gallery(out)
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
            record = finish_gallery(out, plan, plan_id, shards, index, str(Path(images)), seconds)
        distributed.barrier()
    return record if record is not None else json.loads((out / GALLERY).read_text())


def _plan(store: FamilyStore, entry: MemberRecord, entries: list[ImageEntry], shard_size: int,
          batch_size: int) -> dict:
    """Everything that decides the gallery's floats: a build with another plan cannot reuse its shards."""
    listing = hashlib.sha256("\n".join(e.name for e in entries).encode()).hexdigest()
    return {"space_id": store.space_id, "member": entry.name, "dim": entry.dim, "load_size": store.config().load_size,
            "images": len(entries), "listing_sha256": listing, "shard_size": shard_size, "batch_size": batch_size}


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


def _embed_shards(out: Path, model, dataset: ImageFiles, pending: list[int], plan: dict, plan_id: str,
                  device: torch.device, workers: int, progress: bool) -> None:
    from tqdm import tqdm

    entries = dataset.entries
    shard_size, batch_size = plan["shard_size"], plan["batch_size"]
    sampler = _ShardBatches(pending, len(entries), shard_size, batch_size)
    order = iter(pending)
    shard = next(order)
    end = min((shard + 1) * shard_size, len(entries))
    chunks, names, skipped, seen = [], [], [], shard * shard_size
    bar = tqdm(total=sum(min((s + 1) * shard_size, len(entries)) - s * shard_size for s in pending),
               desc=f"embedding {out.name}", unit="img", disable=not progress, leave=False)
    with torch.inference_mode():
        for batch_names, batch_skipped, embedded in embed_batches(dataset, sampler, model, model.input_size, workers,
                                                                   device):
            if embedded is not None:
                chunks.append(embedded.float().cpu())
            names += batch_names
            skipped += batch_skipped
            seen += len(batch_names) + len(batch_skipped)
            bar.update(len(batch_names) + len(batch_skipped))
            if seen == end:
                embeddings = torch.cat(chunks) if chunks else torch.zeros(0, plan["dim"])
                write_shard(out, shard, plan, plan_id, embeddings, names, skipped)
                shard = next(order, None)
                if shard is not None:
                    end = min((shard + 1) * shard_size, len(entries))
                    chunks, names, skipped, seen = [], [], [], shard * shard_size
    bar.close()


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


def _shard_paths(out: Path, shard: int) -> tuple[Path, Path]:
    stem = out / "shards" / f"shard-{shard:05d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def plan_fingerprint(plan: dict) -> str:
    """The plan's id: shards of one plan are the same floats, so a build may reuse them."""
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


def write_shard(out: Path, shard: int, plan: dict, plan_id: str, embeddings: torch.Tensor, names: list[str],
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


def clear_gallery(out: Path) -> None:
    """Remove an earlier gallery's shards, record and index from OUT (a build or import with --overwrite)."""
    shutil.rmtree(out / "shards", ignore_errors=True)
    for name in (GALLERY, INDEX_FILE):
        (out / name).unlink(missing_ok=True)


def finish_gallery(out: Path, plan: dict, plan_id: str, shards: int, index: str, source: str, seconds: float) -> dict:
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
    index_record = build_index(out, records, plan["dim"], kind)
    gallery = {"format": FORMAT, "space_id": plan["space_id"], "member": plan["member"], "dim": plan["dim"],
               "rows": rows, "skipped": sum(r["skipped"] for r in records), "source": source, "plan": plan,
               "plan_id": plan_id, "shards": records, "index": index_record,
               "embed_seconds_last_run": round(seconds, 2)}
    atomic_write_json(out / GALLERY, gallery)
    return gallery

