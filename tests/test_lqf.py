"""mode: lqf, linearised fine-tuning of a trained family, and the leaky-ReLU variant of the architectures."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hetero.config import ConfigError, parse_config
from hetero.evaluate import evaluate
from hetero.family import FamilyStore
from hetero.training.lqf import Linearised, check_linearisable, kfac_parameters, load_linearised
from hetero.models import Embedder
from hetero.training import train
from tests.conftest import tiny_config


def small_member(arch: str = "resnet", activation: str = "leaky_relu") -> Embedder:
    torch.manual_seed(0)
    return Embedder(arch, 0.25, 0.5, 16, 24, activation=activation).eval()


def lqf_config(previous, **overrides) -> dict:
    """An update of the tiny family on 12 new procedural classes (another seed), 2 CG iterations."""
    data = tiny_config(mode="lqf", previous=str(previous), epochs=2, batch_size=48, samples_per_class=4, **overrides)
    data["data"].update(num_classes=18, samples_per_class=6, split_seed=7)
    return data


@pytest.mark.parametrize("arch", ["resnet", "mobilenet"])
def test_leaky_relu_variant_has_no_flat_activation(arch):
    relu, leaky = small_member(arch, "relu"), small_member(arch, "leaky_relu")
    assert any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in relu.modules())
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in leaky.modules())
    assert sum(isinstance(m, nn.LeakyReLU) for m in leaky.modules()) >= 3
    assert relu.state_dict().keys() == leaky.state_dict().keys()  # the same network, another activation


def test_leaky_relu_is_refused_on_a_library_backbone():
    data = tiny_config()
    data["family"]["members"][1].update(arch="torchvision/resnet18", width=1.0, depth=1.0, activation="leaky_relu")
    with pytest.raises(ConfigError, match=r"activation: 'leaky_relu' is a variant of hetero's own"):
        parse_config(data, "leaky.yaml")


def test_linearised_model_is_the_first_order_taylor_expansion():
    member = small_member()
    names, frozen = kfac_parameters(member, "m")
    model = Linearised(member, names)
    images = torch.rand(6, 3, 24, 24)
    assert torch.allclose(model.raw(images), member(images), atol=1e-6)  # dw = 0: the member itself
    direction = [torch.randn_like(d) * 1e-2 for d in model.delta]
    errors = []
    for scale in (1.0, 0.5):
        with torch.no_grad():
            for delta, v in zip(model.delta, direction):
                delta.copy_(scale * v)
        moved = model.merged()
        errors.append((model.raw(images) - moved(images)).norm().item())
    assert errors[1] < errors[0] / 3  # the gap shrinks quadratically with the step: a first-order expansion
    assert "bn" in frozen and all(n.endswith(".weight") for n in names)


def test_smooth_activation_is_refused_naming_it():
    member = small_member()
    member.backbone[1].relu = nn.GELU()
    with pytest.raises(ConfigError, match=r"member 'cloud' has a GELU activation at 'backbone\.1\.relu'"):
        check_linearisable(member, "cloud")
    member.arch = "timm/resnet18"
    with pytest.raises(ConfigError, match=r"library backbone \(timm/resnet18\)"):
        check_linearisable(member, "cloud")


def test_kfac_refuses_layers_it_does_not_support_naming_them():
    member = small_member()
    member.extra = nn.LayerNorm(4)
    with pytest.raises(ConfigError, match=r"supports Linear, Conv2d .*member 'edge' has parameters in extra "
                                          r"\(LayerNorm\)"):
        kfac_parameters(member, "edge")


def test_lqf_needs_a_previous_family_and_no_init(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.previous: mode 'lqf' needs"):
        parse_config(tiny_config(mode="lqf"), "u.yaml")
    with pytest.raises(ConfigError, match=r"init: mode 'lqf' always starts from"):
        parse_config(tiny_config(mode="lqf", previous=str(tmp_path), init=str(tmp_path)), "u.yaml")
    with pytest.raises(ConfigError, match=r"train\.previous .*no family manifest here"):
        train(parse_config(tiny_config(mode="lqf", previous=str(tmp_path)), "u.yaml"), tmp_path / "out",
              progress=False)


def test_lqf_refuses_a_member_that_differs_from_the_previous_one(tiny_family_dir, tmp_path):
    data = lqf_config(tiny_family_dir)
    data["family"]["members"][1]["width"] = 0.5
    with pytest.raises(ConfigError, match=r"'edge-a' has width 0\.5, the same member in train\.previous .* 0\.25"):
        train(parse_config(data, "u.yaml"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_lqf_refuses_a_tampered_previous_family(family_copy, tmp_path):
    checkpoint = family_copy / "checkpoints" / "edge-b.safetensors"
    raw = bytearray(checkpoint.read_bytes())
    raw[-1] ^= 0xFF
    checkpoint.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=r"edge-b\.safetensors: sha256 .* does not match the manifest"):
        train(parse_config(lqf_config(family_copy), "u.yaml"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_lqf_update_keeps_the_space_is_deterministic_and_exports(family_copy, tmp_path):
    first = train(parse_config(lqf_config(family_copy, seed=1), "u.yaml"), tmp_path / "a", progress=False)
    second = train(parse_config(lqf_config(family_copy, seed=2), "u.yaml"), tmp_path / "b", progress=False)
    old = FamilyStore.open(family_copy)
    assert first.space_id == old.space_id and first.manifest.mode == "lqf"
    for member in first.members:  # convex and full-batch: the seed changes nothing
        a, b = (load_file(s.root / s.member(member.name).checkpoint.file) for s in (first, second))
        assert all(torch.equal(a[k], b[k]) for k in a), member.name
    for facts in first.manifest.training.lqf:
        assert facts["objective_last"] < facts["objective_first"], facts["member"]
        assert 0 < facts["relative_update"] < 1
    w0 = first.load_linearisation_point("cloud").state_dict()
    assert all(torch.equal(w0[k], v) for k, v in old.load_member("cloud").state_dict().items())

    report = evaluate(first)
    assert {"new_vs_old_top1", "old_vs_old_top1", "negative_flip_rate"} <= report["backward"].keys()
    assert report["backward"]["new_vs_old_top1"] > 2 * report["chance_top1"]

    images = first.split().test.floats()[:32]
    merged, linear = first.load_member("edge-a"), load_linearised(first, "edge-a")
    with torch.no_grad():
        agreement = (merged(images[:, :, :32, :32]) * linear(images[:, :, :32, :32])).sum(1).mean().item()
    assert agreement > 0.5  # two uses of one update: w0 + dw exactly, or its first-order model

    from hetero.exporter import export_member
    from hetero.profiles import load_profile

    with first.lock("export"):
        artifact = export_member(first, "edge-a", load_profile("server-onnx-fp32"))
    assert artifact.member == "edge-a" and (first.root / artifact.file).is_file()


def test_init_starts_every_member_from_the_earlier_family(tiny_family_dir):
    from hetero.training import Family, start_from_family

    config = parse_config(tiny_config(mode="joint", init=str(tiny_family_dir)), "ft.yaml")
    family = Family(config, num_classes=8, mean=[0.5] * 3, std=[0.25] * 3)
    start_from_family(family, config)
    old = FamilyStore.open(tiny_family_dir)
    for name, member in family.members.items():
        expected = old.load_member(name).state_dict()
        assert all(torch.equal(expected[k], v) for k, v in member.state_dict().items()), name
    data = tiny_config(mode="joint", init=str(tiny_family_dir))
    data["family"]["members"][2]["input_size"] = 32
    config = parse_config(data, "ft.yaml")
    with pytest.raises(ConfigError, match=r"'edge-b' has input_size 32, the same member in train\.init .* 24"):
        start_from_family(Family(config, 8, [0.5] * 3, [0.25] * 3), config)


# ------------------------------------------------------------------ previous families an update cannot build on


def replace_weights(family, member: str, change) -> FamilyStore:
    """`member`'s checkpoint replaced by `change` of its tensors, its sha256 in the manifest updated to match."""
    from hetero.family import save_weights
    from hetero.files import sha256_file

    store = FamilyStore.open(family)
    tensors = {k: change(k, v) for k, v in store.load_member(member).state_dict().items()}
    path = family / store.member(member).checkpoint.file
    save_weights(path, tensors, {"member": member, "family": store.name})
    store.member(member).checkpoint.sha256 = sha256_file(path)
    store.save()
    return store


@pytest.mark.parametrize("mode", ["lqf", "backward"])
def test_a_previous_family_whose_cloud_was_replaced_is_refused_by_its_space_id(family_copy, tmp_path, mode):
    """The update would inherit a space id (and the galleries in it) that the replaced cloud does not give."""
    store = replace_weights(family_copy, "cloud", lambda k, v: v * 1.1 if k.startswith("project") else v)
    data = lqf_config(family_copy)
    data["train"].update(mode=mode, epochs=1)
    with pytest.raises(ConfigError, match=rf"train\.previous .*space id {store.space_id} is not the one the weights "
                                          rf"of its cloud 'cloud' .*give, hs-[0-9a-f]{{16}}: that file was replaced"):
        train(parse_config(data, "u.yaml"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_lqf_refuses_multi_exit_members_in_its_config():
    data = lqf_config("earlier")
    data["family"]["members"][1]["exits"] = "auto"
    with pytest.raises(ConfigError, match=r"'edge-a' has exits; mode 'lqf' .* does not support multi-exit members"):
        parse_config(data, "u.yaml")


@pytest.mark.slow
def test_lqf_refuses_a_previous_family_with_a_multi_exit_member_naming_it(tmp_path):
    earlier = tiny_config(epochs=1)
    earlier["family"]["members"][1]["exits"] = "auto"
    earlier["data"].update(num_classes=28, samples_per_class=6)  # 18 training classes, 2 held out for calibration
    train(parse_config(earlier, "earlier.yaml"), tmp_path / "earlier", progress=False)
    with pytest.raises(ConfigError, match=r"train\.previous .*member 'edge-a' is a multi-exit member \(exits after "
                                          r"stages .*does not support multi-exit members. Leave 'edge-a' out"):
        train(parse_config(lqf_config(tmp_path / "earlier"), "u.yaml"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_lqf_says_to_raise_the_damping_when_the_curvature_cannot_be_inverted(family_copy, tmp_path, capsys):
    import yaml

    from hetero.cli import main

    replace_weights(family_copy, "edge-a", lambda k, v: v + 0.01 if v.is_floating_point() else v)  # huge activations
    data = lqf_config(family_copy)
    data["train"]["epochs"] = 1
    path = tmp_path / "u.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["train", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.startswith("error: train.lqf.damping: the curvature (K-FAC) of member 'edge-a' plus damping "
                              "0.001 is not positive definite"), printed
    assert "raise train.lqf.damping" in printed and "Traceback" not in printed
    data["train"]["lqf"] = {"damping": 1.0}  # what the paragraph says to change
    path.write_text(yaml.safe_dump(data))
    assert main(["train", str(path), "--out", str(tmp_path / "fixed"), "--quiet"]) == 0


def test_a_compat_weight_is_a_number_or_auto_and_its_grid_has_a_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lqf\.compat_weight.*'sometimes'"):
        parse_config(lqf_config(tmp_path, lqf={"compat_weight": "sometimes"}), "u.yaml")
    with pytest.raises(ConfigError, match=r"train\.lqf\.compat_grid"):
        parse_config(lqf_config(tmp_path, lqf={"compat_weight": "auto", "compat_grid": [1.0]}), "u.yaml")


@pytest.mark.slow
def test_an_auto_compat_weight_is_chosen_per_member_on_held_out_images(family_copy, tmp_path, monkeypatch):
    from hetero.data import calibration_split
    from hetero.maths import top1_correct
    from hetero.models import embed_images
    from hetero.training import lqf

    original, computed = lqf._kfac_inverse, []

    def counted(*args):
        computed.append(len(args[3]))  # the images it is computed on
        return original(*args)

    monkeypatch.setattr(lqf, "_kfac_inverse", counted)
    grid = [0.0, 1e5]  # 1e5 pins every member to the previous cloud's embedding of the fitted images
    store = train(parse_config(lqf_config(family_copy, lqf={"compat_weight": "auto", "compat_grid": grid}),
                               "u.yaml"), tmp_path / "auto", progress=False)
    # K-FAC serves every weight of the search: computed once for it and once for the final fit, per member
    assert len(computed) == 2 * len(store.members)
    facts = {f["member"]: f for f in store.manifest.training.lqf}
    train_set = store.split().train
    fit, held = calibration_split(train_set, 0.2, "images", seed=7)
    images = train_set.floats()
    old_cloud = FamilyStore.open(family_copy).load_member("cloud")
    pinned = top1_correct(embed_images(old_cloud, images[held]), train_set.labels[held],
                          embed_images(old_cloud, images[fit]), train_set.labels[fit]).float().mean().item()
    for name, member_facts in facts.items():
        search = member_facts["compat_weight_search"]
        assert search["held_out_images"] == len(held) > 0
        scores = {float(w): s for w, s in search["scores"].items()}
        assert search["chosen"] == max(grid, key=lambda w: (scores[w], -w)) == member_facts["compat_weight"], name
    # Pinned to the previous cloud, the cloud is scored as that cloud: its top-1 against its own gallery
    # and the previous one's are then both the previous cloud's (within a query of it).
    assert abs(facts["cloud"]["compat_weight_search"]["scores"]["100000"] - pinned) <= 1 / len(held) + 1e-4
