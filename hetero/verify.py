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
gallery) comes from a family directory or from a self-contained bundle (:mod:`hetero.bundle`).
"""
from __future__ import annotations

import copy
import importlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hetero.evaluate import embed, retrieval_metrics
from hetero.manifest import ManifestError, atomic_write_json, read_manifest, sha256_file
from hetero.models import resize_to

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
    runtime: str
    file: str
    checks: list[Check] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)  # per query, for the report's histograms

    @property
    def passed(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def add(self, name: str, status: str, detail: str, **values) -> Check:
        check = Check(name, status, detail, values)
        self.checks.append(check)
        return check

    def skip_rest(self, reason: str) -> None:
        done = {c.name for c in self.checks}
        for name in CHECKS:
            if name not in done:
                self.add(name, "skip", reason)
        self.checks.sort(key=lambda c: CHECKS.index(c.name))

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)


@dataclass
class Reference:
    """Everything the checks compare against: held-out images, torch embeddings, the cloud gallery."""

    source: str
    root: Path  # artifact files are found under it (`artifact["file"]` is relative)
    family: str
    space_id: str  # the family's (manifest's)
    gallery_space_id: str  # the space of the gallery embeddings the queries are searched in
    cloud: str
    members: dict[str, dict]  # manifest member entries by name
    artifacts: list[dict]  # manifest artifact entries to verify
    query_images: torch.Tensor  # uint8, N x 3 x S x S (held-out queries at the family's load size)
    query_labels: torch.Tensor
    gallery: torch.Tensor  # cloud-member embeddings of the gallery images
    gallery_labels: torch.Tensor
    torch_queries: dict[str, torch.Tensor]  # torch member -> embeddings of the queries
    torch_figures: dict[str, dict]  # member -> {"vs_cloud": metrics, "vs_self": metrics}
    profiles: dict[str, object] = field(default_factory=dict)  # name -> DeviceProfile (bundle or override)

    def query_floats(self) -> torch.Tensor:
        return self.query_images.float() / 255.0


def _subset(index: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows spread evenly over `index` (queries are grouped by class, so not the first ones)."""
    if count >= len(index):
        return index
    return index[torch.linspace(0, len(index) - 1, count).round().long()]


_CACHE: dict = {}


def reference_from_dir(run_dir: str | Path, profile: str | None = None, max_images: int | None = None,
                       override=None) -> Reference:
    """Load a family directory and embed the held-out images with each needed torch member once."""
    from hetero.config import load_config
    from hetero.data import load_split
    from hetero.manifest import check_file
    from hetero.train import load_member

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    wanted = override.name if override is not None else profile
    artifacts = [a for a in manifest.get("artifacts", []) if wanted in (None, a["profile"])]
    members = {m["name"]: m for m in manifest["members"]}
    cloud = next(m["name"] for m in manifest["members"] if m["role"] == "cloud")
    needed = sorted({a["member"] for a in artifacts if a["member"] in members} | {cloud})
    # Checkpoints are checked against the manifest every time; the embeddings they give are reused within a
    # process for the same checkpoints, data config and query count (repeated verifies, tests, the plugin).
    for name in needed:
        check_file(run_dir, members[name]["checkpoint"])  # raises on a missing or tampered checkpoint
    sums = tuple((name, members[name]["checkpoint"]["sha256"]) for name in needed)
    key = ((run_dir / "config.yaml").read_text(), sums, max_images)
    if key not in _CACHE:
        config = load_config(run_dir / "config.yaml")
        split = load_split(config.data, config.load_size)
        queries = _subset(split.query_index, max_images or config.export.verify_images)
        labels = split.test.labels
        query_images = split.test.images[queries]
        gallery_images = split.test.images[split.gallery_index].float() / 255.0
        torch_queries, torch_gallery = {}, {}
        for name in needed:  # each torch member embeds the queries and the gallery exactly once
            model = load_member(run_dir, manifest, name)
            torch_queries[name] = embed(model, query_images.float() / 255.0)
            torch_gallery[name] = embed(model, gallery_images)
        query_labels, gallery_labels = labels[queries], labels[split.gallery_index]
        figures = {name: {"vs_cloud": retrieval_metrics(torch_queries[name], query_labels, torch_gallery[cloud],
                                                        gallery_labels),
                          "vs_self": retrieval_metrics(torch_queries[name], query_labels, torch_gallery[name],
                                                       gallery_labels)}
                   for name in needed}
        _CACHE.clear()  # one family at a time: bounded memory
        _CACHE[key] = (query_images, query_labels, torch_gallery[cloud], gallery_labels, torch_queries, figures)
    query_images, query_labels, gallery, gallery_labels, torch_queries, figures = _CACHE[key]
    figures = copy.deepcopy(figures)
    return Reference(
        source=str(run_dir), root=run_dir, family=manifest["family"], space_id=manifest["space_id"],
        gallery_space_id=manifest["space_id"], cloud=cloud, members=members, artifacts=artifacts,
        query_images=query_images, query_labels=query_labels, gallery=gallery,
        gallery_labels=gallery_labels, torch_queries=dict(torch_queries), torch_figures=figures,
        profiles={override.name: override} if override is not None else {},
    )


# ------------------------------------------------------------------------------------------ artifact files


def artifact_sha256(path: Path) -> str:
    """sha256 of a file, or of a directory artifact (.mlpackage) the way the manifest records it."""
    if path.is_file():
        return sha256_file(path)
    from hetero.export import common

    if hasattr(common, "sha256_path"):  # the exporters' own directory hash (the manifest records that one)
        return common.sha256_path(path)
    import hashlib

    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(item.relative_to(path).as_posix().encode() + b"\0" + sha256_file(item).encode() + b"\0")
    return digest.hexdigest()


def artifact_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _formats() -> dict:
    from hetero.export import FORMATS

    return FORMATS


def runtimes_for(format: str, preferred: str) -> list[str]:
    """The profile's runtime first, then every other adapter registered for the format (e.g. tflite_runtime)."""
    registered = list(_formats().get(format, (None, None, {}, None))[2])
    return [preferred] + [r for r in registered if r != preferred]


def inspect_without_runtime(path: Path, format: str) -> dict | None:
    """Structural facts of an artifact that cannot execute here: metadata, inputs/outputs, weight precision.

    Uses the format module's own `inspect_artifact(path)` when it provides one; for CoreML falls back to
    reading the spec with coremltools (works on Linux).  None when nothing can be read for this format.
    """
    module_name = _formats().get(format, (None,))[0]
    if module_name:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        for helper in ("inspect_artifact", "inspect_coreml", "inspect_spec"):
            if module is not None and hasattr(module, helper):
                return getattr(module, helper)(path)
    if format == "coreml":
        return inspect_coreml_spec(path)
    return None


def inspect_coreml_spec(path: Path) -> dict:
    """Read a CoreML model's spec without executing it (no macOS needed)."""
    import coremltools as ct

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    description = spec.description
    user = dict(description.metadata.userDefined)
    from hetero.export.common import METADATA_KEY

    metadata = json.loads(user[METADATA_KEY]) if METADATA_KEY in user else None

    def shape(feature):
        kind = feature.type.WhichOneof("Type")
        if kind == "multiArrayType":
            return [int(d) for d in feature.type.multiArrayType.shape]
        if kind == "imageType":
            return [1, 3, int(feature.type.imageType.height), int(feature.type.imageType.width)]
        return []

    weights: dict[str, int] = {}
    if spec.WhichOneof("Type") == "mlProgram":
        from coremltools.proto import MIL_pb2

        for function in spec.mlProgram.functions.values():
            for block in function.block_specializations.values():
                for op in block.operations:
                    if not op.type.startswith(("const", "constexpr")):
                        continue
                    for output in op.outputs:
                        tensor = output.type.tensorType
                        count = int(np.prod([d.constant.size for d in tensor.dimensions] or [1]))
                        if count >= 64:  # weights, not scalars
                            name = MIL_pb2.DataType.Name(tensor.dataType)
                            weights[name] = weights.get(name, 0) + count
    return {
        "metadata": metadata,
        "inputs": {f.name: shape(f) for f in description.input},
        "outputs": {f.name: shape(f) for f in description.output},
        "weight_dtypes": weights,
        "spec_type": spec.WhichOneof("Type"),
    }


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


# ------------------------------------------------------------------------------------------------ checks


def _resolve_profile(name: str, reference: Reference):
    if name in reference.profiles:
        return reference.profiles[name]
    from hetero.profiles import load_profile

    return load_profile(name)


def _open(path: Path, format: str, runtime_name: str):
    """(adapter, None) or (None, why it cannot run here) -- raises for a broken artifact."""
    from hetero.export import open_runtime
    from hetero.export.common import RuntimeUnavailable

    formats = _formats()
    if format not in formats or runtime_name not in formats[format][2]:
        return None, f"this install has no {runtime_name!r} adapter for format {format!r}"
    try:
        return open_runtime(path, format, runtime_name), None
    except RuntimeUnavailable as err:
        return None, str(err)
    except ModuleNotFoundError as err:
        return None, f"runtime package {err.name!r} is not installed"


def verify_artifact(reference: Reference, artifact: dict, runtime_name: str | None = None,
                    latency_runs: int = DEFAULT_LATENCY_RUNS) -> ArtifactResult | None:
    """All checks of one artifact with one runtime (the profile's by default).

    Returns None for an additional runtime (not the profile's) that is not available on this host.
    """
    result = ArtifactResult(artifact.get("member", "?"), artifact.get("profile", "?"), artifact.get("format", "?"),
                            artifact.get("precision", "?"), runtime_name or "?", artifact.get("file", "?"))
    try:
        profile = _resolve_profile(artifact["profile"], reference)
    except Exception as err:
        result.add("identity", "fail", f"manifest artifact {artifact.get('file')!r}: cannot load its profile "
                                       f"{artifact.get('profile')!r}: {err}")
        result.skip_rest("not run: the artifact's profile is unknown")
        return result
    extra_runtime = runtime_name not in (None, profile.verify.runtime)
    runtime_name = runtime_name or profile.verify.runtime
    result.runtime = runtime_name
    path = reference.root / artifact["file"]

    # identity 1: the file is there and is the file the manifest recorded
    if not path.exists():
        result.add("identity", "fail", f"{artifact['file']}: listed in the manifest but missing")
        result.skip_rest("not run: artifact missing")
        return result
    actual = artifact_sha256(path)
    if actual != artifact.get("sha256"):
        result.add("identity", "fail", f"{artifact['file']}: sha256 {actual} differs from the manifest's "
                                       f"{artifact.get('sha256')} (file changed after export)",
                   file_sha256=actual, manifest_sha256=artifact.get("sha256"))
        result.skip_rest("not run: identity failed")
        return result

    # open in the runtime; a corrupt file or missing metadata fails, a runtime missing here skips
    try:
        runtime, unavailable = _open(path, artifact["format"], runtime_name)
    except Exception as err:
        result.add("identity", "fail", f"{artifact['file']}: cannot open with {runtime_name}: "
                                       f"{type(err).__name__}: {str(err).strip()[:300]}")
        result.skip_rest("not run: artifact cannot be opened")
        return result
    if runtime is not None:  # some adapters only find out on the first run that they cannot execute here
        from hetero.export.common import RuntimeUnavailable

        try:
            size = int(runtime.metadata.get("input_size", 0)) or reference.members.get(
                artifact["member"], {}).get("input_size", 32)
            probe = runtime.embed(resize_to(reference.query_floats()[:1], size).numpy())
            del probe
        except RuntimeUnavailable as err:
            runtime, unavailable = None, str(err)
        except Exception:
            pass  # a real failure: the structure check reports it with its reason
    if runtime is None and extra_runtime:
        return None
    facts = None
    if runtime is not None:
        metadata = runtime.metadata
    else:
        try:
            facts = inspect_without_runtime(path, artifact["format"])
        except Exception as err:
            result.add("identity", "fail", f"{artifact['file']}: cannot read the {artifact['format']} file: "
                                           f"{type(err).__name__}: {str(err).strip()[:300]}")
            result.skip_rest("not run: artifact cannot be read")
            return result
        metadata = (facts or {}).get("metadata")
        if facts is None:
            result.add("identity", "skip", f"sha256 matches the manifest; space id not checked: {unavailable}")
            result.skip_rest(f"skipped: {unavailable}")
            return result
        if metadata is None:
            result.add("identity", "fail", f"{artifact['file']}: no 'hetero' metadata in the file")
            result.skip_rest("not run: identity failed")
            return result

    # identity 2: the file's own metadata names our embedding space and member
    file_space = metadata.get("space_id")
    if file_space != reference.gallery_space_id:
        result.add("identity", "fail", f"{artifact['file']}: space id in the file {file_space!r} differs from the "
                                       f"cloud gallery's {reference.gallery_space_id!r}",
                   file_space_id=file_space, gallery_space_id=reference.gallery_space_id)
        result.skip_rest("not run: identity failed")
        return result
    if metadata.get("member") != artifact["member"] or artifact["member"] not in reference.torch_queries:
        result.add("identity", "fail", f"{artifact['file']}: the file says member {metadata.get('member')!r}, the "
                                       f"manifest says {artifact['member']!r}",
                   file_member=metadata.get("member"), manifest_member=artifact["member"])
        result.skip_rest("not run: identity failed")
        return result
    result.add("identity", "pass", f"sha256 {actual[:12]}… and space id {file_space} match",
               sha256=actual, space_id=file_space)

    entry = reference.members[artifact["member"]]
    dim = reference.gallery.shape[1]
    layout = metadata.get("layout", artifact.get("layout", "NCHW"))
    size = int(metadata.get("input_size", entry["input_size"]))
    floats = resize_to(reference.query_floats(), size)
    ours = None

    # structure
    if runtime is not None:
        try:
            probe = np.asarray(runtime.embed(floats[:2].numpy()))
            norms = np.linalg.norm(probe, axis=1) if probe.ndim == 2 else np.array([])
            problems = []
            if probe.shape != (2, dim):
                problems.append(f"output shape {probe.shape} for 2 images, expected (2, {dim})")
            elif not np.all(np.isfinite(probe)) or np.abs(norms - 1).max() > 1e-2:
                problems.append(f"outputs are not unit vectors (norms {np.round(norms, 4).tolist()})")
            if metadata.get("embedding_dim") not in (None, dim):
                problems.append(f"metadata embedding_dim {metadata.get('embedding_dim')} != gallery dimension {dim}")
        except Exception as err:
            problems = [f"running {runtime_name} failed: {type(err).__name__}: {str(err).strip()[:300]}"]
        result.add("structure", "fail" if problems else "pass",
                   "; ".join(problems) or f"{layout} {size}px in, unit {dim}-d vector out (batch "
                                           f"{getattr(runtime, 'batch', 0) or 'dynamic'})")
    else:
        problems = structure_problems(facts, metadata, profile.precision, layout)
        result.add("structure", "fail" if problems else "pass",
                   "; ".join(problems) or f"spec: inputs {facts.get('inputs')}, outputs {facts.get('outputs')}, "
                                          f"weights {facts.get('weight_dtypes') or 'n/a'}",
                   **{k: v for k, v in facts.items() if k != "metadata"})

    tolerance = profile.tolerances
    if runtime is None:
        for name in NUMERIC:
            result.add(name, "skip", f"skipped: {unavailable}")
    elif result.check("structure").status == "fail":
        for name in NUMERIC:
            result.add(name, "skip", "not run: the structure check failed")
    else:
        try:
            ours = torch.from_numpy(np.asarray(runtime.embed(floats.numpy()), dtype=np.float32))
        except Exception as err:
            for name in ("parity", "retrieval"):
                result.add(name, "fail", f"embedding {len(floats)} images with {runtime_name} failed: "
                                         f"{type(err).__name__}: {str(err).strip()[:300]}")
        if ours is not None:
            _parity_and_retrieval(result, reference, artifact["member"], ours, tolerance, runtime_name)
        _latency(result, runtime, floats[:1].numpy(), profile.budgets.target_latency_ms, latency_runs)

    _static_budgets(result, entry, profile, artifact_bytes(path))
    result.checks.sort(key=lambda c: CHECKS.index(c.name))
    return result


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
               top1_agreement=agreement, bct_torch=bct_torch, bct_runtime=bct_runtime)


def _latency(result: ArtifactResult, runtime, one: np.ndarray, target_ms: float | None, runs: int) -> None:
    try:
        for _ in range(3):  # warm-up (lazy initialisation, caches)
            runtime.embed(one)
        times = []
        for _ in range(max(1, runs)):
            started = time.perf_counter()
            runtime.embed(one)
            times.append((time.perf_counter() - started) * 1000)
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


def _static_budgets(result: ArtifactResult, entry: dict, profile, file_bytes: int) -> None:
    budgets = profile.budgets
    rows = [
        ("budget_size", file_bytes / 2**20, budgets.max_file_mb, "file size", "MB", "{:.3f}"),
        ("budget_params", entry.get("params"), budgets.max_params, "params", "", "{:,}"),
        ("budget_flops", (entry.get("flops") or 0) / 1e6 if entry.get("flops") is not None else None,
         budgets.max_mflops, "MFLOPs", "", "{:.1f}"),
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
    (e.g. tflite_runtime beside LiteRT: older on-device runtimes are a real compatibility risk).
    """
    started = time.perf_counter()
    results, notes = [], []
    for artifact in reference.artifacts:
        try:
            preferred = _resolve_profile(artifact["profile"], reference).verify.runtime
        except Exception:
            preferred = None
        names = runtimes_for(artifact.get("format", "?"), preferred) if preferred and all_runtimes else [preferred]
        for name in names:
            try:
                result = verify_artifact(reference, artifact, name, latency_runs)
            except Exception as err:  # a bug or an unforeseen artifact problem: report it, go on with the rest
                result = ArtifactResult(artifact.get("member", "?"), artifact.get("profile", "?"),
                                        artifact.get("format", "?"), artifact.get("precision", "?"),
                                        name or "?", artifact.get("file", "?"))
                result.add("identity", "fail", f"verification crashed: {type(err).__name__}: {err}")
                result.skip_rest("not run: verification crashed")
            if result is None:
                notes.append(f"{artifact['file']}: additional runtime {name!r} is not available here; not run")
                continue
            results.append(result)
    return build_report(reference, results, notes, strict, time.perf_counter() - started)


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


def verify(run_dir: str | Path, profile: str | None = None, max_images: int | None = None,
           latency_runs: int = DEFAULT_LATENCY_RUNS, strict: bool = False, write: bool = True,
           bundle: str | Path | None = None, all_runtimes: bool = False) -> dict:
    """Verify every artifact in the manifest (or those of one profile); write DIR/verify.json.

    With `bundle`, also write a self-contained bundle there (:mod:`hetero.bundle`) to verify elsewhere.

    `profile` is a profile name, or the path of a profile .yaml whose name matches the artifacts' profile:
    then the artifacts are held to that file's budgets and tolerances (e.g. a stricter in-house profile).
    """
    started = time.perf_counter()
    override = None
    if profile is not None and (profile.endswith((".yaml", ".yml")) or Path(profile).is_file()):
        from hetero.profiles import load_profile

        override = load_profile(profile)
    reference = reference_from_dir(run_dir, profile, max_images, override)
    report = run_checks(reference, latency_runs, strict, all_runtimes)
    report["seconds"] = round(time.perf_counter() - started, 2)
    if write:
        atomic_write_json(Path(run_dir) / "verify.json", report)
    if bundle is not None:
        from hetero.bundle import write_bundle

        write_bundle(reference, bundle, report)
        report["bundle"] = str(bundle)
    return report


# ------------------------------------------------------------------------------------------------ output


def artifact_label(artifact: dict) -> str:
    return f"{artifact['member']}@{artifact['profile']}" + (
        "" if artifact.get("runtime") in (None, "?") else f" ({artifact['runtime']})")


def summary_rows(report: dict) -> list[dict]:
    """One row per artifact: the figures people compare across profiles."""
    rows = []
    for a in report["artifacts"]:
        checks = {c["name"]: c for c in a["checks"]}
        v = {name: checks.get(name, {}).get("values", {}) for name in CHECKS}
        rows.append({
            "profile": a["profile"], "member": a["member"], "runtime": a["runtime"], "format": a["format"],
            "precision": a["precision"],
            "min_cosine": v["parity"].get("min_cosine"), "mean_cosine": v["parity"].get("mean_cosine"),
            "top1": v["retrieval"].get("runtime", {}).get("top1"),
            "torch_top1": v["retrieval"].get("torch", {}).get("top1"),
            "map_at_r": v["retrieval"].get("runtime", {}).get("map_at_r"),
            "agreement": v["retrieval"].get("top1_agreement"),
            "latency_ms": v["budget_latency"].get("median_ms"),
            "size_mb": v["budget_size"].get("value"),
            "status": "pass" if a["passed"] else "FAIL",
            "skipped": [c["name"] for c in a["checks"] if c["status"] == "skip"],
        })
    return rows


def format_verify(report: dict):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Verification of {len(report['artifacts'])} artifact(s) on {report['queries']} held-out "
                        f"queries vs {report['gallery']} cloud-gallery images ({report['source']})")
    for column in ("artifact", "check", "status", "detail"):
        table.add_column(column)
    for artifact in report["artifacts"]:
        for check in artifact["checks"]:
            style = {"pass": "green", "fail": "bold red", "skip": "yellow"}[check["status"]]
            table.add_row(escape(artifact_label(artifact)), check["name"], f"[{style}]{check['status']}[/]",
                          escape(check["detail"]))
    return table


def format_summary(report: dict):
    from rich.markup import escape
    from rich.table import Table

    def num(value, fmt):
        return "-" if value is None else fmt.format(value)

    table = Table(title="Per artifact: cosine to torch, top-1 against the cloud gallery, latency, size")
    for column in ("profile", "member", "runtime", "min cos", "mean cos", "top-1", "torch top-1", "agree",
                   "latency ms", "MB", "status"):
        table.add_column(column, justify="right" if column not in ("profile", "member", "runtime") else "left")
    for row in summary_rows(report):
        status = "[green]pass[/]" if row["status"] == "pass" else "[bold red]FAIL[/]"
        if row["skipped"] and row["status"] == "pass":
            status += f" [yellow]({len(row['skipped'])} skipped)[/]"
        table.add_row(escape(row["profile"]), escape(row["member"]), escape(row["runtime"]),
                      num(row["min_cosine"], "{:.6f}"), num(row["mean_cosine"], "{:.6f}"), num(row["top1"], "{:.3f}"),
                      num(row["torch_top1"], "{:.3f}"), num(row["agreement"], "{:.1%}"),
                      num(row["latency_ms"], "{:.2f}"), num(row["size_mb"], "{:.2f}"), status)
    return table


def write_junit(report: dict, path: str | Path) -> None:
    """JUnit XML: one testsuite per artifact, one testcase per check (failure / skipped marked)."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites", name="hetero verify", tests=str(sum(report["counts"].values())),
                      failures=str(report["counts"]["fail"]), skipped=str(report["counts"]["skip"]),
                      errors="0", time=str(report.get("seconds", 0)))
    if not report["artifacts"]:
        suite = ET.SubElement(root, "testsuite", name="hetero.verify", tests="1", failures="1", skipped="0",
                              errors="0")
        case = ET.SubElement(suite, "testcase", classname="hetero.verify", name="artifacts_present")
        ET.SubElement(case, "failure", message="no exported artifacts to verify").text = \
            f"{report['source']}: the manifest lists no artifacts (run `hetero export` first)"
        root.set("tests", "1")
        root.set("failures", "1")
    for artifact in report["artifacts"]:
        checks = artifact["checks"]
        classname = f"hetero.verify.{artifact['profile']}.{artifact['member']}.{artifact['runtime']}"
        suite = ET.SubElement(root, "testsuite", name=artifact_label(artifact), tests=str(len(checks)),
                              failures=str(sum(c["status"] == "fail" for c in checks)),
                              skipped=str(sum(c["status"] == "skip" for c in checks)), errors="0")
        ET.SubElement(ET.SubElement(suite, "properties"), "property", name="file", value=artifact["file"])
        for check in checks:
            case = ET.SubElement(suite, "testcase", classname=classname, name=check["name"], time="0")
            if check["status"] == "fail":
                ET.SubElement(case, "failure", message=check["detail"][:500]).text = check["detail"]
            elif check["status"] == "skip":
                ET.SubElement(case, "skipped", message=check["detail"][:500])
            else:
                ET.SubElement(case, "system-out").text = check["detail"]
    tree = ET.ElementTree(root)
    ET.indent(tree)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tree.write(path, encoding="utf-8", xml_declaration=True)


def load_report(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no verification report here; run `hetero verify` first")
    return json.loads(path.read_text())
