"""normlab's layers: every normalization method as an ``nn.Module`` taking input
``(N, C, *)`` and the channel count as its first argument."""

from normlab.nn.base import Identity, NormBase
from normlab.nn.batch import PAPER_RENORM_WARMUP, BatchNorm, BatchRenorm
from normlab.nn.enorm import ENorm
from normlab.nn.ghn import DoubleThreshold, GHNConv2d, GHNLinear
from normlab.nn.mixture import AttentiveNorm, SwitchableNorm
from normlab.nn.online import OnlineNorm
from normlab.nn.per_sample import (
    ChannelLayerNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    choose_num_groups,
)
from normlab.nn.recurrent import BNLSTM, LNLSTM, InputBNLSTM
from normlab.nn.selu import SELU, AlphaDropout
from normlab.nn.sync import SyncBatchNorm, SyncBatchNormAct, to_sync_batchnorm
from normlab.nn.weight import WeightNorm, remove_weight_norm, weight_norm

__all__ = [
    "NormBase",
    "Identity",
    "BatchNorm",
    "BatchRenorm",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "to_sync_batchnorm",
    "PAPER_RENORM_WARMUP",
    "LayerNorm",
    "ChannelLayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "InstanceNorm",
    "GroupNorm",
    "choose_num_groups",
    "SELU",
    "AlphaDropout",
    "GHNLinear",
    "GHNConv2d",
    "DoubleThreshold",
    "SwitchableNorm",
    "AttentiveNorm",
    "OnlineNorm",
    "BNLSTM",
    "InputBNLSTM",
    "LNLSTM",
    "WeightNorm",
    "weight_norm",
    "remove_weight_norm",
    "ENorm",
]
