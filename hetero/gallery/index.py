"""The FAISS side of a gallery: which index for how many rows, building it from the shards, and `Gallery`,
a built gallery directory opened for search (its record checked, its index loaded on first search)."""
from __future__ import annotations

import bisect
import json
import math
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from hetero.files import atomic_path, resolve_inside, sha256_file
from hetero.gallery.base import FORMAT, GALLERY, INDEX_FILE, GalleryError, SpaceMismatch

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


def _faiss():
    try:
        import faiss
    except ImportError:
        raise GalleryError("gallery indexes need FAISS, which is not installed: pip install faiss-cpu "
                           "(or faiss-gpu-cu12)") from None
    return faiss


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


def build_index(out: Path, records: list[dict], dim: int, kind: str) -> dict:
    """Index every row of the shards (in shard order) into OUT/index.faiss; its entry for gallery.json."""
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

    def count(self) -> int:
        """Rows in the gallery (the `VectorStore` name for `rows`)."""
        return self.rows

