"""The family being trained: its members and classifier(s) as one module, and an external cloud opened from
its file (frozen, outside the trained modules)."""
from __future__ import annotations

from pathlib import Path

import torch

from hetero.config import Config
from hetero.errors import ConfigError
from hetero.external import ExternalCloud, file_metadata, model_format, open_external
from hetero.losses import SharedClassifier, build_cross_model_losses
from hetero.models import Embedder, MultiExitEmbedder, build_member, resize_to
from hetero.training.objective import family_loss
from hetero.training.plumbing import seeded


def _member(member, dim: int, mean, std) -> Embedder:
    try:
        return build_member(member, dim, mean, std)
    except ValueError as err:  # its weights do not fit, or its pretrained ones cannot be had
        raise ConfigError(f"family.members[{member.name}]: {err}") from None


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
            m.name: seeded(train.seed, f"member:{m.name}", lambda m=m: _member(m, fam.embedding_dim, mean, std))
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
