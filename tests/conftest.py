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


def crash_after(last_epoch: int):
    """A training callback that raises KeyboardInterrupt once `last_epoch` is checkpointed (a simulated crash)."""
    def crash(end):
        if end.epoch == last_epoch:
            raise KeyboardInterrupt
    return crash


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory) -> Path:
    """A trained and evaluated tiny family; copy it (`family_copy`) before changing anything in it."""
    from hetero.evaluate import evaluate
    from hetero.training import train

    out = tmp_path_factory.mktemp("tiny-family")
    evaluate(train(parse_config(tiny_config(), "tiny"), out, progress=False))
    return out


@pytest.fixture
def family_copy(tiny_family_dir, tmp_path) -> Path:
    """A private copy of the tiny family that a test may modify."""
    target = tmp_path / "family"
    shutil.copytree(tiny_family_dir, target)
    return target


@pytest.fixture(scope="session")
def runtime_environments():
    """The isolated runtimes the built-in profiles declare, created from the package registry once and kept
    in the user's cache between runs (as `hetero runtimes add --profile ...` would)."""
    from hetero import runtimes
    from hetero.profiles import all_profiles

    wanted = {r for p in all_profiles() for r in p.runtimes if runtimes.needs_environment(r)}
    return {requirement: runtimes.ensure(requirement) for requirement in sorted(wanted)}
