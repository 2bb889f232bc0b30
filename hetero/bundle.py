"""Self-contained verification bundles: verify on a machine that has neither the family nor its data.

`hetero verify DIR --bundle out.zip` writes one zip with everything the checks compare against:

- ``bundle.json``: family, space ids, the manifest's member and artifact entries, the full device profiles,
  the torch members' retrieval figures and the figures measured where the bundle was made;
- ``arrays.npz``: the held-out query images (uint8, the family's load size) and labels, the gallery embedded
  by the torch cloud member (with its labels), and each artifact member's torch embeddings of the queries;
- ``artifacts/...``: the exported files (directories such as .mlpackage included), at their manifest paths.

`hetero verify --bundle out.zip` runs the same checks from it: on a Mac with the real CoreML runtime, and on
any machine for the other formats.  Nothing in a bundle is unpickled (npz is read with allow_pickle=False).
"""
from __future__ import annotations

import io
import json
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from hetero.manifest import ManifestError, atomic_path, atomic_write_json

BUNDLE_VERSION = 1
BUNDLE_JSON = "bundle.json"
ARRAYS = "arrays.npz"


class BundleError(ManifestError):
    """A bundle that cannot be used (not a zip, missing parts, another version)."""


def write_bundle(reference, path: str | Path, report: dict | None = None) -> Path:
    """Write the bundle for `reference` (see :func:`hetero.verify.reference_from_dir`) at `path`."""
    from hetero.verify import _resolve_profile, summary_rows

    path = Path(path)
    profiles = {}
    for artifact in reference.artifacts:
        try:
            profiles[artifact["profile"]] = asdict(_resolve_profile(artifact["profile"], reference))
        except Exception:  # an unknown profile stays unknown; the identity check will say so in the bundle too
            pass
    meta = {
        "bundle_version": BUNDLE_VERSION, "family": reference.family, "space_id": reference.space_id,
        "gallery_space_id": reference.gallery_space_id, "cloud": reference.cloud, "source": reference.source,
        "members": reference.members, "artifacts": reference.artifacts, "profiles": profiles,
        "torch_figures": reference.torch_figures,
        "expected": summary_rows(report) if report else [],
    }
    arrays = {
        "query_images": reference.query_images.numpy().astype(np.uint8),
        "query_labels": reference.query_labels.numpy().astype(np.int64),
        "gallery": reference.gallery.numpy().astype(np.float32),
        "gallery_labels": reference.gallery_labels.numpy().astype(np.int64),
    }
    for name, embeddings in reference.torch_queries.items():
        arrays[f"torch/{name}"] = embeddings.numpy().astype(np.float32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(BUNDLE_JSON, json.dumps(meta, indent=2))
            archive.writestr(ARRAYS, buffer.getvalue())
            for artifact in reference.artifacts:
                source = reference.root / artifact["file"]
                files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file()) \
                    if source.is_dir() else []  # a missing artifact stays missing: verify reports it
                for item in files:
                    archive.write(item, "artifacts/" + item.relative_to(reference.root).as_posix())
    path.chmod(0o644)  # mkstemp made it private; a bundle is meant to be handed on
    return path


def _safe_extract(archive: zipfile.ZipFile, target: Path) -> None:
    for info in archive.infolist():
        name = PurePosixPath(info.filename)
        if name.is_absolute() or ".." in name.parts:
            raise BundleError(f"bundle member {info.filename!r} points outside the bundle; refusing to extract")
    archive.extractall(target)


@contextmanager
def open_bundle(path: str | Path):
    """Yield the :class:`hetero.verify.Reference` stored in a bundle (extracted to a temporary folder)."""
    from pydantic import TypeAdapter

    from hetero.profiles import DeviceProfile
    from hetero.verify import Reference

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such bundle file")
    folder = Path(tempfile.mkdtemp(prefix="hetero-bundle-"))
    try:
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
                for required in (BUNDLE_JSON, ARRAYS):
                    if required not in names:
                        raise BundleError(f"{path}: not a hetero verification bundle ({required} is missing)")
                _safe_extract(archive, folder)
        except zipfile.BadZipFile as err:
            raise BundleError(f"{path}: not a valid zip file ({err})") from None
        try:
            meta = json.loads((folder / BUNDLE_JSON).read_text())
        except json.JSONDecodeError as err:
            raise BundleError(f"{path}: {BUNDLE_JSON} is not valid JSON ({err})") from None
        if meta.get("bundle_version") != BUNDLE_VERSION:
            raise BundleError(f"{path}: bundle_version {meta.get('bundle_version')!r} is not supported by this "
                              f"hetero (expects {BUNDLE_VERSION})")
        with np.load(folder / ARRAYS, allow_pickle=False) as data:
            arrays = {key: torch.from_numpy(data[key].copy()) for key in data.files}
        adapter = TypeAdapter(DeviceProfile)
        profiles = {name: adapter.validate_json(json.dumps(p)) for name, p in meta["profiles"].items()}
        yield Reference(
            source=str(path), root=folder / "artifacts", family=meta["family"], space_id=meta["space_id"],
            gallery_space_id=meta["gallery_space_id"], cloud=meta["cloud"], members=meta["members"],
            artifacts=meta["artifacts"], query_images=arrays["query_images"], query_labels=arrays["query_labels"],
            gallery=arrays["gallery"], gallery_labels=arrays["gallery_labels"],
            torch_queries={key.split("/", 1)[1]: value for key, value in arrays.items() if key.startswith("torch/")},
            torch_figures=meta["torch_figures"], profiles=profiles,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def verify_bundle(path: str | Path, latency_runs: int = 30, strict: bool = False,
                  json_out: str | Path | None = None, all_runtimes: bool = False) -> dict:
    """Run every check from a bundle; write the report beside it (`<name>.verify.json`) or at `json_out`."""
    from hetero.verify import run_checks

    path = Path(path)
    with open_bundle(path) as reference:
        report = run_checks(reference, latency_runs, strict, all_runtimes)
        with zipfile.ZipFile(path) as archive:
            report["bundle_expected"] = json.loads(archive.read(BUNDLE_JSON)).get("expected", [])
    out = Path(json_out) if json_out else path.with_name(path.stem + ".verify.json")
    atomic_write_json(out, report)
    report["json"] = str(out)
    return report
