"""Training under torchrun: the process group, DistributedDataParallel, and the
training curve averaged over the ranks.

Under torchrun (``WORLD_SIZE > 1``) every process runs ``normlab train``: one model
under DistributedDataParallel, each process on its shard of every global batch of
``batch_size x world`` samples, so it takes the steps of one process with that batch
(tests/test_torchrun.py checks this against a single process with the double batch).
:func:`torchrun_env` reads torchrun's variables, :func:`process_device` picks this
process's device, and :func:`train_data_parallel` runs one training inside a process
group and tears the group down again.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["torchrun_env", "process_device", "train_data_parallel", "average_curve_over_ranks"]


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when started by torchrun with more than one
    process (its RANK / WORLD_SIZE / LOCAL_RANK variables), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if "RANK" not in os.environ:
        raise SystemExit("normlab train: WORLD_SIZE > 1 but RANK is not set; start the "
                         "processes with torchrun")
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def process_device(device: str | torch.device, env: tuple[int, int, int] | None) -> torch.device:
    """``device``, or under torchrun on CUDA the GPU of this process's local rank."""
    device = torch.device(device)
    if env is not None and device.type == "cuda":
        return torch.device("cuda", env[2])
    return device


def train_data_parallel(
    model: nn.Module,
    device: torch.device,
    world: int,
    sync_bn: bool,
    train_fn: Callable[[nn.Module], object],
    timeout_s: float | None = 60.0,
) -> tuple[nn.Module, object]:
    """Run ``train_fn(net)`` on ``model`` under DistributedDataParallel in a new process
    group (NCCL on CUDA, gloo otherwise), with batch norms made
    :class:`normlab.nn.SyncBatchNorm` if ``sync_bn``; the curve of the result is then
    averaged over the ranks (:func:`average_curve_over_ranks`). Returns the (possibly
    converted) model and the result; the process group is destroyed on the way out,
    error or not.

    ``timeout_s`` is the group's timeout: a rank that skips a collective (a
    SyncBatchNorm call in eval() on one rank only) or dies makes the others fail with
    an error within that time instead of torch's default 30 minutes (None keeps it)."""
    from torch.nn.parallel import DistributedDataParallel

    from normlab.nn import to_sync_batchnorm

    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    net = None
    try:
        if sync_bn:
            model = to_sync_batchnorm(model)
        model.to(device)
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        result = train_fn(net)
        average_curve_over_ranks(result, world, device)
    finally:
        # destroy_process_group drops only c10d's references to the group: free the DDP
        # wrapper (and its reducer, which holds the group) now, or the gloo group may be
        # destroyed during interpreter shutdown, which can abort.
        net = None
        gc.collect()
        dist.destroy_process_group()
    return model, result


def average_curve_over_ranks(result, world: int, device) -> None:
    """Each rank logged the loss and accuracy of its own shard; replace them by the
    means over the ranks (equal shards: those of the global batch) and recompute
    ``final_train_loss`` as :func:`normlab.train.train` does (the mean over the last
    10% of the logged steps), so rank 0 reports the global curve."""
    n = len(result.curve["loss"])
    sizes = torch.tensor([n, -n], dtype=torch.float64, device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    if int(sizes[0]) != n or int(sizes[1]) != -n:  # cannot happen: ranks stop together
        raise RuntimeError("normlab train: the ranks logged different numbers of steps")
    both = torch.tensor([result.curve["loss"], result.curve["acc"]], dtype=torch.float64,
                        device=device)
    dist.all_reduce(both)
    both /= world
    result.curve["loss"], result.curve["acc"] = both[0].tolist(), both[1].tolist()
    losses = [v for s, v in zip(result.curve["step"], result.curve["loss"], strict=True)
              if s <= result.steps_done]
    if losses:
        tail = max(1, math.ceil(0.1 * len(losses)))
        result.final_train_loss = sum(losses[-tail:]) / tail
