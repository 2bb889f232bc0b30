"""The `hetero` command end to end on tiny data, and its help and error paths."""
from __future__ import annotations

import json

import pytest
import yaml

from hetero.cli import main
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
