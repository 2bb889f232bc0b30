"""Family configs: YAML files read into validated dataclasses.

Every problem in a config is reported as a :class:`ConfigError` that names the file, the key and what
would have been accepted, so the CLI can print it without a traceback.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import asdict, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

STRICT = ConfigDict(extra="forbid", strict=True)


class ConfigError(ValueError):
    """A config (family or device profile) that cannot be used, with a message for people."""


def _known(name: str, allowed, what: str) -> str:
    if name in allowed:
        return name
    hint = difflib.get_close_matches(name, list(allowed), n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ValueError(f"unknown {what} {name!r}{suggestion}; allowed: {', '.join(sorted(allowed))}")


@dataclass(config=STRICT)
class MemberConfig:
    name: str
    arch: str
    role: Literal["cloud", "edge"] = "edge"
    width: float = 1.0
    depth: float = 1.0
    input_size: int = 48
    embedding_dim: int | None = None  # optional; when given it must equal the family's one dimension

    @field_validator("arch")
    @classmethod
    def _arch_registered(cls, value: str) -> str:
        from hetero.models import ARCHITECTURES

        return _known(value, ARCHITECTURES, "architecture")

    @field_validator("width", "depth")
    @classmethod
    def _positive_multiplier(cls, value: float) -> float:
        if not 0 < value <= 8:
            raise ValueError(f"must be a multiplier in (0, 8], got {value}")
        return value

    @field_validator("input_size")
    @classmethod
    def _input_size(cls, value: int) -> int:
        if not 16 <= value <= 1024:
            raise ValueError(f"must be between 16 and 1024 pixels, got {value}")
        return value


@dataclass(config=STRICT)
class FamilyConfig:
    name: str
    members: list[MemberConfig]
    embedding_dim: int = 128
    version: int = 1

    @field_validator("embedding_dim")
    @classmethod
    def _dim(cls, value: int) -> int:
        if not 2 <= value <= 4096:
            raise ValueError(f"must be between 2 and 4096, got {value}")
        return value

    @model_validator(mode="after")
    def _one_cloud_unique_names(self):
        clouds = [m.name for m in self.members if m.role == "cloud"]
        if len(clouds) != 1:
            raise ValueError(f"members: a family needs exactly one member with role 'cloud', found {len(clouds)}")
        if len(self.members) < 2:
            raise ValueError("members: a family needs a cloud member and at least one edge member")
        for index, member in enumerate(self.members):
            if member.embedding_dim is not None and member.embedding_dim != self.embedding_dim:
                raise ValueError(
                    f"members.{index}.embedding_dim: {member.embedding_dim} differs from the family's embedding_dim "
                    f"{self.embedding_dim}; every member of a family emits the one family dimension"
                )
        names = [m.name for m in self.members]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"members: member names must be unique, repeated: {', '.join(duplicates)}")
        return self

    @property
    def cloud(self) -> MemberConfig:
        return next(m for m in self.members if m.role == "cloud")

    @property
    def edges(self) -> list[MemberConfig]:
        return [m for m in self.members if m.role == "edge"]

    def member(self, name: str) -> MemberConfig:
        names = [m.name for m in self.members]
        try:
            return self.members[names.index(name)]
        except ValueError:
            raise ConfigError(_unknown_message(name, names, "member")) from None


@dataclass(config=STRICT)
class DataConfig:
    source: Literal["procedural", "omniglot", "imagefolder"] = "procedural"
    path: str | None = None
    # Open-set split: test classes never appear in training.  Either whole top-level groups
    # (Omniglot alphabets, or the first folder level of an ImageFolder tree) or a random fraction.
    test_groups: list[str] | None = None
    test_fraction: float = 0.4
    split_seed: int = 0
    # Procedural data: identities and samples per identity.
    num_classes: int = 200
    samples_per_class: int = 12
    image_size: int | None = None  # load resolution; defaults to the largest member input size
    augment_affine: bool = True
    augment_hflip: bool = False

    @model_validator(mode="after")
    def _consistent(self):
        if self.source in ("omniglot", "imagefolder") and not self.path:
            raise ValueError(f"path: data source {self.source!r} needs a path (a folder or a .zip)")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction: must be in (0, 1), got {self.test_fraction}")
        if self.num_classes < 4 or self.samples_per_class < 2:
            raise ValueError("num_classes must be >= 4 and samples_per_class >= 2")
        return self


@dataclass(config=STRICT)
class TrainConfig:
    epochs: int = 10
    # Epochs of the edge phase in sequential mode (the cloud phase has `epochs`); default: `epochs`.
    # Students matching a fixed teacher keep improving long after the teacher would overfit.
    edge_epochs: int | None = None
    batch_size: int = 128
    samples_per_class: int = 4
    lr: float = 5e-3
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    # How members are coupled.  none: independent members, each with its own classifier (the baseline).
    # shared: one shared normalised-softmax classifier plus the cross-model terms in `losses`.
    compat: Literal["none", "shared"] = "shared"
    # sequential (default): the cloud and the shared head first, then frozen while the edge members learn
    # against them (BCT's influence loss plus the cross-model terms); joint: every member learns together.
    # Measured on Omniglot and procedural data, sequential aligned the edges better at a lower cost per epoch
    # (benchmarks/compat_quality.py).  backward: a new family, cloud included, learns against the frozen
    # cloud of the earlier family in `previous`, whose gallery is never re-indexed; it keeps that space id.
    mode: Literal["joint", "sequential", "backward"] = "sequential"
    # backward mode: directory of the earlier, trained family (relative paths are relative to the config).
    previous: str | None = None
    classifier: Literal["cosface", "arcface"] = "cosface"
    margin: float = 0.2
    scale: float = 16.0
    # Cross-model terms between each edge member (query) and the cloud member (reference), with weights.
    losses: dict[str, float] = field(
        default_factory=lambda: {"contrastive": 5.0, "relational": 5.0, "regression": 20.0})
    # Weight of the shared classifier's loss on each edge member; 0 trains edges by the cross-model terms
    # alone.  compat: none ignores it (independent members learn from their own classifier only).
    edge_classification: float = 1.0
    # Weight of the label-free cross-model terms (regression, relational) again on images made from the
    # batch: function matching off the training images, which carried over to unseen classes on Omniglot
    # (benchmarks/compat_quality.py); 0 turns it off.
    mixed_matching: float = 1.0
    # How those images are made: mixup blends two images, cutmix pastes a box of one into another (with
    # both, each image gets one of the two), dihedral then rotates/reflects each.  The matching is label-free,
    # so rotated inputs need no rotation-invariant classes; they only show the students more of the
    # teacher's function.  mixup alone is the default; examples/omniglot.yaml says what the others gained.
    matching_inputs: list[Literal["mixup", "cutmix", "dihedral"]] = field(default_factory=lambda: ["mixup"])
    detach_cloud: bool = True
    workers: int = 0
    # bfloat16 autocast and channels-last tensors: `auto` turns each on where the device gains from it:
    # bf16 on a GPU or CPU that computes it in hardware (AVX512-BF16/AMX; elsewhere torch emulates it),
    # channels-last on a CUDA GPU.  Losses are always computed in fp32.
    amp: Literal["auto", "off", "bf16"] = "auto"
    channels_last: Literal["auto", "off", "on"] = "auto"

    @field_validator("losses")
    @classmethod
    def _losses_registered(cls, value: dict[str, float]) -> dict[str, float]:
        from hetero.losses import CROSS_MODEL_LOSSES

        for name, weight in value.items():
            _known(name, CROSS_MODEL_LOSSES, "loss")
            if weight < 0:
                raise ValueError(f"weight of loss {name!r} must be >= 0, got {weight}")
        return value

    @model_validator(mode="after")
    def _positive(self):
        for key in ("epochs", "batch_size", "samples_per_class", "edge_epochs"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.mode == "backward" and not self.previous:
            raise ValueError("previous: mode 'backward' needs the directory of the earlier family it stays "
                             "compatible with")
        if self.mode == "backward" and self.compat == "none":
            raise ValueError("compat: mode 'backward' trains against the earlier cloud, so compat 'none' cannot apply")
        if self.edge_epochs is not None and self.mode != "sequential":
            raise ValueError(f"edge_epochs: only used in mode 'sequential' (mode is {self.mode!r})")
        if self.edge_classification < 0:
            raise ValueError(f"edge_classification: must be >= 0, got {self.edge_classification}")
        if self.compat == "shared" and self.edge_classification == 0 and not any(self.losses.values()):
            raise ValueError("edge_classification: 0 with no cross-model term in `losses` leaves the edge members "
                             "nothing to learn from; give a loss a weight > 0 or edge_classification > 0")
        if self.mixed_matching < 0:
            raise ValueError(f"mixed_matching: must be >= 0, got {self.mixed_matching}")
        if self.previous and self.mode != "backward":
            raise ValueError(f"previous: only used in mode 'backward' (mode is {self.mode!r})")
        if self.batch_size % self.samples_per_class:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of samples_per_class ({self.samples_per_class})"
            )
        return self


@dataclass(config=STRICT)
class ExportConfig:
    profiles: list[str] = field(default_factory=lambda: ["server-onnx-fp32"])
    verify_images: int = 256


@dataclass(config=STRICT)
class Config:
    family: FamilyConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def load_size(self) -> int:
        return self.data.image_size or max(m.input_size for m in self.family.members)

    def to_dict(self) -> dict:
        return asdict(self)


def _unknown_message(name: str, allowed, what: str) -> str:
    try:
        _known(name, allowed, what)
    except ValueError as err:
        return str(err)
    return ""


def _section_keys(loc: tuple) -> list[str]:
    """The keys allowed in the section that `loc` (ending with the offending key) points into."""
    import dataclasses
    import typing

    kind = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        hint = typing.get_type_hints(kind).get(part)
        args = typing.get_args(hint)
        kind = args[0] if args else hint
        if not dataclasses.is_dataclass(kind):
            return []
    return [f.name for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind) else []


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid config"]
    for problem in err.errors():
        loc = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            message = f"unknown key; allowed here: {', '.join(_section_keys(problem['loc']))}"
            hint = difflib.get_close_matches(str(problem["loc"][-1]), _section_keys(problem["loc"]), n=1)
            if hint:
                message = f"unknown key (did you mean {hint[0]!r}?); allowed here: {', '.join(_section_keys(problem['loc']))}"
        elif problem["type"] in ("missing", "missing_argument"):
            message = "required key is missing"
        elif problem["type"] == "literal_error":
            message = f"{problem['input']!r} is not allowed; {message[0].lower()}{message[1:]}"
        elif "input" in problem and not message.startswith(("must", "unknown", "members", "path", "test_", "batch", "previous", "compat", "edge_epochs", "mixed_matching")):
            message = f"{message}, got {problem['input']!r}"
        lines.append(f"  {loc}: {message}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "<config>") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'family' key, got {type(data).__name__}")
    try:
        # Validated as JSON: strict types (no "3" for 3), yet nested sections may be plain mappings.
        return TypeAdapter(Config).validate_json(json.dumps(data, default=str))
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    config = parse_config(data, str(path))
    config.data.path = _relative_to(path, config.data.path)
    config.train.previous = _relative_to(path, config.train.previous)
    return config


def _relative_to(config_path: Path, value: str | None) -> str | None:
    """Relative paths in a config are relative to the config file, so configs travel with their data."""
    if not value or Path(value).is_absolute():
        return value
    resolved = (config_path.parent / value).resolve()
    return str(resolved) if resolved.exists() or not Path(value).exists() else value


def save_config(config: Config, path: Path) -> None:
    from hetero.manifest import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
