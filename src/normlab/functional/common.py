"""What every normalization function shares: the input check, the normalize step and
the guarded update of running statistics.

:func:`normalize` is the last line of every method's equation,
``(x - mean) / sqrt(var + eps) * weight + bias``; the methods differ only in which
elements ``mean`` and ``var`` are taken over (:mod:`normlab.stats`) and how the running
statistics follow them (:func:`update_running_`).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from normlab import stats

__all__ = [
    "check_input",
    "check_batch_first",
    "check_eps",
    "as_normalized_shape",
    "check_last_dims",
    "check_path",
    "channel_shape",
    "batch_dims",
    "spatial_size",
    "channels_last_format",
    "normalize",
    "update_running_",
    "warn_non_finite",
    "PATHS",
]

# The values of the ``path`` argument: "auto" lets normlab.functional.fastpath hand the
# call to torch's kernel where it is as accurate; "reference" always computes the
# paper's equation over normlab.stats.
PATHS = ("auto", "reference")


def check_path(path: str, name: str) -> None:
    """Raise ValueError naming the layer if ``path`` is not one of :data:`PATHS`."""
    if path not in PATHS:
        raise ValueError(f"{name}: path must be 'auto' or 'reference', got {path!r}")


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


def check_batch_first(x: Tensor, name: str) -> None:
    """Raise naming ``name`` unless ``x`` is a tensor of at least 2 dimensions."""
    # The (N, C, *) functions index x.shape[1]; without this a 1-D tensor would end in
    # an IndexError or an unpacking error that names nothing.
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"{name}: expected input of shape (N, C, *) with at least 2 dimensions, got shape "
            f"{tuple(x.shape)} (normlab's functions are batch-first; add the batch "
            f"dimension with x.unsqueeze(0))"
        )


def check_eps(eps, name: str) -> None:
    """Raise ValueError naming ``name`` if ``eps`` (a number, or None) is negative."""
    if eps is not None and not eps >= 0:
        raise ValueError(f"{name}: eps must be >= 0, got {eps}")


def as_normalized_shape(normalized_shape, name: str,
                        what: str = "normalized_shape must be a positive int or a non-empty "
                                    "sequence of positive ints") -> tuple[int, ...]:
    """torch.nn.LayerNorm's ``normalized_shape`` (an int or a sequence of positive ints)
    as a tuple; ValueError naming ``name`` and the argument (``what``) otherwise."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    try:
        shape = tuple(shape)
    except TypeError:
        shape = None
    if (not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                         for d in shape)):
        raise ValueError(f"{name}: {what}, got {normalized_shape!r}")
    return shape


def check_last_dims(x: Tensor, shape: tuple[int, ...], name: str,
                    *params: Tensor | None) -> None:
    """Raise naming ``name`` unless ``x`` is a float tensor ending in ``shape`` and every
    given parameter has that shape (torch's layer and RMS norm conventions)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(
            f"{name}: expected input of shape (*, {', '.join(map(str, shape))}) "
            f"(normalized_shape={shape}, the last dimensions), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input, got {x.dtype}")
    for p in params:
        if p is not None and tuple(p.shape) != shape:
            raise ValueError(f"{name}: weight and bias must have shape normalized_shape="
                             f"{shape}, got {tuple(p.shape)}")


def channel_shape(x: Tensor) -> tuple[int, ...]:
    """``(1, C, 1, ..., 1)``: a per-channel vector viewed to broadcast over ``x``."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def batch_dims(x: Tensor) -> tuple[int, ...]:
    """``(0, 2, 3, ...)``: the dimensions a batch statistic of ``(N, C, *)`` reduces."""
    return (0,) + tuple(range(2, x.dim()))


def spatial_size(x: Tensor) -> int:
    """The number of elements per sample and channel (the product of ``x.shape[2:]``)."""
    return math.prod(x.shape[2:])


def channels_last_format(x: Tensor) -> torch.memory_format | None:
    """``torch.channels_last(_3d)`` if ``x`` is contiguous in it, else None."""
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


def warn_non_finite(name: str, bad: Tensor, stacklevel: int) -> None:
    """The RuntimeWarning, naming the layer and the channels (``bad``: a bool vector),
    that a non-finite batch statistic was kept out of the running statistics.
    ``stacklevel`` counts as warnings.warn would in the caller (1: the caller)."""
    channels = bad.nonzero().flatten().tolist()
    shown = channels[:8] + (["..."] if len(channels) > 8 else [])
    warnings.warn(
        f"{name}: non-finite batch statistics (NaN or inf) in channels {shown}; "
        "the running statistics of those channels were left unchanged",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


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
        # On the meta device (shape inference) there are no values to check.
        if (running.device.type == "meta" or batch_value.device.type == "meta"
                or (not torch.compiler.is_compiling()
                    and math.isfinite(float(batch_value.sum())))):
            running.lerp_(batch_value, factor)
            return
        finite = torch.isfinite(batch_value)
        updated = torch.lerp(running, batch_value, factor)
        running.copy_(torch.where(finite, updated, running))
        if not torch.compiler.is_compiling() and not bool(finite.all()):
            warn_non_finite(name, ~finite, stacklevel=3)
