"""Fused batch norm (+ activation) on the CPU, forward and backward, and its
memory-saving variant that keeps only the output for backward.

One pass of the C++ kernel per direction does what eager PyTorch does in many: the
forward takes the per-channel statistics (corrected two-pass, cache-blocked, see
``csrc/norm_kernels.cpp``) and writes ``act((x - mean) / sqrt(var + eps) * w + b)``;
the backward takes the two per-channel sums it needs and writes dx, dw, db.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab import stats
from normlab.functional.common import batch_dims
from normlab.functional.core import batch_norm as _default_batch_norm
from normlab.functional.fastpath import update_running_pair_
from normlab.kernels._build import load_library
from normlab.kernels._tensors import DTYPES as _DTYPES
from normlab.kernels._tensors import layout as _layout
from normlab.kernels._tensors import ptr as _ptr

__all__ = ["batch_norm", "supports", "ACTIVATIONS"]

#: Activation names accepted by :func:`batch_norm` and their kernel codes.
ACTIVATIONS = {None: 0, "identity": 0, "relu": 1, "leaky_relu": 2}
def supports(x: Tensor, weight: Tensor | None = None) -> bool:
    """True if the fused kernel can run on ``x``: a CPU float32 or bfloat16 tensor,
    contiguous or channels_last, with float32 affine parameters (or none)."""
    return (
        x.device.type == "cpu"
        and x.dtype in _DTYPES
        and x.dim() >= 2
        and x.numel() > 0
        and _layout(x) is not None
        and (weight is None or weight.dtype == torch.float32)
    )


def _act_code(activation: str | None) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"normlab.kernels.batch_norm: activation must be one of "
            f"{sorted(k for k in ACTIVATIONS if k)} or None, got {activation!r}"
        )
    return ACTIVATIONS[activation]


class _FusedBatchNorm(torch.autograd.Function):
    """Forward and backward in the C++ kernels. ``stats`` (float32, (2, C)) receives
    the batch mean and unbiased variance for the running statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope, save_output, layout, stats):
        lib = load_library()
        kind, n, c, length = layout
        x_dtype = _DTYPES[x.dtype]
        y = torch.empty_like(x)
        mean_invstd = torch.empty(2, c, dtype=torch.float64)
        w = None if weight is None else weight.detach().contiguous()
        b = None if bias is None else bias.detach().contiguous()
        rc = lib.normlab_bn_fwd(x.data_ptr(), y.data_ptr(), x_dtype, kind, n, c, length,
                                _ptr(w), _ptr(b), eps, act, slope, mean_invstd.data_ptr(),
                                mean_invstd[1].data_ptr(), _ptr(stats),
                                torch.get_num_threads())
        if rc:
            raise RuntimeError(f"normlab.kernels.batch_norm: kernel error {rc}")
        ctx.save_for_backward(y if save_output else x, w, b, mean_invstd)
        ctx.meta = (kind, n, c, length, x_dtype, act, slope, bool(save_output))
        ctx.param_dtypes = (None if weight is None else weight.dtype,
                            None if bias is None else bias.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        saved, w, b, mean_invstd = ctx.saved_tensors
        kind, n, c, length, x_dtype, act, slope, from_out = ctx.meta
        # The gradient must have the saved tensor's memory layout.
        if kind == 1 and length > 1:
            fmt = torch.channels_last if saved.dim() == 4 else torch.channels_last_3d
            grad_y = grad_y.contiguous(memory_format=fmt)
        else:
            grad_y = grad_y.contiguous()
        grad_y = grad_y.to(saved.dtype)
        dx = torch.empty_like(saved) if ctx.needs_input_grad[0] else None
        dwb = torch.empty(2, c, dtype=torch.float64)
        rc = load_library().normlab_bn_bwd(
            grad_y.data_ptr(), saved.data_ptr(), _ptr(dx), x_dtype, kind, n, c, length,
            _ptr(w), _ptr(b), mean_invstd.data_ptr(), mean_invstd[1].data_ptr(), act, slope,
            int(from_out), dwb.data_ptr(), dwb[1].data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"normlab.kernels.batch_norm: kernel error {rc} in backward")
        w_dtype, b_dtype = ctx.param_dtypes
        gw = dwb[0].to(w_dtype) if w_dtype is not None and ctx.needs_input_grad[1] else None
        gb = dwb[1].to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None
        return dx, gw, gb, None, None, None, None, None, None


def _inv_act(z: Tensor, act: int, slope: float) -> Tensor:
    return z if act == 0 else torch.where(z >= 0, z, z / slope)


def _dact(z: Tensor, act: int, slope: float) -> Tensor:
    if act == 0:
        return torch.ones_like(z)
    return torch.where(z >= 0, torch.ones_like(z), torch.full_like(z, slope))


def _apply_act(y: Tensor, act: int, slope: float) -> Tensor:
    if act == 0:
        return y
    if act == 1:
        return torch.relu(y)
    return torch.nn.functional.leaky_relu(y, slope)


class _SaveOutputBatchNorm(torch.autograd.Function):
    """Eager memory-saving batch norm + invertible activation (any dtype, any layout):
    keeps only the output z and per-channel statistics; backward recovers
    ``x_hat = (act^-1(z) - b) / w``. The reference for the fused kernel's mode."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope):
        dims = batch_dims(x)
        mean, var, _ = stats.moments(x, dims)
        compute = mean.dtype
        shape = mean.shape
        scale = torch.rsqrt(var + eps)
        w = torch.ones(shape, dtype=compute) if weight is None else weight.to(compute).view(shape)
        b = torch.zeros(shape, dtype=compute) if bias is None else bias.to(compute).view(shape)
        y = torch.addcmul(b, x.to(compute) - mean, scale * w)
        z = _apply_act(y, act, slope).to(x.dtype)
        ctx.save_for_backward(z, w, b, scale)
        ctx.meta = (act, slope, dims, weight is not None, bias is not None)
        ctx.mark_non_differentiable(mean, var)
        return z, mean.flatten(), var.flatten()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z, _gm, _gv):
        z, w, b, scale = ctx.saved_tensors
        act, slope, dims, has_w, has_b = ctx.meta
        compute = w.dtype
        zc = z.to(compute)
        dy = grad_z.to(compute) * _dact(zc, act, slope)
        x_hat = (_inv_act(zc, act, slope) - b) / w
        count = z.numel() // z.shape[1]
        sum_dy = dy.sum(dims, keepdim=True)
        sum_dy_xhat = (dy * x_hat).sum(dims, keepdim=True)
        dx = (w * scale) * (dy - sum_dy / count - x_hat * (sum_dy_xhat / count))
        gw = sum_dy_xhat.flatten() if has_w else None
        gb = sum_dy.flatten() if has_b else None
        return dx.to(grad_z.dtype), gw, gb, None, None, None


def _check_invertible(act: int, negative_slope: float, name: str) -> None:
    """save_memory recovers the input from the output: the activation must invert."""
    if act == 2 and negative_slope <= 0:
        raise ValueError(f"{name}: save_memory needs negative_slope > 0, got {negative_slope}")
    if act == 1:
        raise ValueError(
            f"{name}: save_memory needs an invertible activation (None or 'leaky_relu'); "
            "relu loses the sign of its input"
        )


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = None,
    negative_slope: float = 0.01,
    save_memory: bool = False,
    fused: bool = True,
    name: str = "normlab.kernels.batch_norm",
) -> Tensor:
    r"""Batch norm followed by an optional activation, with a fused CPU kernel.

    .. math::
        z = \mathrm{act}\Big(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\,\gamma
            + \beta\Big)

    the math of :func:`normlab.functional.batch_norm` (then ``act`` = identity,
    ``"relu"`` or ``"leaky_relu"`` with ``negative_slope``), with the same running
    statistics conventions (``momentum`` weighs the new batch, unbiased variance) and
    the same guard: a channel whose batch statistic is NaN or inf keeps its running
    value, with a RuntimeWarning.

    * ``fused=True`` (default) runs the C++ kernels (compiled at first use, see
      :mod:`normlab.kernels`) in training for CPU float32/bfloat16 input that is
      contiguous or channels_last with float32 affine parameters; anything else, and
      eval, takes the default path of :func:`normlab.functional.batch_norm` followed
      by the activation. Outputs and gradients equal the default path's within float32
      rounding. No double backward through the fused kernel.
    * ``save_memory=True`` keeps only the output ``z`` for backward (not the input):
      backward recovers :math:`\hat x = (\mathrm{act}^{-1}(z) - \beta)/\gamma`, as
      InPlace-ABN (Rota Bulo et al., 2018) does. This needs an invertible activation
      (identity or ``leaky_relu`` with ``negative_slope > 0``, not ``"relu"``) and a
      weight with no zero entry (otherwise the input is kept, as without the option).
      The precision of the gradient is then that of ``z`` (bfloat16 output: bfloat16
      precision of :math:`\hat x`). When the next layer saves ``z`` anyway (a
      convolution does), the block keeps one tensor instead of two.
    """
    act = _act_code(activation)
    if save_memory:
        _check_invertible(act, negative_slope, name)
    use_batch = training or running_mean is None or running_var is None
    if not use_batch:
        y = _default_batch_norm(x, running_mean, running_var, weight, bias, False, momentum,
                                eps, name=name)
        return _apply_act(y, act, negative_slope)
    # An empty batch (as torch.nn, an empty output) and the meta device (shapes only)
    # take the default path: nothing to save, no weight values to look at.
    keep_output = (save_memory and x.numel() > 0 and x.device.type != "meta"
                   and (weight is None or not bool((weight == 0).any())))
    layout = _layout(x) if x.dim() >= 2 and x.numel() > 0 else None
    kernel = (fused and layout is not None and x.device.type == "cpu" and x.dtype in _DTYPES
              and all(t is None or t.dtype == torch.float32 for t in (weight, bias)))
    if not (kernel or keep_output):
        y = _default_batch_norm(x, running_mean, running_var, weight, bias, training,
                                momentum, eps, name=name)
        return _apply_act(y, act, negative_slope)
    count = x.numel() // x.shape[1]
    if count <= 1:
        raise ValueError(
            f"{name}: batch statistics need more than 1 value per channel, got input of "
            f"shape {tuple(x.shape)}"
        )
    update = training and running_mean is not None and running_var is not None
    if kernel:
        stats_buf = torch.empty(2, x.shape[1]) if update else None
        y = _FusedBatchNorm.apply(x, weight, bias, float(eps), act, float(negative_slope),
                                  keep_output, layout, stats_buf)
    else:
        y, mean, var = _SaveOutputBatchNorm.apply(x, weight, bias, float(eps), act,
                                                  float(negative_slope))
        stats_buf = torch.stack((mean, var * (count / (count - 1)))) if update else None
    if update:
        update_running_pair_(running_mean, running_var, stats_buf.to(running_mean.dtype),
                             momentum, name)
    return y
