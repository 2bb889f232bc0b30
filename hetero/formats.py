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
class Runtime:
    """One runtime package that can run a format: in this process, in an isolated environment, or both."""

    name: str  # what profiles' verify.runtime says: "litert"
    distribution: str  # its package on PyPI: "ai-edge-litert"
    adapter: str | None  # adapter class in the format's module (in-process); None: isolated environments only
    engine: str | None  # hetero.runtime_worker engine (out of process); None: in-process only
    needs: tuple[str, ...] = ()  # what an isolated environment installs beside it
    # The first release built against numpy 2's C API; an environment with an older one gets numpy < 2.
    numpy2_from: str | None = None


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    precisions: tuple[str, ...]  # what the exporter can really produce
    runtimes: tuple[Runtime, ...]  # the first one verifies a profile that names none
    packages: tuple[str, ...]  # what the converter and runtime import (for the "not installed" message)
    extra: str | None  # `pip install 'hetero[extra]'` installs them
    fixed_batch: bool  # the exporter cannot write a dynamic batch
    module: Callable[[], ModuleType]
    exporter: str  # function(model, path, profile, metadata, calibration, accept) -> what was done
    metadata_reader: str  # function(path) -> the artifact's own "hetero" metadata
    inspector: str | None = None  # function(path) -> structure facts without running (where runs are impossible)
    # Multi-exit members: function(model, folder, profile, metadata, int8_scope=...) writing the chained stage
    # graphs, and the class that runs such a folder here (an `ExitChain`; off its platform it reads the graphs'
    # specs and says why it cannot run); None where the format has no chain exporter yet.
    exit_chain: str | None = None
    exit_chain_runtime: str | None = None

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

    def exit_chain_function(self, profile_name: str) -> Callable:
        if self.exit_chain is None:
            chained = ", ".join(f.name for f in FORMATS.values() if f.exit_chain)
            raise ExportError(f"profile {profile_name!r} exports {self.name} files, which have no chained multi-exit "
                              f"export yet (formats with one: {chained}); export the multi-exit member for an "
                              f"{chained} profile, or export a single-exit member here")
        return getattr(self.load(), self.exit_chain)

    def open_exit_chain(self, folder: str | Path):
        return getattr(self.load(), self.exit_chain_runtime)(Path(folder))

    def runtime(self, name: str) -> Runtime:
        for runtime in self.runtimes:
            if name in (runtime.name, runtime.distribution):
                return runtime
        raise ExportError(f"no runtime {name!r} for {self.name!r} files; known: "
                          f"{', '.join(r.name for r in self.runtimes)}")

    def in_process(self) -> tuple[Runtime, ...]:
        return tuple(r for r in self.runtimes if r.adapter)

    def open(self, path: str | Path, runtime: str | None = None):
        """The artifact at `path` opened in this process with `runtime`'s adapter (the first by default)."""
        chosen = self.runtime(runtime) if runtime else self.in_process()[0]
        if not chosen.adapter:
            raise ExportError(f"{chosen.distribution} runs {self.name} files only in an isolated environment "
                              f"(`hetero runtimes add {chosen.distribution}`)")
        return getattr(self.load(), chosen.adapter)(Path(path))

    def read_metadata(self, path: str | Path) -> dict:
        return getattr(self.load(), self.metadata_reader)(Path(path))

    def inspect(self, path: str | Path) -> dict | None:
        return getattr(self.load(), self.inspector)(Path(path)) if self.inspector else None


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", ".onnx", ("fp32", "fp16", "int8"),
           (Runtime("onnxruntime", "onnxruntime", "OnnxRuntimeAdapter", "onnxruntime", numpy2_from="1.19"),),
           ("onnx", "onnxruntime"), None, fixed_batch=False, module=_onnx, exporter="export_onnx",
           metadata_reader="read_onnx_metadata", exit_chain="export_exit_chain", exit_chain_runtime="OnnxExitChain"),
    Format("tflite", ".tflite", ("fp32", "fp16", "int8", "int8-weights", "int8-dynamic"),
           (Runtime("litert", "ai-edge-litert", "LiteRTAdapter", "ai_edge_litert"),
            # The interpreter Android apps shipped before LiteRT; it needs numpy < 2, so never in this process.
            Runtime("tflite_runtime", "tflite-runtime", None, "tflite_runtime", ("numpy<2",))),
           ("litert_torch", "ai_edge_litert", "ai_edge_quantizer"), "litert", fixed_batch=True, module=_litert,
           exporter="export_tflite", metadata_reader="read_tflite_metadata", exit_chain="export_exit_chain",
           exit_chain_runtime="LiteRTExitChain"),
    Format("coreml", ".mlpackage", ("fp32", "fp16", "int8-weights"),
           (Runtime("coreml", "coremltools", "CoreMLAdapter", None),),  # predicts on macOS only
           ("coremltools",), "coreml", fixed_batch=False, module=_coreml, exporter="export_coreml",
           metadata_reader="read_coreml_metadata", inspector="inspect_artifact", exit_chain="export_exit_chain",
           exit_chain_runtime="CoreMLExitChain"),
    # int8 is not offered: XNNPACK static int8 lost parity on mobile blocks (cosine 0.89, ../shared/DESIGN.md).
    Format("executorch", ".pte", ("fp32",), (Runtime("executorch", "executorch", "ExecuTorchAdapter", "executorch"),),
           ("executorch",), "executorch", fixed_batch=True, module=_executorch, exporter="export_executorch",
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


def for_distribution(distribution: str) -> tuple[Format, Runtime] | None:
    """The format and runtime a PyPI distribution provides (tflite-runtime -> tflite), or None."""
    for spec in FORMATS.values():
        for runtime in spec.runtimes:
            if runtime.distribution == distribution:
                return spec, runtime
    return None


def parse_requirement(text: str):
    """(Requirement, format, runtime) of a runtime requirement such as 'tflite-runtime==2.14.0'."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    from hetero.config import unknown_message
    from hetero.errors import ConfigError

    try:
        requirement = Requirement(text)
    except InvalidRequirement as err:
        raise ConfigError(f"runtime {text!r} is not a package requirement ({err}); write e.g. "
                          f"'tflite-runtime==2.14.0' or 'onnxruntime>=1.17'") from None
    found = for_distribution(canonicalize_name(requirement.name))
    if found is None:
        known = [r.distribution for f in FORMATS.values() for r in f.runtimes]
        raise ConfigError(unknown_message(requirement.name, known, "runtime package"))
    return requirement, found[0], found[1]
