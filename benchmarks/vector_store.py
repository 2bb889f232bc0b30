"""FAISS files against the embedded vector databases (Milvus Lite, LanceDB), side by side: ingestion and queries.

    python benchmarks/vector_store.py                      # 100k and 1M synthetic unit vectors, d=128
    python benchmarks/vector_store.py --quick              # 10k and 100k (a few minutes on 2 cores)
    python benchmarks/vector_store.py --stores faiss milvus-server --milvus-uri http://127.0.0.1:19530
                                                           # a Milvus server (standalone) on loopback

Per size, both stores get the same synthetic gallery (clustered unit vectors, as benchmarks/gallery_search.py
makes them) and the same queries (other "photos" of gallery items):

- ingestion rows/s, end to end (written and indexed) and for the writes alone: FAISS builds its index as
  `hetero gallery build` does (exact up to 100k rows, IVF above, `hetero.gallery.make_index`; its writes are
  the `add`); Milvus Lite takes the rows through the same calls a build makes
  (`hetero.gallery.stores.MilvusStore.upsert`, `hetero.gallery.db.UPSERT_ROWS` at a time, then a flush that
  seals them and builds the index), with the index `hetero gallery build --store milvus` creates for that size;
- query latency, p50 and p95 over repeated calls, at batch 1 and batch 100, each store through its own
  search call (FAISS `index.search`; Milvus `MilvusStore.search`, which crosses the client/server API);
- recall@1 against exact search on the same vectors.
LanceDB takes the rows through `hetero.gallery.lance.LanceStore.upsert` (the same batches; a merge on the id),
then the flush its build makes (compaction, then the index it creates for that size), and answers through
`LanceStore.search` (one call per batch).  The latency ratio column is each store's p50 over FAISS's at the
same size and batch, measured in one run.  One record per machine and size
(``benchmarks/results/vector_store/<machine>-<rows>rows-d<dim>.json``), with these figures per store.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import records  # noqa: E402
from gallery_search import synthetic  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """(p50, p95) milliseconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), float(np.percentile(times, 95))


class Ingestion(NamedTuple):
    """A store's ingestion: end to end (rows written and indexed, as a build leaves them), and the writes alone
    (FAISS: adding the rows to its trained index; a database: the upserts, before the flush that indexes)."""

    rows: int
    seconds: float
    write_seconds: float


def faiss_store(gallery: np.ndarray):
    from hetero.gallery import choose_index, make_index

    started = time.perf_counter()
    kind = choose_index(len(gallery))
    index, params = make_index(kind, gallery.shape[1], len(gallery), lambda count: gallery[
        np.linspace(0, len(gallery) - 1, count).astype(int)])
    trained = time.perf_counter()
    index.add(gallery)
    seconds = time.perf_counter() - started

    def search(queries, k=1):
        return index.search(queries, k)[1]

    return search, Ingestion(len(gallery), seconds, seconds - (trained - started)), \
        f"faiss {kind}" + (f" nprobe {params['nprobe']}" if "nprobe" in params else "")


def database_store(backend: str, gallery: np.ndarray, work: Path, server: str | None = None):
    """A gallery in a database (`milvus`: Milvus Lite; `lance`: LanceDB; `milvus-server`: the Milvus server at
    `server`), written through the calls `hetero gallery build --store BACKEND` makes: upserts of UPSERT_ROWS
    rows, then the flush that indexes them."""
    from hetero.gallery.db import UPSERT_ROWS, open_store
    from hetero.gallery.stores import FLAT_MAX_ROWS, Identity

    if backend == "milvus-server":
        db = open_store(server, f"bench_{len(gallery)}", "milvus", create=True)
        if db.exists():  # a collection an earlier run left on the server
            db.drop()
    else:
        suffix = ".db" if backend == "milvus" else ".lance"  # Milvus Lite takes a file ending in .db
        db = open_store(str(work / f"bench-{len(gallery)}{suffix}"), "bench", backend, create=True)
    db.create(Identity("hs-bench", "bench", "cloud", gallery.shape[1]), rows_hint=len(gallery))
    ids = [f"item-{i:07d}" for i in range(len(gallery))]
    started = time.perf_counter()
    for begin in range(0, len(gallery), UPSERT_ROWS):
        db.upsert(ids[begin:begin + UPSERT_ROWS], gallery[begin:begin + UPSERT_ROWS])
    written = time.perf_counter()
    db.flush()  # seals the rows and builds the index, as `hetero gallery build` does, before the clock stops
    db.count()
    seconds = time.perf_counter() - started
    position = {name: i for i, name in enumerate(ids)}

    def search(queries, k=1):
        return np.array([[position[name] for name, _ in hits] for hits in db.search(queries, k)])

    kind = "flat" if len(gallery) <= FLAT_MAX_ROWS else "ivf nprobe 32"
    return search, Ingestion(len(gallery), seconds, written - started), \
        f"{ {'milvus': 'milvus-lite', 'lance': 'lancedb'}.get(backend, backend)} {kind}"


STORES = ("faiss", "milvus", "lance", "milvus-server")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--quick", action="store_true", help="10k and 100k: a smoke test, never a result")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=500, help="queries for recall@1")
    parser.add_argument("--repeats", type=int, default=20, help="timed batch-1 calls per latency figure (batch-100: "
                                                                 "a fifth, at least 3)")
    parser.add_argument("--stores", nargs="+", choices=STORES, default=list(STORES[:3]),
                        help="which stores (FAISS, the baseline of the ratio column, always runs); Milvus Lite "
                             "walks every row in Python per query: at 1M rows its 500 recall queries take minutes")
    parser.add_argument("--milvus-uri", help="the Milvus server `milvus-server` measures (http://HOST:PORT), "
                                             "e.g. a standalone one on loopback")
    args = parser.parse_args(argv)
    if "milvus-server" in args.stores and not args.milvus_uri:
        parser.error("--stores milvus-server needs --milvus-uri http://HOST:PORT (the server to measure)")
    sizes = [10_000, 100_000] if args.quick else args.sizes

    import faiss

    print("| rows | store | ingest rows/s (writes alone) | batch-1 p50 / p95 ms | batch-100 p50 / p95 ms | recall@1 | "
          "p50 vs faiss (b1, b100) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            started = time.perf_counter()
            gallery, queries, _ = synthetic(rows, args.queries, args.dim, "clustered")
            exact = faiss.IndexFlatIP(args.dim)
            exact.add(gallery)
            truth = exact.search(queries, 1)[1][:, 0]
            results = []
            for store in ["faiss"] + [s for s in args.stores if s != "faiss"]:
                search, ingestion, label = (faiss_store(gallery) if store == "faiss"
                                            else database_store(store, gallery, Path(tmp), args.milvus_uri))
                recall = float((search(queries)[:, 0] == truth).mean())
                one = timed(lambda: search(queries[:1]), args.repeats)
                hundred = timed(lambda: search(queries[:100]), max(3, args.repeats // 5))
                results.append((label, ingestion, one, hundred, recall))
            base, figures = results[0], {}
            for label, ingestion, one, hundred, recall in results:
                rate, writes = ingestion.rows / ingestion.seconds, ingestion.rows / ingestion.write_seconds
                print(f"| {rows:,} | {label} | {rate:,.0f} ({writes:,.0f}) | {one[0]:.2f} / {one[1]:.2f} | "
                      f"{hundred[0]:.2f} / {hundred[1]:.2f} | {recall:.3f} | {one[0] / base[2][0]:.1f}x, "
                      f"{hundred[0] / base[3][0]:.1f}x |", flush=True)
                figures[label] = {"ingest_rows_per_s": rate, "write_rows_per_s": writes,
                                  "index_s": ingestion.seconds - ingestion.write_seconds,
                                  "batch1_p50_ms": one[0], "batch1_p95_ms": one[1],
                                  "batch100_p50_ms": hundred[0], "batch100_p95_ms": hundred[1], "recall_at_1": recall,
                                  "batch1_p50_vs_faiss": one[0] / base[2][0],
                                  "batch100_p50_vs_faiss": hundred[0] / base[3][0]}
            key = records.key_of(records.machine_tag(records.machine()), f"{rows}rows", f"d{args.dim}",
                                 quick=args.quick)
            records.write("vector_store", key, figures, wall_s=time.perf_counter() - started, quick=args.quick,
                          rows=rows, dim=args.dim, queries=args.queries, repeats=args.repeats,
                          stores=[label for label, *_ in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
