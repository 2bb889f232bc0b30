"""The cross-device compatibility suite as a pytest plugin.

Installed with hetero (entry point ``pytest11``), it only adds options; nothing is collected or run unless
one of them names a family or a bundle::

    pytest --hetero-family runs/quickstart                 # every artifact in the manifest
    pytest tests/ --hetero-family runs/qs --hetero-profile android-litert-int8
    pytest --hetero-bundle verify-bundle.zip               # e.g. on a Mac, for CoreML

Each (artifact, runtime, check) becomes one test item (``hetero-verify::edge-m@profile(runtime)::parity``),
so `-k`, `--junitxml` and the usual reporting work.  The verification itself runs once, on the first item,
and its checks are then reported item by item; a skipped check (runtime unavailable here) is a pytest skip.
Without the entry point (e.g. a source checkout), load it with ``-p hetero.pytest_plugin``.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from hetero.latency import LATENCY_RUNS

CHECK_NAMES = ("identity", "structure", "parity", "retrieval",
               "budget_size", "budget_params", "budget_flops", "budget_latency")  # = hetero.verify.CHECKS


def pytest_addoption(parser):
    group = parser.getgroup("hetero", "hetero cross-device compatibility suite")
    group.addoption("--hetero-family", metavar="DIR", help="verify the exported artifacts of this family directory")
    group.addoption("--hetero-bundle", metavar="ZIP", help="verify a bundle written by `hetero verify DIR --bundle`")
    group.addoption("--hetero-profile", metavar="NAME", help="only the artifacts of this profile (name or .yaml)")
    group.addoption("--hetero-images", type=int, metavar="N", help="held-out queries to use")
    group.addoption("--hetero-latency-runs", type=int, default=LATENCY_RUNS, metavar="N",
                    help="batch-1 runs per latency")


class CheckFailed(Exception):
    pass


class CompatSuite(pytest.Collector):
    """All checks of one family or bundle; verification runs lazily, once."""

    def __init__(self, *, source: str, kind: str, **kwargs):
        super().__init__(**kwargs)
        self.source, self.kind = source, kind
        self._report = None

    def _runs(self) -> list[tuple[str, str, str]]:
        """(member, profile, runtime with version) of every verification run, as `hetero verify` plans them."""
        from hetero.profiles import is_profile_path, load_profile
        from hetero.verify import artifact_profile, planned_runs

        wanted = self.config.getoption("hetero_profile")
        profiles = {}
        if self.kind == "bundle":
            from hetero.verify.bundle import open_bundle

            with open_bundle(self.source) as reference:
                artifacts, profiles = reference.artifacts, dict(reference.profiles)
        else:
            from hetero.family import FamilyStore

            artifacts = FamilyStore.open(self.source).artifacts()
        if wanted and is_profile_path(wanted):
            override = load_profile(wanted)
            wanted, profiles[override.name] = override.name, override
        chosen = [a for a in artifacts if wanted in (None, a.profile)]
        plan = planned_runs(chosen, lambda a: artifact_profile(a, Path(self.source), profiles, self.source))
        return [(a.member, a.profile, target.label if target else "?") for a, _, target in plan]

    def report(self) -> dict:
        if self._report is None:
            options = self.config.getoption
            if self.kind == "bundle":
                from hetero.verify.bundle import verify_bundle

                self._report = verify_bundle(self.source, latency_runs=options("hetero_latency_runs"))
            else:
                from hetero.family import FamilyStore
                from hetero.verify import verify

                self._report, _ = verify(FamilyStore.open(self.source), profile=options("hetero_profile"),
                                         max_images=options("hetero_images"),
                                         latency_runs=options("hetero_latency_runs"))
        return self._report

    def collect(self):
        runs = self._runs()
        if not runs:
            yield CheckItem.from_parent(self, name="artifacts_present", key=None, check="artifacts_present")
            return
        for member, profile, runtime in runs:
            for check in CHECK_NAMES:
                yield CheckItem.from_parent(self, name=f"{member}@{profile} on {runtime}::{check}",
                                            key=(member, profile, runtime), check=check)

    def reportinfo(self):
        return self.path, None, f"hetero verify {self.source}"


class CheckItem(pytest.Item):
    def __init__(self, *, key, check: str, **kwargs):
        super().__init__(**kwargs)
        self.key, self.check = key, check

    def runtest(self):
        from hetero.errors import HeteroError

        try:
            report = self.parent.report()
        except HeteroError as err:  # a tampered manifest, a family another stage is writing: said plainly
            raise CheckFailed(str(err)) from None
        if self.key is None:
            raise CheckFailed(f"{self.parent.source}: no exported artifacts to verify (run `hetero export`)")
        from hetero.verify.report import check_headline

        artifact = next((a for a in report["artifacts"] if (a["member"], a["profile"], a["runtime"]) == self.key), None)
        check = next((c for c in artifact["checks"] if c["name"] == self.check), None) if artifact else None
        if check is None:
            raise CheckFailed(f"no verification result for {self.key[0]}@{self.key[1]} on {self.key[2]}")
        if check["status"] == "fail":
            raise CheckFailed(f"{check_headline(artifact, check)}\n{check['detail']}")
        if check["status"] == "skip":
            pytest.skip(check["detail"])

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CheckFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.parent.path, None, f"hetero verify {self.name}"


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselection, so those apply to our items too
def pytest_collection_modifyitems(session, config, items):
    family, bundle = config.getoption("hetero_family"), config.getoption("hetero_bundle")
    for source, kind in ((family, "family"), (bundle, "bundle")):
        if not source:
            continue
        path = Path(source).resolve()
        if not path.exists():
            raise pytest.UsageError(f"--hetero-{kind} {source}: no such {'directory' if kind == 'family' else 'file'}")
        suite = CompatSuite.from_parent(session, name=f"hetero-verify[{path.name}]", nodeid=f"hetero-verify-{kind}",
                                        path=path if path.is_dir() else path.parent, source=str(path), kind=kind)
        from hetero.errors import HeteroError

        try:
            items.extend(suite.collect())
        except HeteroError as err:
            raise pytest.UsageError(f"--hetero-{kind} {source}: {err}") from None
