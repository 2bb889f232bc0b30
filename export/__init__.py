"""Export edge members per device profile, and open exported artifacts with their runtime.

Each format registers an exporter (torch member -> file) and a runtime adapter (file -> embeddings).  The
converters are imported inside the functions that use them, so `import hetero.export` stays light.
"""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from hetero.export.common import ExportError, RuntimeAdapter, path_bytes, sha256_path
from hetero.manifest import ManifestError, read_manifest, write_manifest

# format -> (module, exporter function, runtime adapter class per runtime name, extra that installs it)
FORMATS = {
    "onnx": ("hetero.export.onnx", "export_onnx", {"onnxruntime": "OnnxRuntimeAdapter"}, None),
    "tflite": ("hetero.export.litert", "export_tflite", {"litert": "LiteRTAdapter"}, "litert"),
    "coreml": ("hetero.export.coreml", "export_coreml", {"coreml": "CoreMLAdapter"}, "coreml"),
    "executorch": ("hetero.export.executorch", "export_executorch", {"executorch": "ExecuTorchAdapter"},
                   "executorch"),
}
# Python packages each format's converter and runtime import (for the "not installed" message).
CONVERTER_PACKAGES = {
    "onnx": ("onnx", "onnxruntime"),
    "tflite": ("litert_torch", "ai_edge_litert", "ai_edge_quantizer"),
    "coreml": ("coremltools",),
    "executorch": ("executorch",),
}


def _member_entry(manifest: dict, name: str) -> dict:
    entries = {m["name"]: m for m in manifest["members"]}
    if name not in entries:
        raise ManifestError(f"no member {name!r} in family {manifest['family']!r}; members: {', '.join(entries)}")
    return entries[name]


def budget_problems(entry: dict, profile, file_bytes: int | None = None) -> list[str]:
    """Every budget of the profile the member exceeds, with the figure and the budget."""
    budgets, problems = profile.budgets, []
    if budgets.max_params is not None and entry["params"] > budgets.max_params:
        problems.append(f"params {entry['params']:,} > budget {budgets.max_params:,}")
    if budgets.max_mflops is not None and entry["flops"] / 1e6 > budgets.max_mflops:
        problems.append(f"MFLOPs {entry['flops'] / 1e6:.1f} > budget {budgets.max_mflops:g}")
    if budgets.max_file_mb is not None and file_bytes is not None and file_bytes / 2**20 > budgets.max_file_mb:
        problems.append(f"file size {file_bytes / 2**20:.2f} MB > budget {budgets.max_file_mb:g} MB")
    return problems


def choose_member(manifest: dict, profile) -> str:
    """The most accurate edge member (M[edge][cloud] top-1) that fits the profile's budgets."""
    edges = [m for m in manifest["members"] if m["role"] == "edge"]
    fitting = [m for m in edges if not budget_problems(m, profile)
               and profile.input_size in (None, m["input_size"])]
    if not fitting:
        raise ExportError(f"no edge member of {manifest['family']!r} fits profile {profile.name!r}: " + "; ".join(
            f"{m['name']}: {', '.join(budget_problems(m, profile)) or 'input size differs'}" for m in edges))
    scores = manifest.get("compatibility", {}).get("edges", {})
    # Without an evaluation, prefer the largest member that fits (more FLOPs, usually more accurate).
    return max(fitting, key=lambda m: (scores.get(m["name"], {}).get("edge_vs_cloud_top1", -1), m["flops"]))["name"]


def _format(profile):
    if profile.format not in FORMATS:
        raise ExportError(f"profile {profile.name!r}: no exporter for format {profile.format!r} is available")
    return FORMATS[profile.format]


def _missing_converter(profile, package: str) -> ExportError:
    extra = _format(profile)[3]
    install = f"pip install 'hetero[{extra}]'" if extra else "reinstall hetero (pip install hetero)"
    return ExportError(f"profile {profile.name!r} exports {profile.format} files with {package}, which is not "
                       f"installed in this Python environment. Install it with: {install}")


def _import(module: str, profile):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise _missing_converter(profile, err.name or module) from None


def check_converter(profile) -> None:
    """Fail early, with the extra to install, when the profile's converter packages are missing."""
    import importlib.util

    for package in CONVERTER_PACKAGES.get(profile.format, ()):
        if importlib.util.find_spec(package) is None:
            raise _missing_converter(profile, package)


@contextmanager
def atomic_artifact(path: Path):
    """Yield a temporary path for an artifact (file or directory such as .mlpackage) beside `path`.

    The converter writes there, inside a private hidden folder that also takes any side files it makes;
    only when the block finishes does the result replace `path`.  On any error or interrupt the folder is
    removed, so no half-written artifact is ever left at `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield work / path.name
        done = work / path.name
        if not done.exists():
            raise ExportError(f"the converter wrote nothing for {path}")
        if done.is_dir() and path.exists():
            # os.replace cannot overwrite a non-empty directory: move the old one aside first.
            os.replace(path, work / "previous")
        os.replace(done, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def calibration_images(run_dir: str | Path, size: int, count: int):
    """`count` training images (never held-out classes), spread evenly over the split, at `size` px."""
    import torch

    from hetero.config import load_config
    from hetero.data import load_split
    from hetero.models import resize_to

    config = load_config(Path(run_dir) / "config.yaml")
    train = load_split(config.data, config.load_size).train
    # The split is grouped by class: spread the picks so every class contributes.
    index = torch.linspace(0, len(train) - 1, min(count, len(train))).round().long().unique()
    return resize_to(train.images[index].float() / 255.0, size)


def needs_calibration(profile) -> bool:
    """Static int8 (activations too) needs real images to set the activation ranges."""
    return profile.precision == "int8"


def artifact_metadata(manifest: dict, entry: dict, profile) -> dict:
    return {
        "space_id": manifest["space_id"], "family": manifest["family"], "family_version": manifest["version"],
        "member": entry["name"], "role": entry["role"], "embedding_dim": entry["dim"],
        "input_size": entry["input_size"], "layout": profile.layout, "mean": entry["mean"], "std": entry["std"],
        "input_range": [0.0, 1.0], "precision": profile.precision, "profile": profile.name,
        "format": profile.format, "batch": profile.batch,
    }


def export_member(run_dir: str | Path, member: str | None, profile, allow_over_budget: bool = False,
                  calibration=None) -> dict:
    """Export one member (chosen automatically when None) for `profile`; register it in the manifest."""
    from hetero.train import load_member

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    member = member or choose_member(manifest, profile)
    entry = _member_entry(manifest, member)
    if profile.input_size not in (None, entry["input_size"]):
        raise ExportError(f"member {member!r} takes {entry['input_size']} px but profile {profile.name!r} feeds "
                          f"{profile.input_size} px; pick a member trained at that size")
    problems = budget_problems(entry, profile)
    if problems and not allow_over_budget:
        raise ExportError(f"member {member!r} exceeds the budgets of profile {profile.name!r}: "
                          f"{'; '.join(problems)}. Use --allow-over-budget to export anyway (it is recorded).")
    module_name, function, _, _ = _format(profile)
    check_converter(profile)
    exporter = getattr(_import(module_name, profile), function)
    model = load_member(run_dir, manifest, member)
    metadata = artifact_metadata(manifest, entry, profile)
    path = run_dir / "exports" / profile.name / f"{member}{profile.suffix}"
    started = time.perf_counter()
    if needs_calibration(profile):
        from hetero.models import resize_to

        calibration = (calibration_images(run_dir, entry["input_size"], profile.calibration_images)
                       if calibration is None else resize_to(calibration, entry["input_size"]))
    with atomic_artifact(path) as tmp:
        try:
            done = exporter(model, tmp, profile, metadata, calibration)
        except ExportError:
            raise
        except ModuleNotFoundError as err:
            raise _missing_converter(profile, err.name or "a converter package") from None
        except Exception as err:  # a converter failing on an op: one clear paragraph, no half-written file
            raise ExportError(f"exporting member {member!r} for profile {profile.name!r} ({profile.format} "
                              f"{profile.precision}) failed in the converter: {type(err).__name__}: "
                              f"{' '.join(str(err).split())[:800].rstrip('.')}. Nothing was written; the member may use an "
                              f"op this converter does not support.") from err
        file_bytes = path_bytes(tmp)
        problems += budget_problems(entry, profile, file_bytes)[len(problems):]
        if problems and not allow_over_budget:
            raise ExportError(f"member {member!r} exceeds the budgets of profile {profile.name!r}: "
                              f"{'; '.join(problems)}. Use --allow-over-budget to export anyway (it is recorded).")
    artifact = {
        "member": member, "profile": profile.name, "format": profile.format, "precision": profile.precision,
        "layout": profile.layout, "file": path.relative_to(run_dir).as_posix(), "sha256": sha256_path(path),
        "bytes": file_bytes, "export_seconds": round(time.perf_counter() - started, 2),
        "over_budget": problems, **done,
    }
    manifest = read_manifest(run_dir)  # re-read: register against the newest manifest
    manifest["artifacts"] = [a for a in manifest.get("artifacts", [])
                             if (a["member"], a["profile"]) != (member, profile.name)] + [artifact]
    write_manifest(run_dir, manifest)
    return artifact


def open_runtime(path: str | Path, format: str, runtime: str) -> RuntimeAdapter:
    """Open an exported file with the named runtime's adapter."""
    if format not in FORMATS or runtime not in FORMATS[format][2]:
        raise ExportError(f"no adapter for runtime {runtime!r} on format {format!r}")
    module = importlib.import_module(FORMATS[format][0])
    return getattr(module, FORMATS[format][2][runtime])(Path(path))
