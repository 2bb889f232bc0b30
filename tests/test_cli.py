"""The `hetero` command end to end on tiny data, and its help and error paths."""
from __future__ import annotations

import json

import pytest
import yaml

from hetero.cli import main
from hetero.config import parse_config
from hetero.files import sha256_file
from tests.conftest import tiny_config


@pytest.mark.slow
def test_hetero_run_trains_evaluates_exports_and_verifies(tmp_path, capsys):
    config = tiny_config(epochs=2)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "family"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Compatibility matrix" in printed and "passed" in printed

    report = json.loads((out / "report.json").read_text())
    assert set(report["matrix"]) == {"cloud", "edge-a", "edge-b"}
    assert all(set(row) == {"cloud", "edge-a", "edge-b"} for row in report["matrix"].values())
    assert report["matrix"]["cloud"]["cloud"]["top1"] > 3 * report["chance_top1"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compatibility"]["matrix"] == report["matrix"]
    exported = {(a["member"], a["profile"]) for a in manifest["artifacts"]}
    assert exported == {("edge-a", "server-onnx-fp32"), ("edge-b", "server-onnx-fp32")}
    for artifact in manifest["artifacts"]:
        assert sha256_file(out / artifact["file"]) == artifact["sha256"]

    verified = json.loads((out / "verify.json").read_text())
    assert verified["passed"] is True
    parity = [c for a in verified["artifacts"] for c in a["checks"] if c["name"] == "parity"]
    assert len(parity) == 2 and all(c["values"]["min_cosine"] >= 0.9999 for c in parity)


def test_stage_without_previous_stage_says_what_to_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "run `hetero train`" in capsys.readouterr().out


def test_every_verb_has_help(capsys):
    for verb in ("run", "train", "eval", "export", "verify", "profiles"):
        with pytest.raises(SystemExit) as info:
            main([verb, "--help"])
        assert info.value.code == 0
        assert "usage: hetero" in capsys.readouterr().out


def test_a_log_gets_one_progress_line_per_epoch_and_per_run_stage(tmp_path, capsys, monkeypatch):
    import re

    import hetero.cli.stages as cli

    config = tiny_config(epochs=1)
    config["data"].update(num_classes=24, samples_per_class=6)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--out", str(tmp_path / "family")]) == 0  # capsys: stdout is not a terminal
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2  # sequential: the cloud's epoch, then the edges'
    for epoch, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"epoch {epoch}/2 \(phase {epoch}\): loss \d+\.\d{{4}} \[\d+:\d\d:\d\d elapsed\]", line)

    class Trained:  # what the later stages of `hetero run` ask of the family (they are stubbed here)
        edges = []

        def config(self):
            return parse_config(config, "tiny")

    monkeypatch.setattr(cli, "train_family", lambda *args, **kwargs: Trained())
    for stage in ("evaluate_family", "export_family", "verify_family"):
        monkeypatch.setattr(cli, stage, lambda *args, **kwargs: 0)
    monkeypatch.setattr("hetero.profiles.load_profile", lambda name: name)
    assert main(["run", str(path), "--out", str(tmp_path / "other")]) == 0
    stages = [line for line in capsys.readouterr().out.splitlines() if line.startswith("hetero run: stage")]
    assert [line.split(" [")[0] for line in stages] == [f"hetero run: stage {i}/4, {name}" for i, name in
                                                        enumerate(("train", "eval", "export", "verify"), start=1)]


def test_a_terminal_keeps_its_progress_bars_and_no_lines(monkeypatch):
    import hetero.cli as cli

    monkeypatch.setattr(type(cli.console), "is_terminal", property(lambda console: True))
    assert not cli.LogLines(quiet=False).enabled
    monkeypatch.setattr(type(cli.console), "is_terminal", property(lambda console: False))
    assert cli.LogLines(quiet=False).enabled and not cli.LogLines(quiet=True).enabled
