"""The CLI with bad arguments, a killed export and chatty converters: one paragraph, exit 2, nothing left."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hetero.cli import main
from hetero.family import FamilyStore
from tests.conftest import tiny_config


def said(capsys) -> tuple[str, str]:
    out = capsys.readouterr()
    return " ".join(out.out.split()), out.err


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("content, words", [
    ("family:\n  name: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 19 is b'\\xe9')"),
    (yaml.safe_dump({**tiny_config(), "train": {"lr": float("nan")}}), "train.lr: Input should be a finite number"),
    (yaml.safe_dump({**tiny_config(), "train": {"lr": float("inf")}}), "train.lr: Input should be a finite number"),
    ("family:\n  name: a\n  name: b\n", "key 'name' first given on line 2 in"),
    (yaml.safe_dump({**tiny_config(), "train": {"epochs": 0}}),
     "train.epochs: Input should be greater than or equal to 1, got 0"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
     "expands to more than 100,000 values"),
    ("", "the top level must be a mapping"),
])
def test_bad_configs_are_one_paragraph_and_exit_2(tmp_path, capsys, content, words):
    config = write(tmp_path / "family.yaml", content)
    assert main(["train", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    out, err = said(capsys)
    assert out.startswith(f"error: {config}") and words in out, out
    assert "Traceback" not in out + err and not (tmp_path / "out").exists()
    assert out.count("got 0") <= 1  # the epochs message says its value once


@pytest.mark.parametrize("argv, words", [
    (["verify", "DIR", "--images", "-5"], "argument --images: must be >= 1, got -5"),
    (["verify", "DIR", "--latency-runs", "0"], "argument --latency-runs: must be >= 1, got 0"),
    (["verify", "DIR", "--latency-runs", "many"], "must be a whole number, got 'many'"),
    (["gallery", "build", "DIR", "--images", "x", "--workers", "-1"], "argument --workers: must be >= 0"),
    (["gallery", "search", "DIR", "--images", "x", "-k", "0"], "argument -k: must be >= 1"),
])
def test_bad_counts_are_refused_by_the_parser(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path) if a == "DIR" else a for a in argv])
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


def test_verify_with_an_unknown_profile_suggests_and_keeps_the_last_report(tiny_family_dir, tmp_path, capsys):
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    (family / "verify.json").write_text('{"passed": true, "from": "the last real run"}')
    assert main(["verify", str(family), "--profile", "server-onnx-fp3"]) == 2
    out, _ = said(capsys)
    assert "unknown device profile 'server-onnx-fp3' (did you mean 'server-onnx-fp32'?)" in out
    assert json.loads((family / "verify.json").read_text())["from"] == "the last real run"
    assert main(["verify", str(family), "--profile", "server-onnx-fp32"]) == 1  # known, but nothing exported
    out, _ = said(capsys)
    assert "no exported artifacts for profile 'server-onnx-fp32'" in out and "nothing was written" in out
    assert json.loads((family / "verify.json").read_text())["from"] == "the last real run"


EXPORT = [sys.executable, "-m", "hetero", "export", "{dir}", "--profile", "android-litert-fp16", "--member",
          "edge-a"]


def _start_export(family: Path) -> subprocess.Popen:
    command = [part.format(dir=family) for part in EXPORT]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_temporary(family: Path, process: subprocess.Popen) -> None:
    """Until the converter writes its temporary file (the lock record's own brief temporary does not count)."""
    deadline = time.time() + 120
    while not list((family / "exports").rglob(".hetero-tmp.*")):
        assert process.poll() is None and time.time() < deadline, "the export ended before it could be stopped"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_terminated_export_leaves_nothing_and_releases_the_lock(tiny_family_dir, tmp_path, runtime_environments):
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    process = _start_export(family)
    _wait_for_temporary(family, process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130, output
    assert "interrupted" in output and "Traceback" not in output
    assert not list(family.rglob(".hetero-tmp.*")) and FamilyStore.open(family).artifacts() == []
    assert not (family / ".hetero.lock.json").exists()


@pytest.mark.slow
def test_what_a_killed_export_left_is_swept_by_the_next_writer(tiny_family_dir, tmp_path, capsys,
                                                              runtime_environments):
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    process = _start_export(family)
    _wait_for_temporary(family, process)
    process.kill()  # SIGKILL: no code runs, the temporary folder stays
    process.wait(timeout=60)
    assert list(family.rglob(".hetero-tmp.*")) and FamilyStore.open(family).artifacts() == []
    assert main(["export", str(family), "--profile", "server-onnx-fp32", "--member", "edge-a", "--quiet"]) == 0
    assert not list(family.rglob(".hetero-tmp.*"))
    assert [a.profile for a in FamilyStore.open(family).artifacts()] == ["server-onnx-fp32"]


@pytest.mark.slow
def test_converter_output_stays_behind_minus_v(tiny_family_dir, tmp_path, capfd):
    pytest.importorskip("coremltools")
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    argv = ["export", str(family), "--profile", "iphone-coreml-fp16", "--member", "edge-a", "--quiet"]
    assert main(argv) == 0
    quiet = capfd.readouterr()
    assert "exported edge-a for iphone-coreml-fp16" in quiet.out
    chatter = ("Converting PyTorch Frontend", "Running MIL", "it/s]", "passes/s", "WARNING")
    assert not [c for c in chatter if c in quiet.out + quiet.err], quiet.out + quiet.err
    assert main(["-v", *argv]) == 0
    loud = capfd.readouterr()
    assert any(c in loud.out + loud.err for c in chatter[:4])


FORK_AFTER_JAX = """
import sys, warnings
warnings.simplefilter("always")
import jax.numpy as jnp
jnp.ones(8).sum().block_until_ready()  # JAX starts its thread pool
from hetero.family import FamilyStore
from hetero.gallery import build_gallery
record = build_gallery(FamilyStore.open(sys.argv[1]), sys.argv[2], sys.argv[3], shard_size=4, batch_size=4, workers=2)
print("rows", record["rows"])
"""


@pytest.mark.slow
def test_loader_workers_never_fork_a_process_jax_made_multithreaded(tiny_family_dir, tmp_path):
    pytest.importorskip("jax")
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("L", (20, 20), 40 * i).save(images / f"{i}.png")
    run = subprocess.run([sys.executable, "-c", FORK_AFTER_JAX, str(tiny_family_dir), str(images),
                          str(tmp_path / "g")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "rows 6" in run.stdout, run.stdout + run.stderr
    assert "fork" not in run.stderr.lower(), run.stderr
