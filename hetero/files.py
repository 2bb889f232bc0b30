"""Files on disk: atomic writes, hashes, paths that must stay inside their directory, and directory locks.

Every temporary file or folder is named ``.hetero-tmp.*`` and lives beside its target, so a process killed
mid-write (SIGKILL; other signals unwind normally) leaves only such names behind, and the next writing stage
that locks the directory removes them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

from hetero.errors import ConfigError, LockError, ManifestError

log = logging.getLogger("hetero.files")

TEMP_PREFIX = ".hetero-tmp."
LOCK_FILE = ".hetero.lock"
LOCK_HOLDER = ".hetero.lock.json"


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _default_mode()  # what open() would have given; mkstemp's files are private (0600)


# ------------------------------------------------------------------------------------------ atomic writes


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file():
            tmp.chmod(FILE_MODE)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_folder(path: Path):
    """Yield a path inside a private temporary folder beside `path` for a file or folder (.mlpackage).

    Whatever is written there (side files included) replaces `path` only when the block finishes; on any
    error or interrupt the folder is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent))
    try:
        yield work / path.name
        done = work / path.name
        if done.exists():
            if done.is_dir() and path.exists():
                os.replace(path, work / "previous")  # os.replace cannot overwrite a non-empty directory
            os.replace(done, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def sweep_temporaries(root: Path) -> list[Path]:
    """Remove what killed writers left under `root` (call only while holding the directory's lock).

    A subdirectory with a lock of its own (a gallery built into a family directory by another process, say)
    is another writer's domain and is left alone.
    """
    swept = []
    for folder, subfolders, files in os.walk(root):
        folder = Path(folder)
        subfolders[:] = [d for d in subfolders if not (folder / d / LOCK_FILE).exists()]
        for name in [d for d in subfolders if d.startswith(TEMP_PREFIX)]:
            shutil.rmtree(folder / name, ignore_errors=True)
            swept.append(folder / name)
        subfolders[:] = [d for d in subfolders if not d.startswith(TEMP_PREFIX)]
        for name in files:
            if name.startswith(TEMP_PREFIX):
                (folder / name).unlink(missing_ok=True)
                swept.append(folder / name)
    return swept


# ------------------------------------------------------------------------------------------------ hashes


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory artifact (.mlpackage): sorted relative paths plus file hashes.

    The directory form does not depend on file system order or timestamps.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(item.relative_to(path).as_posix().encode() + b"\0" + sha256_file(item).encode() + b"\0")
    return digest.hexdigest()


def path_bytes(path: str | Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------- safe paths


def resolve_inside(root: Path, relative, what: str) -> Path:
    """`root / relative`, refused before anything is read unless it stays inside `root`.

    `relative` comes from a file a user may have been handed (a manifest, a bundle): absolute paths, `..`,
    and symbolic links that lead out of `root` are refused.
    """
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise ManifestError(f"{what}: {relative!r} is not a relative file path")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or PureWindowsPath(relative).is_absolute() or "\\" in relative or ".." in pure.parts:
        raise ManifestError(f"{what}: {relative!r} points outside {root}; only paths inside it are read")
    path = Path(root) / pure
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise ManifestError(f"{what}: {relative!r} leads outside {root} through a symbolic link; refused")
    return path


def check_output(path: str | Path, flag: str, *, folder: bool = False) -> Path:
    """`path`, given as `flag`, checked before any work as a file (or with `folder`, a directory) to write.

    Refused: a directory where a file is wanted (and the reverse), any path below an existing file, and a
    `..` below a folder that does not exist yet (creating that folder would change what the path names);
    otherwise the write would fail only at the end of the work, with an OSError.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file; give a directory")
    if not folder and path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give the path of a file to write")
    for depth in range(1, len(path.parts)):  # the folders above it, from the top: the first one missing is made
        above = Path(*path.parts[:depth])
        if above.is_dir():
            continue
        if above.exists():
            raise ConfigError(f"{flag} {path}: {above} is a file, so nothing can be written below it")
        if ".." in path.parts[depth:]:
            raise ConfigError(f"{flag} {path}: '..' below {above}, which does not exist; give the path without it")
        break
    return path


def check_npy_size(handle, size: int) -> tuple[tuple, bool, object]:
    """Refuse (ValueError) a .npy stream whose header declares more data than its `size` bytes hold.

    numpy allocates an array's declared shape before reading it, so a crafted header of a few bytes could
    ask for hundreds of GiB.  Leaves `handle` after the header; returns (shape, fortran order, dtype).
    """
    import math

    from numpy.lib import format as npy

    try:
        major, _ = npy.read_magic(handle)
        read_header = npy.read_array_header_1_0 if major == 1 else npy.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
    except ValueError:
        raise
    except Exception as err:  # numpy parses the header with tokenize and ast, whose errors are their own kinds
        raise ValueError(f"its header cannot be parsed ({type(err).__name__}: {err})") from None
    declared, held = math.prod(shape) * dtype.itemsize, size - handle.tell()
    if declared > held:
        raise ValueError(f"its header declares {dtype} of shape {shape} ({declared:,} bytes) but only {held:,} "
                         f"bytes follow")
    return shape, fortran_order, dtype


class RowFile:
    """The rows of an array stored contiguously in a file (a C-order .npy, a safetensors tensor), read with
    positioned reads.  Nothing is mapped: a memory map keeps every page it touched resident until it is unmapped,
    so reading all rows of a 10 GB file through one would grow to 10 GB; this keeps the rows asked for only."""

    def __init__(self, path: str | Path, offset: int, dtype, shape: tuple[int, ...]):
        import math

        import numpy as np

        self._fd = None  # first: __del__ runs even when a check below refuses the file
        self.path, self.offset, self.dtype, self.shape = Path(path), offset, np.dtype(dtype), tuple(shape)
        self.row_bytes = self.dtype.itemsize * math.prod(self.shape[1:])
        end, size = offset + self.shape[0] * self.row_bytes, self.path.stat().st_size
        if end > size:
            raise ValueError(f"its header places {self.shape} of {self.dtype} at bytes {offset:,}-{end:,}, past the "
                             f"end of the file ({size:,} bytes)")

    def __getstate__(self):  # a data loader worker opens the file itself
        return {**self.__dict__, "_fd": None}

    def read(self, begin: int, count: int):
        """Rows begin .. begin + count - 1 (fewer at the end), as a new array."""
        import numpy as np

        rows = np.empty((max(0, min(count, self.shape[0] - begin)), *self.shape[1:]), self.dtype)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        buffer, done = memoryview(rows).cast("B"), 0
        while done < len(buffer):  # one read returns at most ~2 GiB, and less from some file systems
            got = os.preadv(self._fd, [buffer[done:]], self.offset + begin * self.row_bytes + done)
            if not got:
                raise ValueError(f"{self.path}: ends before row {begin + len(rows) - 1} (shortened since opened?)")
            done += got
        return rows

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


SAFETENSORS_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


def safetensors_rows(path: str | Path) -> dict[str, RowFile]:
    """The float tensors of a safetensors file as RowFiles (its layout: an 8-byte header length, the JSON header
    giving each tensor's dtype, shape and byte range, then the data); scalars and other dtypes are left out."""
    path = Path(path)
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    start = 8 + length
    return {name: RowFile(path, start + info["data_offsets"][0], SAFETENSORS_DTYPES[info["dtype"]], info["shape"])
            for name, info in header.items()
            if name != "__metadata__" and info["dtype"] in SAFETENSORS_DTYPES and info["shape"]}  # no 0-d: no rows


# ------------------------------------------------------------------------------------------------- locks


class DirectoryLock:
    """Exclusive hold on a directory for one writing stage.

    The lock is an OS file lock on DIR/.hetero.lock (filelock: flock on Unix), which the OS releases when
    its holder dies, so a crashed run never blocks the next one.  The holder also writes DIR/.hetero.lock.json
    (pid, host, verb, start) for the message another process gets, and removes it on release: finding that
    record while the lock is free means its holder died, which is reported as a stale lock taken over.
    """

    def __init__(self, directory: str | Path, verb: str):
        self.directory, self.verb = Path(directory), verb
        self.stale: dict | None = None
        self._lock = None

    def _holder(self) -> dict | None:
        try:
            record = json.loads((self.directory / LOCK_HOLDER).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def acquire(self) -> "DirectoryLock":
        from filelock import FileLock, Timeout

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        lock = FileLock(str(path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = self._holder() or {}
            raise LockError(
                f"{self.directory} is being written by `hetero {holder.get('verb', '?')}` (pid "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}); "
                f"wait for it to finish, or use another directory") from None
        except OSError as err:  # filelock opens without following links: a link (loop, dangling) fails here
            problem = "is a symbolic link" if path.is_symlink() else f"cannot be opened ({err.strerror})"
            raise LockError(f"{path}: {problem}; hetero's lock is a plain empty file it creates itself. Remove "
                            f"{path} (it holds no data) and run again") from None
        self._lock = lock
        self.stale = self._holder()
        if self.stale is not None:
            log.warning("%s: taking over the lock of `hetero %s` (pid %s on %s, since %s), which ended without "
                        "releasing it", self.directory, self.stale.get("verb"), self.stale.get("pid"),
                        self.stale.get("host"), self.stale.get("since"))
        record = self.directory / LOCK_HOLDER
        try:
            atomic_write_json(record, {"pid": os.getpid(), "host": socket.gethostname(), "verb": self.verb,
                                       "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        except OSError as err:  # a folder, or a link, where the record goes
            lock.release()
            self._lock = None
            raise LockError(f"{record}: cannot be written ({err.strerror}); hetero's lock record is a small file "
                            f"it writes itself. Remove {record} (it holds no data) and run again") from None
        for leftover in sweep_temporaries(self.directory):
            log.warning("removed %s, left by a writer that was killed", leftover)
        return self

    def release(self) -> None:
        if self._lock is not None:
            (self.directory / LOCK_HOLDER).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def tensors_digest(tensors: dict) -> str:
    """sha256 of named tensors (names, dtypes, shapes, values), whatever their order or file layout."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
