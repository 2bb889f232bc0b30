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

The rooms, top to bottom: ``bundle`` (self-contained bundles), ``harness`` (the driver and the report) and
``report`` (JUnit, Markdown, HTML), ``chains`` (multi-exit artifacts), ``checks`` (one artifact's checks),
``reference`` (what the checks compare against) and ``results`` (what they record).
"""
from __future__ import annotations

from hetero.export.common import EXIT_AGREEMENT
from hetero.verify.checks import PRECISION_DTYPES, structure_problems
from hetero.verify.harness import (artifact_profile, build_report, host_description, planned_runs, resolve_profile,
                                   run_checks, select_artifacts, verify, verify_artifact)
from hetero.verify.reference import REFERENCES, Reference, ReferenceCache, reference_from_store
from hetero.verify.results import CHECKS, DEFAULT_LATENCY_RUNS, NUMERIC, ArtifactResult, Check

__all__ = [
    "CHECKS", "DEFAULT_LATENCY_RUNS", "EXIT_AGREEMENT", "NUMERIC", "PRECISION_DTYPES", "REFERENCES", "ArtifactResult",
    "Check", "Reference", "ReferenceCache", "artifact_profile", "build_report", "host_description", "planned_runs",
    "reference_from_store", "resolve_profile", "run_checks", "select_artifacts", "structure_problems", "verify",
    "verify_artifact",
]
