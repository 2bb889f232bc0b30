"""The family store: one family directory's validated manifest, member weights (safetensors, checked
against the manifest's sha256), artifacts, config and decoded data split."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from pydantic import ValidationError

from hetero.config import Config, load_config, unknown_message
from hetero.errors import ManifestError
from hetero.family.manifest import (CONFIG, MANIFEST, ArtifactRecord, CompatibilityRecord, FileRecord, Manifest,
                                    MemberRecord, schema_problems)
from hetero.family.manifest import space_id as space_id_of
from hetero.files import DirectoryLock, atomic_path, atomic_write_json, resolve_inside, sha256_file, tensors_digest


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
            raise ManifestError(f"{path}: not a hetero family manifest: {schema_problems(err)}") from None

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
        from hetero.models import Embedder, MultiExitEmbedder, architecture_known, first_mismatch, member_blocks

        if record.kind == "external":
            return self._load_external(record, path)
        if not architecture_known(record.arch):
            raise ManifestError(f"{self.root / MANIFEST}: member {record.name!r} names architecture "
                                f"{record.arch!r}, which this hetero does not have")
        if record.kind == "multi-exit":
            model = MultiExitEmbedder(record.arch, record.width, record.depth, record.dim, record.input_size,
                                      [e.stage for e in record.exits], record.mean, record.std,
                                      int((record.early_exit or {}).get("anchors", {}).get("count", 64)),
                                      record.activation, record.exit_head, member_blocks(record))
        else:
            model = Embedder(record.arch, record.width, record.depth, record.dim, record.input_size, record.mean,
                             record.std, record.activation, member_blocks(record))
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

    # -- the space id

    def check_space_id(self, cloud=None) -> None:
        """Refuse a family whose space id is not the one the weights that define it give (`cloud`: its cloud
        member, when already loaded): a cloud file replaced after training, its sha256 in the manifest updated
        to match, would otherwise lend the id of galleries it never embedded to every family built on top.

        An original family's id is recomputed from its cloud's weights; for an external cloud, whose id hashes
        the file's fingerprint, the fingerprint is recomputed from the file (a converted one keeps only its ONNX,
        not the file the fingerprint was taken of).  An update (mode backward or lqf) inherits the id of the
        family it updated, whose cloud defined it: that id must be the one its `previous` records.
        """
        manifest, where = self.manifest, self.root / MANIFEST
        if manifest.previous is not None:
            if manifest.space_id != manifest.previous.space_id:
                raise ManifestError(f"{where}: space id {manifest.space_id} differs from {manifest.previous.space_id}, "
                                    f"the one it records for the family it updated ({manifest.previous.family!r}), "
                                    f"whose space an update keeps; the manifest was edited. Use the family as it "
                                    f"was written, or train it again (--overwrite)")
            return
        record = self.cloud
        path = self.checked_file(record.checkpoint, f"checkpoint of member {record.name!r}")
        if record.kind == "external":  # the id hashes the file's fingerprint (and preprocessing the record rounds)
            from hetero.config import EXTERNAL_KINDS
            from hetero.external import fingerprint

            kind = record.arch if record.arch in EXTERNAL_KINDS else "weights"
            recorded = record.fingerprint
            computed = fingerprint(path, kind) if record.converted_from is None and recorded else recorded
            what = f"fingerprint {recorded}"
        else:
            cloud = cloud if cloud is not None else self.load_member(record.name)
            recorded = manifest.space_id
            computed = space_id_of(manifest.family, manifest.version, manifest.embedding_dim,
                                   tensors_digest(cloud.state_dict()))
            what = f"space id {recorded}"
        if computed != recorded:
            raise ManifestError(f"{where}: {what} is not the one the weights of its cloud {record.name!r} ({path}) "
                                f"give, {computed}: that file was replaced after the family was trained (and its "
                                f"sha256 in the manifest updated), so nothing embedded in space {manifest.space_id} "
                                f"came from it. Use the family as it was trained, or train this one again "
                                f"(--overwrite) for a space of its own")

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
