"""What a verification run records: the fixed list of checks, one check's outcome, one artifact's result.

Every artifact gets the same checks in the same order (CHECKS), so CI systems always see the same test cases;
a check that could not run is recorded as skipped with its reason, never left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hetero.latency import LATENCY_RUNS

CHECKS = ("identity", "structure", "parity", "retrieval",
          "budget_size", "budget_params", "budget_flops", "budget_latency")
NUMERIC = ("parity", "retrieval", "budget_latency")
DEFAULT_LATENCY_RUNS = LATENCY_RUNS  # as many as the search times its candidates with


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

    def stop(self, name: str, status: str, detail: str, reason: str, **values) -> "Stop":
        """Record `name` and skip every check not yet run, for `reason`; raise what this returns."""
        self.add(name, status, detail, **values)
        done = {c.name for c in self.checks}
        for other in CHECKS:
            if other not in done:
                self.add(other, "skip", reason)
        self.checks.sort(key=lambda c: CHECKS.index(c.name))
        return Stop()

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)


class Stop(Exception):
    """Ends an artifact's checks early; its result already says why."""

