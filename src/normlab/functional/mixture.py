"""Learned mixtures of normalizers: Switchable Normalization and Attentive Normalization.

Both start from the *instance* moments (per sample and channel, over the trailing
dimensions), taken once (:func:`normlab.functional.fastpath.instance_moments_fast`: torch's
native group norm per channel where it is robust, else :mod:`normlab.stats`). Every coarser
statistic (layer, group, batch) is derived from them exactly by the law of total
variance over equal-sized groups,

.. math::
    \\mu_G = \\operatorname{mean}_{i \\in G} \\mu_i, \\qquad
    \\sigma^2_G = \\operatorname{mean}_{i \\in G}\\big(\\sigma^2_i + (\\mu_i - \\mu_G)^2\\big),

which needs no ``E[x^2] - E[x]^2`` cancellation and costs no further pass over the
full-size input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from normlab import stats
from normlab.functional.common import normalize, update_running_
from normlab.functional.core import batch_norm
from normlab.functional.fastpath import instance_moments_fast

__all__ = [
    "SWITCHABLE_TERMS",
    "instance_moments",
    "pooled_moments",
    "switchable_weights",
    "switchable_norm",
    "attention_weights",
    "attentive_norm",
]

#: The order of the terms in Switchable Normalization's ``mean_logits``/``var_logits``.
SWITCHABLE_TERMS = ("instance", "layer", "batch")


def _flat(x: Tensor) -> Tensor:
    """``x`` of shape ``(N, C, *)`` as ``(N, C, L)``, ``L = prod(*)`` (1 for ``(N, C)``)."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def instance_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of every ``(n, c)`` over the trailing dimensions.

    Returned with shape ``(N, C, 1)`` in :func:`normlab.stats.stat_dtype`. On ``(N, C)``
    input (or a single trailing element) the mean is ``x`` itself and the variance 0.
    """
    return instance_moments_fast(_flat(x))


def pooled_moments(mean: Tensor, var: Tensor, dims: int | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    r"""Moments of the union of equal-sized groups from the groups' own moments.

    .. math::
        \mu = \operatorname{mean}_g \mu_g, \qquad
        \sigma^2 = \operatorname{mean}_g\big(\sigma^2_g + (\mu_g - \mu)^2\big)

    (law of total variance; exact, biased, no cancellation). ``dims`` are the
    dimensions that index the groups; they are kept with size 1.
    """
    mu = mean.mean(dims, keepdim=True)
    d = mean - mu
    return mu, (var + d * d).mean(dims, keepdim=True)


def switchable_weights(
    mean_logits: Tensor,
    var_logits: Tensor,
    using_in: bool = True,
    using_ln: bool = True,
    using_bn: bool = True,
) -> tuple[Tensor, Tensor]:
    """Softmax mixture weights over (IN, LN, BN) for the means and the variances.

    Terms switched off get weight exactly 0 (and no gradient); the softmax is over
    the remaining terms. Returns two tensors of shape (3,) in :data:`SWITCHABLE_TERMS`
    order.
    """
    # Checked on the Python flags, not on the tensor: a bool() of a tensor would be a
    # host sync and a graph break under torch.compile.
    if not (using_in or using_ln or using_bn):
        raise ValueError("switchable_weights: at least one of IN, LN, BN must be used")
    active = torch.tensor([using_in, using_ln, using_bn], device=mean_logits.device)
    neg_inf = float("-inf")
    w_mean = torch.softmax(mean_logits.masked_fill(~active, neg_inf), 0)
    w_var = torch.softmax(var_logits.masked_fill(~active, neg_inf), 0)
    return w_mean, w_var


def _check_batch_values(n: int, length: int, name: str, hint: str) -> None:
    if n * length == 1:
        raise ValueError(
            f"{name}: batch statistics need more than 1 value per channel in training, got "
            f"input with N={n} and {length} trailing element(s) per channel; {hint}"
        )


def _batch_term(
    xr: Tensor, mu_in: Tensor, var_in: Tensor, training: bool, moments_fn, name: str, hint: str
) -> tuple[Tensor, Tensor, Tensor | int]:
    """Batch mean and biased variance ``(1, C, 1)`` of ``xr`` ``(N, C, L)`` and their count.

    Locally they are pooled from the instance moments (exact, no further pass). With
    ``moments_fn`` (the synchronisation hook of :mod:`normlab.nn.sync_stats`) in training they
    are ``moments_fn(xr, (0, 2))``, the moments over every rank's batch, differentiable;
    the size check then uses the global count, so that every rank raises alike (a
    local check could raise on one rank and leave the others waiting).
    """
    if training and moments_fn is not None:
        m = moments_fn(xr, (0, 2))
        total = int(torch.as_tensor(m.count).max())
        if total <= 1:
            raise ValueError(
                f"{name}: batch statistics need more than 1 value per channel over all "
                f"ranks in training, got {total} (local input with N={xr.shape[0]} and "
                f"{xr.shape[2]} trailing element(s) per channel); {hint}"
            )
        return m.mean.to(mu_in.dtype), m.var.to(mu_in.dtype), m.count
    n, length = xr.shape[0], xr.shape[2]
    if training:
        _check_batch_values(n, length, name, hint)
    mean, var = pooled_moments(mu_in, var_in, 0)
    return mean, var, n * length


def _batch_statistics(
    xr: Tensor, mu_in: Tensor, var_in: Tensor, running_mean: Tensor | None,
    running_var: Tensor | None, training: bool, momentum: float, moments_fn, name: str,
    hint: str,
) -> tuple[Tensor, Tensor]:
    """The batch term's mean and variance ``(1, C, 1)``, as batch norm uses them: the
    batch's (:func:`_batch_term`) in training or without running statistics, updating
    the running statistics in training (unbiased variance, weight ``momentum``), and
    the running statistics otherwise."""
    c = xr.shape[1]
    if training or running_mean is None or running_var is None:
        mean, var, count = _batch_term(xr, mu_in, var_in, training, moments_fn, name, hint)
        if training and running_mean is not None and running_var is not None:
            update_running_(running_mean, mean.flatten(), momentum, name)
            update_running_(running_var, stats.unbiased(var, count).flatten(), momentum, name)
        return mean, var
    return (running_mean.view(1, c, 1).to(mu_in.dtype),
            running_var.view(1, c, 1).to(mu_in.dtype))


def switchable_norm(
    x: Tensor,
    mean_logits: Tensor,
    var_logits: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    using_bn: bool = True,
    name: str = "switchable_norm",
    moments_fn=None,
) -> Tensor:
    r"""Switchable Normalization (Luo et al., ICLR 2019) of ``x`` of shape ``(N, C, *)``.

    .. math::
        y = \gamma_c\,\frac{x - \sum_k w_k \mu_k}{\sqrt{\sum_k w'_k \sigma^2_k + \epsilon}}
            + \beta_c, \qquad k \in \{\mathrm{IN}, \mathrm{LN}, \mathrm{BN}\}

    with ``w = softmax(mean_logits)``, ``w' = softmax(var_logits)`` and biased
    variances throughout: IN per (n, c) over ``*``; LN per n over ``C x *``; BN per c
    over ``N x *``, the last two pooled from the IN moments (exact).

    * With fewer than two trailing elements (``(N, C)``, ``(N, C, 1, 1)``) the instance
      statistics are those of one value (mean ``x``, variance 0) and carry no
      information: the IN term is left out and the softmax runs over LN and BN (the
      official ``SwitchNorm1d`` mixes LN and BN only).
    * ``using_bn=False`` leaves the BN term out (the paper's setting for batch 1).
    * BN term: batch statistics when ``training`` or when no running statistics are
      given. In training with running statistics these are updated in place,
      ``r <- (1 - momentum) r + momentum * batch`` (torch.nn's convention, unbiased
      variance). Otherwise (eval) the running statistics stand in for the BN term,
      while IN and LN still come from the sample.
    * ``moments_fn(x, dims, mask=None) -> Moments``, if given, supplies the BN term in
      training (the synchronisation hook of :mod:`normlab.nn.sync_stats`:
      :func:`~normlab.nn.sync_stats.sync_moments` gives the moments over every rank's batch,
      and the running variance is unbiased with the global count). IN and LN are per
      sample and stay local.
    """
    n, c = x.shape[:2]
    xr = _flat(x)
    length = xr.shape[2]
    using_in = length > 1
    mu_in, var_in = instance_moments_fast(xr)  # native fast path, see its docstring
    mu_ln, var_ln = pooled_moments(mu_in, var_in, 1)
    mu_bn = var_bn = None
    if using_bn:
        mu_bn, var_bn = _batch_statistics(
            xr, mu_in, var_in, running_mean, running_var, training, momentum, moments_fn,
            name, "use using_bn=False for batch size 1",
        )
    w_mean, w_var = switchable_weights(
        mean_logits.to(mu_in.dtype), var_logits.to(mu_in.dtype), using_in, True, using_bn
    )
    terms = [(1, mu_ln, var_ln)]
    if using_in:
        terms.append((0, mu_in, var_in))
    if using_bn:
        terms.append((2, mu_bn, var_bn))
    mean = sum(w_mean[k] * m for k, m, _ in terms)
    var = sum(w_var[k] * v for k, _, v in terms)
    w = None if weight is None else weight.view(1, c, 1)
    b = None if bias is None else bias.view(1, c, 1)
    return normalize(xr, mean, var, eps, w, b).reshape(x.shape)


def attention_weights(
    x: Tensor,
    attention_proj: Tensor,
    attention_weight: Tensor | None = None,
    attention_bias: Tensor | None = None,
    attention_running_mean: Tensor | None = None,
    attention_running_var: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    norm: str = "batch",
    attention_eps: float = 1e-3,
    name: str = "attention_weights",
    moments: tuple[Tensor, Tensor] | None = None,
    moments_fn=None,
) -> Tensor:
    r"""Attentive Normalization's per-sample component weights, :math:`\lambda` of shape (N, K).

    .. math::
        s_{n,c} = \frac{\mu_{n,c}}{\sqrt{\sigma^2_{n,c} + \epsilon_a}}, \qquad
        \lambda_n = \mathrm{hsigmoid}\big(\mathrm{Norm}_K(W s_n)\big), \qquad
        \mathrm{hsigmoid}(z) = \frac{\mathrm{ReLU6}(z + 3)}{6}

    :math:`\mu, \sigma^2` are the instance moments of the *un-normalised* input (biased
    variance), ``W = attention_proj`` of shape (K, C) (bias-free), and
    :math:`\mathrm{Norm}_K` a batch norm over the K outputs (``norm="batch"``, with
    running statistics updated when training) or a layer norm over the K outputs of
    each sample (``norm="group"``, i.e. GroupNorm with one group), each with its own
    affine ``attention_weight``, ``attention_bias``. ``moments`` may pass precomputed
    :func:`instance_moments`. ``moments_fn`` (training, ``norm="batch"``) replaces the
    batch moments of :math:`\mathrm{Norm}_K`, as in :func:`~normlab.functional.batch_norm`.
    """
    mu_in, var_in = instance_moments(x) if moments is None else moments
    compute = mu_in.dtype
    s = (mu_in * torch.rsqrt(var_in + attention_eps)).squeeze(2)
    z = s @ attention_proj.to(compute).t()
    aw = None if attention_weight is None else attention_weight.to(compute)
    ab = None if attention_bias is None else attention_bias.to(compute)
    if norm == "batch":
        # With moments_fn the statistics are over all ranks and batch_norm checks the
        # global count; a local check would raise on one rank only.
        if training and moments_fn is None and z.shape[0] == 1:
            raise ValueError(
                f"{name}: the batch-normalised attention needs more than 1 sample in "
                "training, got N=1; use norm='group'"
            )
        z = batch_norm(
            z, attention_running_mean, attention_running_var, aw, ab,
            training=training, momentum=momentum, eps=eps, name=f"{name} attention",
            moments_fn=moments_fn if training else None,
        )
    elif norm == "group":
        mu, var = stats.moments(z, 1)[:2]
        z = normalize(z, mu, var, eps, aw, ab)
    else:
        raise ValueError(f"{name}: norm must be 'batch' or 'group', got {norm!r}")
    return F.hardsigmoid(z)


def attentive_norm(
    x: Tensor,
    component_weight: Tensor,
    component_bias: Tensor,
    attention_proj: Tensor,
    attention_weight: Tensor | None = None,
    attention_bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    attention_running_mean: Tensor | None = None,
    attention_running_var: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    norm: str = "batch",
    num_groups: int = 1,
    attention_eps: float = 1e-3,
    name: str = "attentive_norm",
    return_attention: bool = False,
    moments_fn=None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Attentive Normalization (Li, Sun & Wu, ECCV 2020) of ``x`` of shape ``(N, C, *)``.

    .. math::
        \hat{x} = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
        y_n = (\lambda_n^\top \Gamma) \odot \hat{x}_n + \lambda_n^\top B

    :math:`\hat{x}` is batch norm without affine (``norm="batch"``: batch statistics in
    training or without running statistics, running statistics otherwise, updated
    as in :func:`~normlab.functional.batch_norm`) or group norm without affine
    (``norm="group"``, ``num_groups`` groups); :math:`\Gamma, B` =
    ``component_weight, component_bias`` of shape (K, C); :math:`\lambda_n` from
    :func:`attention_weights` on the un-normalised ``x``. With
    ``return_attention=True`` returns ``(y, lambda)``.

    ``moments_fn(x, dims, mask=None) -> Moments``, if given, supplies the batch moments
    in training, of :math:`\hat{x}` and of the attention's batch norm over the K outputs
    (``norm="batch"``; the synchronisation hook of :mod:`normlab.nn.sync_stats`, which makes
    both global over the ranks). The attention's instance moments stay per sample.
    """
    n, c = x.shape[:2]
    if norm == "batch" and training and moments_fn is None and n == 1:
        # Checked here, before the running statistics of x-hat are updated, so that a
        # refused call changes nothing (attention_weights repeats the check).
        raise ValueError(
            f"{name}: the batch-normalised attention needs more than 1 sample in "
            "training, got N=1; use norm='group'"
        )
    xr = _flat(x)
    mu_in, var_in = instance_moments_fast(xr)  # native fast path, see its docstring
    if norm == "batch":
        mean, var = _batch_statistics(
            xr, mu_in, var_in, running_mean, running_var, training, momentum, moments_fn,
            name, "use norm='group' for batch size 1",
        )
    elif norm == "group":
        if c % num_groups:
            raise ValueError(f"{name}: num_groups={num_groups} does not divide C={c}")
        mg, vg = pooled_moments(
            mu_in.view(n, num_groups, c // num_groups), var_in.view(n, num_groups, -1), 2
        )
        mean = mg.expand(n, num_groups, c // num_groups).reshape(n, c, 1)
        var = vg.expand(n, num_groups, c // num_groups).reshape(n, c, 1)
    else:
        raise ValueError(f"{name}: norm must be 'batch' or 'group', got {norm!r}")
    lam = attention_weights(
        x, attention_proj, attention_weight, attention_bias, attention_running_mean,
        attention_running_var, training=training, momentum=momentum, eps=eps, norm=norm,
        attention_eps=attention_eps, name=name, moments=(mu_in, var_in), moments_fn=moments_fn,
    )
    compute = mu_in.dtype
    gamma = (lam @ component_weight.to(compute)).unsqueeze(2)
    beta = (lam @ component_bias.to(compute)).unsqueeze(2)
    y = normalize(xr, mean, var, eps, gamma, beta).reshape(x.shape)
    return (y, lam) if return_attention else y
