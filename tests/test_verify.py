"""The compatibility harness: every check passing, and failing on purpose, on a tiny trained family."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml

from hetero.family import ArtifactRecord, FamilyStore
from hetero.files import path_bytes, sha256_file, sha256_path
from hetero.verify import CHECKS, verify

RUNS = 3  # latency runs: enough to exercise the check, fast on 2 shared cores


@pytest.fixture(scope="session")
def exported_family(tiny_family_dir, tmp_path_factory) -> Path:
    """The tiny family with edge-a and edge-b exported for server-onnx-fp32 (copy before changing)."""
    from hetero.profiles import load_profile

    target = tmp_path_factory.mktemp("exported") / "family"
    shutil.copytree(tiny_family_dir, target)
    profile = load_profile("server-onnx-fp32")
    for member in ("edge-a", "edge-b"):
        export(target, member, profile)
    return target


def export(family: Path, member: str, profile):
    from hetero.exporter import export_member

    store = FamilyStore.open(family)
    with store.lock("export"):
        return export_member(store, member, profile)


def run_verify(family: Path, **options) -> dict:
    return verify(FamilyStore.open(family), **options)[0]


@pytest.fixture
def family(exported_family, tmp_path) -> Path:
    target = tmp_path / "family"
    shutil.copytree(exported_family, target)
    return target


def artifact_entry(family: Path, member: str) -> ArtifactRecord:
    return next(a for a in FamilyStore.open(family).artifacts() if a.member == member)


def rewrite_onnx(family: Path, member: str, change) -> None:
    """Change an exported ONNX file and re-register its sha256, so only the changed content is wrong."""
    import onnx

    store = FamilyStore.open(family)
    entry = next(a for a in store.artifacts() if a.member == member)
    path = family / entry.file
    proto = onnx.load(str(path))
    change(proto)
    onnx.save(proto, str(path))
    entry.sha256 = sha256_file(path)
    store.save()


def by_member(report: dict) -> dict[str, dict[str, dict]]:
    return {a["member"]: {c["name"]: c for c in a["checks"]} for a in report["artifacts"]}


def assert_all_pass(checks: dict[str, dict]) -> None:
    assert {name: c["status"] for name, c in checks.items()} == {name: "pass" for name in CHECKS}


def test_clean_family_passes_every_check(family):
    report = run_verify(family, latency_runs=RUNS)
    assert report["passed"] and report["counts"] == {"pass": 16, "fail": 0, "skip": 0, "skip_platform": 0}
    checks = by_member(report)
    for member in ("edge-a", "edge-b"):
        assert_all_pass(checks[member])
        assert [c["name"] for c in next(a for a in report["artifacts"] if a["member"] == member)["checks"]] \
            == list(CHECKS)
        parity = checks[member]["parity"]["values"]
        assert parity["min_cosine"] >= 0.9999
        retrieval = checks[member]["retrieval"]["values"]
        assert retrieval["top1_agreement"] == 1.0
        assert abs(retrieval["runtime"]["top1"] - retrieval["torch"]["top1"]) < 1e-9
        assert checks[member]["budget_latency"]["values"]["runs"] == RUNS
    on_disk = json.loads((family / "verify.json").read_text())
    assert on_disk["passed"] and len(on_disk["artifacts"]) == 2
    assert len(on_disk["artifacts"][0]["cosines"]) == report["queries"]


def test_tampered_file_fails_identity_and_the_other_artifact_still_passes(family):
    from hetero.cli import main
    entry = artifact_entry(family, "edge-a")
    with open(family / entry.file, "ab") as handle:
        handle.write(b"tampered")
    report = run_verify(family, latency_runs=RUNS)
    assert not report["passed"]
    checks = by_member(report)
    identity = checks["edge-a"]["identity"]
    assert identity["status"] == "fail"
    assert entry.sha256 in identity["detail"] and sha256_file(family / entry.file) in identity["detail"]
    assert {c["status"] for name, c in checks["edge-a"].items() if name != "identity"} == {"skip"}
    assert_all_pass(checks["edge-b"])
    assert main(["verify", str(family), "--latency-runs", "2"]) == 1


def test_wrong_space_id_fails_identity_with_both_values(family):
    def other_space(proto):
        prop = next(p for p in proto.metadata_props if p.key == "hetero")
        prop.value = json.dumps({**json.loads(prop.value), "space_id": "hs-0000000000000000"})

    rewrite_onnx(family, "edge-b", other_space)
    report = run_verify(family, latency_runs=RUNS)
    identity = by_member(report)["edge-b"]["identity"]
    assert identity["status"] == "fail"
    assert "hs-0000000000000000" in identity["detail"] and report["space_id"] in identity["detail"]
    assert identity["values"] == {"file_space_id": "hs-0000000000000000", "gallery_space_id": report["space_id"]}
    assert_all_pass(by_member(report)["edge-a"])


def _no_metadata(family):
    rewrite_onnx(family, "edge-a", lambda proto: proto.ClearField("metadata_props"))


def _corrupt(family):
    store = FamilyStore.open(family)
    entry = next(a for a in store.artifacts() if a.member == "edge-a")
    (family / entry.file).write_bytes(b"\x08\x07 this is not an onnx model" * 10)
    entry.sha256 = sha256_file(family / entry.file)
    store.save()


def _missing(family):
    (family / artifact_entry(family, "edge-a").file).unlink()


@pytest.mark.parametrize("breakage, reason", [
    (_no_metadata, "no 'hetero' entry in the ONNX metadata_props"),
    (_corrupt, "cannot open with onnxruntime"),
    (_missing, "listed in the manifest but missing"),
])
def test_broken_artifact_is_a_failed_check_not_a_crash(family, breakage, reason):
    breakage(family)
    report = run_verify(family, latency_runs=RUNS)
    checks = by_member(report)
    assert checks["edge-a"]["identity"]["status"] == "fail"
    assert reason in checks["edge-a"]["identity"]["detail"]
    assert "edge-a.onnx" in checks["edge-a"]["identity"]["detail"]  # names the file
    assert_all_pass(checks["edge-b"])
    assert not report["passed"]


def test_perturbed_weight_breaks_parity_below_tolerance(family):
    from onnx import numpy_helper

    def perturb(proto):
        weights = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest weight tensor
        values = numpy_helper.to_array(weights).copy()
        values += np.random.default_rng(0).normal(0, values.std() * 0.5, values.shape).astype(values.dtype)
        weights.CopyFrom(numpy_helper.from_array(values, weights.name))

    rewrite_onnx(family, "edge-a", perturb)
    report = run_verify(family, latency_runs=RUNS)
    checks = by_member(report)
    assert checks["edge-a"]["identity"]["status"] == "pass"  # the file is the registered one...
    parity = checks["edge-a"]["parity"]
    assert parity["status"] == "fail"  # ...but it no longer computes the torch member's embedding
    assert parity["values"]["min_cosine"] < parity["values"]["tolerance"] == 0.9999
    assert f"{parity['values']['min_cosine']:.6f}" in parity["detail"]
    assert checks["edge-a"]["retrieval"]["values"]["top1_agreement"] < 1.0
    assert_all_pass(checks["edge-b"])


def test_budgets_fail_against_a_stricter_profile_file(family, tmp_path):
    from hetero.profiles import load_profile
    strict = yaml.safe_load(_builtin("server-onnx-fp32").read_text())
    assert load_profile("server-onnx-fp32").budgets.max_params > 1000
    strict["budgets"] = {"max_file_mb": 0.01, "max_params": 1000, "max_mflops": 0.1, "target_latency_ms": 1e-6}
    path = tmp_path / "in-house.yaml"
    path.write_text(yaml.safe_dump(strict))
    report = run_verify(family, profile=str(path), latency_runs=RUNS)
    for member, checks in by_member(report).items():
        for name in ("budget_size", "budget_params", "budget_flops", "budget_latency"):
            assert checks[name]["status"] == "fail", (member, name, checks[name])
        assert "> budget 1,000" in checks["budget_params"]["detail"]
        assert checks["budget_size"]["values"]["budget"] == 0.01
        for name in ("identity", "structure", "parity", "retrieval"):
            assert checks[name]["status"] == "pass"


def _builtin(name: str) -> Path:
    from hetero.profiles import builtin_profile_files

    return builtin_profile_files()[name]


def test_unavailable_runtime_is_skipped_never_passed(family, monkeypatch):
    from hetero import formats
    from hetero.cli import main
    from hetero.errors import RuntimeUnavailable
    from hetero.verify import NUMERIC

    def unavailable(self, path, runtime=None):
        raise RuntimeUnavailable(f"{runtime} cannot run {Path(path).name} here: requires macOS")

    monkeypatch.setattr(formats.Format, "open", unavailable)
    report = run_verify(family, latency_runs=RUNS)
    for checks in by_member(report).values():
        for name in NUMERIC:
            assert checks[name]["status"] == "skip"
            assert "requires macOS" in checks[name]["detail"]
        assert checks["identity"]["status"] == "skip"  # sha matched, but the space id could not be read
    assert report["counts"]["fail"] == 0 and report["passed"]
    assert run_verify(family, latency_runs=RUNS, strict=True)["passed"] is False
    assert main(["verify", str(family), "--latency-runs", "2"]) == 0
    assert main(["verify", str(family), "--latency-runs", "2", "--strict"]) == 1


def test_junit_has_one_testcase_per_check_with_failures_marked(family, tmp_path):
    from hetero.cli import main

    entry = artifact_entry(family, "edge-a")
    with open(family / entry.file, "ab") as handle:
        handle.write(b"x")
    junit = tmp_path / "verify.xml"
    assert main(["verify", str(family), "--junit", str(junit), "--latency-runs", "2"]) == 1
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    cases = root.findall(".//testcase")
    assert len(cases) == 2 * len(CHECKS)
    assert int(root.get("tests")) == len(cases) and int(root.get("failures")) == 1
    status = {(case.get("classname").split(".")[3], case.get("name").split(" on ")[0]):
              "fail" if case.find("failure") is not None else "skip" if case.find("skipped") is not None else "pass"
              for case in cases}
    assert status[("edge-a", "identity")] == "fail"
    failure = root.find(".//testcase/failure").get("message")
    assert failure.startswith("edge-a@server-onnx-fp32 on onnxruntime ") and ": identity FAILED (" in failure
    assert all(" on onnxruntime " in case.get("name") for case in cases)  # the runtime and its version
    assert {status[("edge-a", c)] for c in CHECKS if c != "identity"} == {"skip"}
    assert {status[("edge-b", c)] for c in CHECKS} == {"pass"}


def test_reports_with_plots(family, tmp_path):
    from hetero.cli import main

    html = tmp_path / "out" / "verify.html"
    markdown = tmp_path / "verify.md"
    assert main(["verify", str(family), "--report", str(html), "--latency-runs", "2"]) == 0
    text = html.read_text()
    assert text.count("<img") == 2 and "data:image/png;base64," in text and "edge-b@server-onnx-fp32" in text
    assert main(["verify", str(family), "--report", str(markdown), "--latency-runs", "2"]) == 0
    plots = sorted(p.name for p in (tmp_path / "verify_plots").iterdir())
    assert plots == ["drop.png", "latency.png"]
    assert all((tmp_path / "verify_plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert "| server-onnx-fp32 | edge-a | onnxruntime 1." in markdown.read_text()


def test_no_artifacts_fails_and_writes_nothing(tiny_family_dir, tmp_path, capsys):
    from hetero.cli import main

    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    junit = tmp_path / "j.xml"
    assert main(["verify", str(family), "--junit", str(junit)]) == 2  # a stage run before the one it needs
    assert "no exported artifacts to verify" in capsys.readouterr().out
    assert not junit.exists() and not (family / "verify.json").exists()


@pytest.mark.slow
def test_pytest_plugin_runs_the_suite_only_when_asked(family, tmp_path):
    entry = artifact_entry(family, "edge-a")
    with open(family / entry.file, "ab") as handle:
        handle.write(b"x")
    work = tmp_path / "user-project"
    work.mkdir()
    (work / "pytest.ini").write_text("[pytest]\n")
    junit = work / "suite.xml"
    base = [sys.executable, "-m", "pytest", "-p", "hetero.pytest_plugin", "-p", "no:cacheprovider", "-q"]
    idle = subprocess.run(base, cwd=work, capture_output=True, text=True, timeout=120)
    assert idle.returncode == 5, idle.stdout + idle.stderr  # no option: nothing collected, nothing run
    done = subprocess.run(base + ["--hetero-family", str(family), "--hetero-latency-runs", "2",
                                  f"--junitxml={junit}"], cwd=work, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 8 passed, 7 skipped" in done.stdout, done.stdout
    assert "edge-a@server-onnx-fp32 on onnxruntime " in done.stdout and "::identity" in done.stdout
    assert "identity FAILED (" in done.stdout
    cases = ET.parse(junit).getroot().findall(".//testcase")
    assert len(cases) == 16


def _coreml_mlpackage(family: Path) -> Path:
    """A CoreML fp16 mlprogram of edge-a, registered in the manifest (as the exporter will)."""
    ct = pytest.importorskip("coremltools")
    import torch

    from hetero.export.common import METADATA_KEY
    from hetero.exporter import artifact_metadata

    store = FamilyStore.open(family)
    entry = store.member("edge-a")
    profile = _coreml_profile()
    model = store.load_member("edge-a")
    traced = torch.jit.trace(model, torch.rand(1, 3, 32, 32))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="images", shape=(1, 3, 32, 32), dtype=np.float32)],
                         outputs=[ct.TensorType(name="embedding", dtype=np.float32)], convert_to="mlprogram",
                         compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS16)
    mlmodel.user_defined_metadata[METADATA_KEY] = json.dumps(artifact_metadata(store, entry, profile))
    path = family / "exports" / profile.name / "edge-a.mlpackage"
    mlmodel.save(str(path))
    store.register_artifact(ArtifactRecord(
        member="edge-a", profile=profile.name, format="coreml", precision="fp16", layout="NCHW",
        file=f"exports/{profile.name}/edge-a.mlpackage", sha256=sha256_path(path), bytes=path_bytes(path),
        export_seconds=0))
    return path


def _coreml_profile():
    from hetero.profiles import DeviceProfile, Verification

    return DeviceProfile(name="test-coreml-fp16", description="test", format="coreml", precision="fp16",
                         verify=Verification(runtime="coreml", host="macos"))


@pytest.mark.slow
def test_coreml_on_linux_checks_structure_and_skips_numerics(family, tmp_path, capsys):
    import platform

    if platform.system() == "Darwin":
        pytest.skip("on macOS the CoreML runtime runs the numeric checks")
    from dataclasses import asdict

    from hetero.verify import NUMERIC

    _coreml_mlpackage(family)
    profile_file = tmp_path / "test-coreml-fp16.yaml"
    profile_file.write_text(yaml.safe_dump(asdict(_coreml_profile())))
    report = run_verify(family, profile=str(profile_file), latency_runs=RUNS)
    (artifact,) = report["artifacts"]
    checks = {c["name"]: c for c in artifact["checks"]}
    assert checks["identity"]["status"] == "pass"  # metadata read from the spec, space id matches
    assert checks["structure"]["status"] == "pass", checks["structure"]["detail"]
    assert checks["structure"]["values"]["weight_dtypes"].get("FLOAT16", 0) > 0
    for name in NUMERIC:
        assert checks[name]["status"] == "skip" and "skipped" in checks[name]["detail"]
    assert checks["budget_params"]["status"] == "skip"  # the test profile sets no budgets: not a pass either
    assert run_verify(family, profile=str(profile_file), latency_runs=RUNS, strict=True)["passed"] is False

    # --strict cannot demand on Linux what only macOS runs: with budgets set, only the numerics are skipped
    from hetero.cli import main

    budgeted = {**asdict(_coreml_profile()), "budgets": {"max_file_mb": 100, "max_params": 10**8, "max_mflops": 10**6}}
    profile_file.write_text(yaml.safe_dump(budgeted))
    report = run_verify(family, profile=str(profile_file), latency_runs=RUNS, strict=True)
    assert report["passed"] and report["counts"]["skip"] == report["counts"]["skip_platform"] == len(NUMERIC)
    capsys.readouterr()
    assert main(["verify", str(family), "--profile", str(profile_file), "--latency-runs", "2", "--strict"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "3 of them run only on macOS" in said and "--bundle FILE --strict" in said

    # a profile that expects fp32 weights fails the structure check on the fp16 file, naming both
    from hetero.verify import structure_problems

    facts = {"inputs": checks["structure"]["values"]["inputs"], "outputs": checks["structure"]["values"]["outputs"],
             "weight_dtypes": checks["structure"]["values"]["weight_dtypes"]}
    problems = structure_problems(facts, {"input_size": 32, "embedding_dim": 32}, "fp32", "NCHW")
    assert problems and "FLOAT16" in problems[0] and "'fp32'" in problems[0]
    assert structure_problems(facts, {"input_size": 24, "embedding_dim": 32}, "fp16", "NCHW")


def test_structure_fails_when_the_file_disagrees_with_the_contract(family):
    def wrong_dim(proto):
        prop = next(p for p in proto.metadata_props if p.key == "hetero")
        prop.value = json.dumps({**json.loads(prop.value), "embedding_dim": 99})

    rewrite_onnx(family, "edge-a", wrong_dim)
    checks = by_member(run_verify(family, latency_runs=RUNS))
    assert checks["edge-a"]["identity"]["status"] == "pass"
    assert checks["edge-a"]["structure"]["status"] == "fail"
    assert "embedding_dim 99 != gallery dimension 32" in checks["edge-a"]["structure"]["detail"]
    assert {checks["edge-a"][n]["status"] for n in ("parity", "retrieval", "budget_latency")} == {"skip"}
    assert_all_pass(checks["edge-b"])


def test_retrieval_fails_on_a_top1_drop_and_a_broken_bct_criterion(family):
    """The runtime's top-1 is held to the torch member's figure (here raised as if torch were much better)."""
    from hetero.verify.reference import ReferenceCache, reference_from_store
    from hetero.verify import run_checks

    store = FamilyStore.open(family)
    reference = reference_from_store(store, store.artifacts(), cache=ReferenceCache())
    runtime_top1 = reference.torch_figures["edge-a"]["vs_cloud"]["top1"]  # fp32 ONNX reproduces torch exactly
    reference.torch_figures["edge-a"]["vs_cloud"]["top1"] = runtime_top1 + 0.3
    reference.torch_figures["edge-a"]["vs_self"]["top1"] = runtime_top1 + 0.1
    checks = by_member(run_checks(reference, latency_runs=RUNS))
    retrieval = checks["edge-a"]["retrieval"]
    assert retrieval["status"] == "fail"
    assert retrieval["values"]["top1_drop"] == pytest.approx(0.3)
    assert "top-1 drop +0.3000 exceeds the allowed 0.005" in retrieval["detail"]
    assert "BCT criterion broken" in retrieval["detail"]
    assert checks["edge-a"]["parity"]["status"] == "pass"
    assert_all_pass(checks["edge-b"])


@pytest.mark.slow
def test_all_runtimes_adds_every_environment_that_can_open_the_format(family, runtime_environments):
    assert len(run_verify(family, latency_runs=RUNS)["artifacts"]) == 2  # default: the profile's runtime only
    report = run_verify(family, latency_runs=RUNS, all_runtimes=True)
    runs = sorted((a["member"], a["runtime"]) for a in report["artifacts"])
    assert ("edge-a", "onnxruntime 1.17.3") in runs and ("edge-b", "onnxruntime 1.17.3") in runs
    assert report["passed"], [c["detail"] for a in report["artifacts"] for c in a["checks"] if c["status"] == "fail"]


@pytest.mark.slow
@pytest.mark.parametrize("profile_name", ["android-litert-fp16", "android-executorch-fp32", "iphone-coreml-fp16"])
def test_other_formats_verify_through_their_adapters(family, profile_name, runtime_environments):
    """Each registered format: numeric checks pass where its runtime runs; CoreML on Linux skips them."""
    import platform

    from hetero import formats
    from hetero.verify.bundle import write_bundle
    from hetero.profiles import load_profile
    from hetero.verify import NUMERIC, verify

    profile = load_profile(profile_name)
    missing = formats.get(profile.format).missing_packages()
    if missing:
        pytest.skip(f"{missing[0]} is not installed")
    export(family, "edge-b", profile)
    report = run_verify(family, profile=profile_name, latency_runs=RUNS)
    checks = by_member(report)["edge-b"]
    host_bound = profile.verify.host == "macos" and platform.system() != "Darwin"
    for name, check in checks.items():
        expected = "skip" if host_bound and name in NUMERIC else "pass"
        assert check["status"] == expected, (name, check["detail"])
    if not host_bound:
        assert checks["parity"]["values"]["min_cosine"] >= profile.tolerances.min_cosine

    # the same verdicts from a bundle (a .mlpackage directory included), without the family directory
    from hetero.verify.bundle import verify_bundle

    bundle = family.parent / f"{profile_name}.zip"
    report, reference = verify(FamilyStore.open(family), profile=profile_name, latency_runs=RUNS)
    write_bundle(reference, bundle, report)
    shutil.rmtree(family)
    replayed = by_member(verify_bundle(bundle, latency_runs=RUNS))["edge-b"]
    assert {n: c["status"] for n, c in replayed.items()} == {n: c["status"] for n, c in checks.items()}
