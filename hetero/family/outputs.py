"""Writing a family directory: what it already holds, whether training may write it (new, --resume with the
same config, or --overwrite, which removes exactly the files the earlier family wrote), its config and lock."""
from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hetero.config import Config, config_yaml, load_config
from hetero.errors import ConfigError, ManifestError
from hetero.family.manifest import CONFIG, MANIFEST, STAGE_FILES, TRAIN_STATE
from hetero.family.store import FamilyStore
from hetero.files import DirectoryLock, atomic_write_text

log = logging.getLogger("hetero.family")

# Config keys that do not change the weights: a resumed run may differ in them.
# search.fine_tune_epochs: a finished search resumed with another fine-tuning reuses its supernet and candidates.
RESUMABLE_CHANGES = ("train.workers", "export.", "search.fine_tune_epochs")


def existing_outputs(root: Path) -> list[str]:
    """What a family directory already holds, in words (empty for a new or foreign directory)."""
    found = []
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
            found.append(f"family {data.get('family')!r} (space id {data.get('space_id')})")
            if data.get("artifacts"):
                found.append(f"{len(data['artifacts'])} exported artifact(s)")
        except (ValueError, OSError, AttributeError):
            found.append("a manifest.json")
    checkpoints = sorted(p.name for p in (root / "checkpoints").glob("*.safetensors"))
    if checkpoints:
        found.append(f"checkpoints ({', '.join(checkpoints)})")
    for name, words in (("exports", "an exports/ folder"), ("gallery", "a gallery/"), ("report.json", "report.json"),
                        ("verify.json", "verify.json"), (CONFIG, CONFIG)):
        if (root / name).exists() and not (name == CONFIG and found):
            found.append(words)
    return found


def claim_for_training(root: Path, config: Config, resume: bool, overwrite: bool) -> None:
    """Check that training may write `root` (held under its lock), before anything is written.

    A directory that holds a family is refused unless `resume` (the same config, a saved state) or
    `overwrite` (which removes the files the earlier family wrote, and nothing else; see family_files).
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the family in --out, or replace it")
    present = existing_outputs(root)
    if overwrite:
        removed = remove_family_files(root)
        if removed:
            log.warning("%s: removed the earlier family's %d file(s): %s", root, len(removed), "; ".join(present))
        return
    if resume:
        if not (root / TRAIN_STATE).is_file():
            raise ManifestError(f"{root}: nothing to resume (no {TRAIN_STATE}); train without --resume")
        _check_same_config(root, config)
        return
    if present:
        raise ManifestError(f"{root} already holds {'; '.join(present)}. Use --resume to continue its training, "
                            f"--overwrite to replace it (removes the files the family wrote, none of yours), or "
                            f"choose another --out")


def output_directory(out: str | Path) -> Path:
    """The --out of a training verb, refused when empty (Path('') would be the current directory) or a file."""
    if not str(out):
        raise ConfigError("--out: empty; give a directory for the family")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; give a directory for the family")
    return out


def family_files(root: Path) -> list[Path]:
    """Every file (or folder artifact) the family in `root` wrote, as its manifest and stage records list them.

    An unfinished first run (a training state but no manifest yet, or a config alone when stopped before its
    first checkpoint) has written only its config, state and caches.  A directory with files but no family is
    refused: nothing there can be told apart from the user's.
    """
    if not root.is_dir() or all(p.name.startswith(".hetero") for p in root.iterdir()):
        return []  # new or empty (a lock at most): nothing to remove
    if (root / MANIFEST).exists():
        try:
            store = FamilyStore.open(root)
        except ManifestError as err:
            raise ManifestError(f"--overwrite {root}: no readable family manifest ({err}), so the files a family "
                                f"wrote there cannot be told from yours; nothing was removed. Remove them yourself "
                                f"or choose another --out") from None
        manifest = store.manifest
        artifacts = [store.path(a.file, "artifact of the earlier family") for a in manifest.artifacts]
        listed = [m.checkpoint.file for m in manifest.members]
        listed += [m.linearised_at.file for m in manifest.members if m.linearised_at is not None]
        listed += [manifest.previous.checkpoint.file] if manifest.previous is not None else []
        listed += [a.profile_file for a in manifest.artifacts if a.profile_file]
        files = [store.path(name, "checkpoint of the earlier family") for name in listed]
    elif _is_training_state(root / TRAIN_STATE) or _is_stopped_start(root):
        artifacts, files = [], []
    else:
        raise ManifestError(f"--overwrite {root}: this directory holds files but no family ({MANIFEST} is "
                            f"missing), so --overwrite cannot tell a family's files from yours; nothing was "
                            f"removed. Choose a new or empty --out, or train without --overwrite")
    inside = root.resolve()
    files += [path for pattern in STAGE_FILES for path in sorted(root.glob(pattern))
              if path.parent.resolve().is_relative_to(inside)]  # never through a linked folder out of `root`
    # Only an artifact may be a folder (.mlpackage, an exit chain); a folder at any other listed name is not ours.
    return ([path for path in artifacts if path.exists() or path.is_symlink()]
            + [path for path in dict.fromkeys(files) if path.is_file() or path.is_symlink()])


def _is_stopped_start(root: Path) -> bool:
    """Whether `root` holds what a first run stopped before its first checkpoint leaves: the config it saved
    (a config hetero reads), its teacher cache, an empty checkpoints/, a lock, and nothing else."""
    kept = {CONFIG, "teacher_cache", "checkpoints"}
    if not all(p.name in kept or p.name.startswith(".hetero") for p in root.iterdir()):
        return False
    if (root / "checkpoints").is_dir() and any((root / "checkpoints").iterdir()):
        return False
    try:
        load_config(root / CONFIG)
    except (ConfigError, OSError):
        return False
    return True


def _is_training_state(path: Path) -> bool:
    """Whether `path` is a training state hetero wrote (its metadata holds the epoch; only the header is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return "epoch" in json.loads((handle.metadata() or {}).get("hetero", "{}"))
    except (SafetensorError, OSError, ValueError, TypeError):  # missing, unreadable or foreign: not a state of ours
        return False


def remove_family_files(root: Path) -> list[Path]:
    """`--overwrite`: remove exactly the files the family in `root` wrote, then the folders that left empty."""
    removed = family_files(root)
    for path in removed:
        if path.is_dir() and not path.is_symlink():  # a folder artifact (.mlpackage, an exit chain)
            shutil.rmtree(path)
        else:
            path.unlink()
    for folder in sorted({p.parent for p in removed}, key=lambda p: len(p.parts), reverse=True):
        while folder != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    return removed


def _flatten(data, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _check_same_config(root: Path, config: Config) -> None:
    saved_path = root / CONFIG
    try:
        saved = load_config(saved_path)
    except ConfigError as err:
        raise ManifestError(f"{saved_path}: the saved config of the run to resume cannot be read: {err}") from None
    old, new = _flatten(saved.to_dict()), _flatten(config.to_dict())
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)
               and not key.startswith(RESUMABLE_CHANGES)]
    if changed:
        details = "; ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in changed[:6])
        raise ConfigError(f"--resume with a changed config would mix two runs ({details}); resume with the saved "
                          f"{saved_path}, or train into another --out")


def write_config(root: Path, config: Config) -> None:
    atomic_write_text(root / CONFIG, config_yaml(config))


@contextmanager
def writing(root: Path, verb: str):
    """Hold `root`'s lock for a writing stage; under torchrun rank 0 holds it and every rank learns the outcome."""
    from hetero import distributed

    lock = None

    def acquire():
        nonlocal lock
        lock = DirectoryLock(root, verb).acquire()

    try:
        distributed.on_main_then_share(acquire)
        yield
    finally:
        if lock is not None:
            lock.release()


@contextmanager
def new_directory(root: Path):
    """Remove `root` again if the block fails before leaving anything in it but a lock (a failed start)."""
    created = not root.exists()
    try:
        yield
    except BaseException:
        if created and root.is_dir() and all(p.name.startswith(".hetero") for p in root.iterdir()):
            shutil.rmtree(root, ignore_errors=True)
        raise
