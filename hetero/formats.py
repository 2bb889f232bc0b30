"""The one registry of exported formats, read by profiles, export, verify and gallery alike.

Per format: the file suffix, the precisions its exporter really produces, the runtimes with an adapter
behind them, whether it needs a fixed batch, the extra that installs it, and the module that holds its
exporter, adapters and metadata reader.  A profile asking for anything else is refused when it is loaded.
The converter modules are imported only when a format is used, so `import hetero.formats` stays light.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

from hetero.errors import ExportError, RuntimeUnavailable


def _onnx() -> ModuleType:
    from hetero.export import onnx

    return onnx


def _litert() -> ModuleType:
    from hetero.export import litert

    return litert


def _coreml() -> ModuleType:
    from hetero.export import coreml

    return coreml


def _executorch() -> ModuleType:
    from hetero.export import executorch

    return executorch


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    precisions: tuple[str, ...]  # what the exporter can really produce
    runtimes: dict[str, str]  # runtime name -> adapter class in the module
    packages: tuple[str, ...]  # what the converter and runtime import (for the "not installed" message)
    extra: str | None  # `pip install 'hetero[extra]'` installs them
    fixed_batch: bool  # the exporter cannot write a dynamic batch
    module: Callable[[], ModuleType]
    exporter: str  # function(model, path, profile, metadata, calibration) -> what was done
    metadata_reader: str  # function(path) -> the artifact's own "hetero" metadata
    inspector: str | None = None  # function(path) -> structure facts without running (where runs are impossible)

    def install_hint(self) -> str:
        return f"pip install 'hetero[{self.extra}]'" if self.extra else "reinstall hetero (pip install hetero)"

    def missing_packages(self) -> list[str]:
        return [p for p in self.packages if importlib.util.find_spec(p) is None]

    def load(self) -> ModuleType:
        try:
            return self.module()
        except ImportError as err:
            raise RuntimeUnavailable(f"{self.name} files need {err.name or 'a converter package'}, which is not "
                                     f"installed in this Python environment. Install it with: "
                                     f"{self.install_hint()}") from None

    def export_function(self) -> Callable:
        return getattr(self.load(), self.exporter)

    def open(self, path: str | Path, runtime: str | None = None):
        """The artifact at `path` opened with `runtime`'s adapter (the format's first runtime by default)."""
        runtime = runtime or next(iter(self.runtimes))
        if runtime not in self.runtimes:
            raise ExportError(f"no adapter for runtime {runtime!r} on format {self.name!r}; available: "
                              f"{', '.join(self.runtimes)}")
        return getattr(self.load(), self.runtimes[runtime])(Path(path))

    def read_metadata(self, path: str | Path) -> dict:
        return getattr(self.load(), self.metadata_reader)(Path(path))

    def inspect(self, path: str | Path) -> dict | None:
        return getattr(self.load(), self.inspector)(Path(path)) if self.inspector else None


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", ".onnx", ("fp32", "fp16", "int8"), {"onnxruntime": "OnnxRuntimeAdapter"},
           ("onnx", "onnxruntime"), None, fixed_batch=False, module=_onnx, exporter="export_onnx",
           metadata_reader="read_onnx_metadata"),
    Format("tflite", ".tflite", ("fp32", "fp16", "int8", "int8-weights", "int8-dynamic"), {"litert": "LiteRTAdapter"},
           ("litert_torch", "ai_edge_litert", "ai_edge_quantizer"), "litert", fixed_batch=True, module=_litert,
           exporter="export_tflite", metadata_reader="read_tflite_metadata"),
    Format("coreml", ".mlpackage", ("fp32", "fp16", "int8-weights"), {"coreml": "CoreMLAdapter"},
           ("coremltools",), "coreml", fixed_batch=False, module=_coreml, exporter="export_coreml",
           metadata_reader="read_coreml_metadata", inspector="inspect_artifact"),
    # int8 is not offered: XNNPACK static int8 lost parity on mobile blocks (cosine 0.89, ../shared/DESIGN.md).
    Format("executorch", ".pte", ("fp32",), {"executorch": "ExecuTorchAdapter"}, ("executorch",), "executorch",
           fixed_batch=True, module=_executorch, exporter="export_executorch",
           metadata_reader="read_executorch_metadata"),
)}


def get(name: str) -> Format:
    if name not in FORMATS:
        raise ExportError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def for_path(path: str | Path) -> Format | None:
    """The format whose suffix `path` has, or None."""
    suffix = Path(path).suffix
    return next((f for f in FORMATS.values() if f.suffix == suffix), None)
