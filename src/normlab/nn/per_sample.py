"""Per-sample normalization: LayerNorm, ChannelLayerNorm, RMSNorm, InstanceNorm,
GroupNorm. No statistic crosses the batch, so a sample's output does not depend on
the rest of its batch, in training or in eval, and batch size 1 works."""

from __future__ import annotations

from torch import Tensor

from normlab import functional as NF
from normlab.nn import _layout
from normlab.nn.base import NormBase

__all__ = [
    "LayerNorm",
    "ChannelLayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "InstanceNorm",
    "GroupNorm",
    "choose_num_groups",
]


class LayerNorm(NormBase):
    r"""Layer Normalization (Ba, Kiros & Hinton, 2016) over ``C x *`` of each sample.

    .. math::
        y_{n,c,\dots} = \frac{x_{n,c,\dots} - \mu_n}{\sqrt{\sigma_n^2 + \epsilon}}
        \,\gamma_c + \beta_c

    :math:`\mu_n` and :math:`\sigma_n^2` (biased) are taken over every element of
    sample n, the definition of the seed articles; the affine is per channel. On
    ``(N, C)`` input it equals ``torch.nn.LayerNorm(C)`` (same state_dict keys).
    For the channels-only variant of ConvNeXt, see :class:`ChannelLayerNorm`.

    **Layouts.** ``layout="last"`` is torch.nn.LayerNorm exactly (arguments, results,
    state_dict): input ``(*, *normalized_shape)`` normalized over its last
    ``len(normalized_shape)`` dimensions with an elementwise affine of shape
    ``normalized_shape``, the sequence layout ``(N, L, C)`` of transformers.
    ``layout="channels_first"`` is the normalization over ``C x *`` above. A list or
    tuple first argument (torch's spelling, ``LayerNorm([768])``) means ``"last"``.
    With an int and ``layout=None`` (the default) each call takes the layout its input
    fits: ``(N, C, *)`` with C in dimension 1 only is channel-first (torch would refuse
    it), ``(N, *, C)`` with C last only is ``"last"``, ``(N, C)`` is the same either
    way; an input of rank 3 or more with C both in dimension 1 and last (``(N, C, C)``)
    raises a ValueError showing both spellings, since the two normalize differently.
    (So no call computes something other than the torch.nn.LayerNorm call it looks
    like: it computes the same, or torch would have refused it, or it raises.)

    Args:
        num_channels: C (an int), or torch's ``normalized_shape`` (an int or a
            sequence of ints; a sequence means ``layout="last"``).
        eps: Default: 1e-5.
        affine: learnable :math:`\gamma` (init 1) and :math:`\beta` (init 0), per
            channel (``"channels_first"``) or of shape ``normalized_shape``
            (``"last"``). Default: True. ``elementwise_affine`` (keyword, torch's
            name) is accepted for it.
        bias: learn :math:`\beta` when affine. Default: True.
        fused: run forward and backward in the fused C++ group norm kernels of
            :mod:`normlab.kernels` with one group (compiled at first use, about 10 s;
            see :class:`GroupNorm`). About as fast as the default path, which is torch's
            group norm with one group (faster only on large channels_last input).
            Channel-first calls only. Default: False.
        layout: ``"channels_first"``, ``"last"`` or None (decided per call, see
            above). Default: None.

    Computed by torch's native CPU group norm with one group (the same math, as
    robust as :mod:`normlab.stats`; see :class:`GroupNorm` for channels_last) when there
    is no mask; with a mask, by the composite over :mod:`normlab.stats` (see
    :func:`normlab.functional.layer_norm`, ``path``). With ``fused=True``, by the
    kernels of :mod:`normlab.kernels.group` where they apply (as for
    :class:`GroupNorm`), otherwise as without it. ``"last"``: torch's native layer
    norm (the composite over :mod:`normlab.stats` with a mask).

    Shape:
        - Input: :math:`(N, C, *)` (``"channels_first"``) or
          :math:`(*, \text{normalized\_shape})` (``"last"``); output of the same
          shape. An optional bool ``mask`` (broadcastable, True = valid) keeps padding
          out of the statistics.

    Example::

        >>> ln = normlab.nn.LayerNorm(768, layout="last")   # = torch.nn.LayerNorm(768)
        >>> y = ln(torch.randn(8, 197, 768))
        >>> cnn_ln = normlab.nn.LayerNorm(64, layout="channels_first")
        >>> y = cnn_ln(torch.randn(8, 64, 32, 32))
    """

    def __init__(self, num_channels, eps: float = 1e-5, affine: bool = True,
                 bias: bool = True, device=None, dtype=None, fused: bool = False, *,
                 layout: str | None = None, elementwise_affine: bool | None = None) -> None:
        shape, layout, affine, count = _layout.setup(
            self, num_channels, layout, affine, elementwise_affine, "LayerNorm")
        super().__init__(count, eps, None, affine, False, bias, device, dtype)
        self.normalized_shape = shape
        self.layout = layout
        self.fused = bool(fused)
        _layout.shape_affine(self, shape, device, dtype)

    @property
    def layer_name(self) -> str:
        return _layout.layer_name(self)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if _layout.resolve(self, x) == "last":
            return NF.layer_norm(x, self.weight, self.bias, self.eps, mask=mask,
                                normalized_shape=self.normalized_shape, name=self.layer_name)
        self._check_input(x)
        if self.fused and mask is None:
            from normlab.kernels import group as kernel  # compiled lazily, only when asked

            if kernel.supports(x, 1, self.weight, self.bias):
                return kernel.group_norm(x, 1, self.weight, self.bias, self.eps,
                                         name=self.layer_name)
        return NF.layer_norm(x, self.weight, self.bias, self.eps, mask=mask)

    def extra_repr(self) -> str:
        return _layout.extra_repr(self, self.eps) + (", fused=True" if self.fused else "")


class ChannelLayerNorm(NormBase):
    r"""Layer normalization over the channels only, at each position of ``(N, C, *)``.

    .. math::
        y_{n,c,p} = \frac{x_{n,c,p} - \mu_{n,p}}{\sqrt{\sigma_{n,p}^2 + \epsilon}}
        \,\gamma_c + \beta_c

    This is what ``torch.nn.LayerNorm(C)`` does to channels-last input, applied to
    channel-first tensors without permuting them: timm's ``LayerNorm2d``, as used by
    ConvNeXt (``LayerNorm2d`` is an alias). On ``(N, C)`` it equals
    :class:`LayerNorm`.

    Args:
        num_channels: C.
        eps: Default: 1e-5 (ConvNeXt uses 1e-6).
        affine: Default: True.
        bias: Default: True.

    Computed by torch's native layer norm over C after moving C last, as timm's
    LayerNorm2d does (no copy for channels_last input).

    Shape:
        - Input: :math:`(N, C, *)`; output of the same shape.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_channels, eps, None, affine, False, bias, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return NF.channel_layer_norm(x, self.weight, self.bias, self.eps)


LayerNorm2d = ChannelLayerNorm


class RMSNorm(NormBase):
    r"""Root Mean Square Layer Normalization (Zhang & Sennrich, 2019).

    .. math::
        y_{n,c,\dots} = \frac{x_{n,c,\dots}}{\sqrt{\frac{1}{n}\sum x_n^2 + \epsilon}}\,\gamma_c

    The mean square is over ``C x *`` of each sample (as :class:`LayerNorm`), with no
    centring and no shift. On ``(N, C)`` input it equals ``torch.nn.RMSNorm(C)``.

    Layouts as :class:`LayerNorm`: ``layout="last"`` (or a list or tuple first
    argument) is torch.nn.RMSNorm exactly, over the last ``len(normalized_shape)``
    dimensions with an elementwise :math:`\gamma` of shape ``normalized_shape``;
    ``layout="channels_first"`` is the above; ``None`` decides per call and raises,
    showing both spellings, on input that fits both (``(N, C, C)``).

    Args:
        num_channels: C, or torch's ``normalized_shape`` (a sequence means
            ``layout="last"``).
        eps: None (the default) uses ``torch.finfo(x.dtype).eps``, as torch.nn.RMSNorm.
        affine: learnable :math:`\gamma`, init 1. Default: True.
            ``elementwise_affine`` (keyword, torch's name) is accepted for it.
        layout: ``"channels_first"``, ``"last"`` or None. Default: None.

    Shape:
        - Input: :math:`(N, C, *)` or :math:`(*, \text{normalized\_shape})`; output
          of the same shape.
    """

    _eps_may_be_none = True

    def __init__(self, num_channels, eps: float | None = None, affine: bool = True,
                 device=None, dtype=None, *, layout: str | None = None,
                 elementwise_affine: bool | None = None) -> None:
        shape, layout, affine, count = _layout.setup(
            self, num_channels, layout, affine, elementwise_affine, "RMSNorm")
        super().__init__(count, eps, None, affine, False, False, device, dtype)
        self.normalized_shape = shape
        self.layout = layout
        _layout.shape_affine(self, shape, device, dtype)

    @property
    def layer_name(self) -> str:
        return _layout.layer_name(self)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if _layout.resolve(self, x) == "last":
            return NF.rms_norm(x, self.weight, self.eps, mask=mask,
                              normalized_shape=self.normalized_shape, name=self.layer_name)
        self._check_input(x)
        return NF.rms_norm(x, self.weight, self.eps, mask=mask)

    def extra_repr(self) -> str:
        return _layout.extra_repr(self, self.eps)


class InstanceNorm(NormBase):
    r"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky, 2016), any rank >= 3.

    .. math::
        y_{n,c,\dots} = \frac{x_{n,c,\dots} - \mu_{n,c}}{\sqrt{\sigma_{n,c}^2 + \epsilon}}
        \,\gamma_c + \beta_c

    with the statistics over the trailing (spatial) dimensions of each sample and
    channel. Matches torch.nn.InstanceNorm1d/2d/3d, defaults included: no affine and
    no running statistics. With ``track_running_stats=True`` the batch average of the
    instance statistics is kept (unbiased variance, weight ``momentum``) and used in
    eval; NaN statistics are not written to it (a RuntimeWarning says so). As in
    torch.nn, ``num_batches_tracked`` exists (for state_dict compatibility) but never
    counts, and ``momentum=None`` leaves the running statistics unchanged in training
    (torch.nn passes momentum 0 to its kernel then): unlike :class:`BatchNorm`, there
    is no cumulative average, so checkpoints and eval outputs equal torch's.

    Args:
        num_channels: C.
        eps: Default: 1e-5.
        momentum: weight of the new batch in the running statistics. Default: 0.1;
            None keeps the running statistics as they are (torch.nn's behaviour).
        affine: Default: False.
        track_running_stats: Default: False.
        bias: learn :math:`\beta` when ``affine`` (keyword only, as in torch.nn).
            Default: True.

    Computed by torch's native CPU batch norm on the input viewed as ``(1, N*C, *)``
    (what torch.nn.InstanceNorm does: two passes, double accumulation), with the
    running statistics, if kept, updated by normlab (NaN-guarded).

    Shape:
        - Input: :math:`(N, C, L_1, \dots)` with at least one trailing dimension and
          more than one trailing element when instance statistics are used.
        - Output: same shape. (Unlike torch.nn, unbatched ``(C, L)`` input is not
          accepted: normlab layers are always batch-first. One class serves every rank,
          so it cannot tell an unbatched ``(C, H, W)`` from a batched ``(N, C, L)``: an
          unbatched input is refused by the rank or channel check, except one whose
          second dimension happens to equal C, which is read as batched.)
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_channels, eps, momentum, affine, track_running_stats, bias,
                         device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, min_dim=3)
        use_input_stats = self.training or not self.track_running_stats
        # torch.nn.InstanceNorm's conventions: momentum None means 0 (no update) and the
        # batch counter never moves, so that state_dicts stay interchangeable.
        factor = 0.0 if self.momentum is None else self.momentum
        return NF.instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_input_stats=use_input_stats,
            momentum=factor,
            eps=self.eps,
            name=self.layer_name,
        )


def choose_num_groups(num_channels: int, preferred: int = 32) -> int:
    """A group count for GroupNorm over ``num_channels`` channels.

    The largest divisor of C not above ``preferred`` (the paper's 32) that leaves at
    least 2 channels per group, so that GN never silently becomes instance norm; 1 if
    there is none. C = 64 or 96 gives 32, C = 48 gives 24, C = 32 gives 16, C = 16
    gives 8, C = 3 gives 1.
    """
    for g in range(min(preferred, num_channels // 2), 0, -1):
        if num_channels % g == 0:
            return g
    return 1


class GroupNorm(NormBase):
    r"""Group Normalization (Wu & He, 2018).

    .. math::
        y_{n,c,\dots} = \frac{x_{n,c,\dots} - \mu_{n,g}}{\sqrt{\sigma_{n,g}^2 + \epsilon}}
        \,\gamma_c + \beta_c

    The C channels are split into ``num_groups`` groups of C/G consecutive channels;
    :math:`\mu_{n,g}, \sigma_{n,g}^2` are over the group's channels and all trailing
    dimensions of sample n. G = 1 is :class:`LayerNorm`, G = C is
    :class:`InstanceNorm` (with affine). Matches ``torch.nn.GroupNorm(G, C)``, with the
    channel count first (timm's convention) so ``norm_layer=GroupNorm`` factories work.

    Args:
        num_channels: C.
        num_groups: G, must divide C. Default: 32 (the paper's best);
            :func:`choose_num_groups` picks one for any C.
        eps: Default: 1e-5.
        affine: per-channel :math:`\gamma` (1) and :math:`\beta` (0). Default: True.
        bias: learn :math:`\beta` when ``affine`` (keyword only, as in torch.nn).
            Default: True.
        fused: run forward and backward in the fused C++ kernels of
            :mod:`normlab.kernels` (compiled at first use, about 10 s) for CPU float32 or
            bfloat16 input that is contiguous or channels_last(_3d), with float32
            parameters: one pass over the input for the statistics (in cache for the
            output), one for the backward's sums; shifted sums accumulated in double,
            as robust as :mod:`normlab.stats`. Training and eval alike (the same math).
            A mask, other dtypes, devices or layouts, and groups of one element take the
            default path. Results equal the default path's within float32 rounding; the
            output keeps the input's memory layout; no double backward. It pays on
            channels_last input (training step about 3x faster than torch's at
            (32, 64, 32, 32) float32, 12x in bfloat16); on contiguous input it is about
            as fast as the default path (see :mod:`normlab.kernels.group`).
            Default: False.

    Computed by torch's native CPU group norm (robust on contiguous input; on
    channels_last input, whose kernel computes ``E[x^2] - E[x]^2`` in float32, the
    result is kept only when the group statistics bound its error below 1e-4, and
    otherwise recomputed on the input shifted by one of its values per sample and
    group); with a mask, or groups of one element, by the composite over
    :mod:`normlab.stats`.

    Shape:
        - Input: :math:`(N, C, *)`; output of the same shape.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, fused: bool = False, *,
                 bias: bool = True) -> None:
        name = f"GroupNorm({num_channels})"
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"{name}: num_groups must be a positive int, got {num_groups!r}")
        if type(num_channels) is int and num_channels > 0 and num_channels % num_groups:
            divisors = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
            raise ValueError(
                f"{name}: num_groups={num_groups} does not divide num_channels={num_channels}; "
                f"valid group counts are {divisors} "
                f"(normlab.nn.choose_num_groups({num_channels}) = "
                f"{choose_num_groups(num_channels)})"
                + (f"; torch.nn.GroupNorm takes (num_groups, num_channels), normlab's the "
                   f"channel count first: GroupNorm({num_groups}, num_groups={num_channels})"
                   if num_groups % num_channels == 0 else "")
            )
        super().__init__(num_channels, eps, None, affine, False, bias, device, dtype)
        self.num_groups = num_groups
        self.fused = bool(fused)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_input(x)
        if self.fused and mask is None:
            from normlab.kernels import group as kernel  # compiled lazily, only when asked

            if kernel.supports(x, self.num_groups, self.weight, self.bias):
                return kernel.group_norm(x, self.num_groups, self.weight, self.bias,
                                         self.eps, name=self.layer_name)
        return NF.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, mask=mask)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, "
                f"affine={self.affine}" + (", fused=True" if self.fused else ""))
