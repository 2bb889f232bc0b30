"""Cross-platform compatibility harness: run each exported artifact in its runtime on real held-out images.

Per artifact (and runtime) the same fixed list of checks, so CI systems always see the same test cases:

- ``identity``: sha256 of the file against the manifest, the space id in the file's *own* metadata against
  the space id of the cloud gallery, and the member named in the file against the manifest entry;
- ``structure``: the artifact honours the embedding contract (one unit vector of the family dimension per
  image; for CoreML on Linux: the spec's inputs/outputs, metadata and weights' precision);
- ``parity``: min and mean cosine to the torch member on held-out images (tolerance from the profile);
- ``retrieval``: queries through the runtime against the gallery embedded by the torch cloud member, top-1
  and mAP@R against the torch edge member's figure (max top-1 drop from the profile), the BCT criterion
  (M[edge][cloud] > M[edge][edge]) still holding, and top-1 agreement with the torch member;
- ``budget_size``, ``budget_params``, ``budget_flops``, ``budget_latency``: against the profile's budgets
  (latency: median of N runs at batch 1 on this CPU).

A missing, corrupt or tampered artifact is a failed check with its reason; the others are still verified.
A runtime that cannot execute here (CoreML outside macOS, a package not installed) makes its numeric checks
"skip" with the reason, never "pass".  The reference data (held-out images, torch embeddings, the cloud
gallery) is a :class:`hetero.verify.reference.Reference`, made from a family directory or a bundle.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hetero import formats, runtimes
from hetero.errors import ConfigError, ExportError, ManifestError, RuntimeUnavailable
from hetero.maths import retrieval_metrics
from hetero.family import ArtifactRecord, FamilyStore
from hetero.files import path_bytes, sha256_path
from hetero.models import resize_to
from hetero.verify.reference import REFERENCES, Reference, ReferenceCache, reference_from_store

CHECKS = ("identity", "structure", "parity", "retrieval",
          "budget_size", "budget_params", "budget_flops", "budget_latency")
NUMERIC = ("parity", "retrieval", "budget_latency")
DEFAULT_LATENCY_RUNS = 30


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip
    detail: str
    values: dict = field(default_factory=dict)


@dataclass
class ArtifactResult:
    member: str
    profile: str
    format: str
    precision: str
    runtime: str  # the runtime and its version, e.g. "tflite-runtime 2.14.0"
    file: str
    runtime_version: str | None = None
    checks: list[Check] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)  # per query, for the report's histograms

    @property
    def passed(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def add(self, name: str, status: str, detail: str, **values) -> Check:
        check = Check(name, status, detail, values)
        self.checks.append(check)
        return check

    def stop(self, name: str, status: str, detail: str, reason: str, **values) -> "_Stop":
        """Record `name` and skip every check not yet run, for `reason`; raise what this returns."""
        self.add(name, status, detail, **values)
        done = {c.name for c in self.checks}
        for other in CHECKS:
            if other not in done:
                self.add(other, "skip", reason)
        self.checks.sort(key=lambda c: CHECKS.index(c.name))
        return _Stop()

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)


class _Stop(Exception):
    """Ends an artifact's checks early; its result already says why."""


PRECISION_DTYPES = {"fp32": ("FLOAT32",), "fp16": ("FLOAT16",), "int8-weights": ("INT8", "UINT8"),
                    "int8": ("INT8", "UINT8")}


def structure_problems(facts: dict, metadata: dict, precision: str, layout: str) -> list[str]:
    """What is wrong with an inspected artifact's inputs, outputs and weights (empty when nothing)."""
    problems = []
    size, dim = metadata.get("input_size"), metadata.get("embedding_dim")
    inputs, outputs = facts.get("inputs", {}), facts.get("outputs", {})
    if len(inputs) != 1:
        problems.append(f"expected one input, found {list(inputs)}")
    else:
        (name, shape), = inputs.items()
        expected = [3, size, size] if layout == "NCHW" else [size, size, 3]
        if shape and list(shape[-3:]) != expected:
            problems.append(f"input {name!r} has shape {shape}, expected (batch, {', '.join(map(str, expected))}) "
                            f"for layout {layout}")
    if len(outputs) != 1:
        problems.append(f"expected one output, found {list(outputs)}")
    else:
        (name, shape), = outputs.items()
        if shape and shape[-1] != dim:
            problems.append(f"output {name!r} has shape {shape}, expected last dimension {dim}")
    weights = facts.get("weight_dtypes") or {}
    if weights and precision in PRECISION_DTYPES:
        dominant = max(weights, key=weights.get)
        if not any(dtype in weights for dtype in PRECISION_DTYPES[precision]) or (
                precision in ("fp32", "fp16") and dominant not in PRECISION_DTYPES[precision]):
            problems.append(f"weights are stored as {weights} (elements per dtype) but the profile's precision "
                            f"{precision!r} expects {'/'.join(PRECISION_DTYPES[precision])}")
    return problems


def planned_runs(artifacts: list[ArtifactRecord], profile_of, every: bool = False) -> list[tuple]:
    """(artifact, profile or the error loading it, runtime target or None) for every run verification makes.

    Each artifact runs on every runtime its profile declares (resolved here: this process or an isolated
    environment; a missing one stays in the plan and is reported as skipped), and with `every` on each other
    runtime of its format available here too.
    """
    plan = []
    for artifact in artifacts:
        try:
            profile = profile_of(artifact.profile)
        except Exception as err:
            plan.append((artifact, err, None))
            continue
        plan += [(artifact, profile, target) for target in runtimes.targets(profile, every)]
    return plan


# ------------------------------------------------------------------------------------------------ checks


def resolve_profile(name: str, reference: Reference):
    if name in reference.profiles:
        return reference.profiles[name]
    from hetero.profiles import load_profile

    return load_profile(name)


@dataclass
class _Opened:
    runtime: object | None  # the adapter, or None when the runtime cannot execute here
    metadata: dict
    facts: dict | None  # structure read without running (when the runtime cannot run)
    unavailable: str | None  # why it cannot run here


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
        path, sha = _file_identity(result, reference, artifact)
        if reference.members[artifact.member].kind == "multi-exit":
            _exit_chain(result, reference, artifact, path, sha, profile, target, latency_runs)
            raise _Stop
        opened = _open(result, reference, artifact, path, target)
        _space_identity(result, reference, artifact, opened.metadata, sha)
        size = int(opened.metadata.get("input_size", reference.members[artifact.member].input_size))
        floats = resize_to(reference.query_floats(), size)
        _structure(result, reference, opened, profile, floats, target.label)
        _numeric(result, reference, artifact, opened, profile, floats, target.label, latency_runs)
        _static_budgets(result, reference.members[artifact.member], profile, path_bytes(path))
        result.checks.sort(key=lambda c: CHECKS.index(c.name))
    except _Stop:
        pass
    finally:
        if opened is not None and hasattr(opened.runtime, "close"):
            opened.runtime.close()  # an isolated runtime's worker process
    return result


EXIT_AGREEMENT = 0.99  # the exit a device's chained run picks must be torch's for this share of queries


def _exit_chain(result: ArtifactResult, reference: Reference, artifact: ArtifactRecord, path: Path, sha: str, profile,
                target, latency_runs: int) -> None:
    """A multi-exit artifact: the chain's files are the ones exported together; every exit keeps parity and
    retrieval against the cloud gallery; the chained run, stage by stage with the calibrated rule, picks the
    exit torch picks for >= 99% of queries."""
    from hetero.maths import apply_rule
    from hetero.models import exit_embeddings, exit_entropies

    if target.environment is not None:
        raise result.stop("identity", "skip", f"{target.label} runs in an isolated environment, which does not run "
                                              f"exit chains yet", "skipped: exit chains run in this process only")
    try:
        chain = formats.get(artifact.format).open_exit_chain(path)
    except ExportError as err:
        raise result.stop("identity", "fail", str(err), "not run: the chain's files were not exported together") \
            from None
    _space_identity(result, reference, artifact, chain.metadata, sha)
    try:
        model = FamilyStore.open(reference.root).load_member(artifact.member)
    except ManifestError as err:
        raise result.stop("structure", "skip", f"the torch member is not at hand ({err})",
                          "skipped: multi-exit artifacts are checked from their family directory") from None
    floats = resize_to(reference.query_floats(), model.input_size)
    ours, ours_entropy = (torch.from_numpy(a) for a in chain.exits(floats.numpy()))
    theirs = exit_embeddings(model, floats)
    stages = list(model.exits)
    shape_ok = tuple(ours.shape) == (len(floats), len(stages), model.dim)
    norms = ours.norm(dim=2) if shape_ok else torch.zeros(1)
    result.add("structure", "pass" if shape_ok and (norms - 1).abs().max() < 1e-3 else "fail",
               f"{len(stages)} exits (stages {', '.join(map(str, stages))}) + {len(chain.stages)} chained stage graphs; "
               f"all-exits graph gives {tuple(ours.shape)}, unit vectors (max |norm - 1| "
               f"{(norms - 1).abs().max().item():.2e})")
    if not shape_ok:
        raise result.stop("parity", "skip", "not run: the structure check failed", "not run: structure failed")
    tolerance = profile.tolerances
    cosines = [torch.nn.functional.cosine_similarity(ours[:, k], theirs[k], dim=1) for k in range(len(stages))]
    result.cosines = [round(float(c), 10) for c in cosines[-1]]
    low = [c.min().item() for c in cosines]
    rule = (chain.metadata.get("early_exit") or {}).get("rule")
    agreement_note, agreement = "no calibrated rule in the artifact (run `hetero calibrate`, then export): the " \
                                "chained run was not checked", None
    if rule is not None:
        device, _, _ = chain.run_chain(floats.numpy(), rule["thresholds"], rule["escalate_above"])
        torch_exit = apply_rule(exit_entropies(model, theirs), rule["thresholds"], rule["escalate_above"])
        agreement = float((torch.from_numpy(device) == torch_exit).float().mean())
        shares = [float((torch.from_numpy(device) == k).float().mean()) for k in range(len(stages) + 1)]
        agreement_note = (f"chained run stage by stage with the calibrated rule: the exit chosen equals torch's for "
                          f"{agreement:.1%} of {len(floats)} queries (needed {EXIT_AGREEMENT:.0%}); shares per exit "
                          f"{' / '.join(f'{x:.2f}' for x in shares[:-1])}, to the cloud {shares[-1]:.2f}")
    passed = min(low) >= tolerance.min_cosine and (agreement is None or agreement >= EXIT_AGREEMENT)
    result.add("parity", "pass" if passed else "fail",
               "cosine to torch per exit, min: " + ", ".join(f"stage {s} {c:.6f}" for s, c in zip(stages, low)) +
               f" (tolerance {tolerance.min_cosine}); {agreement_note}",
               min_cosine=min(low), per_exit_min_cosine=low, exit_agreement=agreement)
    rows, problems = [], []
    for k, stage in enumerate(stages):
        via_runtime = retrieval_metrics(ours[:, k], reference.query_labels, reference.gallery, reference.gallery_labels)
        via_torch = retrieval_metrics(theirs[k], reference.query_labels, reference.gallery, reference.gallery_labels)
        drop = via_torch["top1"] - via_runtime["top1"]
        rows.append({"stage": stage, "runtime": via_runtime, "torch": via_torch, "top1_drop": drop})
        if drop > tolerance.max_top1_drop:
            problems.append(f"exit at stage {stage}: top-1 drop {drop:+.4f} exceeds the allowed {tolerance.max_top1_drop}")
    result.add("retrieval", "fail" if problems else "pass",
               "; ".join(problems) + ("; " if problems else "") + f"M[exit via {target.label}][{reference.cloud}] top-1 "
               "per exit: " + ", ".join(f"stage {r['stage']} {r['runtime']['top1']:.4f} (torch "
                                        f"{r['torch']['top1']:.4f})" for r in rows), exits=rows)
    _latency(result, chain, floats[:1].numpy(), profile.budgets.target_latency_ms, latency_runs)
    _static_budgets(result, reference.members[artifact.member], profile, path_bytes(path))
    result.checks.sort(key=lambda c: CHECKS.index(c.name))


def _file_identity(result: ArtifactResult, reference: Reference, artifact: ArtifactRecord) -> tuple[Path, str]:
    """The file is inside the family (or bundle), present, and the file the manifest recorded."""
    try:
        path = reference.artifact_path(artifact)
    except Exception as err:
        raise result.stop("identity", "fail", str(err), "not run: the artifact's path is refused") from None
    if not path.exists():
        raise result.stop("identity", "fail", f"{artifact.file}: listed in the manifest but missing",
                          "not run: artifact missing")
    actual = sha256_path(path)
    if actual != artifact.sha256:
        raise result.stop("identity", "fail", f"{artifact.file}: sha256 {actual} differs from the manifest's "
                                              f"{artifact.sha256} (file changed after export)",
                          "not run: identity failed", file_sha256=actual, manifest_sha256=artifact.sha256)
    return path, actual


def _open(result: ArtifactResult, reference: Reference, artifact: ArtifactRecord, path: Path,
          target: runtimes.Target) -> _Opened:
    """Open the artifact in its runtime; where it cannot run here, read its structure without running."""
    from hetero.export.common import converter_output

    spec = formats.FORMATS.get(artifact.format)
    runtime, unavailable = None, None
    if spec is None:
        unavailable = f"this install has no {artifact.format!r} format"
    else:
        try:
            with converter_output():  # runtimes announce their delegates on stderr
                runtime = target.open(spec, path)
                _probe(runtime, reference, artifact)
        except RuntimeUnavailable as err:
            runtime, unavailable = None, str(err)
        except ModuleNotFoundError as err:
            runtime, unavailable = None, f"runtime package {err.name!r} is not installed"
        except Exception as err:
            raise result.stop("identity", "fail", f"{artifact.file}: cannot open with {target.label}: "
                                                  f"{type(err).__name__}: {str(err).strip()[:400]}",
                              "not run: artifact cannot be opened") from None
    if runtime is not None:
        return _Opened(runtime, runtime.metadata, None, None)
    try:
        facts = spec.inspect(path) if spec is not None else None
    except Exception as err:
        raise result.stop("identity", "fail", f"{artifact.file}: cannot read the {artifact.format} file: "
                                              f"{type(err).__name__}: {str(err).strip()[:300]}",
                          "not run: artifact cannot be read") from None
    if facts is None:
        raise result.stop("identity", "skip", f"sha256 matches the manifest; space id not checked: {unavailable}",
                          f"skipped: {unavailable}")
    if not isinstance(facts.get("metadata"), dict):
        raise result.stop("identity", "fail", f"{artifact.file}: no 'hetero' metadata in the file",
                          "not run: identity failed")
    return _Opened(None, facts["metadata"], facts, unavailable)


def _probe(runtime, reference: Reference, artifact: ArtifactRecord) -> None:
    """Some adapters only find out on the first run that they cannot execute here (RuntimeUnavailable)."""
    try:
        size = int(runtime.metadata.get("input_size", 0)) or reference.members[artifact.member].input_size
        runtime.embed(resize_to(reference.query_floats()[:1], size).numpy())
    except RuntimeUnavailable:
        raise
    except Exception:
        pass  # a real failure: the structure check reports it with its reason


def _space_identity(result: ArtifactResult, reference: Reference, artifact: ArtifactRecord, metadata: dict,
                    sha: str) -> None:
    """The file's own metadata names the gallery's embedding space and the manifest's member."""
    file_space = metadata.get("space_id")
    if file_space != reference.gallery_space_id:
        raise result.stop("identity", "fail", f"{artifact.file}: space id in the file {file_space!r} differs from "
                                              f"the cloud gallery's {reference.gallery_space_id!r}",
                          "not run: identity failed", file_space_id=file_space,
                          gallery_space_id=reference.gallery_space_id)
    if metadata.get("member") != artifact.member or artifact.member not in reference.torch_queries:
        raise result.stop("identity", "fail", f"{artifact.file}: the file says member {metadata.get('member')!r}, "
                                              f"the manifest says {artifact.member!r}",
                          "not run: identity failed", file_member=metadata.get("member"),
                          manifest_member=artifact.member)
    result.add("identity", "pass", f"sha256 {sha[:12]}… and space id {file_space} match", sha256=sha,
               space_id=file_space)


def _structure(result: ArtifactResult, reference: Reference, opened: _Opened, profile, floats: torch.Tensor,
               runtime_name: str) -> None:
    """The embedding contract: one unit vector of the family dimension per image (or the spec says so)."""
    dim = reference.gallery.shape[1]
    layout = opened.metadata.get("layout", "NCHW")
    if opened.runtime is None:
        problems = structure_problems(opened.facts, opened.metadata, profile.precision, layout)
        result.add("structure", "fail" if problems else "pass",
                   "; ".join(problems) or f"spec: inputs {opened.facts.get('inputs')}, outputs "
                                          f"{opened.facts.get('outputs')}, weights "
                                          f"{opened.facts.get('weight_dtypes') or 'n/a'}",
                   **{k: v for k, v in opened.facts.items() if k != "metadata"})
        return
    try:
        probe = np.asarray(opened.runtime.embed(floats[:2].numpy()))
        norms = np.linalg.norm(probe, axis=1) if probe.ndim == 2 else np.array([])
        problems = []
        if probe.shape != (2, dim):
            problems.append(f"output shape {probe.shape} for 2 images, expected (2, {dim})")
        elif not np.all(np.isfinite(probe)) or np.abs(norms - 1).max() > 1e-2:
            problems.append(f"outputs are not unit vectors (norms {np.round(norms, 4).tolist()})")
        if opened.metadata.get("embedding_dim") not in (None, dim):
            problems.append(f"metadata embedding_dim {opened.metadata.get('embedding_dim')} != gallery dimension {dim}")
    except Exception as err:
        problems = [f"running {runtime_name} failed: {type(err).__name__}: {str(err).strip()[:300]}"]
    result.add("structure", "fail" if problems else "pass",
               "; ".join(problems) or f"{layout} {floats.shape[-1]}px in, unit {dim}-d vector out (batch "
                                      f"{getattr(opened.runtime, 'batch', 0) or 'dynamic'})")


def _numeric(result: ArtifactResult, reference: Reference, artifact: ArtifactRecord, opened: _Opened, profile,
             floats: torch.Tensor, runtime_name: str, latency_runs: int) -> None:
    """Parity, retrieval and latency, where the runtime runs here and the structure holds."""
    if opened.runtime is None:
        for name in NUMERIC:
            result.add(name, "skip", f"skipped: {opened.unavailable}")
        return
    if result.check("structure").status == "fail":
        for name in NUMERIC:
            result.add(name, "skip", "not run: the structure check failed")
        return
    try:
        ours = torch.from_numpy(np.asarray(opened.runtime.embed(floats.numpy()), dtype=np.float32))
    except Exception as err:
        for name in ("parity", "retrieval"):
            result.add(name, "fail", f"embedding {len(floats)} images with {runtime_name} failed: "
                                     f"{type(err).__name__}: {str(err).strip()[:800]}")
    else:
        _parity_and_retrieval(result, reference, artifact.member, ours, profile.tolerances, runtime_name)
    _latency(result, opened.runtime, floats[:1].numpy(), profile.budgets.target_latency_ms, latency_runs)


def _parity_and_retrieval(result: ArtifactResult, reference: Reference, member: str, ours: torch.Tensor,
                          tolerance, runtime_name: str) -> None:
    torch_q = reference.torch_queries[member]
    cosine = torch.nn.functional.cosine_similarity(ours, torch_q, dim=1)
    result.cosines = [round(float(c), 10) for c in cosine]
    low, mean = cosine.min().item(), cosine.mean().item()
    result.add("parity", "pass" if low >= tolerance.min_cosine else "fail",
               f"cosine to the torch member over {len(cosine)} held-out images: min {low:.6f}, mean {mean:.6f} "
               f"(tolerance min >= {tolerance.min_cosine})",
               min_cosine=low, mean_cosine=mean, tolerance=tolerance.min_cosine)

    figures = reference.torch_figures[member]
    via_runtime = retrieval_metrics(ours, reference.query_labels, reference.gallery, reference.gallery_labels)
    via_torch, self_gallery = figures["vs_cloud"], figures["vs_self"]
    drop = via_torch["top1"] - via_runtime["top1"]
    agreement = ((ours @ reference.gallery.T).argmax(1)
                 == (torch_q @ reference.gallery.T).argmax(1)).float().mean().item()
    bct_torch = via_torch["top1"] > self_gallery["top1"]
    bct_runtime = via_runtime["top1"] > self_gallery["top1"]
    problems = []
    if drop > tolerance.max_top1_drop:
        problems.append(f"top-1 drop {drop:+.4f} exceeds the allowed {tolerance.max_top1_drop}")
    if bct_torch and not bct_runtime:
        problems.append(f"BCT criterion broken: M[{member} via {runtime_name}][{reference.cloud}] "
                        f"{via_runtime['top1']:.4f} <= M[{member}][{member}] {self_gallery['top1']:.4f}")
    bct_note = ("BCT holds" if bct_runtime else
                "BCT does not hold for the torch member either (see `hetero eval`)" if not bct_torch else "")
    result.add("retrieval", "fail" if problems else "pass",
               "; ".join(problems) + ("; " if problems else "") +
               f"M[{member} via {runtime_name}][{reference.cloud}] top-1 {via_runtime['top1']:.4f} / mAP@R "
               f"{via_runtime['map_at_r']:.4f} vs torch {via_torch['top1']:.4f} / {via_torch['map_at_r']:.4f} "
               f"(drop {drop:+.4f}, allowed {tolerance.max_top1_drop}); nearest gallery item unchanged for "
               f"{agreement:.1%}; {bct_note}".rstrip("; "),
               runtime=via_runtime, torch=via_torch, torch_self_gallery=self_gallery, top1_drop=drop,
               allowed_drop=tolerance.max_top1_drop,
               top1_agreement=agreement, bct_torch=bct_torch, bct_runtime=bct_runtime)


def _latency(result: ArtifactResult, runtime, one: np.ndarray, target_ms: float | None, runs: int) -> None:
    """Median batch-1 latency; an isolated runtime's worker times the runtime alone (no protocol overhead)."""
    def timed() -> float:
        started = time.perf_counter()
        runtime.embed(one)
        wall = time.perf_counter() - started
        return getattr(runtime, "last_run_seconds", wall) * 1000

    try:
        for _ in range(3):  # warm-up (lazy initialisation, caches)
            runtime.embed(one)
        times = [timed() for _ in range(max(1, runs))]
    except Exception as err:
        result.add("budget_latency", "fail", f"timing batch-1 runs failed: {type(err).__name__}: {err}")
        return
    median = statistics.median(times)
    values = {"median_ms": median, "p90_ms": float(np.percentile(times, 90)), "runs": len(times),
              "target_ms": target_ms}
    if target_ms is None:
        result.add("budget_latency", "skip", f"median {median:.2f} ms over {len(times)} runs; the profile sets no "
                                             f"latency target", **values)
    else:
        result.add("budget_latency", "pass" if median <= target_ms else "fail",
                   f"median {median:.2f} ms (p90 {values['p90_ms']:.2f}) over {len(times)} batch-1 runs on this "
                   f"CPU vs target {target_ms:g} ms", **values)


def _static_budgets(result: ArtifactResult, entry, profile, file_bytes: int) -> None:
    budgets = profile.budgets
    rows = [
        ("budget_size", file_bytes / 2**20, budgets.max_file_mb, "file size", "MB", "{:.3f}"),
        ("budget_params", entry.params, budgets.max_params, "params", "", "{:,}"),
        ("budget_flops", entry.flops / 1e6, budgets.max_mflops, "MFLOPs", "", "{:.1f}"),
    ]
    for name, value, limit, label, unit, fmt in rows:
        shown = (fmt.format(value) + (f" {unit}" if unit else "")) if value is not None else "unknown"
        if value is None:
            result.add(name, "skip", f"{label} unknown (not in the manifest)", value=None, budget=limit)
        elif limit is None:
            result.add(name, "skip", f"{label} {shown}; the profile sets no budget", value=value, budget=None)
        else:
            result.add(name, "pass" if value <= limit else "fail",
                       f"{label} {shown} {'<=' if value <= limit else '>'} budget {fmt.format(limit)}"
                       f"{' ' + unit if unit else ''}", value=value, budget=limit)


# ------------------------------------------------------------------------------------------------ driver


def run_checks(reference: Reference, latency_runs: int = DEFAULT_LATENCY_RUNS, strict: bool = False,
               all_runtimes: bool = False) -> dict:
    """Verify every artifact of `reference` with its profile's runtime into a report.

    With `all_runtimes`, also with every other runtime registered for the format that is installed here
    (older on-device runtimes are a real compatibility risk).
    """
    started = time.perf_counter()
    results = []
    for artifact, profile, target in planned_runs(reference.artifacts, lambda n: resolve_profile(n, reference),
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
    passed = bool(results) and counts["fail"] == 0 and not (strict and counts["skip"])
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
