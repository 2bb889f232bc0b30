"""Where a training step's time goes, per phase, from torch.profiler.

    python benchmarks/train_profile.py                                  # examples/omniglot.yaml, ~3 minutes
    python benchmarks/train_profile.py --config examples/quickstart.yaml --steps 6
    python benchmarks/train_profile.py --set train.teacher_cache.views=2   # a lever's profile (dotted keys)

For each phase of the config (sequential: the cloud phase, then the edge phase) it builds the run exactly as
`hetero train` does, takes `--warmup` untimed steps, then profiles `--steps` steps of the real training
step (`TrainingRun.train_step`).  Parts are the labelled ranges of hetero/training/run.py
(torch.profiler.record_function) plus the DataLoader's own range (decoding is cached, so that is augmentation and collation):

- each member's forward, and its loss terms, come from their ranges;
- the backward pass is split between those ranges: an autograd node carries the sequence number of the
  forward op that made it, and that op sits inside one labelled range;
- "other" is the step's wall time not inside any range (Python glue, `loss.item()`, zero_grad).

Times are CPU wall milliseconds per step (median of per-step sums over the profiled steps is not available
from the profiler, so the mean is reported), with the profiler's own overhead included; the total is also
timed without the profiler.  Run on a quiet machine: other processes' load shows up as time.

One record per phase (``benchmarks/results/train_profile/<config>[-<overrides>]-phase<n>.json``): ms per step
of each part, the profiled and unprofiled step, and seconds per epoch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from itertools import islice
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LOADER = "enumerate(DataLoader)"
sys.path.insert(0, str(ROOT / "benchmarks"))
import records  # noqa: E402


def range_name(name: str) -> str | None:
    """The part a profiler range stands for, or None for an op or a range of torch's own."""
    if name.startswith(LOADER):
        return "decode + augment (loader)"
    if name in ("matching inputs", "backward", "optimizer") or name.endswith((" forward", " loss terms")) \
            or name.startswith(("cloud forward", "reference forward")):
        return name
    return None


def enclosing_range(event) -> str | None:
    while event is not None:
        found = range_name(event.name)
        if found:
            return found
        event = event.cpu_parent
    return None


def attribute(events) -> dict[str, float]:
    """Milliseconds per labelled range, the backward pass split by the range of each node's forward op."""
    totals: dict[str, float] = defaultdict(float)
    owner_of_node: dict[int, str] = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::engine"):
            owner = enclosing_range(event)
            if owner and owner != "backward":
                owner_of_node.setdefault(event.sequence_nr, owner)
    for event in events:
        part = range_name(event.name)
        if part and part != "backward" and enclosing_range(event.cpu_parent) is None:
            totals[part] += event.cpu_time_total / 1e3
        elif event.name.startswith("autograd::engine::evaluate_function") and event.sequence_nr >= 0:
            owner = owner_of_node.get(event.sequence_nr, "unattributed")
            member = owner.removesuffix(" forward").removesuffix(" loss terms")
            kind = "loss terms" if owner.endswith("loss terms") else "forward"
            totals[f"{member} backward (of its {kind})"] += event.cpu_time_total / 1e3
    return totals


def profile_phase(run, phase: int, trained: list[str], steps: int, warmup: int) -> tuple[dict, float, float]:
    """(ms per step per part, profiled ms per step, unprofiled ms per step) for one phase."""
    from torch.profiler import ProfilerActivity, profile

    model = run.enter_phase(phase, trained)
    run.start_epoch(trained, epoch=1)
    lr = run.train_cfg.lr
    batches = iter(_endless(run))
    for batch in islice(batches, warmup):
        run.train_step(model, trained, batch, lr)
    plain = []
    for _ in range(steps):
        started = time.perf_counter()
        run.train_step(model, trained, next(batches), lr)
        plain.append(time.perf_counter() - started)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run.train_step(model, trained, next(batches), lr)
    profiled = (time.perf_counter() - started) / steps * 1e3
    parts = {k: v / steps for k, v in attribute(prof.events()).items()}
    return parts, profiled, statistics.median(plain) * 1e3


def _endless(run):
    while True:
        yield from run.epoch_loader()


def main(argv=None) -> int:
    from rich.console import Console
    from rich.table import Table

    from hetero.config import load_config
    from hetero.data import load_split
    from hetero.training import TrainingRun, resolve_external_input_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "omniglot.yaml"))
    parser.add_argument("--steps", type=int, default=12, help="profiled steps per phase")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per phase first")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted, e.g. train.batch_size=128); repeatable")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = load_config(args.config, args.set)
    resolve_external_input_size(config)
    console = Console(width=110)
    began = time.time()
    split = load_split(config.data, config.load_size)
    with tempfile.TemporaryDirectory() as out:
        run = TrainingRun(config, Path(out), split, progress=False)
        console.print(f"{args.config} {' '.join(args.set)}: batch {run.batch_size}, {run.steps_per_epoch} steps per "
                      f"epoch, {torch.get_num_threads()} threads, amp {run.amp}, channels-last {run.channels_last}")
        for phase, (trained, epochs) in enumerate(run.phases):
            started = time.perf_counter()
            parts, profiled, plain = profile_phase(run, phase, trained, args.steps, args.warmup)
            table = Table(title=f"phase {phase + 1}: training {', '.join(trained)} ({epochs} epochs); "
                                f"{plain:.0f} ms per step unprofiled, {plain * run.steps_per_epoch / 1e3:.1f} s "
                                f"per epoch")
            for column in ("part", "ms / step", "share"):
                table.add_column(column, justify="left" if column == "part" else "right")
            parts["other (glue, item(), zero_grad)"] = max(0.0, profiled - sum(parts.values()))
            for name, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
                table.add_row(name, f"{ms:.1f}", f"{ms / profiled:.0%}")
            table.add_row("total (profiled)", f"{profiled:.1f}", "100%")
            console.print(table)
            figures = {"trained": trained, "epochs": epochs, "batch": run.batch_size,
                       "steps_per_epoch": run.steps_per_epoch, "unprofiled_ms_per_step": plain,
                       "s_per_epoch": plain * run.steps_per_epoch / 1e3, "profiled_ms_per_step": profiled,
                       "parts_ms_per_step": dict(sorted(parts.items(), key=lambda kv: -kv[1]))}
            records.write("train_profile", records.key_of(Path(args.config).stem, *args.set, f"phase{phase + 1}"),
                          figures, wall_s=time.perf_counter() - started, recipe=records.relative(args.config),
                          overrides=args.set, seeds=[config.train.seed], steps=args.steps, warmup=args.warmup,
                          amp=run.amp, channels_last=run.channels_last)
    console.print(f"took {time.time() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
