"""The family directory's names and its manifest: the validated records of members, artifacts, data,
training and compatibility (pydantic models; unknown keys refused), and the space id that names an
embedding space."""
from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hetero.config import check_name

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
FORMAT = "hetero-family/1"
TRAIN_STATE = "checkpoints/train_state.safetensors"
# The files stages write into a family directory by name (glob patterns), besides those its manifest lists:
# reports, the default gallery, the default teacher cache and a search's records, fronts, caches and fine-tuning
# states.
# `train --overwrite` removes these and the manifest's files, and nothing else.
STAGE_FILES = (CONFIG, MANIFEST, TRAIN_STATE, "report.json", "verify.json",
               "gallery/gallery.json", "gallery/index.faiss", "gallery/shards/shard-*.safetensors",
               "gallery/shards/shard-*.json", "teacher_cache/cache.json", "teacher_cache/shards/shard-*.safetensors",
               "search/candidates.json", "search/search.json", "search/pareto-*.md", "search/pareto-*.png",
               f"search/fine-tune-*/{TRAIN_STATE}", "search/teacher-cache*/cache.json",
               "search/teacher-cache*/shards/shard-*.safetensors")
SHA256 = Field(pattern=r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------- records


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class FileRecord(Record):
    file: str
    sha256: str = SHA256


class ExitRecord(Record):
    """One exit of a multi-exit member: after which stage, and the FLOPs of one image up to it (cumulative:
    the trunk so far, every head and entropy on the way, this exit's included)."""

    stage: int = Field(ge=1)
    flops: int = Field(ge=0)
    flops_vs_cloud: float = Field(ge=0)


class MemberRecord(Record):
    name: str
    # external: a frozen model the user brought (its file copied to `checkpoint`), with its own preprocessing.
    # multi-exit: one trunk with an exit after several stages (`exits`), each emitting the family embedding.
    kind: Literal["trained", "external", "multi-exit"] = "trained"
    role: Literal["cloud", "edge"]
    arch: str  # for an external model file: its format (onnx, torchscript, torch.export)
    width: float = Field(gt=0)
    depth: float = Field(gt=0)
    input_size: int = Field(ge=16, le=1024)
    dim: int = Field(ge=2, le=4096)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    params: int = Field(ge=0)
    flops: int = Field(ge=0)
    flops_vs_cloud: float = Field(ge=0)
    checkpoint: FileRecord
    colour_order: Literal["RGB", "BGR"] = "RGB"
    fingerprint: str | None = None  # an external model's sha256 (bytes, or tensors for weights)
    # an external cloud given as a trusted TorchScript / torch.export file: its name and format (the family
    # keeps only its ONNX conversion)
    converted_from: dict[str, str] | None = None
    # compat: adapter: the map from this member's own space into the cloud's, applied inside its graph
    adapter: dict[str, Any] | None = None
    exits: list[ExitRecord] | None = None  # multi-exit members, shallowest first; the last is the member itself
    exit_head: Literal["pooled", "grid"] = "pooled"  # multi-exit members: how the earlier exits pool
    # multi-exit members: the entropy rule's anchors and temperatures, and the thresholds `hetero calibrate` set
    early_exit: dict[str, Any] | None = None
    activation: Literal["relu", "leaky_relu"] = "relu"  # the architecture's activation variant
    # mobilenet's per-block expansion ratios and depthwise kernel sizes (None: the architecture's own)
    expand_ratios: list[float] | None = None
    kernel_sizes: list[int] | None = None
    # mode: lqf: the weights the member was linearised around (checkpoint holds the merged w0 + dw)
    linearised_at: FileRecord | None = None
    # found by `hetero search`: the profile it was chosen for, its sub-network, validation top-1 and latency
    search: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _plain(cls, value: str) -> str:
        return check_name(value, "member name")

    @model_validator(mode="after")
    def _exits_for_multi_exit(self):
        if (self.kind == "multi-exit") != bool(self.exits):
            raise ValueError(f"exits: a multi-exit member has exits and only it (member {self.name!r}, kind "
                             f"{self.kind!r})")
        return self

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: list[float]) -> list[float]:
        if not all(v > 0 for v in value):
            raise ValueError(f"every std must be > 0, got {value}")
        return value


class ArtifactRecord(Record):
    member: str
    profile: str
    format: str
    precision: str
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    file: str
    sha256: str = SHA256
    bytes: int = Field(ge=0)
    export_seconds: float = Field(ge=0)
    over_budget: list[str] = Field(default_factory=list)
    quantization: dict[str, Any] = Field(default_factory=dict)
    minimum_deployment_target: str | None = None
    checked_on: list[str] = Field(default_factory=list)  # the runtimes (with versions) export held it to
    unchecked_on: list[str] = Field(default_factory=list)  # declared runtimes it could not be held to: why
    profile_file: str | None = None  # a profile that is not built in, kept in the family for later verifies

    @property
    def key(self) -> tuple[str, str]:
        return self.member, self.profile


class DataRecord(Record):
    train_images: int = Field(ge=0)
    train_classes: int = Field(ge=0)
    test_images: int = Field(ge=0)
    test_classes: int = Field(ge=0)
    skipped_images: list[str] = Field(default_factory=list)


class EpochRecord(Record):
    epoch: int
    loss: float
    seconds: float


class TrainingRecord(Record):
    epochs: int = Field(ge=0)
    device: str | None = None
    processes: int | None = None
    amp_bf16: bool | None = None
    channels_last: bool | None = None
    history: list[EpochRecord] = Field(default_factory=list)
    teacher_cache: dict[str, Any] | None = None  # where the edge phase's cloud answers came from, and their cost
    lqf: list[dict[str, Any]] | None = None  # mode lqf: per member, what was linearised and how the objective fell


class PreviousRecord(Record):
    """The earlier family of a backward update; its cloud is copied in, so nothing outside is read again."""

    dir: str  # where it was when this family was trained: for people, never read
    family: str
    version: int
    space_id: str
    cloud: str
    member: MemberRecord | None = None  # None in families written before the copy was kept
    checkpoint: FileRecord


class CompatibilityRecord(Record):
    matrix: dict[str, dict[str, dict[str, float]]]
    edges: dict[str, dict[str, float | bool]]
    backward: dict[str, Any] | None = None


class Manifest(Record):
    format: Literal["hetero-family/1"] = FORMAT
    family: str
    version: int = Field(ge=1)
    embedding_dim: int = Field(ge=2, le=4096)
    space_id: str = Field(pattern=r"^hs-[0-9a-f]{16}$")
    compat: Literal["none", "shared", "adapter"]
    mode: Literal["joint", "sequential", "backward", "lqf"]
    members: list[MemberRecord] = Field(min_length=2)
    data: DataRecord
    training: TrainingRecord
    artifacts: list[ArtifactRecord] = Field(default_factory=list)
    compatibility: CompatibilityRecord | None = None
    previous: PreviousRecord | None = None

    @model_validator(mode="after")
    def _consistent(self):
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"members: names must be unique, got {names}")
        if sum(m.role == "cloud" for m in self.members) != 1:
            raise ValueError("members: exactly one member must have role 'cloud'")
        for index, artifact in enumerate(self.artifacts):
            if artifact.member not in names:
                raise ValueError(f"artifacts.{index}.member: {artifact.member!r} is not a member of this family")
        for member in self.members:
            if member.dim != self.embedding_dim:
                raise ValueError(f"members: {member.name!r} has dim {member.dim}, the family {self.embedding_dim}")
        return self


def schema_problems(err: ValidationError) -> str:
    """A manifest's first problems on one line: where (dotted keys) and what is wrong."""
    return "; ".join(f"{'.'.join(map(str, p['loc'])) or '(top level)'}: {p['msg'].removeprefix('Value error, ')}"
                     for p in err.errors()[:8])


# ------------------------------------------------------------------------------------------- space ids


def space_id(family_name: str, version: int, dim: int, cloud_digest: str) -> str:
    """Fingerprint of one embedding space: the family and the cloud weights that define it."""
    key = f"{family_name}|{version}|{dim}|{cloud_digest}"
    return "hs-" + hashlib.sha256(key.encode()).hexdigest()[:16]
