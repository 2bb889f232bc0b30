"""Backward-compatible updates: a new family trained against an earlier family's frozen cloud."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from hetero.cli import main
from hetero.config import ConfigError, parse_config
from hetero.data import load_split
from hetero.errors import ManifestError
from hetero.evaluate import evaluate
from hetero.maths import negative_flip_rate, retrieval_metrics
from hetero.family import TRAIN_STATE, FamilyStore, read_weights
from hetero.models import embed_images
from hetero.training import Family, family_loss, train
from tests.conftest import tiny_config

# The update: a wider cloud, another seed, the same dimension.
NEW_CLOUD = {"name": "cloud", "role": "cloud", "arch": "resnet", "width": 0.75, "depth": 0.5, "input_size": 32}


def update_config(previous, **train):
    data = tiny_config(seed=1, **train)
    data["family"]["members"][0] = NEW_CLOUD
    if previous is not None:
        data["train"].update(mode="backward", previous=str(previous))
    return parse_config(data, "update.yaml")


def test_negative_flip_rate_counts_only_regressions():
    old = torch.tensor([True, True, False, False])
    new = torch.tensor([True, False, True, False])
    assert negative_flip_rate(old, new) == 0.25


def test_backward_mode_needs_an_earlier_family(tmp_path):
    data = tiny_config(mode="backward")
    with pytest.raises(ConfigError, match=r"train\.previous: mode 'backward' needs"):
        parse_config(data, "update.yaml")
    data["train"]["previous"] = str(tmp_path)
    with pytest.raises(ConfigError, match=r"train\.previous .*no family manifest here"):
        train(parse_config(data, "update.yaml"), tmp_path / "out", progress=False)


def test_backward_update_must_keep_the_dimension(tiny_family_dir, tmp_path):
    data = tiny_config(mode="backward", previous=str(tiny_family_dir))
    data["family"]["embedding_dim"] = 16
    with pytest.raises(ConfigError, match=r"train\.previous .*embedding_dim is 32, this family's is 16"):
        train(parse_config(data, "update.yaml"), tmp_path, progress=False)


def test_backward_gradients_reach_every_new_member_never_the_old_cloud(tiny_family_dir):
    config = update_config(tiny_family_dir)
    family = Family(config, num_classes=8, mean=[0.5] * 3, std=[0.25] * 3)
    family.previous = FamilyStore.open(tiny_family_dir).load_member("cloud").requires_grad_(False)
    images, labels = torch.rand(16, 3, 32, 32), torch.arange(16) % 8
    loss, parts = family_loss(family, list(family.members), images, labels, detach_cloud=True)
    loss.backward()
    assert {"cloud/regression", "edge-a/regression", "edge-b/contrastive"} <= parts.keys()  # the new cloud too
    for name, param in family.members.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in family.previous.parameters())


@pytest.mark.slow
def test_backward_update_serves_the_old_gallery(tiny_family_dir, tmp_path, capsys):
    """The new family's queries work against the old cloud's gallery; the same family trained alone does not."""
    snapshots = {}

    def snapshot(end):
        snapshots[end.epoch] = {k[6:]: v for k, v in read_weights(end.out / TRAIN_STATE, "state")[0].items()
                                if k.startswith("model.")}

    old_dir = tmp_path / "old"
    shutil.copytree(tiny_family_dir, old_dir)
    store = train(update_config(old_dir), tmp_path / "update", progress=False, callbacks=[snapshot])
    old_store = FamilyStore.open(old_dir)
    assert store.space_id == old_store.space_id  # inherited: the old gallery stays valid
    assert store.manifest.previous.space_id == old_store.space_id
    shutil.rmtree(old_dir)  # the update keeps its own copy of the old cloud: nothing outside is read again
    report = evaluate(FamilyStore.open(tmp_path / "update"))
    old_cloud = load_file(str(tiny_family_dir / "checkpoints" / "cloud.safetensors"))
    first, last = snapshots[1], snapshots[max(snapshots)]
    for key, value in old_cloud.items():  # the old cloud and the shared head never move
        assert torch.equal(last[f"previous.{key}"], value), key
    assert torch.equal(first["heads.shared.loss.W"], last["heads.shared.loss.W"])

    backward = report["backward"]
    chance = report["chance_top1"]
    assert backward["old_cloud"] == "old:cloud" and "old:cloud" in report["matrix"]["edge-a"]
    assert backward["new_vs_old_top1"] > 6 * chance
    assert backward["new_vs_old_top1"] > 0.7 * backward["old_vs_old_top1"]
    assert backward["negative_flip_rate"] < 0.3
    for edge in ("edge-a", "edge-b"):
        assert backward["edges_vs_old_top1"][edge] > 6 * chance
    assert main(["eval", str(tmp_path / "update")]) == 0
    printed = capsys.readouterr().out
    assert "Backward compatibility" in printed and f"{backward['new_vs_old_top1']:.3f}" in printed

    # Without backward mode the same update lands in a space of its own: at chance against the old gallery.
    alone = train(update_config(None), tmp_path / "alone", progress=False)
    split = load_split(update_config(None).data, 32)
    images, labels = split.test.floats(), split.test.labels
    q, g = split.query_index, split.gallery_index
    new = embed_images(alone.load_member("cloud"), images)
    old = embed_images(FamilyStore.open(tiny_family_dir).load_member("cloud"), images)
    unrelated = retrieval_metrics(new[q], labels[q], old[g], labels[g])["top1"]
    assert unrelated < 3 * chance
    assert backward["new_vs_old_top1"] > unrelated + 0.2


def test_a_tampered_copy_of_the_earlier_cloud_is_refused(tiny_family_dir, tmp_path):
    store = train(update_config(tiny_family_dir, epochs=1), tmp_path / "update", progress=False)
    copy = tmp_path / "update" / store.manifest.previous.checkpoint.file
    copy.write_bytes(copy.read_bytes()[:-8] + bytes(8))
    with pytest.raises(ManifestError, match="sha256 .* does not match"):
        evaluate(store)
