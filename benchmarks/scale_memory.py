"""Peak memory as the data grows: a gallery's ingestion into an embedded database, an edge epoch's reading of
the teacher cache, and `hetero gallery import`, each at 1M and 10M rows, each in a process of its own.

    python benchmarks/scale_memory.py                          # 1M and 10M rows, d=128 (~45 GB of disk at 10M)
    python benchmarks/scale_memory.py --rows 100000 1000000    # smaller sizes

Each stage runs in a fresh Python process that reports its own peak resident set (VmHWM: anonymous memory and
the pages of mapped files alike), so one stage's allocations never hide another's.  The goal (issue 30):
each stage's peak flat within 20% from 1M to 10M rows.

- ``ingest``: synthetic unit vectors, made a chunk at a time, upserted into a LanceDB table
  (`LanceStore.upsert`, `hetero.gallery.db.UPSERT_ROWS` rows per call, as `gallery build --store lance` and
  `gallery import --store lance` write), then the flush that compacts and indexes the table;
- ``teacher-cache``: a teacher cache of N (image, view) rows in the cache's own shard format (4 views, so
  N / 4 images), of which an edge epoch reads one view per image through `TeacherCache.row`, in order;
- ``import-lance``: `hetero gallery import --store lance` of an .npy of N rows with an --ids file: the sample
  that proves the space is 64 images embedded by a small family (the quickstart recipe, one epoch), placed
  among synthetic rows;
- ``import-faiss``: the same file into a FAISS gallery (`--out`); its IVF-Flat index holds every vector in
  memory by design (rows x dim x 4 bytes), which the record gives beside its peak.

One record per machine and size (``benchmarks/results/scale_memory/<machine>-<rows>rows-d<dim>.json``).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import records  # noqa: E402

STAGES = ("ingest", "teacher-cache", "import-lance", "import-faiss")
CHUNK = 65_536
VIEWS = 4
PROOF_IMAGES = 64


def unit_chunks(rows: int, dim: int, seed: int = 0):
    """(first row, unit vectors) of a synthetic gallery, CHUNK rows at a time (never all in memory)."""
    rng = np.random.default_rng(seed)
    for begin in range(0, rows, CHUNK):
        chunk = rng.standard_normal((min(CHUNK, rows - begin), dim), dtype=np.float32)
        yield begin, chunk / np.linalg.norm(chunk, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------- the stages (child)


def stage_ingest(rows: int, dim: int, work: Path) -> dict:
    from hetero.gallery.db import UPSERT_ROWS, open_store
    from hetero.gallery.stores import Identity

    db = open_store(str(work / "ingest.lance"), "bench", "lance", create=True)
    db.create(Identity("hs-bench", "bench", "cloud", dim), rows_hint=rows)
    started = time.perf_counter()
    for begin, chunk in unit_chunks(rows, dim):
        for at in range(0, len(chunk), UPSERT_ROWS):
            first = begin + at
            db.upsert([f"item-{i:09d}" for i in range(first, first + len(chunk[at:at + UPSERT_ROWS]))],
                      chunk[at:at + UPSERT_ROWS])
    written = time.perf_counter()
    db.flush()
    assert db.count() == rows
    done = time.perf_counter()
    return {"rows_per_s": rows / (done - started), "write_rows_per_s": rows / (written - started),
            "index_s": done - written}


def stage_teacher_cache(rows: int, dim: int, work: Path) -> dict:
    from hetero.training.teacher_cache import TeacherCache

    cache = TeacherCache(work / "cache", json.loads((work / "cache" / "cache.json").read_text()))
    started, images = time.perf_counter(), rows // VIEWS
    for image in range(images):
        params, view, matching = cache.row(image, image % VIEWS)
    assert view.shape == (dim,)
    return {"rows_per_s": images / (time.perf_counter() - started)}


def stage_import(rows: int, dim: int, work: Path, store: str) -> dict:
    from hetero.cli import main

    argv = ["gallery", "import", str(work / "family"), "--vectors", str(work / "vectors.npy"), "--ids",
            str(work / "ids.txt"), "--images", str(work / "proof"), "--sample", str(PROOF_IMAGES)]
    argv += ["--store", "lance", "--uri", str(work / "import.lance")] if store == "lance" else \
        ["--out", str(work / "import-faiss")]
    started = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"hetero {' '.join(argv)} failed")
    figures = {"rows_per_s": rows / (time.perf_counter() - started)}
    if store == "faiss":
        figures["index_mib"] = (work / "import-faiss" / "index.faiss").stat().st_size / 2 ** 20
    return figures


def run_child(stage: str, rows: int, dim: int, work: Path) -> None:
    figures = {"ingest": lambda: stage_ingest(rows, dim, work),
               "teacher-cache": lambda: stage_teacher_cache(rows, dim, work),
               "import-lance": lambda: stage_import(rows, dim, work, "lance"),
               "import-faiss": lambda: stage_import(rows, dim, work, "faiss")}[stage]()
    figures["peak_rss_mib"] = peak_rss_kib() / 1024
    print("FIGURES", json.dumps(figures), flush=True)


def peak_rss_kib() -> int:
    """This process's peak resident set: VmHWM, kept per address space, so it starts afresh at exec (ru_maxrss
    carries the parent's peak over fork and exec on Linux, and this parent trains a family)."""
    status = Path("/proc/self/status")
    if status.is_file():
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)


# ------------------------------------------------------------------------------------ what the stages read


def write_teacher_cache(rows: int, dim: int, root: Path) -> None:
    """A cache of rows / VIEWS images in the shard format TeacherCache reads (random answers: reading them is
    what is measured), one shard in memory at a time."""
    from safetensors.numpy import save_file

    from hetero.training.teacher_cache import FORMAT, PARAMS, SHARD_IMAGES

    images = rows // VIEWS
    plan = {"format": FORMAT, "cloud": "synthetic", "images": images, "views": VIEWS, "shard_images": SHARD_IMAGES}
    (root / "shards").mkdir(parents=True)
    (root / "cache.json").write_text(json.dumps(plan))
    rng = np.random.default_rng(0)
    for shard, first in enumerate(range(0, images, SHARD_IMAGES)):
        n = min(SHARD_IMAGES, images - first)
        save_file({"params": rng.random((n, VIEWS, PARAMS), dtype=np.float32),
                   "view": rng.standard_normal((n, VIEWS, dim), dtype=np.float32),
                   "matching": rng.standard_normal((n, VIEWS, dim), dtype=np.float32)},
                  str(root / "shards" / f"shard-{shard:05d}.safetensors"))


def write_import_source(rows: int, work: Path) -> int:
    """A small family (the quickstart recipe, one epoch), PROOF_IMAGES images of its data embedded by its cloud,
    and an .npy of `rows` vectors with those images' vectors among synthetic ones (ids in ids.txt); the dim."""
    from numpy.lib.format import open_memmap
    from PIL import Image

    from hetero import gallery as G
    from hetero.cli import main
    from hetero.family import FamilyStore

    family, proof = work / "family", work / "proof"
    if not (family / "manifest.json").is_file():
        argv = ["train", str(ROOT / "examples" / "quickstart.yaml"), "--out", str(family), "--quiet",
                "--set", "train.epochs=1"]
        if main(argv) != 0:
            raise SystemExit("training the quickstart family failed")
    proof.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(PROOF_IMAGES):  # blobs of ink: any images will do, the proof compares embeddings
        pixels = (rng.random((48, 48)) > 0.7).astype(np.uint8) * 255
        Image.fromarray(pixels).convert("RGB").save(proof / f"proof-{i:03d}.png")
    G.build_gallery(FamilyStore.open(family), proof, work / "proof-gallery", progress=False)
    built = G.Gallery(work / "proof-gallery")
    names, embedded = built.names(), built.embeddings()
    dim = embedded.shape[1]
    at = dict(zip(np.linspace(0, rows - 1, len(names)).round().astype(int).tolist(), range(len(names))))
    vectors = open_memmap(work / "vectors.npy", mode="w+", dtype=np.float32, shape=(rows, dim))
    with open(work / "ids.txt", "w") as ids:
        for begin, chunk in unit_chunks(rows, dim, seed=2):
            for row in range(begin, begin + len(chunk)):
                if row in at:
                    chunk[row - begin] = embedded[at[row]]
            vectors[begin:begin + len(chunk)] = chunk
            ids.write("".join(names[at[row]] + "\n" if row in at else f"synthetic/{row:09d}\n"
                              for row in range(begin, begin + len(chunk))))
    vectors.flush()
    del vectors
    return dim


# ------------------------------------------------------------------------------------------------ parent


def measure(stage: str, rows: int, dim: int, work: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", stage, "--rows", str(rows), "--dim", str(dim),
                           "--work", str(work)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"stage {stage} at {rows:,} rows failed ({done.returncode}):\n{done.stderr[-3000:]}")
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("FIGURES"))
    return {**json.loads(line.split(" ", 1)[1]), "wall_s": time.perf_counter() - started}


def without_work(argv: list[str]) -> list[str]:
    """The command as a record gives it: --work only says which disk held the data (a path of one machine)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--work="):
            skip = False
        elif arg == "--work":
            skip = True
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=128, help="ingest and teacher cache (an import: the family's)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--work", help="folder for the data (default: a temporary one; ~45 GB at 10M rows)")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child, args.rows[0], args.dim, Path(args.work))
        return 0

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work_root = Path(tmp)
        for rows in args.rows:
            started, figures = time.perf_counter(), {}
            work = work_root / f"rows-{rows}"
            work.mkdir()
            if (work_root / "family").is_dir():  # one small family serves every size
                shutil.copytree(work_root / "family", work / "family")
            for stage in args.stages:
                dim = args.dim
                if stage == "teacher-cache":
                    write_teacher_cache(rows, dim, work / "cache")
                elif stage.startswith("import") and not (work / "vectors.npy").is_file():
                    write_import_source(rows, work)
                    if not (work_root / "family").is_dir():
                        shutil.copytree(work / "family", work_root / "family")
                figures[stage] = measure(stage, rows, dim, work)
                print(f"{rows:>11,} rows  {stage:14s} peak RSS {figures[stage]['peak_rss_mib']:7.0f} MiB  "
                      f"{figures[stage]['rows_per_s']:>10,.0f} rows/s", flush=True)
                for leftover in ("cache", "ingest.lance", "import.lance", "import-faiss"):
                    shutil.rmtree(work / leftover, ignore_errors=True)  # the disk of 10M rows, several times over
            shutil.rmtree(work, ignore_errors=True)
            key = records.key_of(records.machine_tag(records.machine()), f"{rows}rows", f"d{args.dim}")
            records.write("scale_memory", key, figures, wall_s=time.perf_counter() - started, rows=rows,
                          dim=args.dim, stages=args.stages, argv=without_work(sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
