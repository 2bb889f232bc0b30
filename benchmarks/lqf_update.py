"""Updating a family on new characters without breaking its gallery: LQF against fine-tuning, on the full
family (issue 29).

The old family is examples/omniglot.yaml as it is (its cloud, edge-m and edge-s with `activation:
leaky_relu`, its epochs, teacher cache and losses), trained once on the training alphabets without Korean.
Every update then sees the same new characters, drawers 1-5 of Korean's 40, for the same number of passes
(`--passes`, default 10), each method once per seed:

- `no update`: the old family as it is;
- `lqf-compat0`: mode lqf, no pull towards the old cloud; `lqf-auto`: `compat_weight: auto`, each member's
  weight chosen on held-out images of the update's training data (never the test split), as hetero does it
  for a user.  Both are measured merged (w0 + dw, what is exported) and as the linearised model itself;
- `fine-tuning`: `train.init` the old family, mode joint, the recipe's losses, AdamW at a rate chosen per seed
  from FINE_TUNING_LRS as LQF's `auto` chooses its weight (fitted on drawers 1-4, scored on drawer 5; the
  search's CPU counts in the method's);
- `fine-tuning-backward`: the same with mode backward against the old cloud (BCT's terms);
- `backward-retrained`: a new family trained from scratch in mode backward against the old cloud, on the old
  and the new training characters, for the recipe's `epochs` (the alternative to an update: a retraining).

Columns: top-1 on Korean's other drawings (drawers 6-10 embedded by the method's cloud as gallery, drawers
11-20 as queries, by the cloud and by each edge); on the standard test alphabets, M[new][old] (the new
cloud's queries against the old cloud's gallery), the negative flip rate against that gallery and each
edge's top-1 against it; the CPU seconds of the update (this process's, every thread).

    python benchmarks/lqf_update.py run --seeds 0 1 2     # the full recipe: old family ~30 min, then per seed
                                                          # the updates (minutes) and the retraining (~30 min)
    python benchmarks/lqf_update.py run --quick --seeds 0 # a sixth of the epochs, 2 passes: a smoke test
    python benchmarks/lqf_update.py summary               # mean and spread over seeds, per method

One record per method and seed (``benchmarks/results/lqf_update/<method>-<passes>passes-seed<s>.json``), the
old family's under ``no-update``; a cell with a current record is skipped, so a run cut short goes on where
it stopped.  Data folders and families are kept in runs/lqf_update/.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import records  # noqa: E402
from recipe_seeds import is_current  # noqa: E402

BENCHMARK = "lqf_update"
RECIPE = "examples/omniglot.yaml"
RUNS = ROOT / "runs" / "lqf_update"
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"
OLD_ALPHABETS = ["Balinese", "Early_Aramaic", "Greek", "Latin"]  # the training alphabets without Korean
NEW = "Korean"
UPDATE_DRAWERS, GALLERY_DRAWERS, QUERY_DRAWERS = range(1, 6), range(6, 11), range(11, 21)
# The fine-tuning baselines' AdamW rates, one chosen per method and seed as LQF's `compat_weight: auto` is:
# fitted on drawers 1-4 of the update's characters, scored on drawer 5 (never the test split).
FINE_TUNING_LRS = [1e-3, 3e-4, 1e-4, 3e-5]
# Each update method: the overrides on the old family's recipe that make it (the data is set by run()).
METHODS = {
    "lqf-compat0": ["train.mode=lqf", "train.lqf.compat_weight=0.0"],
    "lqf-auto": ["train.mode=lqf", "train.lqf.compat_weight=auto"],
    "fine-tuning": ["train.mode=joint"],
    "fine-tuning-backward": ["train.mode=backward"],
    "backward-retrained": ["train.mode=backward"],
}


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


def data_folders() -> dict[str, Path]:
    test = {a: range(1, 21) for a in ("Japanese_(katakana)", "Sanskrit", "Tagalog")}  # the standard test split
    old = {a: range(1, 21) for a in OLD_ALPHABETS}
    return {"old": extract(RUNS / "data-old", {**old, **test}),
            "update": extract(RUNS / "data-update", {NEW: UPDATE_DRAWERS, **test}),
            "update-fit": extract(RUNS / "data-update-fit", {NEW: UPDATE_DRAWERS[:-1], **test}),
            "update-held": extract(RUNS / "data-update-held", {NEW: UPDATE_DRAWERS[-1:]}),
            "retrain": extract(RUNS / "data-retrain", {**old, NEW: UPDATE_DRAWERS, **test}),
            "korean": extract(RUNS / "data-korean", {NEW: range(6, 21)})}


def old_overrides(data: Path) -> list[str]:
    """The recipe's members with leaky ReLU (LQF linearises around them), on the old training alphabets."""
    from hetero.config import read_yaml

    members = [{**m, "activation": "leaky_relu"} for m in read_yaml(ROOT / RECIPE)["family"]["members"]]
    return [f"family.members={json.dumps(members)}", f"data.path={data}", "train.seed=0"]


def method_overrides(method: str, old_dir: Path, data: Path, seed: int, passes: int) -> list[str]:
    retrain = method == "backward-retrained"
    overrides = [*METHODS[method], f"data.path={data}", f"train.seed={seed}", "train.teacher_cache=null",
                 "train.edge_epochs=null"]
    if method != "fine-tuning":
        overrides.append(f"train.previous={old_dir}")
    if method.startswith("fine-tuning"):
        overrides.append(f"train.init={old_dir}")
    if not retrain:
        overrides.append(f"train.epochs={passes}")
    return overrides


def quickened(config, quick: bool):
    if quick:
        config.train.epochs = max(1, config.train.epochs // 6)
        config.train.edge_epochs = config.train.edge_epochs and max(1, config.train.edge_epochs // 6)
    return config


# --------------------------------------------------------------------------------------------- figures


def korean_top1(models: dict, cloud: str, korean) -> dict[str, float]:
    """Top-1 on Korean's other drawings: gallery (drawers 6-10) by the cloud, queries (11-20) by each member."""
    from hetero.maths import top1_correct
    from hetero.models import embed_images

    drawer = [int(n.rsplit("_", 1)[1].split(".")[0]) for n in korean.names]
    gallery = [i for i, d in enumerate(drawer) if d in GALLERY_DRAWERS]
    queries = [i for i, d in enumerate(drawer) if d in QUERY_DRAWERS]
    images, labels = korean.floats(), korean.labels
    cloud_gallery = embed_images(models[cloud], images[gallery])
    return {name: top1_correct(embed_images(model, images[queries]), labels[queries], cloud_gallery,
                               labels[gallery]).float().mean().item() for name, model in models.items()}


def old_gallery_figures(models: dict, cloud: str, old_cloud, split) -> dict:
    """M[new][old], M[old][old], the NFR of the new cloud's queries and each edge's top-1, against the old
    cloud's gallery of the test alphabets."""
    from hetero.evaluate import backward_summary
    from hetero.maths import compatibility_matrix
    from hetero.models import embed_images

    images = split.test.floats()
    embeddings = {name: embed_images(model, images) for name, model in models.items()}
    embeddings["old"] = embed_images(old_cloud, images)
    matrix = compatibility_matrix(embeddings, split.test.labels, split.query_index, split.gallery_index)
    summary = backward_summary(embeddings, split, cloud, "old", matrix)
    return {"new_vs_old": summary["new_vs_old_top1"], "old_vs_old": summary["old_vs_old_top1"],
            "nfr": summary["negative_flip_rate"],
            "edges_vs_old": {name: matrix[name]["old"]["top1"] for name in models if name != cloud}}


def held_out_score(store, old_cloud, folders: dict[str, Path]) -> float:
    """What LQF's `compat_weight: auto` maximises, for a whole family: the mean over members of the mean of two
    top-1s of the held-out drawing (drawer 5) of each update character, against the fitted drawings (1-4)
    embedded by the updated cloud and by the old one."""
    from hetero.data import read_image_tree
    from hetero.maths import top1_correct
    from hetero.models import embed_images

    size = max(m.input_size for m in store.members)
    fit = read_image_tree(folders["update-fit"] / "omniglot" / NEW, size)
    held = read_image_tree(folders["update-held"] / "omniglot" / NEW, size)
    assert fit.class_names == held.class_names, "the fitted and held-out drawings name the same characters"
    new_cloud = store.load_member(store.cloud.name)
    galleries = [embed_images(new_cloud, fit.floats()), embed_images(old_cloud, fit.floats())]
    scores = []
    for member in store.members:
        queries = embed_images(store.load_member(member.name), held.floats())
        scores += [top1_correct(queries, held.labels, gallery, fit.labels).float().mean().item()
                   for gallery in galleries]
    return sum(scores) / len(scores)


def choose_lr(method: str, old_dir: Path, base: list[str], folders: dict[str, Path], seed: int, passes: int,
              old_cloud) -> tuple[float, dict[str, float]]:
    """A fine-tuning baseline's rate from FINE_TUNING_LRS by held_out_score (ties: the smaller rate)."""
    from hetero.config import load_config
    from hetero.training import train

    scores = {}
    for lr in FINE_TUNING_LRS:
        overrides = base + method_overrides(method, old_dir, folders["update-fit"], seed, passes) + [f"train.lr={lr:.10f}"]
        store = train(load_config(str(ROOT / RECIPE), overrides), RUNS / "lr-search" / f"{method}-seed{seed}-{lr:g}",
                      overwrite=True, progress=False)
        scores[f"{lr:g}"] = held_out_score(store, old_cloud, folders)
    best = max(FINE_TUNING_LRS, key=lambda lr: (scores[f"{lr:g}"], -lr))
    print(f"[{time.strftime('%H:%M:%S')}] {method} seed {seed}: lr {best:g} chosen on held-out drawings "
          f"({', '.join(f'{k} {v:.4f}' for k, v in scores.items())})", flush=True)
    return best, scores


def figures_of(models: dict, cloud: str, context: dict) -> dict:
    return {"korean_top1": korean_top1(models, cloud, context["korean"]),
            **old_gallery_figures(models, cloud, context["old_cloud"], context["split"])}


# ------------------------------------------------------------------------------------------------- run


def train_old(folders: dict[str, Path], quick: bool) -> tuple[Path, list[str]]:
    """The old family (trained once, resumed if cut short) and the overrides that made it."""
    from hetero.config import load_config
    from hetero.family import TRAIN_STATE
    from hetero.training import train

    overrides = old_overrides(folders["old"])
    out = RUNS / ("old-quick" if quick else "old")
    if not (out / "manifest.json").is_file():
        resume = (out / TRAIN_STATE).is_file()
        print(f"[{time.strftime('%H:%M:%S')}] old family: {'resuming' if resume else 'training'} into {out}",
              flush=True)
        train(quickened(load_config(str(ROOT / RECIPE), overrides), quick), out, resume=resume,
              overwrite=not resume and out.exists(), progress=False)
    return out, overrides


def run(seeds: list[int], passes: int, quick: bool) -> None:
    from hetero.config import load_config
    from hetero.data import read_image_tree
    from hetero.family import FamilyStore
    from hetero.training import train
    from hetero.training.lqf import load_linearised

    passes = 2 if quick else passes
    folders = data_folders()
    old_dir, base = train_old(folders, quick)
    old = FamilyStore.open(old_dir)
    cloud = old.cloud.name
    context = {"split": old.split(), "old_cloud": old.load_member(cloud),
               "korean": read_image_tree(folders["korean"], max(m.input_size for m in old.members),
                                         strip_top_level=True)}
    key = records.key_of("no-update", quick=quick)
    if not is_current(records.read(BENCHMARK, key)):
        figures = figures_of({m.name: old.load_member(m.name) for m in old.members}, cloud, context)
        records.write(BENCHMARK, key, {**figures, "cpu_s": 0.0}, wall_s=0.0, recipe=RECIPE, overrides=base,
                      seeds=[0], quick=quick, method="no update", passes=0)
    for seed in seeds:  # every method once per seed: a run cut short still compares them all
        for method in METHODS:
            key = records.key_of(method, f"{passes}passes", f"seed{seed}", quick=quick)
            retrain = method == "backward-retrained"
            overrides = base + method_overrides(method, old_dir, folders["retrain" if retrain else "update"], seed,
                                                passes)
            record = records.read(BENCHMARK, key)
            if is_current(record) and record["overrides"][:len(overrides)] == overrides:  # the same method
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {key}", flush=True)
            started, cpu = time.perf_counter(), time.process_time()
            extra = {}
            if method.startswith("fine-tuning"):  # the rate is part of the method's cost, as LQF's auto search is
                lr, extra["lr_search"] = choose_lr(method, old_dir, base, folders, seed, passes, context["old_cloud"])
                overrides.append(f"train.lr={lr:.10f}")
            config = quickened(load_config(str(ROOT / RECIPE), overrides), quick and retrain)
            store = train(config, RUNS / key, overwrite=True, progress=False)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - started
            members = {m.name: store.load_member(m.name) for m in store.members}
            figures = {**figures_of(members, cloud, context), "cpu_s": cpu, **extra}
            if method.startswith("lqf"):
                linearised = {name: load_linearised(store, name) for name in members}
                figures["linearised"] = figures_of(linearised, cloud, context)
                figures["compat_weights"] = {f["member"]: f["compat_weight"] for f in store.manifest.training.lqf}
            records.write(BENCHMARK, key, figures, wall_s=wall, recipe=RECIPE, overrides=overrides, seeds=[seed],
                          quick=quick, method=method, passes=passes)
            print(f"[{time.strftime('%H:%M:%S')}] {key}: NFR {figures['nfr']:.4f}, M[new][old] "
                  f"{figures['new_vs_old']:.4f}, Korean {figures['korean_top1']}, {cpu:.0f} CPU s", flush=True)


# ------------------------------------------------------------------------------------------ over seeds


# Each column: (name, how it is read from a record's figures).
COLUMNS = [
    ("Korean top-1, cloud", lambda f: f["korean_top1"]["cloud"]),
    ("Korean top-1, edges (mean)", lambda f: _mean_of_edges(f["korean_top1"])),
    ("M[new][old]", lambda f: f["new_vs_old"]),
    ("NFR vs old gallery", lambda f: f["nfr"]),
    ("edges vs old gallery (mean)", lambda f: statistics.mean(f["edges_vs_old"].values())),
    ("CPU s per update", lambda f: f["cpu_s"]),
]


def _mean_of_edges(per_member: dict) -> float:
    return statistics.mean(v for k, v in per_member.items() if k != "cloud")


def summary(found: list[dict], quick: bool = False) -> list[dict]:
    """Per method (and each LQF method's linearised model): each column's mean and spread (max - min) over
    the seeds of its current records."""
    groups: dict[str, list[dict]] = {}
    for record in found:
        if record["quick"] == quick and is_current(record):
            groups.setdefault(record["method"], []).append(record["figures"])
            if "linearised" in record["figures"]:
                groups.setdefault(f"{record['method']} (linearised)", []).append(
                    {**record["figures"]["linearised"], "cpu_s": record["figures"]["cpu_s"]})
    order = ["no update", *[m for name in METHODS for m in (name, f"{name} (linearised)")]]
    rows = []
    for method in sorted(groups, key=lambda m: order.index(m) if m in order else len(order)):
        row = {"method": method, "seeds": len(groups[method])}
        for name, read in COLUMNS:
            values = [read(f) for f in groups[method]]
            row[name] = (statistics.mean(values), max(values) - min(values))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run", help="the old family (once), then every method per seed")
    go.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    go.add_argument("--passes", type=int, default=10, help="passes over the update set (LQF: CG iterations)")
    go.add_argument("--quick", action="store_true", help="a sixth of the epochs, 2 passes: a smoke test")
    show = commands.add_parser("summary", help="mean and spread over seeds, per method")
    show.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.command == "run":
        run(args.seeds, args.passes, args.quick)
    for row in summary(records.read_all(BENCHMARK), args.quick):
        print(f"{row['method']:32} seeds {row['seeds']}: " + ", ".join(
            f"{name} {mean:.4f} (spread {spread:.4f})" for name, (mean, spread) in
            ((n, row[n]) for n, _ in COLUMNS)), flush=True)


if __name__ == "__main__":
    main()
