r"""Fused Online Norm training step on the CPU: online normalization, the per-channel
affine and layer scaling (or no ECM), forward and the paper's backward, in the C++
kernels of ``csrc/online_kernels.cpp``.

The kernels walk the batch sample by sample, the order the method takes: for sample n
they read its C rows once, take each row's mean and variance, advance every channel's
streaming statistics (forward) or controllers (backward) one step, and write the
sample's output (or input gradient) from the rows still in cache. Everything between
the per-(n, c) sums and the final write is algebra on (N, C) numbers in double:
the output is :math:`(x - s) A + B` and the input gradient :math:`P g + Q (x - s) + R`
per (n, c), with s a float value of the row's mean (so large means cost no accuracy).
The math is that of :func:`normlab.functional.online_norm` followed by the affine and
:func:`normlab.functional.layer_scaling`; the buffers are updated as there (the NaN
guard included).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from normlab.functional.common import update_running_
from normlab.kernels._build import load_library
from normlab.kernels._tensors import DTYPES as _DTYPES
from normlab.kernels._tensors import ptr as _ptr

__all__ = ["online_norm", "supports"]

def supports(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> bool:
    """True if the fused kernel can run on ``x``: a non-empty contiguous CPU float32 or
    bfloat16 tensor of shape ``(N, C, *)``, with float32 affine parameters (or none)."""
    return (
        x.device.type == "cpu"
        and x.dtype in _DTYPES
        and x.dim() >= 2
        and x.numel() > 0
        and x.is_contiguous()
        and all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu")
                for t in (weight, bias))
    )


class _FusedOnlineNorm(torch.autograd.Function):
    """Forward and the paper's backward in the C++ kernels. ``state`` is the tuple of
    buffers (running_mean, running_var, u, v): the first two are updated in forward,
    u and v in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, state, alpha_fwd, alpha_bkw, eps, ls, ls_eps, name):
        running_mean, running_var, u, v = state
        n, c = x.shape[:2]
        length = math.prod(x.shape[2:])
        f64 = torch.float64
        mu = running_mean.detach().to(f64, copy=True)
        var = running_var.detach().to(f64, copy=True)
        nc = torch.empty(n, 5, c, dtype=f64)
        ls_scale = torch.empty(n, dtype=f64)
        w = None if weight is None else weight.detach().contiguous()
        b = None if bias is None else bias.detach().contiguous()
        y = torch.empty_like(x)
        rc = load_library().normlab_online_fwd(
            x.data_ptr(), y.data_ptr(), _DTYPES[x.dtype], n, c, length, _ptr(w), _ptr(b),
            alpha_fwd, eps, int(ls), ls_eps, mu.data_ptr(), var.data_ptr(), nc.data_ptr(),
            ls_scale.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"{name}: fused Online Norm kernel error {rc}")
        update_running_(running_mean, mu, 1.0, name)
        update_running_(running_var, var, 1.0, name)
        # x (not y): an in-place op on the output must not corrupt what backward reads.
        ctx.save_for_backward(x, w, b, nc, ls_scale)
        ctx.state = (u, v)
        ctx.meta = (n, c, length, 1.0 - alpha_bkw, int(ls), name)
        ctx.param_dtypes = (None if weight is None else weight.dtype,
                            None if bias is None else bias.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, w, b, nc, ls_scale = ctx.saved_tensors
        u, v = ctx.state
        n, c, length, kb, ls, name = ctx.meta
        g = grad_out.to(x.dtype).contiguous()
        f64 = torch.float64
        u_all = u.detach().to(f64, copy=True)
        v_all = v.detach().to(f64, copy=True)
        dwb = torch.zeros(2, c, dtype=f64)
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        rc = load_library().normlab_online_bwd(
            g.data_ptr(), x.data_ptr(), _ptr(dx), _DTYPES[x.dtype], n, c, length, _ptr(w),
            _ptr(b), kb, ls, nc.data_ptr(), ls_scale.data_ptr(), u_all.data_ptr(),
            v_all.data_ptr(), dwb.data_ptr(), dwb[1].data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"{name}: fused Online Norm kernel error {rc} in backward")
        update_running_(u, u_all, 1.0, name)
        update_running_(v, v_all, 1.0, name)
        w_dtype, b_dtype = ctx.param_dtypes
        gw = dwb[0].to(w_dtype) if w_dtype is not None and ctx.needs_input_grad[1] else None
        gb = dwb[1].to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None
        return dx, gw, gb, None, None, None, None, None, None, None


def online_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    u: Tensor,
    v: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    alpha_fwd: float = 0.999,
    alpha_bkw: float = 0.99,
    eps: float = 1e-5,
    layer_scaling: bool = True,
    ls_eps: float = 1e-5,
    name: str = "normlab.kernels.online_norm",
) -> Tensor:
    r"""One training step of Online Norm, then ``weight * y + bias`` (if given), then
    layer scaling (if ``layer_scaling``), in the fused CPU kernels.

    The math (outputs, the paper's backward, the buffer updates) is that of
    :func:`normlab.functional.online_norm` (training) followed by the affine and
    :func:`normlab.functional.layer_scaling`; results agree with that path within
    float32 rounding. ``running_mean``, ``running_var`` are updated in forward, ``u``,
    ``v`` in backward (a channel whose new value is not finite keeps its old one, with a
    RuntimeWarning). First-order gradients only (double backward raises).

    Raises:
        ValueError: the kernel does not apply to ``x`` (see :func:`supports`).
    """
    if not supports(x, weight, bias):
        raise ValueError(
            f"{name}: the fused kernel needs a non-empty contiguous CPU float32/bfloat16 "
            f"tensor (N, C, *) and float32 affine parameters, got {x.dtype} "
            f"{tuple(x.shape)} on {x.device} (contiguous={x.is_contiguous()})"
        )
    return _FusedOnlineNorm.apply(
        x, weight, bias, (running_mean, running_var, u, v), float(alpha_fwd),
        float(alpha_bkw), float(eps), bool(layer_scaling), float(ls_eps), name,
    )
