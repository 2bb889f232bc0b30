"""Shared fixtures: a tiny family trained once per test session on the built-in procedural data."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hetero.config import parse_config

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OMNIGLOT = SHARED_DATA / "omniglot"


def tiny_config(**train_overrides) -> dict:
    """A three-member family small enough to train in seconds on 2 CPU cores."""
    return {
        "family": {
            "name": "tiny", "embedding_dim": 32,
            "members": [
                {"name": "cloud", "role": "cloud", "arch": "resnet", "width": 0.5, "depth": 0.5, "input_size": 32},
                {"name": "edge-a", "role": "edge", "arch": "resnet", "width": 0.25, "depth": 0.5, "input_size": 32},
                {"name": "edge-b", "role": "edge", "arch": "resnet", "width": 0.25, "depth": 0.5, "input_size": 24},
            ],
        },
        "data": {"source": "procedural", "num_classes": 48, "samples_per_class": 8, "test_fraction": 0.34},
        "train": {"epochs": 10, "batch_size": 64, "seed": 0, **train_overrides},
    }


def interrupt_after_epoch(monkeypatch, last_epoch: int):
    """Make training raise KeyboardInterrupt right after it checkpoints `last_epoch` (a simulated crash).

    Returns a function that restores normal training, for the resumed run.
    """
    import hetero.train as train_module

    original = train_module._save_state

    def save_then_crash(out, family, optimizer, epoch, history):
        original(out, family, optimizer, epoch, history)
        if epoch == last_epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_state", save_then_crash)
    return lambda: monkeypatch.setattr(train_module, "_save_state", original)


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory) -> Path:
    """A trained and evaluated tiny family; copy it (`family_copy`) before changing anything in it."""
    from hetero.evaluate import evaluate
    from hetero.train import train

    out = tmp_path_factory.mktemp("tiny-family")
    train(parse_config(tiny_config(), "tiny"), out, progress=False)
    evaluate(out)
    return out


@pytest.fixture
def family_copy(tiny_family_dir, tmp_path) -> Path:
    """A private copy of the tiny family that a test may modify."""
    target = tmp_path / "family"
    shutil.copytree(tiny_family_dir, target)
    return target
