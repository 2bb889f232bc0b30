"""Device profiles: one YAML file per target device, read into a validated dataclass.

The built-in profiles ship as package data (``device_profiles/``); a user's own profile is any YAML file
given by path.  A profile fixes the exported format and numeric form, the layout and batch a device feeds,
the budgets a member must fit, and the tolerances verification holds the artifact to.
"""
from __future__ import annotations

import json
from dataclasses import field
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from hetero import formats
from hetero.config import STRICT, check_name, format_validation_error, read_yaml, unknown_message
from hetero.errors import ConfigError


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
    format: Literal[tuple(formats.FORMATS)]  # type: ignore[valid-type]
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
    # The runtime versions the profile promises to work on (package requirements, e.g. the newest runtime and
    # the oldest one devices in the field still run).  Export picks a scheme that holds on all of them; verify
    # checks each.  Empty: the runtime of `verify` in hetero's own environment.
    runtimes: list[str] = field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return check_name(value, "profile name")  # exports/<profile name>/ is a folder

    @model_validator(mode="after")
    def _consistent(self):
        spec = formats.get(self.format)
        if self.precision not in spec.precisions:
            raise ValueError(f"precision: {self.precision!r} cannot be produced by the {self.format} exporter; "
                             f"allowed: {', '.join(spec.precisions)}")
        in_process = [r.name for r in spec.in_process()]
        if self.verify.runtime not in in_process:
            raise ValueError(f"verify: runtime {self.verify.runtime!r} has no adapter for {self.format!r} files in "
                             f"this process; allowed: {', '.join(in_process)} (older runtimes go in `runtimes`)")
        if self.batch < 0:
            raise ValueError(f"batch: must be >= 0 (0 = dynamic), got {self.batch}")
        if self.batch == 0 and spec.fixed_batch:
            raise ValueError(f"batch: the {self.format} exporter needs a fixed batch size (1 or more), got 0 "
                             f"(dynamic)")
        if self.input_size is not None and not 16 <= self.input_size <= 1024:
            raise ValueError(f"input_size: must be between 16 and 1024 pixels, got {self.input_size}")
        if not 0 < self.tolerances.min_cosine <= 1:
            raise ValueError(f"tolerances: min_cosine must be in (0, 1], got {self.tolerances.min_cosine}")
        if not 0 <= self.tolerances.max_top1_drop <= 1:
            raise ValueError(f"tolerances: max_top1_drop must be in [0, 1], got {self.tolerances.max_top1_drop}")
        for index, text in enumerate(self.runtimes):
            try:
                _, runtime_format, _ = formats.parse_requirement(text)
            except ConfigError as err:
                raise ValueError(f"runtimes: item {index}: {err}") from None
            if runtime_format.name != self.format:
                raise ValueError(f"runtimes: {text!r} runs {runtime_format.name} files, not {self.format}")
        if self.calibration_images < 2:
            raise ValueError(f"calibration_images: must be >= 2, got {self.calibration_images}")
        return self

    @property
    def suffix(self) -> str:
        return formats.get(self.format).suffix


def builtin_profile_files() -> dict[str, Path]:
    folder = resources.files("hetero.device_profiles")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def parse_profile(data, source: str) -> DeviceProfile:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a device profile must be a mapping of fields")
    try:
        return TypeAdapter(DeviceProfile).validate_json(json.dumps(data, default=str))
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err, DeviceProfile, "device profile")) from None


def read_profile(path: str | Path) -> DeviceProfile:
    return parse_profile(read_yaml(path, "device profile"), str(path))


def is_profile_path(name_or_path: str) -> bool:
    return name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file()


def load_profile(name_or_path: str, also_known: tuple[str, ...] = ()) -> DeviceProfile:
    """A built-in profile by name, or a profile file by path.

    `also_known` are other names the caller would accept (a manifest's own profiles), offered as
    suggestions too.
    """
    if is_profile_path(name_or_path):
        return read_profile(name_or_path)
    builtin = builtin_profile_files()
    if name_or_path not in builtin:
        raise ConfigError(f"{unknown_message(name_or_path, sorted(set(builtin) | set(also_known)), 'device profile')}"
                          f"; or give the path of a profile .yaml file")
    return read_profile(builtin[name_or_path])


def all_profiles() -> list[DeviceProfile]:
    return [read_profile(path) for _, path in sorted(builtin_profile_files().items())]
