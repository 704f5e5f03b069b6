"""LeCun-normal initialization, the weight init of self-normalizing networks
(Klambauer et al., 2017; LeCun et al., 1998)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["lecun_normal_"]


def lecun_normal_(tensor: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""Fill ``tensor`` in place with :math:`N(0, 1/n_{in})` and return it.

    :math:`n_{in}` is the fan-in, ``tensor.shape[1] * prod(tensor.shape[2:])`` for a
    Linear ``(out, in)`` or Conv ``(out, in/groups, *kernel)`` weight. With
    :math:`\sum_i w_i^2 \approx 1` per unit this is the :math:`\tau = 1` of the SELU
    fixed-point analysis; other inits (Glorot, He) move the fixed point and break
    self-normalization. It equals ``torch.nn.init.kaiming_normal_(tensor,
    mode="fan_in", nonlinearity="linear")``, drawn from the same generator.

    Args:
        tensor: a weight with at least 2 dimensions.
        generator: optional ``torch.Generator`` to draw from.

    Raises:
        ValueError: fewer than 2 dimensions, or a zero fan-in.
    """
    if tensor.dim() < 2:
        raise ValueError(
            "lecun_normal_: the fan-in needs a weight of at least 2 dimensions (out, in, *), "
            f"got shape {tuple(tensor.shape)}"
        )
    fan_in = tensor.shape[1] * math.prod(tensor.shape[2:])
    if fan_in == 0:
        raise ValueError(f"lecun_normal_: zero fan-in for shape {tuple(tensor.shape)}")
    with torch.no_grad():
        return tensor.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
