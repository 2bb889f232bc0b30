"""Data-parallel helpers: 2 gloo processes on CPU give the same training step as 1 process on the global batch."""
from __future__ import annotations

import pytest
import torch

from hetero import distributed
from tests.conftest import crash_after


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6))


def _loss(embeddings: torch.Tensor, targets: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
    per_sample = (embeddings - targets).pow(2).sum(1).mean()  # a mean over samples: DDP's average handles it
    unit = torch.nn.functional.normalize(gathered, dim=1)
    batchwise = (unit @ unit.T).pow(2).mean()  # pairs across the whole batch: needs the gathered batch
    return per_sample + batchwise


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.rand(8, 3, 10, 10, generator=generator), torch.randn(8, 6, generator=generator)) for _ in range(3)]


def _steps(model, batches) -> torch.nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for images, targets in batches:
        images, targets = distributed.local_slice(images, targets)
        embeddings = model(images)
        loss = _loss(embeddings, targets, distributed.gather_with_grad(embeddings))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = distributed.wrap_ddp(distributed.convert_batchnorm(_model()))
        _steps(model, _batches())
        if rank == 0:
            torch.save(model.module.state_dict(), out)
    finally:
        torch.distributed.destroy_process_group()


def test_local_slice_and_gather_alone_are_identity():
    x = torch.arange(6.0)
    assert distributed.local_slice(x) is x and distributed.gather_with_grad(x) is x
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.mean_across_ranks(2.5) == 2.5


def test_global_batchnorm_keeps_float32_statistics_of_a_bf16_batch(monkeypatch):
    """Under bf16 autocast the global BatchNorm gets bf16 activations; its statistics must not be bf16 sums."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    import torch.distributed.nn.functional as collective

    monkeypatch.setattr(collective, "all_reduce", lambda t: t)  # this rank alone
    torch.manual_seed(0)
    x = (50 + 3 * torch.randn(64, 4, 6, 6)).bfloat16()  # an offset channel: E[x^2] - mean^2 cancels
    plain, global_bn = torch.nn.BatchNorm2d(4), distributed.GlobalBatchNorm(4)
    expected = plain(x.float())
    y = global_bn(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
    torch.testing.assert_close(global_bn.running_var, plain.running_var, atol=0.05, rtol=0.01)


@pytest.mark.slow
def test_two_processes_equal_one_on_the_global_batch(tmp_path):
    """Global BatchNorm + gathered batch-wise loss + DDP: the weights after 3 steps match one process."""
    import torch.multiprocessing as mp

    out = tmp_path / "two.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    two = torch.load(out)
    one = _steps(_model(), _batches()).state_dict()
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=f"{key} differs")
    assert not torch.equal(one["0.weight"], _model().state_dict()["0.weight"])  # training did move the weights



# ------------------------------------------------------------------ `hetero train` under torchrun (2 gloo ranks)
# The whole training loop, 2 processes against 1 on the same global batch.  Not bit-identical: the global
# BatchNorm computes its statistics as all-reduced sums (torch's BatchNorm uses another summation order),
# DDP averages two half-batch gradients instead of one full-batch one, so each step differs by float32
# rounding, which AdamW's normalised steps carry on: see TOLERANCE.


def _ddp_config(**train) -> dict:
    from tests.conftest import tiny_config

    # 96 training images: 3 steps per epoch; the recipe pinned so that new defaults leave the measurement valid
    # (fp32 too: TOLERANCE below is calibrated on fp32 rounding, whatever bf16 `amp: auto` would pick here)
    data = tiny_config(**{"epochs": 2, "batch_size": 32, "mode": "joint", "scale": 32.0, "amp": "off",
                          "losses": {"contrastive": 1.0, "relational": 1.0}, **train})
    data["data"].update(num_classes=24, samples_per_class=6)
    return data


def _train_worker(rank: int, world: int, init_file: str, config: dict, out: str, resume: bool) -> None:
    from hetero.config import parse_config
    from hetero.training import train

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        store = train(parse_config(config, "tiny"), out, resume=resume, progress=False)
        assert store.members and store.manifest.training.history  # every rank opens rank 0's family
    finally:
        torch.distributed.destroy_process_group()


def _train_two_processes(tmp_path, config: dict, out, resume: bool = False):
    import torch.multiprocessing as mp

    from hetero.family import FamilyStore

    mp.spawn(_train_worker, args=(2, str(tmp_path / f"init-{out.name}"), config, str(out), resume), nprocs=2)
    return FamilyStore.open(out)


def _initial_members(config: dict) -> dict:
    from hetero.config import parse_config
    from hetero.augment import channel_stats
    from hetero.data import load_split
    from hetero.training import Family, seed_everything

    config = parse_config(config, "tiny")
    split = load_split(config.data, config.load_size)
    seed_everything(config.train.seed, -1)
    family = Family(config, len(split.train.class_names), *channel_stats(split.train.images))
    return {name: member.state_dict() for name, member in family.members.items()}


def _assert_same_family(config: dict, one, two) -> None:
    """Per member, |two - one| over all weights must be under TOLERANCE x how far training moved them."""
    from safetensors.torch import load_file

    for member, init in _initial_members(config).items():
        a = load_file(str(one / "checkpoints" / f"{member}.safetensors"))
        b = load_file(str(two / "checkpoints" / f"{member}.safetensors"))
        assert a.keys() == b.keys()
        keys = [k for k in a if a[k].is_floating_point() and "running_" not in k]
        flat = lambda state: torch.cat([state[k].double().flatten() for k in keys])  # noqa: E731
        moved, differs = (flat(a) - flat(init)).norm(), (flat(b) - flat(a)).norm()
        assert moved > 0 and differs < TOLERANCE * moved, f"{member}: {differs / moved:.3f} of the training step"


# Why relative, and why 0.2: one process and two agree to float32 rounding after one step (gradients within
# ~1e-5 relative), but AdamW divides each weight's step by that weight's own gradient size, so weights with
# near-zero gradients take full-size steps whose direction is rounding noise, and the next steps build on
# them.  Measured on this config (6 steps): the 2-process weights differ from the 1-process ones by 1-5% of
# the distance training moved them; with the cross-model terms on each rank's half batch instead of the
# gathered global batch (the bug this guards against) they differ by 80-130%.  0.2 is 4x above the first
# and 4x below the second.  (Elementwise tolerances cannot separate them: the noisy weights move by up to
# the whole step, lr = 3e-3, either way.)
TOLERANCE = 0.2


@pytest.mark.slow
def test_train_on_two_processes_equals_one_on_the_global_batch(tmp_path):
    """Joint training with gradients through the gathered cloud embeddings too: 2 ranks == 1 process."""
    from hetero.config import parse_config
    from hetero.training import train

    config = _ddp_config(detach_cloud=False)
    one = train(parse_config(config, "tiny"), tmp_path / "one", progress=False)
    two = _train_two_processes(tmp_path, config, tmp_path / "two")
    _assert_same_family(config, tmp_path / "one", tmp_path / "two")
    for a, b in zip(one.manifest.training.history, two.manifest.training.history, strict=True):
        # rank 0 logs the global loss (measured 1.5e-4 apart; up to 2.2e-3 on a loaded machine, where the
        # weights' rounding drift of the first steps carries into the later ones)
        assert b.loss == pytest.approx(a.loss, rel=1e-2)


@pytest.mark.slow
def test_two_processes_resume_a_one_process_run(tmp_path):
    """Sequential mode (DDP re-wrapped for the edge phase), resumed by 2 ranks after the cloud phase."""
    from hetero.config import parse_config
    from hetero.training import train

    config = _ddp_config(mode="sequential", epochs=1)
    train(parse_config(config, "tiny"), tmp_path / "one", progress=False)

    with pytest.raises(KeyboardInterrupt):
        train(parse_config(config, "tiny"), tmp_path / "two", progress=False, callbacks=[crash_after(1)])
    _train_two_processes(tmp_path, config, tmp_path / "two", resume=True)
    _assert_same_family(config, tmp_path / "one", tmp_path / "two")


def test_global_batch_must_split_into_whole_classes_per_process(monkeypatch):
    from hetero.config import ConfigError, parse_config
    from hetero.training import global_batch_size

    train_cfg = parse_config(_ddp_config(batch_size=36, samples_per_class=4), "tiny").train
    assert global_batch_size(train_cfg, 1000) == 36
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"global batch.*2 processes.*multiple of 8, e.g. 32"):
        global_batch_size(train_cfg, 1000)
