"""Time to quality: each training lever's seconds per epoch side by side, the recipes' figures, and scaling.

    python benchmarks/time_to_quality.py levers            # Omniglot, ~6 minutes; --compile adds torch.compile
    python benchmarks/time_to_quality.py scaling           # s/epoch vs training images (x1, x2) and edges (1, 2, 4)
    python benchmarks/time_to_quality.py recipes           # trains the earlier and today's recipe in full
    python benchmarks/time_to_quality.py recipes --quick   # the same at a sixth of the epochs (a smoke test)

levers: every lever is a set of config overrides on examples/omniglot.yaml.  Each gets its own training run
(`hetero.training.TrainingRun`, built as `hetero train` builds it, on one shared data split), and the rounds
interleave them: round r times --steps real training steps of each lever's cloud phase and edge phase in
turn, so load from other processes hits every lever alike.  A lever's seconds per epoch are the median
step time over rounds times its steps per epoch; one-off costs (the teacher cache's build, compilation)
are timed once and listed apart.  Its recipe seconds are epochs x seconds per epoch + one-off costs, for
the epochs of the recipe it belongs to (the earlier recipe's 30 + 60, or the current one's).

recipes: trains examples/omniglot.yaml as it was (the "earlier" overrides below) and as it is, one after
the other, evaluates both on the test split and prints M[cloud][cloud], M[edge][cloud] and the training
wall seconds of each.  Two full trainings take about 40 minutes on a quiet 2-core machine.

Records (``benchmarks/results/time_to_quality/``): one per lever (``<config>-levers-<lever>``), per scaling
case (``<config>-scaling-<images>images-<edges>edges``) and per recipe (``<config>-recipes-<name>[-quick]``),
each with its overrides of the config as the recipe's.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hetero.config import load_config  # dotted overrides (--set), validated like a config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import records  # noqa: E402

BENCHMARK = "time_to_quality"
OMNIGLOT = ROOT / "examples" / "omniglot.yaml"
# examples/omniglot.yaml before the time-to-quality work: per-image augmentation, 30 + 60 epochs, no cache.
EARLIER = ["data.augment_batched=false", "train.epochs=30", "train.edge_epochs=60", "train.teacher_cache=null"]
LEVERS = {
    "earlier recipe (per-image augmentation)": EARLIER,
    "batched augmentation": EARLIER[1:],
    "+ channels-last": EARLIER[1:] + ["train.channels_last='on'"],
    "+ 2 loader workers": EARLIER[1:] + ["train.workers=2"],
    "+ batch 128": EARLIER[1:] + ["train.batch_size=128"],
    "+ teacher cache, 4 views": EARLIER[1:3] + ["train.teacher_cache={views: 4}"],
    "current recipe (examples/omniglot.yaml)": [],
}
COMPILE = {"+ torch.compile": EARLIER[1:] + ["train.compile=true"]}


class Timed:
    """One lever's training run and an endless stream of its batches, per phase."""

    def __init__(self, name: str, overrides: list[str], split, out: Path, config_path: str):
        from hetero.training import TrainingRun

        self.name, self.overrides, self.config = name, overrides, load_config(config_path, overrides)
        self.run = TrainingRun(self.config, out, split, progress=False)
        self.step_seconds: dict[int, list[float]] = {0: [], 1: []}
        self.one_off = 0.0
        self.models, self.batches = {}, {}

    def enter(self, phase: int):
        trained = self.run.phases[phase][0]
        started = time.perf_counter()
        self.models[phase] = self.run.enter_phase(phase, trained)  # builds the teacher cache, if any
        self.one_off += time.perf_counter() - started
        self.run.start_epoch(trained, epoch=1)
        self.batches[phase] = self._endless()

    def _endless(self):
        while True:
            yield from self.run.epoch_loader()

    def steps(self, phase: int, steps: int, timed: bool = True) -> None:
        trained = self.run.phases[phase][0]
        if phase not in self.models:
            self.enter(phase)
        for _ in range(steps):
            started = time.perf_counter()
            self.run.train_step(self.models[phase], trained, next(self.batches[phase]), self.run.train_cfg.lr)
            if timed:
                self.step_seconds[phase].append(time.perf_counter() - started)
            else:
                self.one_off += time.perf_counter() - started

    def epoch_seconds(self, phase: int) -> float:
        return statistics.median(self.step_seconds[phase]) * self.run.steps_per_epoch

    def recipe_seconds(self) -> float:
        return sum(self.epoch_seconds(p) * epochs for p, (_, epochs) in enumerate(self.run.phases)) + self.one_off

    def figures(self) -> dict:
        phases = self.run.phases
        return {"batch": self.run.batch_size, "epochs": [e for _, e in phases], "one_off_s": self.one_off,
                "cloud_phase_s_per_epoch": self.epoch_seconds(0),
                "edge_phase_s_per_epoch": self.epoch_seconds(1) if len(phases) > 1 else None,
                "recipe_s": self.recipe_seconds()}


def time_side_by_side(levers: dict[str, list[str]], config_path: str, split, steps: int, rounds: int,
                      warmup: int, tmp: Path) -> list[Timed]:
    timed = [Timed(name, overrides, split, tmp / f"lever{i}", config_path) for i, (name, overrides)
             in enumerate(levers.items())]
    interleave(timed, steps, rounds, warmup)
    return timed


def interleave(timed: list[Timed], steps: int, rounds: int, warmup: int) -> None:
    """Phase by phase: warm every lever up, then rounds that give each lever `steps` timed steps in turn."""
    for phase in (0, 1):
        present = [lever for lever in timed if phase < len(lever.run.phases)]
        for lever in present:
            lever.steps(phase, warmup, timed=False)  # first steps: allocator, oneDNN kernels, compilation
        for _ in range(rounds):
            for lever in present:
                lever.steps(phase, steps)


def print_levers(timed: list[Timed], console, config_path: str, wall_s: float) -> None:
    from rich.table import Table

    base = timed[0].recipe_seconds()
    table = Table(title="Seconds per epoch, side by side in one process (median step x steps per epoch)")
    for column in ("lever", "batch", "cloud phase s/epoch", "edge phase s/epoch", "one-off s", "epochs",
                   "recipe s", "vs earlier"):
        table.add_column(column, justify="left" if column == "lever" else "right")
    for lever in timed:
        figures = {**lever.figures(), "vs_earlier": base / lever.recipe_seconds()}
        table.add_row(lever.name, str(figures["batch"]),
                      *("-" if s is None else f"{s:.1f}" for s in (figures["cloud_phase_s_per_epoch"],
                                                                     figures["edge_phase_s_per_epoch"])),
                      f"{lever.one_off:.0f}", " + ".join(map(str, figures["epochs"])),
                      f"{figures['recipe_s']:.0f}", f"{figures['vs_earlier']:.2f}x")
        write_record(config_path, ["levers", lever.name], figures, wall_s, lever.overrides)
    console.print(table)


def write_record(config_path: str, cell: list, figures: dict, wall_s: float, overrides: list[str],
                 quick: bool = False, **extra) -> Path:
    """A record of one lever, scaling case or recipe, named by the config and the cell."""
    return records.write(BENCHMARK, records.key_of(Path(config_path).stem, *cell, quick=quick), figures,
                         wall_s=wall_s, recipe=records.relative(config_path), overrides=overrides, quick=quick,
                         **extra)


def doubled(split):
    """The split with every training image added again rotated by 90 degrees, as a class of its own."""
    from hetero.data import ImageSet

    train = split.train
    rotated = ImageSet(torch.rot90(train.images, 1, dims=(-2, -1)), train.labels + len(train.class_names),
                       [f"{c}/rot90" for c in train.class_names], [f"{n}#rot90" for n in train.names])
    both = ImageSet(torch.cat([train.images, rotated.images]), torch.cat([train.labels, rotated.labels]),
                    train.class_names + rotated.class_names, train.names + rotated.names, train.skipped)
    out = copy.copy(split)
    out.train = both
    return out


def edges(count: int, config_path: str) -> list[str]:
    """Overrides giving the family `count` copies of the config's first edge member."""
    config = load_config(config_path, [])
    cloud, edge = config.family.cloud, next(m for m in config.family.members if m.role == "edge")
    spec = lambda m, name: (f"{{name: {name}, role: {m.role}, arch: {m.arch}, width: {m.width}, "  # noqa: E731
                            f"depth: {m.depth}, input_size: {m.input_size}}}")
    members = [spec(cloud, cloud.name)] + [spec(edge, f"edge-{i + 1}") for i in range(count)]
    return [f"family.members=[{', '.join(members)}]"]


def recipes(config_path: str, quick: bool, tmp: Path, console) -> None:
    from rich.table import Table

    from hetero.evaluate import evaluate
    from hetero.training import train

    rows = []
    for name, overrides in (("earlier", EARLIER), ("current", [])):
        config = load_config(config_path, overrides)
        if quick:
            config.train.epochs = max(1, config.train.epochs // 6)
            config.train.edge_epochs = max(1, (config.train.edge_epochs or config.train.epochs) // 6)
        started = time.perf_counter()
        store = train(config, tmp / name, progress=False)
        seconds = time.perf_counter() - started
        report = evaluate(store)
        rows.append((name, config, seconds, report))
        matrix, cloud = report["matrix"], report["cloud"]
        write_record(config_path, ["recipes", name], {
            "epochs": [config.train.epochs, config.train.edge_epochs], "train_s": seconds,
            "cloud_cloud_top1": matrix[cloud][cloud]["top1"],
            "edge_vs_cloud_top1": {m: matrix[m][cloud]["top1"] for m in matrix if m != cloud}},
            time.perf_counter() - started, overrides, quick=quick, seeds=[config.train.seed])
    table = Table(title="Recipes, trained one after the other" + (" (--quick: a sixth of the epochs)" if quick else ""))
    for column in ("recipe", "epochs", "train s", "M[cloud][cloud]", "M[edge][cloud] per edge"):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for name, config, seconds, report in rows:
        matrix, cloud = report["matrix"], report["cloud"]
        table.add_row(name, f"{config.train.epochs} + {config.train.edge_epochs}", f"{seconds:.0f}",
                      f"{matrix[cloud][cloud]['top1']:.4f}",
                      " / ".join(f"{m} {matrix[m][cloud]['top1']:.4f}" for m in matrix if m != cloud))
    console.print(table)
    console.print(f"training seconds, earlier / current: {rows[0][2] / rows[1][2]:.2f}x")


def main(argv=None) -> int:
    from rich.console import Console

    from hetero.data import load_split

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["levers", "scaling", "recipes"])
    parser.add_argument("--config", default=str(OMNIGLOT))
    parser.add_argument("--steps", type=int, default=4, help="timed steps per lever, phase and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per lever and phase first")
    parser.add_argument("--compile", action="store_true", help="levers: add torch.compile (minutes to compile)")
    parser.add_argument("--quick", action="store_true", help="recipes: a sixth of the epochs")
    args = parser.parse_args(argv)
    console = Console(width=130)
    began = time.time()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.mode == "recipes":
            recipes(args.config, args.quick, tmp, console)
        else:
            config = load_config(args.config, [])
            split = load_split(config.data, config.load_size)
            if args.mode == "levers":
                levers = {**LEVERS, **(COMPILE if args.compile else {})}
                timed = time_side_by_side(levers, args.config, split, args.steps, args.rounds, args.warmup, tmp)
                print_levers(timed, console, args.config, time.time() - began)
            else:
                scaling(args, split, tmp, console, began)
    console.print(f"took {time.time() - began:.0f} s on {torch.get_num_threads()} threads")
    return 0


def scaling(args, split, tmp: Path, console, began: float) -> None:
    from rich.table import Table

    table = Table(title="How the current recipe's time scales (seconds per epoch, side by side)")
    for column in ("training images", "edge members", "cloud phase s/epoch", "edge phase s/epoch"):
        table.add_column(column, justify="right")
    cases = [(split, 2), (doubled(split), 2), (split, 1), (split, 4)]
    timed = []
    for index, (data, count) in enumerate(cases):
        lever = Timed(f"{len(data.train)} images, {count} edges", edges(count, args.config), data,
                      tmp / f"scale{index}", args.config)
        timed.append((len(data.train), count, lever))
    interleave([lever for *_, lever in timed], args.steps, args.rounds, args.warmup)
    for images, count, lever in timed:
        table.add_row(str(images), str(count), f"{lever.epoch_seconds(0):.1f}", f"{lever.epoch_seconds(1):.1f}")
        figures = {"cloud_phase_s_per_epoch": lever.epoch_seconds(0), "edge_phase_s_per_epoch": lever.epoch_seconds(1)}
        write_record(args.config, ["scaling", f"{images}images", f"{count}edges"], figures, time.time() - began,
                     lever.overrides, training_images=images, edge_members=count)
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
