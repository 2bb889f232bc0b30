"""Training images/s: the family trained jointly vs the same members trained one after the other.

    python benchmarks/train_throughput.py                                # examples/omniglot.yaml if its data is here
    python benchmarks/train_throughput.py --config examples/quickstart.yaml --steps 10 --repeats 3

Both ways run the same steps on the same data with the same loader, side by side in one process and
alternating repetition by repetition (so load from other processes hits both alike):
  - joint: one loader pass; every batch is augmented once and the cloud member's embedding computed once,
    then every member's loss is summed and one optimiser step taken (`hetero.training.family_loss`);
  - separate: the cloud member alone, then each edge member alone (against the frozen cloud, as in
    `mode: sequential`), each with its own loader pass: augmentation and the cloud forward are redone per
    member.
images/s = steps x batch / wall time to take those steps for *all* members; the ratio is separate time over
joint time.  Reading/decoding the dataset (done once per training run) is reported apart, and not in the
ratio, although a separate run would pay it once per member too.

It also times the joint step with the members in float32 and in bfloat16 autocast (`train.amp`), side by
side, and says whether this CPU computes bf16 in hardware (where `amp: auto` turns it on).

One record per config and loader workers (``benchmarks/results/train_throughput/<config>-<n>workers.json``):
seconds and images/s of each way, the speed-ups and their per-repeat values.
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import records  # noqa: E402


def _loader(split, config, workers: int):
    from pytorch_metric_learning.samplers import MPerClassSampler

    from hetero.augment import TrainImages

    dataset = TrainImages(split.train, config.data.augment_affine, config.data.augment_hflip)
    batch = config.train.batch_size
    sampler = MPerClassSampler(split.train.labels, config.train.samples_per_class, batch_size=batch,
                               length_before_new_iter=max(len(dataset), 100 * batch))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0)


def _steps(family, trained: list[str], loader, steps: int, warmup: int, detach: bool, amp: bool = False) -> float:
    """Wall seconds of `steps` optimiser steps training `trained` (after `warmup` untimed ones)."""
    from hetero.training import family_loss

    family.amp = amp
    params = [p for name in trained for p in family.members[name].parameters()] + list(family.heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for name, member in family.members.items():
        member.train(name in trained)
        member.requires_grad_(name in trained)
    batches = iter(loader)
    started = None
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        images, labels = next(batches)
        loss, _ = family_loss(family, trained, images, labels, detach)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def main(argv=None) -> None:
    from hetero.config import load_config
    from hetero.augment import channel_stats
    from hetero.data import load_split
    from hetero.training import Family, cpu_has_native_bf16

    default = ROOT / "examples" / "omniglot.yaml"
    if not (ROOT.parent / "shared" / "data" / "omniglot").exists():
        default = ROOT / "examples" / "quickstart.yaml"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(default))
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each run")
    parser.add_argument("--repeats", type=int, default=3, help="joint/separate pairs (median)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    started = time.perf_counter()
    split = load_split(config.data, config.load_size)
    read_seconds = time.perf_counter() - started
    mean, std = channel_stats(split.train.images)
    torch.manual_seed(0)
    family = Family(config, len(split.train.class_names), mean, std)
    loader = _loader(split, config, args.workers)
    batch = config.train.batch_size
    members = list(family.members)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"{args.workers} loader worker(s); {Path(args.config).name}: members {', '.join(members)}, batch {batch}, "
          f"{len(split.train)} training images at {config.load_size} px (read/decoded once in {read_seconds:.1f} s)")
    print(f"{args.steps} timed steps per run after {args.warmup} warm-up steps; median of {args.repeats} repeats")

    joint, separate, per_member, bf16 = [], [], {name: [] for name in members}, []
    for _ in range(args.repeats):
        joint.append(_steps(family, members, loader, args.steps, args.warmup, config.train.detach_cloud))
        bf16.append(_steps(family, members, loader, args.steps, args.warmup, config.train.detach_cloud, amp=True))
        total = 0.0
        for name in members:  # the cloud first, then each edge member against the frozen cloud
            seconds = _steps(family, [name], loader, args.steps, args.warmup, config.train.detach_cloud)
            per_member[name].append(seconds)
            total += seconds
        separate.append(total)

    images = args.steps * batch
    figures = {"read_s": read_seconds, "images_per_run": images}
    header = f"{'how':<34} | {'seconds':>8} | {'images/s':>9} | {'joint speed-up':>14}"
    print(header)
    print("-" * len(header))
    j = statistics.median(joint)
    figures["joint"] = {"s": j, "images_per_s": images / j}
    print(f"{'joint (' + ' + '.join(members) + ')':<34} | {j:>8.2f} | {images / j:>9.1f} | {'':>14}")
    for name in members:
        m = statistics.median(per_member[name])
        figures.setdefault("alone", {})[name] = {"s": m, "images_per_s": images / m}
        print(f"{'  ' + name + ' alone':<34} | {m:>8.2f} | {images / m:>9.1f} | {'':>14}")
    s = statistics.median(separate)
    ratios = [b / a for a, b in zip(joint, separate)]
    figures["separate"] = {"s": s, "images_per_s": images / s, "joint_speed_up": statistics.median(ratios),
                           "joint_speed_up_per_repeat": ratios, "target_met": statistics.median(ratios) >= 1.3}
    print(f"{'separate, one after the other':<34} | {s:>8.2f} | {images / s:>9.1f} | {statistics.median(ratios):>13.2f}x")
    verdict = "meets" if statistics.median(ratios) >= 1.3 else "misses"
    print(f"target (joint >= 1.3x faster than separate): {verdict} it; per-repeat ratios "
          f"{', '.join(f'{r:.2f}' for r in ratios)}")
    half = statistics.median(bf16)
    ratios = [fp32 / bf16_s for fp32, bf16_s in zip(joint, bf16)]
    figures["joint_bf16"] = {"s": half, "images_per_s": images / half, "speed_up_vs_fp32": statistics.median(ratios),
                             "speed_up_per_repeat": ratios, "native_bf16": cpu_has_native_bf16()}
    print(f"{'joint, members in bf16 autocast':<34} | {half:>8.2f} | {images / half:>9.1f} | "
          f"{statistics.median(ratios):>13.2f}x faster than fp32 (per repeat "
          f"{', '.join(f'{r:.2f}' for r in ratios)}); native bf16 on this CPU: {cpu_has_native_bf16()}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak resident memory of this process: {peak:,.0f} MB")
    path = records.write("train_throughput", records.key_of(Path(args.config).stem, f"{args.workers}workers"),
                         figures, wall_s=time.perf_counter() - started, recipe=records.relative(args.config),
                         seeds=[0], steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                         workers=args.workers, peak_rss_mb=round(peak))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
