"""The `hetero search` stage: train the supernet, search it per target, fine-tune the chosen students if
asked, and write the Pareto fronts and the searched family (the cloud and the students as ordinary members)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from hetero.config import Config, MemberConfig, TeacherCacheConfig
from hetero.data import ImageSet, load_split, split_open_set
from hetero.errors import ConfigError, ManifestError
from hetero.family import (TRAIN_STATE, FamilyStore, claim_for_training, new_directory, output_directory,
                           write_config, writing)
from hetero.files import atomic_write_text
from hetero.models import Embedder, mobilenet_defaults
from hetero.profiles import load_profile
from hetero.search.scoring import Scorer, static_records
from hetero.search.selection import check_runtime, feasible_pools, find_students, pareto_front
from hetero.search.space import Candidate, candidate_of, search_space
from hetero.search.supernet import Teacher, cached_teacher, fitting_batch_size, recalibrate, train_supernet
from hetero.training import (Callback, EpochEnd, Family, TrainingRun, load_state, prototypes_from,
                             write_family)

SEARCH_DIR = "search"
CANDIDATES = "candidates.json"
SUPERNET_CACHE = "teacher-cache-supernet"  # of the held-in images (validation classes are never in it)
FINE_TUNE_CACHE = "teacher-cache"  # of every training image, for the fine-tuning (train.teacher_cache.dir if set)
STUDENT = "student"  # the member a fine-tuning trains
RANK_LABELS = {"neighbours": "recall of the cloud's 10 nearest neighbours, validation images",
               "top1": "M[candidate][cloud] top-1, validation classes"}


def search(config: Config, out: str | Path, resume: bool = False, overwrite: bool = False,
           progress: bool | None = None, callbacks: Sequence[Callback] = ()) -> FamilyStore:
    """`hetero search`: train the supernet, search it per target, write the family with the chosen students.

    Each callback gets an EpochEnd after every epoch of the supernet and of each fine-tuning (its `stage`
    says which)."""
    settings = config.search
    if settings is None:
        raise ConfigError("search: the config has no `search` section (targets, search space) for `hetero search`")
    profiles = {t.name: load_profile(t.profile) for t in settings.targets}
    for name, profile in profiles.items():
        check_runtime(profile, name)
    if settings.design == "frozen-cloud" and not settings.cloud:
        raise ConfigError("search.cloud: design 'frozen-cloud' matches the cloud of a trained family; give its "
                          "directory (train one with `hetero train`), or use design 'shared-cloud'")
    space = search_space(settings)
    statics = static_records(space, config)
    pools = feasible_pools(statics, settings.targets, profiles)  # a budget nothing meets fails before training
    out = output_directory(out)
    with new_directory(out), writing(out, "search"):
        claim_for_training(out, config, resume, overwrite)
        split = load_split(config.data, config.load_size)
        seed = config.train.seed
        inner = split_open_set(split.train, None, settings.validation_classes, seed)
        write_config(out, config)
        given = given_cloud(config) if settings.cloud else None
        # frozen-cloud: the cloud's answers for the held-in images are computed once, as in the edge phase.
        teacher = (cached_teacher(config, out / SEARCH_DIR / SUPERNET_CACHE, given, inner.train, progress)
                   if settings.design == "frozen-cloud" else Teacher(None))
        # A supernet whose largest sub-network is the cloud's architecture starts from the cloud's weights.
        start = given if given is not None and is_cloud(max(space), settings.arch, given) else None
        supernet = train_supernet(config, out, inner.train, space, teacher, start, settings.epochs, progress,
                                  callbacks=callbacks)
        bn_images = inner.train.spread(settings.bn_images)
        cloud = teacher.model if teacher.model is not None else recalibrate(supernet.extract(max(space)), bn_images)
        folder = out / SEARCH_DIR
        folder.mkdir(exist_ok=True)
        calibration = inner.train.spread(max(p.calibration_images for p in profiles.values()))
        scorer = Scorer(supernet, cloud, inner, bn_images, folder / CANDIDATES, settings.latency_runs, calibration,
                        statics, settings.rank_by)
        chosen = find_students(scorer, pools, settings.targets, profiles, settings, seed)
        found = {pick["candidate"] for pick in chosen.values()}
        members = {c: scorer.member(c) for c in sorted(found)}
        if settings.fine_tune_epochs:  # once per sub-network, however many targets chose it
            members = {c: fine_tune(config, out, m, cloud, split, progress, callbacks)
                       for c, m in members.items()}
        students = {name: members[pick["candidate"]] for name, pick in chosen.items()}
        write_search_results(folder, scorer, chosen, profiles)
        _write_searched_family(config, out, split, cloud, students, chosen, scorer, supernet.history)
    return FamilyStore.open(out)


def is_cloud(candidate: Candidate, arch: str, cloud: Embedder) -> bool:
    """Whether the candidate of a supernet of `arch` has the cloud's architecture, tensor for tensor."""
    if arch != cloud.arch or (candidate.width, candidate.depth, candidate.input_size) != (
            cloud.width, cloud.depth, cloud.input_size):
        return False
    blocks = candidate.blocks(arch)
    return not blocks or blocks == (cloud.blocks or dict(zip(blocks, mobilenet_defaults(cloud.depth))))


def given_cloud(config: Config) -> Embedder:
    """The cloud of the trained family in `search.cloud`; it must be the config's cloud member."""
    path = Path(config.search.cloud)
    try:
        store = FamilyStore.open(path)
        record, cloud = store.cloud, store.load_member(store.cloud.name)
    except ManifestError as err:
        raise ConfigError(f"search.cloud ({path}): not a usable trained family: {err}") from None
    mine = config.family.cloud
    for field in ("arch", "width", "depth", "input_size"):
        if getattr(record, field) != getattr(mine, field):
            raise ConfigError(f"search.cloud ({path}): its cloud {record.name!r} has {field} "
                              f"{getattr(record, field)!r}, this config's cloud {mine.name!r} {getattr(mine, field)!r}")
    if record.dim != config.family.embedding_dim:
        raise ConfigError(f"search.cloud ({path}): its cloud returns {record.dim}-d vectors, family.embedding_dim is "
                          f"{config.family.embedding_dim}")
    return cloud.requires_grad_(False)


def fine_tune(config: Config, out: Path, student: Embedder, cloud: Embedder, split, progress: bool | None,
              callbacks: Sequence[Callback] = ()) -> Embedder:
    """A chosen student trained alone against the frozen final cloud for `fine_tune_epochs`: the edge phase
    of `hetero train` itself, for a family of that cloud and this student (fine_tune_config), on the family's
    training images (the validation classes have done their work) and through its teacher cache.  Resumable
    from its own state in DIR/search/fine-tune-<sub-network>-e<epochs>/."""
    candidate = candidate_of(student)
    epochs = config.search.fine_tune_epochs
    state_dir = out / SEARCH_DIR / f"fine-tune-{candidate.key}-e{epochs}"
    plain = fine_tune_config(config, candidate, out, split.train)
    run = TrainingRun(plain, state_dir, split, progress)
    family = run.family
    family.members[family.cloud_name].load_state_dict(cloud.state_dict())
    family.members[STUDENT].load_state_dict(student.state_dict())
    prototypes_from(family, family.cloud, split.train)  # the frozen shared head, as for a cloud not trained here
    run.done = plain.train.epochs  # the cloud's phase: the cloud given
    if (state_dir / TRAIN_STATE).is_file():
        run.done, run.history = load_state(state_dir / TRAIN_STATE, family, run.optimizer)
    stage = f"fine-tuning {candidate.key}"

    def renumbered(end: EpochEnd) -> None:  # callbacks count the fine-tuning's own epochs
        for callback in callbacks:
            callback(dataclasses.replace(end, epoch=end.epoch - plain.train.epochs, epochs=epochs, phase=0,
                                         stage=stage))

    run.train_phase(1, [STUDENT], epochs, [renumbered])
    return family.members[STUDENT].cpu().eval()


def fine_tune_config(config: Config, candidate: Candidate, out: Path, images: ImageSet) -> Config:
    """A family of the cloud and one student of the candidate's architecture, whose edge phase (mode
    sequential, `fine_tune_epochs` epochs) is the fine-tuning: through the teacher cache (train.teacher_cache,
    its default views when the config has none, in its dir or DIR/search/teacher-cache), with the batch the
    images can fill."""
    cache = config.train.teacher_cache or TeacherCacheConfig()
    cache = dataclasses.replace(cache, dir=cache.dir or str(out / SEARCH_DIR / FINE_TUNE_CACHE))
    train = dataclasses.replace(config.train, mode="sequential", compat="shared", previous=None, init=None,
                                edge_epochs=config.search.fine_tune_epochs, teacher_cache=cache,
                                batch_size=fitting_batch_size(config.train, images))
    student = student_config(STUDENT, config.search.arch, candidate)
    family = dataclasses.replace(config.family, members=[config.family.cloud, student])
    data = dataclasses.replace(config.data, image_size=config.load_size)  # the images as the search loaded them
    return dataclasses.replace(config, family=family, data=data, train=train, search=None)


def student_config(name: str, arch: str, candidate: Candidate) -> MemberConfig:
    """The member config of a searched student: an ordinary registry member of the supernet's architecture."""
    return MemberConfig(name=name, role="edge", arch=arch, width=candidate.width, depth=candidate.depth,
                        input_size=candidate.input_size, **candidate.blocks(arch))


def write_search_results(folder: Path, scorer: Scorer, chosen: dict, profiles: dict) -> None:
    """Per profile: the Pareto front (ranking figure against latency) as a Markdown table and a plot, and
    every visited candidate with its figures in search.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {"rank_by": scorer.rank_by, "latency_protocol": {}, "chosen": {}, "fronts": {}, "visited": {}}
    for profile_name in sorted({p.name for p in profiles.values()}):
        visited = {c for pick in chosen.values() if pick["profile"].name == profile_name for c in pick["visited"]}
        points = [(scorer.latency(c, pick_profile(chosen, profile_name))["median_ms"], scorer.rank(c), c)
                  for c in sorted(visited)]
        front = pareto_front(points)
        # How the latencies were measured (hetero.latency.time_batch1): as `hetero verify` times the students.
        summary["latency_protocol"][profile_name] = scorer.latency(points[0][2], pick_profile(chosen, profile_name)
                                                                   )["protocol"]
        picks = {name: pick["candidate"] for name, pick in chosen.items() if pick["profile"].name == profile_name}
        rows = [f"| sub-network | MFLOPs | of the cloud | params | latency ms | {scorer.rank_by} (ranks) | "
                "validation top-1 | chosen for |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for latency, figure, c in front:
            record = scorer.record(c)
            names = ", ".join(n for n, p in picks.items() if p == c)
            rows.append(f"| {c.key} | {record['flops'] / 1e6:.1f} | {record['flops_vs_cloud']:.4f} | "
                        f"{record['params']:,} | {latency:.3f} | {figure:.4f} | {scorer.top1(c):.4f} | {names} |")
        (folder / f"pareto-{profile_name}.md").write_text(
            f"# Pareto front on {profile_name}: {len(points)} sub-networks visited, {len(front)} on the front\n\n"
            + "\n".join(rows) + "\n")
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=12, c="0.6", label="visited")
        ax.plot([p[0] for p in front], [p[1] for p in front], "o-", ms=4, label="Pareto front")
        for name, c in picks.items():
            ax.scatter([scorer.latency(c, pick_profile(chosen, profile_name))["median_ms"]], [scorer.rank(c)],
                       marker="*", s=160, zorder=3, label=f"{name}: {c.key}")
        ax.set_xlabel(f"batch-1 latency on this machine, {profile_name} (ms)")
        ax.set_ylabel(RANK_LABELS[scorer.rank_by])
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"pareto-{profile_name}.png", dpi=120)
        plt.close(fig)
        summary["fronts"][profile_name] = [{"candidate": c.key, "latency_ms": lat, scorer.rank_by: figure}
                                           for lat, figure, c in front]
    for name, pick in chosen.items():
        summary["chosen"][name] = {"profile": pick["profile"].name, **scorer.record(pick["candidate"]),
                                   "visited": len(pick["visited"])}
        # Every visited candidate's figures, so that a benchmark can tell how well each ranks them.
        summary["visited"][name] = [c.key for c in pick["visited"]]
    atomic_write_text(folder / "search.json", json.dumps(summary, indent=1))


def pick_profile(chosen: dict, profile_name: str):
    return next(pick["profile"] for pick in chosen.values() if pick["profile"].name == profile_name)


def _write_searched_family(config: Config, out: Path, split, cloud: Embedder, students: dict[str, Embedder],
                           chosen: dict, scorer: Scorer, history: list) -> None:
    """The cloud and each chosen student as ordinary members of a family (manifest, checkpoints)."""
    members = [config.family.cloud] + [student_config(name, config.search.arch, candidate_of(s))
                                       for name, s in students.items()]
    plain = dataclasses.replace(config, family=dataclasses.replace(config.family, members=members), search=None)
    family = Family(plain, len(split.train.class_names), [0.5] * 3, [0.5] * 3)
    family.members[config.family.cloud.name] = cloud
    for name, student in students.items():
        family.members[name] = student
    settings = config.search
    facts = {"search": {"design": settings.design, "schedule": settings.schedule, "epochs": settings.epochs,
                        "candidates": len(search_space(settings)), "seconds": history[-1]["seconds"] if history else 0}}
    write_family(plain, out, family.eval(), split, history, run=None)
    store = FamilyStore.open(out)
    for record in store.manifest.members:
        if record.name in chosen:
            pick = chosen[record.name]
            record.search = {"profile": pick["profile"].name, "candidate": pick["candidate"].key,
                             "validation_top1": scorer.top1(pick["candidate"]), "rank_by": settings.rank_by,
                             "ranking_figure": scorer.rank(pick["candidate"]),
                             "latency_ms": scorer.latency(pick["candidate"], pick["profile"])["median_ms"],
                             "fine_tune_epochs": settings.fine_tune_epochs, **facts["search"]}
    store.save()
