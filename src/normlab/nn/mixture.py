"""Learned mixtures of normalizers: Switchable Normalization and Attentive Normalization."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab.functional import mixture as FM
from normlab.nn.base import NormBase
from normlab.nn.checks import check_int, check_number
from normlab.nn.per_sample import choose_num_groups
from normlab.nn.sync_stats import moments_fn_for

__all__ = ["SwitchableNorm", "AttentiveNorm"]


def _moments_fn(layer) -> object:
    """The layer's batch-moments hook in training (None: local moments); see
    :mod:`normlab.nn.sync_stats`."""
    if not (layer.training and layer.sync_batch_stats):
        return None
    return moments_fn_for(layer)


class SwitchableNorm(NormBase):
    r"""Switchable Normalization (Luo, Ren, Peng, Zhang & Li, ICLR 2019).

    Learns, per layer, how much of instance, layer and batch normalization to use:

    .. math::
        y = \gamma_c\,\frac{x - \sum_k w_k \mu_k}{\sqrt{\sum_k w'_k \sigma^2_k + \epsilon}}
            + \beta_c, \qquad
        w = \mathrm{softmax}(\lambda), \quad w' = \mathrm{softmax}(\lambda'),
        \quad k \in (\mathrm{IN}, \mathrm{LN}, \mathrm{BN})

    * IN: :math:`\mu_{n,c}, \sigma^2_{n,c}` over the trailing dimensions ``*`` of
      sample n, channel c;
    * LN: :math:`\mu_n = \mathrm{mean}_c\,\mu_{n,c}`,
      :math:`\sigma^2_n = \mathrm{mean}_c(\sigma^2_{n,c} + (\mu_{n,c} - \mu_n)^2)`
      (the moments over ``C x *``);
    * BN: :math:`\mu_c = \mathrm{mean}_n\,\mu_{n,c}`,
      :math:`\sigma^2_c = \mathrm{mean}_n(\sigma^2_{n,c} + (\mu_{n,c} - \mu_c)^2)`
      (the moments over ``N x *``).

    All variances are biased (the official code mixes an unbiased IN variance with
    biased terms and returns NaN on ``N x C x 1 x 1`` input; neither is copied). The
    logits :math:`\lambda` = ``mean_logits`` and :math:`\lambda'` = ``var_logits``,
    shape (3,) in the order (IN, LN, BN), start equal (at 1, so every weight is 1/3).
    :meth:`mixture_weights` returns the current weights.

    Running statistics exist for the BN term only: ``running_mean`` and the unbiased
    ``running_var``, updated in training as
    :math:`r \leftarrow (1 - m)\,r + m\,r_B` with :math:`m` = ``momentum`` (torch.nn's
    convention: 0.1 here is the official code's 0.9); ``momentum=None`` gives a
    cumulative average. In eval they replace the BN term only; IN and LN still come
    from the sample, so a sample's eval output does not depend on its batch.
    ``running_var`` starts at 1 (torch.nn's convention, so that it means what a
    BatchNorm's does); the official code starts it at 0. Trained alike, the two differ
    by exactly :math:`(1 - m)^t` after t training steps (0.9^t at the default
    momentum: 0.35 after 10 steps, 2.7e-5 after 100), in the BN variance of eval only.

    On input with a single trailing element (``(N, C)``, ``(N, C, 1, 1)``) the instance
    statistics are those of one value (mean ``x``, variance 0) and carry no
    information, so the IN term is left out and the softmax runs over LN and BN (as
    the official ``SwitchNorm1d``). Outputs stay finite.

    Args:
        num_channels: C.
        eps: Default: 1e-5.
        momentum: weight of the new batch in the BN running statistics, or None.
            Default: 0.1.
        affine: per-channel :math:`\gamma` (1) and :math:`\beta` (0). Default: True.
        track_running_stats: keep BN running statistics for eval (else batch
            statistics in eval too). Default: True.
        using_bn: include the BN term. False mixes IN and LN only (the paper's
            setting for batch size 1, where BN equals IN in training). Default: True.
        last_gamma: initialise :math:`\gamma` to 0, for the last norm of a residual
            branch (the paper's ResNet setting). Default: False.

    Shape:
        - Input: :math:`(N, C, *)`; output of the same shape.

    Raises:
        ValueError: wrong rank or channel count; training with the BN term on one
            value per channel (``N * prod(*) == 1``; over all ranks when synchronised).

    Distributed training: it follows the batch-statistics synchronisation protocol of
    :mod:`normlab.nn.sync_stats`. With ``sync_batch_stats = True`` (set by
    :func:`normlab.nn.to_sync_batchnorm`) the BN term and its running statistics are
    taken over every rank of ``process_group`` (None: the default group); IN and LN
    are per sample and stay local.
    """

    # running_mean / running_var are BatchNorm's (batch term, unbiased variance), so
    # normlab.convert may carry them over from and to batch-statistics layers.
    _normlab_batch_statistics = True

    #: Synchronisation protocol (normlab.nn.sync_stats): global batch moments when True.
    sync_batch_stats: bool = False
    #: The process group of the global moments; None is the default group.
    process_group = None

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        using_bn: bool = True,
        last_gamma: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        self.using_bn = bool(using_bn)
        self.last_gamma = bool(last_gamma)
        super().__init__(
            num_channels, eps, momentum, affine, track_running_stats and self.using_bn,
            device=device, dtype=dtype,
        )
        factory = {"device": device, "dtype": dtype}
        self.mean_logits = nn.Parameter(torch.ones(3, **factory))
        self.var_logits = nn.Parameter(torch.ones(3, **factory))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.last_gamma and self.weight is not None:
            nn.init.zeros_(self.weight)
        if hasattr(self, "mean_logits"):
            nn.init.ones_(self.mean_logits)
            nn.init.ones_(self.var_logits)

    def mixture_weights(self, with_instance: bool = True) -> dict[str, dict[str, float]]:
        """The current softmax weights, ``{"mean": {...}, "var": {...}}``, each mapping
        ``"instance"``, ``"layer"``, ``"batch"`` to a float (0 for a term not used).
        ``with_instance=False`` gives the weights used on input with a single trailing
        element, where the IN term is left out."""
        with torch.no_grad():
            w_mean, w_var = FM.switchable_weights(
                self.mean_logits.double(), self.var_logits.double(), with_instance, True,
                self.using_bn,
            )
        return {
            "mean": dict(zip(FM.SWITCHABLE_TERMS, w_mean.tolist(), strict=True)),
            "var": dict(zip(FM.SWITCHABLE_TERMS, w_var.tolist(), strict=True)),
        }

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.numel() == 0 and not (self.training and self.sync_batch_stats):
            return self._empty_batch(x)  # synchronised, the ranks' collectives still run
        counting = self.training and self.track_running_stats
        factor = self._momentum_factor() if counting else 0.0
        y = FM.switchable_norm(
            x,
            self.mean_logits,
            self.var_logits,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=self.training,
            momentum=factor,
            eps=self.eps,
            using_bn=self.using_bn,
            name=self.layer_name,
            moments_fn=_moments_fn(self),
        )
        if counting:
            self._count_batch()
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, using_bn={self.using_bn}, last_gamma={self.last_gamma}"


class AttentiveNorm(NormBase):
    r"""Attentive Normalization (Li, Sun & Wu, ECCV 2020): standardization followed by
    a per-sample mixture of K affine transforms, weighted by attention on the input.

    .. math::
        \hat{x} = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
        y_n = \big(\textstyle\sum_k \lambda_{n,k} \Gamma_k\big) \odot \hat{x}_n
            + \textstyle\sum_k \lambda_{n,k} B_k

    .. math::
        s_{n,c} = \frac{\mu_{n,c}}{\sqrt{\sigma^2_{n,c} + 10^{-3}}}, \qquad
        \lambda_n = \mathrm{hsigmoid}\big(\mathrm{Norm}_K(W s_n)\big), \qquad
        \mathrm{hsigmoid}(z) = \mathrm{ReLU6}(z + 3) / 6

    * :math:`\hat{x}`: batch norm without affine (``norm="batch"``, running
      statistics and eval behaviour as :class:`~normlab.nn.BatchNorm`) or group norm
      without affine (``norm="group"``, ``num_groups`` groups, no running statistics).
    * :math:`\Gamma, B` (``component_weight``, ``component_bias``, shape (K, C)): K
      affine components, initialised :math:`\Gamma \sim N(1, 0.1^2)`,
      :math:`B \sim N(0, 0.1^2)` as in the paper (``last_gamma=True`` zeroes both,
      for the last norm of a residual branch).
    * :math:`s`: per-channel mean over standard deviation of the *un-normalised*
      input (instance moments, biased variance), :math:`W` (``attention_proj``,
      (K, C), no bias, Kaiming-normal init) and :math:`\mathrm{Norm}_K` a batch norm
      over the K outputs (``norm="batch"``; affine ``attention_weight``,
      ``attention_bias``; running statistics ``attention_running_mean``,
      ``attention_running_var``) or, for ``norm="group"``, a layer norm over the K
      outputs of each sample (GroupNorm with one group). :math:`\lambda` is not
      constrained to sum to 1. The official code takes the *unbiased* instance
      variance (``torch.var``'s default) in :math:`s`; normlab the biased one, defined
      for one trailing element too (where the unbiased one is NaN). Where the
      variance dominates :math:`10^{-3}`, the official :math:`s` is normlab's times
      sqrt((L - 1) / L), L the trailing elements per channel (0.992 at 8x8, 0.998 at
      16x16); with copied weights, eval outputs differed by up to 1.4e-2 in issue
      14's side-by-side run. On ``(N, C)`` input the instance variance is 0 and
      :math:`s \propto x`, which :math:`\mathrm{Norm}_K` makes scale-free.

    There is no per-channel affine, so ``weight`` and ``bias`` are None. With K = 1 and
    :math:`\lambda \equiv 1` this is :class:`~normlab.nn.BatchNorm` with affine
    :math:`(\Gamma_1, B_1)`. Parameters beyond a BatchNorm's: :math:`3KC + 2K - 2C`.

    Args:
        num_channels: C.
        num_components: K. Default: 10 (the paper's ResNet-50 stages 1-2; it uses 20
            in stages 3-4 and 5-10 in MobileNetV2).
        eps: of the standardization and of :math:`\mathrm{Norm}_K`. Default: 1e-5.
        momentum: weight of the new batch in the running statistics (torch.nn's
            convention), or None for a cumulative average. Default: 0.1.
        track_running_stats: ``norm="batch"`` only. Default: True.
        norm: ``"batch"`` (AN-BN) or ``"group"`` (AN-GN). Default: "batch".
        num_groups: groups of AN-GN; None picks
            :func:`~normlab.nn.choose_num_groups`. Default: None.
        attention_eps: the :math:`10^{-3}` in :math:`s`. Default: 1e-3.
        last_gamma: zero :math:`\Gamma` and :math:`B`. Default: False.

    Shape:
        - Input: :math:`(N, C, *)`; output of the same shape.

    Raises:
        ValueError: wrong rank or channel count; ``norm="batch"`` in training with
            N = 1 (the attention's batch norm needs 2 samples) or one value per channel
            (over all ranks together when synchronised).

    Distributed training: it follows the batch-statistics synchronisation protocol of
    :mod:`normlab.nn.sync_stats`. With ``sync_batch_stats = True`` (set by
    :func:`normlab.nn.to_sync_batchnorm`) and ``norm="batch"``, the batch moments of
    :math:`\hat{x}` and of the attention's batch norm over the K outputs, and both
    running statistics, are taken over every rank of ``process_group`` (None: the
    default group). ``norm="group"`` uses no batch statistics and is unaffected.
    """

    # norm="batch": running_mean / running_var are BatchNorm's.
    _normlab_batch_statistics = True

    #: Synchronisation protocol (normlab.nn.sync_stats): global batch moments when True.
    sync_batch_stats: bool = False
    #: The process group of the global moments; None is the default group.
    process_group = None

    def __init__(
        self,
        num_channels: int,
        num_components: int = 10,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        norm: str = "batch",
        num_groups: int | None = None,
        attention_eps: float = 1e-3,
        last_gamma: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        name = f"AttentiveNorm({num_channels})"
        if (
            isinstance(num_components, bool)
            or not isinstance(num_components, int)
            or num_components < 1
        ):
            raise ValueError(f"{name}: num_components must be a positive int, got "
                             f"{num_components!r}")
        if norm not in ("batch", "group"):
            raise ValueError(f"{name}: norm must be 'batch' or 'group', got {norm!r}")
        if norm == "group" and isinstance(num_channels, int) and num_channels > 0:
            if num_groups is None:
                num_groups = choose_num_groups(num_channels)
            num_groups = check_int(name, "num_groups", num_groups)
            if num_channels % num_groups:
                raise ValueError(
                    f"{name}: num_groups={num_groups} does not divide num_channels="
                    f"{num_channels}"
                )
        self.num_components = num_components
        self.norm = norm
        self.num_groups = num_groups if norm == "group" else None
        self.attention_eps = check_number(name, "attention_eps", attention_eps, low=0.0)
        self.last_gamma = bool(last_gamma)
        super().__init__(
            num_channels, eps, momentum, False, track_running_stats and norm == "batch",
            device=device, dtype=dtype,
        )
        factory = {"device": device, "dtype": dtype}
        k, c = num_components, num_channels
        self.component_weight = nn.Parameter(torch.empty(k, c, **factory))
        self.component_bias = nn.Parameter(torch.empty(k, c, **factory))
        self.attention_proj = nn.Parameter(torch.empty(k, c, **factory))
        self.attention_weight = nn.Parameter(torch.empty(k, **factory))
        self.attention_bias = nn.Parameter(torch.empty(k, **factory))
        if self.track_running_stats:
            self.register_buffer("attention_running_mean", torch.zeros(k, **factory))
            self.register_buffer("attention_running_var", torch.ones(k, **factory))
        else:
            self.register_buffer("attention_running_mean", None)
            self.register_buffer("attention_running_var", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.track_running_stats and hasattr(self, "attention_running_mean"):
            self.attention_running_mean.zero_()
            self.attention_running_var.fill_(1)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if not hasattr(self, "component_weight"):
            return
        if self.last_gamma:
            nn.init.zeros_(self.component_weight)
            nn.init.zeros_(self.component_bias)
        else:
            nn.init.normal_(self.component_weight, 1.0, 0.1)
            nn.init.normal_(self.component_bias, 0.0, 0.1)
        nn.init.kaiming_normal_(self.attention_proj, nonlinearity="relu")
        nn.init.ones_(self.attention_weight)
        nn.init.zeros_(self.attention_bias)

    def attention_weights(self, x: Tensor) -> Tensor:
        """The attention :math:`\\lambda` of shape (N, K) that ``forward(x)`` would use,
        without updating any running statistics (for reports and analysis). It never
        communicates: in synchronised training the attention's batch norm uses this
        rank's batch only."""
        self._check_input(x)
        running = (None, None)
        if not self.training:
            running = (self.attention_running_mean, self.attention_running_var)
        return FM.attention_weights(
            x, self.attention_proj, self.attention_weight, self.attention_bias, *running,
            training=self.training, eps=self.eps, norm=self.norm,
            attention_eps=self.attention_eps, name=self.layer_name,
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.numel() == 0 and not (self.training and self.sync_batch_stats):
            return self._empty_batch(x)  # synchronised, the ranks' collectives still run
        counting = self.training and self.track_running_stats
        factor = self._momentum_factor() if counting else 0.0
        y = FM.attentive_norm(
            x,
            self.component_weight,
            self.component_bias,
            self.attention_proj,
            self.attention_weight,
            self.attention_bias,
            self.running_mean,
            self.running_var,
            self.attention_running_mean,
            self.attention_running_var,
            training=self.training,
            momentum=factor,
            eps=self.eps,
            norm=self.norm,
            num_groups=self.num_groups or 1,
            attention_eps=self.attention_eps,
            name=self.layer_name,
            moments_fn=_moments_fn(self),
        )
        if counting:
            self._count_batch()
        return y

    def extra_repr(self) -> str:
        parts = [f"{self.num_channels}", f"num_components={self.num_components}",
                 f"norm={self.norm!r}"]
        if self.norm == "group":
            parts.append(f"num_groups={self.num_groups}")
        parts.append(f"eps={self.eps}")
        if self.track_running_stats:
            parts.append(f"momentum={self.momentum}")
        return ", ".join(parts)
