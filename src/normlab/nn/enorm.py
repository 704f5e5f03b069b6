r"""Equi-normalization (ENorm; Stock, Graham, Gribonval & Jégou, ICLR 2019).

A ReLU network computes the same function after rescaling each hidden unit: with
positive diagonal matrices :math:`D_k` (:math:`D_0 = D_q = I`),

.. math::
    \tilde W_k = D_k^{-1} W_k D_{k-1}, \qquad \tilde b_k = D_k^{-1} b_k

leave the output unchanged, because :math:`\mathrm{ReLU}(d z) = d\,\mathrm{ReLU}(z)`
for :math:`d > 0` (and max / average pooling, dropout and zero padding commute with
positive per-channel scales too). ENorm picks, after every optimizer step, the
rescaling that minimizes the weight norm

.. math::
    F = \sum_{k=0}^{q-1} c^{-2k} \lVert \tilde W_k \rVert_2^2

by one cycle of block-coordinate descent, one block per hidden layer, visited in
order (the sequential sweep analysed in the paper). The block minimum is closed form:
hidden unit :math:`i` of layer :math:`k`, with incoming norm
:math:`r_i = \lVert W_k[i, :] \rVert` and outgoing norm
:math:`o_i = \lVert W_{k+1}[:, i] \rVert`, is scaled by

.. math::
    s_i = \sqrt{o_i / (c\, r_i)}

(row :math:`i` of :math:`W_k` and :math:`b_k[i]` multiplied by :math:`s_i`, column
:math:`i` of :math:`W_{k+1}` divided by it), after which :math:`o_i = c\, r_i`. The
weights :math:`c^{-2k}` make this the exact minimizer of the block (derivation: the
block's part of :math:`F` is :math:`c^{-2k} s^2 r^2 + c^{-2k-2} o^2 / s^2`, minimal at
:math:`s^2 = o/(c r)`), so :math:`F` never increases; with :math:`c = 1` it is the
plain squared weight norm (weight decay). :math:`c > 1` lets deeper layers carry
larger weights; the official runs use ``c = 1.2`` (fully connected) and ``1.1`` (conv).

Differences from the official code (facebookresearch/enorm), on purpose:

* biases are rescaled with their unit (``b_k[i] *= s_i``), so the function is
  preserved exactly (the official code leaves biases alone and changes the function);
* every hidden layer is balanced by default, including the one feeding the
  classifier; the official loop skips it (``balance_last_hidden=False`` does the same);
* the sweep is sequential (each block reads the norms left by the previous block);
  the official sweep is Jacobi-like. Both reach the same fixed point.
* momentum buffers are rescaled for fully connected and conv layers alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

from normlab.nn.base import Identity, NormBase

__all__ = ["ENorm"]

# Modules that commute with a positive per-channel rescaling of their input.
_HOMOGENEOUS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Identity,
    Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
)
_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    NormBase,
)

# optimizer state key -> power of the unit's scale it transforms with (gradients
# scale by 1/s where the weight scales by s).
_STATE_POWERS = {
    "momentum_buffer": -1,
    "exp_avg": -1,
    "exp_avg_sq": -2,
    "max_exp_avg_sq": -2,
}
_STATE_IGNORED = {"step"}


class _Junction:
    """Hidden layer ``k``: the output units of ``layers[k]`` feeding ``layers[k+1]``."""

    def __init__(self, block: int) -> None:
        self.block = block  # columns of a Linear per conv channel after a Flatten (else 1)


def _is_weight_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, _ConvNd)) and not isinstance(m, _ConvTransposeNd)


def _flatten_chain(model, fn: str) -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        items = [(name, child) for name, child in model.named_children()]
    elif isinstance(model, (list, tuple)):
        items = []
        for i, m in enumerate(model):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{fn}: item [{i}] of the layer list is {type(m).__name__}, "
                                "not an nn.Module")
            items.append((f"[{i}]", m))
    else:
        raise TypeError(
            f"{fn}: expected an nn.Sequential or a list of modules in forward order, got "
            f"{type(model).__name__}. ENorm needs the order of the layers: pass the "
            "nn.Sequential part of the model, or list its layers in the order forward() "
            "applies them"
        )
    out = []
    for name, child in items:
        if isinstance(child, nn.Sequential):
            out.extend((f"{name}.{sub}", m) for sub, m in _flatten_chain(child, fn))
        else:
            out.append((name, child))
    return out


class ENorm:
    r"""Equi-normalization of a chain of Linear / Conv layers separated by ReLUs.

    Call :meth:`step` after every ``optimizer.step()`` (one balancing cycle per
    iteration, the schedule the paper found best). Each cycle leaves the network's
    function unchanged (biases are rescaled with their units) and does not increase
    :meth:`objective`; repeated cycles converge to the unique minimizer (when every
    unit has non-zero incoming and outgoing weights), where for every hidden unit
    ``outgoing norm = c * incoming norm`` (see :meth:`unit_norms`).

    Layer order: ``model`` must be an ``nn.Sequential`` (nested ``nn.Sequential``
    are flattened) or a list of modules in the order ``forward`` applies them;
    anything else is refused, since the order of an arbitrary ``forward`` is not
    known. The balanced layers are the ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of the
    chain (grouped convolutions included); between the first and the last of them
    only modules that commute with positive per-channel scales are accepted: ReLU,
    LeakyReLU, PReLU, Identity, Dropout, max / average / adaptive pooling, zero
    padding, and one ``nn.Flatten`` from a conv to a Linear (conv channel ``j``
    then owns the block of Linear columns ``j*L .. (j+1)*L - 1``, ``L =
    in_features / C``). Modules before the first or after the last weight layer are
    not touched and may be anything. The last weight layer (the classifier) has no
    outgoing weights and is not balanced as a hidden layer.

    Refused, with an error naming the layer: a normalization layer (BatchNorm, ...)
    between balanced layers (it would absorb the row scaling while the next layer's
    column scaling still applies: ENorm + BN changes the function), any activation
    that is not positively homogeneous (tanh, sigmoid, GELU, ReLU6, ...), transposed
    convolutions, weight-normalized (parametrized) weights, a layer used twice,
    mismatched channel counts, and a Conv to Linear junction without Flatten.

    Args:
        model: ``nn.Sequential`` or list of modules (see above).
        c: the ratio of outgoing to incoming norm at the fixed point (``c > 0``,
            default 1). The objective weighs layer ``k`` by ``c^{-2k}``.
        optimizer: optional optimizer whose per-parameter state is rescaled with the
            weights: SGD ``momentum_buffer`` and Adam / AdamW ``exp_avg`` scale like
            gradients (by ``1/s`` where the weight scales by ``s``), ``exp_avg_sq``
            and ``max_exp_avg_sq`` by ``1/s^2``. ``.grad`` is not touched (call
            ``step`` after ``optimizer.step()``, before the next backward).
        bias_in_norm: if True the incoming norm of unit ``i`` is
            ``sqrt(||W_k[i, :]||^2 + b_k[i]^2)`` and the objective adds
            ``c^{-2k} ||b_k||^2`` (biases penalized like weights); default False
            (biases are rescaled to preserve the function but not counted).
        balance_last_hidden: balance the hidden layer that feeds the last weight layer
            (the classifier). Default True, as in the paper's algorithm; False leaves
            it as it is, as the official code does (its loop stops one layer short).
            Every cycle still preserves the function and does not increase the
            objective; the fixed-point relation then holds for the other hidden
            layers.

    Only the 2-norm (``p = 2``, the weight-decay objective) is implemented.
    """

    def __init__(
        self,
        model: nn.Sequential | Sequence[nn.Module],
        c: float = 1.0,
        optimizer: torch.optim.Optimizer | None = None,
        bias_in_norm: bool = False,
        balance_last_hidden: bool = True,
    ) -> None:
        fn = "ENorm"
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise TypeError(f"{fn}: c must be a positive float, got {c!r}")
        c = float(c)
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"{fn}: c must be a positive finite float, got {c}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{fn}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.c = c
        self.optimizer = optimizer
        self.bias_in_norm = bool(bias_in_norm)
        chain = _flatten_chain(model, fn)
        self.layers, self.names, self.junctions = self._parse(chain, fn)
        self.balance_last_hidden = bool(balance_last_hidden)
        #: how many hidden layers :meth:`step` balances, from the first.
        self.num_balanced = len(self.junctions) - (0 if self.balance_last_hidden else 1)
        if self.num_balanced < 1:
            raise ValueError(
                f"{fn}: balance_last_hidden=False leaves nothing to balance: the chain has "
                f"{len(self.junctions)} hidden layer(s) ({', '.join(self.names)})"
            )

    # ------------------------------------------------------------------ parsing
    @staticmethod
    def _parse(chain, fn):
        """The chain's weight layers, their names and the junctions between them; a
        ValueError naming the layer for anything ENorm cannot balance exactly."""
        weight_idx = [i for i, (_, m) in enumerate(chain) if _is_weight_layer(m)]
        for name, m in chain:
            if isinstance(m, _ConvTransposeNd):
                raise ValueError(
                    f"{fn}: layer '{name}' ({type(m).__name__}) is a transposed convolution, "
                    "which ENorm does not balance"
                )
        if len(weight_idx) < 2:
            raise ValueError(
                f"{fn}: the chain has {len(weight_idx)} Linear/Conv layer(s); ENorm balances "
                "the hidden units between at least two"
            )
        layers, names, seen = [], [], set()
        for i in weight_idx:
            name, m = chain[i]
            if id(m) in seen:
                raise ValueError(f"{fn}: layer '{name}' appears twice in the chain")
            seen.add(id(m))
            if parametrize.is_parametrized(m):
                raise ValueError(
                    f"{fn}: layer '{name}' has a parametrized (e.g. weight-normalized) weight; "
                    "ENorm rescales plain weights only"
                )
            layers.append(m)
            names.append(name)
        junctions = []
        for a, b in zip(weight_idx[:-1], weight_idx[1:], strict=True):
            flattened = _check_between(chain, a, b, fn)
            junctions.append(_Junction(_junction_block(chain[a], chain[b], flattened, fn)))
        return layers, names, junctions

    # ------------------------------------------------------------------ norms
    def _incoming_sq(self, k: int) -> Tensor:
        m = self.layers[k]
        w = m.weight.detach()
        sq = w.reshape(w.shape[0], -1).to(_acc(w)).pow(2).sum(1)
        if self.bias_in_norm and m.bias is not None:
            sq = sq + m.bias.detach().to(sq.dtype).pow(2)
        return sq

    def _outgoing_view_shape(self, k: int) -> tuple[int, int, int, int]:
        """(groups, outputs per group, inputs per group, entries per input) of layer k+1."""
        nxt = self.layers[k + 1]
        w = nxt.weight
        if isinstance(nxt, nn.Linear):
            units = _out_units(self.layers[k])
            return 1, w.shape[0], units, self.junctions[k].block
        groups = nxt.groups
        return groups, w.shape[0] // groups, w.shape[1], w[0, 0].numel()

    def _outgoing_sq(self, k: int) -> Tensor:
        w = self.layers[k + 1].weight.detach()
        shape = self._outgoing_view_shape(k)
        return w.reshape(shape).to(_acc(w)).pow(2).sum((1, 3)).reshape(-1)

    def _column_factor(self, k: int, s: Tensor, like: Tensor) -> Tensor:
        """``s`` per input unit of layer k+1 expanded to the shape of its weight."""
        g, og, cg, r = self._outgoing_view_shape(k)
        return s.view(g, 1, cg, 1).expand(g, og, cg, r).reshape(like.shape)

    def unit_norms(self) -> list[tuple[Tensor, Tensor]]:
        """``(incoming, outgoing)`` norms of the units of every hidden layer.

        Incoming: ``||W_k[i, :]||`` (with ``b_k[i]`` when ``bias_in_norm``); outgoing:
        ``||W_{k+1}[:, i]||`` (over the whole block of columns after a Flatten). At
        the fixed point ``outgoing = c * incoming``.
        """
        return [
            (self._incoming_sq(k).sqrt(), self._outgoing_sq(k).sqrt())
            for k in range(len(self.junctions))
        ]

    def objective(self) -> float:
        r"""``sum_k c^{-2k} ||W_k||^2`` (plus ``c^{-2k} ||b_k||^2`` when ``bias_in_norm``)."""
        total = 0.0
        for k, m in enumerate(self.layers):
            sq = m.weight.detach().to(torch.float64).pow(2).sum()
            if self.bias_in_norm and m.bias is not None:
                sq = sq + m.bias.detach().to(torch.float64).pow(2).sum()
            total += float(sq) * self.c ** (-2 * k)
        return total

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> None:
        """One balancing cycle over the hidden layers, in order (see the class doc;
        the last hidden layer only with ``balance_last_hidden``)."""
        for k in range(self.num_balanced):
            r2 = self._incoming_sq(k)
            o2 = self._outgoing_sq(k)
            ok = (r2 > 0) & (o2 > 0) & torch.isfinite(r2) & torch.isfinite(o2)
            s = torch.where(ok, (o2.sqrt() / (self.c * r2.sqrt())).sqrt(), torch.ones_like(r2))
            prev, nxt = self.layers[k], self.layers[k + 1]
            row = s.view((-1,) + (1,) * (prev.weight.dim() - 1))
            self._scale(prev.weight, row)
            if prev.bias is not None:
                self._scale(prev.bias, s)
            self._scale(nxt.weight, 1.0 / self._column_factor(k, s, nxt.weight))

    def _scale(self, p: Tensor, factor: Tensor) -> None:
        p.mul_(factor.to(p.dtype))
        if self.optimizer is None:
            return
        state = self.optimizer.state.get(p)
        if not state:
            return
        for key, value in state.items():
            if key in _STATE_IGNORED or value is None:
                continue
            if key not in _STATE_POWERS:
                raise ValueError(
                    f"ENorm: optimizer state '{key}' of {type(self.optimizer).__name__} has no "
                    "known rescaling rule (supported: "
                    f"{sorted(_STATE_POWERS)}); pass optimizer=None to leave the state alone"
                )
            if isinstance(value, Tensor) and value.shape == p.shape:
                value.mul_(factor.to(value.dtype).pow(_STATE_POWERS[key]))


def _acc(w: Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _out_units(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _check_between(chain, a: int, b: int, fn: str) -> bool:
    """Check the layers strictly between weight layers ``chain[a]`` and ``chain[b]``
    commute with positive per-channel scaling; True if one of them is a Flatten."""
    (pname, prev), (nname, _) = chain[a], chain[b]
    flattened = False
    for name, m in chain[a + 1 : b]:
        kind = type(m)
        if isinstance(m, _NORMS):
            raise ValueError(
                f"{fn}: layer '{name}' ({kind.__name__}) is a normalization layer between "
                f"'{pname}' and '{nname}': it would absorb the rescaling of '{pname}' "
                "and ENorm would change the function"
            )
        if kind in _HOMOGENEOUS:
            if isinstance(m, nn.PReLU) and m.num_parameters not in (1, _out_units(prev)):
                raise ValueError(f"{fn}: layer '{name}' (PReLU) has a parameter count "
                                 "that does not match its input channels")
            continue
        if kind in _POOLS:
            if getattr(m, "return_indices", False):
                raise ValueError(f"{fn}: layer '{name}' ({kind.__name__}) returns indices")
            if flattened or isinstance(prev, nn.Linear):
                raise ValueError(
                    f"{fn}: layer '{name}' ({kind.__name__}) pools a flattened / "
                    "Linear output, which mixes units"
                )
            continue
        if kind is nn.Flatten:
            if m.start_dim != 1 or m.end_dim != -1:
                raise ValueError(
                    f"{fn}: layer '{name}' is Flatten(start_dim={m.start_dim}, "
                    f"end_dim={m.end_dim}); only Flatten(1, -1) is supported"
                )
            if flattened:
                raise ValueError(f"{fn}: layer '{name}' is a second Flatten")
            flattened = True
            continue
        raise ValueError(
            f"{fn}: layer '{name}' ({kind.__name__}) between '{pname}' and '{nname}' is "
            "not known to commute with positive per-channel scaling (ENorm accepts "
            "ReLU, LeakyReLU, PReLU, Identity, Dropout, pooling, zero padding and "
            "one Flatten); the function could not be preserved"
        )
    return flattened


def _junction_block(prev_entry, next_entry, flattened: bool, fn: str) -> int:
    """How many inputs of the next layer each unit of the previous one feeds (1, or the
    positions a Flatten spreads a channel over), after checking the shapes meet."""
    (pname, prev), (nname, nxt) = prev_entry, next_entry
    units = _out_units(prev)
    if isinstance(nxt, nn.Linear):
        if isinstance(prev, nn.Linear):
            if nxt.in_features != units:
                raise ValueError(
                    f"{fn}: '{pname}' has {units} outputs but '{nname}' expects "
                    f"{nxt.in_features}"
                )
            return 1
        if not flattened:
            raise ValueError(
                f"{fn}: '{pname}' ({type(prev).__name__}) feeds the Linear '{nname}' "
                "without an nn.Flatten between them"
            )
        if nxt.in_features % units:
            raise ValueError(
                f"{fn}: '{nname}' has {nxt.in_features} inputs, not a multiple of "
                f"the {units} channels of '{pname}'"
            )
        return nxt.in_features // units
    if isinstance(prev, nn.Linear) or flattened:
        raise ValueError(
            f"{fn}: convolution '{nname}' follows '{pname}' "
            f"({type(prev).__name__}{' and a Flatten' if flattened else ''}); "
            "only conv->conv, conv->Flatten->Linear and Linear->Linear are supported"
        )
    if nxt.in_channels != units:
        raise ValueError(
            f"{fn}: '{pname}' has {units} output channels but '{nname}' expects "
            f"{nxt.in_channels}"
        )
    return 1
