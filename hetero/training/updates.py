"""Starting from an earlier family: fine-tuning (train.init), a backward-compatible update's frozen earlier
cloud and its class prototypes (mode backward), mode lqf's linearised fine-tuning, and the training images a
multi-exit family holds out for calibration."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from hetero.config import Config
from hetero.data import calibration_split
from hetero.errors import ConfigError, ManifestError
from hetero.family import FamilyStore
from hetero.maths import top1_correct
from hetero.models import Embedder, embed_images
from hetero.training.lqf import fine_tune, preconditioner
from hetero.training.model import Family

log = logging.getLogger("hetero.training")


def read_previous(config: Config) -> dict:
    """The earlier family of a backward-compatible update: its store and its frozen cloud member."""
    run_dir = Path(config.train.previous)
    try:
        store = FamilyStore.open(run_dir)
        if store.manifest.embedding_dim != config.family.embedding_dim:
            raise ManifestError(f"its embedding_dim is {store.manifest.embedding_dim}, this family's is "
                                f"{config.family.embedding_dim}: a new family must keep the old dimension")
        cloud = store.load_member(store.cloud.name).requires_grad_(False)
        store.check_space_id(cloud)  # the update inherits that space id: its weights must be the ones it names
    except ManifestError as err:
        raise ConfigError(f"train.previous ({run_dir}): not a usable earlier family: {err}") from None
    return {"store": store, "cloud": cloud}


def previous_members_match(config: Config, store: FamilyStore, key: str) -> None:
    """Each member of the config must be the same network as the same-named member of the family in `key`."""
    for cfg in config.family.members:
        try:
            record = store.member(cfg.name)
        except ManifestError:
            raise ConfigError(f"family.members: {cfg.name!r} is not a member of the family in train.{key} "
                              f"({store.root}); it has {', '.join(m.name for m in store.members)}") from None
        for field in ("arch", "width", "depth", "input_size", "activation", "role"):
            mine, theirs = getattr(cfg, field), getattr(record, field)
            if mine != theirs:
                raise ConfigError(f"family.members: {cfg.name!r} has {field} {mine!r}, the same member in "
                                  f"train.{key} ({store.root}) {theirs!r}; fine-tuning keeps each network as it is")


def start_from_family(family: Family, config: Config) -> None:
    """train.init: every member starts from the same-named member of an earlier family (ordinary fine-tuning)."""
    try:
        store = FamilyStore.open(Path(config.train.init))
        previous_members_match(config, store, "init")
        for name, member in family.members.items():
            member.load_state_dict(store.load_member(name).state_dict())
    except ManifestError as err:
        raise ConfigError(f"train.init ({config.train.init}): not a usable earlier family: {err}") from None


def lqf_update(config: Config, split) -> tuple[Family, dict, dict[str, Embedder], list[dict]]:
    """mode: lqf: each member of the family in `previous`, linearised around its weights and fine-tuned.

    Returns the family holding the merged members (w0 + dw), the previous family, the linearisation points
    (w0) and what each member's fine-tuning did.
    """
    previous = read_previous(config)
    store = previous["store"]
    try:
        previous_members_match(config, store, "previous")
        for cfg in config.family.members:
            record = store.member(cfg.name)
            if record.kind != "trained":  # a multi-exit trunk has weights its last output never uses
                shape = (f"exits after stages {', '.join(str(e.stage) for e in record.exits)}" if record.exits
                         else f"a {record.arch} file")
                raise ConfigError(f"train.previous ({store.root}): member {cfg.name!r} is a {record.kind} member "
                                  f"({shape}); mode lqf linearises single-output networks that hetero trained and "
                                  f"does not support {record.kind} members. Leave {cfg.name!r} out of "
                                  f"family.members (the update then holds the others), or update the family with "
                                  f"mode: backward")
        members = {cfg.name: store.load_member(cfg.name) for cfg in config.family.members}
    except ManifestError as err:
        raise ConfigError(f"train.previous ({store.root}): not a usable earlier family: {err}") from None
    settings, train_cfg = config.train.lqf, config.train
    family = Family(config, len(split.train.class_names), [0.5] * 3, [0.5] * 3)
    prototypes_from(family, previous["cloud"], split.train)  # the frozen shared classifier, as in backward mode
    prototypes = family.head(family.cloud_name).loss.W.detach().T.contiguous()
    images, labels = split.train.floats(), split.train.labels
    weights, choices = {name: settings.compat_weight for name in members}, {}
    if settings.compat_weight == "auto":
        weights, choices = choose_compat_weights(config, members, family.cloud_name, previous["cloud"], split.train,
                                                 prototypes)
    reference = embed_images(previous["cloud"], images) if any(weights.values()) else None
    points, facts = {}, []
    for name, member in members.items():
        linearised, done = fine_tune(member, name, images, labels, prototypes, reference, weights[name], settings,
                                     train_cfg.epochs, train_cfg.weight_decay, train_cfg.batch_size)
        family.members[name].load_state_dict(linearised.merged().state_dict())
        points[name] = linearised.base
        facts.append({**done, **({"compat_weight_search": choices[name]} if name in choices else {})})
        log.info("lqf %s: %s", name, {k: v for k, v in done.items() if k != "history"})
    return family.eval(), previous, points, facts


def choose_compat_weights(config: Config, members: dict[str, Embedder], cloud_name: str, previous_cloud: Embedder,
                          train, prototypes: torch.Tensor) -> tuple[dict[str, float], dict[str, dict]]:
    """train.lqf.compat_weight: auto, each member's weight from `compat_grid`, fitted on all but `held_out` of
    each class's images and scored on those (see LqfConfig); returns the weights and each member's scores.

    The cloud goes first: the edges are scored against the gallery of the cloud updated with its choice.
    """
    settings, train_cfg = config.train.lqf, config.train
    fit, held = calibration_split(train, settings.held_out, "images", config.data.split_seed)
    images, labels = train.floats(), train.labels
    if not len(held):
        raise ConfigError("train.lqf.compat_weight: auto holds out some of each class's images to choose the weight "
                          "on, but no class of the update's training data has more than one image; give a number")
    fit_labels, held_labels = labels[fit], labels[held]
    previous_gallery = embed_images(previous_cloud, images[fit])  # also the compat term's reference

    def top1(queries: torch.Tensor, gallery: torch.Tensor) -> float:
        return top1_correct(queries, held_labels, gallery, fit_labels).float().mean().item()

    weights, choices, cloud_gallery = {}, {}, None
    for name in sorted(members, key=lambda n: n != cloud_name):
        scores, galleries = {}, {}
        inverse = preconditioner(members[name], name, images[fit], fit_labels, prototypes, settings,
                                 train_cfg.batch_size)  # the same for every weight
        for weight in settings.compat_grid:
            model, _ = fine_tune(members[name], name, images[fit], fit_labels, prototypes, previous_gallery, weight,
                                 settings, train_cfg.epochs, train_cfg.weight_decay, train_cfg.batch_size, inverse)
            queries = embed_images(model, images[held])
            gallery = embed_images(model, images[fit]) if name == cloud_name else cloud_gallery
            galleries[weight] = gallery
            scores[weight] = (top1(queries, gallery) + top1(queries, previous_gallery)) / 2
        best = max(settings.compat_grid, key=lambda w: (scores[w], -w))
        if name == cloud_name:
            cloud_gallery = galleries[best]
        weights[name] = best
        choices[name] = {"chosen": best, "held_out_images": len(held),
                         "scores": {f"{w:g}": round(scores[w], 4) for w in settings.compat_grid}}
        log.info("lqf %s: compat_weight %g chosen on %d held-out images (scores %s)", name, best, len(held),
                 choices[name]["scores"])
    return weights, choices


@torch.no_grad()
def prototypes_from(family: Family, old_cloud: Embedder, images) -> None:
    """Start the shared head at the old cloud's class means and keep it frozen (BCT's influence loss).

    Means of the old embeddings work for classes the old family never saw as well as for those it did.
    """
    old = embed_images(old_cloud, images.floats())
    prototypes = torch.zeros(len(images.class_names), old.shape[1]).index_add_(0, images.labels, old)
    head = family.head(family.cloud_name).loss
    head.W.copy_(torch.nn.functional.normalize(prototypes, dim=1).T)


def hold_out_for_calibration(config: Config, split):
    """With a multi-exit member, keep `early_exit.held_out` of the training classes (or of each class's
    images) out of training (every member's), for `hetero calibrate`; other families train on every
    training image as before."""
    import dataclasses

    settings = config.train.early_exit
    if not any(m.exits is not None for m in config.family.members) or settings.held_out == 0:
        return split
    keep, _ = calibration_split(split.train, settings.held_out, settings.held_out_by, config.data.split_seed)
    return dataclasses.replace(split, train=split.train.subset(keep))
