r"""Uncertainty from the randomness of batch normalization.

Monte Carlo Batch Normalization (Teye, Azizpour & Smith, ICML 2018)
-------------------------------------------------------------------
A network trained with batch normalization is, at test time, a random function of
the training mini-batch whose statistics normalize it. :func:`mc_batchnorm` samples
that function: for each of T samples it draws a training batch, runs it forward in
train mode and stores, in every BatchNorm layer, the batch mean and biased variance
(layer by layer: a deeper layer's statistics are those of activations that the
earlier layers normalized with the same batch), then predicts the test inputs in
eval mode with those stored statistics. The predictive mean and variance are

.. math::
    \hat y = \frac1T\sum_t \hat y_t, \qquad
    \mathrm{Var}[y] = \frac1T\sum_t (\hat y_t - \hat y)^2 \; (+\, \tau^{-1}).

:func:`predictive_log_likelihood` is the paper's PLL metric for those samples.

Stochastic normalization (Shekhovtsov & Flach, ACCV 2018)
--------------------------------------------------------
**Derived from the paper's abstract, not checked against its section 3, which we
could not access.** For a channel whose pre-activations are Gaussian,
:math:`x \sim N(\mu, \sigma^2)`, and a batch of :math:`M` of them, sampling theory
gives the batch mean and biased variance as

.. math::
    \mu_B = \mu + \sigma\,\varepsilon/\sqrt{M}, \quad \varepsilon \sim N(0, 1), \qquad
    M\sigma_B^2/\sigma^2 \sim \chi^2_{M-1}, \text{ independent of } \mu_B

(exact for Gaussian data, Cochran's theorem), so batch norm of a point :math:`x`
outside the batch is a random affine map of its deterministic normalization
:math:`\hat x = (x - \mu)/\sigma`:

.. math::
    \frac{x - \mu_B}{\sigma_B} = s\,\hat x - u, \qquad
    s = \frac{\sigma}{\sigma_B} = \sqrt{\frac{M}{\chi^2_{M-1}}}, \qquad
    u = \frac{\mu_B - \mu}{\sigma_B} = \frac{\varepsilon\, s}{\sqrt M}.

:func:`sample_batch_noise` draws :math:`(s, u)` per channel and
:class:`StochasticNormalization` applies :math:`s\hat x - u` to the output of a
BatchNorm-free normalization (one draw per channel per forward pass, shared by the
whole batch, as BN's noise is). Shekhovtsov & Flach report that noise of this form
on deterministic normalizations (weight normalization, analytic normalization)
gives test accuracy comparable to BN and a better validation NLL. The paper's own
noise model may differ in detail (e.g. a point inside its batch is correlated with
:math:`\mu_B`, which this model ignores).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn

from normlab import functional as NF
from normlab import stats
from normlab.convert import num_channels_of
from normlab.functional.common import batch_dims, channel_shape
from normlab.nn.batch import BatchNorm, BatchRenorm

__all__ = [
    "MCPrediction",
    "batchnorm_layers",
    "mc_batchnorm",
    "predictive_log_likelihood",
    "sample_batch_noise",
    "StochasticNormalization",
]


class MCPrediction(NamedTuple):
    """Predictive distribution of :func:`mc_batchnorm`: ``mean`` and ``var`` shaped
    like one model output, and the ``samples`` ``(T, *output)`` when asked for."""

    mean: Tensor
    var: Tensor
    samples: Tensor | None


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, layer)`` pairs of the BatchNorm layers of ``model`` that
    :func:`mc_batchnorm` handles: :class:`normlab.nn.BatchNorm` and every
    ``torch.nn`` BatchNorm (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``).

    Raises:
        ValueError: the model holds a :class:`normlab.nn.BatchRenorm`, whose
            training output depends on its running statistics, so MC Batch Norm is
            not defined for it.
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, BatchRenorm):
            raise ValueError(
                f"mc_batchnorm: layer {name or '<model>'} ({type(module).__name__}) is Batch "
                "Renormalization, whose training output uses its running statistics; MC Batch "
                "Norm is defined for BatchNorm layers only"
            )
        if isinstance(module, (BatchNorm, nn.modules.batchnorm._BatchNorm)):
            found.append((name or "<model>", module))
    return found


class _MCLayer:
    """Replaces a BatchNorm layer's forward during :func:`mc_batchnorm`: "capture"
    normalizes with the batch's own statistics and stores them; "predict" normalizes
    with the stored statistics."""

    def __init__(self, name: str, layer: nn.Module) -> None:
        self.name = f"{name} ({type(layer).__name__}({num_channels_of(layer)}))"
        self.layer = layer
        self.phase = "capture"
        # One (mean, var) per call, replayed in the same order when predicting, so a
        # layer applied more than once in a forward pass gets each call's statistics.
        self.stats: list[tuple[Tensor, Tensor]] = []
        self.calls = 0

    def start(self, phase: str) -> None:
        self.phase = phase
        self.calls = 0
        if phase == "capture":
            self.stats = []

    def __call__(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        layer = self.layer
        NF.check_input(x, num_channels_of(layer), self.name)
        shape = channel_shape(x)
        if self.phase == "capture":
            if mask is None and x.numel() // x.shape[1] == 1:
                raise ValueError(
                    f"mc_batchnorm: layer {self.name} got one value per channel from the "
                    f"training batch (input shape {tuple(x.shape)}); the training batches "
                    "need at least 2 samples"
                )
            mean, var, _ = stats.moments(x, batch_dims(x), mask=mask)
            self.stats.append((mean.flatten(), var.flatten()))
        elif self.calls >= len(self.stats):
            raise RuntimeError(
                f"mc_batchnorm: layer {self.name} was called {self.calls + 1} times on the test "
                f"inputs but {len(self.stats)} times on the training batch, so it has no "
                "statistics to predict with"
            )
        mean, var = self.stats[self.calls] if self.phase == "predict" else self.stats[-1]
        self.calls += 1
        weight = None if layer.weight is None else layer.weight.view(shape)
        bias = None if layer.bias is None else layer.bias.view(shape)
        return NF.normalize(x, mean.view(shape), var.view(shape), layer.eps, weight, bias)


def _first_tensor(batch, index: int) -> Tensor:
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(
            "mc_batchnorm: each item of train_batches must be a tensor of inputs or a "
            f"tuple/list whose first element is one (as a DataLoader yields); item {index} "
            f"is {type(batch).__name__}"
        )
    return batch


def _batches(
    train_batches: Tensor | Iterable, batch_size: int | None, generator: torch.Generator | None
) -> Iterator[Tensor]:
    if isinstance(train_batches, Tensor):
        n = train_batches.shape[0] if train_batches.dim() else 0
        if batch_size is None:
            raise ValueError(
                "mc_batchnorm: train_batches is a tensor of training inputs, so batch_size "
                "(the training batch size) is required"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not (
            2 <= batch_size <= n
        ):
            raise ValueError(
                f"mc_batchnorm: batch_size must be an int in [2, {n}] (the number of training "
                f"inputs), got {batch_size!r}"
            )
        while True:
            index = torch.randperm(n, generator=generator)[:batch_size]
            yield train_batches[index.to(train_batches.device)]
    else:
        if batch_size is not None:
            raise ValueError(
                "mc_batchnorm: batch_size applies only when train_batches is a tensor; an "
                "iterable supplies its own batches"
            )
        count = 0
        while True:
            seen = 0
            for batch in train_batches:
                yield _first_tensor(batch, count)
                count += 1
                seen += 1
            if seen == 0:
                raise ValueError(
                    f"mc_batchnorm: train_batches ran out after {count} batches; pass a "
                    "re-iterable (a list, a DataLoader) or a tensor of training inputs"
                )


@torch.no_grad()
def mc_batchnorm(
    model: nn.Module,
    inputs: Tensor,
    train_batches: Tensor | Iterable,
    samples: int = 32,
    batch_size: int | None = None,
    tau: float | None = None,
    generator: torch.Generator | None = None,
    return_samples: bool = False,
) -> MCPrediction:
    r"""Monte Carlo Batch Normalization (Teye, Azizpour & Smith, ICML 2018): the
    predictive mean and variance of ``model`` at ``inputs``.

    For each of ``samples`` (T) samples:

    1. a training batch is run through the model in train mode; every BatchNorm
       layer normalizes it with its own batch mean and biased variance and stores
       them (the running statistics are not updated);
    2. ``inputs`` are predicted in eval mode, every BatchNorm layer normalizing with
       the stored statistics (and its own ``eps``, ``weight`` and ``bias``).

    Returns the mean over samples and the variance :math:`\frac1T\sum_t(\hat y_t -
    \hat y)^2` (divisor T), plus :math:`1/\tau` when ``tau`` is given. Each
    prediction is made in eval mode with statistics fixed by the training batch
    alone, so a test input's prediction does not depend on the other test inputs
    (the paper's CIFAR variant, which puts the test image into its batch, is not
    implemented).

    The model is left as it was found: every buffer (running statistics, counters,
    and the state of any other layer that the train-mode pass might touch) is
    restored, and so is every module's train/eval flag. As in the paper, the whole
    model is in train mode during step 1, so dropout and similar layers are active
    there. BatchNorm layers are :class:`normlab.nn.BatchNorm` and ``torch.nn``'s
    ``BatchNorm1d/2d/3d`` (and the SyncBatchNorm of both, whose statistics are
    then those of the local batch); a model with :class:`normlab.nn.BatchRenorm` is
    rejected, and any other layer with running statistics (SwitchableNorm, the
    per-step BN of a BN-LSTM, ...) keeps predicting with them, with a RuntimeWarning.

    Args:
        model: a module with at least one BatchNorm layer, taking one tensor and
            returning one tensor.
        inputs: the test inputs, one batch.
        train_batches: either a **tensor of training inputs** ``(N_train, ...)``,
            from which each sample draws ``batch_size`` rows at random without
            replacement (the paper's scheme), or an **iterable of batches**, each a
            tensor of inputs or a tuple/list whose first element is one (a
            ``DataLoader`` yielding ``(x, y)`` works): sample t uses the t-th batch,
            and the iterable is iterated again if it runs out (use a shuffling
            DataLoader for fresh batches; a short final batch is used as it comes).
        samples: T, >= 1. Default: 32 (the paper uses 500 for regression).
        batch_size: the training batch size; required with a tensor, not allowed
            with an iterable. The spread of the predictions shrinks as it grows.
        tau: optional model precision :math:`\tau > 0`; adds :math:`1/\tau` to the
            variance.
        generator: ``torch.Generator`` for drawing batches from a tensor.
        return_samples: also return the T predictions ``(T, *output)``.

    Returns:
        :class:`MCPrediction` ``(mean, var, samples)``, computed in float32 at least.

    Raises:
        ValueError: no BatchNorm layer, bad ``samples``, ``batch_size`` or ``tau``, a
            training batch with one value per channel (the message names the layer).
    """
    layers = _checked_mc_layers(model, inputs, samples, tau)
    batches = _batches(train_batches, batch_size, generator)
    with _sampling(model, layers) as mc_layers:
        mean, m2, kept = _welford(
            (_mc_sample(model, mc_layers, next(batches), inputs) for _ in range(samples)),
            return_samples)
    var = m2 / samples
    if tau is not None:
        var = var + 1.0 / tau
    return MCPrediction(mean, var, kept)


def _checked_mc_layers(model, inputs, samples, tau) -> list[tuple[str, nn.Module]]:
    """The model's BatchNorm layers, after checking mc_batchnorm's arguments; warns
    about the other layers with running statistics (their noise is not sampled)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"mc_batchnorm: model must be a torch.nn.Module, got {type(model)}")
    if not isinstance(inputs, Tensor):
        raise TypeError(f"mc_batchnorm: inputs must be a tensor, got {type(inputs).__name__}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"mc_batchnorm: samples must be a positive int, got {samples!r}")
    if tau is not None and not tau > 0:
        raise ValueError(f"mc_batchnorm: tau (the model precision) must be > 0, got {tau!r}")
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(
            f"mc_batchnorm: {type(model).__name__} has no BatchNorm layer (normlab.nn.BatchNorm "
            "or torch.nn.BatchNorm1d/2d/3d), so MC Batch Norm has nothing to sample"
        )
    handled = {id(layer) for _, layer in layers}
    for name, module in model.named_modules():
        if id(module) not in handled and getattr(module, "running_mean", None) is not None:
            warnings.warn(
                f"mc_batchnorm: layer {name} ({type(module).__name__}) keeps running statistics "
                "but is not a BatchNorm layer; it predicts with its running statistics, so its "
                "batch noise is not sampled",
                RuntimeWarning,
                stacklevel=3,
            )
    return layers


@contextlib.contextmanager
def _sampling(model: nn.Module, layers) -> Iterator[list[_MCLayer]]:
    """Every BatchNorm layer's forward replaced by an :class:`_MCLayer` for the block;
    afterwards the forwards, every buffer and every train/eval flag as they were."""
    modes = [(m, m.training) for m in model.modules()]
    saved_buffers = []
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None:
                saved_buffers.append((module, key, buf, buf.detach().clone()))
    mc_layers = [_MCLayer(name, layer) for name, layer in layers]
    own_forward = [layer.__dict__.get("forward") for _, layer in layers]
    for mc, (_, layer) in zip(mc_layers, layers, strict=True):
        layer.forward = mc
    try:
        yield mc_layers
    finally:
        for (_, layer), forward in zip(layers, own_forward, strict=True):
            del layer.forward
            if forward is not None:
                layer.forward = forward
        for module, key, original, copy in saved_buffers:
            original.copy_(copy)
            module._buffers[key] = original
        for module, flag in modes:
            module.training = flag


def _mc_sample(model: nn.Module, mc_layers, batch: Tensor, inputs: Tensor) -> Tensor:
    """One MC sample: the BatchNorm statistics of ``batch`` (train mode), then the
    prediction of ``inputs`` with them (eval mode), in the statistics dtype."""
    if batch.device != inputs.device:
        batch = batch.to(inputs.device)
    for mc in mc_layers:
        mc.start("capture")
    model.train()
    model(batch)
    for mc in mc_layers:
        mc.start("predict")
    model.eval()
    out = model(inputs)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"mc_batchnorm: the model must return one tensor, got {type(out).__name__}"
        )
    return out.detach().to(stats.stat_dtype(out.dtype))


def _welford(outs: Iterable[Tensor], keep: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Mean and sum of squared deviations of ``outs`` by Welford's update (numerically
    stable), and the stacked ``outs`` if ``keep``."""
    total = m2 = None
    kept = []
    for t, out in enumerate(outs):
        if keep:
            kept.append(out)
        if total is None:
            total, m2 = out.clone(), torch.zeros_like(out)
        else:
            delta = out - total
            total += delta / (t + 1)
            m2 += delta * (out - total)
    return total, m2, torch.stack(kept) if keep else None


def predictive_log_likelihood(
    samples: Tensor, targets: Tensor, tau: float, reduction: str = "mean"
) -> Tensor:
    r"""Predictive log-likelihood of MC samples (Teye et al. 2018, as in MC dropout):

    .. math::
        \mathrm{PLL}_i = \log\frac1T\sum_t \exp\!\big(-\tfrac\tau2\|y_i - \hat y_{i,t}\|^2\big)
        - \tfrac d2\log 2\pi + \tfrac d2\log\tau

    the log-density of :math:`y_i` under the mixture of the T Gaussians
    :math:`N(\hat y_{i,t}, \tau^{-1} I_d)`, with d the size of one target.

    Args:
        samples: ``(T, N, *)`` predictions (``MCPrediction.samples``).
        targets: ``(N, *)``.
        tau: the model precision, > 0.
        reduction: ``"mean"`` over the N points (default), or ``"none"``.
    """
    if samples.dim() < 2 or samples.shape[1:] != targets.shape:
        raise ValueError(
            f"predictive_log_likelihood: samples must be (T, *targets.shape) = (T, "
            f"{', '.join(map(str, targets.shape))}), got {tuple(samples.shape)}"
        )
    if not tau > 0:
        raise ValueError(f"predictive_log_likelihood: tau must be > 0, got {tau!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"predictive_log_likelihood: reduction must be 'mean' or 'none', "
                         f"got {reduction!r}")
    t = samples.shape[0]
    d = math.prod(targets.shape[1:])
    sq = (samples - targets).pow(2).reshape(t, targets.shape[0], -1).sum(-1)
    pll = (torch.logsumexp(-0.5 * tau * sq, dim=0) - math.log(t)
           - 0.5 * d * math.log(2 * math.pi) + 0.5 * d * math.log(tau))
    return pll.mean() if reduction == "mean" else pll


def sample_batch_noise(
    num_channels: int,
    batch_size: int,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    r"""Draw the per-channel scale and shift noise ``(s, u)`` of batch norm with batch
    size :math:`M` (derived model; see :mod:`normlab.uncertainty`):

    .. math::
        s = \sqrt{M / \chi^2_{M-1}}, \qquad u = \varepsilon\,s/\sqrt M, \quad
        \varepsilon \sim N(0, 1),

    the law of :math:`(\sigma/\sigma_B, (\mu_B - \mu)/\sigma_B)` for a batch of
    :math:`M` Gaussian values. :math:`E[s^2] = M/(M-3)` for :math:`M > 3`; for
    :math:`M \le 3` the scale is heavy-tailed (infinite variance), as BN's is.

    Returns:
        ``(s, u)``, each of shape ``(num_channels,)``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"sample_batch_noise: batch_size must be an int >= 2, got {batch_size!r}")
    df = torch.tensor(float(batch_size - 1), device=device, dtype=dtype)
    chi2 = torch.distributions.Chi2(df).sample((num_channels,))
    chi2 = chi2.clamp(min=torch.finfo(dtype).tiny)
    s = torch.sqrt(batch_size / chi2)
    eps = torch.randn(num_channels, device=device, dtype=dtype)
    u = eps * s / math.sqrt(batch_size)
    return s, u


class StochasticNormalization(nn.Module):
    r"""Batch-norm-like noise on a BatchNorm-free normalization (after Shekhovtsov &
    Flach, 2018; the noise model is **derived from the abstract**, see
    :mod:`normlab.uncertainty`).

    In training, with one draw :math:`(s_c, u_c)` of :func:`sample_batch_noise` per
    channel per forward pass (shared by the batch and every position),

    .. math::
        y_{n,c,\dots} = \gamma_c\,(s_c\,\hat x_{n,c,\dots} - u_c) + \beta_c,

    which is the law of batch norm with batch size :math:`M` for Gaussian
    pre-activations whose deterministic normalization is :math:`\hat x`. Place it
    after a normalization that does not use the batch (weight normalization with an
    analytic or running normalization, a LayerNorm without affine, ...). In eval it
    is the deterministic :math:`\gamma\hat x + \beta` (:math:`s = 1, u = 0`, BN's
    population statistics); average several train-mode passes for an MC estimate.

    Args:
        num_channels: C.
        batch_size: M, the batch size whose noise is imitated, >= 2.
        affine: learn :math:`\gamma` (init 1) and :math:`\beta` (init 0). Default: False.

    Shape:
        - Input: :math:`(N, C, *)`; output of the same shape.
    """

    def __init__(self, num_channels: int, batch_size: int, affine: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"StochasticNormalization: num_channels must be a positive int, "
                             f"got {num_channels!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"StochasticNormalization({num_channels}): batch_size must be an "
                             f"int >= 2, got {batch_size!r}")
        self.num_channels = num_channels
        self.batch_size = batch_size
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        NF.check_input(x, self.num_channels, f"StochasticNormalization({self.num_channels})")
        shape = (1, self.num_channels) + (1,) * (x.dim() - 2)
        if self.training:
            s, u = sample_batch_noise(self.num_channels, self.batch_size, x.device,
                                      stats.stat_dtype(x.dtype))
            x = (x * s.view(shape) - u.view(shape)).to(x.dtype)
        if self.affine:
            x = x * self.weight.view(shape) + self.bias.view(shape)
        return x

    def extra_repr(self) -> str:
        return f"{self.num_channels}, batch_size={self.batch_size}, affine={self.affine}"
