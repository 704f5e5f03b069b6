r"""Self-normalizing networks (Klambauer, Unterthiner, Mayr & Hochreiter, NeurIPS 2017):
the SELU activation and Alpha Dropout.

A self-normalizing network has no normalization layer. SELU, with the constants
:data:`ALPHA01` and :data:`LAMBDA01`, maps a pre-activation :math:`z \sim N(0, 1)`
to an output of mean 0 and variance 1 exactly, and the moment map
:math:`(\mu, \nu) \mapsto (\tilde\mu, \tilde\nu)` of a layer with LeCun-normal
weights (:func:`normlab.init.lecun_normal_`) has (0, 1) as a stable, attracting
fixed point (Jacobian spectral norm 0.7877 there): activations stay near mean 0 and
variance 1 through many layers. Alpha Dropout keeps that fixed point in training.

Constants (the paper's, in closed form with :math:`c = \mathrm{erfc}(1/\sqrt2)`):

.. math::
    \alpha_{01} = \frac{-\sqrt{2/\pi}}{c\,\sqrt{e} - 1}, \qquad
    \lambda_{01} = (1 - \sqrt{e}\,c)\,
    \sqrt{\frac{2\pi}{2 + \pi - 2\sqrt{e}(2 + \pi)\,c + e\pi c^2
    + 2e^2\,\mathrm{erfc}(\sqrt2)}}
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normlab.nn.checks import check_float_tensor, check_number

__all__ = [
    "ALPHA01",
    "LAMBDA01",
    "SELU_SATURATION",
    "selu",
    "alpha_dropout_affine",
    "alpha_dropout",
    "SELU",
    "AlphaDropout",
]

#: :math:`\alpha_{01}` of the paper, the SELU constant for the fixed point (0, 1).
ALPHA01 = 1.6732632423543772848170429916717
#: :math:`\lambda_{01}` of the paper, the SELU scale for the fixed point (0, 1).
LAMBDA01 = 1.0507009873554804934193349852946
#: :math:`\alpha' = -\lambda_{01}\alpha_{01}`, the value SELU tends to as
#: :math:`x \to -\infty`, which Alpha Dropout sets dropped units to.
SELU_SATURATION = -LAMBDA01 * ALPHA01


def selu(x: Tensor, alpha: float = ALPHA01, scale: float = LAMBDA01) -> Tensor:
    r"""Scaled exponential linear unit,
    :math:`\mathrm{selu}(x) = \lambda x` for :math:`x > 0` and
    :math:`\lambda\alpha(e^x - 1)` otherwise. With the defaults it equals
    ``torch.nn.functional.selu``. (One pass: aten's elu takes the output scale, as
    torch's own selu does.)"""
    return torch.ops.aten.elu(x, alpha, scale, 1.0)


def alpha_dropout_affine(
    p: float, alpha_prime: float = SELU_SATURATION, mean: float = 0.0, var: float = 1.0
) -> tuple[float, float]:
    r"""The affine correction ``(a, b)`` of Alpha Dropout.

    With keep probability :math:`q = 1 - p`, a dropped unit is set to
    :math:`\alpha'` and the result is mapped by :math:`a\tilde x + b`. For input of
    mean :math:`\mu` and variance :math:`\nu` the dropped-out
    :math:`\tilde x = d x + (1 - d)\alpha'`, :math:`d \sim \mathrm{Bernoulli}(q)`,
    has mean :math:`q\mu + (1-q)\alpha'` and variance
    :math:`q(\nu + (1-q)(\alpha' - \mu)^2)`, so mean and variance are kept by

    .. math::
        a = \sqrt{\frac{\nu}{q\left((1-q)(\alpha'-\mu)^2 + \nu\right)}}, \qquad
        b = \mu - a\left(q\mu + (1-q)\alpha'\right).

    For :math:`(\mu, \nu) = (0, 1)`: :math:`a = (q + \alpha'^2 q(1-q))^{-1/2}`,
    :math:`b = -a(1-q)\alpha'` (at :math:`q = 0.9`: a = 0.92128, b = 0.16197).

    Args:
        p: drop probability, in [0, 1).
        alpha_prime: the value of dropped units. Default: :data:`SELU_SATURATION`.
        mean, var: the fixed point :math:`(\mu, \nu)` to keep. Default: (0, 1).
    """
    name = "alpha_dropout_affine"
    p = check_number(name, "p (drop probability)", p, low=0.0, high=1.0, high_open=True)
    var = check_number(name, "var", var, low=0.0, low_open=True)
    mean = check_number(name, "mean", mean)
    alpha_prime = check_number(name, "alpha_prime", alpha_prime)
    q = 1.0 - p
    a = math.sqrt(var / (q * ((1.0 - q) * (alpha_prime - mean) ** 2 + var)))
    b = mean - a * (q * mean + (1.0 - q) * alpha_prime)
    return a, b


def alpha_dropout(
    x: Tensor,
    p: float = 0.5,
    training: bool = True,
    alpha_prime: float = SELU_SATURATION,
    mean: float = 0.0,
    var: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Alpha Dropout of ``x``: each element independently is kept with probability
    :math:`q = 1-p` or set to ``alpha_prime``, then :math:`a\tilde x + b` with
    ``(a, b)`` from :func:`alpha_dropout_affine`. The identity when not ``training``
    or ``p == 0``."""
    a, b = alpha_dropout_affine(p, alpha_prime, mean, var)
    if not training or p == 0.0:
        return x
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator).bool()
    dropped = torch.where(keep, x, torch.full_like(x, alpha_prime))
    return dropped * a + b


class SELU(nn.Module):
    r"""Scaled exponential linear unit (Klambauer et al., 2017).

    .. math::
        \mathrm{selu}(x) = \lambda \begin{cases} x & x > 0 \\
        \alpha (e^x - 1) & x \le 0 \end{cases}

    with :math:`\alpha = \alpha_{01} = 1.67326324235437728`,
    :math:`\lambda = \lambda_{01} = 1.05070098735548049` by default: the constants
    for which SELU of :math:`N(0, 1)` input has mean 0 and variance 1 and (0, 1) is
    an attracting fixed point of a LeCun-initialised layer. With the defaults it
    equals ``torch.nn.SELU``. Use it with :func:`normlab.init.lecun_normal_`
    weights, zero biases, standardised inputs and :class:`AlphaDropout` (ordinary
    dropout breaks the fixed point).

    Args:
        alpha: :math:`\alpha`. Default: :data:`ALPHA01`.
        scale: :math:`\lambda`. Default: :data:`LAMBDA01`.

    Shape:
        - Input: any shape; output of the same shape.
    """

    def __init__(self, alpha: float = ALPHA01, scale: float = LAMBDA01) -> None:
        super().__init__()
        self.alpha = check_number("SELU", "alpha", alpha, low=0.0, low_open=True)
        self.scale = check_number("SELU", "scale", scale, low=0.0, low_open=True)

    def forward(self, x: Tensor) -> Tensor:
        check_float_tensor("SELU", x)
        return selu(x, self.alpha, self.scale)

    def extra_repr(self) -> str:
        if self.alpha == ALPHA01 and self.scale == LAMBDA01:
            return ""
        return f"alpha={self.alpha}, scale={self.scale}"


class AlphaDropout(nn.Module):
    r"""Alpha Dropout (Klambauer et al., 2017): dropout that keeps the mean and
    variance of self-normalizing activations.

    In training each element is kept with probability :math:`q = 1 - p` or set to
    :math:`\alpha' = -\lambda_{01}\alpha_{01} = -1.7580993408473766` (SELU's
    negative saturation, so a dropped unit looks like a "very negative" input to the
    next layer), and the result goes through the affine correction

    .. math::
        y = a\,\big(d\,x + (1-d)\,\alpha'\big) + b, \quad d \sim \mathrm{Bernoulli}(q),

    .. math::
        a = \sqrt{\frac{\nu}{q((1-q)(\alpha'-\mu)^2 + \nu)}}, \qquad
        b = \mu - a(q\mu + (1-q)\alpha'),

    which maps input of mean :math:`\mu` and variance :math:`\nu` to output of the
    same mean and variance (derivation in :func:`alpha_dropout_affine`). The target
    is :math:`(\mu, \nu) = (0, 1)` by default, where
    :math:`a = (q + \alpha'^2 q(1-q))^{-1/2}`, :math:`b = -a(1-q)\alpha'`; with
    those defaults it is the same map as ``torch.nn.AlphaDropout``. In eval it is the
    identity.

    Args:
        p: drop probability, in [0, 1) (torch's convention; the paper writes the
            keep probability q = 1 - p). Default: 0.5, as torch.nn.AlphaDropout;
            the paper recommends 0.05 or 0.1.
        alpha_prime: value of dropped units. Default: :data:`SELU_SATURATION`.
        mean, var: the fixed point to keep. Default: 0.0, 1.0.

    Shape:
        - Input: any shape; output of the same shape.
    """

    def __init__(
        self,
        p: float = 0.5,
        alpha_prime: float = SELU_SATURATION,
        mean: float = 0.0,
        var: float = 1.0,
    ) -> None:
        super().__init__()
        name = "AlphaDropout"
        self.p = check_number(name, "p (drop probability)", p, low=0.0, high=1.0, high_open=True)
        self.alpha_prime = check_number(name, "alpha_prime", alpha_prime)
        self.mean = check_number(name, "mean", mean)
        self.var = check_number(name, "var", var, low=0.0, low_open=True)
        self.a, self.b = alpha_dropout_affine(self.p, self.alpha_prime, self.mean, self.var)

    def forward(self, x: Tensor) -> Tensor:
        check_float_tensor(f"AlphaDropout(p={self.p})", x)
        return alpha_dropout(x, self.p, self.training, self.alpha_prime, self.mean, self.var)

    def extra_repr(self) -> str:
        return f"p={self.p}, a={self.a:.6g}, b={self.b:.6g}"
