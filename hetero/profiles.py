"""Device profiles: one YAML file per target device, read into a validated dataclass.

The built-in profiles ship as package data (``device_profiles/``); a user's own profile is any YAML file
given by path.  A profile fixes the exported format and numeric form, the layout and batch a device feeds,
the budgets a member must fit, and the tolerances verification holds the artifact to.
"""
from __future__ import annotations

import difflib
from dataclasses import field
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from hetero.config import STRICT, ConfigError, format_validation_error

FORMAT_PRECISIONS = {
    "onnx": ("fp32", "fp16", "int8"),
    "tflite": ("fp32", "fp16", "int8", "int8-weights", "int8-dynamic"),
    "coreml": ("fp32", "fp16", "int8-weights"),
    "executorch": ("fp32", "int8"),
}
FORMAT_RUNTIMES = {
    "onnx": ("onnxruntime",),
    "tflite": ("litert", "tflite_runtime"),
    "coreml": ("coreml",),
    "executorch": ("executorch",),
}
FORMAT_SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage", "executorch": ".pte"}


@dataclass(config=STRICT)
class Budgets:
    max_file_mb: float | None = None
    max_params: int | None = None
    max_mflops: float | None = None
    target_latency_ms: float | None = None  # batch 1 on the reference CPU (the machine verify runs on)


@dataclass(config=STRICT)
class Tolerances:
    min_cosine: float = 0.9999  # smallest cosine to the torch member over the verification images
    max_top1_drop: float = 0.005  # largest drop of M[edge via runtime][cloud] top-1 against the torch member


@dataclass(config=STRICT)
class Verification:
    runtime: str
    host: Literal["linux", "macos", "any"] = "any"


@dataclass(config=STRICT)
class DeviceProfile:
    name: str
    description: str
    format: Literal["onnx", "tflite", "coreml", "executorch"]
    precision: str
    verify: Verification
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    input_size: int | None = None  # None: the member's own input size
    batch: int = 1  # 0: dynamic batch
    budgets: Budgets = field(default_factory=Budgets)
    tolerances: Tolerances = field(default_factory=Tolerances)
    opset: int = 17
    minimum_deployment_target: str | None = None
    calibration_images: int = 256

    @model_validator(mode="after")
    def _consistent(self):
        allowed = FORMAT_PRECISIONS[self.format]
        if self.precision not in allowed:
            raise ValueError(f"precision: {self.precision!r} is not available for format {self.format!r}; "
                             f"allowed: {', '.join(allowed)}")
        if self.verify.runtime not in FORMAT_RUNTIMES[self.format]:
            raise ValueError(f"verify.runtime: {self.verify.runtime!r} cannot run {self.format!r} files; "
                             f"allowed: {', '.join(FORMAT_RUNTIMES[self.format])}")
        if self.batch < 0:
            raise ValueError(f"batch: must be >= 0 (0 = dynamic), got {self.batch}")
        if not 0 < self.tolerances.min_cosine <= 1:
            raise ValueError(f"tolerances.min_cosine: must be in (0, 1], got {self.tolerances.min_cosine}")
        return self

    @property
    def suffix(self) -> str:
        return FORMAT_SUFFIX[self.format]


def builtin_profile_files() -> dict[str, Path]:
    folder = resources.files("hetero.device_profiles")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def read_profile(path: str | Path) -> DeviceProfile:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read device profile ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a device profile must be a mapping of fields")
    try:
        import json

        return TypeAdapter(DeviceProfile).validate_json(json.dumps(data, default=str))
    except ValidationError as err:
        raise ConfigError(format_validation_error(str(path), err).replace("invalid config", "invalid device profile")) from None


def load_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name, or a profile file by path."""
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return read_profile(name_or_path)
    builtin = builtin_profile_files()
    if name_or_path not in builtin:
        hint = difflib.get_close_matches(name_or_path, list(builtin), n=1)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"unknown device profile {name_or_path!r}.{suggestion} Built-in profiles: "
                          f"{', '.join(sorted(builtin))}; or give the path of a profile .yaml file.")
    return read_profile(builtin[name_or_path])


def all_profiles() -> list[DeviceProfile]:
    return [read_profile(path) for _, path in sorted(builtin_profile_files().items())]
