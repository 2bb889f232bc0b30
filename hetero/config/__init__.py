"""Family configs: YAML files read into validated dataclasses.

Every problem in a config is reported as a :class:`ConfigError` that names the file, the key and what
would have been accepted, so the CLI can print it without a traceback.  The YAML reader refuses what
PyYAML would silently accept: repeated keys (the last one would win), text that is not UTF-8, and
documents that expand to more than :data:`MAX_NODES` values through aliases.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from hetero.errors import ConfigError

# Strict types (no "3" for 3) and finite numbers only: `lr: .nan` is a typo, not a learning rate.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_CONFIG_BYTES = 1 << 20
MAX_NODES = 100_000
# Member names become file names (checkpoints/<name>.safetensors, exports/<profile>/<name>.onnx): plain
# identifiers only, so no name can point anywhere else.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_RULE = "1-64 letters, digits, '-' or '_', starting with a letter or digit"
# Pillow refuses images above twice its own decompression-bomb limit whatever we allow.
PILLOW_PIXEL_LIMIT = 178_956_970

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]


def _known(name: str, allowed, what: str) -> str:
    if name in allowed:
        return name
    raise ValueError(unknown_message(name, allowed, what))


def unknown_message(name: str, allowed, what: str) -> str:
    """"unknown <what> 'x' (did you mean 'y'?); allowed: ..." for names a user typed."""
    hint = difflib.get_close_matches(str(name), [str(a) for a in allowed], n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {what} {name!r}{suggestion}; allowed: {', '.join(sorted(map(str, allowed)))}"


def check_name(value: str, what: str = "name") -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not allowed: use {NAME_RULE}")
    return value


# How a file is read, by suffix; `weights` files need an `arch`.
MODEL_FILE_KINDS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".jit": "torchscript",
                    ".pt2": "torch.export", ".safetensors": "weights"}
EXTERNAL_KINDS = ("onnx", "torchscript", "torch.export")  # model files; `weights` go with an architecture
PICKLED_KINDS = ("torchscript", "torch.export")  # loading runs pickle: converted once, with the user's consent


def untrusted_message(path: Path, kind: str, member: str | None = None) -> str:
    where = f"member {member!r}" if member else "its member"
    return (f"{path}: a {kind} file loads through pickle, which runs any code the file carries; hetero opens one "
            f"only when {where} says `trust_model_file: true` (do so only for a file you made or trust), and then "
            f"converts it once to ONNX and keeps only the ONNX in the family. Or export the model to ONNX yourself "
            f"and give the .onnx file")


DEFAULT_INPUT_SIZE = 48
RGB3 = Annotated[list[float], Field(min_length=3, max_length=3)]


@dataclass(config=STRICT)
class MemberConfig:
    name: str
    # An architecture of the registry, timm/<name> or torchvision/<name>; for an external cloud, the
    # architecture its `weights` belong to (not needed with `model`).
    arch: str | None = None
    role: Literal["cloud", "edge"] = "edge"
    width: float = 1.0
    depth: float = 1.0
    input_size: int | None = None  # default 48; an external cloud's file may state it
    embedding_dim: int | None = None  # optional; when given it must equal the family's one dimension
    # An external cloud: an existing model file (.onnx, TorchScript .pt, torch.export .pt2), frozen.
    model: str | None = None
    # A TorchScript or torch.export `model` loads through pickle, which runs any code the file carries: hetero
    # opens one only when this says the file is trusted, converts it once to ONNX (parity checked) and keeps
    # only the ONNX in the family, so opening the family later runs nothing of the file's.
    trust_model_file: bool = False
    # safetensors weights: a library backbone's starting point, or with `frozen` the external cloud itself.
    weights: str | None = None
    frozen: bool = False  # a cloud that is never trained (implied by `model`)
    # An external cloud's preprocessing, applied to [0, 1] RGB images before its model (else the file's own).
    mean: RGB3 | None = None
    std: RGB3 | None = None
    colour_order: Literal["RGB", "BGR"] | None = None
    # A multi-exit edge member: an exit (a head emitting the family embedding) after each of these stages
    # (1-based; the last stage is always an exit), or `auto` for one per stage.  hetero's own archs only.
    exits: list[int] | Literal["auto"] | None = None
    # The architecture's activation variant: leaky_relu replaces ReLU/ReLU6 in hetero's own architectures
    # (resnet, mobilenet); a piecewise-linear network without flat sides, which `mode: lqf` linearises well.
    activation: Literal["relu", "leaky_relu"] = "relu"

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return check_name(value, "member name")

    @field_validator("arch")
    @classmethod
    def _arch_registered(cls, value: str | None) -> str | None:
        from hetero.models import ARCHITECTURES, LIBRARY_PREFIXES, architecture_known, library_models

        if value is None or architecture_known(value):
            return value
        prefix = next((p for p in LIBRARY_PREFIXES if value.startswith(p)), None)
        if prefix is not None:
            library, name = prefix.rstrip("/"), value[len(prefix):]
            offered = library_models(prefix)
            if not offered:
                raise ValueError(f"{value!r} needs {library}, which is not installed (pip install {library})")
            hint = difflib.get_close_matches(name, offered, n=3)
            raise ValueError(f"{library} has no model {name!r}"
                             f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; {len(offered)} models offered")
        return _known(value, ARCHITECTURES, "architecture (or timm/<name>, torchvision/<name>)")

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value):
        if value is not None and not all(v > 0 for v in value):
            raise ValueError(f"every std must be > 0, got {value}")
        return value

    @model_validator(mode="after")
    def _kind(self):
        if self.model and self.role != "cloud":
            raise ValueError("model: only the cloud may be an external model file; edge members are trained")
        if self.frozen and self.role != "cloud":
            raise ValueError("frozen: only the cloud may be frozen; edge members are trained")
        if self.frozen and not (self.model or self.weights):
            raise ValueError("frozen: a frozen cloud needs its `weights` (with arch) or a `model` file")
        if not self.model and not self.arch:
            raise ValueError("arch: required key is missing (or give `model` for an external cloud)")
        if self.exits is not None:
            self._check_exits()
        if self.activation != "relu" and (self.external or ":" in (self.arch or "") or "/" in (self.arch or "")):
            raise ValueError(f"activation: {self.activation!r} is a variant of hetero's own architectures (resnet, "
                             f"mobilenet); {self.arch or self.model!r} keeps its own activations")
        if self.trust_model_file and not self.model:
            raise ValueError("trust_model_file: only for an external cloud given as a `model` file")
        if self.model and not self.trust_model_file:
            kind = MODEL_FILE_KINDS.get(Path(self.model).suffix.lower())
            if kind in PICKLED_KINDS:
                raise ValueError(untrusted_message(Path(self.model), kind, self.name))
        if self.model and self.arch and not self.model.endswith(".safetensors"):
            raise ValueError(f"arch: not used with model {self.model!r}, which holds its own architecture")
        if not self.external:
            if self.input_size is None:
                self.input_size = DEFAULT_INPUT_SIZE
            for key in ("mean", "std", "colour_order"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only for an external cloud (a trained member learns its input "
                                     f"normalisation from the data)")
        return self

    def _check_exits(self) -> None:
        from hetero.models import resolve_exits, stage_count

        if self.role != "edge":
            raise ValueError("exits: only an edge member can have exits (the cloud embeds the gallery in full)")
        stages = stage_count(self.arch)
        if stages is None:
            raise ValueError(f"exits: multi-exit members need one of hetero's own architectures (resnet, mobilenet), "
                             f"whose stages are known; {self.arch!r} is a library backbone")
        if self.exits != "auto" and not self.exits:
            raise ValueError("exits: give at least one stage index, or `auto`")
        resolve_exits(self.exits, stages, self.arch)

    @property
    def external(self) -> bool:
        """A frozen model the user brings: never trained, its own preprocessing."""
        return bool(self.model) or self.frozen

    @field_validator("width", "depth")
    @classmethod
    def _positive_multiplier(cls, value: float) -> float:
        if not 0 < value <= 8:
            raise ValueError(f"must be a multiplier in (0, 8], got {value}")
        return value

    @field_validator("input_size")
    @classmethod
    def _input_size(cls, value: int | None) -> int | None:
        if value is not None and not 16 <= value <= 1024:
            raise ValueError(f"must be between 16 and 1024 pixels, got {value}")
        return value


@dataclass(config=STRICT)
class FamilyConfig:
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
    members: list[MemberConfig]
    embedding_dim: int = 128
    version: Positive = 1

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
        for index, member in enumerate(self.members):
            if member.embedding_dim is not None and member.embedding_dim != self.embedding_dim:
                raise ValueError(
                    f"members.{index}.embedding_dim: {member.embedding_dim} differs from the family's embedding_dim "
                    f"{self.embedding_dim}; every member of a family emits the one family dimension"
                )
        names = [m.name.lower() for m in self.members]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"members: member names must be unique (ignoring case, as file names on some "
                             f"systems), repeated: {', '.join(duplicates)}")
        return self

    @property
    def cloud(self) -> MemberConfig:
        return next(m for m in self.members if m.role == "cloud")

    @property
    def edges(self) -> list[MemberConfig]:
        return [m for m in self.members if m.role == "edge"]

    def member(self, name: str) -> MemberConfig:
        names = [m.name for m in self.members]
        if name not in names:
            raise ConfigError(unknown_message(name, names, "member"))
        return self.members[names.index(name)]


@dataclass(config=STRICT)
class EvalDataConfig:
    """A labeled held-out set for a family trained on unlabeled images: its classes are the test classes.

    The same sources as `data`; `test_groups` or `test_fraction` pick the held-out classes as for `data`
    (Omniglot: the standard test alphabets), and `test_fraction: 1.0` takes every class of the set.
    """

    source: Literal["procedural", "omniglot", "imagefolder"]
    path: str | None = None
    test_groups: list[str] | None = None
    test_fraction: float = 1.0
    split_seed: int = 0
    num_classes: int = 200
    samples_per_class: int = 12

    @model_validator(mode="after")
    def _consistent(self):
        if self.source != "procedural" and not self.path:
            raise ValueError(f"path: eval source {self.source!r} needs a path (a folder or a .zip)")
        if not 0 < self.test_fraction <= 1:
            raise ValueError(f"test_fraction: must be in (0, 1], got {self.test_fraction}")
        return self


@dataclass(config=STRICT)
class DataConfig:
    # unlabeled: any folder or zip of images, no class structure; split by image into train and held-out.
    source: Literal["procedural", "omniglot", "imagefolder", "unlabeled"] = "procedural"
    path: str | None = None
    # unlabeled data: the share of images held out for the label-free figures.
    held_out_fraction: float = 0.1
    # A labeled held-out set to evaluate a family trained on unlabeled images (the compatibility matrix).
    eval: EvalDataConfig | None = None
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
    # Augment a whole batch in one warp (hetero.data.augment) instead of image by image through torchvision:
    # the same ranges, other random draws; it matters when a step is short (benchmarks/train_profile.py).
    augment_batched: bool = True
    # Transparent pixels (RGBA, LA, palette or colour-key transparency) are composited onto this RGB colour
    # in training, evaluation and galleries alike, and the exported metadata says so: what a file stores
    # under a fully transparent pixel differs from tool to tool and must not reach the model.
    background: list[int] = field(default_factory=lambda: [255, 255, 255])
    # Larger images (width x height, read from the header before decoding) are skipped and named, like
    # unreadable ones: a few bytes of PNG can claim gigapixels (a decompression bomb).
    max_image_pixels: Annotated[int, Field(ge=1, le=PILLOW_PIXEL_LIMIT)] = 100_000_000

    @field_validator("background")
    @classmethod
    def _rgb(cls, value: list[int]) -> list[int]:
        if len(value) != 3 or not all(0 <= v <= 255 for v in value):
            raise ValueError(f"must be an RGB colour [r, g, b] with values 0-255, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.source in ("omniglot", "imagefolder", "unlabeled") and not self.path:
            raise ValueError(f"path: data source {self.source!r} needs a path (a folder or a .zip)")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction: must be in (0, 1), got {self.test_fraction}")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"held_out_fraction: must be in (0, 1), got {self.held_out_fraction}")
        if self.eval is not None and self.source != "unlabeled":
            raise ValueError("eval: a labeled eval set is for `source: unlabeled`; labeled data holds its own "
                             "test classes")
        if self.num_classes < 4:
            raise ValueError(f"num_classes: must be >= 4, got {self.num_classes}")
        if self.samples_per_class < 2:
            raise ValueError(f"samples_per_class: must be >= 2, got {self.samples_per_class}")
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size: must be between 16 and 1024 pixels, got {self.image_size}")
        return self


@dataclass(config=STRICT)
class AdapterConfig:
    """compat: adapter, the post-hoc baseline: a map from each independently trained edge's space into the
    cloud's, fitted on training images without labels and exported inside the edge's graph."""

    kind: Literal["procrustes", "affine"] = "procrustes"
    rank: Positive | None = None  # affine: a low-rank map (None: full rank)


@dataclass(config=STRICT)
class TeacherCacheConfig:
    """The cloud's embeddings of `views` augmented views (and matching inputs) per training image, computed
    once and read by the edge phase instead of running the cloud on every batch."""

    views: Positive = 8
    dir: str | None = None  # default: teacher_cache/ in the family directory; share one between runs here


@dataclass(config=STRICT)
class EarlyExitConfig:
    """Training and calibration of multi-exit members (members with `exits`)."""

    # Share of each training class's images (the last ones in file order) kept out of training for every
    # member, for `hetero calibrate` to pick the exit thresholds on: training classes, never test classes.
    held_out: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Weight of deeper-teaches-shallower: each earlier exit regresses onto the last exit's (detached) embedding.
    self_distillation: NonNegative = 0.0
    # Anchors of the entropy rule for unlabeled data (k-means centres of the cloud's training embeddings);
    # labeled families use the shared classifier's prototypes.
    anchors: Annotated[int, Field(ge=2, le=4096)] = 64


@dataclass(config=STRICT)
class LqfConfig:
    """mode: lqf, linearised fine-tuning (LQF, Achille et al., CVPR 2021) of the family in `previous`.

    Each member is replaced by its first-order Taylor expansion in its weights around the previous
    member's, trained by least squares to `target_scale` x one-hot through the frozen shared classifier
    (plus `compat_weight` x the squared distance to the previous cloud's embedding) with train.weight_decay
    on dw.  The objective is a convex quadratic, minimised by `train.epochs` full-batch conjugate-gradient
    iterations preconditioned by K-FAC (curvlinops): no learning rate, no dependence on the seed.
    """

    damping: Annotated[float, Field(gt=0)] = 1e-3  # added to each Kronecker factor before inverting
    target_scale: Annotated[float, Field(gt=0)] = 1.0
    compat_weight: NonNegative = 0.0


@dataclass(config=STRICT)
class TrainConfig:
    epochs: Positive = 10
    # Epochs of the edge phase in sequential mode (the cloud phase has `epochs`); default: `epochs`.
    # Students matching a fixed teacher keep improving long after the teacher would overfit.
    edge_epochs: Positive | None = None
    batch_size: Positive = 128
    samples_per_class: Positive = 4
    lr: Annotated[float, Field(gt=0)] = 5e-3
    weight_decay: NonNegative = 5e-4
    warmup_epochs: NonNegative = 1.0
    seed: Annotated[int, Field(ge=0)] = 0
    # How members are coupled.  none: independent members, each with its own classifier (the baseline).
    # shared: one shared normalised-softmax classifier plus the cross-model terms in `losses`.
    # adapter: independent members as with none, then a fitted map into the cloud's space (see AdapterConfig).
    compat: Literal["none", "shared", "adapter"] = "shared"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    teacher_cache: TeacherCacheConfig | None = None
    # sequential (default): the cloud and the shared head first, then frozen while the edge members learn
    # against them (BCT's influence loss plus the cross-model terms); joint: every member learns together.
    # Measured on Omniglot and procedural data, sequential aligned the edges better at a lower cost per epoch
    # (benchmarks/compat_quality.py).  backward: a new family, cloud included, learns against the frozen
    # cloud of the earlier family in `previous`, whose gallery is never re-indexed; it keeps that space id.
    # lqf: linearised fine-tuning of the family in `previous` on this config's data (see LqfConfig); it
    # keeps that family's members, space id and gallery.
    mode: Literal["joint", "sequential", "backward", "lqf"] = "sequential"
    # backward and lqf modes: directory of the earlier, trained family (relative paths: to the config).
    previous: str | None = None
    lqf: LqfConfig = field(default_factory=LqfConfig)
    # Start every member from the same-named member of the family in this directory (ordinary fine-tuning;
    # with mode backward and the same `previous`, fine-tuning with the backward terms).
    init: str | None = None
    classifier: Literal["cosface", "arcface"] = "cosface"
    margin: NonNegative = 0.2
    scale: Annotated[float, Field(gt=0)] = 16.0
    # Cross-model terms between each edge member (query) and the cloud member (reference), with weights.
    losses: dict[str, float] = field(
        default_factory=lambda: {"contrastive": 5.0, "relational": 5.0, "regression": 20.0})
    # Weight of the shared classifier's loss on each edge member; 0 trains edges by the cross-model terms
    # alone.  compat: none ignores it (independent members learn from their own classifier only).
    edge_classification: NonNegative = 1.0
    # Weight of the label-free cross-model terms (regression, relational) again on images made from the
    # batch: function matching off the training images, which carried over to unseen classes on Omniglot
    # (benchmarks/compat_quality.py); 0 turns it off.
    mixed_matching: NonNegative = 1.0
    # How those images are made: mixup blends two images, cutmix pastes a box of one into another (with
    # both, each image gets one of the two), dihedral then rotates/reflects each.  The matching is label-free,
    # so rotated inputs need no rotation-invariant classes; they only show the students more of the
    # teacher's function.  mixup alone is the default; examples/omniglot.yaml says what the others gained.
    matching_inputs: list[Literal["mixup", "cutmix", "dihedral"]] = field(default_factory=lambda: ["mixup"])
    detach_cloud: bool = True
    workers: Annotated[int, Field(ge=0)] = 0
    # bfloat16 autocast and channels-last tensors: `auto` turns each on where the device gains from it:
    # bf16 on a GPU or CPU that computes it in hardware (AVX512-BF16/AMX; elsewhere torch emulates it),
    # channels-last on a CUDA GPU.  Losses are always computed in fp32.
    amp: Literal["auto", "off", "bf16"] = "auto"
    channels_last: Literal["auto", "off", "on"] = "auto"
    # torch.compile (inductor) for every trained member's forward and backward; the first steps of each
    # phase pay the compilation (benchmarks/time_to_quality.py measures what it returns).
    compile: bool = False
    # Multi-exit members: held-out calibration images, self-distillation, anchors (defaults when omitted).
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)

    @field_validator("amp", "channels_last", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        # YAML 1.1 reads a bare `off` / `on` as false / true: take them as the words the user wrote
        return ("on" if value else "off") if isinstance(value, bool) else value

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
    def _consistent(self):
        if self.mode in ("backward", "lqf") and not self.previous:
            raise ValueError(f"previous: mode {self.mode!r} needs the directory of the earlier family it stays "
                             "compatible with")
        if self.mode in ("backward", "lqf") and self.compat in ("none", "adapter"):
            raise ValueError(f"compat: mode {self.mode!r} trains against the earlier cloud, so compat "
                             f"{self.compat!r} cannot apply")
        if self.mode == "lqf" and self.init:
            raise ValueError("init: mode 'lqf' always starts from (and linearises around) the family in `previous`")
        if self.teacher_cache is not None and (self.mode != "sequential" or self.compat != "shared"):
            raise ValueError("teacher_cache: the cloud's embeddings are cached for an edge phase against a frozen "
                             "cloud: mode 'sequential' with compat 'shared'")
        if self.edge_epochs is not None and self.mode != "sequential":
            raise ValueError(f"edge_epochs: only used in mode 'sequential' (mode is {self.mode!r})")
        if self.compat == "shared" and self.edge_classification == 0 and not any(self.losses.values()):
            raise ValueError("edge_classification: 0 with no cross-model term in `losses` leaves the edge members "
                             "nothing to learn from; give a loss a weight > 0 or edge_classification > 0")
        if self.previous and self.mode not in ("backward", "lqf"):
            raise ValueError(f"previous: only used in modes 'backward' and 'lqf' (mode is {self.mode!r})")
        if self.batch_size % self.samples_per_class:
            raise ValueError(f"batch_size: {self.batch_size} must be a multiple of samples_per_class "
                             f"({self.samples_per_class})")
        return self


@dataclass(config=STRICT)
class SearchTarget:
    """One student to find: the best sub-network under a device profile's budgets (and these tighter ones)."""

    name: str  # the member it becomes
    profile: str  # a built-in device profile or a profile .yaml; its runtime times the candidates
    max_flops_vs_cloud: Annotated[float, Field(gt=0, le=1)] | None = None
    max_latency_ms: Annotated[float, Field(gt=0)] | None = None  # tighter than the profile's target_latency_ms

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return check_name(value, "member name")


@dataclass(config=STRICT)
class SearchConfig:
    """`hetero search`: one weight-sharing supernet of `arch`, whose sub-networks take every combination of
    `widths`, `depths` and `input_sizes` (multipliers and sizes as on a member), then the best compatible
    sub-network per target, ranked on training classes held out of the supernet's training.

    shared-cloud: the cloud member is the largest sub-network, so every student shares the cloud's weights
    (the largest width, depth and input size must be the cloud's); it learns the classes, the smaller ones
    match it.  frozen-cloud: a separate supernet learns to match a frozen cloud (the config's cloud trained
    first on the same classes, or the cloud of the family in `cloud`).
    """

    targets: Annotated[list[SearchTarget], Field(min_length=1)]
    # frozen-cloud: the supernet matches a trained family's frozen cloud, which stays as it is with its
    # galleries (the default: it measured better in benchmarks/student_search.py); shared-cloud: the cloud
    # is the largest sub-network and trains with the others.
    design: Literal["frozen-cloud", "shared-cloud"] = "frozen-cloud"
    # A trained family: frozen-cloud, its cloud is the teacher; shared-cloud, the supernet starts from it.
    cloud: str | None = None
    widths: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = field(
        default_factory=lambda: [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0])
    depths: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = field(
        default_factory=lambda: [0.5, 1.0])
    input_sizes: Annotated[list[Annotated[int, Field(ge=16, le=1024)]], Field(min_length=1)] = field(
        default_factory=lambda: [32, 40, 48, 56, 64])
    epochs: Positive = 10
    # The sandwich rule: each step trains the largest and the smallest sub-network plus this many at random.
    # progressive: the same, but the sampled space grows over the epochs (input size, then depth, then width).
    sampled: Annotated[int, Field(ge=0)] = 2
    schedule: Literal["sandwich", "progressive"] = "sandwich"
    # Share of the training classes kept out of the supernet's training to rank the candidates on.
    validation_classes: Annotated[float, Field(gt=0, lt=1)] = 0.2
    # Sub-networks the evolutionary search evaluates per target (every one when the space is no larger).
    evaluations: Positive = 48
    population: Annotated[int, Field(ge=2)] = 12
    bn_images: Positive = 512  # training images that re-estimate a sub-network's BatchNorm statistics
    latency_runs: Positive = 20  # timed batch-1 runs per candidate (median), after 3 warm-up runs
    fine_tune_epochs: Annotated[int, Field(ge=0)] = 0  # each chosen student alone against the cloud, after

    @model_validator(mode="after")
    def _consistent(self):
        names = [t.name for t in self.targets]
        if len(set(names)) < len(names):
            raise ValueError(f"targets: member names must be unique, got {names}")
        if len(set(self.widths)) * len(set(self.depths)) * len(set(self.input_sizes)) < 2:
            raise ValueError("widths, depths, input_sizes: the search space has a single candidate "
                             f"(width {self.widths[0]}, depth {self.depths[0]}, {self.input_sizes[0]} px); give "
                             "more than one value for at least one of them")
        return self


@dataclass(config=STRICT)
class ExportConfig:
    profiles: list[str] = field(default_factory=lambda: ["server-onnx-fp32"])
    verify_images: Positive = 256


@dataclass(config=STRICT)
class Config:
    family: FamilyConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    search: SearchConfig | None = None

    @model_validator(mode="after")
    def _across_sections(self):
        cloud = self.family.cloud
        if self.data.source == "unlabeled":
            if not cloud.external:
                raise ValueError(f"family.members: unlabeled data has no classes to train a cloud on; make "
                                 f"{cloud.name!r} an external cloud (model: FILE, or frozen: true with weights)")
            needs_labels = [n for n, w in self.train.losses.items() if w > 0 and n == "contrastive"]
            if needs_labels:
                raise ValueError(f"train.losses: {needs_labels[0]!r} needs labels, which unlabeled data does not "
                                 f"have; set it to 0 (regression and relational learn from the cloud alone)")
            if self.train.compat != "shared":
                raise ValueError(f"train.compat: {self.train.compat!r} trains members on labels; unlabeled data "
                                 f"trains edges from the cloud alone (compat: shared)")
        multi_exit = [m.name for m in self.family.members if m.exits is not None]
        if multi_exit and self.train.compat != "shared":
            raise ValueError(f"train.compat: multi-exit member {multi_exit[0]!r} trains every exit against the "
                             f"cloud; compat {self.train.compat!r} does not (use 'shared')")
        if cloud.external and self.train.mode != "sequential":
            raise ValueError(f"train.mode: {self.train.mode!r} trains the cloud too, but {cloud.name!r} is external "
                             f"(frozen); use 'sequential', whose edge phase is all there is to train")
        if self.search is not None:
            self._searchable()
        elif not self.family.edges:
            raise ValueError("family.members: a family needs a cloud member and at least one edge member (or a "
                             "`search` section, for `hetero search` to find them)")
        return self

    def _searchable(self) -> None:
        search, cloud = self.search, self.family.cloud
        if self.family.edges:
            raise ValueError(f"family.members: `hetero search` finds the edge members (search.targets); list only "
                             f"the cloud (found edge {self.family.edges[0].name!r})")
        clash = [t.name for t in search.targets if t.name == cloud.name]
        if clash:
            raise ValueError(f"search.targets: {clash[0]!r} is the cloud's name; give the student another")
        if self.data.source == "unlabeled":
            raise ValueError("search: candidates are ranked by retrieval on held-out training classes; unlabeled "
                             "data has none")
        if cloud.external or cloud.arch != "resnet" or cloud.exits is not None:
            raise ValueError(f"search: the supernet is hetero's 'resnet' architecture and grows from the cloud "
                             f"member; {cloud.name!r} is {'external' if cloud.external else repr(cloud.arch)}"
                             f"{' with exits' if cloud.exits is not None else ''}")
        if search.design == "shared-cloud":
            largest = (max(search.widths), max(search.depths), max(search.input_sizes))
            if largest != (cloud.width, cloud.depth, cloud.input_size):
                raise ValueError(f"search: design 'shared-cloud' makes the cloud the largest sub-network, so the "
                                 f"largest width, depth and input size ({largest[0]}, {largest[1]}, {largest[2]} px) "
                                 f"must be the cloud's ({cloud.width}, {cloud.depth}, {cloud.input_size} px)")

    @property
    def load_size(self) -> int:
        searched = max(self.search.input_sizes) if self.search else 0
        return self.data.image_size or max([searched] + [m.input_size or DEFAULT_INPUT_SIZE
                                                          for m in self.family.members])

    def to_dict(self) -> dict:
        return asdict(self)


# -------------------------------------------------------------------------------------------- messages


def _section(loc: tuple, root):
    """The dataclass that `loc` (ending with the offending key) points into, or None."""
    kind = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        hint = typing.get_type_hints(kind).get(part) if dataclasses.is_dataclass(kind) else None
        while typing.get_origin(hint) in (list, typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = args[0] if args else None
        kind = hint
    return kind if dataclasses.is_dataclass(kind) else None


def _section_keys(loc: tuple, root) -> list[str]:
    kind = _section(loc, root)
    return [f.name for f in dataclasses.fields(kind)] if kind is not None else []


def format_validation_error(source: str, err: ValidationError, root=None, what: str = "config") -> str:
    """One line per problem: where (dotted keys), what is wrong, and what would have been accepted."""
    root = root or Config
    lines = [f"{source}: invalid {what}"]
    for problem in err.errors():
        loc = tuple(problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        # A check on a whole section names its key first ("epochs: must be ..."): report it at that key.
        named = re.match(r"(\w+): ", message)
        if problem["type"] == "value_error" and named and named.group(1) in _section_keys(loc + ("",), root):
            loc, message = loc + (named.group(1),), message[named.end():]
        where = ".".join(str(p) for p in loc) or "(top level)"
        if problem["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            keys = _section_keys(loc, root)
            hint = difflib.get_close_matches(str(loc[-1]), keys, n=1)
            message = (f"unknown key{f' (did you mean {hint[0]!r}?)' if hint else ''}; allowed here: "
                       f"{', '.join(keys)}")
        elif problem["type"] in ("missing", "missing_argument"):
            message = "required key is missing"
        elif problem["type"] == "literal_error":
            message = f"{problem['input']!r} is not allowed; {message[0].lower()}{message[1:]}"
        elif not isinstance(problem.get("input"), (dict, list)) and "got" not in message and "input" in problem:
            message = f"{message}, got {problem['input']!r}"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                        key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"key {key!r} first given on line {seen[key] + 1}", node.start_mark,
                    f"is given again on line {key_node.start_mark.line + 1} (the second would silently win)",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _count_nodes(data, budget: int) -> int:
    """Values in `data`, counting each alias expansion again (json.dumps would expand them all)."""
    stack, count = [data], 0
    while stack:
        value = stack.pop()
        count += 1
        if count > budget:
            break
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return count


def read_yaml(path: str | Path, what: str = "config"):
    """The document in a YAML file, or a ConfigError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: {what} file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file (a {what} is a YAML file)")
    try:
        raw = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a {what} is a short YAML file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start} is {raw[err.start:err.start + 1]!r}); save "
                          f"the {what} as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a {what}") from None
    if _count_nodes(data, MAX_NODES) > MAX_NODES:
        raise ConfigError(f"{path}: expands to more than {MAX_NODES:,} values (through YAML aliases?); "
                          f"a {what} is far smaller")
    return data


# ----------------------------------------------------------------------------------------------- loading


def parse_config(data: dict, source: str = "<config>") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'family' key, got {type(data).__name__}")
    try:
        # Validated as JSON: strict types (no "3" for 3), yet nested sections may be plain mappings.
        return TypeAdapter(Config).validate_json(json.dumps(data, default=str))
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None
    except (RecursionError, ValueError) as err:  # nesting too deep for json, or circular YAML aliases
        raise ConfigError(f"{source}: cannot be read as a config ({type(err).__name__})") from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    config = parse_config(read_yaml(path), str(path))
    config.data.path = _relative_to(path, config.data.path)
    config.train.previous = _relative_to(path, config.train.previous)
    config.train.init = _relative_to(path, config.train.init)
    if config.data.eval is not None:
        config.data.eval.path = _relative_to(path, config.data.eval.path)
    if config.train.teacher_cache is not None:
        config.train.teacher_cache.dir = _relative_to(path, config.train.teacher_cache.dir)
    for member in config.family.members:
        member.model = _relative_to(path, member.model)
        member.weights = _relative_to(path, member.weights)
    if config.search is not None:
        config.search.cloud = _relative_to(path, config.search.cloud)
    return config


def _relative_to(config_path: Path, value: str | None) -> str | None:
    """Relative paths in a config are relative to the config file, so configs travel with their data."""
    if not value or Path(value).is_absolute():
        return value
    resolved = (config_path.parent / value).resolve()
    return str(resolved) if resolved.exists() or not Path(value).exists() else value


def config_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
