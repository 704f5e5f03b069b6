r"""Batch Normalization with statistics over every rank of a process group
(:class:`SyncBatchNorm`), and the conversion of existing models
(:func:`to_sync_batchnorm`).

The collectives, the synchronised batch norm function and the batch-statistics
synchronisation protocol that other layers follow are in :mod:`normlab.nn.sync_stats`
(which imports no layer, so that :mod:`normlab.nn.batch` can use it).
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.nn.batch import BatchNorm
from normlab.nn.sync_stats import moments_fn_for, sync_batch_norm, sync_moments, world_size

__all__ = [
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "sync_batch_norm",
    "sync_moments",
    "moments_fn_for",
    "to_sync_batchnorm",
]


# --------------------------------------------------------------------------- module


class SyncBatchNorm(BatchNorm):
    r"""Batch Normalization with statistics over every rank of a process group, on any
    torch.distributed backend (gloo on the CPU included).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    with the mean and biased variance per channel over the batch and trailing
    dimensions of *all ranks together* (Ioffe & Szegedy 2015; the cross-device form
    of e.g. Peng et al. 2018, MegDet). The outputs, the input gradients and the
    running statistics are those of :class:`BatchNorm` on the concatenation of the
    ranks' batches (which may differ in size, down to one sample or none); the weight
    and bias gradients are each rank's share, summed by DistributedDataParallel.
    The running variance is unbiased with the global count. See
    :mod:`normlab.nn.sync_stats` for the communication (forward: one all_gather of
    a 5-integer header, then one of ``3 x C`` numbers; backward: one all_reduce of
    ``2 x C``). Ranks that disagree on the channel count, dtype or call number all
    raise the same ValueError; a rank that skips a call makes the others fail after
    the process group's timeout with an error naming this layer.

    * Training, torch.distributed initialized, group of more than one rank:
      synchronised. Every rank of the group must call it.
    * Training otherwise (no process group, or world size 1): exactly
      :class:`BatchNorm`.
    * Eval: :class:`BatchNorm` in eval, with no communication: the running
      statistics, or, with ``track_running_stats=False``, this rank's own batch
      statistics (as torch.nn.SyncBatchNorm).

    It is a subclass of :class:`normlab.nn.BatchNorm` with the same state_dict keys
    (also those of torch.nn.BatchNorm1d/2d/3d), so checkpoints load in every
    direction, and *not* of torch.nn.SyncBatchNorm, so DistributedDataParallel
    accepts it in CPU models. :func:`to_sync_batchnorm` converts existing models.

    Args:
        num_channels: C, the size of dimension 1 of the input.
        eps, momentum, affine, track_running_stats, bias: as :class:`BatchNorm`.
        process_group: the group whose ranks share statistics; None (default) is
            the default (world) group.

    Shape:
        - Input: :math:`(N, C, *)`; mask (optional): bool broadcastable to the
          input, True for the elements that enter the statistics.
        - Output: same shape as the input.

    Raises:
        ValueError: wrong rank or channel count; in training, one value per channel
            or fewer over all ranks together (raised on every rank).

    Limitations: no double backward through the synchronised path.
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_channels, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
            bias=bias,
        )
        self.process_group = process_group

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if not self.training:
            return super().forward(x, mask)
        if world_size(self.process_group, self.layer_name) == 1:
            return super().forward(x, mask)
        self._check_input(x)
        track = self.track_running_stats
        # The layer's own call number goes into the header the ranks compare.
        self._normlab_sync_calls = getattr(self, "_normlab_sync_calls", 0) + 1
        y = sync_batch_norm(
            x, self.running_mean if track else None, self.running_var if track else None,
            self.weight, self.bias, self._momentum_factor() if track else 0.0, self.eps, mask,
            self.process_group, self.layer_name, call=self._normlab_sync_calls)
        if track:
            self._count_batch()
        return y


class SyncBatchNormAct(SyncBatchNorm):
    r""":class:`SyncBatchNorm` followed by a dropout module and an activation module:
    ``act(drop(sync_batch_norm(x)))``, the forward of timm's ``BatchNormAct2d``, which
    :func:`to_sync_batchnorm` converts into it (as timm's own
    ``convert_sync_batchnorm`` makes a ``SyncBatchNormAct``), sharing the original's
    parameters, buffers, ``drop`` and ``act``. The state_dict is the original's.

    Args:
        num_channels, eps, momentum, affine, track_running_stats, process_group,
            device, dtype, bias: as :class:`SyncBatchNorm`.
        drop: a module applied after the normalization; None is the identity.
        act: a module applied last; None is the identity.

    Shape:
        - Input: :math:`(N, C, *)`; output of the same shape.
    """

    def __init__(self, num_channels: int, *args, drop: nn.Module | None = None,
                 act: nn.Module | None = None, **kwargs) -> None:
        super().__init__(num_channels, *args, **kwargs)
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.act(self.drop(super().forward(x, mask)))


# ------------------------------------------------------------------------ conversion

_TORCH_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _factory_of(m: nn.Module) -> dict:
    for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _is_timm_batchnorm_act(m: nn.Module) -> bool:
    """timm's BatchNormAct2d or a subclass (checked by name: timm is not imported),
    with its ``drop`` and ``act`` modules."""
    return (any(c.__name__ == "BatchNormAct2d" and c.__module__.startswith("timm.")
                for c in type(m).__mro__)
            and isinstance(getattr(m, "drop", None), nn.Module)
            and isinstance(getattr(m, "act", None), nn.Module))


def _to_sync(m: nn.Module, process_group) -> SyncBatchNorm:
    num = m.num_channels if isinstance(m, BatchNorm) else m.num_features
    extra = {"drop": m.drop, "act": m.act} if _is_timm_batchnorm_act(m) else {}
    new = (SyncBatchNormAct if extra else SyncBatchNorm)(
        num,
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
        process_group=process_group,
        **_factory_of(m),
        **extra,
    )
    # The same Parameter and buffer objects: values, device, dtype and requires_grad
    # carry over, and an optimizer built before the conversion still updates them.
    if m.affine:
        new.weight = m.weight
        new.bias = m.bias
    if m.track_running_stats:
        new.running_mean = m.running_mean
        new.running_var = m.running_var
        new.num_batches_tracked = m.num_batches_tracked
    new.train(m.training)
    if hasattr(m, "qconfig"):
        new.qconfig = m.qconfig
    return new


def to_sync_batchnorm(
    module: nn.Module, process_group=None, on_subclass: str = "raise"
) -> nn.Module:
    """Make every batch-statistics layer of ``module`` use statistics over all ranks.

    * ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` (which cannot run on
      the CPU) and :class:`normlab.nn.BatchNorm`, of exactly those classes, become
      :class:`SyncBatchNorm` sharing the same parameter and buffer tensors (values,
      device, dtype, requires_grad and any optimizer's references carry over), with
      the same eps, momentum, affine, track_running_stats and training mode.
    * Layers following the synchronisation protocol of :mod:`normlab.nn.sync_stats`
      (:class:`normlab.nn.BatchRenorm`, :class:`normlab.nn.SwitchableNorm`,
      :class:`normlab.nn.AttentiveNorm`) stay what they are: their
      ``sync_batch_stats`` is set True and ``process_group`` set, so they keep their
      own behaviour with global statistics.
    * timm's ``BatchNormAct2d`` (batch norm, then ``drop``, then ``act``) and its
      subclasses become :class:`SyncBatchNormAct`, keeping their ``drop`` and ``act``
      modules, as timm's own ``convert_sync_batchnorm`` does.
    * :class:`SyncBatchNorm` layers are left as they are.
    * Any *subclass* of torch's or normlab's batch norm that is none of the above
      (e.g. timm's ``BatchNormAct2d``, batch norm followed by an activation) is never
      silently turned into a plain SyncBatchNorm, which would drop what the subclass
      adds (torch's ``convert_sync_batchnorm`` does that: pytorch #187298, timm
      #1254). With ``on_subclass="raise"`` (default) a TypeError names the layer;
      with ``"keep"`` it is left unsynchronised and a warning names it.

    Converts in place where it can and returns the module (a new one when ``module``
    itself is a batch norm), like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
    Forward hooks registered on a replaced layer are not carried over.
    """
    if on_subclass not in ("raise", "keep"):
        raise ValueError(
            f"to_sync_batchnorm: on_subclass must be 'raise' or 'keep', got {on_subclass!r}"
        )
    return _convert(module, process_group, on_subclass, "")


def _convert(m: nn.Module, process_group, on_subclass: str, path: str) -> nn.Module:
    where = path or "<root>"
    if type(m) in _TORCH_BATCHNORMS or type(m) is BatchNorm or _is_timm_batchnorm_act(m):
        return _to_sync(m, process_group)
    if isinstance(m, SyncBatchNorm):
        return m
    if hasattr(m, "sync_batch_stats"):
        m.sync_batch_stats = True
        m.process_group = process_group
    elif isinstance(m, (_BatchNorm, BatchNorm)):
        lazy = isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()
        why = (
            "it is an uninitialized lazy batch norm; run one forward first"
            if lazy
            else "it subclasses a batch norm and may add behaviour (e.g. an activation in "
            "forward) that a plain SyncBatchNorm would silently drop"
        )
        msg = (
            f"to_sync_batchnorm: cannot convert layer {where!r} of type "
            f"{type(m).__module__}.{type(m).__qualname__}: {why}. Convert it yourself, make "
            "it follow the synchronisation protocol of normlab.nn.sync_stats, or pass "
            "on_subclass='keep' to leave it with per-rank statistics"
        )
        if on_subclass == "raise":
            raise TypeError(msg)
        warnings.warn(msg.replace("cannot convert", "left unconverted"), stacklevel=3)
        return m
    for name, child in m.named_children():
        new = _convert(child, process_group, on_subclass, f"{path}.{name}" if path else name)
        if new is not child:
            setattr(m, name, new)
    return m

