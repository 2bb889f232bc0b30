"""The weight-sharing supernet: every sub-network as leading slices of the largest's tensors, the channel
sorting that puts the important channels first, BatchNorm re-estimation per sub-network, and the supernet's
training (the sandwich rule's loss, the shared classifier, the teacher the sub-networks match)."""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.func import functional_call
from tqdm import tqdm

from hetero.config import Config, TeacherCacheConfig
from hetero.augment import TrainImages, channel_stats
from hetero.data import ImageSet
from hetero.errors import ConfigError
from hetero.family import TRAIN_STATE
from hetero.losses import SharedClassifier, build_cross_model_losses
from hetero.models import Embedder, embed_images, resize_to
from hetero.search.space import Candidate, progressive_space, sandwich
from hetero.training import (Callback, EpochEnd, check_finite_weights, load_state, lr_factor, matching_inputs,
                             save_state, seed_everything, seeded)
from hetero.training.teacher_cache import CachedViews, build_cached_views, cloud_identity, plan_for_config

# One logger for the whole stage, whichever room logs.
log = logging.getLogger("hetero.search")


class Supernet(torch.nn.Module):
    """The largest sub-network, and every smaller one as a view of its tensors (see the package doc)."""

    def __init__(self, arch: str, largest: Candidate, dim: int, mean, std):
        super().__init__()
        self.arch, self.largest, self.dim = arch, largest, dim
        self.model = Embedder(arch, largest.width, largest.depth, dim, largest.input_size, mean, std,
                              blocks=largest.blocks(arch))
        self._templates: dict[Candidate, tuple[Embedder, dict[str, str]]] = {}

    def build(self, candidate: Candidate) -> Embedder:
        """A fresh member of the candidate's architecture (its own, unshared tensors).

        Built without touching the global RNG: templates are made when a candidate is first sampled, and a
        resumed run must draw the same batches as an uninterrupted one that made them earlier.
        """
        mean, std = self.model.mean.flatten().tolist(), self.model.std.flatten().tolist()
        with torch.random.fork_rng(devices=[]):
            return Embedder(self.arch, candidate.width, candidate.depth, self.dim, candidate.input_size, mean, std,
                            blocks=candidate.blocks(self.arch))

    def _template(self, candidate: Candidate) -> tuple[Embedder, dict[str, str]]:
        if candidate not in self._templates:
            net = self.build(candidate).to(self.model.mean.device)
            layers = layer_map(net.backbone, self.model.backbone)
            names = {}
            for key in net.state_dict():
                parts = key.split(".")
                if parts[0] == "backbone":
                    parts[1] = str(layers[int(parts[1])])
                names[key] = ".".join(parts)
            self._templates[candidate] = (net, names)
        return self._templates[candidate]

    def tensors(self, candidate: Candidate) -> dict[str, torch.Tensor]:
        """The candidate's parameters and buffers as slices (views) of the largest's: the leading channels,
        and of a convolution's kernel the centre (a mobilenet's smaller depthwise kernel, Once-for-All's
        elastic kernel without its learned transform)."""
        net, names = self._template(candidate)
        big = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        out = {}
        for key, tensor in net.state_dict().items():
            source = big[names[key]]
            if any(n > m for n, m in zip(tensor.shape, source.shape)):
                raise ConfigError(f"search: sub-network {candidate.key} is larger than the supernet "
                                  f"({self.largest.key}) at {key}")
            out[key] = source[tuple(slice(0, n) if dim < 2 else slice((m - n) // 2, (m - n) // 2 + n)
                                    for dim, (n, m) in enumerate(zip(tensor.shape, source.shape)))]
        return out

    def forward(self, candidate: Candidate, images: torch.Tensor) -> torch.Tensor:
        images = resize_to(images, candidate.input_size)
        if candidate == self.largest:
            return self.model(images)
        net, _ = self._template(candidate)
        net.train(self.training)
        return functional_call(net, self.tensors(candidate), (images,))

    @torch.no_grad()
    def extract(self, candidate: Candidate) -> Embedder:
        """The candidate as a member of its own, holding copies of the shared weights."""
        net = self.build(candidate)
        net.load_state_dict({k: v.detach().clone().cpu() for k, v in self.tensors(candidate).items()})
        return net


def layer_map(small: torch.nn.Sequential, large: torch.nn.Sequential) -> dict[int, int]:
    """Backbone layer of a sub-network -> layer of the largest: the stem to the stem, block b of stage s to
    block b of stage s (a shallower sub-network keeps each stage's first blocks), and the layers after the
    last stage's blocks (mobilenet's final 1x1 conv) to their counterparts at the end."""
    mapping = {0: 0}
    small_start = large_start = 1
    small_ends = small.stage_ends[:-1] + [small.stage_ends[-1] - small.tail]
    large_ends = large.stage_ends[:-1] + [large.stage_ends[-1] - large.tail]
    for small_end, large_end in zip(small_ends, large_ends):
        for offset in range(small_end - small_start):
            mapping[small_start + offset] = large_start + offset
        small_start, large_start = small_end, large_end
    for offset in range(1, small.tail + 1):
        mapping[len(small) - offset] = len(large) - offset
    return mapping


@torch.no_grad()
def sort_channels(model: Embedder) -> Embedder:
    """Reorder a trained resnet member's channels, most important first, so that every leading slice (a
    narrower sub-network) starts from the channels that matter most (Once-for-All's channel sorting); a
    mobilenet's hidden channels through sort_expansion.

    A permutation applied to every tensor that writes and reads a channel: the member computes the same
    function.  Inside a block the importance is the L1 norm of conv1's filter; in a stage's residual stream
    (written by the stem or each block's conv2 and downsample, read by the next convolutions and the
    projection) the summed |gamma| of the BatchNorms writing it.
    """
    if model.arch == "mobilenet":
        return sort_expansion(model)
    backbone = model.backbone
    layers = list(backbone)
    for block in layers[1:]:
        order = block.conv1.weight.abs().sum(dim=(1, 2, 3)).argsort(descending=True)
        _reorder_outputs(block.conv1, block.bn1, order)
        block.conv2.weight.copy_(block.conv2.weight[:, order])
    starts = [1] + backbone.stage_ends[:-1]
    for stage, (start, end) in enumerate(zip(starts, backbone.stage_ends)):
        blocks = layers[start:end]
        writers = [(block.conv2, block.bn2) for block in blocks]
        writers += [(b.downsample[0], b.downsample[1]) for b in blocks if b.downsample is not None]
        if stage == 0:
            writers.append((layers[0][0], layers[0][1]))
        order = sum(bn.weight.abs() for _, bn in writers).argsort(descending=True)
        for conv, bn in writers:
            _reorder_outputs(conv, bn, order)
        readers = [b.conv1 for b in blocks[1:]]
        following = layers[end] if end < len(layers) else None
        readers += [following.conv1, following.downsample[0]] if following is not None else []
        if stage == 0:
            readers.append(blocks[0].conv1)
        for conv in readers:
            conv.weight.copy_(conv.weight[:, order])
        if following is None:
            model.project.weight.copy_(model.project.weight[:, order])
    return model


@torch.no_grad()
def sort_expansion(model: Embedder) -> Embedder:
    """Reorder each mobilenet block's hidden (expansion) channels, most important first, so that a smaller
    expansion ratio keeps the ones that matter most (Once-for-All's sorting for elastic expand: importance is
    the L1 norm of the 1x1 projection's weights reading the channel).  A permutation of the expansion conv's
    outputs, the depthwise conv's channels and the projection's inputs: the member computes the same function.
    The residual stream between blocks (the width gene) is not sorted for a mobilenet."""
    for block in list(model.backbone)[1:-1]:
        if len(block.conv) < 4:  # a first-stage block: no expansion conv, so no hidden channels of its own
            continue
        expand, depthwise, project = block.conv[0], block.conv[1], block.conv[2]
        order = project.weight.abs().sum(dim=(0, 2, 3)).argsort(descending=True)
        _reorder_outputs(expand[0], expand[1], order)
        _reorder_outputs(depthwise[0], depthwise[1], order)
        project.weight.copy_(project.weight[:, order])
    return model


def _reorder_outputs(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, order: torch.Tensor) -> None:
    conv.weight.copy_(conv.weight[order])
    for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        tensor.copy_(tensor[order])


@torch.no_grad()
def recalibrate(model: Embedder, images: torch.Tensor, batch_size: int = 128) -> Embedder:
    """Re-estimate every BatchNorm's statistics on `images` (float, [0, 1]): a sub-network's activations
    differ from the mix the supernet's running statistics saw in training."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over all the batches
    model.train()
    for start in range(0, len(images), batch_size):
        model(resize_to(images[start:start + batch_size], model.input_size))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


# ------------------------------------------------------------------------------------------------- training


@dataclass
class Teacher:
    """What the sub-networks match: the frozen cloud (frozen-cloud), or None (shared-cloud: the largest).

    `cache`: the frozen cloud's answers for the training images' views, computed once (the edge phase's
    teacher cache, see cached_teacher); the supernet then reads them instead of running the cloud every step.
    """

    model: Embedder | None
    cache: CachedViews | None = None
    built: dict | None = None  # what building the cache did (directory, views, rows, seconds)

    @torch.no_grad()
    def answers(self, images: torch.Tensor, mixed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen cloud's embeddings of a batch and of its matching inputs (None without them)."""
        model = self.model
        return (model(resize_to(images, model.input_size)),
                model(resize_to(mixed, model.input_size)) if mixed is not None else None)


def cached_teacher(config: Config, root: Path, cloud: Embedder, images: ImageSet, progress: bool | None = None
                   ) -> Teacher:
    """The frozen `cloud` as a teacher whose answers for `images` are cached in `root`: the same cache as
    the edge phase's (train.teacher_cache's views; its default when the config has none), built once (or
    resumed, or reused) before the supernet trains."""
    views = (config.train.teacher_cache or TeacherCacheConfig()).views
    plan = plan_for_config(config, cloud_identity(cloud), images, views)
    cache, built = build_cached_views(root, plan, cloud.eval(), images, progress)
    log.info("teacher cache %s: %s", root, built)
    return Teacher(cloud, cache, built)


def train_supernet(config: Config, state_dir: Path, images: ImageSet, space: list[Candidate], teacher: Teacher,
                   start: Embedder | None, epochs: int, progress: bool | None = None, sort: bool = True,
                   callbacks: Sequence[Callback] = (), stage: str = "supernet") -> Supernet:
    """Train the supernet of `space` on `images` for `epochs`, checkpointing every epoch into `state_dir`
    (a run resumed there continues from its last finished epoch, with the same batches).  `start`: weights
    of the largest sub-network to begin from, channel-sorted unless `sort` is False.  Each callback gets an
    EpochEnd named `stage` after every checkpointed epoch."""
    settings, train_cfg = config.search, config.train
    mean, std = channel_stats(images.images)
    supernet = seeded(train_cfg.seed, "supernet", lambda: Supernet(settings.arch, max(space),
                                                                  config.family.embedding_dim, mean, std))
    if start is not None:
        supernet.model.load_state_dict(start.state_dict())
        if sort:
            sort_channels(supernet.model)
    head = shared_classifier(config, images, teacher, start)
    state = torch.nn.ModuleDict({"supernet": supernet.model, **({"head": head} if head is not None else {})})
    optimizer = torch.optim.AdamW([p for p in state.parameters() if p.requires_grad], lr=train_cfg.lr,
                                  weight_decay=train_cfg.weight_decay)
    done, history = 0, []
    if (state_dir / TRAIN_STATE).is_file():
        done, history = load_state(state_dir / TRAIN_STATE, state, optimizer)
        log.info("supernet: resuming after epoch %d of %d", done, epochs)
    cross = build_cross_model_losses(train_cfg.losses)
    dataset = teacher.cache if teacher.cache is not None else TrainImages(
        images, config.data.augment_affine, config.data.augment_hflip, config.data.augment_batched)
    unit = train_cfg.samples_per_class
    batch_size = fitting_batch_size(train_cfg, images)
    steps = len(dataset) // batch_size
    warmup = max(1, int(train_cfg.warmup_epochs * steps))
    started = time.time()
    for epoch in range(done + 1, epochs + 1):
        seed_everything(train_cfg.seed, epoch)
        rng = random.Random(train_cfg.seed * 100_003 + epoch)
        allowed = progressive_space(space, epoch, epochs) if settings.schedule == "progressive" else space
        sampler = MPerClassSampler(images.labels, unit, batch_size=batch_size, length_before_new_iter=len(dataset))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                             collate_fn=None if teacher.cache is not None else dataset.collate)
        supernet.train()
        if teacher.model is not None:
            teacher.model.eval()
        if teacher.cache is not None:
            teacher.cache.set_epoch(epoch)
        losses = []
        bar = tqdm(loader, desc=f"supernet epoch {epoch}/{epochs}", leave=False,
                   disable=True if progress is False else None)
        for step, batch in enumerate(bar):
            lr = train_cfg.lr * lr_factor((epoch - 1) * steps + step, epochs * steps, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch, labels, mixed, answers = supernet_batch(batch, teacher, train_cfg)
            loss = supernet_loss(supernet, sandwich(allowed, settings.sampled, rng), batch, labels, mixed, teacher,
                                 head, cross, train_cfg, answers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "seconds": round(time.time() - started, 1)})
        log.info("supernet epoch %d: loss %.4f", epoch, history[-1]["loss"])
        check_finite_weights(dict(state.items()), f"supernet epoch {epoch}")
        save_state(state_dir, state, optimizer, epoch, history)
        for callback in callbacks:
            callback(EpochEnd(epoch, epochs, 0, epoch == epochs, history[-1]["loss"], state_dir, stage))
    supernet.history = history
    return supernet.eval()


def fitting_batch_size(train_cfg, images: ImageSet) -> int:
    """train.batch_size, shrunk to what `images` can fill: the held-in part of a search's training split may
    be smaller than a batch, or hold fewer classes than a batch of samples_per_class each (MPerClassSampler
    asserts otherwise)."""
    unit = train_cfg.samples_per_class
    classes = int(torch.unique(images.labels).numel())
    batch_size = min(train_cfg.batch_size, len(images) // unit * unit, unit * classes)
    if batch_size < unit:
        raise ConfigError(f"train.samples_per_class: {unit}, but the search's held-in images ({len(images)} in "
                          f"{classes} classes) cannot fill one batch of a class; lower it")
    return batch_size


def supernet_batch(batch, teacher: Teacher, train_cfg) -> tuple:
    """(images, labels, matching inputs or None, the cached answers for both or None) of one loader batch:
    with a cache, the views and matching inputs are remade from their parameters and the cloud's answers
    read from it, as in the edge phase; without, the batch is augmented here and its matching inputs drawn."""
    mixing = train_cfg.mixed_matching > 0
    if teacher.cache is None:
        images, labels = batch
        return images, labels, matching_inputs(images, train_cfg.matching_inputs) if mixing else None, None
    index, labels, reference, mixed_reference, params, partners, partner_params = batch
    images, mixed = teacher.cache.images(index, params, partners, partner_params)
    return images, labels, mixed if mixing else None, (reference, mixed_reference if mixing else None)


def shared_classifier(config: Config, images: ImageSet, teacher: Teacher, start: Embedder | None
                      ) -> SharedClassifier | None:
    """The classifier the sub-networks learn through, if any: shared-cloud always (the largest learns the
    classes), frozen-cloud when train.edge_classification > 0.

    Its prototypes start at a trained cloud's class means: frozen with a frozen cloud (BCT's influence loss,
    as with an external cloud); trainable when the supernet starts from that cloud, so that its first steps
    do not pull the cloud towards random prototypes.
    """
    train_cfg, shared = config.train, teacher.model is None
    if not shared and train_cfg.edge_classification == 0:
        return None
    head = seeded(train_cfg.seed, "head:shared", lambda: SharedClassifier(
        len(images.class_names), config.family.embedding_dim, train_cfg.classifier, train_cfg.margin, train_cfg.scale))
    known = start if shared else teacher.model
    if known is not None:
        with torch.no_grad():
            cloud = embed_images(known, images.floats())
            means = torch.zeros(len(images.class_names), cloud.shape[1]).index_add_(0, images.labels, cloud)
            head.loss.W.copy_(torch.nn.functional.normalize(means, dim=1).T)
    return head if shared else head.requires_grad_(False)


def supernet_loss(supernet: Supernet, picks: list[Candidate], images: torch.Tensor, labels: torch.Tensor,
                  mixed: torch.Tensor | None, teacher: Teacher, head, cross: dict, train_cfg,
                  answers: tuple | None = None) -> torch.Tensor:
    """One batch's loss over the picked sub-networks (largest first).

    frozen-cloud: every pick matches the frozen cloud: the config's cross-model terms (train.losses), the
    label-free ones again on the matching inputs (train.mixed_matching), and train.edge_classification x
    the frozen classifier, summed over the picks.  `answers`: the cloud's embeddings of `images` and `mixed`
    read from the teacher cache (the cloud is not run).

    shared-cloud: the largest learns the classes through the shared classifier and is every other pick's
    reference (detached: in-place distillation).  Each other pick gets the classifier at weight 1 as well
    as the matching terms, averaged over the picks: matching a moving, detached reference alone lets the
    shared weights collapse the cloud's space (measured: the cloud fell from 0.87 to 0.36 top-1 in 4 epochs).
    """
    if teacher.model is not None:
        reference, mixed_reference = answers if answers is not None else teacher.answers(images, mixed)
        return sum(_pick_loss(supernet, c, images, labels, mixed, reference, mixed_reference, head, cross,
                              train_cfg.edge_classification, train_cfg.mixed_matching) for c in picks)
    cloud = supernet(picks[0], images)
    reference = cloud.detach()
    with torch.no_grad():
        mixed_reference = supernet(picks[0], mixed) if mixed is not None else None
    students = [_pick_loss(supernet, c, images, labels, mixed, reference, mixed_reference, head, cross, 1.0,
                           train_cfg.mixed_matching) for c in picks[1:]]
    return head(cloud, None, labels) + (sum(students) / len(students) if students else 0)


def _pick_loss(supernet: Supernet, candidate: Candidate, images, labels, mixed, reference, mixed_reference, head,
               cross: dict, classification: float, mixed_matching: float) -> torch.Tensor:
    emb = supernet(candidate, images)
    total = classification * head(emb, None, labels) if head is not None and classification > 0 else 0
    for weight, fn in cross.values():
        total = total + weight * fn(emb, reference, labels)
    if mixed is not None:
        emb = supernet(candidate, mixed)
        for weight, fn in cross.values():
            if not fn.uses_labels:
                total = total + mixed_matching * weight * fn(emb, mixed_reference, None)
    return total
