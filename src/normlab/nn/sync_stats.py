r"""Batch statistics over every rank of a process group, on any torch.distributed backend:
the collectives, the synchronised batch norm function and the synchronisation protocol.

torch.nn.SyncBatchNorm only runs on GPUs (its kernels have no CPU version, and
DistributedDataParallel refuses it in a CPU model). :func:`sync_batch_norm` here (the
training path of :class:`normlab.nn.SyncBatchNorm`) is plain PyTorch and collectives,
so it works with gloo on the CPU as well as with NCCL. This module imports no layer:
the layers that follow the protocol below import it.

What it communicates
--------------------
Forward (training): each rank computes, per channel, its element count, mean and
biased variance with :func:`normlab.stats.moments` (two-pass), the ranks
``all_gather`` a 5-integer header and check that they agree (see "Failing loudly"
below), then ``all_gather`` these ``3 x C`` numbers (in float64 where the device has it), and every
rank merges them with :func:`normlab.stats.combine_moments` (Chan et al.'s parallel
formula: no sum-of-squares cancellation). Every rank therefore gets bit-identical
global statistics and running statistics.

Backward: each rank forms the per-channel sums :math:`\sum g` and
:math:`\sum g\,\hat{x}` over its own elements, one ``all_reduce`` adds them over the
ranks, and

.. math::
    \frac{\partial L}{\partial x} = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}
        \Big(g - \frac{1}{N}\big(\textstyle\sum_{\text{all}} g
        + \hat{x} \sum_{\text{all}} g\,\hat{x}\big)\Big)

with :math:`N` the global count: the input gradient of the sum of the ranks' losses,
exact for the global batch. The weight and bias gradients are this rank's share
(:math:`\sum g\,\hat{x}` and :math:`\sum g` over its own elements), as in
torch.nn.SyncBatchNorm, for DistributedDataParallel to reduce.

Every rank of the group must run each training forward and backward through a
synchronised layer the same number of times, in the same order (as for any
collective); a rank may bring an empty batch (N = 0), which adds nothing to the
statistics.

Failing loudly
--------------
Before exchanging statistics, the ranks all_gather a header of five integers: the
number of statistics (the channel count), the input dtype, the training mode, the
call number (how many synchronised calls this layer has made on this rank) and whether
a mask was given. If any differs, every rank raises the same ValueError naming the
layer, the field and each rank's value, instead of exchanging buffers of different
sizes (which gloo answers by aborting the process, or worse, by completing on a buffer
of the wrong size). A rank that skips a collective altogether (it is in ``eval()``
while its peers train, never calls forward, or died) cannot be detected by a header:
its peers wait for the process group's timeout, and the error they then get names the
layer and those causes. torch's default timeout is 30 minutes; pass a shorter one,
``dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60))``
(``normlab train`` does: ``--dist-timeout``, default 60 s).

The batch-statistics synchronisation protocol
---------------------------------------------
Layers other than batch norm whose training output uses batch statistics (Batch
Renormalization, the batch branch of Switchable and Attentive Normalization, ...)
take part by following a small protocol instead of being replaced:

1. the class has the attributes ``sync_batch_stats = False`` and
   ``process_group = None`` (class attributes are enough);
2. in training it takes its batch moments from ``moments_fn_for(self)``: None means
   "use :func:`normlab.stats.moments`", otherwise it is a function
   ``fn(x, dims, mask=None) -> Moments`` with the same signature and results as
   :func:`normlab.stats.moments` over the union of the ranks' batches (its ``count``
   is a tensor of global counts), differentiable (:func:`sync_moments`). The
   functional core accepts it directly: ``NF.batch_renorm(..., moments_fn=...)``.

:func:`to_sync_batchnorm` sets ``sync_batch_stats = True`` and ``process_group`` on
every such layer, so it keeps its own behaviour with global statistics.
:class:`normlab.nn.BatchRenorm`, :class:`normlab.nn.SwitchableNorm` (its BN term) and
:class:`normlab.nn.AttentiveNorm` (``norm="batch"``: the batch moments of
:math:`\hat{x}` and of the attention's batch norm) follow the protocol.
"""


from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from normlab import functional as NF
from normlab import stats
from normlab.functional.common import batch_dims, channel_shape

__all__ = [
    "sync_batch_norm",
    "sync_moments",
    "moments_fn_for",
    "world_size",
]


# --------------------------------------------------------------------------- collectives


class _Comm:
    """The two collectives the layers need, over one process group or over no one.

    ``_Comm(None, local=True)`` is the single-process version (world size 1): its
    collectives return their input, so the same autograd functions run without any
    process group (the gradcheck path).
    """

    def __init__(self, group=None, local: bool = False, name: str = "normlab") -> None:
        self.local = local
        self.group = group
        self.name = name
        if local:
            self.world, self.rank = 1, 0
            return
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise RuntimeError(f"{name}: this process is not a member of its process_group")

    def all_gather(self, t: Tensor) -> Tensor:
        """``(world, *t.shape)``: every rank's ``t``, in rank order."""
        if self.local:
            return t.unsqueeze(0)
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        with self._failing_loudly("all_gather"):
            dist.all_gather(out, t, group=self.group)  # gloo has no all_gather_into_tensor
        return torch.stack(out)

    def all_reduce(self, t: Tensor) -> Tensor:
        """The sum of every rank's ``t`` (a new tensor)."""
        if self.local:
            return t
        t = t.contiguous().clone()
        with self._failing_loudly("all_reduce"):
            dist.all_reduce(t, group=self.group)
        return t

    @contextlib.contextmanager
    def _failing_loudly(self, what: str):
        # A backend error (gloo's "Timed out waiting", "Connection reset by peer") names
        # neither the layer nor the likely cause: say both, keep the original chained.
        try:
            yield
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(
                f"{self.name}: the {what} of batch statistics over {self.world} ranks failed "
                f"on rank {self.rank}: a rank skipped this synchronised call (it is in "
                "eval() while the others train, never calls forward, or calls it a "
                "different number of times) or died; ranks wait at most the process "
                "group's timeout (init_process_group(timeout=...); normlab train "
                f"--dist-timeout). Backend error: {first}"
            ) from e

    def agree(self, count: int, x: Tensor, mask: Tensor | None, call: int) -> None:
        """Check, with one small all_gather, that every rank is at the same call of the
        same layer with the same channel count and dtype; otherwise every rank raises
        the same ValueError (they all see the same gathered headers)."""
        if self.local:
            return
        # Only training calls communicate, so the training mode is 1 wherever a header is
        # sent; a rank in eval() sends none, which the timeout error explains.
        fields = (count, _DTYPE_CODES.get(x.dtype, -1), 1, call, mask is not None)
        header = torch.tensor(fields, dtype=torch.int64, device=x.device)
        rows = self.all_gather(header).tolist()
        wrong = [i for i in range(len(fields)) if len({row[i] for row in rows}) > 1]
        if not wrong:
            return
        parts = []
        for i in wrong:
            values = ", ".join(f"rank {r}: {_show_field(i, row[i])}" for r, row in enumerate(rows))
            parts.append(f"{_HEADER_FIELDS[i]} ({values})")
        raise ValueError(
            f"{self.name}: the {self.world} ranks of the process group disagree on "
            + "; ".join(parts) + ". Every rank raises this error; build the same layer on "
            "every rank and call it the same number of times, on inputs of the same "
            "channel count and dtype"
        )


_LOCAL = _Comm(local=True)

#: The header the ranks compare before exchanging statistics (see the module docstring).
_HEADER_FIELDS = ("channel count", "dtype", "training mode", "call number", "mask given")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_CODES = {dt: i for i, dt in enumerate(_DTYPES)}
# Direct calls of sync_moments / sync_batch_norm, counted per process group.
_CALLS: dict[int, int] = {}


def _show_field(i: int, value: int) -> str:
    if i == 1:
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else "another dtype"
    if i == 2:
        return "training" if value else "eval"
    if i == 4:
        return "yes" if value else "no"
    return str(value)


def _stat_count(x: Tensor, dims=None) -> int:
    """How many statistics a rank exchanges: the channels (or, for sync_moments, the
    elements of the non-reduced dimensions)."""
    if dims is None:
        return x.shape[1] if x.dim() >= 2 else 0
    reduced = {d % x.dim() for d in ((dims,) if isinstance(dims, int) else dims)}
    return math.prod(s for d, s in enumerate(x.shape) if d not in reduced)


def _next_call(comm: _Comm) -> int:
    key = id(comm.group)
    _CALLS[key] = _CALLS.get(key, 0) + 1
    return _CALLS[key]




def _comm(process_group=None, name: str = "normlab") -> _Comm:
    """The collectives of ``process_group`` (None: the default group), or the local no-op
    version when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return _LOCAL
    return _Comm(process_group if process_group is not None else dist.group.WORLD, name=name)


def _acc_dtype(x: Tensor) -> torch.dtype:
    # The exchanged statistics are 3 x C numbers: float64 costs nothing and keeps
    # counts above 2**24 exact. (MPS has no float64.)
    return stats.stat_dtype(x.dtype) if x.device.type == "mps" else torch.float64


def _global_moments(
    x: Tensor, mask: Tensor | None, comm: _Comm, name: str, call: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(mean, var, count)`` over all ranks, shape ``(C,)``; no autograd.

    mean and var are in the statistics dtype of ``x``, count in the exchange dtype.
    The ranks first agree on the header (``call``: this layer's call number).
    """
    comm.agree(_stat_count(x), x, mask, call)
    local = stats.moments(x, batch_dims(x), mask=mask, keepdim=False)
    acc = _acc_dtype(x)
    count = torch.as_tensor(local.count, device=x.device).to(acc).expand_as(local.mean)
    packed = torch.stack([count, local.mean.to(acc), local.var.to(acc)])
    gathered = comm.all_gather(packed)
    merged = stats.combine_moments(gathered[:, 1], gathered[:, 2], gathered[:, 0], dim=0)
    if mask is None:
        total = int(merged.count.max())
        if total <= 1:
            raise ValueError(
                f"{name}: batch statistics need more than 1 value per channel over all "
                f"{comm.world} rank(s), got {total} (this rank's input has shape "
                f"{tuple(x.shape)}); use larger batches, eval() with running statistics, "
                "or a per-sample norm"
            )
    compute = local.mean.dtype
    return merged.mean.to(compute), merged.var.to(compute), merged.count


# ------------------------------------------------------------------ autograd functions


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm with statistics over every rank of ``comm``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, eps, comm, name, call):
        mean, var, count = _global_moments(x, mask, comm, name, call)
        shape = channel_shape(x)
        invstd = torch.rsqrt(var + eps)
        w = None if weight is None else weight.view(shape)
        b = None if bias is None else bias.view(shape)
        y = NF.normalize(x, mean.view(shape), var.view(shape), eps, w, b)
        ctx.save_for_backward(x, weight, mask, mean, invstd, count)
        ctx.comm = comm
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_count):
        x, weight, mask, mean, invstd, count = ctx.saved_tensors
        compute = mean.dtype
        shape = channel_shape(x)
        dims = batch_dims(x)
        g = grad_y.to(compute)
        xhat = (x.to(compute) - mean.view(shape)) * invstd.view(shape)
        sum_g = g.sum(dims)
        sum_gx = (g * xhat).sum(dims)
        # Always reduce, even when only the parameters need gradients, so that every
        # rank runs the same collectives whatever requires grad where.
        total = ctx.comm.all_reduce(torch.stack([sum_g, sum_gx]))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            n = count.to(compute).clamp(min=1).view(shape)
            corr = (total[0].view(shape) + xhat * total[1].view(shape)) / n
            if mask is not None:  # padded elements are outside the statistics
                corr = corr * mask
            scale = invstd if weight is None else invstd * weight.to(compute)
            grad_x = ((g - corr) * scale.view(shape)).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = sum_gx.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = sum_g.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class _AllGather(torch.autograd.Function):
    """Differentiable all_gather: ``(world, *t.shape)``. The gradient of this rank's
    slot is the sum over ranks of their gradients for it (one all_reduce)."""

    @staticmethod
    def forward(ctx, t, comm):
        ctx.comm = comm
        return comm.all_gather(t)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return ctx.comm.all_reduce(grad)[ctx.comm.rank], None


# ----------------------------------------------------------------------- functions


def sync_moments(
    x: Tensor,
    dims,
    process_group=None,
    mask: Tensor | None = None,
    keepdim: bool = True,
    name: str = "sync_moments",
    call: int | None = None,
) -> stats.Moments:
    """:func:`normlab.stats.moments` over the union of every rank's ``x``; differentiable.

    Each rank computes its local moments with :func:`normlab.stats.moments`, the ranks
    all_gather ``(count, mean, var)`` and merge them with
    :func:`normlab.stats.combine_moments`. Gradients flow back to every rank's ``x``
    (the backward all_reduces the gradients of the gathered statistics), so a layer
    built on it gets exact gradients for the global batch. The shapes of ``x`` may
    differ between ranks in the reduced dimensions only; a rank may have no elements.

    Without torch.distributed, or with a group of one rank, this is exactly
    :func:`normlab.stats.moments` (``count`` an int or tensor as there); otherwise
    ``count`` is a tensor of global counts shaped like ``mean``. The all_gather runs
    at every call and its backward at every backward: call it on every rank alike.

    Before the exchange the ranks compare a header (number of statistics, dtype, call
    number, mask or not; see the module docstring) and all raise the same ValueError,
    naming ``name``, if they disagree. ``call`` is the caller's call number (a layer's
    own count, from :func:`moments_fn_for`); None counts the calls per process group.
    """
    comm = _comm(process_group, name)
    if comm.world == 1:
        return stats.moments(x, dims, mask=mask, keepdim=keepdim)
    comm.agree(_stat_count(x, dims), x, mask, _next_call(comm) if call is None else call)
    local = stats.moments(x, dims, mask=mask, keepdim=True)
    acc = _acc_dtype(x)
    count = torch.as_tensor(local.count, device=x.device).to(acc).expand_as(local.mean)
    packed = torch.stack([count, local.mean.to(acc), local.var.to(acc)])
    gathered = _AllGather.apply(packed, comm)
    merged = stats.combine_moments(gathered[:, 1], gathered[:, 2], gathered[:, 0], dim=0)
    mean = merged.mean.to(local.mean.dtype)
    var = merged.var.to(local.var.dtype)
    count = merged.count
    if not keepdim:
        reduced = tuple(sorted({d % x.dim() for d in ((dims,) if isinstance(dims, int) else dims)}))
        mean, var, count = mean.squeeze(reduced), var.squeeze(reduced), count.squeeze(reduced)
    return stats.Moments(mean, var, count)


def moments_fn_for(layer: nn.Module):
    """The moments function a layer following the synchronisation protocol uses in
    training: None (local :func:`normlab.stats.moments`) unless
    ``layer.sync_batch_stats`` is True and its ``process_group`` (None: the default
    group) has more than one rank; then :func:`sync_moments` over that group."""
    if not getattr(layer, "sync_batch_stats", False):
        return None
    group = getattr(layer, "process_group", None)
    name = getattr(layer, "layer_name", type(layer).__name__)
    if _comm(group, name).world == 1:
        return None

    def moments(x: Tensor, dims, mask: Tensor | None = None) -> stats.Moments:
        # The layer counts its own synchronised calls: the header's call number.
        layer._normlab_sync_calls = getattr(layer, "_normlab_sync_calls", 0) + 1
        return sync_moments(x, dims, process_group=group, mask=mask, name=name,
                            call=layer._normlab_sync_calls)

    return moments


def sync_batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    mask: Tensor | None = None,
    process_group=None,
    name: str = "sync_batch_norm",
    call: int | None = None,
) -> Tensor:
    r"""Training-mode batch norm of ``x`` ``(N, C, *)`` with statistics over all ranks.

    Always uses batch statistics (it is the training path of :class:`SyncBatchNorm`),
    updating ``running_mean`` and ``running_var`` in place when given (weight
    ``momentum`` on the batch, the variance Bessel-corrected with the global count).
    ``mask`` (bool, broadcastable to ``x``) excludes padded elements from the
    statistics, as in :func:`normlab.functional.batch_norm`.

    Without torch.distributed it runs the same autograd function with local no-op
    collectives, and equals :func:`normlab.functional.batch_norm` in training.

    ``call`` is the caller's call number for the ranks' header (a layer's own count);
    None counts the calls per process group.
    """
    NF.check_input(x, x.shape[1] if x.dim() >= 2 else -1, name)
    comm = _comm(process_group, name)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"{name}: mask must be a bool tensor, got {mask.dtype}")
        mask = mask.expand_as(x)
    call = _next_call(comm) if call is None else call
    y, mean, var, count = _SyncBatchNormFunction.apply(x, weight, bias, mask, eps, comm, name,
                                                       call)
    if running_mean is not None and running_var is not None:
        NF.update_running_(running_mean, mean, momentum, name)
        NF.update_running_(running_var, stats.unbiased(var, count), momentum, name)
    return y


def world_size(process_group=None, name: str = "normlab") -> int:
    """The number of ranks in ``process_group`` (None: the default group); 1 when
    torch.distributed is not initialized."""
    return _comm(process_group, name).world
