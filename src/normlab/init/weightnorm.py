r"""Initializations for weight-normalized networks.

* :func:`data_dependent_init_`: Salimans & Kingma (2016), section 3: on an init batch,
  layer by layer in forward order, every weight-normalized unit's pre-activation gets
  mean 0 and standard deviation 1.
* :func:`arpit_init_`: Arpit, Campos & Bengio (2019), "How to initialize your network?
  Robust initialization for WeightNorm & ResNets": orthogonal ``v``, zero bias and
  ``g = sqrt(gain * fan_in / fan_out)``, with the residual-network gains.
* :func:`arpit_warmup`: the same paper's quadratic learning-rate warm-up.

All of them act on layers weight-normalized by :func:`normlab.nn.weight_norm`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.optim.lr_scheduler import LRScheduler

from normlab.nn.weight import output_unit_dim, weight_norm_list
from normlab.stats import moments

__all__ = [
    "ARPIT_ROLE_GAINS",
    "ArpitWarmup",
    "arpit_init_",
    "arpit_warmup",
    "data_dependent_init_",
]


def _wn_layers(model: nn.Module, fn: str) -> list[tuple[str, nn.Module]]:
    """Every (qualified name, module) whose ``weight`` is normlab-weight-normalized."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    layers = []
    for name, module in model.named_modules():
        plist = weight_norm_list(module, "weight")
        if plist is None:
            continue
        label = name or type(module).__name__.removeprefix("Parametrized")
        if not isinstance(module, (nn.Linear, _ConvNd)):
            raise ValueError(
                f"{fn}: layer '{label}' ({type(module).__name__}) is weight-normalized but is "
                "not a Linear or convolution layer"
            )
        unit_dim = output_unit_dim(module)
        if plist[0].dim != unit_dim:
            raise ValueError(
                f"{fn}: layer '{label}' is weight-normalized over dim={plist[0].dim}, but its "
                f"output units are dim {unit_dim} of the weight; per-unit initialization needs "
                f"weight_norm(layer, dim={unit_dim})"
            )
        layers.append((label, module))
    if not layers:
        raise ValueError(
            f"{fn}: the model has no layer weight-normalized by normlab.nn.weight_norm"
        )
    return layers


def _g_v(module: nn.Module) -> tuple[Tensor, Tensor]:
    plist = module.parametrizations.weight
    return plist.original0, plist.original1


# ------------------------------------------------------------- data-dependent init


def _call(model: nn.Module, batch):
    """``model(batch)``: a dict gives keyword arguments, a tuple/list positional ones."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _init_from_output(module: nn.Module, label: str, output, eps: float,
                      init_scale: float = 1.0) -> Tensor:
    """Set ``g`` and the bias of ``module`` from its ``output`` on the init batch (see
    :func:`data_dependent_init_`) and return that output normalized."""
    if not isinstance(output, Tensor):
        raise TypeError(
            f"data_dependent_init_: layer '{label}' returned {type(output).__name__}, "
            "expected a tensor"
        )
    weight_dims = module.parametrizations.weight.original1.dim()
    unbatched = output.dim() == weight_dims - 1
    channel = output.dim() - 1 if isinstance(module, nn.Linear) else int(not unbatched)
    others = [d for d in range(output.dim()) if d != channel]
    if not others:
        raise ValueError(
            f"data_dependent_init_: layer '{label}' output of shape "
            f"{tuple(output.shape)} has a single sample per unit"
        )
    mean, var, _ = moments(output, others, keepdim=False)
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        raise ValueError(
            f"data_dependent_init_: layer '{label}' produced non-finite statistics "
            "on the init batch (NaN or inf in its output)"
        )
    dead = var <= eps
    if bool(dead.any()):
        warnings.warn(
            f"data_dependent_init_: layer '{label}' has {int(dead.sum())} unit(s) "
            f"with variance <= {eps:g} on the init batch; only their mean was set",
            stacklevel=3,
        )
    # The divisor sigma / s; 1 for dead units, whose g is kept.
    sigma = torch.where(dead, torch.ones_like(var), var.sqrt() / init_scale)
    g, _ = _g_v(module)
    g.mul_((1.0 / sigma).to(g.dtype).view(g.shape))
    shape = [1] * output.dim()
    shape[channel] = -1
    if module.bias is not None:
        module.bias.sub_(mean.to(module.bias.dtype)).div_(sigma.to(module.bias.dtype))
        centred = output - mean.to(output.dtype).view(shape)
    else:
        centred = output
    return centred / sigma.to(output.dtype).view(shape)


def _check_init_scale(init_scale) -> None:
    if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) \
            or not 0 < init_scale < float("inf"):
        raise ValueError(f"data_dependent_init_: init_scale must be a positive number, got "
                         f"{init_scale!r}")


def data_dependent_init_(model: nn.Module, batch, eps: float = 1e-12,
                         init_scale: float = 1.0) -> nn.Module:
    r"""Data-dependent initialization of weight normalization (Salimans & Kingma 2016).

    For every weight-normalized layer, in the order the forward pass reaches them,
    with :math:`y = g\, v \cdot x / \lVert v \rVert + b` the layer's output (its
    pre-activation) on the init batch and :math:`\mu, \sigma` its per-unit mean and
    (biased) standard deviation over the batch and all positions (spatial, time):

    .. math::
        g \leftarrow g\, s / \sigma, \qquad b \leftarrow (b - \mu)\, s / \sigma

    (:math:`s` = ``init_scale``): the pre-activation gets mean 0, std :math:`s`. From
    ``g = 1, b = 0`` this is the paper's rule, with the official code's ``init_scale``;
    it is exact from any ``g, b``. ``v`` is not re-drawn (only its direction matters).
    The official code divides by :math:`\sqrt{\sigma^2 + 10^{-10}}`: a relative
    difference of :math:`5 \cdot 10^{-11} / \sigma^2`.

    How: one forward pass of ``model`` on ``batch`` under ``torch.no_grad()``, with a
    forward hook on every weight-normalized layer. The hook, on the layer's first
    call, measures ``y`` (via :func:`normlab.stats.moments`), rescales ``g`` and
    ``b`` in place and returns the normalized output, so every later layer already
    sees the initialized earlier ones. A layer called again in the same pass
    (weight sharing) is not re-initialized; a layer not called at all is left
    unchanged with a warning. The model runs in its current mode (call ``.eval()``
    first to keep dropout out of the statistics; BatchNorm layers in training mode
    update their running statistics). Layers without bias: only the scale is set; the
    mean is **not** corrected, since there is no bias to absorb it.

    Units with variance ``<= eps`` (dead units) only get their mean corrected; ``g``
    is kept and a warning names the layer (the NaN weights of openai/weightnorm #4).

    Args:
        model: a model containing layers weight-normalized by
            :func:`normlab.nn.weight_norm` (Linear: units on the last axis of the
            output; convolutions: on axis 1, or axis 0 for unbatched input).
        batch: the init batch: a tensor (``model(batch)``), a tuple/list of
            positional arguments or a dict of keyword arguments.
        eps: variance threshold for dead units.
        init_scale: :math:`s` > 0, the std of every initialized pre-activation.
            Default: 1.0 (the official code's default).

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: ``model`` is not a module, or a layer's output is not a tensor.
        ValueError: no weight-normalized layer, a layer normalized over another dim than
            its output units, non-finite statistics (the layer is named), bad init_scale.
    """
    _check_init_scale(init_scale)
    layers = _wn_layers(model, "data_dependent_init_")
    done: set[int] = set()

    def make_hook(label: str):
        def hook(module: nn.Module, args, output):
            if id(module) in done:
                return None
            done.add(id(module))
            return _init_from_output(module, label, output, eps, init_scale)

        return hook

    handles = [m.register_forward_hook(make_hook(label)) for label, m in layers]
    try:
        with torch.no_grad():
            _call(model, batch)
    finally:
        for h in handles:
            h.remove()
    missed = [label for label, m in layers if id(m) not in done]
    if missed:
        warnings.warn(
            f"data_dependent_init_: weight-normalized layer(s) {missed} were not called in the "
            "forward pass and were left unchanged",
            stacklevel=2,
        )
    return model


# ---------------------------------------------------------------- Arpit et al. init

#: Gain factors of :func:`arpit_init_` by role (``g = sqrt(gain * fan_in / fan_out)``).
ARPIT_ROLE_GAINS: dict[str, float] = {"relu": 2.0, "linear": 1.0}


def _fans(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _role_gain(label: str, module: nn.Module, blocks_per_stage: int | None) -> float:
    """The gain of a layer from its ``arpit_role`` (default "relu"): the table
    :data:`ARPIT_ROLE_GAINS`, or 1/N for a "residual" layer of a stage of N blocks."""
    role = getattr(module, "arpit_role", "relu")
    if role == "residual":
        n = getattr(module, "arpit_blocks_per_stage", blocks_per_stage)
        if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(
                f"arpit_init_: layer '{label}' is marked 'residual' but the number of "
                f"blocks per stage is {n!r}; pass blocks_per_stage=N or set "
                "module.arpit_blocks_per_stage"
            )
        return 1.0 / n
    if role in ARPIT_ROLE_GAINS:
        return ARPIT_ROLE_GAINS[role]
    raise ValueError(
        f"arpit_init_: layer '{label}' has arpit_role={role!r}; expected one of "
        f"{sorted([*ARPIT_ROLE_GAINS, 'residual'])}"
    )


def arpit_init_(
    model: nn.Module,
    *,
    blocks_per_stage: int | None = None,
    gains: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    r"""The weight-normalization initialization of Arpit, Campos & Bengio (2019).

    For every layer weight-normalized by :func:`normlab.nn.weight_norm`:

    .. math::
        v \leftarrow \text{orthogonal}, \qquad b \leftarrow 0, \qquad
        g \leftarrow \sqrt{\text{gain} \cdot \text{fan\_in} / \text{fan\_out}}

    with fan_in / fan_out the input / output features (``C_in / C_out`` for a
    convolution: the kernel size cancels). This keeps the norm of the forward signal
    (``||W h|| ≈ sqrt(gain) ||h||`` per position for a layer with unit-norm rows of an
    orthogonal matrix). For grouped convolutions ``C_in`` is the full input channel
    count (the norm-preserving choice; torch's ``fan_in`` would be ``C_in/groups``).

    The gain of each layer comes from its role:

    * ``"relu"`` (the default for an unmarked layer): gain 2, a layer whose output goes
      through a ReLU, which halves the squared norm. Plain nets (the paper's
      ``proposed_orthogonal``) use it for every hidden layer; so does ``conv1`` of a
      residual block.
    * ``"linear"``: gain 1, a layer whose output is not rectified: the ResNet stem
      (no ReLU after it), the 1x1 projection shortcut, a weight-normalized classifier.
    * ``"residual"``: gain ``1/N``, the last layer of a residual branch
      (``out = x + conv2(relu(conv1(x)))``: ``conv2``), where ``N`` is the number of
      residual blocks *per stage* (the projection shortcut restarts the sum at each
      stage, so the variance grows at most by ``(1 + 1/N)^N < e`` per stage).

    A layer's role is read from the attribute ``module.arpit_role`` (set it when
    building the model, e.g. ``block.conv2.arpit_role = "residual"``); ``N`` from
    ``module.arpit_blocks_per_stage`` if present, else from ``blocks_per_stage``. The
    ``gains`` mapping (qualified module name -> gain) overrides everything.

    Layers that are not weight-normalized (the paper's classifier is a plain
    ``Linear``) are left unchanged.

    Args:
        model: the model, changed in place and returned.
        blocks_per_stage: ``N`` for layers marked ``"residual"``.
        gains: optional ``{qualified name: gain}`` overrides.
        generator: optional random generator for the orthogonal ``v``.

    Raises:
        ValueError: no weight-normalized layer, an unknown role, a ``"residual"`` layer
            without ``N``, a non-positive gain, or a ``gains`` key naming no
            weight-normalized layer.
    """
    layers = _wn_layers(model, "arpit_init_")
    gains = dict(gains or {})
    names = {label for label, _ in layers}
    unknown = sorted(set(gains) - names)
    if unknown:
        raise ValueError(
            f"arpit_init_: gains names {unknown}, which are not weight-normalized layers of "
            f"the model ({sorted(names)})"
        )
    if blocks_per_stage is not None and (
        isinstance(blocks_per_stage, bool)
        or not isinstance(blocks_per_stage, int)
        or blocks_per_stage < 1
    ):
        raise ValueError(
            f"arpit_init_: blocks_per_stage must be a positive int, got {blocks_per_stage!r}"
        )
    # Every gain first, so that a bad one raises before any layer is changed.
    layer_gains = [(module, _layer_gain(label, module, gains, blocks_per_stage))
                   for label, module in layers]
    for module, gain in layer_gains:
        _orthogonal_init_(module, gain, generator)
    return model


def _layer_gain(label: str, module: nn.Module, gains: Mapping[str, float],
                blocks_per_stage: int | None) -> float:
    gain = float(gains[label]) if label in gains else _role_gain(label, module,
                                                                  blocks_per_stage)
    if not (gain > 0 and math.isfinite(gain)):
        raise ValueError(f"arpit_init_: layer '{label}' gain must be positive, got {gain}")
    return gain


def _orthogonal_init_(module: nn.Module, gain: float, generator) -> None:
    """``v`` orthogonal, ``g = sqrt(gain fan_in / fan_out)``, bias 0 (see arpit_init_)."""
    fan_in, fan_out = _fans(module)
    g, v = _g_v(module)
    unit = output_unit_dim(module)
    moved = v.movedim(unit, 0)
    q = torch.empty(moved.shape[0], moved[0].numel(), dtype=torch.float64)
    nn.init.orthogonal_(q, generator=generator)
    with torch.no_grad():
        v.copy_(q.view(moved.shape).movedim(0, unit).to(v.dtype))
        g.fill_(math.sqrt(gain * fan_in / fan_out))
        if module.bias is not None:
            module.bias.zero_()


# ------------------------------------------------------------------------ warm-up


class ArpitWarmup(LRScheduler):
    r"""Quadratic learning-rate warm-up of Arpit, Campos & Bengio (2019).

    .. math::
        \text{lr}_t = \text{lr}_0 + \alpha_t^2 (\text{lr} - \text{lr}_0), \qquad
        \alpha_t = \min(1, t / T)

    per parameter group, where ``lr`` is the group's base learning rate, ``T`` is
    ``warmup_steps`` and ``t`` counts :meth:`step` calls (call it once per iteration,
    after ``optimizer.step()``). Iteration 0 runs at ``lr0`` (with the default
    ``lr0 = 0`` its update is zero, as in the paper's schedule), iteration ``T`` and
    later at ``lr``. ``warmup_steps = 0`` means no warm-up. The rate is computed from
    the base rates (closed form), so it does not compose multiplicatively with another
    scheduler stepping the same optimizer; use :class:`torch.optim.lr_scheduler.SequentialLR`
    to follow it with a decay.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        lr0: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(
                f"ArpitWarmup: warmup_steps must be a non-negative int, got {warmup_steps!r}"
            )
        lr0 = float(lr0)
        if not (math.isfinite(lr0) and lr0 >= 0):
            raise ValueError(f"ArpitWarmup: lr0 must be a finite non-negative float, got {lr0}")
        self.warmup_steps = warmup_steps
        self.lr0 = lr0
        super().__init__(optimizer, last_epoch)

    def alpha(self, t: int | None = None) -> float:
        """``alpha_t = min(1, t / warmup_steps)`` (1 when there is no warm-up)."""
        t = self.last_epoch if t is None else t
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, max(t, 0) / self.warmup_steps)

    def get_lr(self) -> list[float]:
        a2 = self.alpha() ** 2
        return [self.lr0 + a2 * (base - self.lr0) for base in self.base_lrs]

    _get_closed_form_lr = get_lr


def arpit_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, lr0: float = 0.0
) -> ArpitWarmup:
    r"""The warm-up of Arpit et al. (2019): ``lr_t = lr0 + alpha_t^2 (lr - lr0)``.

    ``alpha_t = min(1, t / warmup_steps)`` rises linearly from 0 to 1 over
    ``warmup_steps`` iterations (a quadratic ramp of the rate). Returns an
    :class:`ArpitWarmup` (a torch ``LRScheduler``); call ``.step()`` after every
    ``optimizer.step()``.
    """
    return ArpitWarmup(optimizer, warmup_steps, lr0)
