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
    """
    use_batch_stats = training or running_mean is None or running_var is None
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
        sigma = torch.sqrt(running_var.view(shape).to(compute) + eps)
        sigma_batch = torch.sqrt(var.detach() + eps)
        r = (sigma_batch / sigma).clamp(1.0 / r_max, r_max)
        d = ((mean.detach() - running_mean.view(shape).to(compute)) / sigma).clamp(-d_max, d_max)
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
) -> Tensor:
    r"""Layer normalization (Ba et al. 2016) over all of ``C x *`` for each sample.

    .. math::
        y_{n,c,\dots} = \frac{x_{n,c,\dots} - \mu_n}{\sqrt{\sigma_n^2 + \epsilon}}
        \,\gamma_c + \beta_c

    with :math:`\mu_n, \sigma_n^2` over every element of sample n, and a per-channel
    affine. On ``(N, C)`` input this is ``torch.nn.functional.layer_norm(x, (C,))``.
    """
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
) -> Tensor:
    r"""Layer normalization over the channels only, at every position of ``(N, C, *)``.

    .. math::
        y_{n,c,p} = \frac{x_{n,c,p} - \mu_{n,p}}{\sqrt{\sigma_{n,p}^2 + \epsilon}}
        \,\gamma_c + \beta_c

    with :math:`\mu_{n,p}, \sigma^2_{n,p}` over the C channels at position p. This is
    the LayerNorm of channels-last transformers applied to channel-first tensors
    (timm's ``LayerNorm2d``, ConvNeXt).
    """
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
) -> Tensor:
    r"""Instance normalization (Ulyanov et al. 2016): per sample and channel over ``*``.

    .. math::
        y_{n,c,\dots} = \frac{x_{n,c,\dots} - \mu_{n,c}}{\sqrt{\sigma_{n,c}^2 + \epsilon}}
        \,\gamma_c + \beta_c

    With ``use_input_stats`` and running statistics given, the running statistics are
    updated with the batch average of the per-instance mean and unbiased variance
    (torch.nn.InstanceNorm's convention). Without ``use_input_stats`` the running
    statistics normalize.
    """
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


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Group normalization (Wu & He 2018): per sample over each group of C/G channels.

    .. math::
        y_{n,c,\dots} = \frac{x_{n,c,\dots} - \mu_{n,g(c)}}{\sqrt{\sigma_{n,g(c)}^2 + \epsilon}}\,
        \gamma_c + \beta_c

    ``num_groups = 1`` is layer norm over ``C x *``; ``num_groups = C`` is instance
    norm. ``C`` must be divisible by ``num_groups``.
    """
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
