"""The training stage: `train()` and one TrainingRun's phases, epochs and steps.

State is checkpointed atomically after every epoch (hetero.training.plumbing.save_state); a resumed run
continues from the last finished epoch and ends with the same weights as an uninterrupted one.  Callbacks run
after every epoch (progress reports, snapshots).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.profiler import record_function
from tqdm import tqdm

from hetero import distributed
from hetero.adapters import fit_adapter
from hetero.config import Config
from hetero.augment import TrainImages, border_fill, channel_stats
from hetero.data import load_split, loader_context
from hetero.errors import ConfigError, TrainingError
from hetero.family import (TRAIN_STATE, FamilyStore, claim_for_training, new_directory, output_directory,
                           write_config, writing)
from hetero.family.writer import check_finite_weights, write_family
from hetero.files import check_output
from hetero.models import MultiExitEmbedder, add_adapter, embed_images
from hetero.training.exits import fit_exit_rule
from hetero.training.model import Family, resolve_external_input_size
from hetero.training.objective import matching_inputs
from hetero.training.plumbing import (accelerations, global_batch_size, load_state, lr_factor, save_state,
                                      seed_everything)
from hetero.training.teacher_cache import (CachedViews, TeacherCache, build_cached_views, cloud_identity,
                                           plan_for_config)
from hetero.training.updates import (hold_out_for_calibration, lqf_update, prototypes_from, read_previous,
                                     start_from_family)

log = logging.getLogger("hetero.training")


@dataclass
class EpochEnd:
    """What a callback learns after each finished (and checkpointed) epoch."""

    epoch: int  # counted over all phases, from 1
    epochs: int  # in all phases
    phase: int  # index into the phases (sequential: 0 cloud, 1 edges)
    phase_done: bool  # the last epoch of its phase
    loss: float
    out: Path
    stage: str = ""  # what trained, where it is not the family's training (`hetero search`: supernet, fine-tuning)


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
    cache = config.train.teacher_cache
    if cache is not None:  # opened when the edge phase starts, after the cloud's: refuse a file in its place now
        check_output(cache.dir or out / "teacher_cache", "train.teacher_cache.dir", folder=True)
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
            prototypes_from(self.family, self.family.previous, split.train)
        elif self.family.external is not None and classes and train_cfg.compat == "shared":
            prototypes_from(self.family, self.family.cloud, split.train)  # the external cloud's class means
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
        settings = self.train_cfg.teacher_cache
        root = Path(settings.dir) if settings.dir else self.out / "teacher_cache"
        family = self.family
        identity = cloud_identity(family.cloud, family.external[1] if family.external is not None else None)
        train_images = self.split.train
        plan = plan_for_config(self.config, identity, train_images, settings.views)

        def build():
            try:
                _, self.cache_build = build_cached_views(root, plan, family.cloud, train_images, self.progress)
            except TrainingError as err:
                raise TrainingError(f"epoch {self.done + 1}, cloud member {family.cloud_name!r}: {err}") from None
            log.info("teacher cache %s: %s", root, self.cache_build)

        distributed.on_main_then_share(build)
        fill = border_fill(train_images.images)
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
