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


def test_run_with_an_unknown_export_profile_fails_before_training(tmp_path, capsys):
    """A typo in export.profiles is found before training, the longest stage, not after it."""
    config = {**tiny_config(), "export": {"profiles": ["server-onnx-fp32", "android-litert-fp61"]}}
    path = write(tmp_path / "family.yaml", yaml.safe_dump(config))
    out_dir = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out_dir)]) == 2
    out, err = said(capsys)
    assert out.startswith("error: unknown device profile 'android-litert-fp61' (did you mean "
                          "'android-litert-fp16'?); allowed: "), out
    assert "iphone-coreml-int8" in out and "server-onnx-fp32" in out  # the known profiles are listed
    assert "Traceback" not in out + err and "stage 1/4" not in out and "epoch" not in out
    assert not out_dir.exists()  # nothing trained: no checkpoints, no manifest


def test_set_overrides_a_config_value_and_a_bad_key_is_named(tmp_path, capsys):
    """--set KEY=VALUE changes the config the family is trained with; an unknown key or a refused value exits 2
    naming it, before anything is written."""
    path = write(tmp_path / "family.yaml", yaml.safe_dump(tiny_config()))
    out_dir = tmp_path / "out"
    assert main(["train", str(path), "--out", str(out_dir), "--quiet", "--set", "train.epochs=1",
                 "--set", "family.members.2.input_size=16"]) == 0
    store = FamilyStore.open(out_dir)
    assert len(store.manifest.training.history) == 2  # one epoch in each phase (cloud, then edges), not 10
    config = store.config()
    assert config.train.epochs == 1 and config.family.members[2].input_size == 16
    capsys.readouterr()
    for override, words in [("train.epochz=3", "train.epochz: unknown key (did you mean 'epochs'?)"),
                            ("train.epochs=many", "train.epochs: Input should be a valid integer"),
                            ("trian.epochs=3", "unknown key 'trian' (did you mean 'train'?)")]:
        assert main(["train", str(path), "--out", str(tmp_path / "never"), "--set", override]) == 2
        out, err = said(capsys)
        assert words in out and "Traceback" not in out + err, out
        assert not (tmp_path / "never").exists()


def test_verify_with_an_unknown_profile_suggests_and_keeps_the_last_report(tiny_family_dir, tmp_path, capsys):
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    (family / "verify.json").write_text('{"passed": true, "from": "the last real run"}')
    assert main(["verify", str(family), "--profile", "server-onnx-fp3"]) == 2
    out, _ = said(capsys)
    assert "unknown device profile 'server-onnx-fp3' (did you mean 'server-onnx-fp32'?)" in out
    assert json.loads((family / "verify.json").read_text())["from"] == "the last real run"
    assert main(["verify", str(family), "--profile", "server-onnx-fp32"]) == 2  # known, but nothing exported
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


# ------------------------------------------------------------------------- issue 31: inputs that gave tracebacks


def refused(capsys, *words) -> str:
    """The one paragraph a refusal printed; each of `words` is in it and no traceback is."""
    out, err = said(capsys)
    assert out.startswith("error: ") and all(w in out for w in words), out
    assert "Traceback" not in out + err
    return out


@pytest.mark.parametrize("ids, words", [
    (None, ["--ids", "no such file"]),
    ("caf\xe9\n".encode("latin-1"), ["--ids", "not UTF-8 text (byte 3 is b'\\xe9')"]),
    ("directory", ["--ids", "is a directory"]),
])
def test_gallery_import_ids_that_cannot_be_read(tiny_family_dir, tmp_path, capsys, ids, words):
    import numpy as np

    np.save(tmp_path / "v.npy", np.ones((2, 32), np.float32))
    path = tmp_path / "ids.txt"
    if ids == "directory":
        path.mkdir()
    elif ids is not None:
        path.write_bytes(ids)
    assert main(["gallery", "import", str(tiny_family_dir), "--vectors", str(tmp_path / "v.npy"), "--ids", str(path),
                 "--images", str(tmp_path), "--out", str(tmp_path / "g")]) == 2
    refused(capsys, str(path), *words)
    assert not (tmp_path / "g").exists()


def test_gallery_import_refuses_a_parquet_row_without_an_id(tiny_family_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = tmp_path / "v.parquet"
    pq.write_table(pa.table({"id": ["a.png", None, "c.png"], "embedding": [[1.0] * 32] * 3}), vectors)
    assert main(["gallery", "import", str(tiny_family_dir), "--vectors", str(vectors), "--images", str(tmp_path),
                 "--out", str(tmp_path / "g")]) == 2
    refused(capsys, f"--vectors {vectors}: row 1 has no id (null)")
    assert not (tmp_path / "g").exists()


def test_runtimes_add_with_a_python_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-python"
    assert main(["runtimes", "add", "onnxruntime==1.17.3", "--python", str(missing)]) == 2
    refused(capsys, f"--python {missing}: no such interpreter")


@pytest.fixture
def taken(tmp_path) -> dict[str, Path]:
    """A directory and a file where a command would write."""
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("the user's own file")
    return {"folder": tmp_path / "a-folder", "file": tmp_path / "a-file", "below": tmp_path / "a-file" / "out"}


@pytest.mark.parametrize("argv, flag, where, words", [
    (["verify", "DIR", "--junit", "{folder}"], "--junit", "folder", "is a directory"),
    (["verify", "--bundle", "DIR/none.zip", "--json", "{folder}"], "--json", "folder", "is a directory"),
    (["verify", "DIR", "--bundle", "{folder}"], "--bundle", "folder", "is a directory"),
    (["verify", "DIR", "--report", "{below}"], "--report", "below", "is a file, so nothing can be written below"),
    (["gallery", "search", "DIR", "--images", "DIR", "--json", "{folder}"], "--json", "folder", "is a directory"),
    (["gallery", "build", "DIR", "--images", "DIR", "--out", "{below}"], "--out", "below", "is a file, so nothing"),
    (["gallery", "build", "DIR", "--images", "DIR", "--out", "{file}"], "--out", "file", "is a file; give a directory"),
    (["gallery", "import", "DIR", "--vectors", "DIR/v.npy", "--ids", "DIR/ids", "--images", "DIR", "--out", "{below}"],
     "--out", "below", "is a file, so nothing"),
])
def test_outputs_that_cannot_be_written_are_refused_before_any_work(family_copy, taken, capsys, argv, flag, where,
                                                                    words):
    before = {p: p.stat().st_mtime_ns for p in family_copy.rglob("*")}
    argv = [a.replace("DIR", str(family_copy)).format(**taken) for a in argv]
    assert main(argv) == 2
    refused(capsys, f"{flag} {taken[where]}", words)
    assert taken["file"].read_text() == "the user's own file"
    assert {p: p.stat().st_mtime_ns for p in family_copy.rglob("*")} == before  # nothing ran


def test_a_teacher_cache_dir_that_is_a_file_or_a_truncated_shard(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    config = tiny_config(epochs=1, teacher_cache={"views": 1, "dir": str(cache)})
    config["family"]["members"] = config["family"]["members"][:2]
    path = write(tmp_path / "c.yaml", yaml.safe_dump(config))
    assert main(["train", str(path), "--out", str(tmp_path / "one"), "--quiet"]) == 2
    refused(capsys, f"train.teacher_cache.dir {cache}: is a file")

    cache.unlink()
    assert main(["train", str(path), "--out", str(tmp_path / "two"), "--quiet"]) == 0
    shard = cache / "shards" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # a copy cut short
    capsys.readouterr()
    assert main(["train", str(path), "--out", str(tmp_path / "three"), "--quiet"]) == 2
    refused(capsys, f"{shard}: a damaged teacher cache shard", "delete it")


def test_a_family_name_with_rich_markup_is_printed_literally(tmp_path, capsys):
    config = tiny_config(epochs=1)
    config["family"]["name"] = "[bold]mine[/i] [red]"
    config["family"]["members"] = config["family"]["members"][:2]
    path = write(tmp_path / "c.yaml", yaml.safe_dump(config))
    assert main(["train", str(path), "--out", str(tmp_path / "f"), "--quiet"]) == 0
    assert main(["eval", str(tmp_path / "f")]) == 0
    out, err = said(capsys)
    assert out.count("[bold]mine[/i] [red]") == 2 and "Traceback" not in out + err  # trained ..., and the matrix


def _npz_declaring(shape: tuple) -> bytes:
    """An npz whose query_images header declares `shape` while holding a few bytes."""
    import io
    import zipfile

    import numpy as np
    from numpy.lib import format as npy

    member = io.BytesIO()
    npy.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
    member.write(b"\0" * 16)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("query_images.npy", member.getvalue())
        for name, value in (("query_labels", np.zeros(1, np.int64)), ("gallery", np.zeros((1, 4), np.float32)),
                            ("gallery_labels", np.zeros(1, np.int64))):
            buffer = io.BytesIO()
            np.save(buffer, value)
            handle.writestr(f"{name}.npy", buffer.getvalue())
    return archive.getvalue()


def test_a_bundle_whose_arrays_declare_a_huge_shape_is_refused_before_allocating(tmp_path, capsys):
    import zipfile

    from hetero.verify.bundle import ARRAYS, BUNDLE_JSON

    meta = {"bundle_version": 1, "family": "f", "space_id": "hs-0", "gallery_space_id": "hs-0", "cloud": "cloud",
            "source": "x", "members": {}, "artifacts": [], "profiles": {}, "torch_figures": {}}
    bundle = tmp_path / "b.zip"
    with zipfile.ZipFile(bundle, "w") as handle:
        handle.writestr(BUNDLE_JSON, json.dumps(meta))
        handle.writestr(ARRAYS, _npz_declaring((1 << 20, 3, 256, 256)))  # 192 GiB of uint8
    assert main(["verify", "--bundle", str(bundle)]) == 2
    refused(capsys, f"{bundle}: {ARRAYS} cannot be read", "query_images.npy: its header declares uint8 of shape "
                                                          "(1048576, 3, 256, 256)", "but only 16 bytes follow")


def test_calibrate_with_escalation_prints_the_systems_top1(tiny_family_dir, monkeypatch, capsys):
    from hetero.training import exits

    rule = {"thresholds": [0.5], "escalate_above": 0.9, "calibration": {
        "images": 32, "top1_last_exit": 0.8, "top1": 0.61, "top1_system": 0.79, "mean_mflops": 1.0,
        "shares": [0.5, 0.4], "escalated": 0.1}}
    monkeypatch.setattr(exits, "calibrate", lambda *args: rule)
    assert main(["calibrate", str(tiny_family_dir), "--member", "edge-a", "--top1-loss", "0.01",
                 "--escalate", "0.1"]) == 0
    out, _ = said(capsys)
    assert "top-1 0.790 with the cloud (0.610 on the edge alone)" in out, out


def test_verify_with_nothing_exported_exits_2(family_copy, capsys):
    assert main(["verify", str(family_copy)]) == 2
    refused(capsys, f"{family_copy}: no exported artifacts to verify; run `hetero export` first")
    assert not (family_copy / "verify.json").exists()


def test_tables_are_not_cut_at_80_columns_when_stdout_is_not_a_terminal():
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    run = subprocess.run([sys.executable, "-m", "hetero", "profiles", "list"], capture_output=True, text=True,
                         env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert max(map(len, lines)) > 80 and "…" not in run.stdout
    narrow = subprocess.run([sys.executable, "-m", "hetero", "profiles", "list"], capture_output=True, text=True,
                            env={**env, "COLUMNS": "100"}, timeout=120, stdin=subprocess.DEVNULL)
    assert max(map(len, narrow.stdout.splitlines())) <= 100


@pytest.mark.parametrize("key, written, read", [
    ("amp", "off", "off"), ("channels_last", "on", "on"), ("channels_last", "off", "off"), ("amp", "bf16", "bf16")])
def test_yaml_switch_words_are_read_as_written(tmp_path, key, written, read):
    from hetero.config import load_config

    text = yaml.safe_dump(tiny_config()).replace("train:\n", f"train:\n  {key}: {written}\n", 1)
    config = load_config(write(tmp_path / "c.yaml", text))
    assert getattr(config.train, key) == read


def test_ctrl_c_exits_130_and_says_how_each_kind_of_run_goes_on(monkeypatch, capsys):
    import hetero.cli.parser as parser

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(parser, "cmd_gallery", interrupted)
    assert main(["gallery", "build", "fam", "--images", "imgs", "--store", "lance"]) == 130
    out, _ = said(capsys)
    assert "nothing half-written was kept" in out and "--resume" in out
    assert "a gallery build (or an import into a database) keeps the rows it wrote" in out
