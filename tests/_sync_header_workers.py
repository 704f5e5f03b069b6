"""Worker processes for tests/nn/test_sync_header.py (importable by spawned children).

Each rank joins a gloo group on 127.0.0.1 (the default group with a 60 s timeout, for
the rendezvous and the barriers) and creates a second group of both ranks with a
timeout of PG_TIMEOUT_S seconds, which every synchronised layer here uses: a rank that
waits for a collective that never comes fails within seconds. The ranks then run, in
order, cases where they disagree (channel count, dtype, call number, mask), a healthy
call after those, a rank in eval() while the other trains, and a rank that dies. Each
writes what it saw to ``rank{r}.pt``.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

from _dist_workers import INIT_TIMEOUT_S
from normlab.nn import BatchRenorm, SyncBatchNorm, to_sync_batchnorm

PG_TIMEOUT_S = 3


def healthy_input(rank: int) -> torch.Tensor:
    """The input of the healthy call after the refused ones (the parent recomputes it)."""
    gen = torch.Generator().manual_seed(10 + rank)
    return torch.randn(3 + rank, 4, 5, generator=gen) + rank


def _attempt(res: dict, key: str, fn) -> None:
    start = time.monotonic()
    try:
        fn()
        res[key] = None
    except Exception as e:  # noqa: BLE001 - the parent judges the type and message
        res[key] = (type(e).__name__, str(e), time.monotonic() - start)


def _state(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _disagreements(rank: int, group, res: dict) -> None:
    c = (4, 6)[rank]
    layer = SyncBatchNorm(c, process_group=group).train()
    before = _state(layer)
    _attempt(res, "channels", lambda: layer(torch.randn(3, c, 5)))
    after = layer.state_dict()
    res["channels_state_kept"] = all(torch.equal(v, after[k]) for k, v in before.items())

    dt = (torch.float32, torch.float64)[rank]
    layer = SyncBatchNorm(4, process_group=group, dtype=dt).train()
    _attempt(res, "dtype", lambda: layer(torch.randn(3, 4, 5, dtype=dt)))

    a = SyncBatchNorm(4, process_group=group).train()
    b = SyncBatchNorm(4, process_group=group).train()
    x = torch.randn(3, 4, 5)
    a(x)  # call 1 of a on both ranks
    # rank 0 makes a's second call while rank 1 (which "skipped" it) makes b's first
    _attempt(res, "calls", lambda: (a if rank == 0 else b)(x))

    layer = SyncBatchNorm(4, process_group=group).train()
    mask = torch.ones(3, 4, 5, dtype=torch.bool) if rank == 0 else None
    _attempt(res, "mask", lambda: layer(x, mask=mask))

    renorm = BatchRenorm(c)
    to_sync_batchnorm(nn.Sequential(renorm), process_group=group)
    _attempt(res, "renorm", lambda: renorm(torch.randn(3, c, 5)))

    # The refused calls left the group usable: a matching call gives global statistics.
    layer = SyncBatchNorm(4, process_group=group).train()
    layer(healthy_input(rank))
    res["healthy_running_mean"] = layer.running_mean.clone()


def _cases(rank: int, group, fresh, folder: str) -> None:
    res: dict = {}
    _disagreements(rank, group, res)
    # A rank in eval() sends nothing: the training rank fails after the group's timeout.
    layer = SyncBatchNorm(4, process_group=group).train(rank == 0)
    _attempt(res, "skipped", lambda: layer(torch.randn(3, 4, 5)))
    dist.barrier()  # on the default group, which is still healthy
    if rank == 1:
        torch.save(res, os.path.join(folder, "rank1.pt"))
        os._exit(0)  # dies before the next synchronised call
    # A group the timeout above did not break, so that the death is what it sees.
    layer = SyncBatchNorm(4, process_group=fresh).train()
    _attempt(res, "peer_died", lambda: layer(torch.randn(3, 4, 5)))
    torch.save(res, os.path.join(folder, "rank0.pt"))
    os._exit(0)  # the groups are broken: no orderly shutdown to wait for


def worker_header(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S))
        short = datetime.timedelta(seconds=PG_TIMEOUT_S)
        group, fresh = dist.new_group([0, 1], timeout=short), dist.new_group([0, 1], timeout=short)
        _cases(rank, group, fresh, folder)
    except BaseException:
        with open(os.path.join(folder, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
