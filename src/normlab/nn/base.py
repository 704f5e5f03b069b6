"""What every normlab normalization layer shares: channel count, affine parameters,
running statistics with torch.nn's conventions, and input checks that name the layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab import functional as NF
from normlab.nn.checks import check_number, empty_output

__all__ = ["NormBase", "Identity"]


def _check_num_channels(cls_name: str, num_channels) -> int:
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(
            f"{cls_name}: num_channels must be a positive int (the channel count comes first, "
            f"as in timm), got {num_channels!r}"
        )
    return num_channels


class NormBase(nn.Module):
    """Base class of normlab's normalization layers over ``(N, C, *)`` input.

    Holds ``num_channels``, ``eps``, the per-channel affine ``weight`` (ones) and
    ``bias`` (zeros) when ``affine``, and, when ``track_running_stats``, the buffers
    ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked``
    under the same names as torch.nn, so checkpoints load both ways.

    ``momentum`` is the weight of the new batch in the running average (torch.nn's
    convention; Keras's and Flax's ``momentum=0.99`` is ``0.01`` here); ``None``
    makes the running statistics a cumulative average over all batches seen (under
    torch.compile that reads the batch counter on the host: a graph break per training
    call; the default momentum compiles without one).

    Every constructor argument is checked before anything is built (a TypeError for a
    wrong type, a ValueError for NaN or a value out of range, naming the layer and the
    argument), and a call that raises leaves every parameter and buffer as it was. An
    input with no elements (N = 0) gives an empty output, as torch.nn.BatchNorm2d does:
    the running statistics stay, the batch counter counts it (torch 2.13 does too).
    Training on the meta device infers shapes, as torch.nn's layers do.
    """

    #: Whether ``eps=None`` means something (RMSNorm: the input dtype's epsilon).
    _eps_may_be_none = False

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_channels = _check_num_channels(type(self).__name__, num_channels)
        owner = f"{type(self).__name__}({num_channels})"
        eps = check_number(owner, "eps", eps, low=0.0, allow_none=self._eps_may_be_none)
        momentum = check_number(owner, "momentum (the weight of the new batch; None: "
                                "cumulative average)", momentum, low=0.0, high=1.0,
                                allow_none=True)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_channels, **factory))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias = nn.Parameter(torch.empty(num_channels, **factory))
        else:
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_channels, **factory))
            self.register_buffer("running_var", torch.ones(num_channels, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    @property
    def layer_name(self) -> str:
        """The name used in error messages, e.g. ``BatchNorm(64)``."""
        return f"{type(self).__name__}({self.num_channels})"

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1 and the batch counter 0 (when tracked)."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Initial state: :meth:`reset_running_stats`, weight 1 and bias 0. Also what
        materialises a layer built on the meta device, after ``to_empty()``."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_input(self, x: Tensor, min_dim: int = 2) -> None:
        # The common case in a few cheap tests; the message is built only on failure.
        if (not isinstance(x, Tensor) or x.dim() < min_dim or x.shape[1] != self.num_channels
                or not x.is_floating_point()):
            NF.check_input(x, self.num_channels, self.layer_name, min_dim)

    def _momentum_factor(self) -> float:
        """The weight of this training batch's statistics in the running average, the
        batch counting as number ``num_batches_tracked + 1``. Call :meth:`_count_batch`
        once the batch has been accepted, so that a rejected batch changes nothing."""
        if self.momentum is None:
            if self.num_batches_tracked.device.type == "meta":
                return 1.0  # shape inference: no counter value, and none needed
            return 1.0 / (float(self.num_batches_tracked) + 1.0)
        return self.momentum

    def _count_batch(self) -> None:
        self.num_batches_tracked.add_(1)

    def _empty_batch(self, x: Tensor) -> Tensor:
        """The output for an input with no elements (N = 0 or an empty trailing
        dimension), as torch.nn.BatchNorm2d gives it: an empty tensor of the input's
        shape, zero gradients for the parameters, the running statistics unchanged and,
        in training, the batch counted in ``num_batches_tracked`` (torch 2.13 counts it
        too, so the counters of the two stay equal)."""
        if self.training and self.track_running_stats:
            self._count_batch()
        return empty_output(x, *self.parameters(recurse=False))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before num_batches_tracked existed (torch.nn version 1)
        # lack the counter: start it at 0 rather than fail, as torch.nn does.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        parts = [f"{self.num_channels}", f"eps={self.eps}"]
        if self.track_running_stats:
            parts.append(f"momentum={self.momentum}")
        parts.append(f"affine={self.affine}")
        if self.track_running_stats:
            parts.append("track_running_stats=True")
        return ", ".join(parts)


class Identity(nn.Module):
    """No normalization: returns its input. Takes the channel count (and ignores any
    normalization keyword) so that it can stand wherever a norm layer is built by name
    (``create_norm("none", C)``)."""

    def __init__(self, num_channels: int | None = None, **ignored) -> None:
        super().__init__()
        self.num_channels = num_channels

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return "" if self.num_channels is None else f"{self.num_channels}"
