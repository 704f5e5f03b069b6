"""Putting normalization layers into existing models.

* :func:`swap_norm` replaces every normalization layer of a model (torch.nn's,
  torchvision's frozen BN, normlab's) by one chosen by name.
* :func:`freeze_batchnorm` / :func:`unfreeze_batchnorm` make batch-norm layers use
  and keep their running statistics while the rest of the model trains.
* :func:`fold_batchnorm` folds eval-mode batch norms into the Conv or Linear layer
  before them, for inference.
* :func:`to_sync_batchnorm` (from :mod:`normlab.nn.sync`) makes batch statistics
  global across the ranks of a process group, on any torch.distributed backend.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from normlab import nn as nlnn
from normlab.nn.sync import to_sync_batchnorm
from normlab.registry import create_norm, get_norm_spec

__all__ = [
    "Replacement",
    "is_norm_layer",
    "swap_norm",
    "freeze_batchnorm",
    "unfreeze_batchnorm",
    "is_frozen",
    "fold_batchnorm",
    "to_sync_batchnorm",
]

log = logging.getLogger("normlab.convert")

_LAST_DIM_NORMS: tuple[type, ...] = (nn.LayerNorm,) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def _is_last_dim(module: nn.Module) -> bool:
    """torch's LayerNorm/RMSNorm (and subclasses), and normlab's with layout="last".
    Not subclasses named ...2d/...3d, such as timm's LayerNorm2d: they move the
    channels of (N, C, H, W) input last and back, so they are channel-first norms."""
    if isinstance(module, _LAST_DIM_NORMS):
        return not type(module).__name__.lower().endswith(("2d", "3d"))
    return getattr(module, "layout", None) == "last"


@dataclass(frozen=True)
class Replacement:
    """One layer :func:`swap_norm` replaced (or skipped: ``new`` is None)."""

    path: str
    old: str
    new: str | None
    note: str = ""

    def __str__(self) -> str:
        where = self.path or "<root>"
        if self.new is None:
            return f"{where}: kept {self.old} ({self.note})"
        return f"{where}: {self.old} -> {self.new}" + (f" ({self.note})" if self.note else "")


def _is_frozen_bn(module: nn.Module) -> bool:
    # torchvision.ops.FrozenBatchNorm2d, without importing torchvision.
    return type(module).__name__.startswith("FrozenBatchNorm") and hasattr(module, "running_var")


def is_norm_layer(module: nn.Module) -> bool:
    """True for the normalization layers :func:`swap_norm` knows: torch.nn's batch,
    instance, group, layer and RMS norms, torchvision's FrozenBatchNorm2d, and every
    normlab layer derived from :class:`normlab.nn.NormBase`."""
    return isinstance(
        module, (_NormBase, nn.GroupNorm, nlnn.NormBase) + _LAST_DIM_NORMS
    ) or _is_frozen_bn(module)


def num_channels_of(module: nn.Module) -> int | None:
    """The channel count of a normalization layer (normlab's, torch.nn's batch, instance,
    group and one-dimension layer norms, frozen batch norms), or None if it has none."""
    if isinstance(module, nlnn.NormBase):
        shape = getattr(module, "normalized_shape", (module.num_channels,))
        return module.num_channels if len(shape) == 1 else None
    if isinstance(module, _NormBase):
        return module.num_features or None  # 0 for an uninitialised lazy layer
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, _LAST_DIM_NORMS):
        shape = module.normalized_shape
        return shape[0] if len(shape) == 1 else None
    if _is_frozen_bn(module):
        return module.weight.shape[0]
    return None


def _uses_batch_stats(module: nn.Module) -> bool:
    """Batch-statistics layers whose running statistics mean the same thing."""
    return (
        isinstance(module, (_BatchNorm, nlnn.BatchNorm, nlnn.BatchRenorm))
        or _is_frozen_bn(module)
        or getattr(module, "_normlab_batch_statistics", False)
    )


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t is not None and t.is_floating_point():
            return t
    return None


def _copy_state(old: nn.Module, new: nn.Module, channels: int | tuple[int, ...]) -> list[str]:
    """Copy what means the same in both layers; return what was copied. ``channels``:
    the affine's shape, or its length."""
    copied = []
    shape = channels if isinstance(channels, tuple) else (channels,)
    with torch.no_grad():
        for name in ("weight", "bias"):
            src, dst = getattr(old, name, None), getattr(new, name, None)
            if (
                isinstance(src, torch.Tensor)
                and isinstance(dst, nn.Parameter)
                and src.shape == dst.shape == shape
            ):
                dst.copy_(src)
                dst.requires_grad_(src.requires_grad)
                copied.append(name)
        if _uses_batch_stats(old) and _uses_batch_stats(new):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(old, name, None), getattr(new, name, None)
                if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                    dst.copy_(src.reshape(dst.shape))
                    copied.append(name)
    return copied


def _last_dim_arguments(name, old: nn.Module, kwargs: dict) -> dict | None:
    """The arguments that rebuild torch's last-dimension norm ``old`` as normlab's
    LayerNorm or RMSNorm with ``layout="last"`` (its normalized_shape, eps and affine;
    ``kwargs`` win), or None where ``name`` is neither."""
    if not isinstance(name, str) or get_norm_spec(name).name not in ("layer", "rms"):
        return None
    affine = getattr(old, "elementwise_affine", getattr(old, "affine", True))
    arguments = {"layout": "last", "eps": old.eps, "affine": affine}
    if isinstance(old, (nn.LayerNorm, nlnn.LayerNorm)) and get_norm_spec(name).name == "layer":
        arguments["bias"] = old.bias is not None
    return {**arguments, **kwargs}


def _norm_act_hook(module: nn.Module, args, output):
    return module.act(module.drop(output))


def _carry_norm_act(old: nn.Module, new: nn.Module) -> bool:
    """Give ``new`` the ``drop`` and ``act`` modules of a norm-activation layer such as
    timm's BatchNormAct2d (forward: norm, then drop, then act), applied after it by a
    forward hook, so that swapping the norm keeps the activation. True if it did."""
    drop, act = getattr(old, "drop", None), getattr(old, "act", None)
    if not (isinstance(drop, nn.Module) and isinstance(act, nn.Module)) or new is old:
        return False
    new.add_module("drop", drop)
    new.add_module("act", act)
    new.register_forward_hook(_norm_act_hook)
    return True


def swap_norm(
    model: nn.Module,
    name,
    *,
    include_layer_norm: bool = False,
    **kwargs,
) -> tuple[nn.Module, list[Replacement]]:
    """Replace every normalization layer of ``model`` by the norm called ``name``.

    Each new layer is built with :func:`normlab.create_norm` over the old layer's
    channel count and ``kwargs``, moved to the old layer's device and dtype and put
    in its train/eval mode. The per-channel affine (``weight``, ``bias``, with their
    ``requires_grad``) is copied when both layers have one; running statistics are
    copied between batch-statistics layers (torch's or normlab's BatchNorm, Batch
    Renorm, SyncBatchNorm), where they mean the same thing. For GroupNorm without
    ``num_groups``, each layer gets :func:`normlab.nn.choose_num_groups` of its
    channel count (32 groups at most, 2 channels a group at least: 48 channels get
    24 groups), and the summary says what it chose.

    ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` normalize the *last* dimensions
    (``(N, L, C)``). ``"layer"`` or ``"rms"`` makes them normlab's with
    ``layout="last"`` and the same ``normalized_shape``, eps, affine and bias (a ViT
    keeps its function); other norms are channel-first, so they are kept unless
    ``include_layer_norm=True`` (right for MLPs on ``(N, C)``). A norm-activation layer
    (timm's ``BatchNormAct2d``: ``drop`` and ``act`` after the norm) hands both to its
    replacement, which applies them after itself (a forward hook).

    The model is changed in place (a layer shared by several parents is replaced by
    one shared new layer) and returned with the list of :class:`Replacement`; each
    is also logged on the ``normlab.convert`` logger.

    Example::

        model, replaced = normlab.convert.swap_norm(torchvision_resnet18, "gn")
        for r in replaced: print(r)

    Raises:
        ValueError: unknown name, or a layer the new norm cannot be built for (the
            message names the layer's path).
    """
    if isinstance(name, str):
        get_norm_spec(name)  # fail early, listing the known names
    replacements: list[Replacement] = []
    memo: dict[int, nn.Module] = {}

    def build(path: str, old: nn.Module) -> nn.Module | None:
        if id(old) in memo:
            return memo[id(old)]
        new, replacement = _replacement(path, old, name, kwargs, include_layer_norm)
        replacements.append(replacement)
        if new is not None:
            memo[id(old)] = new
        return new

    # Build every new layer before replacing any, so that an error leaves the model
    # as it was rather than half converted.
    planned: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in list(module.named_children()):
            path = f"{prefix}.{child_name}" if prefix else child_name
            if is_norm_layer(child):
                new = build(path, child)
                if new is not None:
                    planned.append((module, child_name, new))
            else:
                visit(child, path)

    if is_norm_layer(model):
        new_root = build("", model)
        model = model if new_root is None else new_root
    else:
        visit(model, "")
        for parent, child_name, new in planned:
            setattr(parent, child_name, new)
    for r in replacements:
        log.info("swap_norm: %s", r)
    return model, replacements


def _replacement(path: str, old: nn.Module, name, kwargs: dict, include_layer_norm: bool
                 ) -> tuple[nn.Module | None, Replacement]:
    """The new layer for ``old`` (None where it is kept) and the record saying so."""
    old_desc = _describe(old)
    channels = num_channels_of(old)
    last = _last_dim_arguments(name, old, kwargs) if _is_last_dim(old) else None
    if last is not None:
        channels = tuple(old.normalized_shape)
    if channels is None:
        return None, Replacement(path, old_desc, None, "channel count unknown")
    if _is_last_dim(old) and last is None and not include_layer_norm:
        return None, Replacement(
            path, old_desc, None,
            "normalizes the last dimension; pass include_layer_norm=True to swap it")
    layer_kwargs = dict(kwargs) if last is None else last
    note = ""
    is_group = isinstance(name, str) and get_norm_spec(name).name == "group"
    if is_group and "num_groups" not in layer_kwargs:
        groups = nlnn.choose_num_groups(channels)
        layer_kwargs["num_groups"] = groups
        note = f"num_groups={groups} chosen for {channels} channels"
    try:
        new = create_norm(name, channels, **layer_kwargs)
    except (ValueError, TypeError) as err:
        raise ValueError(f"swap_norm: cannot replace {path or '<root>'} ({old_desc}): {err}") \
            from err
    ref = _first_tensor(old)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.train(old.training)
    copied = _copy_state(old, new, channels)
    if copied:
        note = "; ".join(filter(None, [note, "copied " + ", ".join(copied)]))
    if _carry_norm_act(old, new):
        note = "; ".join(filter(None, [note, "kept its drop and act"]))
    return new, Replacement(path, old_desc, _describe(new), note)


def _describe(module: nn.Module) -> str:
    extra = module.extra_repr()
    return f"{type(module).__name__}({extra})" if extra else type(module).__name__


# --- freezing batch norm -----------------------------------------------------------


def _frozen_pre_hook(module: nn.Module, args):
    module.__dict__["_normlab_saved_training"] = module.training
    module.training = False


def _frozen_post_hook(module: nn.Module, args, output):
    saved = module.__dict__.pop("_normlab_saved_training", None)
    if saved is not None:
        module.training = saved


def _is_batch_stat_layer(module: nn.Module) -> bool:
    return _uses_batch_stats(module) and getattr(module, "running_mean", None) is not None


def is_frozen(module: nn.Module) -> bool:
    """True if :func:`freeze_batchnorm` froze this layer."""
    return any(h is _frozen_pre_hook for h in module._forward_pre_hooks.values())


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Make every batch-norm layer of ``model`` normalize with its running statistics
    and stop updating them, whatever the model's train/eval mode.

    The rest of the model keeps training (dropout stays active, other layers see
    ``training=True``), and a later ``model.train()`` does not undo the freeze
    (pytorch issue #86590). Works on torch.nn's BatchNorm1d/2d/3d and SyncBatchNorm
    and on normlab's batch-statistics layers that keep running statistics. The
    affine parameters still train; call ``requires_grad_(False)`` on them to freeze
    those too. Undo with :func:`unfreeze_batchnorm`. Returns ``model``.

    Implementation: a forward pre-hook sets the layer's ``training`` flag to False
    for the duration of its forward and a forward hook restores it, so the layer's
    own eval code path runs; hooks survive ``deepcopy``, pickling and ``state_dict``.
    """
    count = 0
    for module in model.modules():
        if _is_batch_stat_layer(module) and not is_frozen(module):
            module.register_forward_pre_hook(_frozen_pre_hook)
            module.register_forward_hook(_frozen_post_hook, always_call=True)
            count += 1
    log.info("freeze_batchnorm: froze %d batch-norm layers", count)
    return model


def unfreeze_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_batchnorm`: batch-norm layers follow train()/eval() again."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if h in (_frozen_pre_hook, _frozen_post_hook)]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
    return model


# --- folding batch norm into the layer before it -------------------------------------

_FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _foldable_norm(module: nn.Module) -> bool:
    if isinstance(module, (_BatchNorm, nlnn.BatchNorm, nlnn.BatchRenorm)):
        return module.running_mean is not None and module.running_var is not None
    return _is_frozen_bn(module)


def _fold_into(layer: nn.Module, norm: nn.Module) -> None:
    """Fold eval-mode ``norm`` into ``layer`` in place, computing in float64."""
    with torch.no_grad():
        weight = layer.weight.double()
        out_channels = weight.shape[0]
        scale = torch.rsqrt(norm.running_var.double() + norm.eps)
        shift = -norm.running_mean.double() * scale
        if getattr(norm, "weight", None) is not None:
            scale = scale * norm.weight.double()
            shift = shift * norm.weight.double()
        if getattr(norm, "bias", None) is not None:
            shift = shift + norm.bias.double()
        bias = layer.bias.double() if layer.bias is not None else weight.new_zeros(out_channels)
        new_weight = weight * scale.view((-1,) + (1,) * (weight.dim() - 1))
        new_bias = bias * scale + shift
        layer.weight.copy_(new_weight.to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
        else:
            layer.bias.copy_(new_bias.to(layer.bias.dtype))


def _check_fold_pair(layer: nn.Module, norm: nn.Module) -> bool:
    return (
        isinstance(layer, _FOLDABLE_LAYERS)
        and _foldable_norm(norm)
        and layer.weight.shape[0] == norm.running_mean.shape[0]
    )


def _fold_traced(graph_module) -> tuple[nn.Module, list[str]]:
    import torch.fx

    modules = dict(graph_module.named_modules())
    folded = []
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or not _foldable_norm(modules[node.target]):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        prev = node.args[0]
        if not isinstance(prev, torch.fx.Node) or prev.op != "call_module":
            continue
        if len(prev.users) != 1 or not _check_fold_pair(modules[prev.target], modules[node.target]):
            continue
        _fold_into(modules[prev.target], modules[node.target])
        node.replace_all_uses_with(prev)
        graph_module.graph.erase_node(node)
        folded.append(f"{node.target} -> {prev.target}")
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module, folded


def _fold_sequential(model: nn.Module) -> tuple[nn.Module, list[str]]:
    folded = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:], strict=False):
            layer, norm = parent._modules[first], parent._modules[second]
            if _check_fold_pair(layer, norm):
                _fold_into(layer, norm)
                parent._modules[second] = nn.Identity()
                prefix = f"{parent_name}." if parent_name else ""
                folded.append(f"{prefix}{second} -> {prefix}{first}")
    return model, folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return an inference copy of ``model`` with every batch norm that directly
    follows a Conv1d/2d/3d or Linear folded into that layer.

    For a layer :math:`z = Wx + b` followed by eval-mode batch norm,

    .. math::
        W' = W \\cdot \\frac{\\gamma}{\\sqrt{\\hat\\sigma^2 + \\epsilon}}, \\qquad
        b' = (b - \\hat\\mu)\\frac{\\gamma}{\\sqrt{\\hat\\sigma^2 + \\epsilon}} + \\beta

    per output channel, computed in float64. The model is traced with torch.fx, so a
    norm is folded only when its sole input is the layer's output and nothing else
    uses that output; a model fx cannot trace falls back to folding adjacent
    ``(layer, norm)`` pairs inside ``nn.Sequential`` containers. Linear -> norm pairs
    assume 2-D activations ``(N, C)``. The original model is not modified. The
    result's outputs equal the eval-mode model's to float32 rounding.

    Raises:
        ValueError: if ``model`` or any of its batch-norm layers is in training mode
            (folding uses running statistics, which training mode would not).
    """
    training = [n for n, m in model.named_modules() if m.training and _foldable_norm(m)]
    if model.training or training:
        which = f" (batch-norm layers in training mode: {training[:5]})" if training else ""
        raise ValueError(
            "fold_batchnorm: the model is in training mode" + which +
            "; folding uses running statistics, call model.eval() first"
        )
    import torch.fx

    model = copy.deepcopy(model)
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure falls back
        log.info("fold_batchnorm: torch.fx could not trace the model (%s); "
                 "folding within nn.Sequential", err)
        traced = None
    if traced is not None:
        folded_model, folded = _fold_traced(traced)
        how = "torch.fx"
    else:
        folded_model, folded = _fold_sequential(model)
        how = "nn.Sequential"
    folded_model.eval()
    log.info("fold_batchnorm (%s): folded %d: %s", how, len(folded), ", ".join(folded))
    return folded_model
