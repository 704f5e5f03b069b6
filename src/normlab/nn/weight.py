r"""Weight Normalization (Salimans & Kingma, 2016) as a torch parametrization.

.. math::
    w = g \, \frac{v}{\lVert v \rVert}

with one norm, one ``g`` and one direction ``v`` per output unit: per row of a
``Linear`` weight ``(out, in)``, per output channel of a ``ConvNd`` weight
``(C_out, C_in / groups, *k)`` (the norm runs over ``C_in / groups * prod(k)``).

The reparametrization is registered with
:func:`torch.nn.utils.parametrize.register_parametrization`, so after
``weight_norm(layer)``:

* ``layer.weight`` is computed from ``g`` and ``v`` at every access;
* ``g`` is ``layer.parametrizations.weight.original0`` and ``v`` is
  ``layer.parametrizations.weight.original1``: the same state_dict keys as
  :func:`torch.nn.utils.parametrizations.weight_norm`, so checkpoints load in both
  directions;
* the module deep-copies and pickles (``torch.save(model)``, ``pickle.dumps``):
  torch's parametrized modules refuse plain pickling, normlab rebuilds the
  parametrization on unpickling.

Gradients (Salimans & Kingma, eq. 3): :math:`\nabla_g L = \nabla_w L \cdot v/\lVert v
\rVert` and :math:`\nabla_v L = (g / \lVert v \rVert)(I - w w^T / \lVert w \rVert^2)
\nabla_w L`, so :math:`v \cdot \nabla_v L = 0` and SGD can only grow ``||v||``.
Autograd differentiates the forward equation; no custom backward is involved.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvTransposeNd
from torch.nn.utils import parametrize

from normlab.stats import stat_dtype

__all__ = ["WeightNorm", "weight_norm", "remove_weight_norm"]


class WeightNorm(nn.Module):
    r"""The parametrization :math:`(g, v) \mapsto g\, v / \lVert v \rVert`.

    Args:
        dim: the dimension of ``v`` that indexes the units: one norm is taken over all
            other dimensions for each index along ``dim``. ``None`` takes one norm
            over the whole tensor (a single scalar ``g``). Negative values count
            from the end (unlike torch, where ``dim=-1`` means the whole tensor).

    ``right_inverse(w)`` returns ``(||w||, w)``: registering the parametrization
    leaves the weight, and so the function of the layer, unchanged.
    """

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise TypeError(f"WeightNorm: dim must be an int or None, got {dim!r}")
        self.dim = dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def norm(self, v: Tensor) -> Tensor:
        """``||v||`` per unit, shaped to broadcast against ``v`` (a scalar for dim=None)."""
        compute = stat_dtype(v.dtype)
        if self.dim is None:
            return torch.linalg.vector_norm(v, dtype=compute).to(v.dtype)
        dim = self.dim % v.dim()
        others = tuple(d for d in range(v.dim()) if d != dim)
        if not others:  # a 1-d tensor with one unit per entry
            return v.abs()
        return torch.linalg.vector_norm(v, dim=others, keepdim=True, dtype=compute).to(v.dtype)

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        return v * (g / self.norm(v))

    def right_inverse(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(g, v) = (||w||, w)``: the parameters that give back the weight ``w``."""
        return self.norm(w), w


def _layer_name(module: nn.Module) -> str:
    return type(module).__name__.removeprefix("Parametrized")


def weight_norm_list(module: nn.Module, name: str):
    """The ParametrizationList of ``module.name`` when its first entry is a WeightNorm."""
    if not parametrize.is_parametrized(module, name):
        return None
    plist = module.parametrizations[name]
    return plist if isinstance(plist[0], WeightNorm) else None


def output_unit_dim(module: nn.Module) -> int:
    """The weight dimension that indexes the output units: 1 for ``ConvTransposeNd``
    (weight ``(C_in, C_out / groups, *k)``), else 0."""
    return 1 if isinstance(module, _ConvTransposeNd) else 0


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    r"""Weight-normalize ``module.<name>``: :math:`w = g\, v / \lVert v \rVert`.

    Args:
        module: the layer (``nn.Linear``, ``nn.ConvNd``, ``nn.ConvTransposeNd`` or any
            module holding a tensor called ``name``). Changed in place and returned.
        name: the tensor to reparametrize (default ``"weight"``).
        dim: the dimension indexing the output units (default 0: rows of a Linear,
            output channels of a ConvNd). For ``ConvTransposeNd`` (weight
            ``(C_in, C_out / groups, *k)``) the output unit is dim 1: pass ``dim=1``
            (the default 0 is refused, since it would normalize per *input* channel,
            which is what ``torch.nn.utils.weight_norm`` silently does); grouped
            transposed convolutions have no single output-unit dimension and are
            refused. ``None``: one norm over the whole tensor.

    Initial values: ``v = w`` and ``g = ||w||`` per unit, so the layer computes
    exactly the same function as before (as in torch). Use
    :func:`normlab.init.data_dependent_init_` (Salimans & Kingma) or
    :func:`normlab.init.arpit_init_` (Arpit et al. 2019) to initialize ``g`` and ``v``.

    Parameters: ``module.parametrizations.<name>.original0`` is ``g`` (shape of
    ``w`` with 1 in every dimension but ``dim``), ``.original1`` is ``v``; the
    state_dict keys are those of ``torch.nn.utils.parametrizations.weight_norm``.

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or ``module.<name>`` is not a tensor.
        ValueError: ``dim`` out of range, the tensor is already parametrized, or a
            transposed convolution with ``dim=0`` / ``groups > 1``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"weight_norm: expected an nn.Module, got {type(module).__name__}")
    layer = _layer_name(module)
    if parametrize.is_parametrized(module, name):
        kind = "weight-normalized" if weight_norm_list(module, name) is not None else "parametrized"
        raise ValueError(f"weight_norm: {layer}.{name} is already {kind}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"weight_norm: {layer} has no tensor called '{name}' (got {type(weight).__name__})"
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight_norm: {layer}.{name} must be floating point, got {weight.dtype}")
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"weight_norm: dim must be an int or None, got {dim!r}")
        if not -weight.dim() <= dim < weight.dim():
            raise ValueError(
                f"weight_norm: dim={dim} is out of range for {layer}.{name} of shape "
                f"{tuple(weight.shape)}"
            )
        dim = dim % weight.dim()
    if isinstance(module, _ConvTransposeNd) and name == "weight" and dim is not None:
        if dim == 0:
            raise ValueError(
                f"weight_norm: {layer} stores its weight as (C_in, C_out / groups, *k), so its "
                "output units are dim 1; pass dim=1 (dim=0 would normalize per input channel)"
            )
        if dim == 1 and module.groups > 1:
            raise ValueError(
                f"weight_norm: {layer} has groups={module.groups}: its output channels are not "
                "one dimension of the weight, so per-output-unit normalization is not supported"
            )
    parametrize.register_parametrization(module, name, WeightNorm(dim))
    _make_picklable(module)
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Fold the weight normalization of ``module.<name>`` back into a plain parameter.

    The new plain ``module.<name>`` holds the current value ``g v / ||v||``, so the
    function is unchanged; ``g`` and ``v`` disappear. ``module`` is changed in place
    and returned (its class is the plain class again when nothing else is
    parametrized).

    Raises:
        ValueError: ``module.<name>`` is not weight-normalized by :func:`weight_norm`,
            or other parametrizations are chained on the same tensor.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"remove_weight_norm: expected an nn.Module, got {type(module).__name__}")
    plist = weight_norm_list(module, name)
    if plist is None:
        raise ValueError(
            f"remove_weight_norm: {_layer_name(module)}.{name} is not weight-normalized"
        )
    if len(plist) > 1:
        raise ValueError(
            f"remove_weight_norm: {_layer_name(module)}.{name} has {len(plist)} chained "
            "parametrizations; remove the others first"
        )
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module


# --------------------------------------------------------------------------- pickling
# torch gives every parametrized module a class created at run time whose
# ``__getstate__`` raises. normlab's weight-normalized modules pickle as
# (plain class, plain state, parametrizations) and are rebuilt with the public
# ``register_parametrization`` on loading, keeping the very same g and v Parameter
# objects (so an optimizer pickled alongside still refers to them).


def _iter_originals(plist) -> Iterator[tuple[str, Tensor]]:
    yield from plist._parameters.items()
    yield from plist._buffers.items()


def _reduce_parametrized(self: nn.Module, protocol: int):
    base = type(self).__bases__[0]
    state = self.__dict__.copy()
    modules = state["_modules"].copy()
    plists = modules.pop("parametrizations")
    state["_modules"] = modules
    return (_rebuild_parametrized, (base, state, plists))


def _rebuild_parametrized(base: type, state: dict, plists) -> nn.Module:
    obj = base.__new__(base)
    obj.__dict__.update(state)
    for name, plist in plists.items():
        with torch.no_grad():
            value = plist()
        originals = dict(_iter_originals(plist))
        if any(isinstance(t, nn.Parameter) for t in originals.values()):
            obj._parameters[name] = nn.Parameter(value.detach().clone())
        else:
            obj._buffers[name] = value.detach().clone()
        for p in plist:
            parametrize.register_parametrization(obj, name, p, unsafe=plist.unsafe)
        new = obj.parametrizations[name]
        for key, tensor in originals.items():
            if key in new._parameters:
                new._parameters[key] = tensor
            else:
                new._buffers[key] = tensor
    _make_picklable(obj)
    return obj


def _reset_parametrized(self: nn.Module) -> None:
    """The plain layer's ``reset_parameters``, kept through the parametrization.

    ``nn.Linear.reset_parameters`` (and ConvNd's) initialises ``self.weight`` in place,
    but on a parametrized module that tensor is recomputed from ``g`` and ``v`` at every
    access, so the initialisation would be silently lost (e.g. after ``to_empty()``
    from the meta device). It runs on the cached weight, which is then assigned back
    through ``right_inverse``: ``v = w``, ``g = ||w||``, as when ``weight_norm`` is applied.
    """
    with parametrize.cached():
        type(self).__bases__[0].reset_parameters(self)
        values = {name: getattr(self, name).detach().clone() for name in self.parametrizations}
    with torch.no_grad():
        for name, value in values.items():
            setattr(self, name, value)


def _make_picklable(module: nn.Module) -> None:
    cls = type(module)
    if cls.__dict__.get("__reduce_ex__") is not _reduce_parametrized:
        cls.__reduce_ex__ = _reduce_parametrized
    if callable(getattr(cls.__bases__[0], "reset_parameters", None)):
        cls.reset_parameters = _reset_parametrized
