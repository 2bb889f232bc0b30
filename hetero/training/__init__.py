"""Joint training of a model family.

Every member sees the same augmented batch.  The loss is, per member, a normalised-softmax classification
loss (through one classifier shared by all members, or one each when `compat: none`) plus, per edge member,
the configured cross-model terms against the cloud member's embeddings of the same images.

State is checkpointed atomically after every epoch (one safetensors file holding weights, optimizer state,
epoch and history; nothing pickled); a resumed run continues from the last finished epoch and ends with the
same weights as an uninterrupted one.  Callbacks run after every epoch (progress reports, snapshots).

Under `torchrun --nproc_per_node N` the same code trains data-parallel (see hetero/distributed.py): every
rank draws the same global batch (same seed, same augmentation, whatever N) and trains on its contiguous
slice; BatchNorm and the cross-model terms see the whole global batch and DDP averages the gradients, so a
step equals one process's step on the global batch up to float rounding.  Rank 0 alone logs and writes.
"""
from __future__ import annotations

import logging
import math
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.profiler import record_function
from tqdm import tqdm

from hetero import distributed
from hetero.adapters import fit_adapter
from hetero.config import Config
from hetero.data import TrainImages, border_fill, calibration_split, channel_stats, load_split, loader_context
from hetero.errors import ConfigError, ManifestError, TrainingError
from hetero.external import (ExternalCloud, count_onnx_flops, external_space_id, file_metadata, model_format,
                             open_external)
from hetero.training.exits import fit_exit_rule
from hetero.family import (TRAIN_STATE, DataRecord, ExitRecord, FamilyStore, FileRecord, Manifest, MemberRecord,
                           PreviousRecord, TrainingRecord, claim_for_training, new_directory, output_directory,
                           read_weights, save_weights, space_id, tensors_digest, write_config, writing)
from hetero.files import atomic_path, sha256_file
from hetero.training.lqf import fine_tune
from hetero.losses import SharedClassifier, build_cross_model_losses
from hetero.models import (Embedder, MultiExitEmbedder, add_adapter, build_member, count_flops, count_params,
                           embed_images, exit_flops, resize_to)
from hetero.training.teacher_cache import CachedViews, TeacherCache

log = logging.getLogger("hetero.training")


class Family(torch.nn.Module):
    """The members of one family plus their classifier(s), built from a config."""

    def __init__(self, config: Config, num_classes: int, mean, std):
        super().__init__()
        fam, train = config.family, config.train
        self.cloud_name = fam.cloud.name
        # An external cloud is frozen and not part of the trained modules (nor of the training state).
        self.external: tuple[ExternalCloud, str] | None = open_cloud(fam) if fam.cloud.external else None
        # Each part starts from its own seed, so a cloud starts (and in sequential mode, ends) the same
        # whatever edge members sit beside it: recipes that differ in the edges share their cloud.
        self.members = torch.nn.ModuleDict({
            m.name: seeded(train.seed, f"member:{m.name}", lambda m=m: build_member(m, fam.embedding_dim, mean, std))
            for m in fam.members if not m.external})
        head = lambda: SharedClassifier(num_classes, fam.embedding_dim, train.classifier, train.margin, train.scale)  # noqa: E731
        names = [m.name for m in fam.members] if train.compat in ("none", "adapter") else ["shared"]
        # Unlabeled data has no classes: the edges learn from the cloud alone, through the label-free terms.
        self.heads = torch.nn.ModuleDict(
            {name: seeded(train.seed, f"head:{name}", head) for name in names} if num_classes else {})
        self.cross = build_cross_model_losses(train.losses) if train.compat == "shared" else {}
        # backward mode: the earlier family's cloud, frozen; every new member's embeddings answer to it.
        self.previous: Embedder | None = None
        self.self_distillation = train.early_exit.self_distillation
        self.amp = False  # members compute in bfloat16 autocast; the losses always in float32

    def embed(self, member: Embedder, images: torch.Tensor) -> torch.Tensor:
        """A member's float32 embeddings of a batch (resized to its input size), in bf16 autocast if `amp`."""
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return member(resize_to(images, member.input_size)).float()

    def embed_all(self, member, images: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's float32 embeddings of a batch (one for a single-exit member), shallowest first."""
        if not isinstance(member, MultiExitEmbedder):
            return [self.embed(member, images)]
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return [e.float() for e in member.forward_exits(resize_to(images, member.input_size))]

    def forward(self, images: torch.Tensor, labels: torch.Tensor, trained: list[str], detach_cloud: bool,
                edge_classification: float = 1.0, mixed: torch.Tensor | None = None,
                mixed_matching: float = 0.0, cached: tuple | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch (family_loss), as a method so that DistributedDataParallel can wrap it."""
        return family_loss(self, trained, images, labels, detach_cloud, edge_classification, mixed, mixed_matching,
                           cached)

    def head(self, member: str) -> SharedClassifier | None:
        if not self.heads:
            return None
        return self.heads["shared"] if "shared" in self.heads else self.heads[member]

    @property
    def cloud(self) -> Embedder | ExternalCloud:
        return self.external[0] if self.external is not None else self.members[self.cloud_name]

    def edge_names(self) -> list[str]:
        return [n for n in self.members if n != self.cloud_name]


def resolve_external_input_size(config: Config) -> None:
    """Fill an external cloud's input size from its file, so the load size (and the saved config) know it."""
    cloud = config.family.cloud
    if cloud.external and cloud.input_size is None:
        path = Path(cloud.model or cloud.weights)
        if not path.is_file():
            raise ConfigError(f"{path}: external model file not found (family.members, {cloud.name!r})")
        stated = file_metadata(path, model_format(path, cloud.arch)).get("input_size")
        if not stated:
            raise ConfigError(f"{path}: the file does not state its input size; give input_size on member "
                              f"{cloud.name!r}")
        cloud.input_size = int(stated)


def open_cloud(fam) -> tuple[ExternalCloud, str]:
    """The external cloud of a family config and its fingerprint; its dimension must be the family's."""
    cfg = fam.cloud
    model, fingerprint = open_external(cfg.model or cfg.weights, cfg.arch, cfg.input_size, cfg.mean, cfg.std,
                                       cfg.colour_order, trusted=cfg.trust_model_file, member=cfg.name)
    if model.dim != fam.embedding_dim:
        raise ConfigError(f"family.embedding_dim: {fam.embedding_dim}, but the external cloud {cfg.name!r} "
                          f"({model.path}) returns {model.dim}-d vectors; set embedding_dim: {model.dim}")
    return model, fingerprint


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


def _phases(config: Config, family: Family) -> list[tuple[list[str], int]]:
    """(members trained, epochs) per phase: joint trains all at once, sequential the cloud first."""
    epochs = config.train.epochs
    if config.train.mode == "backward":
        return [(list(family.members), epochs)]
    if config.train.mode == "sequential" and family.external is not None:  # nothing to train but the edges
        return [(family.edge_names(), config.train.edge_epochs or epochs)]
    if config.train.mode == "sequential":
        return [([family.cloud_name], epochs), (family.edge_names(), config.train.edge_epochs or epochs)]
    return [(list(family.members), epochs)]


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


def family_loss(family: Family, trained: list[str], images: torch.Tensor, labels: torch.Tensor,
                detach_cloud: bool, edge_classification: float = 1.0, mixed: torch.Tensor | None = None,
                mixed_matching: float = 0.0, cached: tuple | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch for the members being trained; the reference embedding is computed once.

    The reference is the cloud member's embedding, or in backward mode the earlier family's frozen cloud's,
    against which the new cloud is a query like the edge members.  The classification loss is a mean over
    this rank's images (DDP averages it over ranks); the cross-model terms, some of which compare every
    pair of the batch, see the global batch (gathered; alone a no-op).  `mixed` holds images made from the
    batch (see matching_inputs) for the label-free terms, weighted by `mixed_matching`.  `cached` holds the
    frozen cloud's embeddings of `images` and `mixed` read from the teacher cache (the cloud is not run).
    """
    cloud_emb = None
    mixing = mixed is not None and mixed_matching > 0 and bool(family.cross)
    mixed_reference = cached[1] if cached is not None else None
    if cached is not None:
        reference = cached[0]
    elif family.previous is not None:
        with torch.no_grad(), record_function("reference forward"):
            reference = family.embed(family.previous, images)
    elif family.cloud_name not in trained:
        # A frozen cloud in eval mode embeds each image on its own: the batch and its matching inputs go
        # through it in one forward (fewer, larger convolutions; the same embeddings).
        with torch.no_grad(), record_function("cloud forward (targets)"):
            both = family.embed(family.cloud, torch.cat([images, mixed]) if mixing else images)
        reference, mixed_reference = (both[:len(images)], both[len(images):]) if mixing else (both, None)
    else:
        with record_function("cloud forward"):
            cloud_emb = family.embed(family.cloud, images)
        reference = cloud_emb.detach() if detach_cloud else cloud_emb
    if family.cross:
        reference, all_labels = distributed.gather_with_grad(reference), distributed.gather_with_grad(labels)
    total = torch.zeros((), device=images.device)
    parts: dict[str, float] = {}
    for name in trained:
        member = family.members[name]
        is_reference = name == family.cloud_name and cloud_emb is not None
        if is_reference:
            outputs = [cloud_emb]
        else:
            with record_function(f"{name} forward"):
                outputs = family.embed_all(member, images)
        head = family.head(name)
        with record_function(f"{name} loss terms"):
            for tag, emb in zip(output_names(name, member, len(outputs)), outputs):
                loss = head(emb, None, labels) if head is not None else torch.zeros((), device=images.device)
                parts[f"{tag}/cls"] = loss.item()
                if name != family.cloud_name and "shared" in family.heads:
                    # Independent members (compat: none) have only their own classifier to learn from: never weighed.
                    loss = loss * edge_classification
                if not is_reference:
                    all_emb = distributed.gather_with_grad(emb) if family.cross else emb
                    for term, (weight, fn) in family.cross.items():
                        value = fn(all_emb, reference, all_labels)
                        parts[f"{tag}/{term}"] = value.item()
                        loss = loss + weight * value
                total = total + loss
            if len(outputs) > 1 and family.self_distillation > 0:
                total = total + family.self_distillation * deeper_teaches_shallower(outputs, parts, name)
    if mixing:
        total = total + mixed_matching * match_on_mixed_images(family, trained, mixed, parts, mixed_reference)
    return total, parts


def output_names(name: str, member, count: int) -> list[str]:
    """How a member's outputs are named in loss parts and reports: name@<stage> per exit of a multi-exit one."""
    return [name] if count == 1 else [f"{name}@{stage}" for stage in member.exits]


def deeper_teaches_shallower(outputs: list[torch.Tensor], parts: dict, name: str) -> torch.Tensor:
    """Each earlier exit regresses (1 - cos) onto the last exit's detached embedding of the same image."""
    deepest = outputs[-1].detach()
    value = sum((1 - (emb * deepest).sum(dim=1)).mean() for emb in outputs[:-1]) / (len(outputs) - 1)
    parts[f"{name}/self-distillation"] = value.item()
    return value


def mixup(images: torch.Tensor) -> torch.Tensor:
    """Each image blended with another of the batch at a uniform random ratio (drawn from the global RNG)."""
    mix = torch.rand(len(images), 1, 1, 1)
    return mix * images + (1 - mix) * images[torch.randperm(len(images))]


def cutmix(images: torch.Tensor) -> torch.Tensor:
    """Each image with a box of uniform random area pasted from another image of the batch."""
    n, _, h, w = images.shape
    side = torch.rand(n).sqrt()
    box_h, box_w = (side * h).long(), (side * w).long()
    top, left = (torch.rand(n) * (h - box_h + 1)).long(), (torch.rand(n) * (w - box_w + 1)).long()
    top, left, box_h, box_w = (t[:, None, None] for t in (top, left, box_h, box_w))
    rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
    return torch.where(inside[:, None], images[torch.randperm(n)], images)


def dihedral(images: torch.Tensor) -> torch.Tensor:
    """Each image under one of the 8 rotations/reflections of the square, drawn at random."""
    choice = torch.randint(0, 8, (len(images),))
    out = images.clone()
    for k in range(8):
        rows = torch.nonzero(choice == k).flatten()
        if len(rows):
            view = torch.rot90(images[rows], k % 4, dims=(-2, -1))
            out[rows] = view.flip(-1) if k >= 4 else view
    return out


def matching_inputs(images: torch.Tensor, kinds: list[str]) -> torch.Tensor:
    """Inputs off the training images for function matching: mixed pairs, then rotated/reflected.

    With both mixup and cutmix, each image gets one of the two at random.
    """
    mixers = [MIXERS[k] for k in kinds if k in MIXERS]
    out = images
    if mixers:
        out = mixers[0](images)
        if len(mixers) > 1:
            pick = torch.randint(0, len(mixers), (len(images),))
            for index, mixer in enumerate(mixers[1:], start=1):
                out = torch.where((pick == index)[:, None, None, None], mixer(images), out)
    return dihedral(out) if "dihedral" in kinds else out


MIXERS = {"mixup": mixup, "cutmix": cutmix}


def match_on_mixed_images(family: Family, trained: list[str], mixed: torch.Tensor, parts: dict,
                          reference: torch.Tensor | None = None) -> torch.Tensor:
    """Function matching (Beyer et al., 2022): the label-free cross-model terms on mixed images.

    Mixed images (see matching_inputs) lie off the training images, where a student that only matched the
    reference on real images would drift; matching there is what carries over to unseen classes.
    `reference` holds the reference's embeddings of `mixed` when already computed (cache, batched forward).
    """
    queries = [name for name in trained if name != family.cloud_name or family.previous is not None]
    total = torch.zeros((), device=mixed.device)
    if not queries:  # the cloud phase: no student yet
        return total
    reference_model = family.previous if family.previous is not None else family.cloud
    with torch.no_grad(), record_function("reference forward (matching inputs)"):
        reference = distributed.gather_with_grad(reference if reference is not None
                                                 else family.embed(reference_model, mixed))
    for name in queries:
        member = family.members[name]
        with record_function(f"{name} forward"):
            outputs = family.embed_all(member, mixed)
        with record_function(f"{name} loss terms"):
            for tag, emb in zip(output_names(name, member, len(outputs)), outputs):
                emb = distributed.gather_with_grad(emb)
                for term, (weight, fn) in family.cross.items():
                    if not fn.uses_labels:
                        value = fn(emb, reference, None)
                        parts[f"{tag}/mixed-{term}"] = value.item()
                        total = total + weight * value
    return total


# ------------------------------------------------------------------------------------------- state on disk


def save_state(out: Path, family: Family, optimizer, epoch: int, history: list) -> None:
    """Weights, optimizer state, epoch and history in one file, replaced atomically: never half a state."""
    tensors = {f"model.{k}": v for k, v in family.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    save_weights(out / TRAIN_STATE, tensors, {"epoch": epoch, "param_groups": opt["param_groups"], "history": history})


def load_state(path: Path, family: Family, optimizer) -> tuple[int, list]:
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


# ---------------------------------------------------------------------------------------------- training


@dataclass
class EpochEnd:
    """What a callback learns after each finished (and checkpointed) epoch."""

    epoch: int  # counted over all phases, from 1
    epochs: int  # in all phases
    phase: int  # index into the phases (sequential: 0 cloud, 1 edges)
    phase_done: bool  # the last epoch of its phase
    loss: float
    out: Path


Callback = Callable[[EpochEnd], None]


def train(config: Config, out: str | Path, resume: bool = False, progress: bool | None = None,
          overwrite: bool = False, callbacks: Sequence[Callback] = (), start_from: str | Path | None = None
          ) -> FamilyStore:
    """Train the family of `config` into directory `out`; return the family written there.

    A directory that already holds a family is refused unless `resume` (same config) or `overwrite`.
    `start_from` is another run's training state whose finished epochs this run shares (recipes that differ
    only in the edge phase start it from one cloud phase); the caller vouches that they are shared.
    """
    if not config.family.edges:
        raise ConfigError("family.members: no edge member to train; this config's `search` section is for "
                          "`hetero search`, which finds the edge members")
    distributed.init_from_env()
    resolve_external_input_size(config)
    out = output_directory(out)
    with new_directory(out), writing(out, "train"):
        distributed.on_main_then_share(lambda: claim_for_training(out, config, resume, overwrite))
        split = load_split(config.data, config.load_size)  # a bad data path fails before anything is written
        if config.train.mode == "lqf":  # deterministic: a resumed update simply runs again
            family, previous, points, facts = lqf_update(config, split)
            write_config(out, config)
            history = [{"epoch": i + 1, "loss": sum(f["history"][i] for f in facts), "seconds": 0.0}
                       for i in range(config.train.epochs)]
            write_family(config, out, family, split, history, previous, {"lqf": facts}, linearised=points)
            return FamilyStore.open(out)
        split = hold_out_for_calibration(config, split)
        run = TrainingRun(config, out, split, progress)  # and so does a cloud file that cannot serve this family
        if distributed.is_main():
            write_config(out, config)
        if resume or start_from:  # every rank loads the same state
            state = out / TRAIN_STATE if resume else Path(start_from)
            run.done, run.history = load_state(state, run.family, run.optimizer)
            if distributed.is_main():
                log.info("resuming %s after epoch %d", out, run.done)
        for phase, (trained, epochs) in enumerate(run.phases):
            run.train_phase(phase, trained, epochs, callbacks)
        if config.train.compat == "adapter":
            run.adapters = fit_adapters(run.family, split.train, config.train.adapter)
        exit_rules = {name: fit_exit_rule(run.family.members[name].cpu(), run.family.cloud.cpu(),
                                          run.family.head(name), split.train, config.train.early_exit)
                      for name in run.family.edge_names()
                      if isinstance(run.family.members[name], MultiExitEmbedder)}
        if distributed.is_main():
            write_family(config, out, run.family.cpu(), split, run.history, run.previous, run.facts(), run.adapters,
                         exit_rules)
        distributed.barrier()
    return FamilyStore.open(out)


class TrainingRun:
    """One training run: the family, its optimizer and data, and the epochs done so far."""

    def __init__(self, config: Config, out: Path, split, progress: bool | None):
        torch.use_deterministic_algorithms(True, warn_only=True)
        self.config, self.out, self.split, self.progress = config, out, split, progress
        self.train_cfg = train_cfg = config.train
        mean, std = channel_stats(split.train.images)
        classes = len(split.train.class_names) if config.data.source != "unlabeled" else 0
        self.family = Family(config, classes, mean, std)
        self.previous = None
        if train_cfg.init:
            start_from_family(self.family, config)
        if train_cfg.mode == "backward":
            self.previous = read_previous(config)
            self.family.previous = self.previous["cloud"]
            _prototypes_from(self.family, self.family.previous, split.train)
        elif self.family.external is not None and classes and train_cfg.compat == "shared":
            _prototypes_from(self.family, self.family.cloud, split.train)  # the external cloud's class means
        if distributed.world_size() > 1:
            distributed.convert_batchnorm(self.family)  # statistics of the global batch, as in one process
        self.device = distributed.device()
        self.amp, self.channels_last = accelerations(train_cfg, self.device)
        self.family.amp = self.amp
        self.family.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        if train_cfg.compile:
            for member in self.family.members.values():
                member.compile()  # in place: the state dict keeps its keys
        if self.family.external is not None:
            self.family.cloud.to(self.device)
        self.optimizer = torch.optim.AdamW(self.family.parameters(), lr=train_cfg.lr,
                                           weight_decay=train_cfg.weight_decay)
        self.dataset = TrainImages(split.train, config.data.augment_affine, config.data.augment_hflip,
                                   config.data.augment_batched)
        self.cached: CachedViews | None = None  # the edge phase's items when it reads a teacher cache
        self.cache_build: dict | None = None
        self.adapters: dict[str, dict] = {}
        self.batch_size = global_batch_size(train_cfg, len(self.dataset),
                                             torch.bincount(split.train.labels) if classes else None)
        self.steps_per_epoch = len(self.epoch_loader())
        self.phases = _phases(config, self.family)
        self.total_epochs = sum(epochs for _, epochs in self.phases)
        self.done, self.history = 0, []
        self.epoch = 0  # the epoch being trained (start_epoch), for messages
        self.started = time.time()

    def facts(self) -> dict:
        return {"device": self.device.type, "processes": distributed.world_size(), "amp_bf16": self.amp,
                "channels_last": self.channels_last, "teacher_cache": self.cache_build}

    def epoch_loader(self):
        # A new sampler per epoch: MPerClassSampler reshuffles its own state in place, which would make a
        # resumed run draw other batches than an uninterrupted one.  Every rank loads the same global batch
        # (same seeds, so the same augmentation whatever the world size) and trains on its own slice of it.
        if self.config.data.source == "unlabeled":  # no classes to balance: a seeded shuffle (seeded per epoch)
            sampler = torch.utils.data.RandomSampler(self.dataset, generator=torch.Generator().manual_seed(
                torch.initial_seed() % 2**63))
        else:
            sampler = MPerClassSampler(self.split.train.labels, self.train_cfg.samples_per_class,
                                       batch_size=self.batch_size, length_before_new_iter=len(self.dataset))
        workers = self.train_cfg.workers
        dataset = self.cached if self.cached is not None else self.dataset
        collate = None if self.cached is not None else self.dataset.collate
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                                           collate_fn=collate, num_workers=workers,
                                           multiprocessing_context=loader_context(workers))

    def open_teacher_cache(self) -> None:
        """Build (or resume, or reuse) the frozen cloud's cache for the edge phase, and read it from now on."""
        settings, data_cfg = self.train_cfg.teacher_cache, self.config.data
        root = Path(settings.dir) if settings.dir else self.out / "teacher_cache"
        family = self.family
        identity = (f"external:{family.external[1]}:{family.cloud.preprocessing}" if family.external is not None
                    else f"tensors:{tensors_digest(family.cloud.state_dict())}")
        train_images = self.split.train
        plan = TeacherCache.plan_for(identity, train_images.names, settings.views, self.train_cfg.seed,
                                     self.config.load_size, data_cfg.augment_affine, data_cfg.augment_hflip,
                                     self.train_cfg.matching_inputs if self.train_cfg.mixed_matching > 0 else [])
        fill = border_fill(train_images.images)

        def build():
            cache = TeacherCache.open_or_create(root, plan)
            try:
                built = cache.build(family.cloud, train_images.images, fill, progress=self.progress)
            except TrainingError as err:
                raise TrainingError(f"epoch {self.done + 1}, cloud member {family.cloud_name!r}: {err}") from None
            log.info("teacher cache %s: %s", root, built)
            self.cache_build = {"dir": str(root), "views": settings.views, **built}

        distributed.on_main_then_share(build)
        self.cached = CachedViews(TeacherCache.open_or_create(root, plan), train_images, fill)

    def enter_phase(self, phase: int, trained: list[str]):
        """Freeze what this phase does not train; the module to call for a batch's loss."""
        family = self.family
        for name, member in family.members.items():
            member.requires_grad_(name in trained)
        for name, head in family.heads.items():
            head.requires_grad_(name == "shared" or name in trained)
        if (family.cloud_name not in trained or family.previous is not None) and family.heads:
            family.head(family.cloud_name).requires_grad_(False)  # frozen shared head: BCT's influence loss
        epochs = self.phases[phase][1]
        first = sum(e for _, e in self.phases[:phase])
        frozen_cloud = family.cloud_name not in trained and family.previous is None
        if self.train_cfg.teacher_cache is not None and frozen_cloud and self.done < first + epochs:
            self.open_teacher_cache()
        return distributed.wrap_ddp(family)  # per phase: DDP syncs the parameters that require grad now

    def train_phase(self, phase: int, trained: list[str], epochs: int, callbacks: Sequence[Callback]) -> None:
        family = self.family
        model = self.enter_phase(phase, trained)
        first = sum(e for _, e in self.phases[:phase])
        for phase_epoch in range(epochs):
            epoch = first + phase_epoch + 1
            if epoch <= self.done:
                continue
            loss = self.train_epoch(model, trained, epoch, phase_epoch, epochs)
            state = {**family.members, **{f"classifier {name}": head for name, head in family.heads.items()}}
            check_finite_weights(state, f"epoch {epoch}")  # before the state is saved
            self.history.append({"epoch": epoch, "loss": loss, "seconds": round(time.time() - self.started, 1)})
            if distributed.is_main():
                log.info("epoch %d: loss %.4f", epoch, loss)
                save_state(self.out, family, self.optimizer, epoch, self.history)
            distributed.barrier()
            self.done = epoch
            for callback in callbacks:
                callback(EpochEnd(epoch, self.total_epochs, phase, phase_epoch == epochs - 1, loss, self.out))

    def train_epoch(self, model, trained: list[str], epoch: int, phase_epoch: int, epochs: int) -> float:
        train_cfg = self.train_cfg
        self.start_epoch(trained, epoch)
        warmup = max(1, int(train_cfg.warmup_epochs * self.steps_per_epoch))
        bar = tqdm(self.epoch_loader(), desc=f"epoch {epoch}/{self.total_epochs}", leave=False,
                   disable=True if self.progress is False or not distributed.is_main() else None)
        totals = []
        for step, batch in enumerate(bar):
            factor = lr_factor(phase_epoch * self.steps_per_epoch + step, epochs * self.steps_per_epoch, warmup)
            totals.append(self.train_step(model, trained, batch, train_cfg.lr * factor))
            bar.set_postfix(loss=f"{totals[-1]:.3f}")
        return distributed.mean_across_ranks(float(np.mean(totals)))

    def start_epoch(self, trained: list[str], epoch: int) -> None:
        """Seed the epoch and put every member in the mode this phase trains it in."""
        family = self.family
        self.epoch = epoch
        seed_everything(self.train_cfg.seed, epoch)
        family.train()
        for name, member in family.members.items():
            member.train(name in trained)
        if family.previous is not None:
            family.previous.eval()
        if self.cached is not None:
            self.cached.set_epoch(epoch)

    def train_step(self, model, trained: list[str], batch, lr: float) -> float:
        """One optimiser step on a loader batch at learning rate `lr`; the batch's loss."""
        train_cfg = self.train_cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.cached is not None:  # views, their matching inputs and the cloud's answers, from the cache
            index, labels, reference, mixed_reference, params, partners, partner_params = batch
            images, mixed = self.cached.images(index, params, partners, partner_params)
            images, labels, mixed, reference, mixed_reference = distributed.local_slice(
                images, labels, mixed, reference, mixed_reference)
            cached = (reference.to(self.device), mixed_reference.to(self.device))
        else:
            images, labels = batch
            # Mixed on the global batch, before slicing, so N processes mix as one would.
            with record_function("matching inputs"):
                mixed = (matching_inputs(images, train_cfg.matching_inputs) if train_cfg.mixed_matching > 0
                         else images)
            images, labels, mixed = distributed.local_slice(images, labels, mixed)
            cached = None
        images, labels, mixed = (t.to(self.device) for t in (images, labels, mixed))
        if self.channels_last:
            images, mixed = (t.contiguous(memory_format=torch.channels_last) for t in (images, mixed))
        loss, parts = model(images, labels, trained, train_cfg.detach_cloud, train_cfg.edge_classification, mixed,
                            train_cfg.mixed_matching, cached)
        if not torch.isfinite(loss):  # one scalar check per step: a diverged run stops before anything is saved
            raise self.diverged(parts, trained, images, lr)
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            self.optimizer.step()
        return loss.item()

    def diverged(self, parts: dict[str, float], trained: list[str], images: torch.Tensor, lr: float) -> TrainingError:
        """The error for a batch whose loss is NaN or infinite: a frozen reference that returns such embeddings
        (checked again on this batch, only now), or else the members whose loss terms diverged."""
        family = self.family
        frozen_cloud = family.cloud_name not in trained and self.cached is None  # cached answers were checked
        reference = family.previous if family.previous is not None else family.cloud if frozen_cloud else None
        if reference is not None:
            with torch.no_grad():
                broken = not torch.isfinite(family.embed(reference, images)).all()
            if broken:
                if family.previous is not None:
                    who, fix = "the earlier family's cloud (train.previous)", "check that family"
                elif family.external is not None:
                    who = f"the external cloud member {family.cloud_name!r} ({family.cloud.path})"
                    fix = "check the file"
                else:
                    who, fix = (f"the cloud member {family.cloud_name!r}, trained in an earlier phase,",
                                "its training diverged: train again with a lower train.lr (--overwrite)")
                return TrainingError(f"epoch {self.epoch}: {who} returns NaN or infinite embeddings for training "
                                     f"images, so nothing can learn from it; {fix}. Nothing of this epoch was written")
        members = sorted({tag.split("/")[0].split("@")[0] for tag, value in parts.items() if not math.isfinite(value)})
        return TrainingError(f"epoch {self.epoch}: the training diverged: the loss of member(s) "
                             f"{', '.join(members or trained)} became NaN or infinite (learning rate {lr:.3g} at "
                             f"this step, train.lr {self.train_cfg.lr:g}). Nothing of this epoch was written; train "
                             f"again with a lower train.lr (--overwrite)")


def check_finite_weights(modules: dict[str, torch.nn.Module], when: str) -> None:
    """Refuse weights that hold NaN or infinity (a diverged run) before they are saved anywhere."""
    broken = [name for name, module in modules.items()
              if not all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())]
    if broken:
        raise TrainingError(f"{when}: the weights of {', '.join(broken)} hold NaN or infinity: the training "
                            f"diverged. Nothing of it was written; train again with a lower train.lr (--overwrite)")


@torch.no_grad()
def fit_adapters(family: Family, images, settings) -> dict[str, dict]:
    """compat: adapter: fit each edge's map into the cloud's space on the training images (labels unused)."""
    floats = images.floats()
    cloud = embed_images(family.cloud.cpu(), floats)
    fitted = {}
    for name in family.edge_names():
        member = family.members[name].cpu()
        own = embed_images(member, floats)
        weight, bias = fit_adapter(own, cloud, settings.kind, settings.rank)
        add_adapter(member, weight, bias)
        mapped = embed_images(member, floats)
        fitted[name] = {"kind": settings.kind, "rank": settings.rank, "images": len(floats),
                        "cosine_before": round((own * cloud).sum(1).mean().item(), 4),
                        "cosine_after": round((mapped * cloud).sum(1).mean().item(), 4)}
        log.info("adapter for %s: %s", name, fitted[name])
    return fitted


def read_previous(config: Config) -> dict:
    """The earlier family of a backward-compatible update: its store and its frozen cloud member."""
    run_dir = Path(config.train.previous)
    try:
        store = FamilyStore.open(run_dir)
        if store.manifest.embedding_dim != config.family.embedding_dim:
            raise ManifestError(f"its embedding_dim is {store.manifest.embedding_dim}, this family's is "
                                f"{config.family.embedding_dim}: a new family must keep the old dimension")
        cloud = store.load_member(store.cloud.name).requires_grad_(False)
    except ManifestError as err:
        raise ConfigError(f"train.previous ({run_dir}): not a usable earlier family: {err}") from None
    return {"store": store, "cloud": cloud}


def _previous_members_match(config: Config, store: FamilyStore, key: str) -> None:
    """Each member of the config must be the same network as the same-named member of the family in `key`."""
    for cfg in config.family.members:
        try:
            record = store.member(cfg.name)
        except ManifestError:
            raise ConfigError(f"family.members: {cfg.name!r} is not a member of the family in train.{key} "
                              f"({store.root}); it has {', '.join(m.name for m in store.members)}") from None
        for field in ("arch", "width", "depth", "input_size", "activation", "role"):
            mine, theirs = getattr(cfg, field), getattr(record, field)
            if mine != theirs:
                raise ConfigError(f"family.members: {cfg.name!r} has {field} {mine!r}, the same member in "
                                  f"train.{key} ({store.root}) {theirs!r}; fine-tuning keeps each network as it is")


def start_from_family(family: Family, config: Config) -> None:
    """train.init: every member starts from the same-named member of an earlier family (ordinary fine-tuning)."""
    try:
        store = FamilyStore.open(Path(config.train.init))
        _previous_members_match(config, store, "init")
        for name, member in family.members.items():
            member.load_state_dict(store.load_member(name).state_dict())
    except ManifestError as err:
        raise ConfigError(f"train.init ({config.train.init}): not a usable earlier family: {err}") from None


def lqf_update(config: Config, split) -> tuple[Family, dict, dict[str, Embedder], list[dict]]:
    """mode: lqf: each member of the family in `previous`, linearised around its weights and fine-tuned.

    Returns the family holding the merged members (w0 + dw), the previous family, the linearisation points
    (w0) and what each member's fine-tuning did.
    """
    previous = read_previous(config)
    store = previous["store"]
    try:
        _previous_members_match(config, store, "previous")
        members = {cfg.name: store.load_member(cfg.name) for cfg in config.family.members}
    except ManifestError as err:
        raise ConfigError(f"train.previous ({store.root}): not a usable earlier family: {err}") from None
    settings, train_cfg = config.train.lqf, config.train
    family = Family(config, len(split.train.class_names), [0.5] * 3, [0.5] * 3)
    _prototypes_from(family, previous["cloud"], split.train)  # the frozen shared classifier, as in backward mode
    prototypes = family.head(family.cloud_name).loss.W.detach().T.contiguous()
    images, labels = split.train.floats(), split.train.labels
    reference = embed_images(previous["cloud"], images) if settings.compat_weight > 0 else None
    points, facts = {}, []
    for name, member in members.items():
        linearised, done = fine_tune(member, name, images, labels, prototypes, reference, settings, train_cfg.epochs,
                                     train_cfg.weight_decay, train_cfg.batch_size)
        family.members[name].load_state_dict(linearised.merged().state_dict())
        points[name] = linearised.base
        facts.append(done)
        log.info("lqf %s: %s", name, {k: v for k, v in done.items() if k != "history"})
    return family.eval(), previous, points, facts


@torch.no_grad()
def _prototypes_from(family: Family, old_cloud: Embedder, images) -> None:
    """Start the shared head at the old cloud's class means and keep it frozen (BCT's influence loss).

    Means of the old embeddings work for classes the old family never saw as well as for those it did.
    """
    old = embed_images(old_cloud, images.floats())
    prototypes = torch.zeros(len(images.class_names), old.shape[1]).index_add_(0, images.labels, old)
    head = family.head(family.cloud_name).loss
    head.W.copy_(torch.nn.functional.normalize(prototypes, dim=1).T)


def hold_out_for_calibration(config: Config, split):
    """With a multi-exit member, keep `early_exit.held_out` of each training class out of training (every
    member's), for `hetero calibrate`; other families train on every training image as before."""
    import dataclasses

    if not any(m.exits is not None for m in config.family.members) or config.train.early_exit.held_out == 0:
        return split
    keep, _ = calibration_split(split.train, config.train.early_exit.held_out)
    return dataclasses.replace(split, train=split.train.subset(keep))


def write_family(config: Config, out: Path, family: Family, split, history: list, previous: dict | None = None,
                 run: dict | None = None, adapters: dict | None = None, exit_rules: dict | None = None,
                 linearised: dict[str, Embedder] | None = None) -> Manifest:
    """Write each member's checkpoint and the family manifest (a backward update keeps the old space id)."""
    fam = config.family
    check_finite_weights({cfg.name: family.members[cfg.name] for cfg in fam.members if not cfg.external},
                         "after training")
    files = {}
    for cfg in fam.members:
        if cfg.external:
            files[cfg.name] = _copy_external(out, cfg, family.cloud)
            continue
        path = out / "checkpoints" / f"{cfg.name}.safetensors"
        save_weights(path, family.members[cfg.name].state_dict(), {"member": cfg.name, "family": fam.name})
        files[cfg.name] = FileRecord(file=path.relative_to(out).as_posix(), sha256=sha256_file(path))
    cloud_flops = _flops(family.cloud)
    members = [_member_record(cfg, family.cloud if cfg.external else family.members[cfg.name], fam.embedding_dim,
                              cloud_flops, files[cfg.name]) for cfg in fam.members]
    for member in members:
        member.adapter = (adapters or {}).get(member.name)
        if member.name in (exit_rules or {}):
            model = family.members[member.name]
            member.kind, member.early_exit = "multi-exit", exit_rules[member.name]
            member.exits = [ExitRecord(stage=stage, flops=flops, flops_vs_cloud=round(flops / cloud_flops, 4))
                            for stage, flops in zip(model.exits, exit_flops(model))]
        if linearised and member.name in linearised:  # mode lqf: w0, the point the member was linearised at
            path = out / "checkpoints" / "lqf" / f"{member.name}.safetensors"
            save_weights(path, linearised[member.name].state_dict(), {"member": member.name, "family": fam.name})
            member.linearised_at = FileRecord(file=path.relative_to(out).as_posix(), sha256=sha256_file(path))
    if family.external is not None:
        cloud = family.cloud
        record = members[[m.name for m in members].index(fam.cloud.name)]
        record.fingerprint = family.external[1]
        if cloud.converted_from is not None:
            record.converted_from = {"file": cloud.converted_from[0].name, "format": cloud.converted_from[1]}
        own_space = external_space_id(family.external[1], cloud.preprocessing, fam.embedding_dim)
    else:
        own_space = space_id(fam.name, fam.version, fam.embedding_dim, tensors_digest(family.cloud.state_dict()))
    manifest = Manifest(
        family=fam.name, version=fam.version, embedding_dim=fam.embedding_dim,
        space_id=previous["store"].space_id if previous else own_space,
        compat=config.train.compat, mode=config.train.mode, members=members,
        data=DataRecord(train_images=len(split.train), train_classes=len(split.train.class_names),
                        test_images=len(split.test), test_classes=len(split.test.class_names),
                        skipped_images=split.skipped),
        training=TrainingRecord(epochs=history[-1]["epoch"] if history else 0, **(run or {}), history=history),
        previous=_previous_record(out, previous) if previous else None,
    )
    FamilyStore(out, manifest).save()
    return manifest


def _member_record(cfg, member: Embedder | ExternalCloud, dim: int, cloud_flops: int, checkpoint: FileRecord
                   ) -> MemberRecord:
    flops = _flops(member)
    external = isinstance(member, ExternalCloud)
    return MemberRecord(
        name=cfg.name, kind="external" if external else "trained", role=cfg.role,
        arch=(member.arch or member.kind) if external else cfg.arch, width=cfg.width, depth=cfg.depth,
        input_size=member.input_size, dim=dim, mean=member.mean.flatten().tolist(), std=member.std.flatten().tolist(),
        params=_params(member), flops=flops, flops_vs_cloud=round(flops / cloud_flops, 4) if cloud_flops else 0.0,
        checkpoint=checkpoint, colour_order=member.preprocessing.colour_order if external else "RGB",
        activation=cfg.activation)


def _flops(member) -> int:
    if isinstance(member, ExternalCloud) and member.kind == "onnx":
        return count_onnx_flops(member.path, member.input_size)
    return count_flops(member)


def _params(member) -> int:
    if isinstance(member, ExternalCloud) and member.kind == "onnx":
        import onnx

        return int(sum(np.prod(t.dims) for t in onnx.load(str(member.path)).graph.initializer))
    return count_params(member)


def _copy_external(out: Path, cfg, cloud: ExternalCloud) -> FileRecord:
    """A copy of the external model in the family: evaluating and exporting never read outside it."""
    import shutil

    path = out / "checkpoints" / f"{cfg.name}{cloud.path.suffix.lower()}"
    with atomic_path(path) as tmp:
        shutil.copyfile(cloud.path, tmp)
    return FileRecord(file=path.relative_to(out).as_posix(), sha256=sha256_file(path))


def _previous_record(out: Path, previous: dict) -> PreviousRecord:
    """Keep a copy of the earlier cloud: evaluating the update never reads outside this directory."""
    store: FamilyStore = previous["store"]
    cloud = store.cloud
    path = out / "checkpoints" / "previous" / f"{cloud.name}.safetensors"
    save_weights(path, previous["cloud"].state_dict(), {"member": cloud.name, "family": store.name})
    copy = FileRecord(file=path.relative_to(out).as_posix(), sha256=sha256_file(path))
    return PreviousRecord(dir=str(store.root.resolve()), family=store.name, version=store.manifest.version,
                          space_id=store.space_id, cloud=cloud.name,
                          member=cloud.model_copy(update={"checkpoint": copy}), checkpoint=copy)
