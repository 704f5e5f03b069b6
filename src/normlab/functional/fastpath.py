"""The fast paths: torch's own CPU kernels where they compute a method's math as
accurately as :mod:`normlab.stats`, behind one call per method.

Each public function here (:func:`batch_norm`, :func:`instance_norm`,
:func:`layer_norm`, :func:`channel_layer_norm`, :func:`group_norm`) takes the
arguments of the function of the same name in :mod:`normlab.functional.core` and
returns its output, or ``None`` where no fast path applies (a mask, a
synchronisation hook, another device or dtype, too few elements): the caller then
computes the reference equation. ``path="reference"`` never comes here, and the
tests compare the two paths.

Accuracy
--------
Where torch's own CPU kernel computes the same math at least as robustly as the
composite over normlab.stats, the default path ("auto") calls it; path="reference"
keeps the composite (the tests compare the two). Checked against float64 on
x = 1e4 + N(0, 1) (relative L2 of the output, float32): normlab.stats 3e-4; torch's
batch norm on contiguous input with more than one trailing element 3e-4 to 5e-4 (two
passes, double accumulation); group norm and layer norm on contiguous input 1e-4 to
1e-3 (vectorised Welford). Running statistics are never left to torch (it would
write a NaN batch into them): the native op writes the batch statistics into scratch
buffers (momentum 1) and update_running_pair_ guards the update.

Batch norm on channels_last or (N, C) input and group norm on channels_last input
sum in float32, and their error grows with |mean| / std of a normalization group, R,
and its size n. Measured against float64 (scripts/native_accuracy.py; x = R + N(0, 1),
R from 0 to 300, shapes from (256, 64) to (64, 8, 64, 64)): batch norm's relative
error is at most 0.16 (R + 4) sqrt(n) eps32 (2e-3 to 1.4 at R = 1e4), group norm's
(E[x^2] - E[x]^2) at most 0.2 (R^2 + 1) sqrt(n) eps32 (2e2 at R = 1e4). So these
paths call the kernel on x, read R from the statistics it returns (one host sync,
shared with the NaN guard), and keep the result only if the bound above is below
1e-4; otherwise they redo it on x minus one of its own values per group, a constant:
the normalization is shift-invariant, so output and gradient are those of x, while
the kernel now sums values within a few standard deviations of zero (x - K is exact
for x near K, Sterbenz), 1e-7 relative at R = 1e4. Typical activations (R below 5)
never pay for the second call, except in groups of millions of elements. A badly
computed variance only makes R look larger, never smaller beyond the bound, so the
test errs towards the redo. Under torch.compile and torch.func transforms (no host
sync) the shift is always applied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab import stats
from normlab.functional.common import (
    channel_shape,
    channels_last_format,
    spatial_size,
    update_running_,
    warn_non_finite,
)

__all__ = [
    "batch_norm",
    "instance_norm",
    "layer_norm",
    "channel_layer_norm",
    "group_norm",
    "update_running_pair_",
    "instance_normalized",
    "instance_moments_fast",
]


_HALF = (torch.float16, torch.bfloat16)
# (R + 4) sqrt(n) and (R^2 + 1) sqrt(n) above which the float32 sums of torch's
# channels_last and (N, C) kernels may exceed 1e-4 relative error (see the module docstring).
_BN_SHIFT_LIMIT = 1e-4 / (0.16 * torch.finfo(torch.float32).eps)
_GN_SHIFT_LIMIT = 1e-4 / (0.2 * torch.finfo(torch.float32).eps)
# x dtype -> the dtypes its parameters and buffers may have on the native paths.
_NATIVE_DTYPES = {
    torch.float32: (torch.float32,),
    torch.float64: (torch.float64,),
    torch.bfloat16: (torch.bfloat16, torch.float32),
    torch.float16: (torch.float16, torch.float32),
}


def _native_ok(x: Tensor, *tensors: Tensor | None) -> bool:
    """True if a call on ``x`` with these parameters/buffers may use torch's native CPU
    kernels: CPU, float64/float32/bfloat16/float16, and every other tensor on the CPU
    and of one dtype, either ``x.dtype`` or (half input) float32."""
    allowed = _NATIVE_DTYPES.get(x.dtype)
    if allowed is None or not x.is_cpu:
        return False
    dtype = None
    for t in tensors:  # (a plain loop: this runs on every call of every layer)
        if t is not None:
            if dtype is None:
                dtype = t.dtype
                if dtype not in allowed:
                    return False
            elif t.dtype != dtype:
                return False
            if not t.is_cpu:
                return False
    return True


def _float32_params(x: Tensor, *tensors: Tensor | None) -> bool:
    """For the shifted native paths: half input needs float32 parameters (the shifted
    input is float32)."""
    return x.dtype not in _HALF or all(t is None or t.dtype == torch.float32 for t in tensors)


def _first_value_per_channel(x: Tensor) -> Tensor:
    """``x[0, :, 0, ..., 0]`` shaped to broadcast over ``x``, detached (a shift)."""
    return x.detach()[(0, slice(None)) + (0,) * (x.dim() - 2)].view(channel_shape(x))


def _native_batch_norm_train(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    name: str,
    stats_shape: tuple[int, ...] | None = None,
) -> Tensor:
    """torch's training-mode batch norm on contiguous ``x`` with more than one trailing
    element. In eager mode torch updates the running statistics in its kernel (its
    formula, the unbiased variance, as torch.nn); a copy taken before lets any entry that
    became NaN or infinite be put back, with a RuntimeWarning, as :func:`update_running_`
    does. With ``stats_shape`` (instance norm), and under torch.compile or torch.func,
    the batch statistics go to scratch buffers and :func:`update_running_pair_` updates
    the running statistics (with the average over ``stats_shape[0]`` for instance
    norm)."""
    if running_mean is None or running_var is None:
        return torch.batch_norm(x, weight, bias, None, None, True, 0.0, eps, False)
    if stats_shape is None and _can_sync(x):
        before = torch.cat((running_mean, running_var))
        y = torch.batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps,
                             False)
        if not _running_finite(running_mean, running_var):
            _restore_non_finite_(running_mean, running_var, before, name)
        return y
    # Instance norm, torch.compile and torch.func: one scratch buffer for both statistics
    # (torch sets them to the batch values: momentum 1), then the guarded update. (Under
    # torch.compile, restoring buffers that the kernel updated in place would modify
    # tensors its backward graph saved.)
    batch = torch.zeros(2, x.shape[1], dtype=running_mean.dtype)
    mean, var = batch.unbind(0)
    y = torch.batch_norm(x, weight, bias, mean, var, True, 1.0, eps, False)
    if stats_shape is not None:  # the average of the per-instance values
        batch = batch.view(2, *stats_shape).mean(1)
    update_running_pair_(running_mean, running_var, batch, momentum, name)
    return y


# torch has no public test for a tensor wrapped by a torch.func transform; without this
# private one (a future torch), every call takes the sync-free path: slower, as correct.
_is_func_wrapped = getattr(getattr(torch._C, "_functorch", None),
                           "is_functorch_wrapped_tensor", lambda t: True)


def _can_sync(x: Tensor) -> bool:
    """False where the statistics cannot be read on the host: under torch.compile, and
    for tensors wrapped by torch.func transforms (vmap, grad)."""
    return not (torch.compiler.is_compiling() or _is_func_wrapped(x))


def _largest_abs_product(a: Tensor, b: Tensor) -> float:
    """``max |a * b|`` as a Python float (NaN if any product is NaN), in two small ops
    and a sync (under no_grad rather than detaching: two dispatches fewer)."""
    with torch.no_grad():
        return torch.linalg.vector_norm(a * b, float("inf")).item()


def _running_finite(running_mean: Tensor, running_var: Tensor) -> bool:
    """True if every entry of both running statistics is finite, in one small op and a
    sync: the dot product of two vectors is finite only if both are (a NaN or inf entry
    makes it NaN or inf; an overflow only costs the caller's careful path). Always False
    where no sync is possible (the caller then takes its sync-free path)."""
    if torch.compiler.is_compiling():
        return False
    return math.isfinite(running_mean.dot(running_var).item())


def _restore_non_finite_(
    running_mean: Tensor, running_var: Tensor, before: Tensor, name: str
) -> None:
    """Put back the values of ``before`` (``cat((running_mean, running_var))`` taken
    before an update) wherever the update made a running statistic NaN or infinite, and
    warn naming the channels (no warning under torch.compile, which cannot sync)."""
    with torch.no_grad():
        old_mean, old_var = before.view(2, -1).unbind(0)
        bad = None
        for running, old in ((running_mean, old_mean), (running_var, old_var)):
            finite = torch.isfinite(running)
            running.copy_(torch.where(finite, running, old))
            bad = ~finite if bad is None else bad | ~finite
        if not torch.compiler.is_compiling() and bool(bad.any()):
            warn_non_finite(name, bad, stacklevel=5)


def _batch_norm_float_sums(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    name: str,
) -> Tensor:
    """Training-mode batch norm of channels_last or ``(N, C)`` input by torch's kernel,
    whose sums are float32: kept when the statistics it returns bound its error below
    1e-4, else redone on the input shifted per channel (see the module docstring)."""
    update = training and running_mean is not None and running_var is not None
    count = x.numel() // x.shape[1]
    if _can_sync(x):
        before = torch.cat((running_mean, running_var)) if update else None
        y, mean, invstd = torch.native_batch_norm(
            x, weight, bias, running_mean if update else None,
            running_var if update else None, True, momentum, eps)
        # The largest R = |mean| / sqrt(var + eps), in as few small ops as possible: each
        # costs microseconds, more when caches are cold, on every training call.
        worst = _largest_abs_product(mean, invstd)
        if (worst + 4.0) * math.sqrt(count) <= _BN_SHIFT_LIMIT or not math.isfinite(worst):
            # (non-finite statistics: shifting cannot help those either)
            if update and not _running_finite(running_mean, running_var):
                _restore_non_finite_(running_mean, running_var, before, name)
            return y
        if update:
            with torch.no_grad():
                running_mean.copy_(before[:x.shape[1]])
                running_var.copy_(before[x.shape[1]:])
    shift = _first_value_per_channel(x)
    # (half input: x - shift in float32, where it is exact, as normlab.stats would.)
    xs = x - shift.to(stats.stat_dtype(x.dtype))
    if not update:
        return torch.batch_norm(xs, weight, bias, None, None, True, 0.0, eps, False).to(x.dtype)
    batch = torch.zeros(2, x.shape[1], dtype=running_mean.dtype)
    y = torch.batch_norm(xs, weight, bias, batch[0], batch[1], True, 1.0, eps, False)
    # (not in place: autograd saved the scratch buffers)
    batch = torch.stack((batch[0] + shift.flatten().to(batch.dtype), batch[1]))
    update_running_pair_(running_mean, running_var, batch, momentum, name)
    return y.to(x.dtype)



def update_running_pair_(
    running_mean: Tensor, running_var: Tensor, batch: Tensor, factor: float, name: str
) -> None:
    """:func:`update_running_` of both running statistics from ``batch`` of shape
    ``(2, C)`` (mean, unbiased variance), in two small ops when all are finite."""
    with torch.no_grad():
        if (not torch.compiler.is_compiling() and batch.dtype == running_mean.dtype
                and running_mean.dtype == running_var.dtype
                and math.isfinite(batch.sum().item())):
            torch._foreach_lerp_((running_mean, running_var), batch.unbind(0), factor)
            return
    update_running_(running_mean, batch[0], factor, name)
    update_running_(running_var, batch[1], factor, name)


def instance_normalized(xr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_hat, mean, var)`` of ``xr`` of shape ``(N, C, L)``, per (n, c) over L:
    ``x_hat = (x - mean) / sqrt(var)`` (0 where var is 0) in the statistics dtype, and
    the mean and biased variance as ``(N, C)`` float64, without autograd.

    float32/float64 CPU input with L > 1 uses torch's native group norm with one group
    per channel (vectorised Welford, the statistics as robust as normlab.stats; x_hat
    as ``x * r - mean * r``, which for |mean| >> std carries an absolute error of about
    ``|x| / std`` float32 ulps: callers multiply it by a factor proportional to std).
    Otherwise :func:`normlab.stats.moments`.
    """
    n, c, length = xr.shape
    tiny = 1e-30  # x_hat = 0, not 0 * inf, where var = 0
    with torch.no_grad():
        if length > 1 and xr.dtype in (torch.float32, torch.float64) and _native_ok(xr):
            x_hat, mean, rstd = torch.ops.aten.native_group_norm(
                xr.contiguous(), None, None, n, c, length, c, tiny)
            rstd = rstd.double().view(n, c)
            var = (1.0 / (rstd * rstd) - tiny).clamp_min(0.0)
            return x_hat, mean.double().view(n, c), var
        mean, var, _ = stats.moments(xr, 2)
        x_hat = (xr.to(mean.dtype) - mean) * torch.rsqrt(var + tiny)
        return x_hat, mean.double().view(n, c), var.double().view(n, c)


class _InstanceMoments(torch.autograd.Function):
    """Mean and biased variance of ``(N, C, L)`` over L, with the closed-form backward
    ``dx = g_mean / L + g_var * 2 (x - mean) / L`` (one pass; x - mean kept as
    ``x_hat * std``)."""

    @staticmethod
    def forward(ctx, xr):
        x_hat, mean, var = instance_normalized(xr)
        dtype = stats.stat_dtype(xr.dtype)
        std = torch.sqrt(var).to(dtype).unsqueeze(2)
        ctx.save_for_backward(x_hat, std)
        return mean.to(dtype).unsqueeze(2), var.to(dtype).unsqueeze(2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_var):
        x_hat, std = ctx.saved_tensors
        length = x_hat.shape[2]
        if grad_mean is None:
            grad_mean = torch.zeros_like(std)
        if grad_var is None:
            grad_var = torch.zeros_like(std)
        dx = torch.addcmul((grad_mean / length).expand_as(x_hat), x_hat,
                           grad_var * std * (2.0 / length))
        return dx


def instance_moments_fast(xr: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, var)`` of ``xr`` ``(N, C, L)`` over L, shaped ``(N, C, 1)`` in
    :func:`normlab.stats.stat_dtype`, differentiable (closed-form backward, first order
    only). The statistics come from :func:`instance_normalized` (torch's native group
    norm with one group per channel on float32/float64 CPU input, else
    :func:`normlab.stats.moments`). Used by Switchable and Attentive Normalization."""
    if torch.is_grad_enabled() and xr.requires_grad:
        return _InstanceMoments.apply(xr)
    _, mean, var = instance_normalized(xr)
    dtype = stats.stat_dtype(xr.dtype)
    return mean.to(dtype).unsqueeze(2), var.to(dtype).unsqueeze(2)



def _group_norm_float_sums(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
    group_size: int,
) -> Tensor:
    """Group norm of channels_last ``x`` by torch's kernel, which computes
    ``E[x^2] - E[x]^2`` in float32: kept when the statistics it returns bound its error
    below 1e-4, else redone on ``x`` shifted by its first value in each (sample, group)
    (see the module docstring)."""
    n, c = x.shape[:2]
    if _can_sync(x):
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, spatial_size(x),
                                                num_groups, eps)
        # The largest R = |mean| / sqrt(var + eps) over (sample, group); NaN for
        # non-finite statistics, which shifting cannot help: y is kept.
        worst = _largest_abs_product(mean, rstd)
        if not (worst * worst + 1.0) * math.sqrt(group_size) > _GN_SHIFT_LIMIT:
            return y
    first = x.detach()[(slice(None), slice(None, None, c // num_groups))
                       + (0,) * (x.dim() - 2)]
    shift = first.repeat_interleave(c // num_groups, 1).to(stats.stat_dtype(x.dtype))
    return torch.group_norm(x - shift.view((n, c) + (1,) * (x.dim() - 2)), num_groups,
                            weight, bias, eps, False).to(x.dtype)



def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    mask: Tensor | None,
    name: str,
    moments_fn=None,
) -> Tensor | None:
    """:func:`normlab.functional.batch_norm` by torch's kernel, or None. In eval, the
    running statistics normalize; in training, contiguous input with more than one
    trailing element takes torch's two-pass kernel, and channels_last or ``(N, C)``
    input its float32-sum kernel with the bound check and shift-and-redo."""
    if (mask is not None or moments_fn is not None or x.dim() < 2
            or not _native_ok(x, weight, bias, running_mean, running_var)):
        return None
    if not training and running_mean is not None and running_var is not None:
        return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0,
                                eps, False)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if count <= 1:
        return None  # the reference raises its error naming the layer
    if x.dim() > 2 and count > x.shape[0] and x.is_contiguous():
        return _native_batch_norm_train(
            x, running_mean if training else None, running_var if training else None,
            weight, bias, momentum, eps, name)
    if _float32_params(x, weight, bias, running_mean, running_var):
        return _batch_norm_float_sums(x, running_mean, running_var, weight, bias,
                                      training, momentum, eps, name)
    return None


def instance_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    name: str,
) -> Tensor | None:
    """:func:`normlab.functional.instance_norm` by torch's batch norm on the input viewed
    as ``(1, N*C, *)`` (what torch.nn.InstanceNorm does), or None."""
    if x.dim() < 3 or not _native_ok(x, weight, bias, running_mean, running_var):
        return None
    if not use_input_stats:
        return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0,
                                eps, False)
    n, c = x.shape[:2]
    if not (n * c and x.numel() > n * c):
        return None  # the reference raises its error naming the layer
    xr = x.contiguous().view(1, n * c, *x.shape[2:])
    w = None if weight is None else weight.repeat(n)
    b = None if bias is None else bias.repeat(n)
    y = _native_batch_norm_train(xr, running_mean, running_var, w, b, momentum, eps, name,
                                 stats_shape=(n, c))
    return y.view(x.shape)


def layer_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, mask: Tensor | None
) -> Tensor | None:
    """:func:`normlab.functional.layer_norm` as group norm with one group (the same math,
    with the per-channel affine built in), or None."""
    if (mask is not None or x.dim() < 2 or not _native_ok(x, weight, bias)
            or x.numel() <= x.shape[0]):
        return None
    if x.is_contiguous():
        return torch.group_norm(x, 1, weight, bias, eps, False)
    return group_norm(x, 1, weight, bias, eps, None)


def layer_norm_last(x: Tensor, shape: tuple[int, ...], weight: Tensor | None,
                    bias: Tensor | None, eps: float, mask: Tensor | None) -> Tensor | None:
    """:func:`normlab.functional.layer_norm` over the last dimensions (``normalized_shape``)
    by torch's own layer norm, the same function, or None."""
    if mask is not None or not _native_ok(x, weight, bias):
        return None
    return F.layer_norm(x, shape, weight, bias, eps)


def rms_norm_last(x: Tensor, shape: tuple[int, ...], weight: Tensor | None,
                  eps: float | None, mask: Tensor | None) -> Tensor | None:
    """:func:`normlab.functional.rms_norm` over the last dimensions by torch's own RMS
    norm, or None."""
    if mask is not None or not _native_ok(x, weight):
        return None
    return F.rms_norm(x, shape, weight, eps)


def channel_layer_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor | None:
    """:func:`normlab.functional.channel_layer_norm` by torch's layer norm over C moved
    last (timm's LayerNorm2d; no copy for channels_last input), or None."""
    if x.shape[1] <= 1 or not _native_ok(x, weight, bias):
        return None
    return F.layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, eps).movedim(-1, 1)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    mask: Tensor | None,
) -> Tensor | None:
    """:func:`normlab.functional.group_norm` by torch's kernel (vectorised Welford on
    contiguous input; on channels_last input the float32-sum kernel with the bound check
    and shift-and-redo), or None."""
    if (mask is not None or x.dim() < 2 or x.shape[1] % num_groups != 0
            or not _native_ok(x, weight, bias)):
        return None
    group_size = (x.shape[1] // num_groups) * spatial_size(x)
    if group_size <= 1:
        # Groups of one element: (x - mean) must be exactly 0, which torch's x * a + b
        # is not.
        return None
    if x.is_contiguous():
        return torch.group_norm(x, num_groups, weight, bias, eps, False)
    if channels_last_format(x) is not None and _float32_params(x, weight, bias):
        return _group_norm_float_sums(x, num_groups, weight, bias, eps, group_size)
    return torch.group_norm(x.contiguous(), num_groups, weight, bias, eps, False)
