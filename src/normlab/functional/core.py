"""Every normalization method as a function of tensors.

Inputs are channel-first, ``(N, C, *)`` with any number of trailing (spatial or
time) dimensions. Statistics come from :mod:`normlab.stats`; this module holds the
arithmetic that turns them into outputs, and the in-place update of running
statistics for the methods that keep them. The modules in :mod:`normlab.nn` hold
parameters and buffers and call these functions.

Each function normalizes in the statistics dtype (float32 for half inputs) and
returns the input's dtype.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch.nn import functional as tnf

from normlab import stats

__all__ = [
    "batch_norm",
    "batch_renorm",
    "renorm_limits",
    "layer_norm",
    "channel_layer_norm",
    "rms_norm",
    "instance_norm",
    "group_norm",
    "normalize",
    "update_running_",
    "check_input",
    "instance_normalized",
    "instance_moments_fast",
]


def check_input(x: Tensor, num_channels: int, name: str, min_dim: int = 2) -> None:
    """Raise ValueError naming the layer if ``x`` is not a float ``(N, C, *)`` tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{name}: expected input of shape (N, C, *) with at least {min_dim} dimensions, "
            f"got shape {tuple(x.shape)} ({x.dim()} dimension{'s' if x.dim() != 1 else ''})"
        )
    if x.shape[1] != num_channels:
        raise ValueError(
            f"{name}: expected {num_channels} channels in dimension 1 of input (N, C, *), "
            f"got shape {tuple(x.shape)} with {x.shape[1]} channels"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input, got {x.dtype}")


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _spatial_size(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def _channels_last_format(x: Tensor) -> torch.memory_format | None:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    r"""``(x - mean) / sqrt(var + eps) * weight + bias``, all broadcast against ``x``.

    ``mean``, ``var``, ``weight`` and ``bias`` must already have shapes that
    broadcast to ``x``. The scale ``weight / sqrt(var + eps)`` is formed on the small
    statistics tensor first, so the full-size work is one subtraction and one
    multiply-add. Computes in :func:`normlab.stats.stat_dtype` and returns
    ``x.dtype``.
    """
    out_dtype = x.dtype
    compute = stats.stat_dtype(x.dtype)
    scale = torch.rsqrt(var.to(compute) + eps)
    if weight is not None:
        scale = scale * weight.to(compute)
    xc = x.to(compute) - mean.to(compute)
    y = xc * scale if bias is None else torch.addcmul(bias.to(compute), xc, scale)
    return y.to(out_dtype)


def update_running_(
    running: Tensor, batch_value: Tensor, factor: float, name: str = "normlab"
) -> None:
    """``running <- (1 - factor) * running + factor * batch_value``, in place, no grad.

    ``factor`` weighs the new batch (torch.nn's momentum convention). Entries whose
    batch value is NaN or infinite keep their old running value, and a RuntimeWarning
    names the layer: a NaN batch never silently poisons running statistics that are
    then saved.
    """
    with torch.no_grad():
        batch_value = batch_value.detach().to(running.dtype)
        # Common case first, in two small ops: a finite sum means every entry is finite
        # (a sum that overflows only sends us to the careful path below).
        if not torch.compiler.is_compiling() and math.isfinite(float(batch_value.sum())):
            running.lerp_(batch_value, factor)
            return
        finite = torch.isfinite(batch_value)
        updated = torch.lerp(running, batch_value, factor)
        running.copy_(torch.where(finite, updated, running))
        if not torch.compiler.is_compiling() and not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            shown = bad[:8] + (["..."] if len(bad) > 8 else [])
            warnings.warn(
                f"{name}: non-finite batch statistics (NaN or inf) in channels {shown}; "
                "the running statistics of those channels were left unchanged",
                RuntimeWarning,
                stacklevel=3,
            )


# ----------------------------------------------------------------------------- native paths
#
# Where torch's own CPU kernel computes the same math at least as robustly as the
# composite over normlab.stats, the default path ("auto") calls it; path="reference"
# keeps the composite (the tests compare the two). Checked against float64 on
# x = 1e4 + N(0, 1) (relative L2 of the output, float32): normlab.stats 3e-4; torch's
# batch norm on contiguous input with more than one trailing element 3e-4 to 5e-4 (two
# passes, double accumulation); group norm and layer norm on contiguous input 1e-4 to
# 1e-3 (vectorised Welford). Running statistics are never left to torch (it would
# write a NaN batch into them): the native op writes the batch statistics into scratch
# buffers (momentum 1) and update_running_pair_ guards the update.
#
# Batch norm on channels_last or (N, C) input and group norm on channels_last input
# sum in float32, and their error grows with |mean| / std of a normalization group, R,
# and its size n. Measured against float64 (scripts/native_accuracy.py; x = R + N(0, 1),
# R from 0 to 300, shapes from (256, 64) to (64, 8, 64, 64)): batch norm's relative
# error is at most 0.16 (R + 4) sqrt(n) eps32 (2e-3 to 1.4 at R = 1e4), group norm's
# (E[x^2] - E[x]^2) at most 0.2 (R^2 + 1) sqrt(n) eps32 (2e2 at R = 1e4). So these
# paths call the kernel on x, read R from the statistics it returns (one host sync,
# shared with the NaN guard), and keep the result only if the bound above is below
# 1e-4; otherwise they redo it on x minus one of its own values per group, a constant:
# the normalization is shift-invariant, so output and gradient are those of x, while
# the kernel now sums values within a few standard deviations of zero (x - K is exact
# for x near K, Sterbenz), 1e-7 relative at R = 1e4. Typical activations (R below 5)
# never pay for the second call, except in groups of millions of elements. A badly
# computed variance only makes R look larger, never smaller beyond the bound, so the
# test errs towards the redo. Under torch.compile and torch.func transforms (no host
# sync) the shift is always applied.

_PATHS = ("auto", "reference")
_HALF = (torch.float16, torch.bfloat16)
# (R + 4) sqrt(n) and (R^2 + 1) sqrt(n) above which the float32 sums of torch's
# channels_last and (N, C) kernels may exceed 1e-4 relative error (see the note above).
_BN_SHIFT_LIMIT = 1e-4 / (0.16 * torch.finfo(torch.float32).eps)
_GN_SHIFT_LIMIT = 1e-4 / (0.2 * torch.finfo(torch.float32).eps)
# x dtype -> the dtypes its parameters and buffers may have on the native paths.
_NATIVE_DTYPES = {
    torch.float32: (torch.float32,),
    torch.float64: (torch.float64,),
    torch.bfloat16: (torch.bfloat16, torch.float32),
    torch.float16: (torch.float16, torch.float32),
}


def _check_path(path: str, name: str) -> None:
    if path not in _PATHS:
        raise ValueError(f"{name}: path must be 'auto' or 'reference', got {path!r}")


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
    return x.detach()[(0, slice(None)) + (0,) * (x.dim() - 2)].view(_channel_shape(x))


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
            channels = bad.nonzero().flatten().tolist()
            shown = channels[:8] + (["..."] if len(channels) > 8 else [])
            warnings.warn(
                f"{name}: non-finite batch statistics (NaN or inf) in channels {shown}; "
                "the running statistics of those channels were left unchanged",
                RuntimeWarning,
                stacklevel=4,
            )


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
    1e-4, else redone on the input shifted per channel (see the note above)."""
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


def _batch_moments(
    x: Tensor, mask: Tensor | None, name: str, moments_fn=None
) -> stats.Moments:
    # moments_fn(x, dims, mask=mask) -> Moments replaces stats.moments, e.g. with the
    # all-rank moments of normlab.nn.sync; the size check then uses its (global) count.
    dims = (0,) + tuple(range(2, x.dim()))
    if moments_fn is not None:
        m = moments_fn(x, dims, mask=mask)
        total = None if mask is not None else int(torch.as_tensor(m.count).max())
        if total is not None and total <= 1:
            raise ValueError(
                f"{name}: batch statistics need more than 1 value per channel over all "
                f"ranks, got {total} (local input of shape {tuple(x.shape)})"
            )
        return m
    if mask is None and x.shape[0] * _spatial_size(x) == 1:
        raise ValueError(
            f"{name}: batch statistics need more than 1 value per channel, got input of "
            f"shape {tuple(x.shape)}; use a batch of at least 2, eval() with running "
            "statistics, or a per-sample norm (LayerNorm, GroupNorm)"
        )
    m = stats.moments(x, dims, mask=mask)
    if mask is not None and bool((m.count <= 1).any()):
        few = (m.count.flatten() <= 1).nonzero().flatten().tolist()
        raise ValueError(
            f"{name}: batch statistics need more than 1 valid value per channel, got "
            f"{int(m.count.min())} in channels {few[:8]} (input of shape {tuple(x.shape)}, "
            f"mask of shape {tuple(mask.shape)})"
        )
    return m


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    mask: Tensor | None = None,
    name: str = "batch_norm",
    moments_fn=None,
    path: str = "auto",
) -> Tensor:
    r"""Batch normalization (Ioffe & Szegedy 2015) of ``x`` of shape ``(N, C, *)``.

    .. math::
        y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\,\gamma + \beta

    with :math:`\mu_B, \sigma_B^2` the per-channel mean and biased variance over the
    batch and trailing dimensions (valid elements only when ``mask`` is given).

    If ``training`` is True, or no running statistics are given, batch statistics
    are used; when running statistics are given and ``training`` is True they are
    updated in place with weight ``momentum`` on the batch, the variance unbiased
    (torch.nn's conventions). Otherwise the running statistics normalize.

    ``moments_fn(x, dims, mask=mask) -> Moments``, if given, replaces
    :func:`normlab.stats.moments` for the batch statistics (the synchronisation hook
    of :mod:`normlab.nn.sync`: :func:`~normlab.nn.sync.sync_moments` gives the
    moments over all ranks, and the running variance then uses the global count).

    ``path="auto"`` (default) uses torch's native CPU kernel where it is as robust as
    normlab's statistics: in eval (normalizing by running statistics); in training
    without ``mask``/``moments_fn`` on contiguous input with more than one trailing
    element (two passes, double accumulation, checked on 1e4 + N(0, 1)), and on
    channels_last and ``(N, C)`` input, whose kernel sums in float32, when the batch
    statistics bound its error below 1e-4 (otherwise the input is shifted by one of its
    values per channel and normalized again, which keeps the sums accurate). Masks,
    ``moments_fn`` and other devices take the composite over :mod:`normlab.stats`, which
    ``path="reference"`` forces. Either way a non-finite batch statistic never reaches
    the running statistics.
    """
    use_batch_stats = training or running_mean is None or running_var is None
    if (path == "auto" and mask is None and moments_fn is None and x.dim() >= 2
            and _native_ok(x, weight, bias, running_mean, running_var)):
        if not use_batch_stats:
            return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0,
                                    eps, False)
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        if count > 1:
            if x.dim() > 2 and count > x.shape[0] and x.is_contiguous():
                return _native_batch_norm_train(
                    x, running_mean if training else None,
                    running_var if training else None, weight, bias, momentum, eps, name)
            if _float32_params(x, weight, bias, running_mean, running_var):
                return _batch_norm_float_sums(x, running_mean, running_var, weight, bias,
                                              training, momentum, eps, name)
    _check_path(path, name)
    shape = _channel_shape(x)
    w = None if weight is None else weight.view(shape)
    b = None if bias is None else bias.view(shape)
    if not use_batch_stats:
        return normalize(x, running_mean.view(shape), running_var.view(shape), eps, w, b)
    mean, var, count = _batch_moments(x, mask, name, moments_fn)
    if training and running_mean is not None and running_var is not None:
        update_running_(running_mean, mean.flatten(), momentum, name)
        update_running_(running_var, stats.unbiased(var, count).flatten(), momentum, name)
    return normalize(x, mean, var, eps, w, b)


def renorm_limits(
    step: int,
    r_max: float,
    d_max: float,
    warmup: tuple[int, int, int] | None = None,
) -> tuple[float, float]:
    """The clipping limits ``(r_max, d_max)`` of Batch Renormalization at ``step``.

    ``warmup = (start, r_end, d_end)`` is the paper's schedule: ``r_max = 1`` and
    ``d_max = 0`` (plain batch norm) until ``start``, then a linear relaxation that
    reaches ``r_max`` at step ``r_end`` and ``d_max`` at step ``d_end``. The paper
    uses ``(5000, 40000, 25000)``. ``warmup=None`` gives the final limits at every
    step.
    """
    if warmup is None:
        return float(r_max), float(d_max)
    start, r_end, d_end = warmup

    def ramp(end: int) -> float:
        if step <= start:
            return 0.0
        if end <= start:
            return 1.0
        return min(1.0, (step - start) / (end - start))

    return 1.0 + (r_max - 1.0) * ramp(r_end), d_max * ramp(d_end)


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    mask: Tensor | None = None,
    name: str = "batch_renorm",
    moments_fn=None,
) -> Tensor:
    r"""Batch Renormalization (Ioffe 2017).

    In training, with :math:`\sigma = \sqrt{\mathrm{running\_var} + \epsilon}` and
    :math:`\sigma_B = \sqrt{\sigma_B^2 + \epsilon}`:

    .. math::
        r = \mathrm{sg}\big[\mathrm{clip}_{[1/r_{max},\, r_{max}]}(\sigma_B / \sigma)\big],\quad
        d = \mathrm{sg}\big[\mathrm{clip}_{[-d_{max},\, d_{max}]}((\mu_B - \mu) / \sigma)\big]

    .. math::
        y = \gamma \left(\frac{x - \mu_B}{\sigma_B}\, r + d\right) + \beta

    where sg stops the gradient. r and d use the running statistics from before this
    batch, which are then updated as in :func:`batch_norm`. In eval the running
    statistics normalize, as in batch norm. With ``r_max = 1`` and ``d_max = 0`` this
    is exactly :func:`batch_norm`.

    ``moments_fn(x, dims, mask=mask) -> Moments``, if given, replaces
    :func:`normlab.stats.moments` for the batch statistics (the synchronisation hook:
    :func:`normlab.nn.sync.sync_moments` makes them the moments over all ranks).
    """
    shape = _channel_shape(x)
    w = None if weight is None else weight.view(shape)
    b = None if bias is None else bias.view(shape)
    if not training:
        return normalize(x, running_mean.view(shape), running_var.view(shape), eps, w, b)
    mean, var, count = _batch_moments(x, mask, name, moments_fn)
    compute = mean.dtype
    with torch.no_grad():
        # The running statistics are read through torch.stack, a copy that AOTAutograd's
        # min-cut partitioner always saves: it could otherwise recompute r and d in the
        # backward from the buffers, *after* their in-place update below, and
        # torch.compile would give wrong gradients (torch 2.13; pytorch PR #197039).
        old_mean, old_var = torch.stack((running_mean, running_var)).view(2, *shape).to(compute)
        sigma = torch.sqrt(old_var + eps)
        sigma_batch = torch.sqrt(var.detach() + eps)
        r = (sigma_batch / sigma).clamp(1.0 / r_max, r_max)
        d = ((mean.detach() - old_mean) / sigma).clamp(-d_max, d_max)
    update_running_(running_mean, mean.flatten(), momentum, name)
    update_running_(running_var, stats.unbiased(var, count).flatten(), momentum, name)
    # (x - mu_B) / sigma_B * r + d, then the affine: one scale and one shift per channel.
    scale = torch.rsqrt(var + eps) * r
    shift = d
    if w is not None:
        scale = scale * w.to(compute)
        shift = shift * w.to(compute)
    if b is not None:
        shift = shift + b.to(compute)
    xc = x.to(compute) - mean
    return torch.addcmul(shift, xc, scale).to(x.dtype)


def layer_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    mask: Tensor | None = None,
    path: str = "auto",
) -> Tensor:
    r"""Layer normalization (Ba et al. 2016) over all of ``C x *`` for each sample.

    .. math::
        y_{n,c,\dots} = \frac{x_{n,c,\dots} - \mu_n}{\sqrt{\sigma_n^2 + \epsilon}}
        \,\gamma_c + \beta_c

    with :math:`\mu_n, \sigma_n^2` over every element of sample n, and a per-channel
    affine. On ``(N, C)`` input this is ``torch.nn.functional.layer_norm(x, (C,))``.

    ``path="auto"`` (default) computes it as :func:`group_norm` with one group (torch's
    native CPU group norm, the same math, with the per-channel affine built in) when
    there is no ``mask``; ``path="reference"`` uses :mod:`normlab.stats`.
    """
    if (path == "auto" and mask is None and x.dim() >= 2 and _native_ok(x, weight, bias)
            and x.numel() > x.shape[0]):
        # Layer norm over C x * with a per-channel affine is group norm with one group.
        if x.is_contiguous():
            return torch.group_norm(x, 1, weight, bias, eps, False)
        return group_norm(x, 1, weight, bias, eps)
    _check_path(path, "layer_norm")
    shape = _channel_shape(x)
    mean, var, _ = stats.moments(x, tuple(range(1, x.dim())), mask=mask)
    w = None if weight is None else weight.view(shape)
    b = None if bias is None else bias.view(shape)
    return normalize(x, mean, var, eps, w, b)


def channel_layer_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    path: str = "auto",
) -> Tensor:
    r"""Layer normalization over the channels only, at every position of ``(N, C, *)``.

    .. math::
        y_{n,c,p} = \frac{x_{n,c,p} - \mu_{n,p}}{\sqrt{\sigma_{n,p}^2 + \epsilon}}
        \,\gamma_c + \beta_c

    with :math:`\mu_{n,p}, \sigma^2_{n,p}` over the C channels at position p. This is
    the LayerNorm of channels-last transformers applied to channel-first tensors
    (timm's ``LayerNorm2d``, ConvNeXt).

    ``path="auto"`` (default) moves C last and calls torch's native CPU layer norm
    over it (what timm's LayerNorm2d does; no copy for channels_last input);
    ``path="reference"`` uses :mod:`normlab.stats`.
    """
    _check_path(path, "channel_layer_norm")
    if path == "auto" and x.shape[1] > 1 and _native_ok(x, weight, bias):
        y = tnf.layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, eps)
        return y.movedim(-1, 1)
    shape = _channel_shape(x)
    mean, var, _ = stats.moments(x, 1)
    w = None if weight is None else weight.view(shape)
    b = None if bias is None else bias.view(shape)
    return normalize(x, mean, var, eps, w, b)


def rms_norm(
    x: Tensor,
    weight: Tensor | None = None,
    eps: float | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Root-mean-square normalization (Zhang & Sennrich 2019) over ``C x *`` per sample.

    .. math::
        y = \frac{x}{\sqrt{\tfrac{1}{n}\sum_i x_i^2 + \epsilon}}\,\gamma_c

    ``eps=None`` uses ``torch.finfo(x.dtype).eps``, as torch.nn.RMSNorm does. On
    ``(N, C)`` input this equals ``torch.nn.functional.rms_norm(x, (C,))``.
    """
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    ms = stats.mean_square(x, tuple(range(1, x.dim())), mask=mask)
    w = None if weight is None else weight.view(_channel_shape(x))
    return normalize(x, torch.zeros_like(ms), ms, eps, w, None)


def instance_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    name: str = "instance_norm",
    path: str = "auto",
) -> Tensor:
    r"""Instance normalization (Ulyanov et al. 2016): per sample and channel over ``*``.

    .. math::
        y_{n,c,\dots} = \frac{x_{n,c,\dots} - \mu_{n,c}}{\sqrt{\sigma_{n,c}^2 + \epsilon}}
        \,\gamma_c + \beta_c

    With ``use_input_stats`` and running statistics given, the running statistics are
    updated with the batch average of the per-instance mean and unbiased variance
    (torch.nn.InstanceNorm's convention). Without ``use_input_stats`` the running
    statistics normalize.

    ``path="auto"`` (default) uses torch's native CPU batch norm on the input viewed
    as ``(1, N*C, *)`` made contiguous (what torch.nn.InstanceNorm does, two passes
    with double accumulation), with the running statistics updated by
    :func:`update_running_`; ``path="reference"`` uses :mod:`normlab.stats`.
    """
    if path == "auto" and x.dim() >= 3 and _native_ok(x, weight, bias, running_mean,
                                                      running_var):
        if not use_input_stats:
            return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0,
                                    eps, False)
        n, c = x.shape[:2]
        if n * c and x.numel() > n * c:
            xr = x.contiguous().view(1, n * c, *x.shape[2:])
            w = None if weight is None else weight.repeat(n)
            b = None if bias is None else bias.repeat(n)
            y = _native_batch_norm_train(xr, running_mean, running_var, w, b, momentum, eps,
                                         name, stats_shape=(n, c))
            return y.view(x.shape)
    _check_path(path, name)
    shape = _channel_shape(x)
    w = None if weight is None else weight.view(shape)
    b = None if bias is None else bias.view(shape)
    if not use_input_stats:
        return normalize(x, running_mean.view(shape), running_var.view(shape), eps, w, b)
    if _spatial_size(x) <= 1:
        raise ValueError(
            f"{name}: instance statistics need more than 1 spatial element per channel, "
            f"got input of shape {tuple(x.shape)}"
        )
    mean, var, count = stats.moments(x, tuple(range(2, x.dim())))
    if running_mean is not None and running_var is not None:
        update_running_(running_mean, mean.mean(0).flatten(), momentum, name)
        update_running_(running_var, stats.unbiased(var, count).mean(0).flatten(), momentum, name)
    return normalize(x, mean, var, eps, w, b)


def _group_norm_float_sums(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
    group_size: int,
) -> Tensor:
    """Group norm of channels_last ``x`` by torch's kernel, which computes
    ``E[x^2] - E[x]^2`` in float32: kept when the statistics it returns bound its error
    below 1e-4, else redone on ``x`` shifted by its first value in each (sample, group)
    (see the note above _native_ok)."""
    n, c = x.shape[:2]
    if _can_sync(x):
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, _spatial_size(x),
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


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    mask: Tensor | None = None,
    path: str = "auto",
) -> Tensor:
    r"""Group normalization (Wu & He 2018): per sample over each group of C/G channels.

    .. math::
        y_{n,c,\dots} = \frac{x_{n,c,\dots} - \mu_{n,g(c)}}{\sqrt{\sigma_{n,g(c)}^2 + \epsilon}}\,
        \gamma_c + \beta_c

    ``num_groups = 1`` is layer norm over ``C x *``; ``num_groups = C`` is instance
    norm. ``C`` must be divisible by ``num_groups``.

    ``path="auto"`` (default) uses torch's native CPU group norm (vectorised Welford)
    when there is no ``mask`` and groups have more than one element. Its channels_last
    kernel computes ``E[x^2] - E[x]^2`` in float32 (relative error up to 2e2 on
    1e4 + N(0, 1)): its result is kept only when the group statistics bound the error
    below 1e-4, and otherwise recomputed on the input shifted by its first value in each
    (sample, group). ``path="reference"`` uses :mod:`normlab.stats`.
    """
    # Groups of one element: (x - mean) must be exactly 0, which torch's x * a + b is not.
    if (path == "auto" and mask is None and x.dim() >= 2 and x.shape[1] % num_groups == 0
            and _native_ok(x, weight, bias)):
        group_size = (x.shape[1] // num_groups) * _spatial_size(x)
        if group_size > 1:
            if x.is_contiguous():
                return torch.group_norm(x, num_groups, weight, bias, eps, False)
            if _channels_last_format(x) is not None and _float32_params(x, weight, bias):
                return _group_norm_float_sums(x, num_groups, weight, bias, eps, group_size)
            return torch.group_norm(x.contiguous(), num_groups, weight, bias, eps, False)
    _check_path(path, "group_norm")
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    grouped_shape = (n, num_groups, c // num_groups) + tuple(spatial)
    xg = x.reshape(grouped_shape)
    mg = None if mask is None else stats._check_mask(x, mask).reshape(grouped_shape)
    mean, var, _ = stats.moments(xg, tuple(range(2, xg.dim())), mask=mg)
    affine_shape = (1, num_groups, c // num_groups) + (1,) * len(spatial)
    w = None if weight is None else weight.view(affine_shape)
    b = None if bias is None else bias.view(affine_shape)
    return normalize(xg, mean, var, eps, w, b).reshape(x.shape)
