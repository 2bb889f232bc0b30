"""The `family` section: the members (registry architectures, library backbones, external model files) and
the family that holds them, plus how a model file's suffix says the way it is read."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from hetero.config.validation import STRICT, Positive, check_known, check_name, unknown_message
from hetero.errors import ConfigError

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
    # A timm/ or torchvision/ backbone starts from its library's pretrained weights, fetched (or read from the
    # library's cache) as the library does; `weights` gives a local file instead.
    pretrained: bool = False
    frozen: bool = False  # a cloud that is never trained (implied by `model`)
    # An external cloud's preprocessing, applied to [0, 1] RGB images before its model (else the file's own).
    mean: RGB3 | None = None
    std: RGB3 | None = None
    colour_order: Literal["RGB", "BGR"] | None = None
    # A multi-exit edge member: an exit (a head emitting the family embedding) after each of these stages
    # (1-based; the last stage is always an exit), or `auto` for one per stage.  hetero's own archs only.
    exits: list[int] | Literal["auto"] | None = None
    # How an earlier exit reads its stage: `grid` (pooled to up to 4 x 4 cells, a learned mix of max and
    # average pooling; more FLOPs in the head, counted in each exit's), the default for multi-exit members
    # because every earlier exit measured higher with it, or `pooled` (one global average).
    exit_head: Literal["pooled", "grid"] | None = None
    # The architecture's activation variant: leaky_relu replaces ReLU/ReLU6 in hetero's own architectures
    # (resnet, mobilenet); a piecewise-linear network without flat sides, which `mode: lqf` linearises well.
    activation: Literal["relu", "leaky_relu"] = "relu"
    # mobilenet only: each inverted-residual block's expansion ratio (hidden channels = input channels x
    # ratio), one per block in order (as many as the depth gives: 10 at depth 1.0).  Not given: the stage's,
    # 1 in the first stage and 4 after (today's mobilenet).  `hetero search` writes it for its mobilenet students.
    expand_ratios: list[float] | None = None
    # mobilenet only: each block's depthwise kernel size (3, 5 or 7), one per block as `expand_ratios`.  Not
    # given: 3 everywhere.
    kernel_sizes: list[int] | None = None

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
        return check_known(value, ARCHITECTURES, "architecture (or timm/<name>, torchvision/<name>)")

    def _check_pretrained(self) -> None:
        from hetero.models import is_library_arch

        if self.external or not is_library_arch(self.arch or ""):
            raise ValueError(f"pretrained: only a timm/ or torchvision/ member that trains starts from its library's "
                             f"weights; {self.arch or self.model!r} is not one")
        if self.weights:
            raise ValueError("pretrained: `weights` already gives the starting point; keep one of the two")

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
        if self.pretrained:
            self._check_pretrained()
        if self.exits is not None:
            self._check_exits()
            self.exit_head = self.exit_head or "grid"
        elif self.exit_head == "grid":
            raise ValueError(f"exit_head: {self.exit_head!r} shapes the heads of a multi-exit member; give `exits` too")
        else:  # configs saved before grid heads became the default say `pooled` for every member: the same as none
            self.exit_head = None
        if self.activation != "relu" and (self.external or ":" in (self.arch or "") or "/" in (self.arch or "")):
            raise ValueError(f"activation: {self.activation!r} is a variant of hetero's own architectures (resnet, "
                             f"mobilenet); {self.arch or self.model!r} keeps its own activations")
        if self.expand_ratios is not None or self.kernel_sizes is not None:
            self._check_blocks()
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

    def _check_blocks(self) -> None:
        from hetero.models import check_mobilenet_blocks

        given = "expand_ratios" if self.expand_ratios is not None else "kernel_sizes"
        if self.arch != "mobilenet":
            raise ValueError(f"{given}: per-block options of the mobilenet architecture; member {self.name!r} is "
                             f"{self.arch or self.model!r}")
        check_mobilenet_blocks(self.depth, self.expand_ratios, self.kernel_sizes)

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
