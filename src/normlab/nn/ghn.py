r"""Generalized Hamming Network layers (Lixin Fan, NeurIPS 2017).

Fan reads a neuron as a fuzzy-logic comparison of its input with its weights. With
the fuzzy XOR :math:`a \oplus b = a + b - 2ab` (the ordinary XOR on {0, 1}), the
generalized Hamming distance over a receptive field of :math:`L` elements is

.. math::
    \mathrm{GHD}(x, w) = \sum_{l=1}^{L} (x_l + w_l - 2 x_l w_l),

which equals the Hamming distance (the number of differing positions) when
:math:`x` and :math:`w` are binary. A GHN neuron outputs

.. math::
    h = -\tfrac12 \mathrm{GHD}(x, w) = w \cdot x - \tfrac12 \sum_l w_l - \tfrac12 \sum_l x_l
      = w \cdot (x - \tfrac12) - \tfrac12 \sum_l x_l :

an ordinary linear or convolutional neuron whose bias is not learned but computed,
per sample and per position, as :math:`b = -\frac12(\sum w + \sum x)` over the
receptive field. The paper argues that batch normalization learns to approximate
this bias; GHN uses neither a learned bias nor BN.

``normalized=True`` divides the distance by the fan-in :math:`L` (as the
third-party re-implementation kamwoh/ghn does; Fan's paper states the unnormalised
form): :math:`h = -\mathrm{GHD}/L = \frac{2}{L} w\cdot x - \bar w - \bar x`, i.e.
:math:`\frac{2}{L}` times the unnormalised output. For inputs and weights in
[0, 1] it lies in [-1, 0] whatever the layer's width, so the scale of the output
does not grow with the fan-in.

Sources: the abstract, the public NeurIPS reviews and the kamwoh/ghn
re-implementation; results are "as reported", since no official code is known.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.nn.checks import check_float_tensor, check_number, same_dtype_check

__all__ = ["fuzzy_xor", "generalized_hamming_distance", "GHNLinear", "GHNConv2d",
           "DoubleThreshold"]


def fuzzy_xor(a: Tensor, b: Tensor) -> Tensor:
    r"""Fuzzy XOR :math:`a \oplus b = a + b - 2ab` (elementwise, broadcast); the
    ordinary XOR on {0, 1}."""
    return a + b - 2 * a * b


def generalized_hamming_distance(x: Tensor, weight: Tensor) -> Tensor:
    r"""GHD between every row of ``x`` ``(*, L)`` and every row of ``weight``
    ``(M, L)``: :math:`\sum_l x_l + w_l - 2 x_l w_l`, shape ``(*, M)``."""
    return x.sum(-1, keepdim=True) + weight.sum(-1) - 2 * F.linear(x, weight)


class GHNLinear(nn.Linear):
    r"""Fully connected Generalized Hamming layer (Fan, 2017).

    .. math::
        h_j = -\tfrac12\mathrm{GHD}(x, w_j)
            = w_j\cdot x - \tfrac12\sum_i w_{ji} - \tfrac12\sum_i x_i

    or, with ``normalized=True``, :math:`h_j = -\mathrm{GHD}(x, w_j)/L` with
    :math:`L` = ``in_features`` (see :mod:`normlab.nn.ghn`). There is no bias
    parameter (``self.bias is None``): the bias
    :math:`-\frac12(\sum w_j + \sum x)` is computed per sample. Weights are
    initialised as ``torch.nn.Linear``'s. No activation is applied: follow with
    ``ReLU`` (the re-implementation uses ``relu(0.5 + h)``) or
    :class:`DoubleThreshold`.

    Args:
        in_features: L.
        out_features: number of neurons.
        normalized: divide the distance by L (output :math:`-\mathrm{GHD}/L`).
            Default: False (the paper's :math:`-\frac12 \mathrm{GHD}`).

    Shape:
        - Input: :math:`(*, L)`; output :math:`(*, \text{out\_features})`.
    """

    def __init__(self, in_features: int, out_features: int, normalized: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.normalized = bool(normalized)

    def forward(self, x: Tensor) -> Tensor:
        name = f"GHNLinear({self.in_features}, {self.out_features})"
        check_float_tensor(name, x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{name}: expected input of shape (*, {self.in_features}), got {tuple(x.shape)}"
            )
        same_dtype_check(name, x, self.weight)
        w = self.weight
        h = F.linear(x, w) - 0.5 * w.sum(1) - 0.5 * x.sum(-1, keepdim=True)
        if self.normalized:
            h = h * (2.0 / self.in_features)
        return h

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"normalized={self.normalized}")


class GHNConv2d(nn.Conv2d):
    r"""2-d convolutional Generalized Hamming layer (Fan, 2017).

    At every output position, over the receptive field :math:`R` of output channel
    :math:`o` (:math:`L = (C_{in}/\text{groups})\,k_h k_w` elements, zero padding
    included):

    .. math::
        h_o = -\tfrac12\mathrm{GHD}(x_R, w_o)
            = (w_o * x) - \tfrac12\sum w_o - \tfrac12\sum_{R} x

    or :math:`-\mathrm{GHD}/L` with ``normalized=True``. Padded positions count as
    :math:`x = 0` (so their weights still enter :math:`\sum w_o`, as the fuzzy XOR of
    0 and :math:`w` is :math:`w`). There is no bias parameter; weights are
    initialised as ``torch.nn.Conv2d``'s. Only ``padding_mode="zeros"``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups:
            as ``torch.nn.Conv2d``.
        normalized: divide the distance by L. Default: False.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)`; output :math:`(N, C_{out}, H', W')` with
          ``torch.nn.Conv2d``'s :math:`H', W'`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        normalized: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=False, padding_mode="zeros",
                         device=device, dtype=dtype)
        self.normalized = bool(normalized)

    @property
    def fan_in(self) -> int:
        """L, the number of input elements in one receptive field."""
        return self.weight[0].numel()

    def forward(self, x: Tensor) -> Tensor:
        name = f"GHNConv2d({self.in_channels}, {self.out_channels})"
        check_float_tensor(name, x)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name}: expected input of shape (N, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        same_dtype_check(name, x, self.weight)
        w = self.weight
        wx = F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)
        ones = x.new_ones(self.groups, self.in_channels // self.groups, *self.kernel_size)
        sum_x = F.conv2d(x, ones, None, self.stride, self.padding, self.dilation, self.groups)
        if self.groups > 1:
            sum_x = sum_x.repeat_interleave(self.out_channels // self.groups, dim=1)
        h = wx - 0.5 * w.sum((1, 2, 3)).view(1, -1, 1, 1) - 0.5 * sum_x
        if self.normalized:
            h = h * (2.0 / self.fan_in)
        return h

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalized={self.normalized}"


class DoubleThreshold(nn.Module):
    r"""Double-thresholding activation of Generalized Hamming Networks (Fan, 2017),
    in the form of the kamwoh/ghn re-implementation.

    .. math::
        h' = \tfrac12 + (h - \tfrac12)\,\Big[\sigma\big(-\alpha(h - r\,m)\big)
             + \sigma\big(\alpha(h - r\,M)\big)\Big]

    with :math:`m, M` the minimum and maximum of :math:`h` per sample (and per channel
    over the trailing dimensions of ``(N, C, *)`` input; over the C features of
    ``(N, C)`` input), :math:`r` a learnable factor per channel and :math:`\sigma`
    the logistic function. Values beyond the two thresholds :math:`r m` and
    :math:`r M` keep their value (the bracket tends to 1), values between them are
    pulled towards 1/2 (the bracket tends to 0): both extremes of the fuzzy distance
    are kept and its uncertain middle suppressed. With :math:`r = 0` the bracket is
    exactly 1 and the layer is the identity.

    The re-implementation draws :math:`r` at random (Glorot normal); here it starts
    at ``r_init`` (0.5, thresholds half-way to the extremes: our choice, the paper's
    value is not known).

    Args:
        num_channels: C, the number of factors :math:`r`.
        alpha: steepness :math:`\alpha` of the sigmoids. Default: 0.2.
        r_init: initial :math:`r`. Default: 0.5.

    Shape:
        - Input: :math:`(N, C, *)`; output of the same shape.
    """

    def __init__(self, num_channels: int, alpha: float = 0.2, r_init: float = 0.5,
                 device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"DoubleThreshold: num_channels must be a positive int, "
                             f"got {num_channels!r}")
        name = f"DoubleThreshold({num_channels})"
        self.alpha = check_number(name, "alpha", alpha, low=0.0, low_open=True)
        self.r_init = check_number(name, "r_init", r_init)
        self.num_channels = num_channels
        self.r = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every factor :math:`r` to ``r_init``."""
        nn.init.constant_(self.r, self.r_init)

    def forward(self, h: Tensor) -> Tensor:
        check_float_tensor(f"DoubleThreshold({self.num_channels})", h)
        if h.dim() < 2 or h.shape[1] != self.num_channels:
            raise ValueError(
                f"DoubleThreshold({self.num_channels}): expected input of shape "
                f"(N, {self.num_channels}, *), got {tuple(h.shape)}"
            )
        dims = tuple(range(2, h.dim())) if h.dim() > 2 else (1,)
        low = h.amin(dim=dims, keepdim=True)
        high = h.amax(dim=dims, keepdim=True)
        r = self.r.view(1, -1, *([1] * (h.dim() - 2)))
        gate = torch.sigmoid(-self.alpha * (h - r * low)) + torch.sigmoid(
            self.alpha * (h - r * high)
        )
        return 0.5 + (h - 0.5) * gate

    def extra_repr(self) -> str:
        return f"{self.num_channels}, alpha={self.alpha}"
