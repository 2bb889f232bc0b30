"""A model file that carries a pickle payload never runs it: not at train time without the user's word, and
never again from the family, a gallery or a bundle made from it.

The hostile file is a real ``torch.export`` program whose sample-inputs entry is a pickle that touches a
marker file and then returns valid sample inputs, so the program loads and runs as if nothing happened.
"""
from __future__ import annotations

import builtins
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from hetero.cli import main
from hetero.external import external_space_id, fingerprint, open_external
from hetero.family import FamilyStore
from hetero.files import sha256_file
from tests.test_external import byo_config, unlabeled_images  # noqa: F401  (fixture)


class Payload:
    """Unpickling this touches `marker`, then evaluates to `value` (an expression)."""

    def __init__(self, marker: Path, value: str):
        self.marker, self.value = marker, value

    def __reduce__(self):
        return builtins.eval, (f"(__import__('pathlib').Path({str(self.marker)!r}).touch(), {self.value})[1]",)


def hostile_program(model: torch.nn.Module, path: Path, marker: Path, size: int = 32) -> Path:
    batch = {"images": {0: torch.export.Dim("batch", min=2, max=1024)}}
    torch.export.save(torch.export.export(model.eval(), (torch.rand(2, 3, size, size),), dynamic_shapes=batch),
                      str(path))
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    sample = next(name for name in entries if name.endswith("sample_inputs/model.pt"))
    buffer = io.BytesIO()
    torch.save(Payload(marker, f"((__import__('torch').rand(2, 3, {size}, {size}),), {{}})"), buffer)
    entries[sample] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def hostile(tiny_family_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(a torch.export file of the tiny family's cloud carrying a payload, the marker the payload touches)."""
    work = tmp_path_factory.mktemp("hostile")
    marker = work / "PAYLOAD-RAN"
    path = hostile_program(FamilyStore.open(tiny_family_dir).load_member("cloud"), work / "cloud.pt2", marker)
    open_external(path, None, 32, None, None, None, trusted=True)  # hostile for real: opening it runs the payload
    assert marker.exists()
    marker.unlink()
    return path, marker


def config_file(folder: Path, cloud: Path, images: Path, trusted: bool | None) -> Path:
    config = byo_config(cloud, images, epochs=1)
    config["family"]["members"] = config["family"]["members"][:2]
    config["family"]["members"][0]["input_size"] = 32  # a .pt2 does not state it
    if trusted is not None:
        config["family"]["members"][0]["trust_model_file"] = trusted
    path = folder / f"config-{trusted}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def converted_family(hostile, unlabeled_images, tmp_path_factory) -> Path:  # noqa: F811
    """A family trained from the hostile file with `trust_model_file: true`: the payload ran once, then."""
    cloud, marker = hostile
    work = tmp_path_factory.mktemp("converted")
    assert main(["train", str(config_file(work, cloud, unlabeled_images, True)), "--out", str(work / "fam"),
                 "--quiet"]) == 0
    assert marker.exists()  # the user vouched for the file: converting it opened it
    marker.unlink()
    assert main(["eval", str(work / "fam")]) == 0
    assert not marker.exists()
    return work / "fam"


@pytest.mark.parametrize("trusted", [None, False])
def test_a_pickled_cloud_is_refused_unread_without_the_users_word(hostile, unlabeled_images, tmp_path, capsys,  # noqa: F811
                                                                  trusted):
    cloud, marker = hostile
    out = tmp_path / "fam"
    assert main(["train", str(config_file(tmp_path, cloud, unlabeled_images, trusted)), "--out", str(out)]) == 2
    said = " ".join("".join(capsys.readouterr()).split())
    assert "cloud.pt2: a torch.export file loads through pickle" in said and "trust_model_file: true" in said
    assert not marker.exists()
    assert not (out / "manifest.json").exists()


def test_the_family_keeps_only_a_parity_checked_onnx_conversion(converted_family, hostile, tiny_family_dir):
    cloud_file, _ = hostile
    store = FamilyStore.open(converted_family)
    cloud = store.cloud
    assert (cloud.kind, cloud.arch, cloud.converted_from) == ("external", "onnx",
                                                            {"file": "cloud.pt2", "format": "torch.export"})
    assert cloud.checkpoint.file.endswith(".onnx")
    assert not list(converted_family.rglob("*.pt2")) and not list(converted_family.rglob("*.pt"))
    # The space is the original file's: another family trained on the same file shares its gallery.
    assert store.space_id == external_space_id(fingerprint(cloud_file, "torch.export"),
                                               store.load_member("cloud").preprocessing, 32)
    # The conversion answers like the model it came from.
    test = FamilyStore.open(tiny_family_dir).split().test.floats()[:16]
    original = FamilyStore.open(tiny_family_dir).load_member("cloud")
    with torch.no_grad():
        cosine = (store.load_member("cloud")(test) * original(test)).sum(1)
    assert cosine.min() > 0.9999


def gallery_images(store: FamilyStore, folder: Path) -> Path:
    folder.mkdir()
    test = store.split().test
    for index in range(8):
        Image.fromarray(test.images[index].permute(1, 2, 0).numpy()).save(folder / f"g{index}.png")
    return folder


def plugin(family: Path, work: Path) -> subprocess.CompletedProcess:
    work.mkdir()
    (work / "pytest.ini").write_text("[pytest]\n")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "hetero.pytest_plugin", "-p", "no:cacheprovider",
                           "-q", "--hetero-family", str(family), "--hetero-latency-runs", "1"],
                          cwd=work, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_no_entry_point_runs_the_file_again(converted_family, hostile, tmp_path):
    _, marker = hostile
    family = tmp_path / "fam"
    shutil.copytree(converted_family, family)
    store = FamilyStore.open(family)
    images = gallery_images(store, tmp_path / "photos")
    assert main(["eval", str(family)]) == 0
    assert main(["gallery", "build", str(family), "--images", str(images)]) == 0
    assert main(["export", str(family), "--profile", "server-onnx-fp32"]) == 0
    assert main(["verify", str(family), "--latency-runs", "1", "--bundle", str(tmp_path / "mac.zip")]) in (0, 1)
    assert main(["verify", "--bundle", str(tmp_path / "mac.zip"), "--latency-runs", "1"]) in (0, 1)
    done = plugin(family, tmp_path / "ci")
    assert " passed" in done.stdout, done.stdout + done.stderr
    assert not marker.exists()


def doctored(converted_family: Path, cloud_file: Path, target: Path) -> Path:
    """The family as a hostile author hands it over: the cloud is the pickled file, its record says so."""
    shutil.copytree(converted_family, target)
    manifest = json.loads((target / "manifest.json").read_text())
    cloud = next(m for m in manifest["members"] if m["role"] == "cloud")
    (target / cloud["checkpoint"]["file"]).unlink()
    shutil.copy(cloud_file, target / "checkpoints" / "cloud.pt2")
    cloud.update(arch="torch.export", converted_from=None,
                 checkpoint={"file": "checkpoints/cloud.pt2", "sha256": sha256_file(target / "checkpoints/cloud.pt2")})
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.mark.slow
def test_a_family_holding_a_pickled_cloud_is_refused_at_every_entry(converted_family, hostile, tmp_path, capsys):
    cloud_file, marker = hostile
    family = doctored(converted_family, cloud_file, tmp_path / "handed-over")
    images = gallery_images(FamilyStore.open(family), tmp_path / "photos")
    assert main(["export", str(family), "--profile", "server-onnx-fp32"]) == 0  # the edges only: cloud unread
    for argv in (["eval", str(family)], ["gallery", "build", str(family), "--images", str(images)],
                 ["verify", str(family)]):
        assert main(argv) == 2, argv
        said = " ".join("".join(capsys.readouterr()).split())
        assert "cloud.pt2: member 'cloud' is a torch.export file" in said and "never opens one" in said, argv
    done = plugin(family, tmp_path / "ci")
    assert "never opens one" in done.stdout + done.stderr and " passed" not in done.stdout
    assert not marker.exists()


def test_a_bundle_whose_artifact_is_a_pickled_file_does_not_run_it(converted_family, hostile, tmp_path):
    from hetero.verify.bundle import verify_bundle

    cloud_file, marker = hostile
    family = tmp_path / "fam"
    shutil.copytree(converted_family, family)
    assert main(["export", str(family), "--profile", "server-onnx-fp32", "--member", "edge-a"]) == 0
    assert main(["verify", str(family), "--latency-runs", "1", "--bundle", str(tmp_path / "b.zip")]) in (0, 1)
    swapped = tmp_path / "swapped.zip"
    with zipfile.ZipFile(tmp_path / "b.zip") as old, zipfile.ZipFile(swapped, "w") as new:
        for name in old.namelist():
            new.writestr(name, cloud_file.read_bytes() if name.endswith("edge-a.onnx") else old.read(name))
    report = verify_bundle(swapped, latency_runs=1)
    assert not report["passed"]
    assert not marker.exists()
