"""Early-exit edge students on Omniglot: the anytime curve, the FLOPs saved at edge-m's top-1, the edge-to-cloud
split, and the exit machinery's overhead.

One family, trained once against the frozen ONNX cloud (`model:`, default runs/byo/cloud.onnx, the Omniglot
family's cloud, written by `benchmarks/external_cloud.py runs/omniglot --keep runs/byo`) with the Omniglot recipe of examples/omniglot.yaml and a teacher cache:

- `multi`: edge-m's trunk (resnet, width 0.625, depth 0.5, 48 px) with an exit after every stage (`exits: auto`);
- `edge-m`: the same trunk with its one exit: today's edge-m, trained in the same run on the same batches;
- `single-4m`, `single-13m`, `single-18m`: separate single-exit students (widths 0.25, 0.375, 0.5) at about the
  FLOPs of the multi-exit member's first three exits.

Every member trains on the same images: each training class's last 10% (2 of 20 drawers) are held out of
training for calibration (train.early_exit.held_out).  The anytime curve puts each early exit's threshold at
the same quantile q of its entropies on those held-out training images and reads top-1 (M[edge][cloud]) and
mean FLOPs on the test queries (106 unseen characters).  The goals are then read off it:

- at equal mean FLOPs, the multi-exit member against each separate student (its curve interpolated);
- the least mean FLOPs at which the rule is within 0.5 points of edge-m's top-1 (goal: 1.5x below edge-m's);
- `hetero calibrate --top1-loss 0.005 --escalate 0.1`: the system's top-1 with 10% sent to the cloud, against
  the point halfway from edge-m's top-1 to the cloud's;
- the exit machinery's FLOPs (earlier heads, anchors): under 5% of the last exit's.

    python benchmarks/early_exit.py --quick     # 3 edge epochs, 4 cached views (~45 min on 2 busy cores)
    python benchmarks/early_exit.py             # 60 edge epochs, 8 views (the README recipe's length)

One record per run (``benchmarks/results/early_exit/e<epochs>-v<views>[-quick].json``): each member's top-1
and MFLOPs, the anytime curve, each exit alone, the cheapest point within 0.5 points of edge-m, the calibrated
split and the exit machinery's overhead.  The plot is written beside the family (``--out``/anytime.png).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import records  # noqa: E402
from hetero.config import parse_config  # noqa: E402
from hetero.evaluate import evaluate  # noqa: E402
from hetero.training.exits import calibrate, calibration_data  # noqa: E402
from hetero.maths import apply_rule, correct_per_exit, rule_figures  # noqa: E402
from hetero.models import exit_embeddings, exit_entropies  # noqa: E402
from hetero.family import FamilyStore  # noqa: E402
from hetero.models import Embedder, count_flops  # noqa: E402
from hetero.training import train  # noqa: E402

SINGLES = {"single-4m": 0.25, "single-13m": 0.375, "single-18m": 0.5}
QUANTILES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]


def family_config(cloud: str, data: str, epochs: int, views: int, cache_dir: str | None) -> dict:
    trunk = {"arch": "resnet", "width": 0.625, "depth": 0.5, "input_size": 48}
    members = [{"name": "cloud", "role": "cloud", "model": cloud},
               {"name": "multi", "role": "edge", **trunk, "exits": "auto"},
               {"name": "edge-m", "role": "edge", **trunk}]
    members += [{"name": name, "role": "edge", "arch": "resnet", "width": width, "depth": 0.5, "input_size": 48}
                for name, width in SINGLES.items()]
    return {
        "family": {"name": "omniglot-early-exit", "embedding_dim": 128, "members": members},
        "data": {"source": "omniglot", "path": data},
        "train": {"epochs": epochs, "batch_size": 64, "seed": 0, "edge_classification": 0.0,
                  "losses": {"relational": 5.0, "regression": 20.0}, "matching_inputs": ["mixup", "cutmix", "dihedral"],
                  "teacher_cache": {"views": views, **({"dir": cache_dir} if cache_dir else {})},
                  "early_exit": {"held_out": 0.1}},
    }


def anytime_curve(store: FamilyStore, member: str) -> list[dict]:
    """(q, mean MFLOPs, top-1 vs the cloud gallery, shares) on the test queries, thresholds from held-out
    training images."""
    held = calibration_data(store, member)["entropies"]
    split, entry = store.split(), store.member(member)
    model, cloud = store.load_member(member), store.load_member(store.cloud.name)
    images = split.test.floats()
    q, g, labels = split.query_index, split.gallery_index, split.test.labels
    exits = exit_embeddings(model, images[q])
    from hetero.models import embed_images

    gallery = embed_images(cloud, images[g])
    correct = correct_per_exit(exits, gallery, labels[q], labels[g])
    entropies = exit_entropies(model, exits)
    flops = [e.flops for e in entry.exits]
    rows = []
    for quantile in QUANTILES:
        thresholds = [held[k].quantile(quantile).item() if quantile > 0 else -1.0 for k in range(len(flops) - 1)]
        figures = rule_figures(apply_rule(entropies, thresholds), correct, flops)
        rows.append({"q": quantile, "mean_mflops": figures["mean_flops"] / 1e6, "top1": figures["top1_edge"],
                     "shares": [round(s, 3) for s in figures["shares"]]})
    return rows


def interpolate(curve: list[dict], mflops: float) -> float | None:
    """The curve's top-1 at `mflops` (linear between its points, best point at or below when it is a hull)."""
    points = sorted((r["mean_mflops"], r["top1"]) for r in curve)
    if mflops < points[0][0]:
        return None
    best = max(t for f, t in points if f <= mflops)
    for (f0, t0), (f1, t1) in zip(points, points[1:]):
        if f0 <= mflops <= f1 and f1 > f0:
            best = max(best, t0 + (t1 - t0) * (mflops - f0) / (f1 - f0))
    return best


def plot(curve: list[dict], singles: dict, edge_m: tuple, cloud_top1: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["mean_mflops"] for r in curve], [r["top1"] for r in curve], "o-", label="multi-exit (the rule)")
    ax.plot([f for f, _ in singles.values()], [t for _, t in singles.values()], "s", label="single-exit students")
    ax.plot([edge_m[0]], [edge_m[1]], "D", label="edge-m")
    ax.axhline(cloud_top1, ls="--", c="grey", label="cloud/cloud")
    ax.set_xlabel("mean MFLOPs per query (edge)")
    ax.set_ylabel("top-1 vs the cloud gallery")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cloud", default=str(ROOT / "runs" / "byo" / "cloud.onnx"), help="the frozen ONNX cloud")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "omniglot"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "early_exit"), help="family directory (kept)")
    parser.add_argument("--epochs", type=int, help="edge epochs (default 60; --quick 3)")
    parser.add_argument("--views", type=int, help="teacher cache views per image (default 8; --quick 4)")
    parser.add_argument("--cache-dir", help="teacher cache directory to share between runs")
    parser.add_argument("--quick", action="store_true", help="3 edge epochs, 4 views: a smoke test, never a result")
    parser.add_argument("--reuse", action="store_true", help="evaluate the family already in --out")
    parser.add_argument("--start-from", help="a training state of this same config whose finished epochs this run "
                                             "shares (e.g. the first epoch of a longer run: warm-up, identical)")
    args = parser.parse_args()
    epochs = args.epochs or (3 if args.quick else 60)
    views = args.views or (4 if args.quick else 8)
    out = Path(args.out)
    started = time.perf_counter()
    if args.reuse:
        store = FamilyStore.open(out)
    else:
        config = parse_config(family_config(args.cloud, args.data, epochs, views, args.cache_dir), "early_exit")
        store = train(config, out, overwrite=True, progress=False, start_from=args.start_from)
    trained = time.perf_counter() - started
    report = evaluate(store)
    top1 = {name: report["matrix"][name]["cloud"]["top1"] for name in report["matrix"]}
    flops = {m.name: m.flops for m in store.members}
    curve = anytime_curve(store, "multi")

    print(f"\nEarly exit on Omniglot: {epochs} edge epochs, teacher cache {views} views, "
          f"{store.manifest.data.train_images} training images (held-out share 0.1), {report['queries']} test queries; "
          f"training {trained:.0f} s")
    print("\nAnytime curve of `multi` (thresholds: quantile q of each exit's entropies on held-out training images)")
    print("| q | mean MFLOPs | top-1 vs cloud | share per exit (stages 1-4) |\n| ---: | ---: | ---: | --- |")
    for r in curve:
        print(f"| {r['q']:.2f} | {r['mean_mflops']:.2f} | {r['top1']:.3f} | {' / '.join(f'{s:.2f}' for s in r['shares'])} |")
    exits = report["early_exit"]["multi"]["exits"]
    print("\nEach exit alone, and the separate students\n| member | MFLOPs | top-1 vs cloud | multi-exit at equal "
          "mean FLOPs | difference |\n| --- | ---: | ---: | ---: | ---: |")
    for e in exits:
        print(f"| multi, exit at stage {e['stage']} | {e['flops'] / 1e6:.2f} | {e['top1_vs_cloud']:.3f} | | |")
    singles = {}
    for name in [*SINGLES, "edge-m"]:
        mflops = flops[name] / 1e6
        at = interpolate(curve, mflops)
        singles[name] = (mflops, top1[name])
        diff = "" if at is None else f"{at - top1[name]:+.3f}"
        print(f"| {name} | {mflops:.2f} | {top1[name]:.3f} | {'below the first exit' if at is None else f'{at:.3f}'} "
              f"| {diff} |")
    edge_m, cloud_top1 = top1["edge-m"], top1["cloud"]
    matching = [r for r in curve if r["top1"] >= edge_m - 0.005]
    cheapest = min(matching, key=lambda r: r["mean_mflops"]) if matching else None
    plain = count_flops(Embedder("resnet", 0.625, 0.5, 128, 48))
    overhead = exits[-1]["flops"] / plain - 1
    calibrate(store, "multi", top1_loss=0.005, escalate=0.1)
    rule = evaluate(store)["early_exit"]["multi"]["rule"]
    halfway = edge_m + (cloud_top1 - edge_m) / 2
    print("\nGoals")
    print(f"- edge-m top-1 {edge_m:.3f} at {flops['edge-m'] / 1e6:.2f} MFLOPs; cloud/cloud {cloud_top1:.3f}")
    if cheapest:
        print(f"- within 0.5 points of edge-m: multi at q={cheapest['q']:.2f}, top-1 {cheapest['top1']:.3f}, mean "
              f"{cheapest['mean_mflops']:.2f} MFLOPs: {flops['edge-m'] / 1e6 / cheapest['mean_mflops']:.2f}x fewer "
              f"than edge-m (goal 1.5x)")
    else:
        print(f"- no point of the curve is within 0.5 points of edge-m (best {max(r['top1'] for r in curve):.3f})")
    print(f"- split (calibrated: --top1-loss 0.005 --escalate 0.1): {rule['escalated']:.1%} escalated, system top-1 "
          f"{rule['top1_system']:.3f} (edge answers alone {rule['top1_edge']:.3f}, mean edge "
          f"{rule['mean_flops'] / 1e6:.2f} MFLOPs, shares {' / '.join(f'{s:.2f}' for s in rule['shares'])}); "
          f"halfway from edge-m to the cloud is {halfway:.3f}: {'met' if rule['top1_system'] >= halfway else 'not met'}")
    print(f"- exit machinery: last exit {exits[-1]['flops'] / 1e6:.3f} MFLOPs against {plain / 1e6:.3f} for the plain "
          f"trunk: +{overhead:.2%} (goal < 5%)")
    plot_path = out / "anytime.png"
    plot(curve, singles, singles["edge-m"], cloud_top1, plot_path)
    figures = {
        "train_s": None if args.reuse else trained, "top1_vs_cloud": top1,
        "mflops": {name: value / 1e6 for name, value in flops.items()},
        "anytime_curve": {f"q={r['q']:.2f}": {"mean_mflops": r["mean_mflops"], "top1": r["top1"], "shares": r["shares"]}
                          for r in curve},
        "exits_alone": {f"stage {e['stage']}": {"mflops": e["flops"] / 1e6, "top1_vs_cloud": e["top1_vs_cloud"]}
                        for e in exits},
        "within_half_point_of_edge_m": cheapest and {
            "q": cheapest["q"], "top1": cheapest["top1"], "mean_mflops": cheapest["mean_mflops"],
            "times_fewer_mflops_than_edge_m": flops["edge-m"] / 1e6 / cheapest["mean_mflops"]},
        "calibrated_split": {"escalated": rule["escalated"], "top1_system": rule["top1_system"],
                             "top1_edge": rule["top1_edge"], "mean_mflops": rule["mean_flops"] / 1e6,
                             "shares": rule["shares"], "halfway_edge_m_to_cloud": halfway,
                             "halfway_met": rule["top1_system"] >= halfway},
        "exit_overhead": overhead,
    }
    path = records.write("early_exit", records.key_of(f"e{epochs}", f"v{views}", quick=args.quick), figures,
                         wall_s=time.perf_counter() - started, seeds=[0], quick=args.quick,
                         cloud=records.relative(args.cloud), epochs=epochs, views=views, reused=args.reuse)
    print(f"\nplot: {plot_path}; record: {path}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
