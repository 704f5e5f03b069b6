"""Argument checks shared by normlab's constructors and layers.

Each check raises with a message that names the owner (``"BatchNorm(64)"``), the
argument, what was expected and what was given: TypeError for a value of the wrong
type (a string, a list, a bool where a number is meant), ValueError for a number out
of range or NaN. They run before any state is created or changed, so a refused call
leaves a layer as it was.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["check_number", "check_int", "empty_output", "check_float_tensor",
           "same_dtype_check"]


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def check_number(
    owner: str,
    arg: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> float | None:
    """``value`` as a float, after checking that it is a real number (not a bool), not
    NaN, finite unless ``allow_inf``, and within ``[low, high]`` (bounds excluded with
    ``low_open`` / ``high_open``); None passes only with ``allow_none``."""
    if value is None and allow_none:
        return None
    expected = "a finite number" if not allow_inf else "a number"
    bounds = _range_text(low, high, low_open, high_open)
    expected += f" {bounds}" if bounds else ""
    expected += " or None" if allow_none else ""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {arg} must be {expected}, got {value!r} "
                        f"({type(value).__name__})")
    v = float(value)
    if (math.isnan(v) or (math.isinf(v) and not allow_inf)
            or (low is not None and (v < low or (low_open and v == low)))
            or (high is not None and (v > high or (high_open and v == high)))):
        raise ValueError(f"{owner}: {arg} must be {expected}, got {value!r}")
    return v


def check_int(owner: str, arg: str, value, *, low: int = 1, allow_none: bool = False
              ) -> int | None:
    """``value`` if it is an int (not a bool) >= ``low``; None only with ``allow_none``."""
    if value is None and allow_none:
        return None
    expected = f"an int >= {low}" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {arg} must be {expected}, got {value!r} "
                        f"({type(value).__name__})")
    if value < low:
        raise ValueError(f"{owner}: {arg} must be {expected}, got {value!r}")
    return int(value)


def empty_output(x: Tensor, *params) -> Tensor:
    """The output of a layer on an input with no elements: an empty tensor of ``x``'s
    shape and dtype, connected to ``x`` and to every parameter given, so that
    backward gives zero gradients as torch.nn.BatchNorm2d does for N = 0."""
    y = x * 1
    for p in params:
        if p is not None:
            y = y + (p.sum() * 0).to(y.dtype)
    return y


def check_float_tensor(owner: str, x) -> None:
    """TypeError naming ``owner`` unless ``x`` is a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: expected a floating-point input, got {x.dtype}")


def same_dtype_check(owner: str, x: Tensor, weight: Tensor) -> None:
    """TypeError naming ``owner`` unless ``x`` has ``weight``'s floating dtype (for the
    layers built on torch's linear and convolution, which refuse mixed dtypes with a
    message that names no layer). Under autocast, where torch casts both, any floating
    dtype passes."""
    check_float_tensor(owner, x)
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{owner}: expected input of dtype {weight.dtype} (the weight's), "
                        f"got {x.dtype}")

