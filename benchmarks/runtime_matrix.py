"""The runtime matrix: every profile x every runtime version it declares, on a trained family.

    python benchmarks/runtime_matrix.py runs/omniglot            # a trained (and evaluated) family
    python benchmarks/runtime_matrix.py --quick                  # trains the quickstart family first (~1 min)

1. Environments: the isolated runtimes the built-in profiles declare (tflite-runtime 2.14.0, onnxruntime
   1.17.3) are created if missing; the one-time creation time is each environment's own record.
2. The failure the matrix exists for: an artifact exported as dynamic-range int8 for today's LiteRT only,
   then verified against the field (ai-edge-litert and tflite-runtime 2.14.0).
3. Export for every built-in profile (the member export picks), each scheme chosen to hold on every runtime
   the profile declares, and verify: one row per profile x runtime version, timed as a whole.

Prints Markdown tables: the environments, the caught failure, and the matrix (min cosine to torch, top-1
via the artifact against the cloud gallery, status), then the harness's wall time.  Records
(``benchmarks/results/runtime_matrix/``): one per matrix row (``<family>-matrix-<profile>-<member>-<runtime>``)
and per caught-failure row (``<family>-caught-<member>-<runtime>``), and ``<family>-harness`` with the
environments' creation seconds, the matrix's wall time and the exports skipped.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import records  # noqa: E402

QUICKSTART = "examples/quickstart.yaml"


def ensure_environments() -> list[dict]:
    from hetero import runtimes
    from hetero.profiles import all_profiles

    wanted = sorted({r for p in all_profiles() for r in p.runtimes if runtimes.needs_environment(r)})
    rows = []
    for requirement in wanted:
        env = runtimes.ensure(requirement)
        rows.append({"environment": env.label, "python": env.python, "created_seconds": env.seconds,
                     "path": str(env.path)})
    return rows


def caught_failure(store, member: str, work: Path) -> list[dict]:
    """Dynamic-range int8 exported for today's LiteRT only, then held to the field's runtimes."""
    import yaml

    from hetero.exporter import export_member
    from hetero.profiles import builtin_profile_files, load_profile
    from hetero.verify import verify

    data = yaml.safe_load(builtin_profile_files()["android-litert-int8"].read_text())
    data.update(name="litert-int8-dynamic", precision="int8-dynamic")
    field = work / "litert-int8-dynamic.yaml"
    field.write_text(yaml.safe_dump(data))
    today = work / "today.yaml"
    today.write_text(yaml.safe_dump({**data, "runtimes": ["ai-edge-litert>=2.3"]}))
    with store.lock("export"):
        export_member(store, member, load_profile(str(today)))
    report, _ = verify(store, profile=str(field), latency_runs=5, write=False)
    return _rows(report, store)


def _rows(report: dict, store) -> list[dict]:
    """One row per verification run, with the scheme export chose and why."""
    from hetero.verify.report import summary_rows

    artifacts = {(a.member, a.profile): a for a in store.reload().artifacts()}
    rows = []
    for row, run in zip(summary_rows(report), report["artifacts"]):
        failed = [c["name"] for c in run["checks"] if c["status"] == "fail"]
        artifact = artifacts.get((row["member"], row["profile"]))
        quantization = artifact.quantization if artifact else {}
        rows.append({"profile": row["profile"], "member": row["member"], "runtime": row["runtime"],
                     "scheme": quantization.get("scheme", "-"), "fallback_reason": quantization.get("fallback_reason"),
                     "min_cosine": row["min_cosine"], "top1": row["top1"], "torch_top1": row["torch_top1"],
                     "status": row["status"] + (f" ({', '.join(failed)})" if failed else ""),
                     "skipped": row["skipped"]})
    return rows


def matrix(store) -> tuple[list[dict], float, list[str]]:
    from hetero.exporter import export_member
    from hetero.profiles import all_profiles
    from hetero.verify import verify

    problems = []
    with store.lock("export"):
        for profile in all_profiles():
            try:
                export_member(store, None, profile)
            except Exception as err:  # a member over budget, a converter missing: listed, not fatal
                problems.append(f"{profile.name}: {' '.join(str(err).split())[:300]}")
    store.reload()
    started = time.perf_counter()
    report, _ = verify(store, latency_runs=10)
    seconds = time.perf_counter() - started
    return _rows(report, store), seconds, problems


def table(rows: list[dict]) -> str:
    def num(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| profile | member | scheme | runtime | min cos | top-1 via file | torch top-1 | status |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        status = r["status"] if not r["skipped"] else f"{r['status']} ({', '.join(r['skipped'])} skipped)"
        lines.append(f"| {r['profile']} | {r['member']} | {r['scheme']} | {r['runtime']} | "
                     f"{num(r['min_cosine'], '.6f')} | {num(r['top1'], '.3f')} | {num(r['torch_top1'], '.3f')} | "
                     f"{status} |")
    return "\n".join(lines)


def fresh_copy(source: Path, target: Path):
    """The family without its exports: the benchmark's own exports never touch the original."""
    from hetero.family import FamilyStore

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("exports", "gallery", ".hetero.lock*"))
    store = FamilyStore.open(target)
    store.manifest.artifacts = []
    store.save()
    return store


def quick_family(work: Path) -> Path:
    from hetero.config import load_config
    from hetero.evaluate import evaluate
    from hetero.training import train

    out = work / "quickstart"
    evaluate(train(load_config(ROOT / QUICKSTART), out, progress=False))
    return out


def write_records(family: str, args, environments: list[dict], caught: list[dict], rows: list[dict],
                  seconds: float, problems: list[str], wall_s: float) -> None:
    """A record per row of both tables, and one for the harness (all from the same run: its wall time)."""
    figures = ("scheme", "fallback_reason", "min_cosine", "top1", "torch_top1", "status", "skipped")
    common = {"wall_s": wall_s, "quick": args.quick, "recipe": QUICKSTART if args.quick else None,
              "family": None if args.quick else records.relative(args.dir)}
    for table_name, found in (("matrix", rows), ("caught", caught)):
        for r in found:
            parts = (family, table_name, r["profile"] if table_name == "matrix" else None, r["member"], r["runtime"])
            records.write("runtime_matrix", records.key_of(*parts, quick=args.quick), {k: r[k] for k in figures},
                          profile=r["profile"], member=r["member"], runtime=r["runtime"], **common)
    records.write("runtime_matrix", records.key_of(family, "harness", quick=args.quick),
                  {"matrix_verify_s": seconds, "matrix_runs": len(rows), "exports_skipped": problems,
                   "environment_created_s": {env["environment"]: env["created_seconds"] for env in environments}},
                  **common)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", type=Path, help="trained, evaluated family directory (left unchanged: "
                                                          "the benchmark works on a copy)")
    parser.add_argument("--quick", action="store_true", help="train the quickstart family instead (a smoke "
                                                             "test, never a result)")
    parser.add_argument("--member", default=None, help="member for the caught-failure rows (default: the "
                                                       "first edge)")
    args = parser.parse_args(argv)
    if not args.dir and not args.quick:
        parser.error("give a family DIR or --quick")
    began = time.perf_counter()

    environments = ensure_environments()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = quick_family(work) if args.quick else args.dir
        store, other = (fresh_copy(source, work / name) for name in ("caught", "matrix"))
        member = args.member or store.edges[0].name
        caught = caught_failure(store, member, work)
        rows, seconds, problems = matrix(other)
        family = store.name

    print("\nIsolated runtime environments (created once; seconds from each environment's record)\n")
    print("| environment | Python | creation s |\n| --- | --- | ---: |")
    for env in environments:
        print(f"| {env['environment']} | {env['python']} | {env['created_seconds']:.0f} |")
    print(f"\nDynamic-range int8 exported for today's LiteRT only ({member}), held to the field's runtimes\n")
    print(table(caught))
    print(f"\nEvery built-in profile x every runtime version it declares ({source})\n")
    print(table(rows))
    reasons = {(r["profile"], r["member"]): (r["scheme"], r["fallback_reason"]) for r in rows if r["fallback_reason"]}
    for (profile, member), (scheme, reason) in reasons.items():
        print(f"\n- {profile} / {member}: {scheme} because {reason}")
    for problem in problems:
        print(f"\nexport skipped: {problem}")
    print(f"\nharness wall time for the matrix: {seconds:.1f} s ({len(rows)} runs, 10 latency runs each)")
    write_records(family, args, environments, caught, rows, seconds, problems, time.perf_counter() - began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
