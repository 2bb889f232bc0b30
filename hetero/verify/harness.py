"""The verification driver: which artifact runs on which runtime, every check of each run, the report.

`verify` checks a family directory's artifacts (and writes DIR/verify.json); `run_checks` checks whatever a
:class:`hetero.verify.reference.Reference` holds, so a bundle goes through the same code.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict
from pathlib import Path

from hetero import runtimes
from hetero.errors import ConfigError
from hetero.family import ArtifactRecord, FamilyStore
from hetero.files import path_bytes, resolve_inside
from hetero.models import resize_to
from hetero.verify.chains import check_exit_chain
from hetero.verify.checks import (check_file_identity, check_numeric, check_space_identity, check_static_budgets,
                                  check_structure, open_artifact)
from hetero.verify.reference import REFERENCES, Reference, ReferenceCache, reference_from_store
from hetero.verify.results import CHECKS, DEFAULT_LATENCY_RUNS, ArtifactResult, Stop


def planned_runs(artifacts: list[ArtifactRecord], profile_of, every: bool = False) -> list[tuple]:
    """(artifact, profile or the error loading it, runtime target or None) for every run verification makes.

    Each artifact runs on every runtime its profile declares (resolved here: this process or an isolated
    environment; a missing one stays in the plan and is reported as skipped), and with `every` on each other
    runtime of its format available here too.
    """
    plan = []
    for artifact in artifacts:
        try:
            profile = profile_of(artifact)
        except Exception as err:
            plan.append((artifact, err, None))
            continue
        plan += [(artifact, profile, target) for target in runtimes.targets(profile, every)]
    return plan


def artifact_profile(artifact: ArtifactRecord, root: Path, given: dict, source: str):
    """The artifact's profile: `given` for this run (a bundle's, --profile), kept in the family under `root`
    (a profile file it was exported with), or built in."""
    from hetero.profiles import load_profile, read_profile

    if artifact.profile in given:
        return given[artifact.profile]
    if artifact.profile_file:
        return read_profile(resolve_inside(root, artifact.profile_file, f"{source}: profile of artifact "
                                                                        f"{artifact.file!r}"))
    return load_profile(artifact.profile)


def resolve_profile(artifact: ArtifactRecord, reference: Reference):
    return artifact_profile(artifact, reference.root, reference.profiles, reference.source)


# ------------------------------------------------------------------------------------------------ checks


def verify_artifact(reference: Reference, artifact: ArtifactRecord, profile, target: runtimes.Target | None,
                    latency_runs: int = DEFAULT_LATENCY_RUNS) -> ArtifactResult:
    """All checks of one artifact on one runtime target (`profile` is the error if it could not be loaded)."""
    result = ArtifactResult(artifact.member, artifact.profile, artifact.format, artifact.precision,
                            target.label if target else "?", artifact.file, target.version if target else None)
    opened = None
    try:
        if isinstance(profile, Exception):
            raise result.stop("identity", "fail", f"manifest artifact {artifact.file!r}: cannot load its profile "
                                                  f"{artifact.profile!r}: {profile}",
                              "not run: the artifact's profile is unknown")
        path, sha = check_file_identity(result, reference, artifact)
        if reference.members[artifact.member].kind == "multi-exit":
            check_exit_chain(result, reference, artifact, path, sha, profile, target, latency_runs)
            raise Stop
        opened = open_artifact(result, reference, artifact, path, target)
        check_space_identity(result, reference, artifact, opened.metadata, sha)
        size = int(opened.metadata.get("input_size", reference.members[artifact.member].input_size))
        floats = resize_to(reference.query_floats(), size)
        check_structure(result, reference, opened, profile, floats, target.label)
        check_numeric(result, reference, artifact, opened, profile, floats, target.label, latency_runs)
        check_static_budgets(result, reference.members[artifact.member], profile, path_bytes(path))
        result.checks.sort(key=lambda c: CHECKS.index(c.name))
    except Stop:
        pass
    finally:
        if opened is not None and hasattr(opened.runtime, "close"):
            opened.runtime.close()  # an isolated runtime's worker process
    return result


# ------------------------------------------------------------------------------------------------ driver


def run_checks(reference: Reference, latency_runs: int = DEFAULT_LATENCY_RUNS, strict: bool = False,
               all_runtimes: bool = False) -> dict:
    """Verify every artifact of `reference` with its profile's runtime into a report.

    With `all_runtimes`, also with every other runtime registered for the format that is installed here
    (older on-device runtimes are a real compatibility risk).
    """
    started = time.perf_counter()
    results = []
    for artifact, profile, target in planned_runs(reference.artifacts, lambda a: resolve_profile(a, reference),
                                                  all_runtimes):
        try:
            result = verify_artifact(reference, artifact, profile, target, latency_runs)
        except Exception as err:  # a bug or an unforeseen artifact problem: report it, go on with the rest
            result = ArtifactResult(artifact.member, artifact.profile, artifact.format, artifact.precision,
                                    target.label if target else "?", artifact.file)
            result.stop("identity", "fail", f"verification crashed: {type(err).__name__}: {err}",
                        "not run: verification crashed")
        results.append(result)
    return build_report(reference, results, [], strict, time.perf_counter() - started)


def host_description() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores"


def build_report(reference: Reference, results: list[ArtifactResult], notes: list[str], strict: bool,
                 seconds: float) -> dict:
    counts = {s: sum(c.status == s for r in results for c in r.checks) for s in ("pass", "fail", "skip")}
    # skips that only another platform can run (CoreML numerics off macOS): strict cannot demand them here
    counts["skip_platform"] = sum(c.status == "skip" and "needs_platform" in c.values for r in results
                                  for c in r.checks)
    passed = bool(results) and counts["fail"] == 0 and not (strict and counts["skip"] > counts["skip_platform"])
    return {
        "source": reference.source, "family": reference.family, "space_id": reference.space_id,
        "gallery_space_id": reference.gallery_space_id, "cloud": reference.cloud,
        "queries": len(reference.query_labels), "gallery": len(reference.gallery_labels),
        "host": host_description(),
        "strict": strict, "passed": passed, "counts": counts, "seconds": round(seconds, 2),
        "notes": notes,
        "artifacts": [{**asdict(r), "passed": r.passed} for r in results],
    }


def select_artifacts(store: FamilyStore, profile: str | None) -> tuple[list[ArtifactRecord], dict]:
    """The artifacts to verify and any profile given as a file (its budgets and tolerances then apply).

    `profile` is None (every artifact), a profile name (built in, or one the manifest's artifacts were
    exported for; anything else is a did-you-mean error), or the path of a profile .yaml.
    """
    from hetero.profiles import is_profile_path, load_profile

    if profile is None:
        return store.artifacts(), {}
    if is_profile_path(profile):
        override = load_profile(profile)
        return store.artifacts(override.name), {override.name: override}
    exported = tuple(sorted({a.profile for a in store.artifacts()}))
    if profile not in exported:
        load_profile(profile, also_known=exported)  # an unknown name is an error with a suggestion
    return store.artifacts(profile), {}


def verify(store: FamilyStore, profile: str | None = None, max_images: int | None = None,
           latency_runs: int = DEFAULT_LATENCY_RUNS, strict: bool = False, write: bool = True,
           all_runtimes: bool = False, cache: ReferenceCache = REFERENCES) -> tuple[dict, Reference | None]:
    """Verify the family's artifacts (or those of one profile); write DIR/verify.json.

    Returns the report and the reference it was checked against (None when there was nothing to check).
    A run with nothing to check writes nothing: the last verify.json stays as it was.
    """
    if latency_runs < 1:
        raise ConfigError(f"latency runs: must be >= 1, got {latency_runs}")
    if max_images is not None and max_images < 1:
        raise ConfigError(f"images: must be >= 1, got {max_images}")
    started = time.perf_counter()
    with store.lock("verify"):
        store.reload()
        artifacts, profiles = select_artifacts(store, profile)
        if not artifacts:
            return {"source": str(store.root), "family": store.name, "artifacts": [], "passed": False,
                    "counts": {"pass": 0, "fail": 0, "skip": 0}, "profile": profile}, None
        reference = reference_from_store(store, artifacts, max_images, profiles, cache)
        report = run_checks(reference, latency_runs, strict, all_runtimes)
        report["seconds"] = round(time.perf_counter() - started, 2)
        if write:
            store.write_json("verify.json", report)
    return report, reference
