"""Compatibility-aware student search on Omniglot against the hand-picked students (issues 16 and 27).

For each design (shared-cloud, frozen-cloud) and seed, `hetero search` trains one supernet whose largest
sub-network is the reference family's cloud architecture (starting from that cloud's weights), then finds the
best sub-network on the rpi-onnx-int8 profile (candidates exported and timed by onnxruntime here) for four
budgets: 1/10 and 1/25 of the cloud's FLOPs, and the FLOPs of the hand-picked edge-m and edge-s.
`hetero eval` then measures every family on the test alphabets (same split and metric as the README).

The levers of issue 27, each a flag so that each is measured on its own:
  --epochs N        supernet epochs (default: the reference recipe's train.edge_epochs, as many as the students
                    it replaces train; frozen-cloud reads the cloud's answers from the teacher cache)
  --rank-by R       the ranking figure on the validation images: neighbours (label-free recall of the cloud's
                    own neighbours) or top1 (M[candidate][cloud] on the validation classes)
  --fine-tune N     each chosen student's own edge phase for N epochs, through the teacher cache (a copy of the
                    run, resumed); the reference's edge_epochs is "as long as a hand-picked student trains"

    python benchmarks/student_search.py --reference runs/omniglot --designs frozen-cloud --fine-tune 30
    python benchmarks/student_search.py --reference runs/omniglot --quick    # 1 seed, 2 epochs: a smoke test

Per run it also records the rank correlation (Spearman, over every visited candidate, between each figure the
search recorded on the validation images and the candidate's test top-1 against the cloud's gallery) and the
CPU cost: the search (cache, supernet, scoring) and the fine-tuning, against the hand-picked students trained
alone through the same cache and the visited candidates trained separately (both measured here per epoch).

The reference family is one trained with `hetero train examples/omniglot.yaml --out DIR` (about 1 h on 2
cores); it gives the cloud (frozen, or the supernet's start) and the hand-picked students compared against.
Prints Markdown tables and writes OUT/results.json (`--tables` prints them again).

Records (``benchmarks/results/student_search/``): one per run
(``<design>-<schedule>-<rank_by>-seed<s>-e<epochs>[-ft<n>]``) with each target's chosen student and its
figures, the rank correlation and the costs, ``reference-<dir>`` with the hand-picked family's, and
``alone-costs`` with the CPU cost per epoch of one student trained alone.
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


def search_config(reference: Path, design: str, seed: int, epochs: int, hand_picked: dict, schedule: str,
                  rank_by: str) -> dict:
    """The reference family's config with the cloud alone, this seed, and a `search` section."""
    config = yaml.safe_load((reference / "config.yaml").read_text())
    cloud = next(m for m in config["family"]["members"] if m["role"] == "cloud")
    config["family"]["members"] = [{k: cloud[k] for k in ("name", "role", "arch", "width", "depth", "input_size")}]
    train = config["train"]
    for unused in ("edge_epochs", "previous", "init"):  # teacher_cache stays: its views serve the search too
        train.pop(unused, None)
    train.get("teacher_cache", {}).pop("dir", None)
    train.update(seed=seed, mode="sequential")
    targets = [{"name": "edge-10x", "profile": PROFILE, "max_flops_vs_cloud": 0.1},
               {"name": "edge-25x", "profile": PROFILE, "max_flops_vs_cloud": 0.04}]
    targets += [{"name": f"at-{name}", "profile": PROFILE, "max_flops_vs_cloud": figures["flops_vs_cloud"]}
                for name, figures in hand_picked.items()]
    config["search"] = {"design": design, "schedule": schedule, "rank_by": rank_by, "cloud": str(reference.resolve()),
                        "epochs": epochs,
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


def alone_costs(config_path: Path, reference: Path) -> dict:
    """CPU seconds of students trained alone against the frozen cloud through the teacher cache, with the code
    of a searched student's fine-tuning (the edge phase): the cache's build once, then one epoch of each
    hand-picked student and of the search space's median-FLOPs candidate.  A student trained alone for E
    epochs costs build + E x its epoch; the visited candidates trained separately, build + E x visited x the
    median's epoch."""
    import dataclasses
    import tempfile

    import torch

    from hetero.config import TeacherCacheConfig, load_config
    from hetero.data import load_split
    from hetero.family import FamilyStore
    from hetero.models import Embedder
    from hetero.search import Candidate, fine_tune, given_cloud, search_space, static_records
    from hetero.training.teacher_cache import build_cached_views, cloud_identity, plan_for_config

    config = load_config(config_path)
    space = search_space(config.search)
    statics = static_records(space, config)
    median = sorted(space, key=lambda c: statics[c]["flops"])[len(space) // 2]
    students = {m.name: Candidate(m.width, m.depth, m.input_size) for m in FamilyStore.open(reference).edges}
    students[f"median {median.key}"] = median
    split = load_split(config.data, config.load_size)
    cloud = given_cloud(config)
    views = (config.train.teacher_cache or TeacherCacheConfig()).views
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "cache"
        cpu = time.process_time()
        build_cached_views(root, plan_for_config(config, cloud_identity(cloud), split.train, views), cloud,
                           split.train, False)
        build = time.process_time() - cpu
        cache = TeacherCacheConfig(views=views, dir=str(root))
        one_epoch = dataclasses.replace(config, train=dataclasses.replace(config.train, teacher_cache=cache),
                                        search=dataclasses.replace(config.search, fine_tune_epochs=1))
        epoch = {}
        for index, (name, c) in enumerate(students.items()):
            torch.manual_seed(0)
            student = Embedder("resnet", c.width, c.depth, config.family.embedding_dim, c.input_size)
            cpu = time.process_time()
            fine_tune(one_epoch, Path(folder) / f"student{index}", student, cloud, split, False)
            epoch[name] = time.process_time() - cpu
    return {"cache_build_cpu_s": build, "epoch_cpu_s": epoch, "median_candidate": median.key,
            "candidates": len(space), "threads": torch.get_num_threads()}


def rank_correlation(out: Path) -> dict:
    """Over every candidate the search visited: Spearman's rho between each figure it recorded on the
    validation images and the candidate's test top-1 against the cloud's gallery (what a ranking should
    predict), measured here on the supernet the search trained, as the search extracts candidates."""
    from scipy.stats import spearmanr

    from hetero.config import load_config
    from hetero.data import load_split, split_open_set
    from hetero.maths import retrieval_metrics
    from hetero.models import embed_images
    from hetero.search import Candidate, Teacher, given_cloud, recalibrate, search_space, train_supernet

    config = load_config(out / "config.yaml")
    settings = config.search
    split = load_split(config.data, config.load_size)
    inner = split_open_set(split.train, None, settings.validation_classes, config.train.seed)
    space = search_space(settings)
    given = given_cloud(config)
    frozen = settings.design == "frozen-cloud"
    # Trained already: this only loads the supernet's last state.
    supernet = train_supernet(config, out, inner.train, space, Teacher(given if frozen else None), None,
                              settings.epochs, False)
    bn_images = inner.train.spread(settings.bn_images)
    cloud = given if frozen else recalibrate(supernet.extract(max(space)), bn_images)
    test, q, g = split.test, split.query_index, split.gallery_index
    gallery = embed_images(cloud, test.floats()[g])
    queries = test.floats()[q]
    measured = json.loads((out / "search" / "candidates.json").read_text())
    visited = {k: r for k, r in measured.items() if "neighbours" in r}
    for record in visited.values():
        member = recalibrate(supernet.extract(Candidate(record["width"], record["depth"], record["input_size"])),
                             bn_images)
        record["test_top1"] = retrieval_metrics(embed_images(member, queries), test.labels[q], gallery,
                                                test.labels[g])["top1"]
    tests = [r["test_top1"] for r in visited.values()]
    rho = {figure: float(spearmanr([r[figure] for r in visited.values()], tests).statistic)
           for figure in ("neighbours", "top1", "agreement_top1", "cosine_mean")}
    return {"candidates": len(visited), "spearman_vs_test_top1": rho,
            "test_top1": {k: round(r["test_top1"], 5) for k, r in visited.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, default=ROOT / "runs" / "omniglot",
                        help="a family trained from examples/omniglot.yaml (cloud + hand-picked edge-m, edge-s)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "search")
    parser.add_argument("--designs", nargs="+", default=["shared-cloud", "frozen-cloud"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="supernet epochs (default: the reference recipe's "
                                                                 "train.edge_epochs)")
    parser.add_argument("--rank-by", default="neighbours", choices=["neighbours", "top1"],
                        help="search.rank_by: the figure that ranks candidates on the validation images")
    parser.add_argument("--schedule", default="sandwich", choices=["sandwich", "progressive"])
    parser.add_argument("--fine-tune", type=int, default=0, help="also fine-tune each chosen student this many "
                                                                 "epochs through the teacher cache (a copy of the "
                                                                 "run, resumed)")
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
    recipe = yaml.safe_load((reference / "config.yaml").read_text())["train"]
    args.epochs = args.epochs or recipe.get("edge_epochs") or recipe["epochs"]
    hand_picked = ref_report["edges"]
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    earlier = json.loads(saved.read_text()) if saved.is_file() else {}
    latency = earlier.get("reference", {}).get("latency_ms") or hand_picked_latency(reference)
    results = {"reference": {"paragon": ref_report["matrix"]["cloud"]["cloud"]["top1"], "edges": hand_picked,
                             "latency_ms": latency, "training_seconds": reference_seconds(reference)},
               "runs": earlier.get("runs", {}), **({"alone": earlier["alone"]} if "alone" in earlier else {})}
    if "alone" not in results:  # the unit costs each run's is compared with
        path = args.out / "alone-costs.yaml"
        path.write_text(yaml.safe_dump(search_config(reference, args.designs[0], args.seeds[0], args.epochs,
                                                     hand_picked, args.schedule, args.rank_by), sort_keys=False))
        started = time.perf_counter()
        results["alone"] = alone_costs(path, reference)
        records.write("student_search", records.key_of("alone-costs", quick=args.quick), results["alone"],
                      wall_s=time.perf_counter() - started, quick=args.quick)
    edge_epochs = recipe.get("edge_epochs") or recipe["epochs"]
    with (args.out / "log.txt").open("a") as log:
        for design in args.designs:
            for seed in args.seeds:
                name = f"{design}-{args.schedule}-{args.rank_by}-seed{seed}-e{args.epochs}"
                config = search_config(reference, design, seed, args.epochs, hand_picked, args.schedule,
                                       args.rank_by)
                run = run_search(args.out / name, config, log)
                ranking = results["runs"].get(name, {}).get("rank_correlation") or rank_correlation(args.out / name)
                results["runs"][name] = {**summarise(run, design, seed), "schedule": args.schedule,
                                         "epochs": args.epochs, "rank_by": args.rank_by, "rank_correlation": ranking}
                results["runs"][name]["cost"] = costs(results["runs"][name], results["alone"], edge_epochs)
                write_record(name, results["runs"][name], args)
                if args.fine_tune:  # the same supernet and candidates, then each chosen student fine-tuned
                    tuned = f"{name}-ft{args.fine_tune}"
                    if not (args.out / tuned).exists():
                        shutil.copytree(args.out / name, args.out / tuned, ignore=shutil.ignore_patterns(
                            "exports", "report.json", "verify.json", "manifest.json"))
                    config["search"]["fine_tune_epochs"] = args.fine_tune
                    run = run_search(args.out / tuned, config, log)
                    results["runs"][tuned] = {**summarise(run, design, seed), "schedule": args.schedule,
                                              "epochs": args.epochs, "fine_tune": args.fine_tune,
                                              "rank_by": args.rank_by, "rank_correlation": ranking}
                    base, extra = results["runs"][name]["timing"], results["runs"][tuned]["timing"]
                    if base and extra:  # the fine-tuned run's cost includes its supernet and search
                        results["runs"][tuned]["timing"] = {**{k: base[k] + extra[k] for k in ("cpu_s", "wall_s")},
                                                            "search": base, "fine_tuning": extra}
                    results["runs"][tuned]["cost"] = costs(results["runs"][tuned], results["alone"], edge_epochs)
                    write_record(tuned, results["runs"][tuned], args)
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
    records.write("student_search", records.key_of("reference", reference.name, quick=args.quick),
                  results["reference"], wall_s=time.perf_counter() - began, quick=args.quick,
                  reference=records.relative(reference))
    print_tables(results, args)


def write_record(name: str, run: dict, args) -> Path:
    """One run's record: each target's chosen student with its figures, the paragon, and the search's cost."""
    figures = {k: run[k] for k in ("paragon", "students", "visited", "supernet_seconds", "timing", "rank_correlation",
                                   "cost")}
    return records.write("student_search", records.key_of(name, quick=args.quick), figures,
                         wall_s=(run["timing"] or {}).get("wall_s", 0.0), seeds=[run["seed"]], quick=args.quick,
                         design=run["design"], schedule=run["schedule"], epochs=run["epochs"],
                         rank_by=run["rank_by"], fine_tune=run.get("fine_tune", 0),
                         reference=records.relative(args.reference))


def costs(run: dict, alone: dict, edge_epochs: int) -> dict | None:
    """CPU seconds of the run (search, and fine-tuning when there is one) against each hand-picked student
    trained alone for the recipe's edge epochs, and against the visited candidates trained separately as
    long (each as the median candidate, all through one cache), from the unit costs of `alone`."""
    timing = run["timing"]
    if not timing:
        return None
    build, epoch = alone["cache_build_cpu_s"], alone["epoch_cpu_s"]
    median = epoch[f"median {alone['median_candidate']}"]
    return {"search_cpu_s": timing.get("search", timing)["cpu_s"],
            "fine_tuning_cpu_s": timing["fine_tuning"]["cpu_s"] if "fine_tuning" in timing else 0.0,
            "total_cpu_s": timing["cpu_s"], "edge_epochs": edge_epochs,
            "hand_picked_alone_cpu_s": {name: build + edge_epochs * s for name, s in epoch.items()
                                        if not name.startswith("median ")},
            "visited_separately_cpu_s": build + edge_epochs * run["visited"] * median}


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
        rho = [r["rank_correlation"]["spearman_vs_test_top1"] for r in runs if r.get("rank_correlation")]
        if rho:
            print(f"\nrank correlation with test top-1 over the visited candidates (Spearman, ranked by "
                  f"{runs[0].get('rank_by')}): " + ", ".join(f"{figure} {spread_text([x[figure] for x in rho], 3)}"
                                                           for figure in rho[0]))
        spent = [r["cost"] for r in runs if r.get("cost")]
        if spent:
            total = statistics.median(c["total_cpu_s"] for c in spent)
            hand = {name: statistics.median(c["hand_picked_alone_cpu_s"][name] for c in spent)
                    for name in spent[0]["hand_picked_alone_cpu_s"]}
            separately = statistics.median(c["visited_separately_cpu_s"] for c in spent)
            searching, tuning = (statistics.median(c[k] for c in spent) for k in ("search_cpu_s", "fine_tuning_cpu_s"))
            print(f"\nCPU cost (median over seeds): the search {searching:.0f} s + fine-tuning {tuning:.0f} s = "
                  f"{total:.0f} s; "
                  + ", ".join(f"{name} trained alone {s:.0f} s" for name, s in hand.items())
                  + f" ({spent[0]['edge_epochs']} epochs through the cache); the visited candidates trained "
                  f"separately as long {separately / 3600:.1f} h ({separately / total:.1f}x the search's)")


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
