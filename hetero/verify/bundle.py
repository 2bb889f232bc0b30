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
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from hetero.errors import ConfigError, ManifestError
from hetero.family import ArtifactRecord, MemberRecord
from hetero.files import atomic_path, atomic_write_json, check_npy_size
from hetero.verify.harness import resolve_profile, run_checks
from hetero.verify.reference import Reference
from hetero.verify.report import summary_rows

BUNDLE_VERSION = 1
BUNDLE_JSON = "bundle.json"
ARRAYS = "arrays.npz"
MAX_UNPACKED_BYTES = 8 << 30  # everything a bundle unpacks to; more is refused before extraction


class BundleError(ManifestError):
    """A bundle that cannot be used (not a zip, missing parts, another version, paths outside)."""


class BundleMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle_version: int
    family: str
    space_id: str
    gallery_space_id: str
    cloud: str
    source: str
    members: dict[str, MemberRecord]
    artifacts: list[ArtifactRecord]
    profiles: dict[str, dict[str, Any]]
    torch_figures: dict[str, dict[str, dict[str, float]]]
    expected: list[dict[str, Any]] = []


def write_bundle(reference: Reference, path: str | Path, report: dict | None = None) -> Path:
    """Write the bundle for `reference` (see :func:`hetero.verify.reference.reference_from_store`) at `path`."""
    path = Path(path)
    profiles = {}
    for artifact in reference.artifacts:
        try:
            profiles[artifact.profile] = asdict(resolve_profile(artifact, reference))
        except Exception:  # an unknown profile stays unknown; the identity check will say so in the bundle too
            pass
    meta = BundleMeta(
        bundle_version=BUNDLE_VERSION, family=reference.family, space_id=reference.space_id,
        gallery_space_id=reference.gallery_space_id, cloud=reference.cloud, source=reference.source,
        members=reference.members, artifacts=reference.artifacts, profiles=profiles,
        torch_figures=reference.torch_figures, expected=summary_rows(report) if report else [])
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
            archive.writestr(BUNDLE_JSON, meta.model_dump_json(indent=2))
            archive.writestr(ARRAYS, buffer.getvalue())
            for artifact in reference.artifacts:
                source = reference.artifact_path(artifact)
                files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file()) \
                    if source.is_dir() else []  # a missing artifact stays missing: verify reports it
                for item in files:
                    archive.write(item, "artifacts/" + item.relative_to(reference.root).as_posix())
    return path


def _safe_extract(archive: zipfile.ZipFile, target: Path, source: Path) -> None:
    total = 0
    for info in archive.infolist():
        name = PurePosixPath(info.filename)
        if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
            raise BundleError(f"{source}: member {info.filename!r} points outside the bundle; refusing to extract")
        total += info.file_size
    if total > MAX_UNPACKED_BYTES:
        raise BundleError(f"{source}: unpacks to {total:,} bytes, over the limit of {MAX_UNPACKED_BYTES:,}")
    archive.extractall(target)


def _read_meta(folder: Path, source: Path) -> BundleMeta:
    try:
        data = json.loads((folder / BUNDLE_JSON).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise BundleError(f"{source}: {BUNDLE_JSON} is not valid JSON ({type(err).__name__})") from None
    if not isinstance(data, dict) or data.get("bundle_version") != BUNDLE_VERSION:
        version = data.get("bundle_version") if isinstance(data, dict) else None
        raise BundleError(f"{source}: bundle_version {version!r} is not supported by this hetero (expects "
                          f"{BUNDLE_VERSION})")
    try:
        return BundleMeta.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in err.errors()[:6])
        raise BundleError(f"{source}: {BUNDLE_JSON} is not a hetero bundle description: {problems}") from None


def _check_declared_sizes(npz: Path) -> None:
    """Refuse (ValueError) arrays that declare more than their members hold, or members that unpack to more
    than a bundle may, before numpy allocates what the headers declare (a crafted one asked for 183 GiB)."""
    with zipfile.ZipFile(npz) as archive:
        members = archive.infolist()
        if sum(info.file_size for info in members) > MAX_UNPACKED_BYTES:
            raise ValueError(f"its arrays unpack to more than {MAX_UNPACKED_BYTES:,} bytes")
        for info in members:
            with archive.open(info) as member:
                try:
                    check_npy_size(member, info.file_size)
                except ValueError as err:
                    raise ValueError(f"{info.filename}: {err}") from None


def read_arrays(folder: Path, source: Path, meta: BundleMeta) -> dict[str, torch.Tensor]:
    try:
        _check_declared_sizes(folder / ARRAYS)
        with np.load(folder / ARRAYS, allow_pickle=False) as data:
            loaded = {key: np.array(data[key]) for key in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise BundleError(f"{source}: {ARRAYS} cannot be read ({type(err).__name__}: {err})") from None
    for key, array in loaded.items():
        if array.dtype.kind not in "biuf":  # strings, objects, complex: nothing a bundle writes
            raise BundleError(f"{source}: {ARRAYS}: array {key!r} holds {array.dtype}, not numbers")
    arrays = {key: torch.from_numpy(array) for key, array in loaded.items()}
    required = {"query_images": 4, "query_labels": 1, "gallery": 2, "gallery_labels": 1}
    for key, dims in required.items():
        if key not in arrays or arrays[key].dim() != dims:
            raise BundleError(f"{source}: {ARRAYS} has no {dims}-d array {key!r}")
    queries, gallery = len(arrays["query_images"]), len(arrays["gallery"])
    if arrays["query_images"].dtype != torch.uint8 or arrays["query_images"].shape[1] != 3:
        raise BundleError(f"{source}: query_images must be uint8 N x 3 x S x S")
    if len(arrays["query_labels"]) != queries or len(arrays["gallery_labels"]) != gallery or not queries:
        raise BundleError(f"{source}: {ARRAYS}: labels do not match their images or embeddings")
    arrays["gallery"] = arrays["gallery"].float()
    for name in {a.member for a in meta.artifacts} & set(meta.members):
        torch_queries = arrays.get(f"torch/{name}")
        if torch_queries is None or tuple(torch_queries.shape) != (queries, arrays["gallery"].shape[1]):
            raise BundleError(f"{source}: {ARRAYS} has no torch embeddings of the queries for member {name!r}")
    return arrays


@contextmanager
def open_bundle(path: str | Path):
    """Yield the :class:`hetero.verify.reference.Reference` stored in a bundle (extracted to a temporary folder)."""
    from hetero.profiles import parse_profile

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
                _safe_extract(archive, folder, path)
        except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError) as err:
            raise BundleError(f"{path}: not a valid zip file ({type(err).__name__}: {err})") from None
        meta = _read_meta(folder, path)
        arrays = read_arrays(folder, path, meta)
        try:
            profiles = {name: parse_profile(p, f"{path}: profile {name!r}") for name, p in meta.profiles.items()}
        except ConfigError as err:
            raise BundleError(str(err)) from None
        yield Reference(
            source=str(path), root=folder / "artifacts", family=meta.family, space_id=meta.space_id,
            gallery_space_id=meta.gallery_space_id, cloud=meta.cloud, members=meta.members,
            artifacts=meta.artifacts, query_images=arrays["query_images"], query_labels=arrays["query_labels"],
            gallery=arrays["gallery"], gallery_labels=arrays["gallery_labels"],
            torch_queries={key.split("/", 1)[1]: value.float() for key, value in arrays.items()
                           if key.startswith("torch/")},
            torch_figures=meta.torch_figures, profiles=profiles,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def verify_bundle(path: str | Path, latency_runs: int = 30, strict: bool = False,
                  json_out: str | Path | None = None, all_runtimes: bool = False) -> dict:
    """Run every check from a bundle; write the report beside it (`<name>.verify.json`) or at `json_out`."""
    if latency_runs < 1:
        raise ConfigError(f"latency runs: must be >= 1, got {latency_runs}")
    path = Path(path)
    with open_bundle(path) as reference:
        report = run_checks(reference, latency_runs, strict, all_runtimes)
        with zipfile.ZipFile(path) as archive:
            report["bundle_expected"] = json.loads(archive.read(BUNDLE_JSON)).get("expected", [])
    out = Path(json_out) if json_out else path.with_name(path.stem + ".verify.json")
    atomic_write_json(out, report)
    report["json"] = str(out)
    return report
