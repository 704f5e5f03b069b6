"""Batch-statistics normalization: BatchNorm and Batch Renormalization."""

from __future__ import annotations

from torch import Tensor

from normlab import functional as NF
from normlab.nn.base import NormBase
from normlab.nn.checks import check_number
from normlab.nn.sync_stats import moments_fn_for

__all__ = ["BatchNorm", "BatchRenorm", "PAPER_RENORM_WARMUP"]

#: Batch Renorm's schedule in Ioffe (2017): plain BN for 5k steps, then r_max reaches
#: its final value at 40k steps and d_max at 25k.
PAPER_RENORM_WARMUP = (5000, 40000, 25000)


class BatchNorm(NormBase):
    r"""Batch Normalization (Ioffe & Szegedy, 2015) for input of any rank.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    The mean and the biased variance are taken per channel over the batch and every
    trailing dimension, ``(N, *)``. One class serves what torch.nn splits into
    BatchNorm1d, 2d and 3d, with the same results, state_dict keys and conventions,
    so checkpoints load in both directions.

    In training (``track_running_stats=True``) the running statistics are updated as
    :math:`\hat{r} \leftarrow (1 - m)\,\hat{r} + m\,r_B`, with :math:`m` the
    ``momentum`` and the batch variance Bessel-corrected (unbiased), as in torch.nn;
    ``momentum=None`` makes them a cumulative average. In eval they normalize. With
    ``track_running_stats=False`` batch statistics are used in eval too.

    NaN or inf in the input gives NaN in the output, and the affected channels'
    running statistics are *not* updated: a RuntimeWarning names the layer and the
    channels, so a bad batch never silently poisons a checkpoint. (Under
    torch.compile the guard stays but the warning, a host-side check, is skipped.)

    torch.compile: no graph break in the default configuration. ``momentum=None``
    and a ``mask`` each add a host-side read (the batch counter; the valid counts),
    hence a graph break.

    Args:
        num_channels: C, the size of dimension 1 of the input.
        eps: added to the variance for numerical stability. Default: 1e-5.
        momentum: weight of the new batch in the running statistics, or None for a
            cumulative average. Default: 0.1.
        affine: learn a per-channel scale :math:`\gamma` (init 1) and shift
            :math:`\beta` (init 0). Default: True.
        track_running_stats: keep running statistics for eval. Default: True.
        activation: None, ``"relu"`` or ``"leaky_relu"`` applied to the output (fused
            into the kernel with ``fused=True``). Default: None.
        negative_slope: of ``"leaky_relu"``. Default: 0.01.
        fused: in training, run the fused C++ kernels of :mod:`normlab.kernels` (CPU
            float32/bfloat16, contiguous or channels_last; compiled at first use, a few
            seconds, then cached); other inputs take the default path. Same outputs and
            gradients as the default path within float32 rounding; no double backward.
            Default: False.
        save_memory: keep only the output for backward, not the input (the idea of
            InPlace-ABN): backward recovers the normalized input from the output, so
            it needs ``activation`` None or ``"leaky_relu"`` and non-zero weights. When
            the next layer keeps the output anyway (a convolution does), the pair keeps
            one tensor instead of two. Default: False.
        bias: learn :math:`\beta` when ``affine`` (keyword only, as in torch.nn).
            Default: True.

    The default path uses torch's native kernel where it is as robust as
    :mod:`normlab.stats` (see :func:`normlab.functional.batch_norm`): in eval, in
    training for contiguous input of rank >= 3, and for channels_last and ``(N, C)``
    input when the batch statistics bound the error of the kernel's float32 sums below
    1e-4 (otherwise the input is shifted by one of its values per channel and
    normalized again); masks use the composite over :mod:`normlab.stats`. A batch
    statistic that is NaN or infinite never reaches the running statistics (that
    channel keeps its value, with a RuntimeWarning).

    Shape:
        - Input: :math:`(N, C, *)`, at least 2 dimensions.
        - Mask (optional, in ``forward``): bool, broadcastable to the input, True for
          valid elements; padded elements take no part in the statistics (default
          path only).
        - Output: same shape as the input.

    Raises:
        ValueError: wrong rank or channel count, or training on one value per
            channel (``N * prod(*) == 1``).

    Example::

        >>> bn = normlab.nn.BatchNorm(16)
        >>> y = bn(torch.randn(8, 16, 32, 32))
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        activation: str | None = None,
        negative_slope: float = 0.01,
        fused: bool = False,
        save_memory: bool = False,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_channels, eps, momentum, affine, track_running_stats, bias, device, dtype
        )
        if activation not in (None, "relu", "leaky_relu"):
            raise ValueError(f"{self.layer_name}: activation must be None, 'relu' or "
                             f"'leaky_relu', got {activation!r}")
        negative_slope = check_number(self.layer_name, "negative_slope", negative_slope)
        if save_memory and (activation == "relu" or negative_slope <= 0):
            raise ValueError(f"{self.layer_name}: save_memory needs an invertible activation "
                             f"(None, or 'leaky_relu' with negative_slope > 0), got "
                             f"activation={activation!r}, negative_slope={negative_slope}")
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.fused = bool(fused)
        self.save_memory = bool(save_memory)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_input(x)
        if x.numel() == 0:  # as torch.nn: an empty output, zero parameter gradients
            return self._empty_batch(x)
        counting = self.training and self.track_running_stats
        factor = self._momentum_factor() if counting else 0.0
        if mask is None and (self.fused or self.save_memory or self.activation is not None):
            from normlab import kernels  # compiled lazily, only when asked for

            y = kernels.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias,
                training=self.training, momentum=factor, eps=self.eps,
                activation=self.activation, negative_slope=self.negative_slope,
                save_memory=self.save_memory and self.training, fused=self.fused,
                name=self.layer_name,
            )
            if counting:
                self._count_batch()
            return y
        if mask is not None and self.activation is not None:
            raise ValueError(f"{self.layer_name}: a mask is not supported with activation")
        y = NF.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=self.training,
            momentum=factor,
            eps=self.eps,
            mask=mask,
            name=self.layer_name,
        )
        if counting:
            self._count_batch()
        return y

    def extra_repr(self) -> str:
        extra = [f"activation={self.activation!r}"] if self.activation else []
        extra += ["fused=True"] if self.fused else []
        extra += ["save_memory=True"] if self.save_memory else []
        return ", ".join([super().extra_repr(), *extra])


class BatchRenorm(NormBase):
    r"""Batch Renormalization (Ioffe, 2017): batch norm that corrects towards the
    running statistics, so training and inference agree even for small or non-i.i.d.
    batches.

    In training, with :math:`\sigma = \sqrt{\mathrm{running\_var} + \epsilon}`,
    :math:`\mu = \mathrm{running\_mean}` and the batch's :math:`\mu_B,
    \sigma_B = \sqrt{\sigma_B^2 + \epsilon}`:

    .. math::
        r = \mathrm{sg}\big[\mathrm{clip}_{[1/r_{max}, r_{max}]}(\sigma_B/\sigma)\big], \quad
        d = \mathrm{sg}\big[\mathrm{clip}_{[-d_{max}, d_{max}]}((\mu_B - \mu)/\sigma)\big]

    .. math::
        y = \gamma\left(\frac{x - \mu_B}{\sigma_B}\, r + d\right) + \beta

    (sg: no gradient flows through r and d). In eval,
    :math:`y = \gamma (x - \mu)/\sigma + \beta`. With ``r_max=1`` and ``d_max=0`` it
    is exactly :class:`BatchNorm`.

    The running statistics follow torch.nn's conventions (``running_mean`` and the
    unbiased ``running_var``, updated with weight ``momentum``) so that the
    state_dict is BatchNorm's; the paper averages :math:`\sigma` instead of the
    variance, which differs only in second order.

    NaN or inf in the input gives NaN in the output, and the affected channels'
    running statistics are *not* updated: a RuntimeWarning names the layer and the
    channels (as in :class:`BatchNorm`).

    Args:
        num_channels: C.
        eps: Default: 1e-5.
        momentum: weight of the new batch in the running statistics. Default: 0.1.
            (The paper recommends a faster update than for plain BN, since the
            running statistics enter the training output.)
        affine: Default: True.
        r_max: final limit of r. Default: 3 (the paper's).
        d_max: final limit of d. Default: 5 (the paper's).
        warmup: None to apply ``r_max`` and ``d_max`` from the first step, or
            ``(start, r_end, d_end)``: plain batch norm until step ``start``, then
            linear relaxation to ``r_max`` at ``r_end`` and to ``d_max`` at ``d_end``;
            ``"paper"`` is :data:`PAPER_RENORM_WARMUP` ``(5000, 40000, 25000)``. The
            step is ``num_batches_tracked``. Default: None.

    Shape:
        - Input: :math:`(N, C, *)`; output of the same shape.

    Distributed training: it follows the batch-statistics synchronisation protocol
    of :mod:`normlab.nn.sync_stats`. With ``sync_batch_stats = True`` (set by
    :func:`normlab.nn.to_sync_batchnorm`) the batch moments, hence r, d and the
    running statistics, are taken over every rank of ``process_group`` (None: the
    default group).

    torch.compile: no graph break with ``warmup=None``. With a warm-up schedule the
    limits depend on the step counter, read on the host: a graph break per training
    call, and recompilation as the limits change.
    """

    #: Synchronisation protocol (normlab.nn.sync_stats): global batch moments when True.
    sync_batch_stats: bool = False
    #: The process group of the global moments; None is the default group.
    process_group = None

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup: tuple[int, int, int] | str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        name = f"BatchRenorm({num_channels})"
        if momentum is None:
            raise ValueError(f"{name}: momentum must be a number in (0, 1], got None")
        r_max = check_number(name, "r_max", r_max, low=1.0, allow_inf=True)
        d_max = check_number(name, "d_max", d_max, low=0.0, allow_inf=True)
        if warmup == "paper":
            warmup = PAPER_RENORM_WARMUP
        if warmup is not None and (len(warmup) != 3 or not all(int(s) >= 0 for s in warmup)):
            raise ValueError(
                f"{name}: warmup must be None, 'paper' or (start, r_end, d_end) steps, "
                f"got {warmup!r}"
            )
        super().__init__(num_channels, eps, momentum, affine, True, device=device, dtype=dtype)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup = None if warmup is None else tuple(int(s) for s in warmup)

    def current_limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` that the next training step will use."""
        if self.warmup is None:  # no int() of the step counter: no host sync, no graph break
            return self.r_max, self.d_max
        if self.num_batches_tracked.device.type == "meta":  # shape inference: no step value
            return self.r_max, self.d_max
        return NF.renorm_limits(int(self.num_batches_tracked), self.r_max, self.d_max, self.warmup)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_input(x)
        if x.numel() == 0 and not (self.training and self.sync_batch_stats):
            return self._empty_batch(x)  # synchronised, the ranks' collectives still run
        if not self.training:
            return NF.batch_renorm(
                x, self.running_mean, self.running_var, self.weight, self.bias,
                training=False, eps=self.eps,
            )
        r_max, d_max = self.current_limits()
        factor = self._momentum_factor()
        moments_fn = moments_fn_for(self) if self.sync_batch_stats else None
        y = NF.batch_renorm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=True,
            momentum=factor,
            eps=self.eps,
            r_max=r_max,
            d_max=d_max,
            mask=mask,
            name=self.layer_name,
            moments_fn=moments_fn,
        )
        self._count_batch()
        return y

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup={self.warmup}")
