"""Data-parallel helpers: 2 gloo processes on CPU give the same training step as 1 process on the global batch."""
from __future__ import annotations

import pytest
import torch

from hetero import distributed


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
