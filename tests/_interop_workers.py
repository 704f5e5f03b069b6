"""The ranks of the 2-process gloo test of tests/project/test_interop_real.py (importable by
spawned children): each loads the timm model the parent saved, converts it with
:func:`normlab.nn.to_sync_batchnorm`, trains one step on its half of the batch and
saves what it got for the parent to compare with the single-process model."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import normlab
from _dist_workers import _init


def build_efficientnet():
    """A small timm EfficientNet: BatchNormAct2d (SiLU) in every block; float64."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=5, drop_rate=0.0,
                              drop_path_rate=0.0)
    return model.double().train()


def train_step(model, x, g) -> dict:
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return {"y": y.detach(), "dx": x.grad, "grads": grads, "buffers": buffers}


def sync_worker(rank: int, world: int, port: int, folder: str) -> None:
    _init(rank, world, port)
    try:
        case = torch.load(os.path.join(folder, "inputs.pt"), weights_only=False)
        model = build_efficientnet()
        model.load_state_dict(case["state"])
        model = normlab.nn.to_sync_batchnorm(model)
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if isinstance(m, normlab.nn.SyncBatchNorm)})
        acts = sorted({type(m.act).__name__ for m in model.modules()
                       if isinstance(m, normlab.nn.SyncBatchNormAct)})
        half = case["x"].shape[0] // world
        part = slice(rank * half, (rank + 1) * half)
        out = train_step(model, case["x"][part], case["g"][part])
        out.update(kinds=kinds, acts=acts)
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
