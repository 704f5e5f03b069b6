"""The normalization methods as their papers write them, one function each.

Inputs are channel-first, ``(N, C, *)`` with any number of trailing (spatial or
time) dimensions. Each function reads like its paper: the statistics from
:mod:`normlab.stats` over the elements the method normalizes, then
:func:`~normlab.functional.common.normalize` (``(x - mean) / sqrt(var + eps) * weight
+ bias``) and, for the methods that keep them, the guarded update of the running
statistics (:func:`~normlab.functional.common.update_running_`). The modules in
:mod:`normlab.nn` hold parameters and buffers and call these functions.

``path="auto"`` (the default) first offers the call to
:mod:`normlab.functional.fastpath`, which hands it to torch's own CPU kernel where that
is measured to be as accurate (the accuracy note is there) and otherwise declines;
``path="reference"`` always computes the equation here. The tests compare the two.

Each function normalizes in the statistics dtype (float32 for half inputs) and
returns the input's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab import stats
from normlab.functional import fastpath
from normlab.functional.common import (
    as_normalized_shape,
    batch_dims,
    channel_shape,
    check_batch_first,
    check_eps,
    check_input,
    check_last_dims,
    check_path,
    normalize,
    spatial_size,
    update_running_,
)
from normlab.functional.fastpath import (
    instance_moments_fast,
    instance_normalized,
    update_running_pair_,
)

__all__ = [
    "batch_norm",
    "batch_renorm",
    "renorm_limits",
    "layer_norm",
    "channel_layer_norm",
    "rms_norm",
    "instance_norm",
    "group_norm",
    # (re-exported: their homes are normlab.functional.common and .fastpath)
    "normalize",
    "update_running_",
    "update_running_pair_",
    "check_input",
    "instance_normalized",
    "instance_moments_fast",
]


def _torch_style_call(name: str, arg, spelled: str) -> TypeError:
    return TypeError(
        f"{name}: the second argument is the weight tensor, got {arg!r}. "
        f"normlab.functional.{name}(x, {spelled}) normalizes (N, C, *) input over C x *; "
        f"torch's {name}(x, normalized_shape, ...) over the last dimensions is "
        f"normlab.functional.{name}(x, {spelled}, normalized_shape=...)"
    )


def _batch_moments(
    x: Tensor, mask: Tensor | None, name: str, moments_fn=None
) -> stats.Moments:
    # moments_fn(x, dims, mask=mask) -> Moments replaces stats.moments, e.g. with the
    # all-rank moments of normlab.nn.sync_stats; the size check then uses its (global) count.
    dims = batch_dims(x)
    if moments_fn is not None:
        m = moments_fn(x, dims, mask=mask)
        total = None if mask is not None else int(torch.as_tensor(m.count).max())
        if total is not None and total <= 1:
            raise ValueError(
                f"{name}: batch statistics need more than 1 value per channel over all "
                f"ranks, got {total} (local input of shape {tuple(x.shape)})"
            )
        return m
    if mask is None and x.shape[0] * spatial_size(x) == 1:
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
    of :mod:`normlab.nn.sync_stats`: :func:`~normlab.nn.sync_stats.sync_moments` gives the
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

    Raises:
        ValueError: input of fewer than 2 dimensions; ``eps <= 0`` where batch
            statistics normalize (as torch); one value per channel in training.
    """
    check_batch_first(x, name)
    use_batch_stats = training or running_mean is None or running_var is None
    if use_batch_stats and not eps > 0:  # as torch: rsqrt(0) on a constant channel
        raise ValueError(f"{name}: eps must be > 0 when batch statistics normalize "
                         f"(training), got {eps}")
    if use_batch_stats and x.numel() == 0:
        # An empty batch (N = 0), as torch.nn: empty output, running statistics unchanged
        # (not a NaN batch to warn about); still a function of weight and bias.
        ones = x.new_ones(channel_shape(x))
        return normalize(x, ones * 0, ones, eps, None if weight is None else
                         weight.view(ones.shape), None if bias is None else bias.view(ones.shape))
    if path == "auto":
        y = fastpath.batch_norm(x, running_mean, running_var, weight, bias, training,
                                momentum, eps, mask, name, moments_fn)
        if y is not None:
            return y
    check_path(path, name)
    shape = channel_shape(x)
    w = None if weight is None else weight.view(shape)  # gamma
    b = None if bias is None else bias.view(shape)  # beta
    if not training and running_mean is not None and running_var is not None:
        # y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta
        return normalize(x, running_mean.view(shape), running_var.view(shape), eps, w, b)
    mean, var, count = _batch_moments(x, mask, name, moments_fn)  # mu_B, sigma_B^2
    if training and running_mean is not None and running_var is not None:
        # running <- (1 - momentum) running + momentum batch, the variance unbiased
        update_running_(running_mean, mean.flatten(), momentum, name)
        update_running_(running_var, stats.unbiased(var, count).flatten(), momentum, name)
    return normalize(x, mean, var, eps, w, b)  # (x - mu_B) / sqrt(sigma_B^2 + eps) g + b


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
    :func:`normlab.nn.sync_stats.sync_moments` makes them the moments over all ranks).
    """
    shape = channel_shape(x)
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
    *,
    normalized_shape=None,
    name: str = "layer_norm",
) -> Tensor:
    r"""Layer normalization (Ba et al. 2016) over all of ``C x *`` for each sample.

    .. math::
        y_{n,c,\dots} = \frac{x_{n,c,\dots} - \mu_n}{\sqrt{\sigma_n^2 + \epsilon}}
        \,\gamma_c + \beta_c

    with :math:`\mu_n, \sigma_n^2` over every element of sample n, and a per-channel
    affine. On ``(N, C)`` input this is ``torch.nn.functional.layer_norm(x, (C,))``.

    With ``normalized_shape`` (keyword only) it is torch's layer norm instead: ``x`` of
    shape ``(*, *normalized_shape)`` is normalized over its last
    ``len(normalized_shape)`` dimensions, and ``weight`` and ``bias`` have shape
    ``normalized_shape`` (elementwise), as ``torch.nn.functional.layer_norm(x,
    normalized_shape, weight, bias, eps)``: the sequence layout ``(N, L, C)`` of
    transformers. A torch-style call, with ``normalized_shape`` second, raises a
    TypeError that shows both spellings. ``name`` names the caller in errors.

    ``path="auto"`` (default) computes it as :func:`group_norm` with one group (torch's
    native CPU group norm, the same math, with the per-channel affine built in) when
    there is no ``mask``, and with ``normalized_shape`` as torch's native layer norm;
    ``path="reference"`` uses :mod:`normlab.stats`.

    Raises:
        ValueError: input of fewer than 2 dimensions (channel-first) or whose last
            dimensions are not ``normalized_shape``; ``eps < 0``.
    """
    if normalized_shape is not None:
        return _layer_norm_last(x, normalized_shape, weight, bias, eps, mask, path, name)
    if weight is not None and not isinstance(weight, Tensor):
        raise _torch_style_call("layer_norm", weight, "weight, bias, eps")
    check_batch_first(x, name)
    check_eps(eps, name)
    if path == "auto" and (y := fastpath.layer_norm(x, weight, bias, eps, mask)) is not None:
        return y
    check_path(path, "layer_norm")
    shape = channel_shape(x)
    mean, var, _ = stats.moments(x, tuple(range(1, x.dim())), mask=mask)  # mu_n, sigma_n^2
    w = None if weight is None else weight.view(shape)  # gamma_c
    b = None if bias is None else bias.view(shape)  # beta_c
    return normalize(x, mean, var, eps, w, b)


def _layer_norm_last(x, normalized_shape, weight, bias, eps, mask, path, name) -> Tensor:
    """torch.nn.functional.layer_norm's semantics (see :func:`layer_norm`)."""
    shape = as_normalized_shape(normalized_shape, name)
    check_last_dims(x, shape, name, weight, bias)
    check_eps(eps, name)
    check_path(path, name)
    if path == "auto" and (y := fastpath.layer_norm_last(x, shape, weight, bias, eps,
                                                         mask)) is not None:
        return y
    # mu, sigma^2 over the last len(normalized_shape) dimensions; elementwise affine
    mean, var, _ = stats.moments(x, tuple(range(x.dim() - len(shape), x.dim())), mask=mask)
    return normalize(x, mean, var, eps, weight, bias)


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
    check_path(path, "channel_layer_norm")
    check_batch_first(x, "channel_layer_norm")
    if path == "auto" and (y := fastpath.channel_layer_norm(x, weight, bias, eps)) is not None:
        return y
    shape = channel_shape(x)
    mean, var, _ = stats.moments(x, 1)  # mu_{n,p}, sigma_{n,p}^2 over the C channels
    w = None if weight is None else weight.view(shape)  # gamma_c
    b = None if bias is None else bias.view(shape)  # beta_c
    return normalize(x, mean, var, eps, w, b)


def rms_norm(
    x: Tensor,
    weight: Tensor | None = None,
    eps: float | None = None,
    mask: Tensor | None = None,
    *,
    normalized_shape=None,
    name: str = "rms_norm",
) -> Tensor:
    r"""Root-mean-square normalization (Zhang & Sennrich 2019) over ``C x *`` per sample.

    .. math::
        y = \frac{x}{\sqrt{\tfrac{1}{n}\sum_i x_i^2 + \epsilon}}\,\gamma_c

    ``eps=None`` uses ``torch.finfo(x.dtype).eps``, as torch.nn.RMSNorm does. On
    ``(N, C)`` input this equals ``torch.nn.functional.rms_norm(x, (C,))``.

    With ``normalized_shape`` (keyword only), the mean square is over the last
    ``len(normalized_shape)`` dimensions of ``(*, *normalized_shape)`` input with an
    elementwise ``weight`` of shape ``normalized_shape``: exactly
    ``torch.nn.functional.rms_norm(x, normalized_shape, weight, eps)`` (computed by it
    when there is no ``mask``). A torch-style call, with ``normalized_shape`` second,
    raises a TypeError that shows both spellings. ``name`` names the caller in errors.

    Raises:
        ValueError: input of fewer than 2 dimensions (channel-first) or whose last
            dimensions are not ``normalized_shape``; ``eps < 0``.
    """
    if normalized_shape is not None:
        shape = as_normalized_shape(normalized_shape, name)
        check_last_dims(x, shape, name, weight)
        check_eps(eps, name)
        if (y := fastpath.rms_norm_last(x, shape, weight, eps, mask)) is not None:
            return y
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        ms = stats.mean_square(x, tuple(range(x.dim() - len(shape), x.dim())), mask=mask)
        return normalize(x, torch.zeros_like(ms), ms, eps, weight, None)
    if weight is not None and not isinstance(weight, Tensor):
        raise _torch_style_call("rms_norm", weight, "weight, eps")
    check_batch_first(x, name)
    check_eps(eps, name)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    ms = stats.mean_square(x, tuple(range(1, x.dim())), mask=mask)
    w = None if weight is None else weight.view(channel_shape(x))
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

    Raises:
        ValueError: input of fewer than 2 dimensions, ``eps < 0``, or one element per
            instance where instance statistics are used.
    """
    check_batch_first(x, name)
    check_eps(eps, name)
    if path == "auto":
        y = fastpath.instance_norm(x, running_mean, running_var, weight, bias,
                                   use_input_stats, momentum, eps, name)
        if y is not None:
            return y
    check_path(path, name)
    shape = channel_shape(x)
    w = None if weight is None else weight.view(shape)
    b = None if bias is None else bias.view(shape)
    if not use_input_stats:
        return normalize(x, running_mean.view(shape), running_var.view(shape), eps, w, b)
    if spatial_size(x) <= 1:
        raise ValueError(
            f"{name}: instance statistics need more than 1 spatial element per channel, "
            f"got input of shape {tuple(x.shape)}"
        )
    mean, var, count = stats.moments(x, tuple(range(2, x.dim())))  # mu_{n,c}, sigma_{n,c}^2
    if running_mean is not None and running_var is not None:
        # the running statistics follow the batch average of the per-instance values
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
    path: str = "auto",
) -> Tensor:
    r"""Group normalization (Wu & He 2018): per sample over each group of C/G channels.

    .. math::
        y_{n,c,\dots} = \frac{x_{n,c,\dots} - \mu_{n,g(c)}}{\sqrt{\sigma_{n,g(c)}^2 + \epsilon}}\,
        \gamma_c + \beta_c

    ``num_groups = 1`` is layer norm over ``C x *``; ``num_groups = C`` is instance
    norm. ``C`` must be divisible by ``num_groups`` (ValueError otherwise, as for
    input of fewer than 2 dimensions or ``eps < 0``).

    ``path="auto"`` (default) uses torch's native CPU group norm (vectorised Welford)
    when there is no ``mask`` and groups have more than one element. Its channels_last
    kernel computes ``E[x^2] - E[x]^2`` in float32 (relative error up to 2e2 on
    1e4 + N(0, 1)): its result is kept only when the group statistics bound the error
    below 1e-4, and otherwise recomputed on the input shifted by its first value in each
    (sample, group). ``path="reference"`` uses :mod:`normlab.stats`.
    """
    check_batch_first(x, "group_norm")
    check_eps(eps, "group_norm")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 \
            or x.shape[1] % num_groups:
        raise ValueError(f"group_norm: num_groups must be a positive int that divides the "
                         f"{x.shape[1]} channels of input of shape {tuple(x.shape)}, got "
                         f"{num_groups!r}")
    if path == "auto":
        y = fastpath.group_norm(x, num_groups, weight, bias, eps, mask)
        if y is not None:
            return y
    check_path(path, "group_norm")
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    grouped_shape = (n, num_groups, c // num_groups) + tuple(spatial)
    xg = x.reshape(grouped_shape)
    mg = None if mask is None else stats.check_mask(x, mask).reshape(grouped_shape)
    mean, var, _ = stats.moments(xg, tuple(range(2, xg.dim())), mask=mg)  # mu_{n,g}, ...
    affine_shape = (1, num_groups, c // num_groups) + (1,) * len(spatial)
    w = None if weight is None else weight.view(affine_shape)
    b = None if bias is None else bias.view(affine_shape)
    return normalize(xg, mean, var, eps, w, b).reshape(x.shape)

