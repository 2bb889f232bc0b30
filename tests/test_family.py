"""The family store: who may write a family directory, which paths it reads, and what identifies a space."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hetero.cli import main
from hetero.config import ConfigError, parse_config
from hetero.errors import LockError, ManifestError
from hetero.family import CONFIG, MANIFEST, TRAIN_STATE, FamilyStore, save_weights, tensors_digest
from hetero.files import LOCK_HOLDER, DirectoryLock, sha256_file
from hetero.training import train
from tests.conftest import crash_after, tiny_config

QUICK = {"epochs": 1}


def write_config(path: Path, **train_overrides) -> Path:
    data = tiny_config(**{**QUICK, **train_overrides})
    data["data"].update(num_classes=24, samples_per_class=6)
    path.write_text(yaml.safe_dump(data))
    return path


def said(capsys) -> str:
    """What the CLI printed, with the console's line wrapping undone."""
    return " ".join(capsys.readouterr().out.split())


def tree(root: Path) -> dict[str, str]:
    """Every file below `root` with its sha256 (the state a test compares before and after)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ member names (1)


@pytest.mark.parametrize("name", ["/somewhere/checkpoints/cloud", "..", ".", "a/b", "edge m", "", "-edge",
                                  "x" * 65, "cloud\x00"])
def test_member_names_are_plain_identifiers(name):
    data = tiny_config()
    data["family"]["members"][1]["name"] = name
    with pytest.raises(ConfigError, match=r"family\.members\.1\.name"):
        parse_config(data, "family.yaml")


def test_an_absolute_member_name_never_touches_another_family(tmp_path, capsys):
    victim = tmp_path / "victim"
    train(parse_config(yaml.safe_load(write_config(tmp_path / "a.yaml").read_text()), "a"), victim, progress=False)
    before = tree(victim)
    data = yaml.safe_load(write_config(tmp_path / "b.yaml").read_text())
    data["family"]["members"][0]["name"] = str(victim / "checkpoints" / "cloud")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "member name" in said(capsys)
    assert tree(victim) == before and not (tmp_path / "x").exists()


def test_a_profile_name_cannot_climb_out_of_exports(tmp_path):
    from hetero.profiles import builtin_profile_files, load_profile

    data = yaml.safe_load(builtin_profile_files()["server-onnx-fp32"].read_text())
    data["name"] = "../../elsewhere"
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"evil\.yaml: invalid device profile\n  name: profile name '\.\./"):
        load_profile(str(path))


# ----------------------------------------------------------------------------- existing families (2)


def test_training_into_a_family_is_refused_and_says_what_is_there(tiny_family_dir, tmp_path, capsys):
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    (family / "verify.json").write_text("{}")
    before = tree(family)
    config = write_config(tmp_path / "c.yaml")
    assert main(["train", str(config), "--out", str(family), "--quiet"]) == 2
    message = said(capsys)
    assert "already holds family 'tiny'" in message and "verify.json" in message
    assert "--resume" in message and "--overwrite" in message
    assert tree(family) == before


def _earlier_outputs(family: Path) -> None:
    """What later stages add to a family: a file and a folder artifact (in the manifest), verify.json, a gallery
    and a teacher cache."""
    from hetero.family import ArtifactRecord
    from hetero.files import sha256_path

    store = FamilyStore.open(family)
    for profile, name in (("server-onnx-fp32", "edge-a.onnx"), ("ios-coreml-fp16", "edge-a.mlpackage/model.bin")):
        path = family / "exports" / profile / name
        path.parent.mkdir(parents=True)
        path.write_bytes(b"an artifact")
        artifact = family / "exports" / profile / name.split("/")[0]
        store.register_artifact(ArtifactRecord(member="edge-a", profile=profile, format="onnx", precision="fp32",
                                               file=artifact.relative_to(family).as_posix(),
                                               sha256=sha256_path(artifact), bytes=11, export_seconds=0.1))
    for name in ("verify.json", "gallery/gallery.json", "gallery/index.faiss", "gallery/shards/shard-00000.json",
                 "gallery/shards/shard-00000.safetensors", "teacher_cache/cache.json",
                 "teacher_cache/shards/shard-00000.safetensors"):
        (family / name).parent.mkdir(parents=True, exist_ok=True)
        (family / name).write_text("written by a stage of the earlier family")


def test_overwrite_removes_the_files_the_family_wrote_and_none_of_yours(tiny_family_dir, tmp_path):
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    _earlier_outputs(family)
    yours = {"NOTES.md": "notes", "checkpoints/cloud-backup.safetensors": "a backup",
             "exports/server-onnx-fp32/README.txt": "how I deploy", "exports/mine/model.onnx": "my own model",
             "gallery/photo.jpg": "a photo", "gallery/shards/notes.txt": "mine too"}
    for name, text in yours.items():
        (family / name).parent.mkdir(parents=True, exist_ok=True)
        (family / name).write_text(text)
    old_space = FamilyStore.open(family).space_id
    config = write_config(tmp_path / "c.yaml", seed=3)
    assert main(["train", str(config), "--out", str(family), "--quiet", "--overwrite"]) == 0
    store = FamilyStore.open(family)
    assert store.space_id != old_space and store.artifacts() == []
    written = {CONFIG, MANIFEST, TRAIN_STATE} | {m.checkpoint.file for m in store.members}
    left = {name for name in tree(family) if not name.startswith(".hetero")}
    assert left == written | set(yours)  # the new family and your files, nothing of the old one
    assert all((family / name).read_text() == text for name, text in yours.items())
    assert not (family / "teacher_cache").exists() and not (family / "exports" / "ios-coreml-fp16").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(config), "--out", str(family), "--resume", "--overwrite"])
    assert exit_.value.code == 2


def test_overwrite_replaces_an_unfinished_first_run(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(yaml.safe_load(config.read_text()), "c"), tmp_path / "out", progress=False,
              callbacks=[crash_after(1)])
    assert not (tmp_path / "out" / MANIFEST).exists() and (tmp_path / "out" / TRAIN_STATE).is_file()
    assert main(["train", str(write_config(tmp_path / "c.yaml", seed=3)), "--out", str(tmp_path / "out"), "--quiet",
                 "--overwrite"]) == 0
    assert FamilyStore.open(tmp_path / "out").config().train.seed == 3


def test_overwrite_replaces_a_first_run_stopped_before_its_first_checkpoint_and_nothing_of_yours(tmp_path, capsys):
    config, out = write_config(tmp_path / "c.yaml"), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(yaml.safe_load(config.read_text()), "c"), out, progress=False, callbacks=[crash_after(1)])
    for state in (out / "checkpoints").iterdir():
        state.unlink()  # as a run stopped during its first epoch leaves it: its saved config alone
    (out / "notes.txt").write_text("the user's")
    again = ["train", str(write_config(tmp_path / "c.yaml", seed=3)), "--out", str(out), "--quiet", "--overwrite"]
    assert main(again) == 2
    assert "holds files but no family" in said(capsys) and (out / "notes.txt").read_text() == "the user's"
    (out / "notes.txt").unlink()
    assert main(again) == 0
    assert FamilyStore.open(out).config().train.seed == 3


def test_overwrite_refuses_a_directory_without_a_family_and_an_empty_out(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "c.yaml")
    foreign = tmp_path / "foreign"
    for name in ("config.yaml", "manifest.json", "report.json", "gallery/photo.jpg", "exports/x.onnx"):
        (foreign / name).parent.mkdir(parents=True, exist_ok=True)
        (foreign / name).write_text("the user's")
    before = tree(foreign)
    assert main(["train", str(config), "--out", str(foreign), "--quiet", "--overwrite"]) == 2
    message = said(capsys)
    assert f"--overwrite {foreign}: no readable family manifest" in message and "nothing was removed" in message
    (foreign / "manifest.json").unlink()
    del before["manifest.json"]
    assert main(["train", str(config), "--out", str(foreign), "--quiet", "--overwrite"]) == 2
    assert f"--overwrite {foreign}: this directory holds files but no family" in said(capsys)
    assert {name: sha for name, sha in tree(foreign).items() if not name.startswith(".hetero")} == before

    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["train", str(config), "--out", "", "--quiet", "--overwrite"]) == 2
    assert "--out: empty" in said(capsys) and list(here.iterdir()) == []


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    assert main(["train", str(write_config(tmp_path / "c.yaml")), "--out", str(tmp_path / "taken")]) == 2
    assert "is a file" in said(capsys) and (tmp_path / "taken").read_text() == "a file"


def test_a_failed_first_train_leaves_no_directory(tmp_path, capsys):
    data = yaml.safe_load(write_config(tmp_path / "c.yaml").read_text())
    data["data"] = {"source": "imagefolder", "path": str(tmp_path / "no-such-data")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in said(capsys)
    assert not (tmp_path / "out").exists()  # no config.yaml, no lock file, no directory


# ----------------------------------------------------------------------------------------- locks (3)


HOLDER = """
import sys, time
from hetero.files import DirectoryLock
with DirectoryLock(sys.argv[1], "train"):
    print("holding", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def held(tmp_path):
    """A directory whose lock another process holds; yields (directory, that process)."""
    directory = tmp_path / "busy"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "holding"
    yield directory, process
    process.kill()
    process.wait()


def test_a_second_writer_is_refused_with_the_holder(held, tiny_family_dir, tmp_path, capsys):
    directory, process = held
    config = write_config(tmp_path / "c.yaml")
    assert main(["train", str(config), "--out", str(directory), "--quiet"]) == 2
    message = said(capsys)
    assert f"is being written by `hetero train` (pid {process.pid}" in message
    assert not (directory / CONFIG).exists() and not (directory / "checkpoints").exists()
    with pytest.raises(LockError, match=f"pid {process.pid}"):
        DirectoryLock(directory, "export").acquire()


def test_export_and_gallery_build_take_the_family_lock(held, tiny_family_dir, tmp_path):
    from hetero.gallery import build_gallery

    directory, process = held
    shutil.copytree(tiny_family_dir, directory, dirs_exist_ok=True)
    assert main(["export", str(directory), "--profile", "server-onnx-fp32", "--quiet"]) == 2
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(LockError, match=f"pid {process.pid}"):
        build_gallery(FamilyStore.open(directory), images)
    assert FamilyStore.open(directory).artifacts() == []


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
    directory = tmp_path / "family"
    directory.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (directory / LOCK_HOLDER).write_text(json.dumps({"pid": int(dead.stdout), "host": "here", "verb": "train",
                                                     "since": "earlier"}))
    (directory / ".hetero-tmp.manifest.json.abc").write_text("half a manifest from a killed writer")
    with caplog.at_level("WARNING", logger="hetero.files"):
        with DirectoryLock(directory, "eval") as lock:
            assert lock.stale["pid"] == int(dead.stdout)
            assert json.loads((directory / LOCK_HOLDER).read_text())["pid"] == os.getpid()
    assert "ended without releasing it" in caplog.text
    assert not (directory / ".hetero-tmp.manifest.json.abc").exists()  # swept under the lock
    assert not (directory / LOCK_HOLDER).exists()


@pytest.mark.parametrize("target", [".hetero.lock", "elsewhere/not-yet"])  # a loop; a dangling link
def test_a_lock_file_that_is_a_symbolic_link_is_refused_by_name(tmp_path, capsys, target):
    directory = tmp_path / "family"
    directory.mkdir()
    (directory / ".hetero.lock").symlink_to(tmp_path / target if "/" in target else target)
    assert main(["train", str(write_config(tmp_path / "c.yaml")), "--out", str(directory), "--quiet"]) == 2
    assert f"{directory / '.hetero.lock'}: is a symbolic link" in said(capsys)
    assert sorted(p.name for p in directory.iterdir()) == [".hetero.lock"] and not (tmp_path / "elsewhere").exists()


# ----------------------------------------------------------------------------------- safe paths (4)


def _point(family: Path, change) -> None:
    manifest = json.loads((family / MANIFEST).read_text())
    change(manifest)
    (family / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_manifest_paths_outside_the_family_are_refused_before_reading(tiny_family_dir, tmp_path, how, capsys):
    """A checkpoint entry naming another family's file, with its true sha256, is still refused."""
    other = tmp_path / "other"
    shutil.copytree(tiny_family_dir, other)
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    target = other / "checkpoints" / "edge-a.safetensors"
    if how == "symlink":
        (family / "checkpoints" / "edge-a.safetensors").unlink()
        (family / "checkpoints" / "edge-a.safetensors").symlink_to(target)
    else:
        where = str(target) if how == "absolute" else "../other/checkpoints/edge-a.safetensors"
        _point(family, lambda m: m["members"][1]["checkpoint"].update(file=where, sha256=sha256_file(target)))
    with pytest.raises(ManifestError, match="outside"):
        FamilyStore.open(family).load_member("edge-a")
    assert main(["eval", str(family)]) == 2
    assert "outside" in said(capsys)


def test_artifact_path_outside_the_family_fails_identity(tiny_family_dir, tmp_path):
    from hetero.exporter import export_member
    from hetero.profiles import load_profile
    from hetero.verify import verify

    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    store = FamilyStore.open(family)
    with store.lock("export"):
        artifact = export_member(store, "edge-a", load_profile("server-onnx-fp32"))
    outside = tmp_path / "outside.onnx"
    shutil.move(family / artifact.file, outside)  # the right file, with the right sha256, but outside
    _point(family, lambda m: m["artifacts"][0].update(file=str(outside)))
    report, _ = verify(FamilyStore.open(family), latency_runs=1)
    identity = report["artifacts"][0]["checks"][0]
    assert identity["status"] == "fail" and "points outside" in identity["detail"] and not report["passed"]


@pytest.mark.parametrize("change, words", [
    (lambda m: m.pop("members"), "members: Field required"),
    (lambda m: m.update(members="cloud"), "members"),
    (lambda m: m["members"][0].update(role="server"), "members.0.role"),
    (lambda m: m["members"][1]["checkpoint"].update(sha256=42), "members.1.checkpoint.sha256"),
    (lambda m: m.update(artifacts=[{"member": "ghost"}]), "artifacts.0"),
    (lambda m: m.update(space_id=["hs-0"]), "space_id"),
])
def test_valid_json_of_the_wrong_shape_is_a_clear_error(tiny_family_dir, tmp_path, change, words, capsys):
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    _point(family, change)
    with pytest.raises(ManifestError, match="not a hetero family manifest") as err:
        FamilyStore.open(family)
    assert words in str(err.value) and str(family / MANIFEST) in str(err.value)
    assert main(["export", str(family)]) == 2 and "Traceback" not in said(capsys)


def test_member_lookup_suggests_the_closest_name(tiny_family_dir):
    with pytest.raises(ManifestError, match=r"unknown member 'edge_a' \(did you mean 'edge-a'\?\)"):
        FamilyStore.open(tiny_family_dir).member("edge_a")


def test_weights_that_do_not_fit_the_architecture_name_the_first_key(tiny_family_dir, tmp_path):
    family = tmp_path / "family"
    shutil.copytree(tiny_family_dir, family)
    _point(family, lambda m: m["members"][1].update(width=0.5))  # the file holds a 0.25-wide member
    with pytest.raises(ManifestError, match=r"does not fit member 'edge-a' .* first mismatched key 'backbone"):
        FamilyStore.open(family).load_member("edge-a")


# --------------------------------------------------------------------------------------- space id (5)


SAVE = """
import sys, torch
from hetero.family import save_weights
torch.manual_seed(0)
tensors = {f"layer{i}.weight": torch.randn(4, 4) for i in range(6)}
save_weights(__import__("pathlib").Path(sys.argv[1]), tensors, {"member": "cloud", "family": "tiny", "z": 1, "a": 2})
"""


def test_same_weights_give_the_same_bytes_and_digest_in_any_process(tmp_path):
    """Metadata key order once depended on the process (hash seed); now one canonical key is written."""
    for seed in ("1", "2", "3"):
        subprocess.run([sys.executable, "-c", SAVE, str(tmp_path / f"{seed}.safetensors")], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
    assert len({sha256_file(tmp_path / f"{seed}.safetensors") for seed in "123"}) == 1
    tensors = {"b": torch.ones(2), "a": torch.arange(3.0)}
    assert tensors_digest(tensors) == tensors_digest(dict(reversed(tensors.items())))
    assert tensors_digest(tensors) != tensors_digest({"b": torch.ones(2), "a": torch.arange(3.0) + 1e-7})


def test_space_id_depends_on_the_weights_not_on_the_checkpoint_bytes(tmp_path):
    config = parse_config(yaml.safe_load(write_config(tmp_path / "c.yaml").read_text()), "c")
    first = train(config, tmp_path / "a", progress=False)
    cloud = first.load_member("cloud").state_dict()
    save_weights(tmp_path / "b.safetensors", dict(reversed(cloud.items())), {"other": "metadata"})
    assert sha256_file(tmp_path / "b.safetensors") != first.cloud.checkpoint.sha256
    from hetero.family import read_weights, space_id

    again = read_weights(tmp_path / "b.safetensors", "copy")[0]
    assert space_id("tiny", 1, 32, tensors_digest(again)) == first.space_id


# ---------------------------------------------------------------------------------- training state (6)


def test_training_state_is_one_file_and_resume_checks_it(tmp_path, capsys):
    config_path = write_config(tmp_path / "c.yaml", epochs=2)
    out = tmp_path / "out"
    assert main(["train", str(config_path), "--out", str(out), "--resume", "--quiet"]) == 2
    assert "nothing to resume" in said(capsys) and not out.exists()

    config = parse_config(yaml.safe_load(config_path.read_text()), "c")
    with pytest.raises(KeyboardInterrupt):
        train(config, out, progress=False, callbacks=[crash_after(1)])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["train_state.safetensors"]

    changed = yaml.safe_load(config_path.read_text())
    changed["train"]["lr"] = 0.1
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    saved = (out / CONFIG).read_bytes()
    assert main(["train", str(tmp_path / "changed.yaml"), "--out", str(out), "--resume", "--quiet"]) == 2
    message = said(capsys)
    assert "--resume with a changed config" in message and "train.lr: 0.005 -> 0.1" in message
    assert (out / CONFIG).read_bytes() == saved  # refused before anything was written

    state = out / TRAIN_STATE
    state.write_bytes(state.read_bytes()[:100])  # a damaged state
    assert main(["train", str(config_path), "--out", str(out), "--resume", "--quiet"]) == 2
    assert "not a readable safetensors file" in said(capsys)


def test_resume_continues_with_a_changed_worker_count(tmp_path):
    config_path = write_config(tmp_path / "c.yaml")
    config = parse_config(yaml.safe_load(config_path.read_text()), "c")
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "out", progress=False, callbacks=[crash_after(1)])
    changed = yaml.safe_load(config_path.read_text())
    changed["train"]["workers"] = 1  # does not change the weights, so the run may continue
    store = train(parse_config(changed, "c"), tmp_path / "out", resume=True, progress=False)
    assert store.manifest.training.epochs == 2


SLOW_TRAIN = """
import sys, time
from pathlib import Path
from hetero.config import load_config
from hetero.training import train

def pause(end):  # a long epoch: the other writer arrives while this one trains
    if end.epoch == 1:
        Path(sys.argv[3]).write_text("epoch 1 done")
        time.sleep(8)

train(load_config(sys.argv[1]), sys.argv[2], progress=False, callbacks=[pause])
"""


def test_two_trains_into_one_directory_one_is_refused_and_config_matches_the_weights(tmp_path):
    config_path = write_config(tmp_path / "c.yaml")
    other = write_config(tmp_path / "other.yaml", seed=5)
    out, signal_file = tmp_path / "out", tmp_path / "started"
    first = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, str(config_path), str(out), str(signal_file)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not signal_file.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert main(["train", str(other), "--out", str(out), "--quiet"]) == 2
    assert first.wait(timeout=120) == 0, first.stdout.read()
    assert yaml.safe_load((out / CONFIG).read_text())["train"]["seed"] == 0  # the config of these weights
    assert FamilyStore.open(out).manifest.training.epochs == 2
