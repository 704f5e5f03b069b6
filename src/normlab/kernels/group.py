r"""Fused group norm (and layer norm, its one-group case) on the CPU, forward and
backward, in the C++ kernels of ``csrc/group_kernels.cpp``.

Why: torch's channels_last group norm is slow in training (at (32, 64, 32, 32)
float32, 1 thread: about 13 copies of the tensor's worth of time, mostly its backward),
against at least 2.5 copies for a training step (forward: read x, write y; backward:
read g and x, write dx). Measured with ``normlab bench --layers GroupNorm LayerNorm
--modes train --passes fwd+bwd`` (three runs, 1 thread; ratios are torch's time over
the fused time): GroupNorm(C, 32) channels_last 3.1-3.3x torch at (32, 64, 32, 32)
float32, 12-13x in bfloat16, median 3.4-3.6x over the channels_last cells (about 1x at
(8, 256, 16, 16) float32); contiguous NCHW 0.7-1.1x (median 0.87-0.94x: torch's NCHW
kernels are near the memory floor already, and small tensors pay the Python and ctypes
overhead). LayerNorm (one group) is about as fast as normlab's default path (median
0.93-0.97x; 1.3-1.4x at (32, 64, 32, 32) channels_last). The
kernels take, per (sample, group), the statistics in one pass (corrected if the
first estimate of the mean was far off, see the C++ file) and write
:math:`(x - k)\,a_c + b_c` from the rows still in cache; the backward takes the
per-(sample, channel) sums of :math:`g` and :math:`g\,(x - k)` and writes

.. math::
    \frac{\partial L}{\partial x} = \frac{1}{\sigma}\Big(\gamma_c g
        - \overline{\gamma g} - \hat x\,\overline{\gamma g \hat x}\Big)

(bars: means over the group of sample n), with dweight and dbias summed over the
samples in a fixed order. Group norm has no running statistics, so training and eval
are the same math.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.functional.core import group_norm as _default_group_norm
from normlab.kernels._build import load_library
from normlab.kernels._tensors import DTYPES as _DTYPES
from normlab.kernels._tensors import layout as _layout
from normlab.kernels._tensors import ptr as _ptr

__all__ = ["group_norm", "supports"]

def _kernel_layout(x: Tensor, num_groups: int, weight: Tensor | None,
                   bias: Tensor | None) -> tuple[int, int, int, int] | None:
    """:func:`_layout` where the kernel applies, else None (see :func:`supports`).
    Plain checks, no generators: this runs on every call of a fused layer."""
    if not x.is_cpu or x.dtype not in _DTYPES or x.dim() < 2 or x.numel() == 0:
        return None
    c = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        return None
    for t in (weight, bias):
        if t is not None and (not t.is_cpu or t.dtype != torch.float32 or t.dim() != 1
                              or t.shape[0] != c):
            return None
    layout = _layout(x)
    if layout is None or (c // num_groups) * layout[3] < 2:
        return None  # another memory layout, or groups of one element
    return layout


def supports(x: Tensor, num_groups: int, weight: Tensor | None = None,
             bias: Tensor | None = None) -> bool:
    """True if the fused kernel can run on ``x``: a non-empty CPU float32 or bfloat16
    tensor ``(N, C, *)``, contiguous or channels_last(_3d), C divisible by
    ``num_groups``, more than one element per group, and float32 CPU affine parameters
    of shape (C,) (or none)."""
    return _kernel_layout(x, num_groups, weight, bias) is not None


class _FusedGroupNorm(torch.autograd.Function):
    """Forward and backward in the C++ kernels; saves x, the weight and the per-(n, g)
    mean and 1/sqrt(var + eps) (float64)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, layout, name):
        kind, n, c, length = layout
        y = torch.empty_like(x)
        ng = n * num_groups
        stats = torch.empty(2 * ng, dtype=torch.float64)  # means, then 1/sqrt(var + eps)
        rc = load_library().normlab_gn_fwd(
            x.data_ptr(), y.data_ptr(), _DTYPES[x.dtype], kind, n, c, length, num_groups,
            _ptr(weight), _ptr(bias), eps, stats.data_ptr(), stats.data_ptr() + 8 * ng,
            torch.get_num_threads())
        if rc:
            raise RuntimeError(f"{name}: fused group norm kernel error {rc}")
        ctx.save_for_backward(x, weight, stats)
        ctx.meta = (layout, num_groups, name, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (kind, n, c, length), num_groups, name, has_bias = ctx.meta
        if torch.is_grad_enabled():
            # The engine enables grad mode in backward only for create_graph=True.
            raise RuntimeError(
                f"{name}: the fused group norm kernel is first-order only; double backward "
                "(create_graph=True) is not supported. Use fused=False for higher-order "
                "gradients."
            )
        x, weight, stats = ctx.saved_tensors
        # The gradient must have the saved input's memory layout and dtype.
        if grad_y.dtype != x.dtype or grad_y.stride() != x.stride():
            if kind == 1 and length > 1:
                fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
                grad_y = grad_y.to(x.dtype).contiguous(memory_format=fmt)
            else:
                grad_y = grad_y.to(x.dtype).contiguous()
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dwb = torch.empty(2, c)
        ng = n * num_groups
        rc = load_library().normlab_gn_bwd(
            grad_y.data_ptr(), x.data_ptr(), _ptr(dx), _DTYPES[x.dtype], kind, n, c, length,
            num_groups, _ptr(weight), stats.data_ptr(), stats.data_ptr() + 8 * ng,
            dwb.data_ptr(), dwb.data_ptr() + 4 * c, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"{name}: fused group norm kernel error {rc} in backward")
        gw = dwb[0] if weight is not None and ctx.needs_input_grad[1] else None
        gb = dwb[1] if has_bias and ctx.needs_input_grad[2] else None
        return dx, gw, gb, None, None, None, None


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    name: str = "normlab.kernels.group_norm",
) -> Tensor:
    r"""Group normalization with the fused CPU kernels where :func:`supports` says so.

    .. math::
        y_{n,c,\dots} = \frac{x_{n,c,\dots} - \mu_{n,g(c)}}{\sqrt{\sigma_{n,g(c)}^2
            + \epsilon}}\,\gamma_c + \beta_c

    the math of :func:`normlab.functional.group_norm` (``num_groups = 1``: layer norm
    over ``C x *`` with a per-channel affine). Input the kernel does not support (other
    dtypes or devices, other memory layouts, groups of one element) takes that default
    path. Outputs and gradients equal the float64 math within float32 rounding (bfloat16:
    computed in float32, rounded once on store); the output keeps the input's memory
    layout. First-order only: double backward raises an error.
    """
    layout = _kernel_layout(x, num_groups, weight, bias)
    if layout is None:
        return _default_group_norm(x, num_groups, weight, bias, eps)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    return _FusedGroupNorm.apply(x, weight, bias, num_groups, float(eps), layout, name)
