"""Data-parallel helpers: the same code runs alone or under `torchrun --nproc_per_node N -m hetero ...`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; :func:`init_from_env` turns them into a
process group (gloo on CPU, nccl when every rank has its own GPU).  Without them every helper answers as
rank 0 of a world of 1, so callers never branch on "am I distributed?".
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group torchrun describes; return True when running with more than one process.

    Idempotent: a second call (or a group the caller made itself) is left as it is.
    """
    if is_initialized():
        return torch.distributed.get_world_size() > 1
    if env_world_size() <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    torch.distributed.init_process_group(backend=backend)
    return torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(env_world_size())))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        torch.distributed.barrier()


def device() -> torch.device:
    """This rank's device: its own GPU under nccl, else the CPU."""
    if is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def broadcast_object(value, src: int = 0):
    """`value` from rank `src` on every rank (a no-op alone)."""
    if not (is_initialized() and world_size() > 1):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(value) -> list:
    """Every rank's `value`, in rank order (a one-element list alone)."""
    if not (is_initialized() and world_size() > 1):
        return [value]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (to fail together instead of hanging)."""
    return any(all_gather_objects(bool(flag)))


@contextmanager
def main_first():
    """Run the block on rank 0 first, then on the others (e.g. creating a directory or a plan file)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard_range(count: int, rank_: int | None = None, world: int | None = None) -> range:
    """Items `rank_` takes in a round-robin split of `count` items (shards, batches) over `world` ranks."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return range(rank_, count, world)


def destroy() -> None:
    if is_initialized():
        torch.distributed.destroy_process_group()
