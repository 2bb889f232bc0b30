"""Vectors from elsewhere: read a vectors file (.npy, .safetensors, .parquet) and its item ids, prove by
re-embedding a sample of the images that they are the family's space, and only then stamp them as a
gallery (`hetero gallery import`; a Milvus collection's `adopt` uses the same proof)."""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from hetero.family import FamilyStore, MemberRecord, writing
from hetero.files import (SAFETENSORS_DTYPES, RowFile, check_npy_size, check_output, safetensors_rows,
                          sha256_file)
from hetero.gallery.base import GalleryError, member_record
from hetero.gallery.build import clear_gallery, finish_gallery, plan_fingerprint, write_shard
from hetero.gallery.images import ImageFiles, embed_batches, in_batches, list_images

COSINE_TO_ACCEPT = 0.999  # a stored vector and our re-embedding of its image: the same space, up to rounding
VECTOR_SUFFIXES = (".npy", ".safetensors", ".parquet")


CHUNK_ROWS = 65_536  # rows read at a time: 32 MiB of 128-d float32, whatever the file's size


class VectorsFile:
    """A vectors file read a chunk of rows at a time, never whole, so that importing 10M rows takes the memory
    of one chunk: .npy and .safetensors rows by positioned reads (hetero.files.RowFile), .parquet by record
    batches.

    The ids come from --ids (one per line, read as the rows are), the safetensors metadata "ids" (in the
    file's header, so held whole) or the parquet "id" column (read with its rows).  Opening checks what the
    file's header says (kind, shape, ids given); :meth:`scan` reads every row once and checks the values.
    """

    def __init__(self, path: str | Path, ids: str | Path | None = None):
        self.path = path = Path(path)
        if not path.is_file():
            raise GalleryError(f"--vectors {path}: no such file")
        self.suffix = suffix = path.suffix.lower()
        self.ids_file = Path(ids) if ids is not None else None
        self.stated: list[str] | None = None  # ids held in the file's header (safetensors)
        try:
            if suffix == ".npy":
                shape, dtype = self._open_npy()
            elif suffix == ".safetensors":
                shape, dtype = self._open_safetensors()
            elif suffix == ".parquet":
                shape, dtype = self._open_parquet()
            else:
                raise GalleryError(f"--vectors {path}: cannot read {suffix!r} files; give {', '.join(VECTOR_SUFFIXES)}")
        except GalleryError:
            raise
        except ImportError as err:
            raise GalleryError(f"--vectors {path}: reading {suffix} needs {err.name} (pip install {err.name})"
                               ) from None
        except Exception as err:  # numpy, safetensors and pyarrow each raise their own kinds for a damaged file
            raise GalleryError(f"--vectors {path}: cannot be read ({type(err).__name__}: {str(err)[:200]})") from None
        if len(shape) != 2 or not np.issubdtype(dtype, np.floating):
            raise GalleryError(f"--vectors {path}: holds {dtype} of shape {shape}; a gallery is a 2-D float array "
                               f"(items x dim)")
        self.rows, self.dim = shape
        if self.ids_file is not None:
            self.id_count = sum(1 for _ in _ids_in(self.ids_file))
        elif self.stated is not None:
            self.id_count = len(self.stated)
        elif suffix != ".parquet":
            raise GalleryError(f"--vectors {path}: no item ids; give --ids FILE (one id per line, in row order)")
        else:
            self.id_count = self.rows
        if self.id_count != self.rows:
            raise GalleryError(f"--vectors {path}: {self.rows} vectors but {self.id_count} ids; every row needs its "
                               f"own id")

    def _open_npy(self):
        with open(self.path, "rb") as handle:
            shape, fortran_order, dtype = check_npy_size(handle, self.path.stat().st_size)
            offset = handle.tell()
        if len(shape) == 2 and np.issubdtype(dtype, np.floating):
            self._rows = (RowFile(self.path, offset, dtype, shape) if not fortran_order  # rows lie apart otherwise:
                          else np.load(self.path, mmap_mode="r", allow_pickle=False))  # mapped, slower and larger
        return shape, dtype

    def _open_safetensors(self):
        from safetensors import safe_open

        with safe_open(str(self.path), framework="np") as handle:
            keys = list(handle.keys())
            key = "embeddings" if "embeddings" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise GalleryError(f"--vectors {self.path}: holds tensors {keys}; name the vectors 'embeddings'")
            part = handle.get_slice(key)
            shape, stored = tuple(part.get_shape()), part.get_dtype()
            meta = handle.metadata() or {}
        if stored not in SAFETENSORS_DTYPES:
            raise GalleryError(f"--vectors {self.path}: holds {stored} values; a gallery is float16, float32 or "
                               f"float64")
        self._rows = safetensors_rows(self.path)[key]
        if "ids" in meta and self.ids_file is None:
            self.stated = _item_ids(json.loads(meta["ids"]), self.path)
        return shape, np.dtype(SAFETENSORS_DTYPES[stored])

    def _open_parquet(self):
        import pyarrow.parquet as pq

        schema = pq.read_schema(self.path)
        missing = [c for c in ("id", "embedding") if c not in schema.names]
        if missing:
            raise GalleryError(f"--vectors {self.path}: no column {missing[0]!r} (columns: {', '.join(schema.names)}); "
                               f"a parquet gallery needs 'id' and 'embedding'")
        rows = pq.ParquetFile(self.path).metadata.num_rows
        first = next(self._parquet_batches(1), None)
        dim = first[1].shape[1] if first is not None else 0
        return (rows, dim), np.dtype(np.float32)

    def _parquet_batches(self, size: int):
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        columns = ["embedding"] if self.ids_file is not None else ["id", "embedding"]
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=size, columns=columns):
            column = batch.column("embedding")
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            values = column.flatten()
            if column.null_count or values.null_count or len(set(lengths.tolist())) > 1:
                raise ValueError("column 'embedding' holds missing values or lists of different lengths")
            dim = int(lengths[0]) if len(lengths) else 0
            matrix = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(batch), dim)
            ids = None if self.ids_file is not None else batch.column("id").to_pylist()
            yield ids, matrix

    def _row_chunks(self, size: int):
        """(ids stated in the file or None, float32 rows) in row order."""
        if self.suffix in (".npy", ".safetensors"):
            for begin in range(0, self.rows, size):
                rows = (self._rows.read(begin, size) if isinstance(self._rows, RowFile)
                        else self._rows[begin:begin + size])
                yield None, np.asarray(rows, dtype=np.float32)
        else:
            yield from self._parquet_batches(size)

    def chunks(self, size: int | None = None):
        """(item ids, float32 rows) of consecutive rows, `size` (CHUNK_ROWS) at a time (parquet: up to that)."""
        size = size or CHUNK_ROWS
        ids_from_file = _ids_in(self.ids_file) if self.ids_file is not None else None
        begin = 0
        try:
            for ids, matrix in self._row_chunks(size):
                if ids_from_file is not None:
                    ids = list(itertools.islice(ids_from_file, len(matrix)))
                elif ids is None:
                    ids = self.stated[begin:begin + len(matrix)]
                else:
                    ids = _item_ids(ids, self.path, first_row=begin)
                yield ids, matrix
                begin += len(matrix)
        except GalleryError:
            raise
        except Exception as err:
            raise GalleryError(f"--vectors {self.path}: cannot be read at row {begin} ({type(err).__name__}: "
                               f"{str(err)[:200]})") from None

    def scan(self, wanted: set[str] = frozenset()) -> tuple[str, dict[str, np.ndarray]]:
        """Read every row once: refuse NaN or infinite values (by row) and repeated ids; return the sha256 of the
        ids in row order (one per line) and the rows of the ids in `wanted`."""
        listing, found, hashes, begin = hashlib.sha256(), {}, [], 0
        for ids, matrix in self.chunks():
            if not len(matrix):
                continue
            bad = ~np.isfinite(matrix)
            if bad.any():
                raise GalleryError(f"--vectors {self.path}: holds NaN or infinite values (row "
                                   f"{begin + int(np.argwhere(bad)[0][0])})")
            listing.update(("\n" if begin else "").encode() + "\n".join(ids).encode())
            hashes.append(np.fromiter((hash(i) for i in ids), np.int64, len(ids)))
            found.update((name, matrix[i].copy()) for i, name in enumerate(ids) if name in wanted)
            begin += len(matrix)
        repeated = self._repeated(np.concatenate(hashes) if hashes else np.zeros(0, np.int64))
        if repeated:
            raise GalleryError(f"--vectors {self.path}: {self.rows} vectors but {len(repeated)} id(s) repeated "
                               f"({', '.join(map(repr, sorted(repeated)[:3]))}); every row needs its own id")
        return listing.hexdigest(), found

    def _repeated(self, hashes: np.ndarray) -> set[str]:
        """The ids stated more than once: 8-byte hashes find the candidates in the memory of 8 bytes per row,
        a second pass over the ids of those hashes only tells true repeats from collisions."""
        ordered = np.sort(hashes)
        same = ordered[1:][ordered[1:] == ordered[:-1]]
        if not len(same):
            return set()
        suspects, seen, repeated = set(same.tolist()), set(), set()
        for ids, _ in self.chunks():
            for name in ids:
                if hash(name) in suspects:
                    (repeated if name in seen else seen).add(name)
        return repeated


def read_vectors(path: str | Path, ids: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """(item ids, float32 vectors) of a whole vectors file, checked (see :class:`VectorsFile`; an import reads
    it in chunks instead)."""
    vectors = VectorsFile(path, ids)
    vectors.scan()
    names, parts = [], []
    for chunk_ids, matrix in vectors.chunks():
        names += chunk_ids
        parts.append(matrix)
    return names, (np.concatenate(parts) if parts else np.zeros((0, vectors.dim), np.float32))


def _item_ids(values, path: Path, first_row: int = 0) -> list[str]:
    """The ids a vectors file states, one per row (text or whole numbers); a missing or unusable one is
    refused by its row: the ids name the images that prove the space, and the rows a search answers with."""
    if not isinstance(values, list):
        raise GalleryError(f"--vectors {path}: its ids are {type(values).__name__}, not a list of one id per row")
    for row, value in enumerate(values):
        if value is None:
            raise GalleryError(f"--vectors {path}: row {first_row + row} has no id (null); every row needs its own id")
        try:
            usable = isinstance(value, (str, int)) and not isinstance(value, bool) and bool(str(value).encode())
        except UnicodeEncodeError:  # a lone surrogate, which JSON can spell
            usable = False
        if not usable:
            raise GalleryError(f"--vectors {path}: row {first_row + row} has id {value!r}; ids are text or whole "
                               f"numbers")
    return [str(v) for v in values]


def _ids_in(path: Path):
    """--ids: one item id per line, UTF-8 text, blank lines skipped; read a line at a time."""
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "no such file"
        raise GalleryError(f"--ids {path}: {problem}; give a text file with one item id per line, in row order")
    offset = 0
    try:
        with open(path, "rb") as handle:
            for raw in handle:
                try:
                    text = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
                except UnicodeDecodeError as err:
                    raise GalleryError(f"--ids {path}: not UTF-8 text (byte {offset + err.start} is "
                                       f"{raw[err.start:err.start + 1]!r}); save the ids as UTF-8") from None
                offset += len(raw)
                for line in text.splitlines():
                    if line.strip():
                        yield line.strip()
    except OSError as err:
        raise GalleryError(f"--ids {path}: cannot be read ({err.strerror})") from None


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


def proven_vectors(store: FamilyStore, vectors: str | Path, images: str | Path, *, ids: str | Path | None = None,
                   member: str | None = None, sample: int = 64) -> tuple[MemberRecord, VectorsFile, str, dict]:
    """Open a vectors file, read it once to check every row, and prove its space on a sample of the images:
    (the member, the file, the sha256 of its ids in row order, the proof).  Only the images' own rows are kept
    in memory, so a file of any size is checked in the memory of a chunk."""
    entry = member_record(store, member)
    source = VectorsFile(vectors, ids)
    if source.dim != entry.dim:
        raise GalleryError(f"--vectors {vectors}: {source.dim}-d vectors; member {entry.name!r} embeds into "
                           f"{entry.dim} dimensions, so they cannot be its space")
    try:
        listed, unlisted = {e.name for e in list_images(images)}, None
    except GalleryError as err:  # the vectors file's own faults are said first: they are found without images
        listed, unlisted = set(), err
    listing, found = source.scan(listed)
    if unlisted is not None:
        raise unlisted
    return entry, source, listing, prove_space(store, entry, found, images, sample)


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def import_gallery(store: FamilyStore, vectors: str | Path, images: str | Path, out: str | Path, *,
                   ids: str | Path | None = None, member: str | None = None, sample: int = 64, index: str = "auto",
                   overwrite: bool = False, shard_size: int = 4096) -> dict:
    """A gallery from vectors the user already has, stamped with the family's space id only after a sample
    of the listed images, re-embedded by the member (the cloud by default), proves they are its vectors.
    The vectors are read a shard at a time; the FAISS index built at the end holds them all (as it must)."""
    out = check_output(out, "--out", folder=True)
    entry, source, listing, proof = proven_vectors(store, vectors, images, ids=ids, member=member, sample=sample)
    plan = {"space_id": store.space_id, "member": entry.name, "dim": entry.dim, "imported": str(Path(vectors)),
            "vectors_sha256": sha256_file(Path(vectors)), "images": source.rows, "listing_sha256": listing,
            "shard_size": shard_size}
    plan_id = plan_fingerprint(plan)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise GalleryError(f"--out {out}: not empty; use --overwrite to replace what is there or choose another --out")
    with writing(out, "gallery import"):
        if overwrite:
            clear_gallery(out)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        shards = 0
        for names, matrix in source.chunks(shard_size):
            write_shard(out, shards, plan, plan_id, torch.from_numpy(unit_rows(matrix)), names, [])
            shards += 1
        record = finish_gallery(out, plan, plan_id, shards, index, str(Path(vectors)), 0.0)
    return {**record, "proof": proof}
