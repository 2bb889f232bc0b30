"""Training plumbing shared by `hetero train`, `hetero search` and mode lqf.

Seeding (per part and per epoch), the learning-rate schedule, the global batch size, the bf16/channels-last
choice for a device, and the training-state file (weights, optimizer state, epoch and history; nothing
pickled) that a resumed run continues from.
"""
from __future__ import annotations

import math
import random
import zlib
from pathlib import Path

import numpy as np
import torch

from hetero import distributed
from hetero.errors import ConfigError, ManifestError
from hetero.family import TRAIN_STATE, read_weights, save_weights


def seeded(seed: int, part: str, build):
    """build() with the global RNG seeded from (seed, part) and restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + zlib.crc32(part.encode()))
        return build()


def seed_everything(seed: int, epoch: int) -> None:
    # Seeded per epoch, so a run resumed at any epoch draws the same batches as an uninterrupted one.
    torch.manual_seed(seed * 100_003 + epoch)
    np.random.seed((seed * 100_003 + epoch) % 2**32)
    random.seed(seed * 100_003 + epoch)


def accelerations(train_cfg, device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, channels-last) for this device, from the config's auto/on/off choices."""
    gpu = device.type == "cuda"
    native_bf16 = torch.cuda.is_bf16_supported() if gpu else cpu_has_native_bf16()
    amp = train_cfg.amp == "bf16" or (train_cfg.amp == "auto" and native_bf16)
    channels_last = train_cfg.channels_last == "on" or (train_cfg.channels_last == "auto" and gpu)
    return amp, channels_last


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates bf16."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def global_batch_size(train_cfg, images: int, class_sizes: torch.Tensor | None = None) -> int:
    """`train.batch_size` is the global batch: all ranks together see that many images per step.

    With classes (`class_sizes`: training images per class), a batch holds batch_size / samples_per_class
    classes of samples_per_class images each (MPerClassSampler, which draws a small class's images again):
    settings the training data cannot fill are refused at their key.
    """
    per_class, batch = train_cfg.samples_per_class, train_cfg.batch_size
    unit = distributed.world_size() * per_class
    if batch % unit:
        raise ConfigError(
            f"train.batch_size ({batch}) is the global batch, split over {distributed.world_size()} processes, "
            f"each with whole classes of samples_per_class ({per_class}) images: it must be a multiple of {unit}, "
            f"e.g. {max(unit, batch // unit * unit)}")
    if class_sizes is not None and per_class > int(class_sizes.max()):
        raise ConfigError(f"train.samples_per_class: {per_class}, but the largest training class has "
                          f"{int(class_sizes.max())} images; at most {int(class_sizes.max())}")
    if batch > images:  # an epoch holds whole batches only: it would have none
        raise ConfigError(f"train.batch_size: {batch}, but there are {images} training images; at most "
                          f"{images // unit * unit}" + (f" (a multiple of {unit})" if unit > 1 else ""))
    classes = int((class_sizes > 0).sum()) if class_sizes is not None else None
    if classes is not None and batch > per_class * classes:
        raise ConfigError(f"train.batch_size: {batch} would hold {batch // per_class} classes of samples_per_class "
                          f"({per_class}) images, but the training data has {classes} classes; at most "
                          f"{per_class * classes}")
    return batch


def lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------- state on disk


def save_state(out: Path, family: torch.nn.Module, optimizer, epoch: int, history: list) -> None:
    """Weights, optimizer state, epoch and history in one file, replaced atomically: never half a state."""
    tensors = {f"model.{k}": v for k, v in family.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    save_weights(out / TRAIN_STATE, tensors, {"epoch": epoch, "param_groups": opt["param_groups"], "history": history})


def load_state(path: Path, family: torch.nn.Module, optimizer) -> tuple[int, list]:
    tensors, meta = read_weights(path, "the training state")
    try:
        epoch, groups, history = int(meta["epoch"]), list(meta["param_groups"]), list(meta["history"])
    except (KeyError, TypeError, ValueError):
        raise ManifestError(f"{path}: holds no epoch, optimizer settings and history (written by an earlier hetero, "
                            f"or damaged); train with --overwrite to start again") from None
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    try:
        family.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise ManifestError(f"{path}: does not fit this config's family ({str(err).splitlines()[0][:300]}); train "
                            f"with --overwrite to start again") from None
    return epoch, history

