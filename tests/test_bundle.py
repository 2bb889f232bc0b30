"""Verification bundles: written from a family, verified without it (Linux round trip), bad bundles refused."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from hetero.verify import CHECKS
from tests.test_verify import RUNS, by_member, exported_family  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def bundled(exported_family, tmp_path_factory):  # noqa: F811
    """(report of the family, bundle path) with the family directory deleted afterwards."""
    from hetero.verify.bundle import write_bundle
    from hetero.family import FamilyStore
    from hetero.verify import verify

    work = tmp_path_factory.mktemp("bundle")
    family = work / "family"
    shutil.copytree(exported_family, family)
    report, reference = verify(FamilyStore.open(family), latency_runs=RUNS)
    write_bundle(reference, work / "out.zip", report)
    shutil.rmtree(family)  # the bundle must be self-contained
    return report, work / "out.zip"


def rewrite_bundle(source: Path, target: Path, change) -> Path:
    """Copy a bundle, passing each member's bytes through change(name, data) -> bytes | None (None: drop)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info.filename))
            if data is not None:
                new.writestr(info.filename, data)
    return target


def test_bundle_round_trip_without_the_family(bundled, tmp_path):
    from hetero.verify.bundle import verify_bundle

    report, bundle = bundled
    names = zipfile.ZipFile(bundle).namelist()
    assert {"bundle.json", "arrays.npz", "artifacts/exports/server-onnx-fp32/edge-a.onnx",
            "artifacts/exports/server-onnx-fp32/edge-b.onnx"} <= set(names)
    again = verify_bundle(bundle, latency_runs=RUNS, json_out=tmp_path / "v.json")
    assert again["passed"] and again["counts"] == {"pass": 16, "fail": 0, "skip": 0, "skip_platform": 0}
    assert (again["space_id"], again["queries"], again["gallery"]) == (report["space_id"], report["queries"],
                                                                       report["gallery"])
    for original, replayed in zip(report["artifacts"], again["artifacts"]):
        assert original["member"] == replayed["member"]
        assert replayed["cosines"] == pytest.approx(original["cosines"], abs=1e-6)
        first = {c["name"]: c["values"] for c in original["checks"]}
        second = {c["name"]: c["values"] for c in replayed["checks"]}
        assert second["retrieval"]["runtime"] == pytest.approx(first["retrieval"]["runtime"])
        assert second["retrieval"]["torch"] == pytest.approx(first["retrieval"]["torch"])
    assert json.loads((tmp_path / "v.json").read_text())["passed"]
    expected = again["bundle_expected"]
    assert [row["member"] for row in expected] == ["edge-a", "edge-b"]


def test_bundle_cli_round_trip(bundled, tmp_path, capsys):
    from hetero.cli import main

    _, bundle = bundled
    copy = tmp_path / "ci" / "bundle.zip"
    copy.parent.mkdir()
    shutil.copy(bundle, copy)
    capsys.readouterr()
    assert main(["verify", "--bundle", str(copy), "--latency-runs", "2", "--junit", str(tmp_path / "j.xml")]) == 0
    assert json.loads((copy.parent / "bundle.verify.json").read_text())["passed"]
    printed = capsys.readouterr().out.splitlines()
    assert any("Per artifact" in line for line in printed) and "None" not in printed  # the summary table itself


def test_gallery_from_another_space_fails_identity_for_every_artifact(bundled, tmp_path):
    from hetero.verify.bundle import verify_bundle

    _, bundle = bundled

    def other_gallery(name, data):
        if name != "bundle.json":
            return data
        meta = json.loads(data)
        meta["gallery_space_id"] = "hs-ffffffffffffffff"
        return json.dumps(meta).encode()

    report = verify_bundle(rewrite_bundle(bundle, tmp_path / "b.zip", other_gallery), latency_runs=RUNS)
    assert not report["passed"]
    for checks in by_member(report).values():
        identity = checks["identity"]
        assert identity["status"] == "fail"
        assert "hs-ffffffffffffffff" in identity["detail"] and report["space_id"] in identity["detail"]


def test_tampered_artifact_in_bundle_fails_only_that_artifact(bundled, tmp_path):
    from hetero.verify.bundle import verify_bundle

    _, bundle = bundled
    tampered = rewrite_bundle(bundle, tmp_path / "b.zip",
                              lambda name, data: data + b"!" if name.endswith("edge-b.onnx") else data)
    checks = by_member(verify_bundle(tampered, latency_runs=RUNS))
    assert checks["edge-b"]["identity"]["status"] == "fail" and "sha256" in checks["edge-b"]["identity"]["detail"]
    assert {c["status"] for c in checks["edge-a"].values()} == {"pass"} and len(checks["edge-a"]) == len(CHECKS)


def test_bad_bundles_are_refused_with_a_reason(bundled, tmp_path):
    from hetero.verify.bundle import BundleError, verify_bundle
    from hetero.cli import main

    _, bundle = bundled
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(BundleError, match="junk.zip: not a valid zip file"):
        verify_bundle(junk)
    assert main(["verify", "--bundle", str(junk)]) == 2
    no_arrays = rewrite_bundle(bundle, tmp_path / "partial.zip", lambda n, d: None if n == "arrays.npz" else d)
    with pytest.raises(BundleError, match="arrays.npz is missing"):
        verify_bundle(no_arrays)
    escape = rewrite_bundle(bundle, tmp_path / "escape.zip", lambda n, d: d)
    with zipfile.ZipFile(escape, "a") as archive:
        archive.writestr("../outside.txt", "x")
    with pytest.raises(BundleError, match="outside the bundle"):
        verify_bundle(escape)
    assert not (tmp_path / "outside.txt").exists()
    assert main(["verify"]) == 2  # neither DIR nor --bundle


def test_artifact_path_outside_the_bundle_is_refused_before_it_is_read(bundled, tmp_path):
    """bundle.json may name any file; one outside the extracted bundle is never hashed or loaded."""
    from hetero.verify.bundle import verify_bundle

    _, bundle = bundled
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(next(p for p in [Path(str(bundle))] if p), outside)  # any file with known bytes

    def point_outside(name, data):
        if name != "bundle.json":
            return data
        meta = json.loads(data)
        meta["artifacts"][0]["file"] = str(outside)  # absolute
        meta["artifacts"][1]["file"] = "../../" + outside.name  # climbing out
        return json.dumps(meta).encode()

    report = verify_bundle(rewrite_bundle(bundle, tmp_path / "b.zip", point_outside), latency_runs=RUNS)
    for checks in by_member(report).values():
        assert checks["identity"]["status"] == "fail" and "points outside" in checks["identity"]["detail"]
        assert {c["status"] for name, c in checks.items() if name != "identity"} == {"skip"}
