"""The family manifest, atomic files and the embedding-space id.

Everything a later stage needs is found through DIR/manifest.json: members, checkpoint files with their
sha256, exported artifacts and the measured compatibility matrix.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"


class ManifestError(RuntimeError):
    """A family directory that cannot be used (missing stage output, tampered file, other space)."""


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def space_id(family_name: str, version: int, dim: int, cloud_sha256: str) -> str:
    """Fingerprint of one embedding space: the family and the cloud checkpoint that defines it."""
    key = f"{family_name}|{version}|{dim}|{cloud_sha256}"
    return "hs-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def read_manifest(run_dir: str | Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: no family manifest here; run `hetero train` (or `hetero run`) first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from None


def write_manifest(run_dir: str | Path, manifest: dict) -> None:
    atomic_write_json(Path(run_dir) / MANIFEST, manifest)


def check_file(run_dir: str | Path, entry: dict) -> Path:
    """Return the path of a manifest file entry after checking it exists and its sha256 matches."""
    path = Path(run_dir) / entry["file"]
    if not path.is_file():
        raise ManifestError(f"{path}: listed in the manifest but missing")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise ManifestError(f"{path}: sha256 {actual} does not match the manifest's {entry['sha256']}")
    return path
