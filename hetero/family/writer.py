"""Writing a trained family: each member's checkpoint and the manifest that FamilyStore reads back.

The family store writes what it reads.  `family` is the trained family (hetero.training's Family, one floor
up, so duck-typed here as TrainedFamily): its members by name, its cloud, and the external cloud's
(model, fingerprint) if it has one.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from hetero.config import Config
from hetero.errors import TrainingError
from hetero.external import ExternalCloud, count_onnx_flops, external_space_id
from hetero.family.manifest import (DataRecord, ExitRecord, FileRecord, Manifest, MemberRecord, PreviousRecord,
                                    TrainingRecord, space_id)
from hetero.family.store import FamilyStore, save_weights
from hetero.files import atomic_path, sha256_file, tensors_digest
from hetero.models import Embedder, count_flops, count_params, exit_flops


class TrainedFamily(Protocol):
    """What write_family reads of a trained family (hetero.training.model.Family)."""

    members: Mapping[str, torch.nn.Module]
    external: tuple[ExternalCloud, str] | None

    @property
    def cloud(self) -> Embedder | ExternalCloud: ...


def check_finite_weights(modules: dict[str, torch.nn.Module], when: str) -> None:
    """Refuse weights that hold NaN or infinity (a diverged run) before they are saved anywhere."""
    broken = [name for name, module in modules.items()
              if not all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())]
    if broken:
        raise TrainingError(f"{when}: the weights of {', '.join(broken)} hold NaN or infinity: the training "
                            f"diverged. Nothing of it was written; train again with a lower train.lr (--overwrite)")


def write_family(config: Config, out: Path, family: TrainedFamily, split, history: list, previous: dict | None = None,
                 run: dict | None = None, adapters: dict | None = None, exit_rules: dict | None = None,
                 linearised: dict[str, Embedder] | None = None) -> Manifest:
    """Write each member's checkpoint and the family manifest (a backward update keeps the old space id)."""
    fam = config.family
    check_finite_weights({cfg.name: family.members[cfg.name] for cfg in fam.members if not cfg.external},
                         "after training")
    files = {}
    for cfg in fam.members:
        if cfg.external:
            files[cfg.name] = _copy_external(out, cfg, family.cloud)
            continue
        path = out / "checkpoints" / f"{cfg.name}.safetensors"
        save_weights(path, family.members[cfg.name].state_dict(), {"member": cfg.name, "family": fam.name})
        files[cfg.name] = FileRecord(file=path.relative_to(out).as_posix(), sha256=sha256_file(path))
    cloud_flops = _flops(family.cloud)
    members = [_member_record(cfg, family.cloud if cfg.external else family.members[cfg.name], fam.embedding_dim,
                              cloud_flops, files[cfg.name]) for cfg in fam.members]
    for member in members:
        member.adapter = (adapters or {}).get(member.name)
        if member.name in (exit_rules or {}):
            model = family.members[member.name]
            member.kind, member.early_exit = "multi-exit", exit_rules[member.name]
            member.exit_head = model.exit_head
            member.exits = [ExitRecord(stage=stage, flops=flops, flops_vs_cloud=round(flops / cloud_flops, 4))
                            for stage, flops in zip(model.exits, exit_flops(model))]
        if linearised and member.name in linearised:  # mode lqf: w0, the point the member was linearised at
            path = out / "checkpoints" / "lqf" / f"{member.name}.safetensors"
            save_weights(path, linearised[member.name].state_dict(), {"member": member.name, "family": fam.name})
            member.linearised_at = FileRecord(file=path.relative_to(out).as_posix(), sha256=sha256_file(path))
    if family.external is not None:
        cloud = family.cloud
        record = members[[m.name for m in members].index(fam.cloud.name)]
        record.fingerprint = family.external[1]
        if cloud.converted_from is not None:
            record.converted_from = {"file": cloud.converted_from[0].name, "format": cloud.converted_from[1]}
        own_space = external_space_id(family.external[1], cloud.preprocessing, fam.embedding_dim)
    else:
        own_space = space_id(fam.name, fam.version, fam.embedding_dim, tensors_digest(family.cloud.state_dict()))
    manifest = Manifest(
        family=fam.name, version=fam.version, embedding_dim=fam.embedding_dim,
        space_id=previous["store"].space_id if previous else own_space,
        compat=config.train.compat, mode=config.train.mode, members=members,
        data=DataRecord(train_images=len(split.train), train_classes=len(split.train.class_names),
                        test_images=len(split.test), test_classes=len(split.test.class_names),
                        skipped_images=split.skipped),
        training=TrainingRecord(epochs=history[-1]["epoch"] if history else 0, **(run or {}), history=history),
        previous=_previous_record(out, previous) if previous else None,
    )
    FamilyStore(out, manifest).save()
    return manifest


def _member_record(cfg, member: Embedder | ExternalCloud, dim: int, cloud_flops: int, checkpoint: FileRecord
                   ) -> MemberRecord:
    flops = _flops(member)
    external = isinstance(member, ExternalCloud)
    return MemberRecord(
        name=cfg.name, kind="external" if external else "trained", role=cfg.role,
        arch=(member.arch or member.kind) if external else cfg.arch, width=cfg.width, depth=cfg.depth,
        input_size=member.input_size, dim=dim, mean=member.mean.flatten().tolist(), std=member.std.flatten().tolist(),
        params=_params(member), flops=flops, flops_vs_cloud=round(flops / cloud_flops, 4) if cloud_flops else 0.0,
        checkpoint=checkpoint, colour_order=member.preprocessing.colour_order if external else "RGB",
        activation=cfg.activation, expand_ratios=getattr(cfg, "expand_ratios", None),
        kernel_sizes=getattr(cfg, "kernel_sizes", None))


def _flops(member) -> int:
    if isinstance(member, ExternalCloud) and member.kind == "onnx":
        return count_onnx_flops(member.path, member.input_size)
    return count_flops(member)


def _params(member) -> int:
    if isinstance(member, ExternalCloud) and member.kind == "onnx":
        import onnx

        return int(sum(np.prod(t.dims) for t in onnx.load(str(member.path)).graph.initializer))
    return count_params(member)


def _copy_external(out: Path, cfg, cloud: ExternalCloud) -> FileRecord:
    """A copy of the external model in the family: evaluating and exporting never read outside it."""
    import shutil

    path = out / "checkpoints" / f"{cfg.name}{cloud.path.suffix.lower()}"
    with atomic_path(path) as tmp:
        shutil.copyfile(cloud.path, tmp)
    return FileRecord(file=path.relative_to(out).as_posix(), sha256=sha256_file(path))


def _previous_record(out: Path, previous: dict) -> PreviousRecord:
    """Keep a copy of the earlier cloud: evaluating the update never reads outside this directory."""
    store: FamilyStore = previous["store"]
    cloud = store.cloud
    path = out / "checkpoints" / "previous" / f"{cloud.name}.safetensors"
    save_weights(path, previous["cloud"].state_dict(), {"member": cloud.name, "family": store.name})
    copy = FileRecord(file=path.relative_to(out).as_posix(), sha256=sha256_file(path))
    return PreviousRecord(dir=str(store.root.resolve()), family=store.name, version=store.manifest.version,
                          space_id=store.space_id, cloud=cloud.name,
                          member=cloud.model_copy(update={"checkpoint": copy}), checkpoint=copy)
