"""Compatibility-aware student search (`hetero search`): one weight-sharing supernet, the best compatible
sub-network per device.

The supernet is the largest sub-network, an ordinary :class:`Embedder`.  A smaller sub-network keeps the
first channels of every layer (elastic width), the first blocks of every stage (elastic depth) and runs at
its own input size: its tensors are leading slices of the largest's, so training it trains them (Once-for-All,
Cai et al. 2020).  Each step trains the largest, the smallest and `sampled` random sub-networks (the sandwich
rule), or, with `schedule: progressive`, the same over a space that grows from input size to depth to width.

Two designs.  shared-cloud: the cloud member is the largest sub-network; it learns the classes and every
smaller one matches its (detached) embeddings, so each student literally shares the cloud's weights
("compatibility through architecture", Duggal et al. 2021).  frozen-cloud: a separate supernet matches a
frozen cloud, the one of a trained family (`search.cloud`).

Candidates are ranked by M[candidate][cloud] top-1 on training classes kept out of the supernet's training
(`validation_classes`), never on test classes, after re-estimating each one's BatchNorm statistics.  Their
latency is real: each candidate is exported for the target's profile and timed batch-1 by that profile's
runtime on this machine.  An evolutionary search (parents from the Pareto front of compatibility against
latency, one gene mutated per child) finds the best candidate under each target's budgets; the chosen ones
are extracted with their shared weights and written into the family manifest as ordinary members.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from torch.func import functional_call
from tqdm import tqdm

from hetero import formats
from hetero.config import Config, MemberConfig
from hetero.data import ImageSet, TrainImages, channel_stats, load_split, split_open_set
from hetero.errors import ConfigError, ManifestError
from hetero.maths import retrieval_metrics
from hetero.family import (TRAIN_STATE, FamilyStore, claim_for_training, new_directory, output_directory,
                           write_config, writing)
from hetero.files import atomic_write_text, path_bytes
from hetero.losses import SharedClassifier, build_cross_model_losses
from hetero.models import Embedder, count_flops, count_params, embed_images, resize_to
from hetero.profiles import load_profile
from hetero.training import (Family, load_state, lr_factor, save_state, seed_everything, seeded,
                          check_finite_weights, matching_inputs, write_family)

log = logging.getLogger("hetero.search")

SEARCH_DIR = "search"
CANDIDATES = "candidates.json"
BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclass(frozen=True, order=True)
class Candidate:
    """One sub-network: width and depth multipliers of the supernet's architecture, and an input size."""

    width: float
    depth: float
    input_size: int

    @property
    def key(self) -> str:
        return f"w{self.width:g}-d{self.depth:g}-{self.input_size}px"


def search_space(settings) -> list[Candidate]:
    return sorted(Candidate(w, d, s) for w in set(settings.widths) for d in set(settings.depths)
                  for s in set(settings.input_sizes))


def progressive_space(space: list[Candidate], epoch: int, epochs: int) -> list[Candidate]:
    """Progressive shrinking's space at `epoch` (1-based): elastic input size first, then depth, then width."""
    largest = max(space)
    third = 3 * (epoch - 1) // epochs
    return [c for c in space if (third >= 2 or c.width == largest.width) and (third >= 1 or c.depth == largest.depth)]


def sandwich(allowed: list[Candidate], sampled: int, rng: random.Random) -> list[Candidate]:
    """The largest and the smallest sub-network (the space is a product, so both are in it), then `sampled`
    at random; each once."""
    picks = [max(allowed), min(allowed)] + [rng.choice(allowed) for _ in range(sampled)]
    return list(dict.fromkeys(picks))


class Supernet(torch.nn.Module):
    """The largest sub-network, and every smaller one as a view of its tensors (see the module doc)."""

    def __init__(self, arch: str, largest: Candidate, dim: int, mean, std):
        super().__init__()
        self.arch, self.largest, self.dim = arch, largest, dim
        self.model = Embedder(arch, largest.width, largest.depth, dim, largest.input_size, mean, std)
        self._templates: dict[Candidate, tuple[Embedder, dict[str, str]]] = {}

    def build(self, candidate: Candidate) -> Embedder:
        """A fresh member of the candidate's architecture (its own, unshared tensors).

        Built without touching the global RNG: templates are made when a candidate is first sampled, and a
        resumed run must draw the same batches as an uninterrupted one that made them earlier.
        """
        mean, std = self.model.mean.flatten().tolist(), self.model.std.flatten().tolist()
        with torch.random.fork_rng(devices=[]):
            return Embedder(self.arch, candidate.width, candidate.depth, self.dim, candidate.input_size, mean, std)

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
        """The candidate's parameters and buffers as leading slices (views) of the largest's."""
        net, names = self._template(candidate)
        big = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        out = {}
        for key, tensor in net.state_dict().items():
            source = big[names[key]]
            if any(n > m for n, m in zip(tensor.shape, source.shape)):
                raise ConfigError(f"search: sub-network {candidate.key} is larger than the supernet "
                                  f"({self.largest.key}) at {key}")
            out[key] = source[tuple(slice(0, n) for n in tensor.shape)]
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
    block b of stage s (a shallower sub-network keeps each stage's first blocks)."""
    mapping = {0: 0}
    small_start = large_start = 1
    for small_end, large_end in zip(small.stage_ends, large.stage_ends):
        for offset in range(small_end - small_start):
            mapping[small_start + offset] = large_start + offset
        small_start, large_start = small_end, large_end
    return mapping


@torch.no_grad()
def sort_channels(model: Embedder) -> Embedder:
    """Reorder a trained resnet member's channels, most important first, so that every leading slice (a
    narrower sub-network) starts from the channels that matter most (Once-for-All's channel sorting).

    A permutation applied to every tensor that writes and reads a channel: the member computes the same
    function.  Inside a block the importance is the L1 norm of conv1's filter; in a stage's residual stream
    (written by the stem or each block's conv2 and downsample, read by the next convolutions and the
    projection) the summed |gamma| of the BatchNorms writing it.
    """
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
    """What the sub-networks match: the frozen cloud (frozen-cloud), or None (shared-cloud: the largest)."""

    model: Embedder | None


def train_supernet(config: Config, state_dir: Path, images: ImageSet, space: list[Candidate], teacher: Teacher,
                   start: Embedder | None, epochs: int, progress: bool | None = None, sort: bool = True) -> Supernet:
    """Train the supernet of `space` on `images` for `epochs`, checkpointing every epoch into `state_dir`
    (a run resumed there continues from its last finished epoch, with the same batches).  `start`: weights
    of the largest sub-network to begin from, channel-sorted unless `sort` is False."""
    settings, train_cfg = config.search, config.train
    mean, std = channel_stats(images.images)
    supernet = seeded(train_cfg.seed, "supernet", lambda: Supernet("resnet", max(space), config.family.embedding_dim,
                                                                  mean, std))
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
    dataset = TrainImages(images, config.data.augment_affine, config.data.augment_hflip, config.data.augment_batched)
    unit = train_cfg.samples_per_class
    batch_size = min(train_cfg.batch_size, len(dataset) // unit * unit)
    steps = len(dataset) // batch_size
    warmup = max(1, int(train_cfg.warmup_epochs * steps))
    started = time.time()
    for epoch in range(done + 1, epochs + 1):
        seed_everything(train_cfg.seed, epoch)
        rng = random.Random(train_cfg.seed * 100_003 + epoch)
        allowed = progressive_space(space, epoch, epochs) if settings.schedule == "progressive" else space
        sampler = MPerClassSampler(images.labels, unit, batch_size=batch_size, length_before_new_iter=len(dataset))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                             collate_fn=dataset.collate)
        supernet.train()
        if teacher.model is not None:
            teacher.model.eval()
        losses = []
        bar = tqdm(loader, desc=f"supernet epoch {epoch}/{epochs}", leave=False,
                   disable=True if progress is False else None)
        for step, (batch, labels) in enumerate(bar):
            lr = train_cfg.lr * lr_factor((epoch - 1) * steps + step, epochs * steps, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            mixed = matching_inputs(batch, train_cfg.matching_inputs) if train_cfg.mixed_matching > 0 else None
            loss = supernet_loss(supernet, sandwich(allowed, settings.sampled, rng), batch, labels, mixed, teacher,
                                 head, cross, train_cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "seconds": round(time.time() - started, 1)})
        log.info("supernet epoch %d: loss %.4f", epoch, history[-1]["loss"])
        check_finite_weights(dict(state.items()), f"supernet epoch {epoch}")
        save_state(state_dir, state, optimizer, epoch, history)
    supernet.history = history
    return supernet.eval()


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
                  mixed: torch.Tensor | None, teacher: Teacher, head, cross: dict, train_cfg) -> torch.Tensor:
    """One batch's loss over the picked sub-networks (largest first).

    frozen-cloud: every pick matches the frozen cloud: the config's cross-model terms (train.losses), the
    label-free ones again on the matching inputs (train.mixed_matching), and train.edge_classification x
    the frozen classifier, summed over the picks.

    shared-cloud: the largest learns the classes through the shared classifier and is every other pick's
    reference (detached: in-place distillation).  Each other pick gets the classifier at weight 1 as well
    as the matching terms, averaged over the picks: matching a moving, detached reference alone lets the
    shared weights collapse the cloud's space (measured: the cloud fell from 0.87 to 0.36 top-1 in 4 epochs).
    """
    if teacher.model is not None:
        with torch.no_grad():
            reference = teacher.model(resize_to(images, teacher.model.input_size))
            mixed_reference = teacher.model(resize_to(mixed, teacher.model.input_size)) if mixed is not None else None
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


# -------------------------------------------------------------------------------------------- the search


@dataclass
class Scorer:
    """Measures candidates, each figure once, kept in a JSON file so an interrupted search resumes."""

    supernet: Supernet
    cloud: Embedder
    validation: object  # a Split: held-out training classes, gallery and query rows
    bn_images: torch.Tensor
    file: Path
    latency_runs: int
    calibration: torch.Tensor
    statics: dict  # Candidate -> static_records' figures

    def __post_init__(self):
        self.records: dict[str, dict] = json.loads(self.file.read_text()) if self.file.is_file() else {}
        self._members: dict[Candidate, Embedder] = {}
        val = self.validation.test
        self._labels = val.labels
        self._queries = val.floats()[self.validation.query_index]
        self._gallery = embed_images(self.cloud, val.floats()[self.validation.gallery_index])

    def record(self, candidate: Candidate) -> dict:
        if candidate.key not in self.records:
            self.records[candidate.key] = {**self.statics[candidate], "latency": {}}
            self._save()
        return self.records[candidate.key]

    def member(self, candidate: Candidate) -> Embedder:
        """The candidate extracted with its shared weights and its own BatchNorm statistics."""
        if candidate not in self._members:
            self._members[candidate] = recalibrate(self.supernet.extract(candidate), self.bn_images)
        return self._members[candidate]

    def top1(self, candidate: Candidate) -> float:
        """M[candidate][cloud] top-1 on the validation classes."""
        record = self.record(candidate)
        if "top1" not in record:
            queries = embed_images(self.member(candidate), self._queries)
            labels = self._labels
            figures = retrieval_metrics(queries, labels[self.validation.query_index], self._gallery,
                                        labels[self.validation.gallery_index])
            record["top1"] = round(figures["top1"], 5)
            self._save()
        return record["top1"]

    def latency(self, candidate: Candidate, profile) -> dict:
        """Median batch-1 latency (ms) and file size of the candidate exported for `profile`, timed by the
        profile's runtime here."""
        record = self.record(candidate)
        if profile.name not in record["latency"]:
            record["latency"][profile.name] = time_export(self.member(candidate), profile, self.calibration,
                                                          self.latency_runs)
            self._save()
        return record["latency"][profile.name]

    def _save(self) -> None:
        atomic_write_text(self.file, json.dumps(self.records, indent=1))


def static_records(space: list[Candidate], config: Config) -> dict[Candidate, dict]:
    """FLOPs (and their share of the cloud's) and parameters of every candidate; no weights needed."""
    cloud = config.family.cloud
    dim = config.family.embedding_dim
    cloud_flops = count_flops(Embedder(cloud.arch, cloud.width, cloud.depth, dim, cloud.input_size))
    records = {}
    for candidate in space:
        model = Embedder("resnet", candidate.width, candidate.depth, dim, candidate.input_size)
        flops = count_flops(model)
        records[candidate] = {**dataclasses.asdict(candidate), "flops": flops,
                              "flops_vs_cloud": round(flops / cloud_flops, 5), "params": count_params(model)}
    return records


def time_export(model: Embedder, profile, calibration: torch.Tensor, runs: int) -> dict:
    """Export `model` with the profile's converter, then time it batch-1 with the profile's runtime."""
    spec = formats.get(profile.format)
    metadata = {"member": "candidate", "role": "edge", "embedding_dim": model.dim, "input_size": model.input_size,
                "layout": profile.layout, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
                "input_range": [0.0, 1.0], "precision": profile.precision, "profile": profile.name,
                "format": profile.format, "batch": profile.batch}
    with tempfile.TemporaryDirectory(prefix="hetero-search-") as folder:
        path = Path(folder) / f"candidate{spec.suffix}"
        spec.export_function()(model, path, profile, metadata, resize_to(calibration, model.input_size), None)
        size = path_bytes(path)
        runtime = spec.open(path, profile.verify.runtime)
        one = np.random.default_rng(0).random((max(1, profile.batch), 3, model.input_size, model.input_size),
                                              dtype=np.float32)
        for _ in range(3):
            runtime.embed(one)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            runtime.embed(one)
            times.append((time.perf_counter() - started) * 1000)
        if hasattr(runtime, "close"):
            runtime.close()
    return {"median_ms": round(statistics.median(times), 4), "bytes": size, "runs": runs}


def static_problems(record: dict, profile, target) -> list[str]:
    """The budgets a candidate breaks before it is exported (FLOPs, params, estimated file size)."""
    budgets, problems = profile.budgets, []
    if target.max_flops_vs_cloud is not None and record["flops_vs_cloud"] > target.max_flops_vs_cloud:
        problems.append("max_flops_vs_cloud")
    if budgets.max_mflops is not None and record["flops"] / 1e6 > budgets.max_mflops:
        problems.append("max_mflops")
    if budgets.max_params is not None and record["params"] > budgets.max_params:
        problems.append("max_params")
    weight_bytes = record["params"] * BYTES_PER_WEIGHT.get(profile.precision, 4)
    if budgets.max_file_mb is not None and weight_bytes / 2**20 > budgets.max_file_mb:
        problems.append("max_file_mb")
    return problems


def latency_budget(profile, target) -> float | None:
    limits = [x for x in (profile.budgets.target_latency_ms, target.max_latency_ms) if x is not None]
    return min(limits) if limits else None


def measured_problems(measured: dict, profile, target) -> list[str]:
    problems = []
    budget = latency_budget(profile, target)
    if budget is not None and measured["median_ms"] > budget:
        problems.append("latency")
    if profile.budgets.max_file_mb is not None and measured["bytes"] / 2**20 > profile.budgets.max_file_mb:
        problems.append("max_file_mb")
    return problems


def no_candidate_message(target, profile, records: list[dict], budget: str) -> str:
    """Why no sub-network meets a target: the budget and the smallest figure the space reaches."""
    where = f"search.targets {target.name!r} (profile {profile.name!r})"
    figure = {"max_flops_vs_cloud": ("flops_vs_cloud", target.max_flops_vs_cloud, "of the cloud's FLOPs"),
              "max_mflops": ("flops", (profile.budgets.max_mflops or 0) * 1e6, "FLOPs"),
              "max_params": ("params", profile.budgets.max_params, "parameters")}
    if budget in figure:
        field, limit, words = figure[budget]
        best = min(records, key=lambda r: r[field])
        return (f"{where}: no sub-network meets {budget} {limit:g}; the smallest in the search space "
                f"({_key(best)}) has {best[field]:g} {words}")
    if budget == "latency":
        timed = [r for r in records if profile.name in r["latency"]]
        best = min(timed, key=lambda r: r["latency"][profile.name]["median_ms"])
        return (f"{where}: no sub-network meets the latency budget {latency_budget(profile, target):g} ms; the "
                f"fastest measured ({_key(best)}) takes {best['latency'][profile.name]['median_ms']:.3f} ms "
                f"on this machine")
    return f"{where}: no sub-network meets the profile's file size budget {profile.budgets.max_file_mb:g} MB"


def _key(record: dict) -> str:
    return Candidate(record["width"], record["depth"], record["input_size"]).key


def pareto_front(points: list[tuple[float, float, Candidate]]) -> list[tuple[float, float, Candidate]]:
    """(latency, top-1, candidate) not dominated: nothing else is as fast and as good, and better in one."""
    front, best = [], -1.0
    for latency, top1, candidate in sorted(points, key=lambda p: (p[0], -p[1])):
        if top1 > best:
            front.append((latency, top1, candidate))
            best = top1
    return front


def neighbours(candidate: Candidate, settings) -> list[Candidate]:
    """Candidates one step away along one gene (the next smaller or larger width, depth or input size)."""
    genes = {"width": sorted(set(settings.widths)), "depth": sorted(set(settings.depths)),
             "input_size": sorted(set(settings.input_sizes))}
    out = []
    for gene, values in genes.items():
        at = values.index(getattr(candidate, gene))
        for step in (-1, 1):
            if 0 <= at + step < len(values):
                out.append(dataclasses.replace(candidate, **{gene: values[at + step]}))
    return out


def evolve(pool: list[Candidate], evaluate, settings, rng: random.Random) -> list[Candidate]:
    """The candidates of `pool` an evolutionary search visits, up to `settings.evaluations`.

    evaluate(candidate) -> (latency, top-1) or None when it breaks a measured budget.  A random population
    first; then each child mutates one gene of a parent drawn from the Pareto front of what was visited.
    A pool no larger than the budget is visited whole.
    """
    if len(pool) <= settings.evaluations:
        for candidate in pool:
            evaluate(candidate)
        return list(pool)
    inside = set(pool)
    seen: dict[Candidate, tuple[float, float] | None] = {}
    for candidate in rng.sample(pool, min(settings.population, len(pool))):
        seen[candidate] = evaluate(candidate)
    while len(seen) < settings.evaluations:
        front = pareto_front([(*v, c) for c, v in seen.items() if v is not None]) or [(0, 0, c) for c in seen]
        parent = rng.choice(front)[2]
        children = [c for c in neighbours(parent, settings) if c in inside and c not in seen]
        child = rng.choice(children) if children else rng.choice([c for c in pool if c not in seen])
        seen[child] = evaluate(child)
    return list(seen)


def check_runtime(profile, target_name: str) -> None:
    """A target's profile must have its converter and runtime here: candidates are timed for real."""
    spec = formats.get(profile.format)
    missing = spec.missing_packages()
    where = f"search.targets {target_name!r}: profile {profile.name!r}"
    if missing:
        raise ConfigError(f"{where} times candidates with {profile.verify.runtime} on this machine, but {missing[0]} "
                          f"is not installed. Install it with: {spec.install_hint()}")
    host = {"darwin": "macos", "linux": "linux"}.get(sys.platform, sys.platform)
    if profile.verify.host not in ("any", host):
        raise ConfigError(f"{where} times candidates with {profile.verify.runtime}, which runs on "
                          f"{profile.verify.host} only (this machine: {host}); search for it on a {profile.verify.host} "
                          f"machine, or pick a profile whose runtime runs here")


def feasible_pools(records: dict[Candidate, dict], targets: list, profiles: dict) -> dict[str, list[Candidate]]:
    """Per target, the candidates within its static budgets (FLOPs, params, estimated file size); a target
    none meets is refused with the smallest figure the space reaches, before anything is trained."""
    pools = {}
    for target in targets:
        profile = profiles[target.name]
        problems = {c: static_problems(r, profile, target) for c, r in records.items()}
        pools[target.name] = [c for c, p in problems.items() if not p]
        if not pools[target.name]:
            order = [b for b in ("max_flops_vs_cloud", "max_mflops", "max_params", "max_file_mb")
                     if any(b in p for p in problems.values())]
            budget = next((b for b in order if all(b in p for p in problems.values())), order[0])
            raise ConfigError(no_candidate_message(target, profile, list(records.values()), budget))
    return pools


def find_students(scorer: Scorer, pools: dict[str, list[Candidate]], targets: list, profiles: dict, settings,
                  seed: int) -> dict[str, dict]:
    """Per target: the candidate of highest validation top-1 that meets every budget, and what was visited."""
    chosen = {}
    for target in targets:
        profile, pool = profiles[target.name], pools[target.name]

        def evaluate(candidate: Candidate, profile=profile, target=target):
            measured = scorer.latency(candidate, profile)
            top1 = scorer.top1(candidate)
            return None if measured_problems(measured, profile, target) else (measured["median_ms"], top1)

        visited = evolve(pool, evaluate, settings, random.Random(seed * 100_003 + len(chosen)))
        feasible = [c for c in visited if not measured_problems(scorer.latency(c, profile), profile, target)]
        if not feasible:
            broken = "latency" if any("latency" in measured_problems(scorer.latency(c, profile), profile, target)
                                      for c in visited) else "max_file_mb"
            raise ConfigError(no_candidate_message(target, profile, [scorer.record(c) for c in visited], broken))
        best = max(feasible, key=lambda c: (scorer.top1(c), -scorer.latency(c, profile)["median_ms"]))
        chosen[target.name] = {"target": target, "profile": profile, "candidate": best, "visited": visited}
        log.info("search %s: %s (validation top-1 %.4f, %.3f ms on %s)", target.name, best.key, scorer.top1(best),
                 scorer.latency(best, profile)["median_ms"], profile.name)
    return chosen


# -------------------------------------------------------------------------------------------- the command


def search(config: Config, out: str | Path, resume: bool = False, overwrite: bool = False,
           progress: bool | None = None) -> FamilyStore:
    """`hetero search`: train the supernet, search it per target, write the family with the chosen students."""
    settings = config.search
    if settings is None:
        raise ConfigError("search: the config has no `search` section (targets, search space) for `hetero search`")
    profiles = {t.name: load_profile(t.profile) for t in settings.targets}
    for name, profile in profiles.items():
        check_runtime(profile, name)
    if settings.design == "frozen-cloud" and not settings.cloud:
        raise ConfigError("search.cloud: design 'frozen-cloud' matches the cloud of a trained family; give its "
                          "directory (train one with `hetero train`), or use design 'shared-cloud'")
    space = search_space(settings)
    statics = static_records(space, config)
    pools = feasible_pools(statics, settings.targets, profiles)  # a budget nothing meets fails before training
    out = output_directory(out)
    with new_directory(out), writing(out, "search"):
        claim_for_training(out, config, resume, overwrite)
        split = load_split(config.data, config.load_size)
        seed = config.train.seed
        inner = split_open_set(split.train, None, settings.validation_classes, seed)
        write_config(out, config)
        given = given_cloud(config) if settings.cloud else None
        teacher = Teacher(given if settings.design == "frozen-cloud" else None)
        # A supernet whose largest sub-network is the cloud's architecture starts from the cloud's weights.
        cloud_cfg = config.family.cloud
        start = given if max(space) == Candidate(cloud_cfg.width, cloud_cfg.depth, cloud_cfg.input_size) else None
        supernet = train_supernet(config, out, inner.train, space, teacher, start, settings.epochs, progress)
        bn_images = inner.train.spread(settings.bn_images)
        cloud = teacher.model if teacher.model is not None else recalibrate(supernet.extract(max(space)), bn_images)
        folder = out / SEARCH_DIR
        folder.mkdir(exist_ok=True)
        calibration = inner.train.spread(max(p.calibration_images for p in profiles.values()))
        scorer = Scorer(supernet, cloud, inner, bn_images, folder / CANDIDATES, settings.latency_runs, calibration,
                        statics)
        chosen = find_students(scorer, pools, settings.targets, profiles, settings, seed)
        found = {pick["candidate"] for pick in chosen.values()}
        members = {c: scorer.member(c) for c in sorted(found)}
        if settings.fine_tune_epochs:  # once per sub-network, however many targets chose it
            members = {c: fine_tune(config, out, m, cloud, inner.train, progress) for c, m in members.items()}
        students = {name: members[pick["candidate"]] for name, pick in chosen.items()}
        write_search_results(folder, scorer, chosen, profiles)
        _write_searched_family(config, out, split, cloud, students, chosen, scorer, supernet.history)
    return FamilyStore.open(out)


def given_cloud(config: Config) -> Embedder:
    """The cloud of the trained family in `search.cloud`; it must be the config's cloud member."""
    path = Path(config.search.cloud)
    try:
        store = FamilyStore.open(path)
        record, cloud = store.cloud, store.load_member(store.cloud.name)
    except ManifestError as err:
        raise ConfigError(f"search.cloud ({path}): not a usable trained family: {err}") from None
    mine = config.family.cloud
    for field in ("arch", "width", "depth", "input_size"):
        if getattr(record, field) != getattr(mine, field):
            raise ConfigError(f"search.cloud ({path}): its cloud {record.name!r} has {field} "
                              f"{getattr(record, field)!r}, this config's cloud {mine.name!r} {getattr(mine, field)!r}")
    if record.dim != config.family.embedding_dim:
        raise ConfigError(f"search.cloud ({path}): its cloud returns {record.dim}-d vectors, family.embedding_dim is "
                          f"{config.family.embedding_dim}")
    return cloud.requires_grad_(False)


def fine_tune(config: Config, out: Path, student: Embedder, cloud: Embedder, images: ImageSet,
              progress: bool | None) -> Embedder:
    """A chosen student alone against the frozen final cloud for `fine_tune_epochs` (resumable)."""
    candidate = Candidate(student.width, student.depth, student.input_size)
    epochs = config.search.fine_tune_epochs
    state_dir = out / SEARCH_DIR / f"fine-tune-{candidate.key}-e{epochs}"
    tuned = train_supernet(config, state_dir, images, [candidate], Teacher(cloud.requires_grad_(False)), student,
                           epochs, progress, sort=False)
    return recalibrate(tuned.extract(candidate), images.spread(config.search.bn_images))


def write_search_results(folder: Path, scorer: Scorer, chosen: dict, profiles: dict) -> None:
    """Per profile: the Pareto front (validation top-1 against latency) as a Markdown table and a plot, and
    every visited candidate in search.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {"chosen": {}, "fronts": {}}
    for profile_name in sorted({p.name for p in profiles.values()}):
        visited = {c for pick in chosen.values() if pick["profile"].name == profile_name for c in pick["visited"]}
        points = [(scorer.latency(c, pick_profile(chosen, profile_name))["median_ms"], scorer.top1(c), c)
                  for c in sorted(visited)]
        front = pareto_front(points)
        picks = {name: pick["candidate"] for name, pick in chosen.items() if pick["profile"].name == profile_name}
        rows = ["| sub-network | MFLOPs | of the cloud | params | latency ms | validation top-1 | chosen for |",
                "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for latency, top1, c in front:
            record = scorer.record(c)
            names = ", ".join(n for n, p in picks.items() if p == c)
            rows.append(f"| {c.key} | {record['flops'] / 1e6:.1f} | {record['flops_vs_cloud']:.4f} | "
                        f"{record['params']:,} | {latency:.3f} | {top1:.4f} | {names} |")
        (folder / f"pareto-{profile_name}.md").write_text(
            f"# Pareto front on {profile_name}: {len(points)} sub-networks visited, {len(front)} on the front\n\n"
            + "\n".join(rows) + "\n")
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=12, c="0.6", label="visited")
        ax.plot([p[0] for p in front], [p[1] for p in front], "o-", ms=4, label="Pareto front")
        for name, c in picks.items():
            ax.scatter([scorer.latency(c, pick_profile(chosen, profile_name))["median_ms"]], [scorer.top1(c)],
                       marker="*", s=160, zorder=3, label=f"{name}: {c.key}")
        ax.set_xlabel(f"batch-1 latency on this machine, {profile_name} (ms)")
        ax.set_ylabel("M[candidate][cloud] top-1, validation classes")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"pareto-{profile_name}.png", dpi=120)
        plt.close(fig)
        summary["fronts"][profile_name] = [{"candidate": c.key, "latency_ms": lat, "top1": top1}
                                           for lat, top1, c in front]
    for name, pick in chosen.items():
        summary["chosen"][name] = {"profile": pick["profile"].name, **scorer.record(pick["candidate"]),
                                   "visited": len(pick["visited"])}
    atomic_write_text(folder / "search.json", json.dumps(summary, indent=1))


def pick_profile(chosen: dict, profile_name: str):
    return next(pick["profile"] for pick in chosen.values() if pick["profile"].name == profile_name)


def _write_searched_family(config: Config, out: Path, split, cloud: Embedder, students: dict[str, Embedder],
                           chosen: dict, scorer: Scorer, history: list) -> None:
    """The cloud and each chosen student as ordinary members of a family (manifest, checkpoints)."""
    members = [config.family.cloud] + [
        MemberConfig(name=name, role="edge", arch="resnet", width=s.width, depth=s.depth, input_size=s.input_size)
        for name, s in students.items()]
    plain = dataclasses.replace(config, family=dataclasses.replace(config.family, members=members), search=None)
    family = Family(plain, len(split.train.class_names), [0.5] * 3, [0.5] * 3)
    family.members[config.family.cloud.name] = cloud
    for name, student in students.items():
        family.members[name] = student
    settings = config.search
    facts = {"search": {"design": settings.design, "schedule": settings.schedule, "epochs": settings.epochs,
                        "candidates": len(search_space(settings)), "seconds": history[-1]["seconds"] if history else 0}}
    write_family(plain, out, family.eval(), split, history, run=None)
    store = FamilyStore.open(out)
    for record in store.manifest.members:
        if record.name in chosen:
            pick = chosen[record.name]
            record.search = {"profile": pick["profile"].name, "candidate": pick["candidate"].key,
                             "validation_top1": scorer.top1(pick["candidate"]),
                             "latency_ms": scorer.latency(pick["candidate"], pick["profile"])["median_ms"],
                             "fine_tune_epochs": settings.fine_tune_epochs, **facts["search"]}
    store.save()
