"""Choosing a normalization layer by name: :func:`create_norm` and :func:`list_norms`.

Names are matched case-insensitively, with ``-`` and spaces read as ``_``, so
``"BN"``, ``"batch-norm"`` and ``"batchnorm2d"`` all find BatchNorm. Later layers
register themselves here with :func:`register_norm`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from normlab import nn as nlnn

__all__ = ["NormSpec", "register_norm", "create_norm", "list_norms", "get_norm_spec"]


@dataclass(frozen=True)
class NormSpec:
    """A registered normalization: its canonical name, how to build it, its aliases."""

    name: str
    factory: Callable[..., nn.Module]
    aliases: tuple[str, ...] = ()
    description: str = ""
    kind: str = field(default="activation")


_SPECS: dict[str, NormSpec] = {}
_LOOKUP: dict[str, str] = {}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def register_norm(
    name: str,
    factory: Callable[..., nn.Module],
    aliases: tuple[str, ...] = (),
    description: str = "",
    overwrite: bool = False,
) -> NormSpec:
    """Register ``factory(num_channels, **kwargs)`` under ``name`` and ``aliases``.

    Raises ValueError if a name or alias is taken, unless ``overwrite``.
    """
    spec = NormSpec(_key(name), factory, tuple(_key(a) for a in aliases), description)
    for key in (spec.name, *spec.aliases):
        owner = _LOOKUP.get(key)
        if owner is not None and not overwrite:
            raise ValueError(f"register_norm: name {key!r} is already used by {owner!r}")
    _SPECS[spec.name] = spec
    for key in (spec.name, *spec.aliases):
        _LOOKUP[key] = spec.name
    return spec


def get_norm_spec(name: str) -> NormSpec:
    """The :class:`NormSpec` for a name or alias; ValueError listing the known names."""
    canonical = _LOOKUP.get(_key(name)) if isinstance(name, str) else None
    if canonical is None:
        known = ", ".join(
            f"{s.name} ({'/'.join(s.aliases)})" if s.aliases else s.name for s in _SPECS.values()
        )
        raise ValueError(f"create_norm: unknown normalization {name!r}; known names: {known}")
    return _SPECS[canonical]


def create_norm(name: str | Callable[..., nn.Module], num_channels: int, **kwargs) -> nn.Module:
    """Build the normalization layer called ``name`` over ``num_channels`` channels.

    Args:
        name: a name or alias from :func:`list_norms` (case-insensitive), or a
            callable taking the channel count first (a class such as
            ``normlab.nn.GroupNorm`` or ``torch.nn.BatchNorm2d``).
        num_channels: C.
        **kwargs: passed to the layer (``eps``, ``momentum``, ``num_groups`` ...).

    For ``"group"`` without ``num_groups``, the group count is
    :func:`normlab.nn.choose_num_groups` (at most 32, at least 2 channels a group).

    Raises:
        ValueError: unknown name (the message lists the known names).
    """
    if callable(name) and not isinstance(name, str):
        return name(num_channels, **kwargs)
    return get_norm_spec(name).factory(num_channels, **kwargs)


def list_norms(with_aliases: bool = False) -> list[str] | dict[str, tuple[str, ...]]:
    """Canonical names of the registered norms, or ``{name: aliases}``."""
    if with_aliases:
        return {s.name: s.aliases for s in _SPECS.values()}
    return list(_SPECS)


def _group_norm(num_channels: int, num_groups: int | None = None, **kwargs) -> nn.Module:
    if num_groups is None:
        # A bad channel count is left to GroupNorm, whose error names it (one group
        # passes its own check); choose_num_groups would fail on it with a bare TypeError.
        valid = type(num_channels) is int and num_channels > 0
        num_groups = nlnn.choose_num_groups(num_channels) if valid else 1
    return nlnn.GroupNorm(num_channels, num_groups, **kwargs)


# Aliases include the names timm (create_norm_layer), mmcv (build_norm_layer: BN, BN2d,
# SyncBN, GN, LN, IN ...), detectron2 (get_norm), Keras and torch.nn use for the same math.
register_norm("batch", nlnn.BatchNorm, ("bn", "batchnorm", "batch_norm", "batchnorm1d",
                                        "batchnorm2d", "batchnorm3d", "bn1d", "bn2d", "bn3d",
                                        "batch_normalization"),
              "Batch Normalization (Ioffe & Szegedy 2015)")
register_norm("batch_renorm", nlnn.BatchRenorm, ("brn", "batchrenorm", "renorm"),
              "Batch Renormalization (Ioffe 2017)")
register_norm("sync_batch", nlnn.SyncBatchNorm, ("syncbn", "sync_bn", "syncbatchnorm",
                                                 "sync_batch_norm", "sync_batchnorm",
                                                 "mmsyncbn", "nnsyncbn", "naivesyncbn"),
              "Batch Normalization with statistics over all ranks, any backend (gloo included)")
def _channel_first(cls):
    # By name, "layer" and "rms" are the lab's channel-first norms over C x * (what the
    # CNNs and MLPs of the study use), so that no input shape makes them ambiguous;
    # layout="last" (swap_norm passes it for torch.nn.LayerNorm/RMSNorm) gives torch's.
    def factory(num_channels, **kwargs) -> nn.Module:
        kwargs.setdefault("layout", "channels_first")
        return cls(num_channels, **kwargs)

    factory.__doc__ = cls.__doc__
    return factory


register_norm("layer", _channel_first(nlnn.LayerNorm),
              ("ln", "layernorm", "layer_norm", "layernormfp32", "groupnorm1",
               "layer_normalization"),
              "Layer Normalization over C x spatial (Ba et al. 2016)")
register_norm("layer_channels", nlnn.ChannelLayerNorm, ("ln2d", "layernorm2d", "channel_layer",
                                                        "channel_layer_norm", "layernorm2dfp32"),
              "Layer Normalization over channels only, per position (ConvNeXt, timm LayerNorm2d)")
register_norm("rms", _channel_first(nlnn.RMSNorm), ("rmsnorm", "rms_norm", "rmsnormfp32"),
              "Root Mean Square normalization (Zhang & Sennrich 2019)")
register_norm("instance", nlnn.InstanceNorm, ("in", "instancenorm", "instance_norm",
                                              "instancenorm1d", "instancenorm2d",
                                              "instancenorm3d", "in1d", "in2d", "in3d"),
              "Instance Normalization (Ulyanov et al. 2016)")
register_norm("group", _group_norm, ("gn", "groupnorm", "group_norm", "group_normalization"),
              "Group Normalization (Wu & He 2018)")
register_norm("switchable", nlnn.SwitchableNorm, ("sn", "switchnorm", "switchable_norm",
                                                  "switchablenorm"),
              "Switchable Normalization: learned IN/LN/BN mixture (Luo et al. 2019)")
register_norm("attentive", nlnn.AttentiveNorm, ("an", "attentivenorm", "attentive_norm"),
              "Attentive Normalization: attention-weighted mixture of affines (Li et al. 2020)")
register_norm("online", nlnn.OnlineNorm, ("on", "onlinenorm", "online_norm"),
              "Online Normalization: streaming statistics, controlled backward "
              "(Chiley et al. 2019)")
register_norm("none", nlnn.Identity, ("identity", "no_norm"), "No normalization")
