"""Export every edge member of a trained family to every device profile and measure the exported files.

    python benchmarks/export_profiles.py FAMILY_DIR [--profile NAME ...] [--member NAME ...] [--images 256]

Per (profile, member): file size, conversion time, the quantisation scheme used, min/mean cosine to the
torch member on real held-out images, and M[edge via the exported file][cloud] top-1 against the torch
member's figure -- measured through each format's runtime by hetero.verify (CoreML numerics are skipped
off macOS).  Targets: fp32 cosine >= 0.9999, fp16 >= 0.999, int8 top-1 within 1 point of the fp32 member.
The artifacts are registered in FAMILY_DIR's manifest, as `hetero export` would.  One record per profile
and member (``benchmarks/results/export_profiles/<family>-<profile>-<member>.json``) with the row's figures
(or the converter's error).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import records  # noqa: E402

FIGURES = ("runtime", "precision", "scheme", "mb", "convert_s", "min_cosine", "mean_cosine", "top1", "torch_top1",
           "drop", "target")


def target(precision: str, row: dict) -> str:
    """Whether the artifact meets the issue's target for its precision ('-' when not measured here)."""
    if row["min_cosine"] is None:
        return "-"
    if precision.startswith("int8"):
        return "ok" if row["torch_top1"] - row["top1"] <= 0.01 else "MISS"
    floor = 0.9999 if precision == "fp32" else 0.999
    return "ok" if row["min_cosine"] >= floor else "MISS"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="trained (and evaluated) family directory")
    parser.add_argument("--profile", action="append", help="profile name or .yaml (default: every built-in)")
    parser.add_argument("--member", action="append", help="edge member (default: every edge member)")
    parser.add_argument("--images", type=int, default=256, help="held-out query images (default 256)")
    parser.add_argument("--latency-runs", type=int, default=20)
    args = parser.parse_args(argv)

    from hetero.exporter import export_member
    from hetero.family import FamilyStore
    from hetero.profiles import all_profiles, load_profile
    from hetero.verify.reference import reference_from_store
    from hetero.verify.report import summary_rows
    from hetero.verify import run_checks

    profiles = [load_profile(p) for p in args.profile] if args.profile else all_profiles()
    store = FamilyStore.open(args.dir)
    members = args.member or [m.name for m in store.edges]
    exported, failures = {}, []
    with store.lock("export"):
        for profile in profiles:
            for member in members:
                started = time.perf_counter()
                try:
                    artifact = export_member(store, member, profile, allow_over_budget=True)
                except Exception as err:  # report and go on: one failing converter must not hide the others
                    failures.append(f"{member}@{profile.name}: {err}")
                    records.write("export_profiles", records.key_of(store.name, profile.name, member),
                                  {"exported": False, "error": " ".join(str(err).split())[:300]},
                                  wall_s=time.perf_counter() - started, family=records.relative(args.dir))
                    continue
                wall = time.perf_counter() - started
                exported[(profile.name, member)] = {**artifact.model_dump(), "wall_seconds": wall}
                print(f"exported {member}@{profile.name} in {wall:.1f} s", file=sys.stderr)

    artifacts = [a for a in store.reload().artifacts() if (a.profile, a.member) in exported]
    report = run_checks(reference_from_store(store, artifacts, args.images), args.latency_runs, all_runtimes=False)
    by_profile = {p.name: p for p in profiles}
    rows = []
    for row in summary_rows(report):
        artifact = exported[(row["profile"], row["member"])]
        quantization = artifact.get("quantization", {})
        rows.append({**row, "precision": by_profile[row["profile"]].precision,
                     "scheme": quantization.get("scheme", "-"), "mb": artifact["bytes"] / 2**20,
                     "convert_s": artifact["export_seconds"],
                     "drop": None if row["top1"] is None else row["torch_top1"] - row["top1"],
                     "target": target(by_profile[row["profile"]].precision, row)})

    def num(value, fmt):
        return "-" if value is None else fmt.format(value)

    print(f"\n{args.dir}: {report['queries']} held-out queries vs {report['gallery']} cloud-gallery images; "
          f"host {report['host']}\n")
    header = ("profile", "member", "runtime", "precision", "scheme", "MB", "convert s", "min cos", "mean cos",
              "top-1 via file", "torch top-1", "drop", "target")
    lines = [header]
    for r in rows:
        lines.append((r["profile"], r["member"], r["runtime"], r["precision"], r["scheme"], num(r["mb"], "{:.3f}"),
                      num(r["convert_s"], "{:.1f}"), num(r["min_cosine"], "{:.6f}"), num(r["mean_cosine"], "{:.6f}"),
                      num(r["top1"], "{:.4f}"), num(r["torch_top1"], "{:.4f}"), num(r["drop"], "{:+.4f}"), r["target"]))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
        if i == 0:
            print("| " + " | ".join("-" * w for w in widths) + " |")
    skipped = sorted({f"{r['profile']} ({r['runtime']})" for r in rows if r["min_cosine"] is None})
    if skipped:
        print(f"\nnumeric checks skipped on this host (runtime unavailable): {', '.join(skipped)}")
    for failure in failures:
        print(f"\nexport FAILED: {failure}")
    for r in rows:
        records.write("export_profiles", records.key_of(store.name, r["profile"], r["member"]),
                      {"exported": True, **{k: r[k] for k in FIGURES}},
                      wall_s=exported[(r["profile"], r["member"])]["wall_seconds"], family=records.relative(args.dir),
                      images=args.images, host=report["host"])
    return 1 if failures or any(r["target"] == "MISS" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
