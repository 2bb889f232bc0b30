"""Config errors name the file, the key and what is allowed; the CLI prints them without a traceback."""
from __future__ import annotations

import copy

import pytest
import yaml

from hetero.cli import main
from hetero.config import ConfigError, load_config, parse_config
from tests.conftest import tiny_config


def error_for(change) -> str:
    data = copy.deepcopy(tiny_config())
    change(data)
    with pytest.raises(ConfigError) as info:
        parse_config(data, "family.yaml")
    return str(info.value)


def test_tiny_config_is_valid():
    config = parse_config(tiny_config(), "tiny")
    assert config.family.cloud.name == "cloud"
    assert [m.name for m in config.family.edges] == ["edge-a", "edge-b"]
    assert config.load_size == 32


def test_unknown_key_names_file_key_and_allowed_keys():
    message = error_for(lambda d: d["train"].update(epocs=3))
    assert "family.yaml" in message
    assert "train.epocs" in message
    assert "did you mean 'epochs'" in message
    assert "batch_size" in message  # the allowed keys are listed


def test_wrong_type_is_reported_with_value():
    message = error_for(lambda d: d["train"].update(epochs="ten"))
    assert "train.epochs" in message and "'ten'" in message


def test_negative_width_is_refused():
    message = error_for(lambda d: d["family"]["members"][1].update(width=-0.5))
    assert "family.members.1.width" in message and "-0.5" in message


def test_unknown_architecture_suggests_and_lists_registry():
    message = error_for(lambda d: d["family"]["members"][0].update(arch="resnett"))
    assert "family.members.0.arch" in message
    assert "did you mean 'resnet'" in message and "mobilenet" in message


def test_member_dimension_must_match_family():
    message = error_for(lambda d: d["family"]["members"][2].update(embedding_dim=16))
    assert "members.2.embedding_dim" in message and "16" in message and "32" in message


def test_literal_choices_are_listed():
    message = error_for(lambda d: d["train"].update(compat="maybe"))
    assert "train.compat" in message and "'none'" in message and "'shared'" in message


def test_family_needs_exactly_one_cloud_and_unique_names():
    assert "exactly one member with role 'cloud'" in error_for(
        lambda d: d["family"]["members"][1].update(role="cloud"))
    assert "repeated: edge-a" in error_for(lambda d: d["family"]["members"][2].update(name="edge-a"))


def test_unknown_loss_is_refused():
    message = error_for(lambda d: d["train"].update(losses={"contrastiv": 1.0}))
    assert "train.losses" in message and "did you mean 'contrastive'" in message


@pytest.mark.parametrize("change, key", [
    ({"edge_epochs": 5, "mode": "joint"}, "edge_epochs: only used in mode 'sequential'"),
    ({"mixed_matching": -1.0}, "mixed_matching: Input should be greater than or equal to 0, got -1.0"),
    ({"previous": "runs/old"}, "previous: only used in modes 'backward' and 'lqf'"),
    ({"mode": "backward", "previous": "runs/old", "compat": "none"}, "compat: mode 'backward'"),
    ({"edge_classification": -0.5}, "edge_classification: Input should be greater than or equal to 0"),
    ({"edge_classification": 0.0, "losses": {}}, "edge_classification: 0 with no cross-model term"),
    ({"epochs": 0}, "epochs: Input should be greater than or equal to 1, got 0"),
    ({"lr": float("nan")}, "lr: Input should be a finite number, got nan"),
    ({"batch_size": 30, "samples_per_class": 4}, "batch_size: 30 must be a multiple of samples_per_class (4)"),
])
def test_training_options_that_cannot_apply_are_refused_at_their_key(change, key):
    message = error_for(lambda d: d["train"].update(change))
    assert message.startswith("family.yaml: invalid config") and f"train.{key}" in message
    assert message.count("\n") == 1 and message.count("got") <= 1  # one line, said once


def test_relative_previous_family_is_resolved_from_the_config_file(tmp_path):
    (tmp_path / "old").mkdir()
    data = tiny_config(mode="backward", previous="../old")
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "update.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).train.previous == str((tmp_path / "old").resolve())


def test_relative_data_path_is_resolved_from_the_config_file(tmp_path):
    (tmp_path / "data").mkdir()
    data = tiny_config()
    data["data"] = {"source": "imagefolder", "path": "data"}
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "family.yaml"
    data["data"]["path"] = "../data"
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).data.path == str((tmp_path / "data").resolve())


def test_cli_prints_config_error_without_traceback(tmp_path, capsys):
    data = tiny_config()
    data["train"]["lr"] = -1.0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["train", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    out = capsys.readouterr().out
    assert "bad.yaml" in out and "lr" in out
    assert "Traceback" not in out
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("family: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)


# ------------------------------------------------------------------------------------ dotted overrides


def tiny_file(tmp_path, **train_overrides):
    path = tmp_path / "family.yaml"
    path.write_text(yaml.safe_dump(tiny_config(**train_overrides)))
    return path


def test_an_override_changes_its_field_and_leaves_the_file_as_it_is(tmp_path):
    path = tiny_file(tmp_path)
    config = load_config(path, ["train.epochs=3", "family.members.1.width=0.5", "train.teacher_cache={views: 2}",
                                "train.matching_inputs=[mixup, cutmix]", "train.channels_last='on'"])
    assert config.train.epochs == 3 and config.family.members[1].width == 0.5
    assert config.train.teacher_cache.views == 2 and config.train.matching_inputs == ["mixup", "cutmix"]
    assert config.train.channels_last == "on"
    plain = load_config(path)
    assert plain.train.epochs == 10 and plain.train.teacher_cache is None
    assert load_config(path, []) == plain == load_config(path, None)


def test_an_override_path_is_relative_to_the_config_file(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "update.yaml"
    path.write_text(yaml.safe_dump(tiny_config()))
    config = load_config(path, ["train.mode=backward", "train.previous=../old"])
    assert config.train.previous == str((tmp_path / "old").resolve())


@pytest.mark.parametrize("override, words", [
    ("train.epochz=3", ["train.epochz: unknown key (did you mean 'epochs'?)", "batch_size"]),
    ("trian.epochs=3", ["override trian.epochs: unknown key 'trian' (did you mean 'train'?)"]),
    ("train.adaptr.rank=2", ["override train.adaptr.rank: unknown key 'adaptr' (did you mean 'adapter'?)"]),
    ("family.members.7.width=0.5", ["override family.members.7.width: family.members is a list", "0-2"]),
    ("train.teacher_cache.views=2", ["train.teacher_cache is not set in the config"]),
    ("train.epochs.value=2", ["override train.epochs.value: train.epochs is a value (10), not a section"]),
])
def test_an_unknown_key_is_refused_naming_it(tmp_path, override, words):
    with pytest.raises(ConfigError) as info:
        load_config(tiny_file(tmp_path), [override])
    message = str(info.value)
    assert "family.yaml" in message and all(w in message for w in words), message


@pytest.mark.parametrize("override, words", [
    ("train.epochs=many", ["train.epochs: Input should be a valid integer, got 'many'"]),
    ("train.epochs=0", ["train.epochs: Input should be greater than or equal to 1, got 0"]),
    ("train.compat=maybe", ["train.compat: 'maybe' is not allowed"]),
    ("family.members.1.width=[0.5", ["override family.members.1.width: not valid YAML"]),
    ("train.losses={a: 1, a: 2}", ["override train.losses: not valid YAML", "given again"]),
])
def test_a_badly_typed_value_is_refused_naming_its_key(tmp_path, override, words):
    with pytest.raises(ConfigError) as info:
        load_config(tiny_file(tmp_path), [override])
    message = str(info.value)
    assert "family.yaml" in message and all(w in message for w in words), message


def test_an_override_needs_a_key_and_a_value(tmp_path):
    for override in ("train.epochs", "=3", "train..epochs=3"):
        with pytest.raises(ConfigError, match="give dotted.key=value"):
            load_config(tiny_file(tmp_path), [override])


# ------------------------------------------------------------------------------------------ path fields


def test_every_path_field_is_resolved_from_the_config_file_in_one_pass(tmp_path, monkeypatch):
    from hetero.config import PATH_FIELDS, PROFILE_FIELDS

    (tmp_path / "conf").mkdir()
    for name in ("cache", "start", "old", "search-cloud", "cloud.onnx", "edge.yaml"):
        (tmp_path / name).touch()
    data = tiny_config(teacher_cache={"dir": "../cache"}, init="../start")
    data["export"] = {"profiles": ["server-onnx-fp32", "../edge.yaml", "missing.yaml"]}
    path = tmp_path / "conf" / "family.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)  # ../x does not exist from here: resolved from the config file alone
    config = load_config(path)
    assert config.train.teacher_cache.dir == str(tmp_path / "cache") and config.train.init == str(tmp_path / "start")
    # a built-in profile name stays a name; a profile file that exists nowhere yet is named from the config
    assert config.export.profiles == ["server-onnx-fp32", str(tmp_path / "edge.yaml"),
                                      str(tmp_path / "conf" / "missing.yaml")]
    assert "data.path" in PATH_FIELDS and "family.members.*.model" in PATH_FIELDS
    assert PROFILE_FIELDS == ("export.profiles.*", "search.targets.*.profile")


def test_a_path_that_exists_only_from_the_working_directory_is_kept(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "here").mkdir()
    path = tmp_path / "conf" / "family.yaml"
    path.write_text(yaml.safe_dump(tiny_config(init="here")))
    monkeypatch.chdir(tmp_path)
    assert load_config(path).train.init == "here"


# ------------------------------------------------------------------------------------------- pretrained


def test_pretrained_is_for_library_backbones_that_train():
    message = error_for(lambda d: d["family"]["members"][1].update(pretrained=True))  # hetero's own resnet
    assert "family.members.1" in message and "only a timm/ or torchvision/ member" in message
    message = error_for(lambda d: d["family"]["members"][1].update(arch="torchvision/resnet18", width=1.0, depth=1.0,
                                                                    pretrained=True, weights="w.safetensors"))
    assert "keep one of the two" in message


def test_a_pretrained_torchvision_member_starts_from_the_file_in_the_torch_hub_cache(tmp_path, monkeypatch):
    """As torchvision does: the weights are read from torch.hub's cache, and downloaded only when absent."""
    import torch
    import torch.hub
    import torchvision

    from hetero.models import build_member

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    data = copy.deepcopy(tiny_config())
    data["family"]["members"][1].update(arch="torchvision/resnet18", width=1.0, depth=1.0, pretrained=True)
    member = parse_config(data, "family.yaml").family.members[1]

    def offline(url, *args, **kwargs):
        raise OSError(f"no network to fetch {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ValueError, match=r"could not be loaded .*no network.*" + str(tmp_path / "hub" / "checkpoints")):
        build_member(member, 32)
    config = tmp_path / "family.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["train", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2  # a paragraph, no traceback
    assert not (tmp_path / "out" / "manifest.json").exists()
    torch.manual_seed(7)
    published = torchvision.models.resnet18()  # stands in for the published ImageNet weights
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(published.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    started = build_member(member, 32).backbone.state_dict()
    assert all(torch.equal(started[k], v) for k, v in published.state_dict().items() if not k.startswith("fc."))
