"""The default Omniglot recipe against the earlier one, over seeds and both precisions, one run at a time.

    python benchmarks/recipe_seeds.py run                      # every missing cell of both recipes (many hours)
    python benchmarks/recipe_seeds.py run --recipes current --precisions fp32 --seeds 0 1 2
    python benchmarks/recipe_seeds.py run --recipes views8 edges60 --precisions fp32   # edge-phase levers
    python benchmarks/recipe_seeds.py run --quick --seeds 0    # a sixth of the epochs: a smoke test
    python benchmarks/recipe_seeds.py summary                  # mean and spread per recipe, precision, member

A cell is one recipe (``current``: examples/omniglot.yaml as it is; ``earlier``: 30 + 60 epochs, per-image
augmentation, no teacher cache; or one of the edge-phase levers below, which start from ``current``'s cloud
phase), one precision (``fp32``: ``train.amp=off``; ``bf16``: ``train.amp=bf16``,
emulated and slow on a CPU without native bf16) and one seed.  Each cell trains into
``runs/recipe_seeds/<cell>`` with ``hetero train`` (resumed from its last finished epoch if a session ended
in the middle), evaluates on the test split and writes a record to ``benchmarks/results/recipe_seeds/``.
Cells whose record is current are skipped, so the command continues where it stopped.  Training seconds
are the sum over the sessions that trained the cell, kept beside the run while it trains.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import records  # noqa: E402
from hetero.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "examples/omniglot.yaml"
RUNS = ROOT / "runs" / "recipe_seeds"
BENCHMARK = "recipe_seeds"
# The current recipe with one edge-phase lever changed each (issue 32: which time-to-quality lever costs the
# edges their points).  A lever differs from `current` only in the edge phase, so it starts from `current`'s
# cloud phase of the same precision and seed on this machine (trained once, kept beside the runs): the same
# cloud, so a lever's edges compare with `current`'s seed by seed, and its training seconds count that cloud
# phase too, as if it had trained alone.
EDGE_LEVERS = {
    "views8": ["train.teacher_cache.views=8"],  # twice the cached views (each a view and its matching input)
    "views16": ["train.teacher_cache.views=16"],
    "edges60": ["train.edge_epochs=60"],  # the earlier recipe's edge epochs, through the same 4-view cache
}
RECIPES = {
    "current": [],
    # examples/omniglot.yaml before the time-to-quality work (commit 811f774 and before)
    "earlier": ["data.augment_batched=false", "train.epochs=30", "train.edge_epochs=60", "train.teacher_cache=null"],
    **EDGE_LEVERS,
}
PRECISIONS = {"fp32": "train.amp='off'", "bf16": "train.amp=bf16"}
SUMMARY_FIELDS = ("machine", "recipe", "precision", "seeds", "train_s")  # a summary row's fields besides members


def cell_key(recipe: str, precision: str, seed: int, quick: bool) -> str:
    """One record per machine, too: a seed measured on another machine is another cell, never a match."""
    return f"{records.machine_tag(records.machine())}-{recipe}-{precision}-seed{seed}" + ("-quick" if quick else "")


def overrides_of(recipe: str, precision: str, seed: int) -> list[str]:
    return [*RECIPES[recipe], PRECISIONS[precision], f"train.seed={seed}"]


class TrainingClock:
    """Seconds spent training a cell, summed over sessions and saved every minute (a killed run keeps them)."""

    def __init__(self, path: Path, before: float = 0.0):
        self.path = path
        self.before = json.loads(path.read_text())["seconds"] if path.is_file() else before
        self.started = time.perf_counter()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._tick, daemon=True)

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"seconds": round(self.seconds(), 1)}))

    def _tick(self) -> None:
        while not self.stopped.wait(60):
            self._save()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self._save()


def cloud_phase_of(precision: str, seed: int, quick: bool) -> Path:
    """Where `current`'s training state after its cloud phase is kept (with its training seconds beside it)."""
    return RUNS / f"{cell_key('current', precision, seed, quick)}.cloud-phase.pt"


def run_cell(recipe: str, precision: str, seed: int, quick: bool, timing_shared: bool = False) -> Path:
    import shutil

    from hetero.evaluate import evaluate
    from hetero.family import TRAIN_STATE, FamilyStore
    from hetero.training import train

    key, overrides = cell_key(recipe, precision, seed, quick), overrides_of(recipe, precision, seed)
    config = load_config(str(ROOT / RECIPE), overrides)
    if quick:
        config.train.epochs = max(1, config.train.epochs // 6)
        config.train.edge_epochs = max(1, (config.train.edge_epochs or config.train.epochs) // 6)
    out = RUNS / key
    clock_file = RUNS / f"{key}.seconds.json"
    cloud_phase = cloud_phase_of(precision, seed, quick)
    trained = (out / "manifest.json").is_file()
    if not trained:
        resume = (out / TRAIN_STATE).is_file()
        start_from, before = None, 0.0
        if recipe in EDGE_LEVERS and not resume:
            if not cloud_phase.is_file():
                print(f"{key}: starts from `current`'s cloud phase, which is trained first", flush=True)
                if (RUNS / cell_key("current", precision, seed, quick) / "manifest.json").is_file():
                    raise SystemExit(f"{RUNS / cell_key('current', precision, seed, quick)} was trained without "
                                     f"keeping its cloud phase ({cloud_phase.name}): remove it to train it again")
                run_cell("current", precision, seed, quick)
            start_from = cloud_phase
            before = json.loads(cloud_phase.with_suffix(".seconds.json").read_text())["seconds"]

        with TrainingClock(clock_file, before) as clock:
            def keep_cloud_phase(end):
                if recipe == "current" and end.phase == 0 and end.phase_done:
                    shutil.copy(end.out / TRAIN_STATE, cloud_phase)
                    cloud_phase.with_suffix(".seconds.json").write_text(json.dumps({"seconds": clock.seconds()}))

            print(f"[{time.strftime('%H:%M:%S')}] {key}: {'resuming' if resume else 'training'} into {out}"
                  + (f" from {start_from.name}" if start_from else ""), flush=True)
            train(config, out, resume=resume, overwrite=not resume and out.exists(), progress=False,
                  callbacks=[keep_cloud_phase], start_from=start_from)
    seconds = json.loads(clock_file.read_text())["seconds"] if clock_file.is_file() else None
    store = FamilyStore.open(out)
    report = evaluate(store)
    matrix, cloud = report["matrix"], report["cloud"]
    figures = {"top1_vs_cloud_gallery": {m: matrix[m][cloud]["top1"] for m in matrix},
               "top1_own_gallery": {m: matrix[m][m]["top1"] for m in matrix},
               "train_s": seconds, "epochs": [config.train.epochs, config.train.edge_epochs],
               "amp_bf16": store.manifest.training.amp_bf16}
    path = records.write(BENCHMARK, key, figures, wall_s=seconds or 0.0, recipe=RECIPE, overrides=overrides,
                         seeds=[seed], quick=quick, recipe_name=recipe, precision=precision,
                         cloud_phase_from="current" if recipe in EDGE_LEVERS else None, timing_shared=timing_shared)
    print(f"[{time.strftime('%H:%M:%S')}] {key}: {json.dumps(figures['top1_vs_cloud_gallery'])} -> {path}",
          flush=True)
    return path


def is_current(record: dict | None) -> bool:
    return bool(record) and record.get("config_hash") == records.config_hash(record["recipe"], record["overrides"])


def summary(quick: bool) -> list[dict]:
    """Mean and spread (max - min) of each member's top-1 against the cloud gallery, per machine, recipe and
    precision (seeds are compared on one machine only)."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for record in records.read_all(BENCHMARK):
        if record["quick"] == quick and is_current(record):
            cell = (records.machine_tag(record["machine"]), record["recipe_name"], record["precision"])
            groups.setdefault(cell, []).append(record)
    rows = []
    for (machine, recipe, precision), found in sorted(groups.items()):
        members = found[0]["figures"]["top1_vs_cloud_gallery"]
        row = {"machine": machine, "recipe": recipe, "precision": precision,
               "seeds": sorted(r["seeds"][0] for r in found),
               "train_s": _mean_or_none([r["figures"]["train_s"] for r in found if not r.get("timing_shared")])}
        for member in members:
            values = [r["figures"]["top1_vs_cloud_gallery"][member] for r in found]
            row[member] = (statistics.mean(values), max(values) - min(values))
        rows.append(row)
    return rows


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["run", "summary"])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=["current", "earlier"])
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="a sixth of the epochs: a smoke test, never a result")
    parser.add_argument("--timing-shared", action="store_true",
                        help="the cells' training shared the CPU with other jobs: their train seconds are recorded "
                             "as measured but left out of the summary's mean train time (a cell already trained "
                             "is only evaluated and recorded again)")
    args = parser.parse_args(argv)
    if args.mode == "run":
        for precision in args.precisions:
            for recipe in args.recipes:
                for seed in args.seeds:
                    key = cell_key(recipe, precision, seed, args.quick)
                    record = records.read(BENCHMARK, key)
                    if is_current(record) and record.get("timing_shared", False) >= args.timing_shared:
                        print(f"{key}: record is current, skipped")
                        continue
                    run_cell(recipe, precision, seed, args.quick, args.timing_shared)
    for row in summary(args.quick):
        members = [k for k in row if k not in SUMMARY_FIELDS]
        cells = ", ".join(f"{m} {row[m][0]:.4f} (spread {row[m][1] * 100:.1f} pts)" for m in members)
        print(f"{row['machine']} {row['recipe']:8s} {row['precision']:5s} seeds {row['seeds']}: {cells}; "
              "train " + ("-" if row["train_s"] is None else f"{row['train_s']:.0f} s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
