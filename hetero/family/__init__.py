"""The family store: the one owner of a family directory.

Every stage, benchmark and the pytest plugin open a family through :class:`FamilyStore`; nothing else reads
or writes its manifest, member weights or artifact records.  The directory holds::

    config.yaml                           the validated config the family was trained from
    manifest.json                         members, space id, files with sha256, artifacts, compatibility
    checkpoints/<member>.safetensors      weights (safetensors, one canonical metadata key; nothing pickled)
    checkpoints/train_state.safetensors   weights + optimizer + epoch/history in one file (for --resume)
    checkpoints/previous/<cloud>.safetensors  a backward update's copy of the earlier family's cloud
    checkpoints/lqf/<member>.safetensors  an LQF update's linearisation points w0 (the checkpoint is w0 + dw)
    exports/<profile>/<member><suffix>    exported artifacts
    report.json, verify.json, gallery/    evaluation, verification and the default gallery
    teacher_cache/, search/               the edge phase's cached cloud answers; `hetero search`'s records
    .hetero.lock, .hetero.lock.json       held by the stage writing the directory

Every path the store reads comes from the manifest and is resolved inside the directory first (absolute
paths, `..` and symbolic links out are refused before anything is read), every write is atomic, and
writing stages hold the directory's lock.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hetero.config import Config, check_name, config_yaml, load_config, unknown_message
from hetero.errors import ConfigError, ManifestError
from hetero.files import (DirectoryLock, atomic_path, atomic_write_json, atomic_write_text, resolve_inside, sha256_file,
                          tensors_digest)  # noqa: F401 -- tensors_digest: the space id's fingerprint, offered here

log = logging.getLogger("hetero.family")

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
FORMAT = "hetero-family/1"
TRAIN_STATE = "checkpoints/train_state.safetensors"
# The files stages write into a family directory by name (glob patterns), besides those its manifest lists:
# reports, the default gallery, the default teacher cache and a search's records, fronts and fine-tuning states.
# `train --overwrite` removes these and the manifest's files, and nothing else.
STAGE_FILES = (CONFIG, MANIFEST, TRAIN_STATE, "report.json", "verify.json",
               "gallery/gallery.json", "gallery/index.faiss", "gallery/shards/shard-*.safetensors",
               "gallery/shards/shard-*.json", "teacher_cache/cache.json", "teacher_cache/shards/shard-*.safetensors",
               "search/candidates.json", "search/search.json", "search/pareto-*.md", "search/pareto-*.png",
               f"search/fine-tune-*/{TRAIN_STATE}")
SHA256 = Field(pattern=r"^[0-9a-f]{64}$")
# Config keys that do not change the weights: a resumed run may differ in them.
# search.fine_tune_epochs: a finished search resumed with another fine-tuning reuses its supernet and candidates.
RESUMABLE_CHANGES = ("train.workers", "export.", "search.fine_tune_epochs")


# --------------------------------------------------------------------------------------------- records


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class FileRecord(Record):
    file: str
    sha256: str = SHA256


class ExitRecord(Record):
    """One exit of a multi-exit member: after which stage, and the FLOPs of one image up to it (cumulative:
    the trunk so far, every head and entropy on the way, this exit's included)."""

    stage: int = Field(ge=1)
    flops: int = Field(ge=0)
    flops_vs_cloud: float = Field(ge=0)


class MemberRecord(Record):
    name: str
    # external: a frozen model the user brought (its file copied to `checkpoint`), with its own preprocessing.
    # multi-exit: one trunk with an exit after several stages (`exits`), each emitting the family embedding.
    kind: Literal["trained", "external", "multi-exit"] = "trained"
    role: Literal["cloud", "edge"]
    arch: str  # for an external model file: its format (onnx, torchscript, torch.export)
    width: float = Field(gt=0)
    depth: float = Field(gt=0)
    input_size: int = Field(ge=16, le=1024)
    dim: int = Field(ge=2, le=4096)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    params: int = Field(ge=0)
    flops: int = Field(ge=0)
    flops_vs_cloud: float = Field(ge=0)
    checkpoint: FileRecord
    colour_order: Literal["RGB", "BGR"] = "RGB"
    fingerprint: str | None = None  # an external model's sha256 (bytes, or tensors for weights)
    # an external cloud given as a trusted TorchScript / torch.export file: its name and format (the family
    # keeps only its ONNX conversion)
    converted_from: dict[str, str] | None = None
    # compat: adapter: the map from this member's own space into the cloud's, applied inside its graph
    adapter: dict[str, Any] | None = None
    exits: list[ExitRecord] | None = None  # multi-exit members, shallowest first; the last is the member itself
    # multi-exit members: the entropy rule's anchors and temperatures, and the thresholds `hetero calibrate` set
    early_exit: dict[str, Any] | None = None
    activation: Literal["relu", "leaky_relu"] = "relu"  # the architecture's activation variant
    # mode: lqf: the weights the member was linearised around (checkpoint holds the merged w0 + dw)
    linearised_at: FileRecord | None = None
    # found by `hetero search`: the profile it was chosen for, its sub-network, validation top-1 and latency
    search: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _plain(cls, value: str) -> str:
        return check_name(value, "member name")

    @model_validator(mode="after")
    def _exits_for_multi_exit(self):
        if (self.kind == "multi-exit") != bool(self.exits):
            raise ValueError(f"exits: a multi-exit member has exits and only it (member {self.name!r}, kind "
                             f"{self.kind!r})")
        return self

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: list[float]) -> list[float]:
        if not all(v > 0 for v in value):
            raise ValueError(f"every std must be > 0, got {value}")
        return value


class ArtifactRecord(Record):
    member: str
    profile: str
    format: str
    precision: str
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    file: str
    sha256: str = SHA256
    bytes: int = Field(ge=0)
    export_seconds: float = Field(ge=0)
    over_budget: list[str] = Field(default_factory=list)
    quantization: dict[str, Any] = Field(default_factory=dict)
    minimum_deployment_target: str | None = None
    checked_on: list[str] = Field(default_factory=list)  # the runtimes (with versions) export held it to

    @property
    def key(self) -> tuple[str, str]:
        return self.member, self.profile


class DataRecord(Record):
    train_images: int = Field(ge=0)
    train_classes: int = Field(ge=0)
    test_images: int = Field(ge=0)
    test_classes: int = Field(ge=0)
    skipped_images: list[str] = Field(default_factory=list)


class EpochRecord(Record):
    epoch: int
    loss: float
    seconds: float


class TrainingRecord(Record):
    epochs: int = Field(ge=0)
    device: str | None = None
    processes: int | None = None
    amp_bf16: bool | None = None
    channels_last: bool | None = None
    history: list[EpochRecord] = Field(default_factory=list)
    teacher_cache: dict[str, Any] | None = None  # where the edge phase's cloud answers came from, and their cost
    lqf: list[dict[str, Any]] | None = None  # mode lqf: per member, what was linearised and how the objective fell


class PreviousRecord(Record):
    """The earlier family of a backward update; its cloud is copied in, so nothing outside is read again."""

    dir: str  # where it was when this family was trained: for people, never read
    family: str
    version: int
    space_id: str
    cloud: str
    member: MemberRecord | None = None  # None in families written before the copy was kept
    checkpoint: FileRecord


class CompatibilityRecord(Record):
    matrix: dict[str, dict[str, dict[str, float]]]
    edges: dict[str, dict[str, float | bool]]
    backward: dict[str, Any] | None = None


class Manifest(Record):
    format: Literal["hetero-family/1"] = FORMAT
    family: str
    version: int = Field(ge=1)
    embedding_dim: int = Field(ge=2, le=4096)
    space_id: str = Field(pattern=r"^hs-[0-9a-f]{16}$")
    compat: Literal["none", "shared", "adapter"]
    mode: Literal["joint", "sequential", "backward", "lqf"]
    members: list[MemberRecord] = Field(min_length=2)
    data: DataRecord
    training: TrainingRecord
    artifacts: list[ArtifactRecord] = Field(default_factory=list)
    compatibility: CompatibilityRecord | None = None
    previous: PreviousRecord | None = None

    @model_validator(mode="after")
    def _consistent(self):
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"members: names must be unique, got {names}")
        if sum(m.role == "cloud" for m in self.members) != 1:
            raise ValueError("members: exactly one member must have role 'cloud'")
        for index, artifact in enumerate(self.artifacts):
            if artifact.member not in names:
                raise ValueError(f"artifacts.{index}.member: {artifact.member!r} is not a member of this family")
        for member in self.members:
            if member.dim != self.embedding_dim:
                raise ValueError(f"members: {member.name!r} has dim {member.dim}, the family {self.embedding_dim}")
        return self


def _schema_problems(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, p['loc'])) or '(top level)'}: {p['msg'].removeprefix('Value error, ')}"
                     for p in err.errors()[:8])


# ------------------------------------------------------------------------------------------- space ids


def space_id(family_name: str, version: int, dim: int, cloud_digest: str) -> str:
    """Fingerprint of one embedding space: the family and the cloud weights that define it."""
    key = f"{family_name}|{version}|{dim}|{cloud_digest}"
    return "hs-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def save_weights(path: Path, tensors: dict, metadata: dict) -> None:
    """Safetensors with one metadata key holding canonical JSON: identical tensors, identical bytes."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"hetero": json.dumps(metadata, sort_keys=True)})


def read_weights(path: Path, what: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, or a ManifestError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("hetero", "{}"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ManifestError(f"{path}: {what} is not a readable safetensors file ({err})") from None
    return tensors, metadata


# --------------------------------------------------------------------------------------------- caches


class SplitCache:
    """Decoded data splits by data config and load size, at most `maxsize` of them (least recently used go).

    A folder's modification time is part of the key, so adding or removing images there reloads it.
    """

    def __init__(self, maxsize: int = 2):
        from cachetools import LRUCache

        self._cache = LRUCache(maxsize=maxsize)

    def get(self, data_cfg, load_size: int):
        from hetero.data import load_split

        path = Path(data_cfg.path) if data_cfg.path else None
        stamp = path.stat().st_mtime_ns if path is not None and path.exists() else None
        key = (json.dumps(asdict(data_cfg), sort_keys=True), load_size, stamp)
        if key not in self._cache:
            self._cache[key] = load_split(data_cfg, load_size)
        return self._cache[key]

    def clear(self) -> None:
        self._cache.clear()


SPLITS = SplitCache()


# ----------------------------------------------------------------------------------------------- store


class FamilyStore:
    """One family directory: its manifest (validated), member weights, artifacts, config and data split."""

    def __init__(self, root: str | Path, manifest: Manifest, splits: SplitCache = SPLITS):
        self.root = Path(root)
        self.manifest = manifest
        self._splits = splits
        self._config: Config | None = None

    # -- opening

    @classmethod
    def open(cls, root: str | Path, splits: SplitCache = SPLITS) -> "FamilyStore":
        root = Path(root)
        return cls(root, cls._read_manifest(root), splits)

    @staticmethod
    def _read_manifest(root: Path) -> Manifest:
        path = root / MANIFEST
        if not root.is_dir():
            raise ManifestError(f"{root}: no such family directory; run `hetero train CONFIG --out {root}` first")
        if not path.is_file():
            raise ManifestError(f"{path}: no family manifest here; run `hetero train` (or `hetero run`) first")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ManifestError(f"{path}: not valid JSON ({err})") from None
        except RecursionError:
            raise ManifestError(f"{path}: nested too deeply to be a family manifest") from None
        try:
            return Manifest.model_validate(data)
        except ValidationError as err:
            raise ManifestError(f"{path}: not a hetero family manifest: {_schema_problems(err)}") from None

    def reload(self) -> "FamilyStore":
        self.manifest = self._read_manifest(self.root)
        return self

    def lock(self, verb: str) -> DirectoryLock:
        return DirectoryLock(self.root, verb)

    # -- paths

    def path(self, relative: str, what: str = "manifest path") -> Path:
        return resolve_inside(self.root, relative, f"{self.root / MANIFEST}: {what}")

    def checked_file(self, entry: FileRecord | ArtifactRecord, what: str) -> Path:
        """The path of a file the manifest lists, after checking it is inside, present and unchanged."""
        path = self.path(entry.file, what)
        if not path.is_file():
            raise ManifestError(f"{path}: listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise ManifestError(f"{path}: sha256 {actual} does not match the manifest's {entry.sha256}")
        return path

    # -- members

    @property
    def name(self) -> str:
        return self.manifest.family

    @property
    def space_id(self) -> str:
        return self.manifest.space_id

    @property
    def members(self) -> list[MemberRecord]:
        return self.manifest.members

    @property
    def cloud(self) -> MemberRecord:
        return next(m for m in self.members if m.role == "cloud")

    @property
    def edges(self) -> list[MemberRecord]:
        return [m for m in self.members if m.role == "edge"]

    def member(self, name: str) -> MemberRecord:
        for member in self.members:
            if member.name == name:
                return member
        raise ManifestError(f"{unknown_message(name, [m.name for m in self.members], 'member')} "
                            f"(family {self.name!r} in {self.root})")

    def load_member(self, name: str):
        """The member rebuilt from its record and checkpoint (sha256 checked), in eval mode."""
        return self._load(self.member(name), self.checked_file(self.member(name).checkpoint,
                                                                f"checkpoint of member {name!r}"))

    def load_previous_cloud(self):
        """A backward update's copy of the earlier family's frozen cloud."""
        previous = self.manifest.previous
        if previous is None:
            raise ManifestError(f"{self.root}: not a backward update (no `previous` in its manifest)")
        if previous.member is None:
            raise ManifestError(f"{self.root / MANIFEST}: written by an earlier hetero that did not keep a copy of "
                                f"the earlier cloud; train the update again")
        return self._load(previous.member, self.checked_file(previous.checkpoint, "the earlier family's cloud"))

    def load_linearisation_point(self, name: str):
        """An LQF update's member at the weights w0 it was linearised around (sha256 checked)."""
        record = self.member(name)
        if record.linearised_at is None:
            raise ManifestError(f"{self.root / MANIFEST}: member {name!r} was not fine-tuned by LQF (mode: lqf)")
        return self._load(record, self.checked_file(record.linearised_at, f"linearisation point of member {name!r}"))

    def _load(self, record: MemberRecord, path: Path):
        from hetero.models import Embedder, MultiExitEmbedder, architecture_known, first_mismatch

        if record.kind == "external":
            return self._load_external(record, path)
        if not architecture_known(record.arch):
            raise ManifestError(f"{self.root / MANIFEST}: member {record.name!r} names architecture "
                                f"{record.arch!r}, which this hetero does not have")
        if record.kind == "multi-exit":
            model = MultiExitEmbedder(record.arch, record.width, record.depth, record.dim, record.input_size,
                                      [e.stage for e in record.exits], record.mean, record.std,
                                      int((record.early_exit or {}).get("anchors", {}).get("count", 64)),
                                      record.activation)
        else:
            model = Embedder(record.arch, record.width, record.depth, record.dim, record.input_size, record.mean,
                             record.std, record.activation)
        if record.adapter is not None:
            from hetero.models import add_adapter

            add_adapter(model)
        tensors, _ = read_weights(path, f"checkpoint of member {record.name!r}")
        mismatch = first_mismatch(tensors, model.state_dict())
        if mismatch:
            raise ManifestError(f"{path}: does not fit member {record.name!r} ({record.arch}, width {record.width}, "
                                f"depth {record.depth}, dim {record.dim}): {mismatch}")
        model.load_state_dict(tensors)
        return model.eval()

    def _load_external(self, record: MemberRecord, path: Path):
        from hetero.config import EXTERNAL_KINDS, PICKLED_KINDS
        from hetero.external import ExternalCloud, Preprocessing

        kind = record.arch if record.arch in EXTERNAL_KINDS else "weights"
        if kind in PICKLED_KINDS:  # a family handed to you must never run its author's code
            raise ManifestError(
                f"{path}: member {record.name!r} is a {kind} file, which loads through pickle and can run any code "
                f"it carries; hetero never opens one from a family directory. Whoever trained the family can train "
                f"it again from the original file with `trust_model_file: true`, which keeps an ONNX conversion")
        model = ExternalCloud(path, kind, Preprocessing(record.input_size, tuple(record.mean), tuple(record.std),
                                                        record.colour_order),
                              arch=None if kind != "weights" else record.arch)
        if model.dim != record.dim:
            raise ManifestError(f"{path}: returns {model.dim}-d vectors, the manifest says {record.dim}")
        return model

    # -- config and data

    def config(self) -> Config:
        if self._config is None:
            path = self.root / CONFIG
            if not path.is_file():
                raise ManifestError(f"{path}: missing; the family directory is incomplete")
            self._config = load_config(path)
        return self._config

    def split(self):
        """The decoded open-set split of the family's data (shared by the stages of one process)."""
        config = self.config()
        return self._splits.get(config.data, config.load_size)

    # -- artifacts

    def artifacts(self, profile: str | None = None) -> list[ArtifactRecord]:
        return [a for a in self.manifest.artifacts if profile in (None, a.profile)]

    def artifact_path(self, artifact: ArtifactRecord) -> Path:
        return self.path(artifact.file, f"file of artifact {artifact.member}@{artifact.profile}")

    def artifact_for_file(self, path: Path) -> ArtifactRecord | None:
        for artifact in self.manifest.artifacts:
            try:
                if self.artifact_path(artifact).resolve() == Path(path).resolve():
                    return artifact
            except ManifestError:
                continue
        return None

    def register_artifact(self, artifact: ArtifactRecord) -> None:
        """Add (or replace, per member and profile) an artifact record; written at once."""
        self.reload()  # register against the newest manifest
        self.manifest.artifacts = [a for a in self.manifest.artifacts if a.key != artifact.key] + [artifact]
        self.save()

    def record_exit_rule(self, member: str, rule: dict) -> None:
        """Store a multi-exit member's calibrated rule (thresholds, target, what calibration measured)."""
        self.reload()
        record = self.member(member)
        record.early_exit = {**(record.early_exit or {}), "rule": rule}
        self.save()

    def record_compatibility(self, compatibility: CompatibilityRecord) -> None:
        self.reload()
        self.manifest.compatibility = compatibility
        self.save()

    def save(self) -> None:
        atomic_write_json(self.root / MANIFEST, self.manifest.model_dump(mode="json"))

    def write_json(self, name: str, data: dict) -> Path:
        """A stage's report (report.json, verify.json) in the family directory."""
        path = self.path(name, "report file")
        atomic_write_json(path, data)
        return path


# ---------------------------------------------------------------------------------------- new families


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

    An unfinished first run (a training state but no manifest yet) has written only its config, state and
    caches.  A directory with files but no family is refused: nothing there can be told apart from the user's.
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
        files = [store.path(name, "checkpoint of the earlier family") for name in listed]
    elif _is_training_state(root / TRAIN_STATE):
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

