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

The rooms: ``manifest`` (the directory's names, the manifest's records, space ids), ``store`` (FamilyStore,
member weights, the data split cache), ``outputs`` (whether and how a stage may write a directory), and
``writer`` (a trained family's checkpoints and manifest).
"""
from __future__ import annotations

from hetero.family.manifest import (CONFIG, FORMAT, MANIFEST, SHA256, STAGE_FILES, TRAIN_STATE, ArtifactRecord,
                                    CompatibilityRecord, DataRecord, EpochRecord, ExitRecord, FileRecord, Manifest,
                                    MemberRecord, PreviousRecord, Record, TrainingRecord, schema_problems, space_id)
from hetero.family.outputs import (RESUMABLE_CHANGES, claim_for_training, existing_outputs, family_files, new_directory,
                                   output_directory, remove_family_files, write_config, writing)
from hetero.family.store import SPLITS, FamilyStore, SplitCache, read_weights, save_weights
from hetero.files import tensors_digest  # the space id's fingerprint, offered here

__all__ = [
    "CONFIG", "FORMAT", "MANIFEST", "RESUMABLE_CHANGES", "SHA256", "SPLITS", "STAGE_FILES", "TRAIN_STATE",
    "ArtifactRecord", "CompatibilityRecord", "DataRecord", "EpochRecord", "ExitRecord", "FamilyStore", "FileRecord",
    "Manifest", "MemberRecord", "PreviousRecord", "Record", "SplitCache", "TrainingRecord",
    "claim_for_training", "existing_outputs", "family_files", "new_directory", "output_directory", "read_weights",
    "remove_family_files", "save_weights", "schema_problems", "space_id", "tensors_digest", "write_config", "writing",
]
