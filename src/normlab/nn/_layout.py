"""Which dimensions LayerNorm and RMSNorm normalize: normlab's channel-first layout or
torch.nn's last dimensions, and the rule that keeps the two from being confused.

* ``layout="channels_first"``: input ``(N, C, *)``, statistics over ``C x *`` of each
  sample, a per-channel affine of shape ``(C,)`` (the papers' layer norm for CNNs).
* ``layout="last"``: input ``(*, *normalized_shape)``, statistics over the last
  ``len(normalized_shape)`` dimensions, an elementwise affine of shape
  ``normalized_shape``: exactly torch.nn.LayerNorm / torch.nn.RMSNorm, the sequence
  layout ``(N, L, C)`` of transformers.
* ``layout=None`` with an int: decided on each call from the input's shape. Only one
  layout fits most inputs (torch would refuse an input that fits only
  ``"channels_first"``); on ``(N, C)`` both give the same numbers. An input of rank 3
  or more whose dimension 1 *and* last dimension both equal C fits both, with
  different results: that call raises, showing both spellings, rather than choose.
  Input of rank below 2, or that fits neither, gets the channel-first error.
* A list or tuple (torch's ``normalized_shape`` spelling) means ``layout="last"``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normlab.functional.common import as_normalized_shape

LAYOUTS = ("channels_first", "last")


def setup(module, num_channels, layout, affine, elementwise_affine, cls_name: str):
    """Validate the arguments shared by LayerNorm and RMSNorm; return
    ``(normalized_shape, layout, affine, channel count for NormBase)``."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"{cls_name}: layout must be 'channels_first', 'last' or None (decided "
                         f"by the input's shape), got {layout!r}")
    if elementwise_affine is not None:
        if affine is not True and bool(affine) != bool(elementwise_affine):
            raise ValueError(f"{cls_name}: affine={affine!r} and elementwise_affine="
                             f"{elementwise_affine!r} disagree; pass one of them")
        affine = bool(elementwise_affine)
    shape = as_normalized_shape(num_channels, cls_name,
                                "num_channels must be a positive int (or torch.nn's "
                                "normalized_shape, a sequence of positive ints)")
    if not isinstance(num_channels, int):  # torch's sequence spelling
        if layout == "channels_first":
            raise ValueError(
                f"{cls_name}: layout='channels_first' takes the channel count as an int, got "
                f"normalized_shape={num_channels!r}; a sequence means layout='last'")
        layout = "last"
    return shape, layout, affine, math.prod(shape)


def shape_affine(module, shape: tuple[int, ...], device, dtype) -> None:
    """Give the affine parameters the shape ``normalized_shape`` (torch's state_dict)
    where it has more than one dimension (NormBase made them flat)."""
    if len(shape) == 1:
        return
    factory = {"device": device, "dtype": dtype}
    for name in ("weight", "bias"):
        if getattr(module, name) is not None:
            setattr(module, name, nn.Parameter(torch.empty(shape, **factory)))
    module.reset_parameters()


def resolve(module, x: Tensor) -> str:
    """The layout of this call (see the module docstring)."""
    if module.layout is not None:
        return module.layout
    if not isinstance(x, Tensor) or x.dim() < 2:
        # normlab's layers are batch-first unless told otherwise (layout="last" takes
        # torch's unbatched (C,)): the channel-first checks say what is wrong.
        return "channels_first"
    if x.dim() == 2:
        return "last"  # (N, C): the same numbers either way, torch's kernel
    c = module.normalized_shape[0]
    first, last = x.shape[1] == c, x.shape[-1] == c
    if not first and not last:
        return "channels_first"  # whose check names the layer, C and the shape
    if first != last:
        return "channels_first" if first else "last"
    cls = type(module).__name__
    raise ValueError(
        f"{cls}({c}): input of shape {tuple(x.shape)} fits both layouts, which normalize "
        f"differently. Build the layer with the "
        f"layout you mean: {cls}({c}, layout='last') (or {cls}([{c}])) normalizes the last "
        f"dimension, as torch.nn.{cls}({c}) does on (N, L, {c}) sequences; "
        f"{cls}({c}, layout='channels_first') normalizes C x * of (N, {c}, *) input with a "
        f"per-channel affine"
    )


def layer_name(module) -> str:
    shape = module.normalized_shape
    return f"{type(module).__name__}({shape[0] if len(shape) == 1 else list(shape)})"


def extra_repr(module, eps) -> str:
    shape = module.normalized_shape
    parts = [str(shape[0]) if len(shape) == 1 else str(shape), f"eps={eps}",
             f"affine={module.affine}"]
    if module.layout is not None:
        parts.append(f"layout={module.layout!r}")
    return ", ".join(parts)
