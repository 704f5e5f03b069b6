r"""Recurrent normalization: BN-LSTM with per-time-step statistics (Cooijmans et al.
2017), batch normalization of the input-to-hidden term only (Laurent et al. 2016) and
LN-LSTM (Ba et al. 2016).

The three layers share torch.nn.LSTM's interface and parameters: the same names
(``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``), shapes and
gate order (i, f, g, o), input ``(T, N, F)`` or ``(N, T, F)`` with ``batch_first``,
optional initial state ``(h_0, c_0)`` and the return value ``output, (h_n, c_n)``.
With ``normalize=False`` each of them computes exactly torch.nn.LSTM (its state_dict
then has torch's keys and nothing else), so weights can be copied either way.

Variable-length batches
-----------------------
``forward`` takes either ``lengths`` (one valid length per sample), or a bool ``mask``
of shape ``(N, T)`` (always batch-major, as torch's ``key_padding_mask``; True marks a
valid step), or a ``torch.nn.utils.rnn.PackedSequence`` as input. Then:

* padded positions take no part in any batch statistic (and their input values, even
  NaN, have no effect on anything: they are zeroed before use);
* the output at a padded position is exactly 0;
* the state is carried unchanged over a padded step, so the returned ``(h_n, c_n)``
  is each sample's state after its last valid step, as for packed sequences in torch
  (a sample of length 0 returns its initial state).

All statistics come from :func:`normlab.stats.moments`. Not supported (unlike
torch.nn.LSTM): ``bidirectional``, ``proj_size`` and unbatched 2-D input. The
recurrence is a Python loop over time steps (no fused kernel), so these layers are
several times slower than torch.nn.LSTM.

torch.compile unrolls that loop: no graph break, but the compile time grows with the
sequence length and every new length compiles again. ``lengths``, ``mask`` and
PackedSequence input are checked on the host (graph breaks). torch.export and ONNX
export work in eval mode, for the traced sequence length.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from normlab import functional as NF
from normlab import stats
from normlab.nn.checks import check_number, empty_output

__all__ = ["StepBatchNorm", "GateLayerNorm", "BNLSTM", "InputBNLSTM", "LNLSTM"]

#: Default number of time steps with their own running statistics in BN-LSTM. Covers
#: every setup of Cooijmans et al. (PTB 100 steps, text8 180, sequential MNIST 784).
DEFAULT_MAX_STEPS = 1000


def _check_momentum(name: str, momentum: float | None) -> None:
    check_number(name, "momentum (the weight of the new batch; None: cumulative average)",
                 momentum, low=0.0, high=1.0, allow_none=True)


def _check_norm_args(name: str, eps, init_name: str, init) -> None:
    """The norms' eps and initial gain, checked under the LSTM's name before the norms
    are built (whose own checks would name only the norm)."""
    check_number(name, "eps", eps, low=0.0)
    check_number(name, init_name, init)


def _check_positive_int(name: str, what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {what} must be a positive int, got {value!r}")
    return value


class StepBatchNorm(nn.Module):
    r"""Batch normalization of a sequence ``(S, N, C)`` with statistics per time step
    (frame-wise) or pooled over all steps (sequence-wise).

    .. math::
        y_{t,n,c} = \frac{x_{t,n,c} - \mu_{t,c}}{\sqrt{\sigma^2_{t,c} + \epsilon}}\,
        \gamma_c + \beta_c

    *Per step* (``max_steps`` an int): :math:`\mu_{t}, \sigma^2_{t}` are the mean and
    biased variance over the valid samples of step t only (Cooijmans et al. 2017;
    Laurent et al.'s frame-wise statistics). Running statistics are kept for every
    step ``t < max_steps`` in buffers ``running_mean`` and ``running_var`` of shape
    ``(max_steps, C)``, with a per-step counter ``num_batches_tracked`` of shape
    ``(max_steps,)``. *Sequence-wise* (``max_steps=None``): the statistics pool the
    valid samples of every step (Laurent et al.), and the buffers are per channel,
    ``(C,)``, as in :class:`normlab.nn.BatchNorm`.

    Running statistics follow torch.nn's convention: in training,
    :math:`\hat r_t \leftarrow (1 - m)\,\hat r_t + m\, r_t` with ``m = momentum`` (the
    weight of the new batch) and the variance Bessel-corrected; ``momentum=None``
    gives each step the cumulative average of the batches that reached it. Non-finite
    batch statistics are not written (RuntimeWarning).

    Eval, per step: step t uses the running statistics of the latest step
    :math:`s \le \min(t, \mathrm{max\_steps} - 1)` that was tracked in training (whose
    counter is positive); before any training, step :math:`\min(t, \mathrm{max\_steps}-1)`.
    This is the paper's rule (steps past the longest training sequence
    :math:`T_{max}` reuse the statistics of :math:`T_{max}`) with ``max_steps`` only a
    memory cap. In training, steps at or past ``max_steps`` are normalized with their
    own batch statistics but not recorded (a warning says so).

    Training on masked input: a step with fewer than 2 valid samples has no batch
    variance. It does not update the running statistics and is normalized with them
    by eval's rule above, taken after this batch's update of the earlier steps (so
    the same whether the steps come one call at a time or all at once). Without
    running statistics, a step with one valid sample is an error. Steps with no
    valid sample are left alone (their outputs are padding).

    Args:
        num_features: C.
        max_steps: number of steps with their own running statistics, or None for
            sequence-wise statistics. Default: 1000.
        eps: added to the variance. Default: 1e-5.
        momentum: weight of the new batch in the running statistics, or None.
            Default: 0.1.
        affine: learn :math:`\gamma` (and :math:`\beta` when ``bias``). Default: True.
        bias: learn :math:`\beta` (init 0). Default: True.
        weight_init: initial :math:`\gamma`. Default: 1.0.
        track_running_stats: keep running statistics and use them in eval; otherwise
            batch statistics are used in eval too. Default: True.

    Shape:
        - Input: :math:`(S, N, C)`; the steps are ``t0, ..., t0 + S - 1``.
        - Mask (optional): bool :math:`(S, N)`, True for valid samples.
        - Output: :math:`(S, N, C)`.
    """

    def __init__(
        self,
        num_features: int,
        max_steps: int | None = DEFAULT_MAX_STEPS,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        bias: bool = True,
        weight_init: float = 1.0,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.num_features = _check_positive_int(name, "num_features", num_features)
        if max_steps is not None:
            _check_positive_int(name, "max_steps", max_steps)
        _check_momentum(name, momentum)
        _check_norm_args(name, eps, "weight_init", weight_init)
        self.max_steps = max_steps
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.weight_init = float(weight_init)
        self.track_running_stats = track_running_stats
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_features, **factory)) if affine and bias else None
        if track_running_stats:
            shape = (num_features,) if max_steps is None else (max_steps, num_features)
            count_shape = () if max_steps is None else (max_steps,)
            self.register_buffer("running_mean", torch.zeros(shape, **factory))
            self.register_buffer("running_var", torch.ones(shape, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.zeros(count_shape, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    @property
    def per_step(self) -> bool:
        return self.max_steps is not None

    @property
    def layer_name(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.constant_(self.weight, self.weight_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def statistics_rows(self, t0: int, steps: int) -> Tensor:
        """Row of the running statistics that steps ``t0 .. t0 + steps - 1`` use in eval."""
        idx = torch.arange(self.max_steps, device=self.running_mean.device)
        tracked = self.num_batches_tracked > 0
        t = torch.arange(t0, t0 + steps, device=idx.device).clamp(max=self.max_steps - 1)
        # The latest tracked step s <= t, as a masked max over (steps, max_steps) rather
        # than a cummax, which ONNX has no operator for.
        usable = tracked[None, :] & (idx[None, :] <= t[:, None])
        last = torch.where(usable, idx[None, :], torch.full_like(idx, -1)[None, :]).amax(1)
        return torch.where(last >= 0, last, t)

    def _running(self, t0: int, steps: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self.per_step:
            rows = self.statistics_rows(t0, steps)
            mean, var = self.running_mean[rows].unsqueeze(1), self.running_var[rows].unsqueeze(1)
        else:
            mean = self.running_mean.view(1, 1, -1)
            var = self.running_var.view(1, 1, -1)
        return mean.to(dtype), var.to(dtype)

    def _check(self, x: Tensor, mask: Tensor | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.num_features:
            raise ValueError(
                f"{self.layer_name}: expected input of shape (S, N, {self.num_features}), "
                f"got {tuple(x.shape)}"
            )
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:2]):
            raise ValueError(
                f"{self.layer_name}: expected a bool mask of shape {tuple(x.shape[:2])}, "
                f"got {mask.dtype} of shape {tuple(mask.shape)}"
            )

    def forward(self, x: Tensor, t0: int = 0, mask: Tensor | None = None) -> Tensor:
        self._check(x, mask)
        steps, n = x.shape[:2]
        if not (self.training or not self.track_running_stats):
            mean, var = self._running(t0, steps, stats.stat_dtype(x.dtype))
            return NF.normalize(x, mean, var, self.eps, self.weight, self.bias)
        dims = (1,) if self.per_step else (0, 1)
        per_group = n if self.per_step else steps * n
        if mask is None and per_group < 2:
            raise ValueError(
                f"{self.layer_name}: batch statistics need more than 1 value per channel "
                f"and step, got input of shape {tuple(x.shape)}; use a batch of at least 2 "
                "or eval() with running statistics"
            )
        mean, var, count = stats.moments(x, dims, mask=None if mask is None else mask[..., None])
        ok = None
        if isinstance(count, Tensor):
            count = count[..., :1]  # the same for every channel: (S, 1, 1) or (1, 1, 1)
            ok = count >= 2
            if bool(ok.all()):
                ok = None
            elif not self.track_running_stats and bool((count == 1).any()):
                raise ValueError(
                    f"{self.layer_name}: a step has only 1 valid sample, so it has no batch "
                    "variance; keep running statistics (track_running_stats=True) to "
                    "normalize it with them"
                )
        if self.training and self.track_running_stats:
            self._update(t0, mean, var, count, ok)
        if ok is not None and self.track_running_stats:
            # Steps without batch statistics: running ones, after this batch's update.
            rmean, rvar = self._running(t0, steps, mean.dtype)
            mean = torch.where(ok, mean, rmean)
            var = torch.where(ok, var, rvar)
        return NF.normalize(x, mean, var, self.eps, self.weight, self.bias)

    def _factor(self, counter: Tensor, dtype: torch.dtype) -> float | Tensor:
        if self.momentum is not None:
            return self.momentum
        return (1.0 / counter.clamp(min=1).to(dtype)).unsqueeze(-1)

    def _update(self, t0: int, mean: Tensor, var: Tensor, count, ok: Tensor | None) -> None:
        c = self.num_features
        batch_var = stats.unbiased(var, count)
        if not self.per_step:
            if ok is not None and not bool(ok.all()):
                return
            self.num_batches_tracked.add_(1)
            factor = self._factor(self.num_batches_tracked, self.running_mean.dtype)
            if isinstance(factor, Tensor):
                factor = factor.squeeze(-1)
            NF.update_running_(self.running_mean, mean.reshape(c), factor, self.layer_name)
            NF.update_running_(self.running_var, batch_var.reshape(c), factor, self.layer_name)
            return
        steps = mean.shape[0]
        end = min(t0 + steps, self.max_steps)
        if t0 + steps > self.max_steps:
            warnings.warn(
                f"{self.layer_name}: training on step {t0 + steps - 1} >= max_steps="
                f"{self.max_steps}; steps past max_steps use their batch statistics but "
                "are not recorded (eval reuses the last recorded step)",
                RuntimeWarning,
                stacklevel=3,
            )
        if end <= t0:
            return
        k = end - t0
        rm = self.running_mean[t0:end]
        rv = self.running_var[t0:end]
        counter = self.num_batches_tracked[t0:end]
        bm = mean.reshape(steps, c)[:k]
        bv = batch_var.reshape(steps, c)[:k]
        if ok is None:
            counter.add_(1)
        else:
            keep = ok.reshape(steps)[:k]
            # Steps without batch statistics "update" to their current value: no change.
            bm = torch.where(keep[:, None], bm, rm.to(bm.dtype))
            bv = torch.where(keep[:, None], bv, rv.to(bv.dtype))
            counter.add_(keep.long())
        factor = self._factor(counter, rm.dtype)
        NF.update_running_(rm, bm, factor, self.layer_name)
        NF.update_running_(rv, bv, factor, self.layer_name)

    def extra_repr(self) -> str:
        steps = "sequence-wise" if self.max_steps is None else f"max_steps={self.max_steps}"
        return (
            f"{self.num_features}, {steps}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


class GateLayerNorm(nn.Module):
    r"""Layer normalization over the last dimension, jointly or per group of features.

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    with :math:`\mu, \sigma^2` over the ``C / groups`` consecutive features of each
    group, for each sample (and step) separately. ``groups=1`` is the whole vector
    (the official LN-LSTM code normalizes the 4H gate pre-activations jointly);
    ``groups=4`` on gate pre-activations normalizes each gate on its own.

    Args:
        num_features: C. groups: must divide C. Default: 1.
        eps: Default: 1e-5. bias: learn :math:`\beta` (init 0). Default: True.
        weight_init: initial :math:`\gamma`. Default: 1.0.

    Shape:
        - Input: :math:`(*, C)`; output of the same shape.
    """

    def __init__(self, num_features: int, groups: int = 1, eps: float = 1e-5,
                 bias: bool = True, weight_init: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        name = type(self).__name__
        self.num_features = _check_positive_int(name, "num_features", num_features)
        self.groups = _check_positive_int(name, "groups", groups)
        if num_features % groups:
            raise ValueError(f"{name}: groups={groups} does not divide {num_features}")
        _check_norm_args(name, eps, "weight_init", weight_init)
        self.eps = eps
        self.weight_init = float(weight_init)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.weight_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.num_features)
        return NF.group_norm(flat, self.groups, self.weight, self.bias, self.eps).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}"


class _LSTMBase(nn.Module):
    """torch.nn.LSTM's parameters, input handling and recurrence, with hooks where the
    subclasses normalize: the input term of all steps, the recurrent term of one step,
    the cell state of one step."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        bias: bool,
        batch_first: bool,
        dropout: float,
        forget_bias: float | None,
        normalize: bool,
        device,
        dtype,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_size = _check_positive_int(name, "input_size", input_size)
        self.hidden_size = _check_positive_int(name, "hidden_size", hidden_size)
        self.num_layers = _check_positive_int(name, "num_layers", num_layers)
        check_number(name, "dropout", dropout, low=0.0, high=1.0, high_open=True)
        check_number(name, "forget_bias", forget_bias, allow_none=True)
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.forget_bias = forget_bias
        self.normalize = normalize
        factory = {"device": device, "dtype": dtype}
        h4 = 4 * hidden_size
        for k in range(num_layers):
            fan_in = input_size if k == 0 else hidden_size
            shapes = {f"weight_ih_l{k}": (h4, fan_in), f"weight_hh_l{k}": (h4, hidden_size)}
            if bias:
                shapes.update({f"bias_ih_l{k}": (h4,), f"bias_hh_l{k}": (h4,)})
            for pname, shape in shapes.items():  # torch.nn.LSTM's order
                self.register_parameter(pname, nn.Parameter(torch.empty(shape, **factory)))

    @property
    def layer_name(self) -> str:
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size})"

    def _lstm_parameters(self) -> list[Tensor]:
        names = ["weight_ih_l{}", "weight_hh_l{}"]
        if self.bias:
            names += ["bias_ih_l{}", "bias_hh_l{}"]
        return [getattr(self, n.format(k)) for k in range(self.num_layers) for n in names]

    def reset_parameters(self) -> None:
        """torch.nn.LSTM's initialization, U(-1/sqrt(H), 1/sqrt(H)) for every weight and
        bias; then, if ``forget_bias`` is a number, every bias 0 except the forget-gate
        block of ``bias_ih_l{k}``, set to ``forget_bias``; then the norms' own init."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for p in self._lstm_parameters():
                p.uniform_(-bound, bound)
            if self.bias and self.forget_bias is not None:
                h = self.hidden_size
                for k in range(self.num_layers):
                    getattr(self, f"bias_ih_l{k}").zero_()[h : 2 * h].fill_(self.forget_bias)
                    getattr(self, f"bias_hh_l{k}").zero_()
        for module in self.modules():
            if isinstance(module, (StepBatchNorm, GateLayerNorm)):
                module.reset_parameters()

    # Hooks: identity unless a subclass normalizes there.
    def _norm_input(self, k: int, xw: Tensor, valid: Tensor | None) -> Tensor:
        return xw

    def _norm_hidden(self, k: int, hw: Tensor, t: int, valid_t: Tensor | None) -> Tensor:
        return hw

    def _norm_cell(self, k: int, c: Tensor, t: int, valid_t: Tensor | None) -> Tensor:
        return c

    # Input handling.
    def _check_input(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.layer_name}: expected a torch.Tensor, got {type(x).__name__}")
        layout = "(N, T, F)" if self.batch_first else "(T, N, F)"
        if x.dim() != 3:
            raise ValueError(
                f"{self.layer_name}: expected batched input of shape {layout} with "
                f"F={self.input_size}, got shape {tuple(x.shape)}"
            )
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"{self.layer_name}: expected input_size={self.input_size} in the last "
                f"dimension of {layout}, got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{self.layer_name}: expected a floating-point input, got {x.dtype}")

    def _valid_mask(self, lengths, mask, n: int, t: int, device) -> Tensor | None:
        """(T, N) bool of valid steps, or None when every step is valid."""
        if lengths is not None and mask is not None:
            raise ValueError(f"{self.layer_name}: give lengths or mask, not both")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=device)
            if lengths.shape != (n,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
                raise ValueError(
                    f"{self.layer_name}: lengths must be a 1-D integer tensor of {n} lengths, "
                    f"got {lengths.dtype} of shape {tuple(lengths.shape)}"
                )
            if bool((lengths < 0).any()) or bool((lengths > t).any()):
                raise ValueError(
                    f"{self.layer_name}: lengths must lie in [0, T={t}], got "
                    f"{lengths.tolist()}"
                )
            valid = torch.arange(t, device=device)[:, None] < lengths[None, :]
        elif mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (n, t):
                got = (
                    f"{mask.dtype} of shape {tuple(mask.shape)}"
                    if isinstance(mask, Tensor)
                    else type(mask).__name__
                )
                raise ValueError(
                    f"{self.layer_name}: mask must be a bool tensor of shape (N, T) = "
                    f"{(n, t)} (batch-major whatever batch_first is), got {got}"
                )
            valid = mask.to(device).t()
        else:
            return None
        return None if bool(valid.all()) else valid

    def _check_batch(self, n: int, valid: Tensor | None) -> None:
        """Hook: refuse, before any statistic is updated, a batch the norms cannot use."""

    def _initial_state(self, hx, n: int, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = (self.num_layers, n, self.hidden_size)
        if hx is None:
            zeros = x.new_zeros(shape)
            return zeros, zeros
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise ValueError(f"{self.layer_name}: hx must be a tuple (h_0, c_0), got {type(hx)}")
        for what, s in zip(("h_0", "c_0"), hx, strict=True):
            if not isinstance(s, Tensor) or s.shape != shape:
                got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(
                    f"{self.layer_name}: expected {what} of shape (num_layers, N, hidden_size) = "
                    f"{shape}, got {got}"
                )
        return hx[0], hx[1]

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | Sequence[int] | None = None,
        mask: Tensor | None = None,
    ):
        """Run the layers over a sequence: ``output, (h_n, c_n)``, as torch.nn.LSTM.

        ``lengths`` (N valid lengths) or ``mask`` (bool (N, T), True = valid) mark
        padding in a padded batch; a PackedSequence input carries its own lengths and
        gives a PackedSequence output. See the class docstring for shapes.
        """
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None or mask is not None:
                raise ValueError(
                    f"{self.layer_name}: a PackedSequence carries its lengths; do not pass "
                    "lengths or mask with it"
                )
            x, lengths = pad_packed_sequence(input, batch_first=self.batch_first)
        else:
            x = input
        self._check_input(x)
        if self.batch_first:
            x = x.transpose(0, 1)
        t, n = x.shape[:2]
        valid = self._valid_mask(lengths, mask, n, t, x.device)
        h0, c0 = self._initial_state(hx, n, x)
        if n == 0 and not packed:
            # An empty batch, as torch.nn.LSTM: an empty output, no statistic touched.
            out = empty_output(x.new_zeros(t, 0, self.hidden_size), *self.parameters())
            return (out.transpose(0, 1) if self.batch_first else out), (h0 * 1, c0 * 1)
        self._check_batch(n, valid)
        if valid is not None:
            # Padding never reaches a statistic, a state or a gradient (not even NaN).
            x = x.masked_fill(~valid.unsqueeze(-1), 0.0)
        h_n, c_n = [], []
        out = x
        for k in range(self.num_layers):
            if k > 0 and self.dropout > 0 and self.training:
                out = F.dropout(out, self.dropout, training=True)
            out, (h, c) = self._layer(k, out, h0[k], c0[k], valid)
            h_n.append(h)
            c_n.append(c)
        if self.batch_first:
            out = out.transpose(0, 1)
        state = (torch.stack(h_n), torch.stack(c_n))
        if packed:
            order = input.sorted_indices
            dim = 0 if self.batch_first else 1
            if order is not None:
                out, lengths = out.index_select(dim, order), lengths[order.cpu()]
            data = pack_padded_sequence(out, lengths, batch_first=self.batch_first).data
            out = PackedSequence(data, input.batch_sizes, input.sorted_indices,
                                 input.unsorted_indices)
        return out, state

    def _layer(self, k: int, x: Tensor, h: Tensor, c: Tensor, valid: Tensor | None):
        w_ih = getattr(self, f"weight_ih_l{k}")
        w_hh = getattr(self, f"weight_hh_l{k}")
        xw = self._norm_input(k, torch.matmul(x, w_ih.t()), valid)
        if self.bias:
            # Two adds, not xw + (b_ih + b_hh): the pre-summed form gives both biases the
            # very same gradient tensor, which torch.compile (inductor, torch 2.13) returns
            # aliased, so that a second backward without zero_grad counts it twice.
            xw = xw + getattr(self, f"bias_ih_l{k}") + getattr(self, f"bias_hh_l{k}")
        outputs = []
        for step in range(x.shape[0]):
            valid_t = None if valid is None else valid[step]
            gates = xw[step] + self._norm_hidden(k, torch.mm(h, w_hh.t()), step, valid_t)
            i, f, g, o = gates.chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(self._norm_cell(k, c_new, step, valid_t))
            if valid_t is None:
                h, c = h_new, c_new
                outputs.append(h_new)
            else:
                m = valid_t.unsqueeze(1)
                h = torch.where(m, h_new, h)
                c = torch.where(m, c_new, c)
                outputs.append(torch.where(m, h_new, torch.zeros_like(h_new)))
        return torch.stack(outputs), (h, c)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if not self.normalize:
            s += ", normalize=False"
        return s


class BNLSTM(_LSTMBase):
    r"""Recurrent Batch Normalization LSTM (Cooijmans et al., ICLR 2017).

    .. math::
        \begin{aligned}
        (\tilde\imath, \tilde f, \tilde g, \tilde o) &=
            \mathrm{BN}_t(W_h h_{t-1}; \gamma_h, 0) + \mathrm{BN}_t(W_x x_t; \gamma_x, 0) + b \\
        c_t &= \sigma(\tilde f) \odot c_{t-1} + \sigma(\tilde\imath) \odot \tanh(\tilde g) \\
        h_t &= \sigma(\tilde o) \odot \tanh(\mathrm{BN}_t(c_t; \gamma_c, \beta_c))
        \end{aligned}

    Each :math:`\mathrm{BN}_t` normalizes over the batch with the statistics **of time
    step t** (sharing them across steps "severely degrades performance"), over the
    valid samples only when lengths or a mask are given; the cell recurrence
    :math:`c_t` itself is not normalized. In eval each step uses its own running
    statistics, and steps past the longest trained step (or past ``max_steps``) reuse
    the statistics of that last step: see :class:`StepBatchNorm`, which holds them.
    ``b = bias_ih + bias_hh`` (torch's two biases, one bias in the paper).

    Parameters and buffers, per layer k: torch.nn.LSTM's ``weight_ih_l{k}`` (4H, F_k),
    ``weight_hh_l{k}`` (4H, H), ``bias_ih_l{k}``, ``bias_hh_l{k}`` (4H), gates i, f, g,
    o; ``norm_ih.{k}`` and ``norm_hh.{k}`` (:math:`\gamma_x, \gamma_h`: ``weight`` (4H);
    ``running_mean``/``running_var`` (max_steps, 4H); ``num_batches_tracked``
    (max_steps,)) and ``norm_c.{k}`` (:math:`\gamma_c, \beta_c`: ``weight``, ``bias``
    (H); buffers (max_steps, H)).

    Initialization (the paper's): :math:`\gamma = 0.1` (0.01 or less was unstable,
    1 saturates tanh), :math:`\beta_c = 0`, forget-gate bias 1 (every other bias 0),
    weights as torch.nn.LSTM (U(-1/sqrt(H), 1/sqrt(H))). Running statistics use
    torch's momentum convention (``momentum`` weighs the new batch; the variance is
    unbiased).

    With zero initial state, step 0's recurrent term :math:`W_h h_0` is 0 with zero
    variance, so its normalized value is 0 (the paper injects noise into
    :math:`h_0` for this reason on sequential MNIST; pass a noisy ``hx`` to do so).

    Args:
        input_size: F. hidden_size: H.
        num_layers: stacked layers. Default: 1.
        bias: use ``bias_ih``/``bias_hh``. Default: True.
        batch_first: input and output are ``(N, T, *)``. Default: False.
        dropout: dropout on the output of every layer but the last, in training (as
            torch.nn.LSTM). Default: 0.
        max_steps: time steps with their own running statistics. Default: 1000
            (every setup of the paper; use at least the longest training sequence).
        eps: Default: 1e-5. momentum: Default: 0.1 (None: cumulative average).
        gamma_init: initial :math:`\gamma_x, \gamma_h, \gamma_c`. Default: 0.1.
        forget_bias: initial forget-gate bias (in ``bias_ih``), or None to keep
            torch's uniform bias init. Default: 1.0.
        track_running_stats: Default: True (otherwise eval uses batch statistics).
        normalize: False removes every norm: the layer is then torch.nn.LSTM, with
            torch's state_dict. Default: True.

    Shape:
        - input: :math:`(T, N, F)`, or :math:`(N, T, F)` with ``batch_first``, or a
          ``PackedSequence``. Training needs N >= 2 (batch statistics).
        - hx (optional): ``(h_0, c_0)``, each :math:`(L, N, H)`; zeros by default.
        - lengths (optional): :math:`(N,)` integers in [0, T]. mask (optional): bool
          :math:`(N, T)`, True for valid steps, batch-major whatever ``batch_first``.
        - output: :math:`(T, N, H)` (or :math:`(N, T, H)`, or a ``PackedSequence``), 0 at
          padded positions; ``(h_n, c_n)``, each :math:`(L, N, H)`, the state after each
          sample's last valid step.

    Example::

        >>> lstm = normlab.nn.BNLSTM(16, 32, batch_first=True)
        >>> out, (h, c) = lstm(torch.randn(8, 20, 16), lengths=torch.full((8,), 20))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        max_steps: int = DEFAULT_MAX_STEPS,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        gamma_init: float = 0.1,
        forget_bias: float | None = 1.0,
        track_running_stats: bool = True,
        normalize: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         forget_bias, normalize, device, dtype)
        _check_positive_int(self.layer_name, "max_steps", max_steps)
        _check_momentum(self.layer_name, momentum)
        _check_norm_args(self.layer_name, eps, "gamma_init", gamma_init)
        self.max_steps = max_steps
        if normalize:
            h = hidden_size

            def bn(c: int, bias: bool) -> StepBatchNorm:
                return StepBatchNorm(c, max_steps, eps, momentum, True, bias, gamma_init,
                                     track_running_stats, device, dtype)

            self.norm_ih = nn.ModuleList(bn(4 * h, False) for _ in range(num_layers))
            self.norm_hh = nn.ModuleList(bn(4 * h, False) for _ in range(num_layers))
            self.norm_c = nn.ModuleList(bn(h, True) for _ in range(num_layers))
        self.reset_parameters()

    def _check_batch(self, n: int, valid: Tensor | None) -> None:
        if self.normalize and self.training and valid is None and n < 2:
            raise ValueError(
                f"{self.layer_name}: batch statistics need more than 1 value per channel and "
                f"step, so training needs at least 2 sequences in the batch, got N={n}; use "
                "eval() with running statistics"
            )

    def _norm_input(self, k, xw, valid):
        return self.norm_ih[k](xw, 0, valid) if self.normalize else xw

    def _norm_hidden(self, k, hw, t, valid_t):
        if not self.normalize:
            return hw
        return self.norm_hh[k](hw[None], t, None if valid_t is None else valid_t[None])[0]

    def _norm_cell(self, k, c, t, valid_t):
        if not self.normalize:
            return c
        return self.norm_c[k](c[None], t, None if valid_t is None else valid_t[None])[0]

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", max_steps={self.max_steps}" if self.normalize else "")


class InputBNLSTM(_LSTMBase):
    r"""LSTM with batch normalization of the input-to-hidden term only (Laurent,
    Pereyra, Brakel, Zhang & Bengio, "Batch Normalized Recurrent Neural Networks",
    ICASSP 2016).

    .. math::
        \begin{aligned}
        (\tilde\imath, \tilde f, \tilde g, \tilde o) &=
            \mathrm{BN}(W_x x_t; \gamma, 0) + W_h h_{t-1} + b \\
        c_t &= \sigma(\tilde f) \odot c_{t-1} + \sigma(\tilde\imath) \odot \tanh(\tilde g),
        \qquad h_t = \sigma(\tilde o) \odot \tanh(c_t)
        \end{aligned}

    The paper's recurrence is :math:`h_t = \phi(W_h h_{t-1} + \mathrm{BN}(W_x x_t))`;
    normlab applies it to an LSTM cell (as the paper's speech and language models
    do), normalizing the pre-activations of all four gates. Normalizing the
    hidden-to-hidden term "doesn't help", so it is left alone, and so is the cell.
    :math:`\beta` is absorbed into ``b = bias_ih + bias_hh``.

    Two kinds of statistics (``statistics=``):

    * ``"sequence"`` (sequence-wise): mean and variance per feature over the batch
      and all valid time steps together; one set of running statistics of shape
      (4H,). Works for any sequence length and is what variable-length speech needs.
    * ``"frame"`` (frame-wise): over the batch at each time step, running statistics
      per step up to ``max_steps`` with the same eval fallback as :class:`BNLSTM`.

    Since :math:`W_x x_t` does not depend on the recurrence, it is computed and
    normalized for all steps at once. The paper reports faster convergence of the
    training criterion but no better generalization (more overfitting).

    Parameters: torch.nn.LSTM's, plus ``norm_ih.{k}`` (:class:`StepBatchNorm`:
    ``weight`` (4H), running statistics).

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout: as
            torch.nn.LSTM (defaults 1, True, False, 0).
        statistics: ``"sequence"`` or ``"frame"``. Default: ``"sequence"``.
        max_steps: steps with their own running statistics when frame-wise.
            Default: 1000.
        eps: Default: 1e-5. momentum: Default: 0.1 (None: cumulative average).
        gamma_init: initial :math:`\gamma`. Default: 1.0 (standard BN).
        forget_bias: None keeps torch's init of every bias. Default: None.
        track_running_stats: Default: True. normalize: False gives torch.nn.LSTM.
            Default: True.

    Shape:
        As :class:`BNLSTM`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        statistics: str = "sequence",
        max_steps: int = DEFAULT_MAX_STEPS,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        gamma_init: float = 1.0,
        forget_bias: float | None = None,
        track_running_stats: bool = True,
        normalize: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         forget_bias, normalize, device, dtype)
        if statistics not in ("sequence", "frame"):
            raise ValueError(
                f"{self.layer_name}: statistics must be 'sequence' or 'frame', got {statistics!r}"
            )
        _check_momentum(self.layer_name, momentum)
        _check_norm_args(self.layer_name, eps, "gamma_init", gamma_init)
        self.statistics = statistics
        steps = _check_positive_int(self.layer_name, "max_steps", max_steps)
        self.max_steps = steps if statistics == "frame" else None
        if normalize:
            self.norm_ih = nn.ModuleList(
                StepBatchNorm(4 * hidden_size, self.max_steps, eps, momentum, True, False,
                              gamma_init, track_running_stats, device, dtype)
                for _ in range(num_layers)
            )
        self.reset_parameters()

    def _norm_input(self, k, xw, valid):
        return self.norm_ih[k](xw, 0, valid) if self.normalize else xw

    def extra_repr(self) -> str:
        extra = f", statistics={self.statistics!r}" if self.normalize else ""
        return super().extra_repr() + extra


class LNLSTM(_LSTMBase):
    r"""Layer-normalized LSTM (Ba, Kiros & Hinton, "Layer Normalization", 2016).

    .. math::
        \begin{aligned}
        (\tilde\imath, \tilde f, \tilde g, \tilde o) &=
            \mathrm{LN}(W_h h_{t-1}; \alpha_h) + \mathrm{LN}(W_x x_t; \alpha_x) + b \\
        c_t &= \sigma(\tilde f) \odot c_{t-1} + \sigma(\tilde\imath) \odot \tanh(\tilde g) \\
        h_t &= \sigma(\tilde o) \odot \tanh(\mathrm{LN}(c_t; \alpha_c, \beta_c))
        \end{aligned}

    :math:`\mathrm{LN}` takes the mean and biased variance over the features of each
    sample at each step: by default the 4H gate pre-activations jointly, as the
    authors' code does (``per_gate=True`` normalizes each gate's H values on its
    own), and the H cell units. No statistic crosses the batch, so a sample's output
    is the same alone or in any batch, in training and eval, and there are no
    running statistics. The paper's shifts of the two gate norms add up to one bias,
    ``b = bias_ih + bias_hh``.

    Parameters: torch.nn.LSTM's, plus per layer ``norm_ih.{k}.weight``,
    ``norm_hh.{k}.weight`` (4H) and ``norm_c.{k}.weight``, ``norm_c.{k}.bias`` (H)
    (:class:`GateLayerNorm`). Init as in the authors' code: gains 1, shifts 0,
    ``forget_bias`` 0 (every LSTM bias 0).

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout: as
            torch.nn.LSTM.
        eps: Default: 1e-5.
        per_gate: normalize each gate separately. Default: False.
        forget_bias: initial forget-gate bias, or None for torch's uniform bias init.
            Default: 0.0.
        normalize: False gives torch.nn.LSTM. Default: True.

    Shape:
        As :class:`BNLSTM` (any N >= 1).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        eps: float = 1e-5,
        per_gate: bool = False,
        forget_bias: float | None = 0.0,
        normalize: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         forget_bias, normalize, device, dtype)
        self.per_gate = per_gate
        _check_norm_args(self.layer_name, eps, "gamma_init", 1.0)
        if normalize:
            h, g = hidden_size, 4 if per_gate else 1
            kw = {"eps": eps, "device": device, "dtype": dtype}
            self.norm_ih = nn.ModuleList(GateLayerNorm(4 * h, g, bias=False, **kw)
                                         for _ in range(num_layers))
            self.norm_hh = nn.ModuleList(GateLayerNorm(4 * h, g, bias=False, **kw)
                                         for _ in range(num_layers))
            self.norm_c = nn.ModuleList(GateLayerNorm(h, 1, bias=True, **kw)
                                        for _ in range(num_layers))
        self.reset_parameters()

    def _norm_input(self, k, xw, valid):
        return self.norm_ih[k](xw) if self.normalize else xw

    def _norm_hidden(self, k, hw, t, valid_t):
        return self.norm_hh[k](hw) if self.normalize else hw

    def _norm_cell(self, k, c, t, valid_t):
        return self.norm_c[k](c) if self.normalize else c

    def extra_repr(self) -> str:
        return super().extra_repr() + (", per_gate=True" if self.per_gate else "")
