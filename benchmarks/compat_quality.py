"""Compatibility quality of training recipes, side by side on the same data, seeds and epochs.

Each row trains the family of a config with one change and evaluates it on the held-out classes:
M[edge][cloud], M[edge][edge], M[cloud][cloud], the ratio to the paragon, BCT's criterion, FLOPs ratio and
wall time.  Rows are named in ROWS; pick some with --rows (the default runs the default recipe and the
independent baseline).

Rows that change only the edge phase of sequential training start that phase from the default row's
checkpoint after its cloud phase (same seed): training is deterministic and resumable, so this gives the
weights a full run would, and the row's training time counts the cloud phase it reused.  With --keep DIR
the rows are trained into DIR and a second run resumes them: finished rows are only evaluated again.

    python benchmarks/compat_quality.py                       # Omniglot, default recipe vs independent
    python benchmarks/compat_quality.py --rows all --epochs 10 --edge-epochs 20 --seeds 0 1 2
    python benchmarks/compat_quality.py --config examples/quickstart.yaml --seeds 0 1 2

One record per row and seed, written as soon as the row is trained
(``benchmarks/results/compat_quality/<config>-<row>-seed<seed>[-e<epochs>][-ee<edge epochs>].json``):
M[cloud][cloud], and per edge its FLOPs ratio, M[edge][cloud], M[edge][edge], ratio to the paragon and BCT.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import records  # noqa: E402
from hetero.config import load_config  # noqa: E402
from hetero.evaluate import evaluate  # noqa: E402
from hetero.training import train  # noqa: E402

EDGE_PHASE_KEYS = {"train.losses", "train.mixed_matching", "train.edge_epochs", "train.edge_classification",
                   "train.matching_inputs"}
ROWS = {
    "default": {},
    "independent (compat: none)": {"train.compat": "none"},
    "edge phase with the library's default terms": {
        "train.edge_classification": 1.0, "train.losses": {"contrastive": 5.0, "relational": 5.0, "regression": 20.0}},
    "mixup matching inputs only": {"train.matching_inputs": ["mixup"]},
    "shared head only (BCT-style)": {"train.losses": {}, "train.edge_classification": 1.0},
    "contrastive only": {"train.losses": {"contrastive": 5.0}},
    "regression only": {"train.losses": {"regression": 5.0}},
    "relational only": {"train.losses": {"relational": 5.0}},
    "no mixed matching": {"train.mixed_matching": 0.0},
    "joint": {"train.mode": "joint"},
    "fp32 (amp: off)": {"train.amp": "off"},
    "unmatched (mobilenet edges, same FLOPs)": {"family.edge_arch": "mobilenet"},
    "edges at the cloud's input size (narrower, same FLOPs)": {"family.edge_input_size": "cloud"},
}


def flops_matched(member, dim: int, **changes):
    """`member` with `changes` (arch, input_size) at the width whose FLOPs come closest to the original's."""
    import math

    from hetero.models import build_member, count_flops

    def flops(m):
        return count_flops(build_member(m, dim, [0.5] * 3, [0.25] * 3))

    target = flops(member)
    widths = [round(0.25 + 0.05 * i, 2) for i in range(76)]  # 0.25 .. 4.0
    candidates = [dataclasses.replace(member, **changes, width=w) for w in widths]
    return min(candidates, key=lambda m: abs(math.log(flops(m) / target)))


def apply(config, change: dict, epochs: int | None, edge_epochs: int | None, seed: int):
    config = copy.deepcopy(config)
    for key, value in change.items():
        section, field = key.split(".")
        if field in ("edge_arch", "edge_input_size"):  # edge_input_size: "cloud", the cloud member's
            cloud = next(m for m in config.family.members if m.role == "cloud")
            edge_change = {"arch": value} if field == "edge_arch" else {"input_size": cloud.input_size}
            dim = config.family.embedding_dim
            config.family.members = [m if m.role == "cloud" else flops_matched(m, dim, **edge_change)
                                     for m in config.family.members]
        else:
            setattr(getattr(config, section), field, value)
    if epochs:
        config.train.epochs = epochs
    if edge_epochs:
        config.train.edge_epochs = edge_epochs
    if config.train.mode != "sequential":
        # One phase: as many epochs as the edges get in sequential mode (the cloud gets more).
        config.train.epochs, config.train.edge_epochs = config.train.edge_epochs or config.train.epochs, None
    config.train.seed = seed
    return config


def training_seconds(history: list[dict]) -> float:
    """Wall time of a training from its history, summed over the processes that ran it (resumes)."""
    total, last = 0.0, 0.0
    for entry in history:
        if entry["seconds"] < last:  # a new process started counting
            total += last
        last = entry["seconds"]
    return total + last


def run_row(config, out: Path, cloud_phase: Path | None = None, snapshot: Path | None = None) -> dict:
    """Train (or finish training) and evaluate one row into `out`.

    A row starts from `cloud_phase` (a training state after the cloud phase) if given; the default row
    keeps its own in `snapshot`.  A row already trained in `out` (a benchmark run again with --keep) is
    resumed, which for a finished one is evaluation alone.
    """
    import shutil

    from hetero.family import TRAIN_STATE

    def keep_cloud_phase(end):
        if snapshot and end.epoch == config.train.epochs:
            shutil.copy(end.out / TRAIN_STATE, snapshot)

    resume = (out / TRAIN_STATE).exists()
    store = train(config, out, resume=resume, progress=False, callbacks=[keep_cloud_phase],
                  start_from=cloud_phase if not resume else None)
    report = evaluate(store)
    seconds = training_seconds([h.model_dump() for h in store.manifest.training.history])
    cloud = report["cloud"]
    return {"cc": report["matrix"][cloud][cloud]["top1"], "edges": report["edges"], "seconds": seconds,
            "chance": report["chance_top1"]}


EDGE_FIGURES = ("flops_vs_cloud", "edge_vs_cloud_top1", "edge_vs_edge_top1", "ratio_to_paragon", "bct_criterion")


def write_record(args, name: str, seed: int, row: dict, wall_s: float, reused_cloud_phase: bool) -> Path:
    """The row's record: its figures, and the row's changes, epochs and seed as the recipe's overrides."""
    changes = {**ROWS[name], **({"train.epochs": args.epochs} if args.epochs else {}),
               **({"train.edge_epochs": args.edge_epochs} if args.edge_epochs else {}), "train.seed": seed}
    figures = {"cloud_cloud_top1": row["cc"], "chance_top1": row["chance"], "train_s": row["seconds"],
               "edges": {edge: {k: v[k] for k in EDGE_FIGURES} for edge, v in row["edges"].items()}}
    key = records.key_of(Path(args.config).stem, name, f"seed{seed}", args.epochs and f"e{args.epochs}",
                         args.edge_epochs and f"ee{args.edge_epochs}")
    return records.write("compat_quality", key, figures, wall_s=wall_s, recipe=records.relative(args.config),
                         overrides=[f"{k}={json.dumps(v)}" for k, v in changes.items()], seeds=[seed], row=name,
                         reused_cloud_phase=reused_cloud_phase)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "examples" / "omniglot.yaml"))
    parser.add_argument("--rows", nargs="+", default=["default", "independent (compat: none)"],
                        help=f"row names, or 'all': {', '.join(ROWS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds for the default row")
    parser.add_argument("--epochs", type=int, help="override the config's (cloud phase) epochs for every row")
    parser.add_argument("--edge-epochs", type=int, help="override the config's edge_epochs for every row")
    parser.add_argument("--keep", help="train the rows into this directory (kept) instead of a temporary one")
    args = parser.parse_args()

    base = load_config(args.config)
    names = list(ROWS) if args.rows == ["all"] else args.rows
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    names = sorted(names, key=lambda n: n != "default")  # the default row's cloud phase is reused
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            tmp = args.keep
            Path(tmp).mkdir(parents=True, exist_ok=True)
        # Every row at the first seed, then the default row's other seeds.
        plan = [(name, args.seeds[0]) for name in names] + [("default", s) for s in args.seeds[1:] if "default" in names]
        for name, seed in plan:
            config = apply(base, ROWS[name], args.epochs, args.edge_epochs, seed)
            cloud_phase = Path(tmp) / f"cloud-phase-{seed}.safetensors"
            edge_phase_only = (config.train.mode == "sequential" and set(ROWS[name]) <= EDGE_PHASE_KEYS
                               and name != "default" and cloud_phase.exists())
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            started = time.perf_counter()
            row = run_row(config, Path(tmp) / f"{slug}-{seed}", cloud_phase=cloud_phase if edge_phase_only else None,
                          snapshot=cloud_phase if name == "default" else None)
            results.setdefault(name, []).append(row)
            # after every run, so a long benchmark stopped midway keeps its rows
            path = write_record(args, name, seed, row, time.perf_counter() - started, edge_phase_only)
            print(f"  {name} seed {seed}: trained in {row['seconds']:.0f} s; record {path}", file=sys.stderr,
                  flush=True)

    first = next(iter(results.values()))[0]
    edges = list(first["edges"])
    print(f"\n{args.config}: top-1 on held-out classes (chance {first['chance']:.3f}); "
          f"mean ± spread over seeds {args.seeds} where several")
    width = max(len("recipe"), *map(len, results))
    header = f"{'recipe':{width}} {'M[c][c]':>13}"
    for edge in edges:
        header += f" | {edge + ' FLOPs':>14} {'M[e][c]':>13} {'M[e][e]':>13} {'ratio':>6} {'BCT':>4}"
    print(header + f" | {'train s':>7}")

    def cell(values):
        mean = statistics.mean(values)
        return f"{mean:.3f} ± {statistics.pstdev(values):.3f}" if len(values) > 1 else f"{mean:13.3f}"

    for name, runs in results.items():
        line = f"{name:{width}} {cell([r['cc'] for r in runs]):>13}"
        for edge in edges:
            rows = [r["edges"][edge] for r in runs]
            flops = rows[0]["flops_vs_cloud"]
            bct = all(r["bct_criterion"] for r in rows)
            line += (f" | {'1/' + format(1 / flops, '.1f'):>14} {cell([r['edge_vs_cloud_top1'] for r in rows]):>13}"
                     f" {cell([r['edge_vs_edge_top1'] for r in rows]):>13}"
                     f" {statistics.mean(r['ratio_to_paragon'] for r in rows):6.3f} {'yes' if bct else 'no':>4}")
        print(line + f" | {statistics.median(r['seconds'] for r in runs):7.0f}")


if __name__ == "__main__":
    main()
