"""Peak memory (resident set) and wall time of every pipeline stage, each run as its own `hetero` process.

    python benchmarks/stage_memory.py                                   # quickstart family, Omniglot gallery
    python benchmarks/stage_memory.py --config examples/omniglot.yaml --gallery-images PATH

Each stage runs in a fresh Python process (`hetero.cli.main` with the stage's arguments), which reports its
own peak RSS, so one stage's allocations never hide another's.  The stages are those a user runs: train,
eval, export to each profile, verify, gallery build and gallery search.  Memory depends little on load;
wall time does, so each figure is the median of --repeats runs of the stage.  One record per config
(``benchmarks/results/stage_memory/<config>.json``): each stage's peak RSS and wall time.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import records  # noqa: E402

OMNIGLOT_ZIP = ROOT.parent / "shared" / "data" / "omniglot" / "images_background_small2.zip"
PROFILES = ["server-onnx-fp32", "rpi-onnx-int8", "android-litert-fp16", "android-litert-int8",
            "android-executorch-fp32", "iphone-coreml-fp16"]

# The child runs one CLI verb and prints its own peak RSS (KiB on Linux) as the last line.
CHILD = """
import resource, sys
from hetero.cli import main
code = main(sys.argv[1:])
print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(code)
"""


def run_stage(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one `hetero` invocation in a fresh process."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):  # 1: verification found a failing check, still a measured run
        raise SystemExit(f"`hetero {' '.join(argv)}` failed ({done.returncode}):\n{done.stderr[-2000:]}")
    peak = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("PEAK_RSS_KIB"))
    return int(peak.split()[1]) / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    parser.add_argument("--gallery-images", default=str(OMNIGLOT_ZIP), help="folder or .zip for the gallery stages")
    parser.add_argument("--profiles", nargs="+", default=PROFILES)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each stage (median wall time)")
    args = parser.parse_args()
    began = time.perf_counter()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        family = str(Path(tmp) / "family")
        stages = [("train", ["train", args.config, "--out", family, "--quiet", "--overwrite"]),
                  ("eval", ["eval", family])]
        stages += [(f"export {p}", ["export", family, "--profile", p]) for p in args.profiles]
        stages.append(("verify (every artifact)", ["verify", family]))
        if Path(args.gallery_images).exists():
            stages += [("gallery build", ["gallery", "build", family, "--images", args.gallery_images,
                                          "--overwrite", "--quiet"]),
                       ("gallery search", ["gallery", "search", family, "--images", args.gallery_images,
                                           "--show", "0"])]
        for name, argv in stages:
            runs = [run_stage(argv) for _ in range(args.repeats)]
            row = {"stage": name, "peak_rss_mib": max(r[0] for r in runs),
                   "seconds": statistics.median(r[1] for r in runs)}
            rows.append(row)
            print(f"  {name}: {row['peak_rss_mib']:.0f} MiB, {row['seconds']:.1f} s", file=sys.stderr, flush=True)

    print(f"\n{args.config}: peak RSS of each stage in its own process (max of {args.repeats}), "
          f"wall time (median of {args.repeats}, Python start-up and imports included)")
    print(f"{'stage':36} {'peak RSS MiB':>12} {'wall s':>8}")
    for row in rows:
        print(f"{row['stage']:36} {row['peak_rss_mib']:12.0f} {row['seconds']:8.1f}")
    figures = {row["stage"]: {"peak_rss_mib": row["peak_rss_mib"], "wall_s": row["seconds"]} for row in rows}
    path = records.write("stage_memory", records.key_of(Path(args.config).stem), figures,
                         wall_s=time.perf_counter() - began, recipe=records.relative(args.config),
                         repeats=args.repeats, profiles=args.profiles,
                         gallery_images=records.relative(args.gallery_images))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
