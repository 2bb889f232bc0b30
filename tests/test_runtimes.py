"""Runtime environments: the field's runtime versions, out of process, in export and verify."""
from __future__ import annotations

import json
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from hetero import runtimes
from hetero.cli import main
from hetero.errors import ConfigError
from hetero.family import FamilyStore
from hetero.profiles import builtin_profile_files, load_profile
from hetero.verify import verify

TFLITE_OLD = "tflite-runtime==2.14.0"
ORT_OLD = "onnxruntime==1.17.3"


def said(capsys) -> str:
    return " ".join(capsys.readouterr().out.split())


def profile_file(tmp_path: Path, base: str, **changes) -> str:
    data = yaml.safe_load(builtin_profile_files()[base].read_text())
    data.update(changes)
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def export(family: Path, member: str, profile):
    from hetero.exporter import export_member

    store = FamilyStore.open(family)
    with store.lock("export"):
        return export_member(store, member, profile)


def checks_of(report: dict) -> dict[tuple[str, str], dict[str, dict]]:
    return {(a["member"], a["runtime"]): {c["name"]: c for c in a["checks"]} for a in report["artifacts"]}


# ---------------------------------------------------------------------------------------- environments


def fake_environment(root: Path, script: str, distribution: str = "tflite-runtime", version: str = "2.14.0",
                     engine: str = "tflite_runtime"):
    """An environment record whose interpreter is `script` (a worker that crashes, hangs or lies)."""
    env = root / f"{distribution}-{version}"
    (env / "bin").mkdir(parents=True)
    (env / "worker.py").write_text(script)
    interpreter = env / "bin" / "python"
    interpreter.write_text(f"#!/bin/sh\nexec {sys.executable} {env / 'worker.py'} \"$@\"\n")
    interpreter.chmod(0o755)
    (env / runtimes.ENV_RECORD).write_text(json.dumps({
        "distribution": distribution, "version": version, "engine": engine, "python": "3.11", "created": "now",
        "seconds": 0}))
    return next(e for e in runtimes.environments() if e.path == env)


CRASH = "import sys\nsys.stderr.write('Illegal instruction: this CPU lacks AVX\\n')\nsys.exit(132)\n"
HANG = "import time\ntime.sleep(600)\n"
DIES_ON_RUN = """
import json, sys
print(json.dumps({"protocol": 1, "python": "3", "numpy": "1", "engine": "tflite_runtime",
                  "package": "tflite-runtime", "version": "2.14.0"}), flush=True)
for line in sys.stdin:
    if json.loads(line)["op"] == "open":
        print(json.dumps({"ok": True, "batch": 1}), flush=True)
    else:
        sys.stderr.write("Segmentation fault in the interpreter\\n")
        sys.exit(139)
"""


@pytest.mark.parametrize("script, words", [
    (CRASH, "exited with status 132; its stderr: Illegal instruction: this CPU lacks AVX"),
    (HANG, "did not answer within 2 s (hung; killed)"),
    (DIES_ON_RUN, "exited with status 139; its stderr: Segmentation fault in the interpreter"),
])
def test_a_worker_that_crashes_or_hangs_is_an_error_with_its_stderr(tmp_path, monkeypatch, script, words):
    monkeypatch.setenv("HETERO_RUNTIMES", str(tmp_path))
    env = fake_environment(tmp_path, script)
    with pytest.raises(runtimes.WorkerFailed) as err:
        model = runtimes.IsolatedRuntime(env, tmp_path / "model.tflite", {"layout": "NHWC"}, timeout=2)
        model.embed(__import__("numpy").zeros((1, 3, 8, 8), "float32"))
    assert words in str(err.value) and "tflite-runtime 2.14.0" in str(err.value)


def test_a_crashing_worker_is_a_failed_check_and_the_harness_goes_on(tiny_family_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_RUNTIMES", str(tmp_path / "envs"))
    fake_environment(tmp_path / "envs", CRASH, "onnxruntime", "1.17.3", "onnxruntime")
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    export(family, "edge-a", load_profile("server-onnx-fp32"))
    field = profile_file(tmp_path, "server-onnx-fp32", runtimes=["onnxruntime>=1.18", ORT_OLD])
    report, _ = verify(FamilyStore.open(family), profile=field, latency_runs=1)
    checks = checks_of(report)
    identity = checks[("edge-a", "onnxruntime 1.17.3")]["identity"]
    assert identity["status"] == "fail" and "Illegal instruction: this CPU lacks AVX" in identity["detail"]
    current = f"onnxruntime {runtimes.installed_version('onnxruntime')}"
    assert {c["status"] for c in checks[("edge-a", current)].values()} == {"pass"}


def test_unknown_runtime_names_are_refused_with_a_suggestion(capsys):
    assert main(["runtimes", "add", "tflite_runtim==2.14.0"]) == 2
    assert "unknown runtime package 'tflite_runtim' (did you mean 'tflite-runtime'?)" in said(capsys)
    with pytest.raises(ConfigError, match=r"runtimes: item 1: unknown runtime package 'onxruntime'"):
        load_profile(profile_file(Path(__import__("tempfile").mkdtemp()), "rpi-onnx-int8",
                                  runtimes=["onnxruntime>=1.18", "onxruntime==1.17.3"]))
    with pytest.raises(ConfigError, match=r"runtimes: 'onnxruntime==1.17.3' runs onnx files, not tflite"):
        load_profile(profile_file(Path(__import__("tempfile").mkdtemp()), "android-litert-fp16",
                                  runtimes=["onnxruntime==1.17.3"]))


@pytest.mark.slow
def test_add_list_remove_and_a_version_the_registry_does_not_have(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HETERO_RUNTIMES", str(tmp_path))
    assert main(["runtimes", "add", "tflite-runtime==9.9.9"]) == 2
    message = said(capsys)
    assert "pip install tflite-runtime==9.9.9 failed" in message and "from versions:" in message  # pip's answer
    assert not list(tmp_path.glob("tflite*")) and not list(tmp_path.glob(".hetero-tmp*"))

    assert main(["runtimes", "add", TFLITE_OLD]) == 0
    assert "created tflite-runtime 2.14.0" in said(capsys)
    (env,) = runtimes.environments()
    assert (env.distribution, env.version) == ("tflite-runtime", "2.14.0")
    numpy = runtimes.handshake(env.interpreter, env.engine)["numpy"]
    assert numpy.startswith("1.") and not runtimes.installed_version("numpy").startswith("1.")  # never here

    (env.interpreter).unlink()  # deleted by hand
    assert main(["runtimes", "list"]) == 0
    assert "broken" in said(capsys)
    target = runtimes.targets(load_profile("android-litert-fp16"))[1]
    assert target.missing and "re-create it: hetero runtimes add tflite-runtime==2.14.0" in target.missing

    assert main(["runtimes", "remove", TFLITE_OLD]) == 0
    assert runtimes.environments() == []
    assert main(["runtimes", "remove", TFLITE_OLD]) == 2


# ------------------------------------------------------------------------------------- export and verify


def test_a_first_export_creates_the_declared_environments_or_exports_them_unchecked(tiny_family_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    """A newcomer's first export is never refused for a runtime environment: it is created (with a line saying
    where), and one that cannot be created (no network here) is recorded as unchecked, which verify skips."""
    monkeypatch.setenv("HETERO_RUNTIMES", str(tmp_path / "none-yet"))
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    asked = []

    def offline(text, python=None):
        asked.append(text)
        raise runtimes.RuntimeEnvError(f"pip install {text} failed: ERROR: No matching distribution (offline)")

    monkeypatch.setattr(runtimes, "add", offline)
    assert main(["export", str(family), "--profile", "android-litert-fp16", "--member", "edge-a", "--quiet"]) == 0
    out = said(capsys)
    assert asked == [TFLITE_OLD]
    assert f"creating the {TFLITE_OLD} environment in {tmp_path / 'none-yet'}" in out
    assert f"not checked on {TFLITE_OLD}: pip install {TFLITE_OLD} failed" in out
    (artifact,) = FamilyStore.open(family).artifacts()
    assert len(artifact.checked_on) == 1 and artifact.checked_on[0].startswith("ai-edge-litert")
    assert artifact.unchecked_on[0].startswith(f"{TFLITE_OLD}: pip install {TFLITE_OLD} failed")
    report, _ = verify(FamilyStore.open(family), latency_runs=1)
    old = [a for a in report["artifacts"] if a["runtime"] == TFLITE_OLD]
    assert old and {c["status"] for c in old[0]["checks"]} == {"skip"}  # never passed, never a failed export


@pytest.mark.slow
def test_old_tflite_runtime_failure_is_caught_and_export_falls_back(tiny_family_dir, tmp_path, runtime_environments,
                                                                     capsys):
    """tflite-runtime 2.14 computes wrong vectors for dynamic-range int8: verify catches it, export avoids it."""
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    dynamic = profile_file(tmp_path, "android-litert-int8", name="dynamic-int8", precision="int8-dynamic",
                           runtimes=["ai-edge-litert>=2.3"])  # exported for today's runtime only...
    export(family, "edge-a", load_profile(dynamic))
    field = profile_file(tmp_path, "android-litert-int8", name="dynamic-int8", precision="int8-dynamic")
    report, _ = verify(FamilyStore.open(family), profile=field, latency_runs=1)  # ...held to the field's
    checks = checks_of(report)
    assert checks[("edge-a", "ai-edge-litert 2.3.0")]["parity"]["status"] == "pass"
    old = checks[("edge-a", "tflite-runtime 2.14.0")]["parity"]
    assert old["status"] == "fail" and old["values"]["min_cosine"] < 0.9

    artifact = export(family, "edge-a", load_profile("android-litert-int8"))
    assert artifact.quantization["scheme"] != "int8-dynamic"
    assert "int8-dynamic on tflite-runtime 2.14.0: min cosine" in artifact.quantization["fallback_reason"]
    assert artifact.checked_on == ["ai-edge-litert 2.3.0", "tflite-runtime 2.14.0"]
    junit = tmp_path / "j.xml"
    assert main(["verify", str(family), "--profile", "android-litert-int8", "--latency-runs", "1",
                 "--junit", str(junit)]) == 0
    names = [case.get("name") for case in ET.parse(junit).getroot().iter("testcase")]
    assert "parity on tflite-runtime 2.14.0" in names and "parity on ai-edge-litert 2.3.0" in names


@pytest.mark.slow
def test_onnx_files_load_on_an_older_onnxruntime(tiny_family_dir, tmp_path, runtime_environments):
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    artifact = export(family, "edge-a", load_profile("rpi-onnx-int8"))
    assert artifact.quantization["ir_version"] <= 9  # onnxruntime 1.17 reads IR 9 at most
    assert artifact.checked_on[1] == "onnxruntime 1.17.3"
    import onnx

    domains = {o.domain for o in onnx.load(str(family / artifact.file)).opset_import}
    assert domains <= {"", "ai.onnx", "com.microsoft"}  # no stamped-but-unused domains an old runtime refuses
    report, _ = verify(FamilyStore.open(family), profile="rpi-onnx-int8", latency_runs=1)
    assert [a["runtime"] for a in report["artifacts"]][1] == "onnxruntime 1.17.3"
    for artifact in report["artifacts"]:  # every check holds on both runtimes...
        failed = {c["name"]: c for c in artifact["checks"] if c["status"] == "fail"}
        assert set(failed) <= {"retrieval"}, (artifact["runtime"], failed)
        # ...but the retrieval drop, here within one query: the tiny family's 64 queries are coarser than the
        # profile's 1% (one flipped query is 1.6%), so its int8 file passes or not by chance
        if failed:
            assert failed["retrieval"]["values"]["top1_drop"] <= 1 / 64 + 1e-9, failed


def test_pytest_plugin_ids_carry_the_runtime_version(tiny_family_dir, tmp_path):
    import subprocess

    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    export(family, "edge-a", load_profile("server-onnx-fp32"))
    work = tmp_path / "project"
    work.mkdir()
    (work / "pytest.ini").write_text("[pytest]\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "hetero.pytest_plugin", "-p", "no:cacheprovider",
                           "--collect-only", "-q", "--hetero-family", str(family)], cwd=work, capture_output=True,
                          text=True, timeout=300)
    version = runtimes.installed_version("onnxruntime")
    assert f"edge-a@server-onnx-fp32 on onnxruntime {version}::parity" in done.stdout, done.stdout
