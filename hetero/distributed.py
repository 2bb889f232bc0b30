"""Data-parallel helpers: the same code runs alone or under `torchrun --nproc_per_node N -m hetero ...`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; :func:`init_from_env` turns them into a
process group (gloo on CPU, nccl when every rank has its own GPU).  Without them every helper answers as
rank 0 of a world of 1, so callers never branch on "am I distributed?".
"""
from __future__ import annotations

import os

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
    """This rank's device: its own GPU under nccl or alone on a GPU machine, else (gloo, no GPU) the CPU."""
    if is_initialized():
        return torch.device("cuda", local_rank()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


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


def on_main_then_share(action) -> None:
    """Run `action` on rank 0 only; when it raises a HeteroError, raise the same error on every rank.

    For checks that read or change shared files (a directory's lock, its earlier outputs): one rank decides,
    and all ranks fail together instead of the others waiting at the next barrier.
    """
    from hetero.errors import HeteroError

    problem = None
    if is_main():
        try:
            action()
        except HeteroError as err:
            problem = err
    shared = broadcast_object(None if problem is None else (type(problem).__name__, str(problem)))
    if problem is not None:
        raise problem
    if shared is not None:
        import hetero.errors as errors

        raise getattr(errors, shared[0], errors.HeteroError)(shared[1])


def shard_range(count: int, rank_: int | None = None, world: int | None = None) -> range:
    """Items `rank_` takes in a round-robin split of `count` items (shards, batches) over `world` ranks."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return range(rank_, count, world)


# ------------------------------------------------------------------------ exact data-parallel training
# DDP averages gradients of per-rank losses.  That equals the gradient of one process on the global batch
# only when every term of the loss is a mean over samples.  Two things in a family are not: BatchNorm
# statistics (per local batch; torch's SyncBatchNorm refuses CPU tensors) and batch-wise cross-model terms
# (pairs across the batch).  The helpers below make both see the global batch, on gloo as on nccl.


def local_slice(*tensors: torch.Tensor):
    """This rank's contiguous part of each tensor of a global batch (the batch must divide evenly)."""
    world, me = world_size(), rank()
    if world == 1:
        return tensors if len(tensors) > 1 else tensors[0]
    out = []
    for tensor in tensors:
        if len(tensor) % world:
            raise ValueError(f"global batch of {len(tensor)} does not split evenly over {world} processes")
        size = len(tensor) // world
        out.append(tensor[me * size:(me + 1) * size])
    return tuple(out) if len(out) > 1 else out[0]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` in rank order; gradients flow back to each rank's own part.

    A loss computed on the gathered batch identically on every rank, then averaged by DDP, has exactly the
    gradient of that loss in one process (the all-gather's backward sums the W identical contributions).
    """
    if world_size() == 1:
        return tensor
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # "deprecated" in 2.14 for a private replacement; it still works
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(tensor))


def mean_across_ranks(value: float) -> float:
    """The mean of a Python number over ranks (for logging the global loss on rank 0)."""
    if world_size() == 1:
        return float(value)
    box = torch.tensor([float(value)], dtype=torch.float64, device=device())  # nccl reduces GPU tensors only
    torch.distributed.all_reduce(box)
    return box.item() / world_size()


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all ranks), on CPU or GPU.

    Alone (or in eval mode) it is a plain BatchNorm; with several ranks the per-channel sums are all-reduced
    with autograd, so forward, backward and running statistics match one process on the whole batch.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        import warnings

        from torch.distributed.nn.functional import all_reduce

        # Statistics in float32 whatever the input (bf16 under autocast): E[x^2] - mean^2 cancels badly in bf16,
        # and a bf16 count is not even exact.  Plain BatchNorm accumulates in float32 too.
        input_dtype, x = x.dtype, x.float()
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        count = torch.full((1,), x.numel() / channels, dtype=x.dtype, device=x.device)
        with warnings.catch_warnings():  # see gather_with_grad
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * n / (n - 1), alpha=momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input_dtype)


def convert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm1d/2d/3d in `module` by a GlobalBatchNorm with the same state (in place)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module


def wrap_ddp(module: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around `module` when running with several ranks; `module` itself alone."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [local_rank()] if device().type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)
