"""The one place where normlab computes moments itself.

Every reference path (``path="reference"``, masked input, the synchronised layers,
other devices than the CPU) gets its mean and variance from :func:`moments` (or its mean
square from :func:`mean_square`), so a numerical fix made here reaches every one of
them at once. The default CPU path of the batch, instance, layer and group norms
hands the call to torch's own kernel instead where that is measured to be as accurate
(:mod:`normlab.functional.fastpath`, with the accuracy note and the shift-and-redo
that keeps it so), and the opt-in fused kernels (``fused=True``, :mod:`normlab.kernels`)
compute theirs in C++ from shifted sums; the tests hold both to float64 references.

Numerics
--------
* Two passes: the mean first, then the mean of squared deviations from it. The
  one-pass shortcut ``E[x^2] - E[x]^2`` cancels catastrophically when
  ``|mean| / std`` is large (for ``x = 1e4 + N(0, 1)`` in float32 it returns a
  variance of zero or less), and is not used anywhere in normlab.
* On the CPU the first moment of float32 input accumulates in float64: the mean of
  ``1e4 + N(0, 1)`` is then exact to float32 rounding, which is what bounds the
  error of the normalized output (about 3e-4 relative for that input, against 8e-4
  for a float32 sum).
* float16 and bfloat16 inputs are upcast: statistics are computed and returned in
  float32. float64 input stays float64.

Masks
-----
``mask`` marks the valid elements (True) of a padded input. It must be boolean and
broadcastable to ``x``. Padded elements take no part in the mean, the variance or
the count. A reduction group with no valid element gets mean 0 and variance 0
(and count 0), so callers can tell it apart without NaN appearing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Moments", "moments", "mean_square", "stat_dtype", "unbiased", "combine_moments", "check_mask",
]


class Moments(NamedTuple):
    """Mean, biased variance and the number of elements each was taken over.

    ``count`` is an int when no mask was given (the same for every group), or a
    tensor shaped like ``mean`` when a mask was given.
    """

    mean: Tensor
    var: Tensor
    count: int | Tensor


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in for an input of ``dtype``.

    float64 stays float64; every other floating type (float32, float16, bfloat16)
    computes in float32.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dims(x: Tensor, dims: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(dims, int):
        dims = (dims,)
    return tuple(sorted({d % x.dim() for d in dims}))


def _prepare(x: Tensor) -> Tensor:
    if not x.is_floating_point():
        raise TypeError(f"normlab.stats: expected a floating-point tensor, got {x.dtype}")
    compute = stat_dtype(x.dtype)
    return x if x.dtype == compute else x.to(compute)


def _mean(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    # The accuracy of the mean bounds the accuracy of everything downstream, so on the
    # CPU (where float64 is cheap) float32 sums accumulate in float64.
    if x.dtype == torch.float32 and x.device.type == "cpu":
        return x.mean(dims, keepdim=True, dtype=torch.float64).to(torch.float32)
    return x.mean(dims, keepdim=True)


def check_mask(x: Tensor, mask: Tensor) -> Tensor:
    """``mask`` expanded to ``x``'s shape; TypeError if it is not bool, ValueError if it
    does not broadcast to ``x``."""
    if mask.dtype != torch.bool:
        raise TypeError(f"normlab.stats: mask must be a bool tensor, got {mask.dtype}")
    try:
        return mask.expand_as(x)
    except RuntimeError:
        raise ValueError(
            f"normlab.stats: mask of shape {tuple(mask.shape)} does not broadcast to the "
            f"input of shape {tuple(x.shape)}"
        ) from None


def moments(
    x: Tensor,
    dims: int | Sequence[int],
    mask: Tensor | None = None,
    keepdim: bool = True,
) -> Moments:
    r"""Mean and biased variance of ``x`` over ``dims``.

    .. math::
        \mu = \frac{1}{n}\sum_i x_i, \qquad \sigma^2 = \frac{1}{n}\sum_i (x_i - \mu)^2

    with the sums over the valid elements (all of them when ``mask`` is None).

    Args:
        x: floating-point tensor of any shape.
        dims: the dimension or dimensions to reduce over.
        mask: optional bool tensor broadcastable to ``x``; True marks valid elements.
        keepdim: keep the reduced dimensions with size 1 (default True, ready for
            broadcasting against ``x``).

    Returns:
        :class:`Moments` ``(mean, var, count)`` in :func:`stat_dtype` of ``x.dtype``.
        Gradients flow through ``mean`` and ``var``.
    """
    dims = _dims(x, dims)
    x = _prepare(x)
    if mask is None:
        mean = _mean(x, dims)
        centred = x - mean
        var = (centred * centred).mean(dims, keepdim=True)
        count = 1
        for d in dims:
            count *= x.shape[d]
    else:
        mask = check_mask(x, mask)
        count = mask.sum(dims, keepdim=True)
        safe_count = count.clamp(min=1).to(x.dtype)
        acc = torch.float64 if x.dtype == torch.float32 and x.device.type == "cpu" else x.dtype
        zero = x.new_zeros(())
        total = torch.where(mask, x, zero).sum(dims, keepdim=True, dtype=acc)
        mean = (total / safe_count.to(acc)).to(x.dtype)
        centred = torch.where(mask, x - mean, zero)
        var = (centred * centred).sum(dims, keepdim=True) / safe_count
    if not keepdim:
        mean = mean.squeeze(dims)
        var = var.squeeze(dims)
        if isinstance(count, Tensor):
            count = count.squeeze(dims)
    return Moments(mean, var, count)


def mean_square(
    x: Tensor,
    dims: int | Sequence[int],
    mask: Tensor | None = None,
    keepdim: bool = True,
) -> Tensor:
    r"""Mean of ``x**2`` over ``dims`` (the RMSNorm statistic), :math:`\frac1n\sum_i x_i^2`.

    Same arguments, dtype rules and mask semantics as :func:`moments`.
    """
    dims = _dims(x, dims)
    x = _prepare(x)
    if mask is None:
        out = (x * x).mean(dims, keepdim=True)
    else:
        mask = check_mask(x, mask)
        count = mask.sum(dims, keepdim=True).clamp(min=1).to(x.dtype)
        out = torch.where(mask, x * x, x.new_zeros(())).sum(dims, keepdim=True) / count
    return out if keepdim else out.squeeze(dims)


def combine_moments(means: Tensor, variances: Tensor, counts: Tensor, dim: int = 0) -> Moments:
    r"""Merge the moments of disjoint parts into the moments of their union (Chan et al.).

    Part :math:`i` has ``counts[i]`` elements, mean :math:`\mu_i` and biased variance
    :math:`v_i` (entries taken along ``dim``); with :math:`n = \sum_i n_i`:

    .. math::
        \mu = \mu_r + \frac{1}{n}\sum_i n_i (\mu_i - \mu_r), \qquad
        \sigma^2 = \frac{1}{n}\sum_i n_i \big(v_i + (\mu_i - \mu)^2\big)

    where :math:`\mu_r` is the mean of the largest part. Only differences of means and
    non-negative terms are summed, so nothing cancels (unlike combining sums of
    squares); the result equals :func:`moments` of the concatenated parts up to
    rounding. Parts with count 0 take no part (their mean and variance are ignored,
    even if NaN); if every count is 0 the mean and variance are 0. Differentiable in
    ``means`` and ``variances``. Used to merge the per-rank statistics of
    :class:`normlab.nn.SyncBatchNorm`.

    Args:
        means, variances: tensors of the same shape, one entry per part along ``dim``.
        counts: broadcastable to ``means`` (a tensor of numbers of elements).
        dim: the dimension that indexes the parts; it is removed from the results.

    Returns:
        :class:`Moments` ``(mean, var, count)``, ``count`` a tensor in ``means.dtype``.
    """
    counts = counts.to(means.dtype).expand_as(means)
    valid = counts > 0  # an empty part may carry a NaN mean (the mean of nothing)
    means = torch.where(valid, means, 0.0)
    variances = torch.where(valid, variances, 0.0)
    total = counts.sum(dim, keepdim=True)
    safe = total.clamp(min=1)
    ref = means.gather(dim, counts.argmax(dim, keepdim=True))
    mean = ref + (counts * (means - ref)).sum(dim, keepdim=True) / safe
    dev = means - mean
    var = (counts * (variances + dev * dev)).sum(dim, keepdim=True) / safe
    return Moments(mean.squeeze(dim), var.squeeze(dim), total.squeeze(dim))


def unbiased(var: Tensor, count: int | Tensor) -> Tensor:
    """Bessel-corrected variance ``var * n / (n - 1)``; groups with ``n <= 1`` keep ``var``."""
    if isinstance(count, Tensor):
        n = count.to(var.dtype)
        return torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return var * (count / (count - 1)) if count > 1 else var
