"""The checks of one artifact on one runtime: identity, structure, parity, retrieval, latency and budgets.

Each check records its outcome on the artifact's :class:`~hetero.verify.results.ArtifactResult`; one that
makes the rest pointless (a missing or tampered file, a file that cannot be opened) raises the result's
`stop`, which marks every check not yet run as skipped with the reason.  A runtime that cannot execute here
leaves the structure to be read from the file and the numeric checks skipped, never passed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hetero import formats, runtimes
from hetero.errors import RuntimeUnavailable
from hetero.family import ArtifactRecord
from hetero.latency import time_batch1
from hetero.files import sha256_path
from hetero.maths import retrieval_metrics
from hetero.models import resize_to
from hetero.verify.reference import Reference
from hetero.verify.results import NUMERIC, ArtifactResult

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
    problem = weights_problem(facts, precision)
    return problems + ([problem] if problem else [])


def weights_problem(facts: dict, precision: str) -> str | None:
    """Why a graph's stored weight dtypes (elements per dtype) are not the profile's precision, or None."""
    weights = facts.get("weight_dtypes") or {}
    if not weights or precision not in PRECISION_DTYPES:
        return None
    dominant = max(weights, key=weights.get)
    if not any(dtype in weights for dtype in PRECISION_DTYPES[precision]) or (
            precision in ("fp32", "fp16") and dominant not in PRECISION_DTYPES[precision]):
        return (f"weights are stored as {weights} (elements per dtype) but the profile's precision {precision!r} "
                f"expects {'/'.join(PRECISION_DTYPES[precision])}")
    return None


@dataclass
class Opened:
    runtime: object | None  # the adapter, or None when the runtime cannot execute here
    metadata: dict
    facts: dict | None  # structure read without running (when the runtime cannot run)
    unavailable: str | None  # why it cannot run here
    platform: str | None = None  # the only platform it runs on, when no install here could run it


def check_file_identity(result: ArtifactResult, reference: Reference,
                        artifact: ArtifactRecord) -> tuple[Path, str]:
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


def open_artifact(result: ArtifactResult, reference: Reference, artifact: ArtifactRecord, path: Path,
                  target: runtimes.Target) -> Opened:
    """Open the artifact in its runtime; where it cannot run here, read its structure without running."""
    from hetero.export.common import converter_output

    spec = formats.FORMATS.get(artifact.format)
    runtime, unavailable, platform = None, None, None
    if spec is None:
        unavailable = f"this install has no {artifact.format!r} format"
    else:
        try:
            with converter_output():  # runtimes announce their delegates on stderr
                runtime = target.open(spec, path)
                _probe(runtime, reference, artifact)
        except RuntimeUnavailable as err:
            runtime, unavailable, platform = None, str(err), getattr(err, "platform", None)
        except ModuleNotFoundError as err:
            runtime, unavailable = None, f"runtime package {err.name!r} is not installed"
        except Exception as err:
            raise result.stop("identity", "fail", f"{artifact.file}: cannot open with {target.label}: "
                                                  f"{type(err).__name__}: {str(err).strip()[:400]}",
                              "not run: artifact cannot be opened") from None
    if runtime is not None:
        return Opened(runtime, runtime.metadata, None, None)
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
    return Opened(None, facts["metadata"], facts, unavailable, platform)


def _probe(runtime, reference: Reference, artifact: ArtifactRecord) -> None:
    """Some adapters only find out on the first run that they cannot execute here (RuntimeUnavailable)."""
    try:
        size = int(runtime.metadata.get("input_size", 0)) or reference.members[artifact.member].input_size
        runtime.embed(resize_to(reference.query_floats()[:1], size).numpy())
    except RuntimeUnavailable:
        raise
    except Exception:
        pass  # a real failure: the structure check reports it with its reason


def check_space_identity(result: ArtifactResult, reference: Reference, artifact: ArtifactRecord, metadata: dict,
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


def check_structure(result: ArtifactResult, reference: Reference, opened: Opened, profile, floats: torch.Tensor,
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


def check_numeric(result: ArtifactResult, reference: Reference, artifact: ArtifactRecord, opened: Opened,
                  profile, floats: torch.Tensor, runtime_name: str, latency_runs: int) -> None:
    """Parity, retrieval and latency, where the runtime runs here and the structure holds."""
    if opened.runtime is None:
        elsewhere = {"needs_platform": opened.platform} if opened.platform else {}
        for name in NUMERIC:
            result.add(name, "skip", f"skipped: {opened.unavailable}", **elsewhere)
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
    check_latency(result, opened.runtime, floats[:1].numpy(), profile.budgets.target_latency_ms, latency_runs)


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


def check_latency(result: ArtifactResult, runtime, one: np.ndarray, target_ms: float | None,
                  runs: int) -> None:
    """Median batch-1 latency, measured as the search measures its candidates (runtimes.time_batch1)."""
    try:
        timed = time_batch1(runtime, one, runs)
    except Exception as err:
        result.add("budget_latency", "fail", f"timing batch-1 runs failed: {type(err).__name__}: {err}")
        return
    median, count = timed["median_ms"], timed["runs"]
    values = {**timed, "target_ms": target_ms}
    if target_ms is None:
        result.add("budget_latency", "skip", f"median {median:.2f} ms over {count} runs; the profile sets no "
                                             f"latency target", **values)
    else:
        result.add("budget_latency", "pass" if median <= target_ms else "fail",
                   f"median {median:.2f} ms (p90 {values['p90_ms']:.2f}) over {count} batch-1 runs on this "
                   f"CPU vs target {target_ms:g} ms", **values)


def check_static_budgets(result: ArtifactResult, entry, profile, file_bytes: int) -> None:
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
