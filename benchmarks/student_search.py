"""Compatibility-aware student search on Omniglot against the hand-picked students (issue 16).

For each design (shared-cloud, frozen-cloud) and seed, `hetero search` trains one supernet whose largest
sub-network is the reference family's cloud architecture (starting from that cloud's weights), then finds the
best sub-network on the rpi-onnx-int8 profile (candidates exported and timed by onnxruntime here) for four
budgets: 1/10 and 1/25 of the cloud's FLOPs, and the FLOPs of the hand-picked edge-m and edge-s.
`hetero eval` then measures every family on the test alphabets (same split and metric as the README).

    python benchmarks/student_search.py --reference runs/omniglot            # 3 seeds, both designs
    python benchmarks/student_search.py --reference runs/omniglot --quick    # 1 seed, 2 supernet epochs

The reference family is one trained with `hetero train examples/omniglot.yaml --out DIR` (about 1 h on 2
cores); it gives the cloud (frozen, or the supernet's start) and the hand-picked students compared against.
Prints Markdown tables and writes OUT/results.json (`--tables` prints them again).  Wall time on 2 cores:
about 12 min per design and seed at 6 epochs (search, eval, export, verify), plus the fine-tuning asked for
(about 4 min per 5 epochs); --quick (2 epochs, both designs) about 20 min.

Records (``benchmarks/results/student_search/``): one per run (``<design>-<schedule>-seed<s>-e<epochs>[-ft<n>]``)
with each target's chosen student and its figures, ``reference-<dir>`` with the hand-picked family's, and
``separate-epoch`` with the unit cost of training one candidate alone.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HETERO = [sys.executable, "-m", "hetero"]
PROFILE = "rpi-onnx-int8"
sys.path.insert(0, str(ROOT / "benchmarks"))
import records  # noqa: E402


def search_config(reference: Path, design: str, seed: int, epochs: int, hand_picked: dict, schedule: str) -> dict:
    """The reference family's config with the cloud alone, this seed, and a `search` section."""
    config = yaml.safe_load((reference / "config.yaml").read_text())
    cloud = next(m for m in config["family"]["members"] if m["role"] == "cloud")
    config["family"]["members"] = [{k: cloud[k] for k in ("name", "role", "arch", "width", "depth", "input_size")}]
    train = config["train"]
    for unused in ("edge_epochs", "teacher_cache", "previous", "init"):
        train.pop(unused, None)
    train.update(seed=seed, mode="sequential")
    targets = [{"name": "edge-10x", "profile": PROFILE, "max_flops_vs_cloud": 0.1},
               {"name": "edge-25x", "profile": PROFILE, "max_flops_vs_cloud": 0.04}]
    targets += [{"name": f"at-{name}", "profile": PROFILE, "max_flops_vs_cloud": figures["flops_vs_cloud"]}
                for name, figures in hand_picked.items()]
    config["search"] = {"design": design, "schedule": schedule, "cloud": str(reference.resolve()), "epochs": epochs,
                        "widths": [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0], "depths": [0.5, 1.0],
                        "input_sizes": [32, 40, 48, 56, 64], "targets": targets}
    return config


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_search(out: Path, config: dict, log) -> dict:
    """`hetero search` then `hetero eval` into `out` (resumed when it holds an unfinished run)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    report = out / "report.json"
    timing = out.parent / f"{out.name}.timing.json"
    if not report.is_file():
        again = ["--resume"] if (out / "checkpoints" / "train_state.safetensors").is_file() else ["--overwrite"]
        cpu, wall = children_cpu_seconds(), time.perf_counter()
        subprocess.run([*HETERO, "search", str(path), "--out", str(out), "--quiet", *again], check=True,
                       stdout=log, stderr=log)
        timing.write_text(json.dumps({"cpu_s": children_cpu_seconds() - cpu, "wall_s": time.perf_counter() - wall}))
        subprocess.run([*HETERO, "eval", str(out)], check=True, stdout=log, stderr=log)
    if not (out / "verify.json").is_file():
        # The chosen students go through export and verify like any member; verify times them again.
        members = [m["name"] for m in json.loads((out / "manifest.json").read_text())["members"] if m["role"] == "edge"]
        for member in members:
            subprocess.run([*HETERO, "export", str(out), "--profile", PROFILE, "--member", member], check=True,
                           stdout=log, stderr=log)
        subprocess.run([*HETERO, "verify", str(out), "--profile", PROFILE], check=False, stdout=log, stderr=log)
    manifest = json.loads((out / "manifest.json").read_text())
    verified = json.loads((out / "verify.json").read_text()) if (out / "verify.json").is_file() else {"artifacts": []}
    return {"dir": out, "report": json.loads(report.read_text()), "manifest": manifest, "verify": verified,
            "timing": json.loads(timing.read_text()) if timing.is_file() else None}


def hand_picked_latency(reference: Path) -> dict:
    """The reference family's edge members exported for the profile and timed the way candidates are."""
    from hetero.data import load_split
    from hetero.family import FamilyStore
    from hetero.profiles import load_profile
    from hetero.search import time_export

    store = FamilyStore.open(reference)
    config = store.config()
    calibration = load_split(config.data, config.load_size).train.spread(256)
    profile = load_profile(PROFILE)
    return {m.name: time_export(store.load_member(m.name), profile, calibration, 50)["median_ms"]
            for m in store.edges}


def separate_epoch_seconds(config_path: Path) -> dict:
    """Wall and CPU seconds of one epoch training a single candidate (the space's median-FLOPs one) against
    the frozen cloud with the same loop: the unit cost of training each candidate separately."""
    import tempfile

    import torch

    from hetero.config import load_config
    from hetero.data import load_split, split_open_set
    from hetero.search import Teacher, given_cloud, search_space, static_records, train_supernet

    config = load_config(config_path)
    space = search_space(config.search)
    records = static_records(space, config)
    median = sorted(space, key=lambda c: records[c]["flops"])[len(space) // 2]
    split = load_split(config.data, config.load_size)
    inner = split_open_set(split.train, None, config.search.validation_classes, config.train.seed)
    cloud = given_cloud(config)
    with tempfile.TemporaryDirectory() as folder:
        cpu, wall = time.process_time(), time.perf_counter()
        train_supernet(config, Path(folder), inner.train, [median], Teacher(cloud), None, 1, False)
        return {"candidate": median.key, "flops_vs_cloud": records[median]["flops_vs_cloud"],
                "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "threads": torch.get_num_threads(),
                "candidates": len(space)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, default=ROOT / "runs" / "omniglot",
                        help="a family trained from examples/omniglot.yaml (cloud + hand-picked edge-m, edge-s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "search")
    parser.add_argument("--designs", nargs="+", default=["shared-cloud", "frozen-cloud"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="supernet epochs")
    parser.add_argument("--schedule", default="sandwich", choices=["sandwich", "progressive"])
    parser.add_argument("--fine-tune", type=int, default=0, help="also fine-tune each chosen student this many "
                                                                 "epochs (a copy of the run, resumed)")
    parser.add_argument("--quick", action="store_true", help="seed 0 only, 2 supernet epochs: a smoke test, never "
                                                             "a result")
    parser.add_argument("--tables", action="store_true", help="only print the tables of OUT/results.json")
    args = parser.parse_args()
    if args.tables:
        print_tables(json.loads((args.out / "results.json").read_text()), args)
        return
    if args.quick:
        args.seeds, args.epochs = [0], 2
    began = time.perf_counter()
    reference = args.reference
    if not (reference / "report.json").is_file():
        sys.exit(f"{reference}: no evaluated reference family; run `hetero train examples/omniglot.yaml --out "
                 f"{reference}` and `hetero eval {reference}` first")
    ref_report = json.loads((reference / "report.json").read_text())
    hand_picked = ref_report["edges"]
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    earlier = json.loads(saved.read_text()) if saved.is_file() else {}
    latency = earlier.get("reference", {}).get("latency_ms") or hand_picked_latency(reference)
    results = {"reference": {"paragon": ref_report["matrix"]["cloud"]["cloud"]["top1"], "edges": hand_picked,
                             "latency_ms": latency, "training_seconds": reference_seconds(reference)},
               "runs": earlier.get("runs", {}), **({"separate_epoch": earlier["separate_epoch"]}
                                                       if "separate_epoch" in earlier else {})}
    with (args.out / "log.txt").open("a") as log:
        for design in args.designs:
            for seed in args.seeds:
                name = f"{design}-{args.schedule}-seed{seed}-e{args.epochs}"
                config = search_config(reference, design, seed, args.epochs, hand_picked, args.schedule)
                run = run_search(args.out / name, config, log)
                results["runs"][name] = {**summarise(run, design, seed), "schedule": args.schedule,
                                         "epochs": args.epochs}
                write_record(name, results["runs"][name], args)
                if args.fine_tune:  # the same supernet and candidates, then each chosen student fine-tuned
                    tuned = f"{name}-ft{args.fine_tune}"
                    if not (args.out / tuned).exists():
                        shutil.copytree(args.out / name, args.out / tuned, ignore=shutil.ignore_patterns(
                            "exports", "report.json", "verify.json", "manifest.json"))
                    config["search"]["fine_tune_epochs"] = args.fine_tune
                    run = run_search(args.out / tuned, config, log)
                    results["runs"][tuned] = {**summarise(run, design, seed), "schedule": args.schedule,
                                              "epochs": args.epochs, "fine_tune": args.fine_tune}
                    base, extra = results["runs"][name]["timing"], results["runs"][tuned]["timing"]
                    if base and extra:  # the fine-tuned run's cost includes its supernet and search
                        results["runs"][tuned]["timing"] = {k: base[k] + extra[k] for k in base}
                    write_record(tuned, results["runs"][tuned], args)
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if "separate_epoch" not in results:
        first = next(iter(results["runs"]))
        results["separate_epoch"] = separate_epoch_seconds(args.out / f"{first}.yaml")
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        records.write("student_search", records.key_of("separate-epoch", quick=args.quick), results["separate_epoch"],
                      wall_s=results["separate_epoch"]["wall_s"], quick=args.quick)
    records.write("student_search", records.key_of("reference", reference.name, quick=args.quick),
                  results["reference"], wall_s=time.perf_counter() - began, quick=args.quick,
                  reference=records.relative(reference))
    print_tables(results, args)


def write_record(name: str, run: dict, args) -> Path:
    """One run's record: each target's chosen student with its figures, the paragon, and the search's cost."""
    figures = {k: run[k] for k in ("paragon", "students", "visited", "supernet_seconds", "timing")}
    return records.write("student_search", records.key_of(name, quick=args.quick), figures,
                         wall_s=(run["timing"] or {}).get("wall_s", 0.0), seeds=[run["seed"]], quick=args.quick,
                         design=run["design"], schedule=run["schedule"], epochs=run["epochs"],
                         fine_tune=run.get("fine_tune", 0), reference=records.relative(args.reference))


def reference_seconds(reference: Path) -> dict:
    """The reference run's recorded wall time: the cloud phase and the edge phase (per edge member)."""
    manifest = json.loads((reference / "manifest.json").read_text())
    config = yaml.safe_load((reference / "config.yaml").read_text())
    history = manifest["training"]["history"]
    cloud_epochs = config["train"]["epochs"]
    cloud_s = history[cloud_epochs - 1]["seconds"]
    edges = [m for m in manifest["members"] if m["role"] == "edge"]
    return {"cloud": cloud_s, "edge_phase": history[-1]["seconds"] - cloud_s, "edges": len(edges)}


def summarise(run: dict, design: str, seed: int) -> dict:
    report, manifest = run["report"], run["manifest"]
    members = {m["name"]: m for m in manifest["members"]}
    rows = {}
    for name, figures in report["edges"].items():
        found = members[name]["search"]
        rows[name] = {"candidate": found["candidate"], "flops_vs_cloud": members[name]["flops_vs_cloud"],
                      "mflops": members[name]["flops"] / 1e6, "latency_ms": found["latency_ms"],
                      "validation_top1": found["validation_top1"], "edge_vs_cloud": figures["edge_vs_cloud_top1"],
                      "edge_vs_edge": figures["edge_vs_edge_top1"], "bct": figures["bct_criterion"]}
    for artifact in run["verify"]["artifacts"]:  # verify's latency of the exported student, beside the search's
        check = next((c for c in artifact["checks"] if c["name"] == "budget_latency"), None)
        if artifact["member"] in rows and check and "median_ms" in check["values"]:
            rows[artifact["member"]].setdefault("verify_ms", {})[artifact["runtime"]] = check["values"]["median_ms"]
    candidates = json.loads((run["dir"] / "search" / "candidates.json").read_text())
    return {"design": design, "seed": seed, "paragon": report["matrix"]["cloud"]["cloud"]["top1"], "students": rows,
            "visited": len(candidates), "timing": run["timing"],
            "supernet_seconds": manifest["training"]["history"][-1]["seconds"]}


def print_tables(results: dict, args) -> None:
    ref = results["reference"]
    print(f"Reference (hand-picked) family: paragon {ref['paragon']:.4f}")
    for name, figures in ref["edges"].items():
        print(f"  {name}: 1/{1 / figures['flops_vs_cloud']:.1f} of the cloud's FLOPs, M[edge][cloud] "
              f"{figures['edge_vs_cloud_top1']:.4f}, M[edge][edge] {figures['edge_vs_edge_top1']:.4f}, "
              f"{ref['latency_ms'][name]:.3f} ms on {PROFILE} here")
    print(latency_agreement(results))
    groups: dict[tuple, list] = {}
    for run in results["runs"].values():
        key = (run["design"], run.get("schedule", "sandwich"), run.get("epochs"), run.get("fine_tune", 0))
        groups.setdefault(key, []).append(run)
    for (design, schedule, epochs, tuned), runs in groups.items():
        print(f"\n### {design}, {schedule}, {epochs} supernet epochs, fine-tuning {tuned} epochs, "
              f"{len(runs)} seed(s)\n")
        print("| target | sub-network per seed | of the cloud's FLOPs | latency ms (search) | M[edge][cloud] | paragon "
              "| gap (points) | M[edge][edge] | BCT holds |")
        print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
        for target in runs[0]["students"]:
            rows = [r["students"][target] for r in runs]
            gaps = [100 * (r["paragon"] - r["students"][target]["edge_vs_cloud"]) for r in runs]
            picks = " / ".join(x["candidate"] for x in rows)
            shares = " / ".join(f"{x['flops_vs_cloud']:.4f}" for x in rows)
            latency = " / ".join(f"{x['latency_ms']:.3f}" for x in rows)
            print(f"| {target} | {picks} | {shares} | {latency} | {spread_text([x['edge_vs_cloud'] for x in rows])} | "
                  f"{spread_text([r['paragon'] for r in runs])} | {spread_text(gaps, 2)} | "
                  f"{spread_text([x['edge_vs_edge'] for x in rows])} | {sum(x['bct'] for x in rows)}/{len(rows)} |")
        timing = [r["timing"] for r in runs if r["timing"]]
        separate = results.get("separate_epoch")
        if timing and separate:
            wall, cpu = (statistics.median(t[k] for t in timing) for k in ("wall_s", "cpu_s"))
            alone = separate["cpu_s"] * (epochs + tuned) * separate["candidates"]
            print(f"\nsearch cost (supernet + search + writing the family): median {wall:.0f} s wall, {cpu:.0f} s CPU. "
                  f"Training each of the {separate['candidates']} candidates separately for the same {epochs + tuned} epochs: "
                  f"{separate['cpu_s']:.0f} s CPU per epoch for the median one ({separate['candidate']}), "
                  f"{alone / 3600:.1f} h CPU in all: {alone / cpu:.1f}x the search's CPU time")


def latency_agreement(results: dict) -> str:
    """How the search's latency of each chosen student compares with verify's, timing the exported file."""
    ratios = [student["verify_ms"][runtime] / student["latency_ms"]
              for run in results["runs"].values() for student in run["students"].values()
              for runtime in student.get("verify_ms", {}) if runtime.startswith("onnxruntime 1.3")]
    if not ratios:
        return ""
    return (f"verify's median latency / the search's, same graph, same runtime version, {len(ratios)} students: "
            f"median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")


def spread_text(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


if __name__ == "__main__":
    main()
