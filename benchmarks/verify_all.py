"""Benchmark: full `hetero verify` of every artifact of a family, and the per-profile figures.

    python benchmarks/verify_all.py runs/quickstart [--export-all] [--latency-runs 30]

Prints the wall time of the whole verification (torch reference embeddings + every artifact in every
available runtime; target: under 2 minutes for all profiles on the reference 2-core CPU) and a Markdown
table per artifact: min/mean cosine to torch, top-1 via the runtime and via torch against the cloud
gallery, top-1 agreement, batch-1 latency and file size.  --export-all first exports every edge member for
every built-in profile whose budgets it fits (export failures are listed, not fatal).

Records (``benchmarks/results/verify_all/``): ``<family>-total`` with the times and check counts, and one per
artifact run (``<family>-<profile>-<member>-<runtime>``) with its row of the table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import records  # noqa: E402

ROW_FIGURES = ("precision", "min_cosine", "mean_cosine", "top1", "torch_top1", "agreement", "latency_ms", "size_mb",
               "status", "skipped")


def export_all(store) -> list[str]:
    from hetero.exporter import export_member
    from hetero.profiles import all_profiles

    problems = []
    with store.lock("export"):
        for profile in all_profiles():
            for edge in store.edges:
                try:
                    export_member(store, edge.name, profile)
                except Exception as err:  # a profile whose format is not available, a member over budget
                    problems.append(f"{edge.name}@{profile.name}: {str(err).splitlines()[0][:160]}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="family directory with exported artifacts")
    parser.add_argument("--export-all", action="store_true", help="export every edge member for every profile first")
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--images", type=int, help="held-out queries (default: the config's export.verify_images)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    import torch  # noqa: F401  (import time is part of what a user waits for, but reported apart)

    from hetero.family import FamilyStore
    from hetero.verify.reference import ReferenceCache, reference_from_store
    from hetero.verify.report import summary_rows
    from hetero.verify import run_checks

    imported = time.perf_counter() - started
    run_dir = Path(args.dir)
    store = FamilyStore.open(run_dir)
    problems = export_all(store) if args.export_all else []
    t0 = time.perf_counter()
    reference = reference_from_store(store.reload(), store.artifacts(), args.images, cache=ReferenceCache())
    t1 = time.perf_counter()
    report = run_checks(reference, latency_runs=args.latency_runs)
    t2 = time.perf_counter()
    rows = summary_rows(report)
    profiles = sorted({r["profile"] for r in rows})
    print(f"family {report['family']} ({run_dir}): {len(rows)} artifact run(s) over {len(profiles)} profile(s), "
          f"{report['queries']} held-out queries vs {report['gallery']} gallery images, host {report['host']}")
    print(f"verify time: {t2 - t0:.1f} s total = {t1 - t0:.1f} s reference (data + torch members, once) + "
          f"{t2 - t1:.1f} s checks ({args.latency_runs} latency runs each); imports {imported:.1f} s")
    print(f"checks: {report['counts']}; passed: {report['passed']}")
    print()
    print("| profile | member | runtime | precision | min cos | mean cos | top-1 | torch top-1 | agreement | "
          "latency ms | size MB | status |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")

    def f(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        status = r["status"] + (f" ({', '.join(r['skipped'])} skipped)" if r["skipped"] else "")
        print(f"| {r['profile']} | {r['member']} | {r['runtime']} | {r['precision']} | {f(r['min_cosine'], '.6f')} | "
              f"{f(r['mean_cosine'], '.6f')} | {f(r['top1'], '.3f')} | {f(r['torch_top1'], '.3f')} | "
              f"{f(r['agreement'], '.1%')} | {f(r['latency_ms'], '.2f')} | {f(r['size_mb'], '.2f')} | {status} |")
    for a in report["artifacts"]:
        for c in a["checks"]:
            if c["status"] == "fail":
                print(f"FAIL {a['member']}@{a['profile']} ({a['runtime']}) {c['name']}: {c['detail']}")
    for line in problems + report["notes"]:
        print(f"note: {line}")
    common = {"wall_s": t2 - t0, "family": records.relative(run_dir), "latency_runs": args.latency_runs,
              "host": report["host"]}
    records.write("verify_all", records.key_of(report["family"], "total"), {
        "verify_s": t2 - t0, "reference_s": t1 - t0, "checks_s": t2 - t1, "import_s": imported,
        "artifact_runs": len(rows), "profiles": len(profiles), "queries": report["queries"],
        "counts": report["counts"], "passed": report["passed"], "export_problems": problems}, **common)
    for r in rows:
        records.write("verify_all", records.key_of(report["family"], r["profile"], r["member"], r["runtime"]),
                      {k: r[k] for k in ROW_FIGURES}, **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
