"""Joint training: determinism, resume, frozen members in sequential mode, and compatibility that works."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hetero.config import parse_config
from hetero.data import load_split
from hetero.errors import ConfigError, TrainingError
from hetero.family import TRAIN_STATE, FamilyStore, read_weights
from hetero.files import sha256_file
from hetero.training import Family, cutmix, dihedral, family_loss, matching_inputs, mixup, train
from tests.conftest import crash_after, tiny_config

FAST = {"epochs": 2}


def small_config(**train):
    data = tiny_config(**{**FAST, **train})
    data["data"].update(num_classes=24, samples_per_class=6)
    return parse_config(data, "tiny")


def weights(run_dir, member):
    return load_file(str(run_dir / "checkpoints" / f"{member}.safetensors"))


def assert_same_weights(a, b):
    # Same seed, same batches, same arithmetic; the tolerance only absorbs float rounding when the machine's
    # thread scheduling reorders a reduction (seen intermittently on a loaded 2-core host).
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5, msg=key)


def test_same_seed_same_family(tmp_path):
    train(small_config(), tmp_path / "a", progress=False)
    train(small_config(), tmp_path / "b", progress=False)
    for member in ("cloud", "edge-a", "edge-b"):
        assert_same_weights(weights(tmp_path / "a", member), weights(tmp_path / "b", member))


def test_resumed_run_equals_uninterrupted_and_keeps_the_space_id(tmp_path):
    straight = train(small_config(), tmp_path / "straight", progress=False)

    with pytest.raises(KeyboardInterrupt):
        train(small_config(), tmp_path / "resumed", progress=False, callbacks=[crash_after(1)])
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    resumed = train(small_config(), tmp_path / "resumed", resume=True, progress=False)
    assert resumed.manifest.training.epochs == 4  # sequential: 2 epochs of the cloud, then 2 of the edges
    for member in ("cloud", "edge-a", "edge-b"):
        assert_same_weights(weights(tmp_path / "straight", member), weights(tmp_path / "resumed", member))
    # The space id depends on the cloud's weights, not on how a process laid out the checkpoint's bytes.
    if all(torch.equal(weights(tmp_path / "straight", "cloud")[k], v)
           for k, v in weights(tmp_path / "resumed", "cloud").items()):
        assert resumed.space_id == straight.space_id


def test_manifest_records_members_files_and_space(tmp_path):
    store = train(small_config(), tmp_path, progress=False)
    assert FamilyStore.open(tmp_path).manifest == store.manifest
    members = {m.name: m for m in store.members}
    assert members["cloud"].flops_vs_cloud == 1.0
    assert 0 < members["edge-a"].flops < members["cloud"].flops
    assert members["edge-b"].flops < members["edge-a"].flops  # same width, smaller input
    for member in members.values():
        assert sha256_file(tmp_path / member.checkpoint.file) == member.checkpoint.sha256
    assert store.space_id.startswith("hs-")
    # nothing is pickled: checkpoints and the training state (one file) are safetensors
    assert read_weights(tmp_path / TRAIN_STATE, "state")[1]["epoch"] == 4  # 2 phases


def test_joint_loss_reaches_every_member_and_the_shared_head():
    config = small_config()
    family = Family(config, num_classes=8, mean=[0.5] * 3, std=[0.25] * 3)
    images, labels = torch.rand(16, 3, 32, 32), torch.arange(16) % 8
    loss, parts = family_loss(family, list(family.members), images, labels, detach_cloud=True)
    loss.backward()
    assert {"edge-a/contrastive", "edge-a/relational", "cloud/cls"} <= parts.keys()
    for name, param in family.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_cloud_and_head_start_the_same_whatever_the_edge_members():
    """Recipes that differ only in their edges share the cloud, so their rows compare edges alone."""
    data = tiny_config()
    data["family"]["members"][1] = {"name": "edge-a", "role": "edge", "arch": "mobilenet", "input_size": 32}
    data["family"]["members"].pop(2)
    a = Family(small_config(), num_classes=8, mean=[0.5] * 3, std=[0.25] * 3).state_dict()
    b = Family(parse_config(data, "tiny"), num_classes=8, mean=[0.5] * 3, std=[0.25] * 3).state_dict()
    shared = [k for k in a if k.startswith(("members.cloud.", "heads."))]
    assert shared and all(torch.equal(a[k], b[k]) for k in shared)
    other_seed = Family(small_config(seed=1), num_classes=8, mean=[0.5] * 3, std=[0.25] * 3).state_dict()
    assert not torch.equal(a["heads.shared.loss.W"], other_seed["heads.shared.loss.W"])


def test_bf16_autocast_and_channels_last_keep_the_fp32_loss():
    """bf16 autocast (members only; losses stay float32) and channels-last give the fp32 loss to bf16's precision."""
    family = Family(small_config(), num_classes=8, mean=[0.5] * 3, std=[0.25] * 3)
    images, labels = torch.rand(16, 3, 32, 32), torch.arange(16) % 8
    mixed = mixup(images)
    reference, _ = family_loss(family, list(family.members), images, labels, True, mixed=mixed, mixed_matching=1.0)
    family.to(memory_format=torch.channels_last)
    family.amp = True
    assert family.embed(family.cloud, images).dtype == torch.float32
    images, mixed = (t.contiguous(memory_format=torch.channels_last) for t in (images, mixed))
    fast, _ = family_loss(family, list(family.members), images, labels, True, mixed=mixed, mixed_matching=1.0)
    assert fast.dtype == torch.float32
    assert fast.item() == pytest.approx(reference.item(), rel=0.03)


def test_bf16_is_automatic_only_where_the_hardware_computes_it(tmp_path, monkeypatch):
    from hetero.training import accelerations, plumbing

    cpu = torch.device("cpu")
    monkeypatch.setattr(plumbing, "cpu_has_native_bf16", lambda: False)
    assert accelerations(small_config().train, cpu) == (False, False)
    assert accelerations(small_config(amp="bf16", channels_last="on").train, cpu) == (True, True)
    monkeypatch.setattr(plumbing, "cpu_has_native_bf16", lambda: True)
    assert accelerations(small_config().train, cpu) == (True, False)
    assert accelerations(small_config(amp="off").train, cpu) == (False, False)
    training = train(small_config(epochs=1, amp="off"), tmp_path, progress=False).manifest.training
    assert training.amp_bf16 is False and training.device == "cpu"


def test_mixed_matching_trains_edges_on_label_free_terms_only():
    config = small_config()
    family = Family(config, num_classes=8, mean=[0.5] * 3, std=[0.25] * 3)
    images, labels = torch.rand(16, 3, 32, 32), torch.arange(16) % 8
    family.members["cloud"].eval()  # the edge phase of sequential mode
    plain, _ = family_loss(family, ["edge-a"], images, labels, detach_cloud=True)
    mixed = mixup(images)
    assert not torch.equal(mixed, images) and mixed.min() >= 0 and mixed.max() <= 1
    loss, parts = family_loss(family, ["edge-a"], images, labels, detach_cloud=True, mixed=mixed, mixed_matching=1.0)
    assert {"edge-a/mixed-regression", "edge-a/mixed-relational"} <= parts.keys()
    assert "edge-a/mixed-contrastive" not in parts  # mixed images have no single label
    mixed = 5.0 * parts["edge-a/mixed-relational"] + 20.0 * parts["edge-a/mixed-regression"]
    assert loss.item() == pytest.approx(plain.item() + mixed, rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in family.members["cloud"].parameters())
    assert all(p.grad is not None for p in family.members["edge-a"].parameters())


def test_edge_classification_weighs_the_shared_head_but_never_an_independent_member():
    images, labels = torch.rand(16, 3, 32, 32), torch.arange(16) % 8
    for compat in ("shared", "none"):
        config = small_config(compat=compat, edge_classification=0.0, losses={"regression": 1.0})
        family = Family(config, num_classes=8, mean=[0.5] * 3, std=[0.25] * 3)
        loss, parts = family_loss(family, ["edge-a"], images, labels, True, edge_classification=0.0)
        expected = parts["edge-a/cls"] if compat == "none" else parts["edge-a/regression"]
        assert loss.item() == pytest.approx(expected, rel=1e-5), compat


def _dihedral_views(image):
    turns = [torch.rot90(image, k, dims=(-2, -1)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


def test_matching_inputs_lie_off_the_training_images_yet_are_made_of_them():
    torch.manual_seed(0)
    images = torch.rand(32, 3, 12, 12)
    # cutmix: every pixel comes from the image itself or from one partner image of the batch
    pasted = cutmix(images)
    for i in range(len(images)):
        own = (pasted[i] == images[i]).all(dim=0)
        partners = [j for j in range(len(images)) if (pasted[i][:, ~own] == images[j][:, ~own]).all()]
        assert own.all() or partners
    assert sum(not torch.equal(pasted[i], images[i]) for i in range(len(images))) > len(images) // 2
    # dihedral: each image is one of the 8 rotations/reflections of itself, and not always the identity
    turned = dihedral(images)
    assert all(any(torch.equal(turned[i], v) for v in _dihedral_views(images[i])) for i in range(len(images)))
    assert sum(torch.equal(turned[i], images[i]) for i in range(len(images))) < len(images) // 2
    both = matching_inputs(images, ["mixup", "cutmix"])
    is_cut = torch.stack([((both[i] == images[i]).all(dim=0)).any() for i in range(len(images))])
    assert 0 < is_cut.sum() < len(images)  # some images cut, others blended
    assert torch.equal(matching_inputs(images, []), images)


def test_cloud_phase_never_sees_mixed_images():
    """Alone, the cloud has no student to match: mixed images must not reach it (nor its BatchNorm statistics)."""
    family = Family(small_config(), num_classes=8, mean=[0.5] * 3, std=[0.25] * 3)
    images, labels = torch.rand(16, 3, 32, 32), torch.arange(16) % 8
    before = {k: v.clone() for k, v in family.members["cloud"].state_dict().items()}
    family_loss(family, ["cloud"], images, labels, True)
    plain = {k: v.clone() for k, v in family.members["cloud"].state_dict().items()}
    family.members["cloud"].load_state_dict(before)
    _, parts = family_loss(family, ["cloud"], images, labels, True, mixed=mixup(images), mixed_matching=1.0)
    assert not any("mixed" in key for key in parts)
    assert all(torch.equal(plain[k], v) for k, v in family.members["cloud"].state_dict().items())


def test_sequential_mode_never_updates_the_frozen_cloud_or_head(tmp_path):
    snapshots = {}

    def snapshot(end):  # the epoch's checkpointed state, as a callback sees it
        snapshots[end.epoch] = {k[6:]: v for k, v in read_weights(end.out / TRAIN_STATE, "state")[0].items()
                                if k.startswith("model.")}

    train(small_config(mode="sequential", epochs=1), tmp_path, progress=False, callbacks=[snapshot])
    after_cloud_phase, final = snapshots[1], snapshots[2]
    for key in final:
        if key.startswith(("members.cloud.", "heads.")):
            assert torch.equal(after_cloud_phase[key], final[key]), key
    changed = [k for k in final if k.startswith("members.edge-a.") and not torch.equal(after_cloud_phase[k], final[k])]
    assert changed, "edge members must learn in the second phase"


@pytest.mark.slow
def test_compatibility_loss_makes_edge_queries_work_against_the_cloud_gallery(tmp_path, tiny_family_dir):
    """Independent members are at chance against each other; the shared recipe is far above it."""
    from hetero.evaluate import evaluate

    independent = evaluate(train(parse_config(tiny_config(compat="none"), "tiny"), tmp_path, progress=False))
    joint = json.loads((tiny_family_dir / "report.json").read_text())
    chance = joint["chance_top1"]
    for edge in ("edge-a", "edge-b"):
        assert independent["edges"][edge]["edge_vs_cloud_top1"] < 3 * chance
        assert joint["edges"][edge]["edge_vs_cloud_top1"] > 6 * chance
        assert joint["edges"][edge]["edge_vs_cloud_top1"] > independent["edges"][edge]["edge_vs_cloud_top1"] + 0.2


def test_split_used_for_training_excludes_test_classes():
    split = load_split(small_config().data, 32)
    assert not set(split.train.class_names) & set(split.test.class_names)


def test_a_frozen_cloud_embeds_batch_and_matching_inputs_in_one_forward_with_the_same_loss():
    # The edge phase runs the frozen cloud once on images + matching inputs; the loss must equal the one
    # computed from the cloud's separate embeddings of each (handed in as a teacher cache would).
    config = small_config()
    family = Family(config, num_classes=8, mean=[0.5] * 3, std=[0.25] * 3)
    images, labels = torch.rand(16, 3, 32, 32), torch.arange(16) % 8
    family.members["cloud"].eval()
    mixed = mixup(images)
    with torch.no_grad():
        separate = (family.embed(family.cloud, images), family.embed(family.cloud, mixed))
    batched, parts = family_loss(family, ["edge-a", "edge-b"], images, labels, True, 0.0, mixed, 1.0)
    given, given_parts = family_loss(family, ["edge-a", "edge-b"], images, labels, True, 0.0, mixed, 1.0, separate)
    assert batched.item() == pytest.approx(given.item(), rel=1e-5)
    assert parts.keys() == given_parts.keys() and "edge-b/mixed-regression" in parts


def test_batched_augmentation_draws_within_the_ranges_and_is_seeded():
    from hetero.augment import AFFINE, TrainImages, random_affine_params

    params = random_affine_params(4000, affine=True, hflip=True)
    bounds = [AFFINE["degrees"], AFFINE["translate"], AFFINE["translate"], None, AFFINE["shear"]]
    for column, bound in enumerate(bounds):
        if bound is not None:
            assert params[:, column].abs().max() <= bound and params[:, column].abs().max() > 0.9 * bound
    assert AFFINE["scale"][0] <= params[:, 3].min() and params[:, 3].max() <= AFFINE["scale"][1]
    assert 0.45 < params[:, 5].mean() < 0.55
    assert (random_affine_params(5, affine=False, hflip=False) == torch.tensor([0, 0, 0, 1.0, 0, 0])).all()

    split = load_split(small_config().data, 32)
    dataset = TrainImages(split.train, batched=True)
    items = [dataset[i] for i in range(8)]
    assert items[0][0].dtype == torch.uint8  # the warp happens in collate, for the whole batch at once
    torch.manual_seed(3)
    first, labels = dataset.collate(items)
    torch.manual_seed(3)
    again, _ = dataset.collate(items)
    assert first.dtype == torch.float32 and first.shape == (8, 3, 32, 32) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, again) and torch.equal(labels, split.train.labels[:8])
    assert not torch.equal(first, split.train.images[:8].float() / 255)  # augmented, not passed through


def test_the_profile_splits_a_step_into_each_members_forward_backward_and_the_data(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from train_profile import profile_phase

    from hetero.training import TrainingRun

    config = small_config(matching_inputs=["mixup", "dihedral"])
    run = TrainingRun(config, tmp_path, load_split(config.data, config.load_size), progress=False)
    parts, profiled, _ = profile_phase(run, 1, ["edge-a", "edge-b"], steps=2, warmup=1)
    for part in ("edge-a forward", "edge-b forward", "edge-a backward (of its forward)",
                 "edge-b backward (of its forward)", "cloud forward (targets)", "decode + augment (loader)",
                 "matching inputs", "optimizer"):
        assert parts[part] > 0, part
    assert "cloud backward (of its forward)" not in parts  # a frozen cloud has no backward pass
    assert sum(parts.values()) <= profiled * 1.05


# ------------------------------------------------------------------------------- what cannot train (issue 31)


@pytest.mark.parametrize("train_overrides, words", [
    ({"batch_size": 4096}, r"train\.batch_size: 4096, but there are 96 training images; at most 96"),
    ({"batch_size": 80}, r"train\.batch_size: 80 would hold 20 classes .* 16 classes; at most 64"),
    ({"batch_size": 100_000, "samples_per_class": 100_000},
     r"train\.samples_per_class: 100000, but the largest training class has 6 images; at most 6"),
])
def test_batches_the_training_data_cannot_fill_are_refused_at_their_key(tmp_path, train_overrides, words):
    with pytest.raises(ConfigError, match=words):
        train(small_config(**train_overrides), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _assert_nothing_non_finite_written(out):
    assert not (out / "manifest.json").exists() and not list(out.glob("checkpoints/*-*.safetensors"))
    if (out / TRAIN_STATE).exists():  # epochs before the divergence, all finite
        tensors, _ = read_weights(out / TRAIN_STATE, "state")
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_a_diverging_run_stops_with_its_epoch_and_writes_no_nan(tmp_path, capsys):
    import yaml

    from hetero.cli import main

    path = tmp_path / "c.yaml"
    data = tiny_config(**{**FAST, "epochs": 3, "mode": "joint", "lr": 1e12})
    data["data"].update(num_classes=24, samples_per_class=6)
    path.write_text(yaml.safe_dump(data))
    assert main(["train", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    said = " ".join(capsys.readouterr().out.split())
    assert "error: epoch " in said and "the training diverged" in said and "lower train.lr" in said
    _assert_nothing_non_finite_written(tmp_path / "out")


@pytest.mark.parametrize("overrides, words", [
    ({}, r"epoch 1: the external cloud member 'cloud' \(.*nan\.safetensors\) returns NaN"),
    ({"teacher_cache": {"views": 1}},
     r"epoch 1, cloud member 'cloud': .*teacher_cache: the cloud returns NaN or infinite embeddings"),
])
def test_a_frozen_cloud_that_returns_nan_stops_training_by_name(tmp_path, overrides, words):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    weights = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
               for k, v in timm.create_model("test_resnet", num_classes=32).state_dict().items()}
    save_file(weights, str(tmp_path / "nan.safetensors"))
    data = tiny_config(**{**FAST, **overrides})
    data["data"].update(num_classes=24, samples_per_class=6)
    data["family"]["members"][0] = {"name": "cloud", "role": "cloud", "arch": "timm/test_resnet", "frozen": True,
                                    "weights": str(tmp_path / "nan.safetensors"), "input_size": 32,
                                    "mean": [0.5] * 3, "std": [0.25] * 3}
    with pytest.raises(TrainingError, match=words):
        train(parse_config(data, "nan-cloud"), tmp_path / "out", progress=False)
    _assert_nothing_non_finite_written(tmp_path / "out")


@pytest.mark.parametrize("where", ["given", "default"])
def test_a_teacher_cache_dir_that_is_a_file_is_refused_before_the_cloud_trains(tmp_path, where):
    """The cache is opened when the edge phase starts; a file in its place must not cost the cloud's epochs."""
    import re

    out = tmp_path / "out"
    cache = tmp_path / "cache" if where == "given" else out / "teacher_cache"
    cache.parent.mkdir(exist_ok=True)
    cache.write_text("not a folder")
    config = small_config(epochs=1, teacher_cache={"views": 1, **({"dir": str(cache)} if where == "given" else {})})
    finished = []
    with pytest.raises(ConfigError, match=rf"train\.teacher_cache\.dir {re.escape(str(cache))}: is a file; give a "
                                          rf"directory"):
        train(config, out, progress=False, callbacks=[finished.append])
    assert finished == [] and not (out / TRAIN_STATE).exists()
    assert cache.read_text() == "not a folder"
