"""normlab's layers: every normalization method as an ``nn.Module`` taking input
``(N, C, *)`` and the channel count as its first argument."""

from normlab.nn.base import Identity, NormBase
from normlab.nn.batch import PAPER_RENORM_WARMUP, BatchNorm, BatchRenorm
from normlab.nn.sample import (
    ChannelLayerNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    choose_num_groups,
)

__all__ = [
    "NormBase",
    "Identity",
    "BatchNorm",
    "BatchRenorm",
    "PAPER_RENORM_WARMUP",
    "LayerNorm",
    "ChannelLayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "InstanceNorm",
    "GroupNorm",
    "choose_num_groups",
]
