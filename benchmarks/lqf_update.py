"""Updating a family on new characters without breaking its gallery: LQF against ordinary fine-tuning.

The issue-17 experiment on Omniglot.  An old family is trained on the training alphabets without Korean
(96 characters), then updated with 5 drawings (drawers 1-5) of each of Korean's 40 characters, four ways on
the same data and budget (`--epochs` passes over the update set):

- no update: the old family as it is;
- LQF (`mode: lqf`): each member linearised around its weights, least squares, K-FAC-preconditioned CG;
  measured merged (w0 + dw, what is exported) and as the linearised model itself (jvp at run time);
- ordinary fine-tuning (`train.init: OLD`, mode joint);
- fine-tuning with the backward terms (`train.init: OLD`, mode backward against the old cloud).

Columns: top-1 on Korean's other drawings (drawers 6-10 embedded by the (new) cloud as gallery, drawers
11-20 as queries, by the cloud and by each edge); on the standard test split M[new][old] (new cloud's queries
against the old cloud's gallery), M[old][old] and the negative flip rate against the old gallery; each as
the mean over `--seeds` seeds and its spread (max - min).

    python benchmarks/lqf_update.py --quick      # reduced recipe (see QUICK), a few minutes on 2 cores
    python benchmarks/lqf_update.py              # the README's Omniglot members (leaky ReLU), long

--work DIR keeps the data folders and the old family there, so later runs reuse the (expensive) old family.
One record per method, rewritten after every round of seeds
(``benchmarks/results/lqf_update/<method>-<passes>passes[-quick].json``): each figure's mean and spread.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import records  # noqa: E402
from hetero.config import parse_config  # noqa: E402
from hetero.data import OMNIGLOT_TEST_ALPHABETS, load_split, read_image_tree  # noqa: E402
from hetero.evaluate import backward_summary  # noqa: E402
from hetero.maths import compatibility_matrix, top1_correct  # noqa: E402
from hetero.family import FamilyStore  # noqa: E402
from hetero.training.lqf import load_linearised  # noqa: E402
from hetero.models import embed_images  # noqa: E402
from hetero.training import train  # noqa: E402

OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"
OLD_ALPHABETS = ["Balinese", "Early_Aramaic", "Greek", "Latin"]  # the training alphabets without Korean
NEW = "Korean"
UPDATE_DRAWERS, GALLERY_DRAWERS, QUERY_DRAWERS = range(1, 6), range(6, 11), range(11, 21)

FULL = {"members": [
    {"name": "cloud", "role": "cloud", "arch": "resnet", "width": 1.0, "depth": 1.0, "input_size": 64},
    {"name": "edge-m", "role": "edge", "arch": "resnet", "width": 0.625, "depth": 0.5, "input_size": 48},
    {"name": "edge-s", "role": "edge", "arch": "resnet", "width": 0.5, "depth": 0.5, "input_size": 48}],
    "dim": 128, "epochs": 30, "edge_epochs": 60, "old_drawers": range(1, 21), "passes": 10}
# --quick: a cloud and one edge at half and quarter width, 32 px, 64-d, 3 + 3 epochs on drawers 1-10 of
# the 96 characters only: the old family in minutes on 2 shared CPU cores instead of hours; its figures
# are far below the full recipe's.
QUICK = {"members": [
    {"name": "cloud", "role": "cloud", "arch": "resnet", "width": 0.5, "depth": 0.5, "input_size": 32},
    {"name": "edge", "role": "edge", "arch": "resnet", "width": 0.25, "depth": 0.5, "input_size": 32}],
    "dim": 64, "epochs": 3, "edge_epochs": 3, "old_drawers": range(1, 11), "passes": 5}


def extract(root: Path, drawers: dict[str, range]) -> Path:
    """The chosen alphabets' drawings by their chosen drawers, as an extracted Omniglot folder."""
    if root.exists():
        return root
    tmp = root.with_suffix(".partial")
    for archive in sorted(OMNIGLOT.glob("images_background_small*.zip")):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                parts = name.split("/")
                if len(parts) == 4 and parts[1] in drawers and parts[3].endswith(".png") \
                        and int(parts[3][:-4].split("_")[1]) in drawers[parts[1]]:
                    target = tmp / "omniglot" / parts[1] / parts[2] / parts[3]  # Greek, Latin: in both zips
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
    tmp.rename(root)
    return root


def config(recipe: dict, data: Path, **train) -> dict:
    members = [dict(m, activation="leaky_relu") for m in recipe["members"]]
    return {"family": {"name": "omniglot-old", "embedding_dim": recipe["dim"], "members": members},
            "data": {"source": "omniglot", "path": str(data)},
            "train": {"batch_size": 40, "seed": 0, "edge_classification": 0.0,
                      "losses": {"relational": 5.0, "regression": 20.0}, **train}}


def korean_top1(store: FamilyStore, korean) -> dict[str, float]:
    """Top-1 on Korean's other drawings: gallery (drawers 6-10) by the cloud, queries (11-20) by each member."""
    drawer = [int(n.rsplit("_", 1)[1].split(".")[0]) for n in korean.names]
    gallery = [i for i, d in enumerate(drawer) if d in GALLERY_DRAWERS]
    queries = [i for i, d in enumerate(drawer) if d in QUERY_DRAWERS]
    images, labels = korean.floats(), korean.labels
    cloud = embed_images(store.load_member(store.cloud.name), images[gallery])
    return {m.name: top1_correct(embed_images(store.load_member(m.name), images[queries]), labels[queries], cloud,
                                 labels[gallery]).float().mean().item() for m in store.members}


def old_gallery_figures(models: dict, old_cloud, split) -> dict:
    """M[new][old], M[old][old] and the NFR of the new cloud's queries against the old cloud's gallery."""
    images = split.test.floats()
    embeddings = {name: embed_images(model, images) for name, model in models.items()}
    embeddings["old"] = embed_images(old_cloud, images)
    matrix = compatibility_matrix(embeddings, split.test.labels, split.query_index, split.gallery_index)
    summary = backward_summary(embeddings, split, "cloud", "old", matrix)
    return {"new_vs_old": summary["new_vs_old_top1"], "old_vs_old": summary["old_vs_old_top1"],
            "nfr": summary["negative_flip_rate"], "edges_vs_old": summary["edges_vs_old_top1"]}


class LinearisedStore:
    """A family's members as LQF's linearised models (jvp at run time), for korean_top1."""

    def __init__(self, store: FamilyStore):
        self.members, self.cloud = store.members, store.cloud
        self.models = {m.name: load_linearised(store, m.name) for m in store.members}

    def load_member(self, name):
        return self.models[name]


def method_figures(runs: list[dict]) -> dict:
    """A method's figures over its runs (one per seed): the mean and the spread (max - min) of each."""
    def stat(values):
        return {"mean": statistics.mean(values), "spread": max(values) - min(values)}

    return {"korean_top1": {n: stat([r["korean"][n] for r in runs]) for n in runs[0]["korean"]},
            "new_vs_old_top1": stat([r["new_vs_old"] for r in runs]), "old_vs_old_top1": runs[0]["old_vs_old"],
            "negative_flip_rate": stat([r["nfr"] for r in runs]),
            "edges_vs_old_top1": statistics.mean(statistics.mean(r["edges_vs_old"].values()) for r in runs),
            "train_s": statistics.mean(r["seconds"] for r in runs)}


def report(rows: dict, names: list[str], title: str) -> None:
    def cell(stat):
        return f"{stat['mean']:.3f} ({stat['spread']:.3f})"

    print(f"\n{title}")
    print(f"{'method':24} " + " ".join(f"{'Korean top-1 ' + n:>22}" for n in names) +
          f" {'M[new][old]':>16} {'M[old][old]':>11} {'NFR vs old':>16} {'edges vs old':>14} {'s/run':>6}")
    for method, runs in rows.items():
        got = method_figures(runs)
        print(f"{method:24} " + " ".join(f"{cell(got['korean_top1'][n]):>22}" for n in names) +
              f" {cell(got['new_vs_old_top1']):>16} {got['old_vs_old_top1']:11.3f} "
              f"{cell(got['negative_flip_rate']):>16} {got['edges_vs_old_top1']:14.3f} {got['train_s']:6.0f}",
              flush=True)


def write_records(rows: dict, args, passes: int) -> None:
    """One record per method, over the seeds done so far (rewritten after every round)."""
    for method, runs in rows.items():
        records.write("lqf_update", records.key_of(method, f"{passes}passes", quick=args.quick),
                      method_figures(runs), wall_s=sum(r["seconds"] for r in runs), seeds=list(range(len(runs))),
                      quick=args.quick, method=method, passes=passes, lr=args.lr, compat_weight=args.compat_weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced recipe (QUICK) for the old family: a smoke "
                                                             "test, never a result")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the update set (default: 10, "
                        "--quick 5)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the fine-tuning baselines")
    parser.add_argument("--compat-weight", type=float, default=0.0, help="LQF's compat term to the old cloud")
    parser.add_argument("--work", help="keep data and the old family here (reused when present)")
    args = parser.parse_args()
    recipe = QUICK if args.quick else FULL
    epochs = args.epochs or recipe["passes"]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        test = {a: range(1, 21) for a in OMNIGLOT_TEST_ALPHABETS}  # the standard test split, whole
        old_data = extract(work / f"old-data-{len(recipe['old_drawers'])}",
                           {**{a: recipe["old_drawers"] for a in OLD_ALPHABETS}, **test})
        new_data = extract(work / "update-data-5", {NEW: UPDATE_DRAWERS, **test})
        korean_data = extract(work / "korean-data", {NEW: range(6, 21)})
        old_dir = work / ("old-quick" if args.quick else "old")
        started = time.perf_counter()
        if not (old_dir / "manifest.json").is_file():
            train(parse_config(config(recipe, old_data, mode="sequential", epochs=recipe["epochs"],
                                      edge_epochs=recipe["edge_epochs"], lr=5e-3), "old"), old_dir,
                  progress=False, overwrite=True)
        old_seconds = time.perf_counter() - started
        old = FamilyStore.open(old_dir)
        load_size = max(m["input_size"] for m in recipe["members"])
        update_cfg = parse_config(config(recipe, new_data, mode="joint", epochs=epochs), "update")
        split = load_split(update_cfg.data, load_size)  # test: the standard test alphabets
        korean = read_image_tree(korean_data, load_size, strip_top_level=True)
        old_cloud = old.load_member(old.cloud.name)

        methods = {
            "LQF": dict(mode="lqf", previous=str(old_dir), lqf={"compat_weight": args.compat_weight}),
            "fine-tuning": dict(mode="joint", init=str(old_dir), lr=args.lr),
            "fine-tuning + backward": dict(mode="backward", previous=str(old_dir), init=str(old_dir), lr=args.lr),
        }
        names = [m.name for m in old.members]
        title = (f"LQF update, Omniglot {'--quick' if args.quick else 'full'}: old family on "
                 f"{', '.join(OLD_ALPHABETS)} ({old_seconds:.0f} s{' (reused)' if old_seconds < 1 else ''}), updated "
                 f"with drawers 1-5 of {NEW}'s {len(korean.class_names)} characters, {epochs} passes; mean over "
                 f"{args.seeds} seeds (spread max-min)")
        rows = {"no update": [dict(korean=korean_top1(old, korean),
                                   **old_gallery_figures({m.name: old.load_member(m.name) for m in old.members},
                                                         old_cloud, split), seconds=0.0)]}
        for seed in range(args.seeds):  # every method once per round: a run cut short still compares them all
            for method, settings in methods.items():
                cfg = parse_config(config(recipe, new_data, epochs=epochs, seed=seed, **settings), method)
                started = time.perf_counter()
                store = train(cfg, work / f"{method.replace(' ', '')}-{seed}", progress=False, overwrite=True)
                seconds = time.perf_counter() - started
                members = {m.name: store.load_member(m.name) for m in store.members}
                rows.setdefault(f"{method} (merged)" if method == "LQF" else method, []).append(dict(
                    korean=korean_top1(store, korean), **old_gallery_figures(members, old_cloud, split),
                    seconds=seconds))
                if method == "LQF":
                    linear = LinearisedStore(store)
                    rows.setdefault("LQF (linearised)", []).append(dict(
                        korean=korean_top1(linear, korean), **old_gallery_figures(linear.models, old_cloud, split),
                        seconds=seconds))
                print(f"{method} seed {seed}: {seconds:.0f} s", flush=True)
            report(rows, names, title + f" (after seed {seed})")
            write_records(rows, args, epochs)

    report(rows, names, title)


if __name__ == "__main__":
    main()
