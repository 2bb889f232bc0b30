"""Joint training of a model family.

Every member sees the same augmented batch.  The loss is, per member, a normalised-softmax classification
loss (through one classifier shared by all members, or one each when `compat: none`) plus, per edge member,
the configured cross-model terms against the cloud member's embeddings of the same images.

State is checkpointed atomically after every epoch (safetensors + JSON, no pickle); a resumed run continues
from the last finished epoch and ends with the same weights as an uninterrupted one.

Under `torchrun --nproc_per_node N` the same code trains data-parallel (see hetero/distributed.py): every
rank draws the same global batch (same seed, same augmentation, whatever N) and trains on its contiguous
slice; BatchNorm and the cross-model terms see the whole global batch and DDP averages the gradients, so a
step equals one process's step on the global batch up to float rounding.  Rank 0 alone logs and writes.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from hetero import distributed
from hetero.config import Config, ConfigError, save_config
from hetero.data import TrainImages, channel_stats, load_split
from hetero.losses import SharedClassifier, build_cross_model_losses
from hetero.manifest import atomic_path, atomic_write_json, sha256_file, space_id, write_manifest
from hetero.models import Embedder, build_member, count_flops, count_params, resize_to

log = logging.getLogger("hetero.train")

STATE = "checkpoints/train_state"


class Family(torch.nn.Module):
    """The members of one family plus their classifier(s), built from a config."""

    def __init__(self, config: Config, num_classes: int, mean, std):
        super().__init__()
        fam, train = config.family, config.train
        self.cloud_name = fam.cloud.name
        # Each part starts from its own seed, so a cloud starts (and in sequential mode, ends) the same
        # whatever edge members sit beside it: recipes that differ in the edges share their cloud.
        self.members = torch.nn.ModuleDict({
            m.name: _seeded(train.seed, f"member:{m.name}", lambda m=m: build_member(m, fam.embedding_dim, mean, std))
            for m in fam.members})
        head = lambda: SharedClassifier(num_classes, fam.embedding_dim, train.classifier, train.margin, train.scale)  # noqa: E731
        names = [m.name for m in fam.members] if train.compat == "none" else ["shared"]
        self.heads = torch.nn.ModuleDict({name: _seeded(train.seed, f"head:{name}", head) for name in names})
        self.cross = build_cross_model_losses(train.losses) if train.compat != "none" else {}
        # backward mode: the earlier family's cloud, frozen; every new member's embeddings answer to it.
        self.previous: Embedder | None = None
        self.amp = False  # members compute in bfloat16 autocast; the losses always in float32

    def embed(self, member: Embedder, images: torch.Tensor) -> torch.Tensor:
        """A member's float32 embeddings of a batch (resized to its input size), in bf16 autocast if `amp`."""
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return member(resize_to(images, member.input_size)).float()

    def forward(self, images: torch.Tensor, labels: torch.Tensor, trained: list[str], detach_cloud: bool,
                edge_classification: float = 1.0, mixed: torch.Tensor | None = None,
                mixed_matching: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch (family_loss), as a method so that DistributedDataParallel can wrap it."""
        return family_loss(self, trained, images, labels, detach_cloud, edge_classification, mixed, mixed_matching)

    def head(self, member: str) -> SharedClassifier:
        return self.heads["shared"] if "shared" in self.heads else self.heads[member]

    @property
    def cloud(self) -> Embedder:
        return self.members[self.cloud_name]

    def edge_names(self) -> list[str]:
        return [n for n in self.members if n != self.cloud_name]


def _seeded(seed: int, part: str, build):
    """build() with the global RNG seeded from (seed, part) and restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + zlib.crc32(part.encode()))
        return build()


def _seed_everything(seed: int, epoch: int) -> None:
    # Seeded per epoch, so a run resumed at any epoch draws the same batches as an uninterrupted one.
    torch.manual_seed(seed * 100_003 + epoch)
    np.random.seed((seed * 100_003 + epoch) % 2**32)
    random.seed(seed * 100_003 + epoch)


def _phases(config: Config, family: Family) -> list[tuple[list[str], int]]:
    """(members trained, epochs) per phase: joint trains all at once, sequential the cloud first."""
    epochs = config.train.epochs
    if config.train.mode == "backward":
        return [(list(family.members), epochs)]
    if config.train.mode == "sequential":
        return [([family.cloud_name], epochs), (family.edge_names(), config.train.edge_epochs or epochs)]
    return [(list(family.members), epochs)]


def _accelerations(train_cfg, device: torch.device) -> tuple[bool, bool]:
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


def _global_batch_size(train_cfg, images: int) -> int:
    """`train.batch_size` is the global batch: all ranks together see that many images per step."""
    unit = distributed.world_size() * train_cfg.samples_per_class
    if train_cfg.batch_size % unit:
        raise ConfigError(
            f"train.batch_size ({train_cfg.batch_size}) is the global batch, split over "
            f"{distributed.world_size()} processes, each with whole classes of samples_per_class "
            f"({train_cfg.samples_per_class}) images: it must be a multiple of {unit}, e.g. "
            f"{max(unit, train_cfg.batch_size // unit * unit)}")
    return min(train_cfg.batch_size, images // unit * unit)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def family_loss(family: Family, trained: list[str], images: torch.Tensor, labels: torch.Tensor,
                detach_cloud: bool, edge_classification: float = 1.0, mixed: torch.Tensor | None = None,
                mixed_matching: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch for the members being trained; the reference embedding is computed once.

    The reference is the cloud member's embedding, or in backward mode the earlier family's frozen cloud's,
    against which the new cloud is a query like the edge members.  The classification loss is a mean over
    this rank's images (DDP averages it over ranks); the cross-model terms, some of which compare every
    pair of the batch, see the global batch (gathered; alone a no-op).  `mixed` holds images made from the
    batch (see matching_inputs) for the label-free terms, weighted by `mixed_matching`.
    """
    cloud_emb = None
    if family.previous is not None:
        with torch.no_grad():
            reference = family.embed(family.previous, images)
    else:
        cloud_trained = family.cloud_name in trained
        with torch.set_grad_enabled(cloud_trained):
            cloud_emb = family.embed(family.cloud, images)
        reference = cloud_emb.detach() if detach_cloud or not cloud_trained else cloud_emb
    if family.cross:
        reference, all_labels = distributed.gather_with_grad(reference), distributed.gather_with_grad(labels)
    total = torch.zeros((), device=images.device)
    parts: dict[str, float] = {}
    for name in trained:
        member = family.members[name]
        is_reference = name == family.cloud_name and cloud_emb is not None
        emb = cloud_emb if is_reference else family.embed(member, images)
        loss = family.head(name)(emb, None, labels)
        parts[f"{name}/cls"] = loss.item()
        if name != family.cloud_name and "shared" in family.heads:
            # Independent members (compat: none) have only their own classifier to learn from: never weighed.
            loss = loss * edge_classification
        if not is_reference:
            all_emb = distributed.gather_with_grad(emb) if family.cross else emb
            for term, (weight, fn) in family.cross.items():
                value = fn(all_emb, reference, all_labels)
                parts[f"{name}/{term}"] = value.item()
                loss = loss + weight * value
        total = total + loss
    if mixed is not None and mixed_matching > 0 and family.cross:
        total = total + mixed_matching * match_on_mixed_images(family, trained, mixed, parts)
    return total, parts


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


def match_on_mixed_images(family: Family, trained: list[str], mixed: torch.Tensor, parts: dict) -> torch.Tensor:
    """Function matching (Beyer et al., 2022): the label-free cross-model terms on mixed images.

    Mixed images (see matching_inputs) lie off the training images, where a student that only matched the
    reference on real images would drift; matching there is what carries over to unseen classes.
    """
    queries = [name for name in trained if name != family.cloud_name or family.previous is not None]
    total = torch.zeros((), device=mixed.device)
    if not queries:  # the cloud phase: no student yet
        return total
    reference_model = family.previous if family.previous is not None else family.cloud
    with torch.no_grad():
        reference = distributed.gather_with_grad(family.embed(reference_model, mixed))
    for name in queries:
        member = family.members[name]
        emb = distributed.gather_with_grad(family.embed(member, mixed))
        for term, (weight, fn) in family.cross.items():
            if not fn.uses_labels:
                value = fn(emb, reference, None)
                parts[f"{name}/mixed-{term}"] = value.item()
                total = total + weight * value
    return total


# ------------------------------------------------------------------------------------------- state on disk


def _save_state(out: Path, family: Family, optimizer, epoch: int, history: list) -> None:
    tensors = {f"model.{k}": v.cpu().contiguous() for k, v in family.state_dict().items()}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    with atomic_path(out / f"{STATE}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(out / f"{STATE}.json", {"epoch": epoch, "param_groups": opt["param_groups"], "history": history})


def _load_state(out: Path, family: Family, optimizer) -> tuple[int, list]:
    meta = json.loads((out / f"{STATE}.json").read_text())
    tensors = load_file(str(out / f"{STATE}.safetensors"))
    family.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["epoch"], meta["history"]


# ---------------------------------------------------------------------------------------------- training


def train(config: Config, out: str | Path, resume: bool = False, progress: bool | None = None) -> dict:
    """Train the family of `config` into directory `out`; return the manifest written there."""
    distributed.init_from_env()
    out = Path(out)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    train_cfg = config.train
    torch.use_deterministic_algorithms(True, warn_only=True)

    split = load_split(config.data, config.load_size)
    mean, std = channel_stats(split.train.images)
    family = Family(config, len(split.train.class_names), mean, std)
    previous = None
    if train_cfg.mode == "backward":
        previous = read_previous(config)
        family.previous = previous["cloud"]
        _prototypes_from(family, family.previous, split.train)
    if distributed.world_size() > 1:
        distributed.convert_batchnorm(family)  # statistics of the global batch, as in one process
    device = distributed.device()
    amp, channels_last = _accelerations(train_cfg, device)
    family.amp = amp
    family.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    optimizer = torch.optim.AdamW(family.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)

    dataset = TrainImages(split.train, config.data.augment_affine, config.data.augment_hflip)
    batch_size = _global_batch_size(train_cfg, len(dataset))

    def epoch_loader():
        # A new sampler per epoch: MPerClassSampler reshuffles its own state in place, which would make a
        # resumed run draw other batches than an uninterrupted one.  Every rank loads the same global batch
        # (same seeds, so the same augmentation whatever the world size) and trains on its own slice of it.
        sampler = MPerClassSampler(split.train.labels, train_cfg.samples_per_class, batch_size=batch_size,
                                   length_before_new_iter=len(dataset))
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                           num_workers=train_cfg.workers)

    steps_per_epoch = len(epoch_loader())

    done, history = 0, []
    if resume and (out / f"{STATE}.json").exists():
        done, history = _load_state(out, family, optimizer)  # every rank loads the same state
        if distributed.is_main():
            log.info("resuming %s after epoch %d", out, done)

    started = time.time()
    epoch = 0
    for trained, epochs in _phases(config, family):
        for name, member in family.members.items():
            member.requires_grad_(name in trained)
        for name, head in family.heads.items():
            head.requires_grad_(name == "shared" or name in trained)
        if family.cloud_name not in trained or family.previous is not None:
            family.head(family.cloud_name).requires_grad_(False)  # frozen shared head: BCT's influence loss
        model = distributed.wrap_ddp(family)  # per phase: DDP syncs the parameters that require grad now
        warmup = max(1, int(train_cfg.warmup_epochs * steps_per_epoch))
        for phase_epoch in range(epochs):
            epoch += 1
            if epoch <= done:
                continue
            _seed_everything(train_cfg.seed, epoch)
            family.train()
            for name, member in family.members.items():
                member.train(name in trained)
            if family.previous is not None:
                family.previous.eval()
            bar = tqdm(epoch_loader(), desc=f"epoch {epoch}/{sum(e for _, e in _phases(config, family))}", leave=False,
                       disable=True if progress is False or not distributed.is_main() else None)
            totals = []
            for step, (images, labels) in enumerate(bar):
                factor = _lr_factor(phase_epoch * steps_per_epoch + step, epochs * steps_per_epoch, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = train_cfg.lr * factor
                # Mixed on the global batch, before slicing, so N processes mix as one would.
                mixed = matching_inputs(images, train_cfg.matching_inputs) if train_cfg.mixed_matching > 0 else images
                images, labels, mixed = (t.to(device) for t in distributed.local_slice(images, labels, mixed))
                if channels_last:
                    images, mixed = (t.contiguous(memory_format=torch.channels_last) for t in (images, mixed))
                loss, parts = model(images, labels, trained, train_cfg.detach_cloud,
                                    train_cfg.edge_classification, mixed, train_cfg.mixed_matching)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                totals.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
            epoch_loss = distributed.mean_across_ranks(float(np.mean(totals)))
            history.append({"epoch": epoch, "loss": epoch_loss, "seconds": round(time.time() - started, 1)})
            if distributed.is_main():
                log.info("epoch %d: loss %.4f", epoch, epoch_loss)
                _save_state(out, family, optimizer, epoch, history)
            distributed.barrier()

    run = {"device": device.type, "processes": distributed.world_size(), "amp_bf16": amp, "channels_last": channels_last}
    manifest = write_family(config, out, family.cpu(), split, history, previous, run) if distributed.is_main() else None
    distributed.barrier()
    return distributed.broadcast_object(manifest)


def read_previous(config: Config) -> dict:
    """The earlier family of a backward-compatible update: its manifest and its frozen cloud member."""
    from hetero.manifest import ManifestError, read_manifest

    run_dir = Path(config.train.previous)
    try:
        manifest = read_manifest(run_dir)
        if manifest["embedding_dim"] != config.family.embedding_dim:
            raise ManifestError(f"its embedding_dim is {manifest['embedding_dim']}, this family's is "
                                f"{config.family.embedding_dim}: a new family must keep the old dimension")
        name = next(m["name"] for m in manifest["members"] if m["role"] == "cloud")
        cloud = load_member(run_dir, manifest, name).requires_grad_(False)
    except (ManifestError, KeyError, StopIteration) as err:
        raise ConfigError(f"train.previous ({run_dir}): not a usable earlier family: {err}") from None
    return {"dir": run_dir, "manifest": manifest, "cloud_name": name, "cloud": cloud}


@torch.no_grad()
def _prototypes_from(family: Family, old_cloud: Embedder, images) -> None:
    """Start the shared head at the old cloud's class means and keep it frozen (BCT's influence loss).

    Means of the old embeddings work for classes the old family never saw as well as for those it did.
    """
    from hetero.evaluate import embed

    old = embed(old_cloud, images.floats())
    prototypes = torch.zeros(len(images.class_names), old.shape[1]).index_add_(0, images.labels, old)
    head = family.head(family.cloud_name).loss
    head.W.copy_(torch.nn.functional.normalize(prototypes, dim=1).T)


def write_family(config: Config, out: Path, family: Family, split, history: list, previous: dict | None = None,
                 run: dict | None = None) -> dict:
    """Write each member's checkpoint and the family manifest (a backward update keeps the old space id)."""
    fam = config.family
    members, files = [], {}
    for cfg in fam.members:
        member = family.members[cfg.name]
        path = out / "checkpoints" / f"{cfg.name}.safetensors"
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in member.state_dict().items()}, str(tmp),
                      metadata={"member": cfg.name, "family": fam.name})
        files[cfg.name] = {"file": path.relative_to(out).as_posix(), "sha256": sha256_file(path)}
    cloud_flops = count_flops(family.cloud)
    for cfg in fam.members:
        member = family.members[cfg.name]
        flops = count_flops(member)
        members.append({
            "name": cfg.name, "role": cfg.role, "arch": cfg.arch, "width": cfg.width, "depth": cfg.depth,
            "input_size": cfg.input_size, "dim": fam.embedding_dim,
            "mean": member.mean.flatten().tolist(), "std": member.std.flatten().tolist(),
            "params": count_params(member), "flops": flops, "flops_vs_cloud": round(flops / cloud_flops, 4),
            "checkpoint": files[cfg.name],
        })
    manifest = {
        "format": "hetero-family/1",
        "family": fam.name, "version": fam.version, "embedding_dim": fam.embedding_dim,
        "space_id": previous["manifest"]["space_id"] if previous else
        space_id(fam.name, fam.version, fam.embedding_dim, files[fam.cloud.name]["sha256"]),
        "compat": config.train.compat, "mode": config.train.mode,
        "members": members,
        "data": {"train_images": len(split.train), "train_classes": len(split.train.class_names),
                 "test_images": len(split.test), "test_classes": len(split.test.class_names),
                 "skipped_images": split.skipped},
        "training": {"epochs": history[-1]["epoch"] if history else 0, **(run or {}), "history": history},
        "artifacts": [],
    }
    if previous:
        old = previous["manifest"]
        manifest["previous"] = {
            "dir": str(previous["dir"].resolve()), "family": old["family"], "version": old["version"],
            "space_id": old["space_id"], "cloud": previous["cloud_name"],
            "checkpoint": next(m["checkpoint"] for m in old["members"] if m["name"] == previous["cloud_name"]),
        }
    write_manifest(out, manifest)
    return manifest


def load_member(run_dir: str | Path, manifest: dict, name: str) -> Embedder:
    """Rebuild a trained member from its manifest entry and checkpoint (sha256 checked)."""
    from hetero.manifest import ManifestError, check_file

    entries = {m["name"]: m for m in manifest["members"]}
    if name not in entries:
        raise ManifestError(f"no member {name!r} in this family; members: {', '.join(entries)}")
    entry = entries[name]
    path = check_file(run_dir, entry["checkpoint"])
    member = Embedder(entry["arch"], entry["width"], entry["depth"], entry["dim"], entry["input_size"],
                      entry["mean"], entry["std"])
    member.load_state_dict(load_file(str(path)))
    return member.eval()
