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
