"""A backward-compatible model update: a new family whose queries serve the old family's gallery.

Trains (or reuses) an old family, then the same config again with another seed in `backward` mode against
the old, frozen cloud (and with --alone, once more without it, for contrast).  Prints, on the held-out classes, M[old][old] (the
gallery in service), M[new][old] (the BCT criterion asks it to beat M[old][old]), M[new][new] (after a
re-index) and the negative flip rate of the new cloud's queries against the old gallery, plus each new
edge member against the old gallery.

    python benchmarks/backward_update.py                          # Omniglot, trains the old family too
    python benchmarks/backward_update.py --old runs/omniglot      # reuse a trained old family

One record per config and new seed (``benchmarks/results/backward_update/<config>-seed<seed>.json``): the
backward-mode figures above, and with --alone the same for the update trained without compatibility.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import records  # noqa: E402
from hetero.config import load_config  # noqa: E402
from hetero.evaluate import backward_summary, evaluate  # noqa: E402
from hetero.maths import compatibility_matrix  # noqa: E402
from hetero.family import FamilyStore  # noqa: E402
from hetero.models import embed_images  # noqa: E402
from hetero.training import train  # noqa: E402


def train_alone(base, seed: int, old: Path, out: Path) -> tuple[dict, dict]:
    """The same update trained without backward mode, measured against the old gallery."""
    from hetero.data import load_split

    alone = copy.deepcopy(base)
    alone.train.seed = seed
    new_store = train(alone, out, progress=False)
    split = load_split(base.data, base.load_size)
    images = split.test.floats()
    old_store = FamilyStore.open(old)
    embeddings = {"alone": embed_images(new_store.load_member(new_store.cloud.name), images),
                  "old": embed_images(old_store.load_member(old_store.cloud.name), images)}
    matrix = compatibility_matrix(embeddings, split.test.labels, split.query_index, split.gallery_index)
    return backward_summary(embeddings, split, "alone", "old", matrix), matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "examples" / "omniglot.yaml"))
    parser.add_argument("--old", help="a trained family directory to update (default: train one, seed 0)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the new family")
    parser.add_argument("--alone", action="store_true", help="also train the new family without backward mode")
    args = parser.parse_args()

    began = time.perf_counter()
    base = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(args.old) if args.old else Path(tmp) / "old"
        if not args.old:
            train(base, old, progress=False)

        update = copy.deepcopy(base)
        update.train.seed, update.train.mode, update.train.previous = args.seed, "backward", str(old)
        update.train.edge_epochs = None  # one phase: every new member learns against the old cloud
        started = time.perf_counter()
        store = train(update, Path(tmp) / "backward", progress=False)
        seconds = time.perf_counter() - started
        report = evaluate(store)
        figures = dict(report["backward"], train_seconds=round(seconds, 1))
        figures["new_vs_new_top1"] = report["matrix"][report["cloud"]][report["cloud"]]["top1"]

        without, matrix = None, None
        if args.alone:
            without, matrix = train_alone(base, args.seed, old, Path(tmp) / "alone")

    print(f"\n{args.config}: backward-compatible update (new seed {args.seed}), top-1 on held-out classes "
          f"(chance {report['chance_top1']:.3f})")
    print(f"{'new family trained':24} {'M[old][old]':>11} {'M[new][old]':>11} {'M[new][new]':>11} "
          f"{'BCT':>4} {'NFR vs old gallery':>18}  edges vs old gallery")
    edges = ", ".join(f"{n} {v:.3f}" for n, v in figures["edges_vs_old_top1"].items())
    print(f"{'backward mode':24} {figures['old_vs_old_top1']:11.3f} {figures['new_vs_old_top1']:11.3f} "
          f"{figures['new_vs_new_top1']:11.3f} {'yes' if figures['bct_criterion'] else 'no':>4} "
          f"{figures['negative_flip_rate']:18.3f}  {edges}")
    if without:
        print(f"{'alone (no compatibility)':24} {without['old_vs_old_top1']:11.3f} {without['new_vs_old_top1']:11.3f} "
              f"{matrix['alone']['alone']['top1']:11.3f} {'yes' if without['bct_criterion'] else 'no':>4} "
              f"{without['negative_flip_rate']:18.3f}")
    print(f"backward-mode training: {figures['train_seconds']:.0f} s")
    if without:
        without = dict(without, new_vs_new_top1=matrix["alone"]["alone"]["top1"])
    path = records.write("backward_update", records.key_of(Path(args.config).stem, f"seed{args.seed}"),
                         {"backward": figures, **({"alone": without} if without else {}),
                          "chance_top1": report["chance_top1"]},
                         wall_s=time.perf_counter() - began, recipe=records.relative(args.config),
                         overrides=[f"train.seed={args.seed}", "train.mode=backward", "train.edge_epochs=null"],
                         seeds=[args.seed],
                         old_family=records.relative(args.old) or f"trained here (seed {base.train.seed})")
    print(f"record: {path}")


if __name__ == "__main__":
    main()
