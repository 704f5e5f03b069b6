"""Worker processes for the multi-process tests (importable by spawned children).

The parent writes the inputs of every case to ``inputs.pt`` in a temporary folder and
spawns the ranks with :func:`launch`; each rank joins a gloo group on 127.0.0.1, runs
the distributed side of every case on its slice of the batch and writes what it got
to ``rank{r}.pt``. The parent computes the single-process references itself and
compares. A rank that raises makes :func:`launch` raise with its traceback; a rank
that hangs is killed when the deadline passes.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

from normlab.nn import (
    AttentiveNorm,
    BatchNorm,
    BatchRenorm,
    SwitchableNorm,
    SyncBatchNorm,
    to_sync_batchnorm,
)
from normlab.nn.sync import sync_moments

INIT_TIMEOUT_S = 60


class TinyNet(nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> global average -> Linear, for the DDP run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, world: int, folder: str, timeout_s: float = 180.0) -> None:
    """Run ``fn(rank, world, port, folder)`` on ``world`` spawned processes; raise if a
    rank fails, and kill them all if they are not done within ``timeout_s``."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        fn, args=(world, free_port(), folder), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers still running after {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S),
    )


def _split(t: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]].clone()


class _CountCollectives:
    """Counts calls of dist.all_gather / dist.all_reduce while active."""

    def __init__(self) -> None:
        self.counts = {"all_gather": 0, "all_reduce": 0}

    def __enter__(self):
        self._saved = {k: getattr(dist, k) for k in self.counts}
        for k, f in self._saved.items():
            def wrapped(*a, _k=k, _f=f, **kw):
                self.counts[_k] += 1
                return _f(*a, **kw)
            setattr(dist, k, wrapped)
        return self

    def __exit__(self, *exc):
        for k, f in self._saved.items():
            setattr(dist, k, f)


def _train_steps(layer: nn.Module, case: dict, rank: int, mask_key: str | None = None) -> dict:
    """Run ``layer`` in training on this rank's slices of case["xs"] with upstream
    gradients case["gs"]; return outputs, gradients and buffers after each step."""
    sizes = case["sizes"]
    out = {"y": [], "dx": [], "dw": [], "db": []}
    for i, (x_full, g_full) in enumerate(zip(case["xs"], case["gs"], strict=True)):
        x = _split(x_full, sizes, rank).requires_grad_(True)
        g = _split(g_full, sizes, rank)
        kw = {}
        if mask_key is not None:
            kw["mask"] = _split(case[mask_key][i], sizes, rank)
        layer.zero_grad(set_to_none=True)
        y = layer(x, **kw)
        (y * g).sum().backward()
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        out["dw"].append(None if layer.weight is None else layer.weight.grad.clone())
        out["db"].append(None if layer.bias is None else layer.bias.grad.clone())
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        t = getattr(layer, k, None)
        out[k] = None if t is None else t.clone()
    return out


def train_steps_all(layer: nn.Module, case: dict, rank: int) -> dict:
    """Like :func:`_train_steps` for any layer: outputs, input gradients and the
    gradient of every named parameter after each step, and every buffer at the end."""
    sizes = case["sizes"]
    out = {"y": [], "dx": [], "grads": []}
    for x_full, g_full in zip(case["xs"], case["gs"], strict=True):
        x = _split(x_full, sizes, rank).requires_grad_(True)
        g = _split(g_full, sizes, rank)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        (y * g).sum().backward()
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        out["grads"].append({k: p.grad.clone() for k, p in layer.named_parameters()})
    out["buffers"] = {k: b.clone() for k, b in layer.named_buffers()}
    return out


MIXTURES = {"SwitchableNorm": SwitchableNorm, "AttentiveNorm": AttentiveNorm}


def make_mixture(case: dict) -> nn.Module:
    """The Switchable/Attentive Norm of ``case`` (class name, keywords, state_dict)."""
    layer = MIXTURES[case["cls"]](**case["kwargs"])
    layer.load_state_dict(case["state"])
    return layer.train()


def _make_bn(case: dict, cls=SyncBatchNorm, **extra) -> nn.Module:
    layer = cls(case["C"], momentum=case["momentum"], affine=case["affine"],
                dtype=case["xs"][0].dtype, **extra)
    if case["affine"]:
        with torch.no_grad():
            layer.weight.copy_(case["weight"])
            layer.bias.copy_(case["bias"])
    return layer.train()


def _run(rank: int, world: int, port: int, folder: str, cases_fn) -> None:
    _init(rank, world, port)
    try:
        inputs = torch.load(os.path.join(folder, "inputs.pt"), weights_only=False)
        results = cases_fn(rank, inputs)
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    except BaseException:
        # Leave a readable trace next to the results, then fail the process.
        with open(os.path.join(folder, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        # Free what still holds the group (a DDP wrapper's reference cycles) before
        # destroying it: a gloo group destroyed at interpreter shutdown can abort.
        gc.collect()
        dist.destroy_process_group()


# ------------------------------------------------------------------ two ranks


def _cases_two(rank: int, inputs: dict) -> dict:
    res = {}

    # SyncBatchNorm on (N, C, H, W), batches 1 and 4; collectives counted.
    case = inputs["bn4d"]
    layer = _make_bn(case)
    with _CountCollectives() as train_calls:
        res["bn4d"] = _train_steps(layer, case, rank)
    layer.eval()
    with _CountCollectives() as eval_calls, torch.no_grad():
        res["bn4d"]["eval_y"] = layer(_split(case["x_eval"], case["sizes"], rank))
    res["bn4d"]["train_calls"] = train_calls.counts
    res["bn4d"]["eval_calls"] = eval_calls.counts
    res["bn4d"]["state_keys"] = sorted(layer.state_dict())

    # BatchRenorm made global by to_sync_batchnorm (the protocol), batches 2 and 3.
    case = inputs["renorm"]
    layer = BatchRenorm(case["C"], momentum=case["momentum"], r_max=case["r_max"],
                        d_max=case["d_max"], dtype=torch.float64)
    layer.load_state_dict(case["state"])
    model = to_sync_batchnorm(nn.Sequential(layer))
    assert model[0] is layer and layer.sync_batch_stats
    res["renorm"] = _train_steps(layer, case, rank)

    # sync_moments, differentiable; rank 1 brings an empty batch.
    case = inputs["moments"]
    x = _split(case["x"], case["sizes"], rank).requires_grad_(True)
    m = sync_moments(x, (0, 2))
    ((m.mean * case["a"][rank]).sum() + (m.var * case["b"][rank]).sum()).backward()
    res["moments"] = {"mean": m.mean.detach(), "var": m.var.detach(),
                      "count": m.count, "dx": x.grad}

    # float32 input far from zero (1e4 + N(0, 1)), batches 3 and 5.
    case = inputs["offset32"]
    layer = SyncBatchNorm(case["C"]).train()
    y = layer(_split(case["x"], case["sizes"], rank))
    res["offset32"] = {"y": y.detach(), "running_var": layer.running_var.clone()}

    # One value per channel over all ranks: every rank must raise.
    case = inputs["too_small"]
    layer = SyncBatchNorm(case["C"]).train()
    try:
        layer(_split(case["x"], case["sizes"], rank))
        res["too_small"] = None
    except ValueError as e:
        res["too_small"] = str(e)

    # Switchable and Attentive Norm made global by to_sync_batchnorm (the protocol),
    # uneven batches with one sample on rank 0; collectives counted.
    for key in ("sn4d", "sn2d", "an3d"):
        case = inputs[key]
        layer = make_mixture(case)
        model = to_sync_batchnorm(nn.Sequential(layer))
        assert model[0] is layer and layer.sync_batch_stats and layer.process_group is None
        with _CountCollectives() as calls:
            res[key] = train_steps_all(layer, case, rank)
        res[key]["calls"] = calls.counts

    # DDP: a model converted from torch.nn.BatchNorm2d, a few SGD steps.
    case = inputs["ddp"]
    model = TinyNet().double()
    model.load_state_dict(case["init"])
    model = to_sync_batchnorm(model)
    assert type(model.bn) is SyncBatchNorm
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=case["lr"], momentum=0.9)
    for x_full, t_full in zip(case["xs"], case["ts"], strict=True):
        x, t = _split(x_full, case["sizes"], rank), _split(t_full, case["sizes"], rank)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), t).backward()
        opt.step()
    res["ddp"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return res


def worker_two(rank: int, world: int, port: int, folder: str) -> None:
    _run(rank, world, port, folder, _cases_two)


# ---------------------------------------------------------------- three ranks


def _cases_three(rank: int, inputs: dict) -> dict:
    res = {}

    # (N, C) input, batches 1, 3, 5, momentum=None (cumulative running statistics).
    res["bn2d"] = _train_steps(_make_bn(inputs["bn2d"]), inputs["bn2d"], rank)

    # (N, C, L) with a padding mask and affine=False, batches 2, 1, 3.
    case = inputs["mask"]
    res["mask"] = _train_steps(_make_bn(case), case, rank, mask_key="masks")

    # A rank with an empty batch, batches 0, 2, 3 on (N, C, H, W).
    res["empty"] = _train_steps(_make_bn(inputs["empty"]), inputs["empty"], rank)

    # A process group of ranks 0 and 2 only; rank 1 does not take part.
    case = inputs["subgroup"]
    group = dist.new_group([0, 2])
    if rank != 1:
        layer = _make_bn(case, process_group=group)
        res["subgroup"] = _train_steps(layer, case, [0, None, 1][rank])
    # A group of one rank: plain BatchNorm, no communication.
    solo = dist.new_group([1])
    if rank == 1:
        case = inputs["solo"]
        with _CountCollectives() as calls:
            res["solo"] = _train_steps(_make_bn(case, process_group=solo), case, 0)
        res["solo"]["calls"] = calls.counts
    # A normlab BatchNorm is converted too; the result is a SyncBatchNorm.
    model = to_sync_batchnorm(nn.Sequential(BatchNorm(3)))
    res["converted_type"] = type(model[0]).__name__
    dist.barrier()
    return res


def worker_three(rank: int, world: int, port: int, folder: str) -> None:
    _run(rank, world, port, folder, _cases_three)


__all__ = ["TinyNet", "free_port", "launch", "worker_two", "worker_three"]


def worker_ddp_train(rank: int, world: int, port: int, folder: str) -> None:
    """normlab.train under DistributedDataParallel: load the model and data the parent
    saved in ``folder/setup.pt``, train with this rank's shard of every batch, save."""
    from torch.nn.parallel import DistributedDataParallel

    from normlab import models
    from normlab.train import train

    def body() -> None:
        setup = torch.load(f"{folder}/setup.pt")
        model = models.mlp((6,), 3, norm="none", width=16, depth=2)
        model.load_state_dict(setup["state"])
        ddp = DistributedDataParallel(model)
        r = train(ddp, setup["x"], setup["y"], steps=10, batch_size=4, lr=0.05, seed=1,
                  rank=rank, world_size=world, progress=False)
        torch.save({"state": model.state_dict(), "steps": r.steps_done},
                   f"{folder}/rank{rank}.pt")

    _init(rank, world, port)
    try:
        body()
    finally:
        gc.collect()  # free the DDP wrapper before its group (see _run)
        dist.destroy_process_group()
