"""Model builders parametrised by a normalization name (see :func:`normlab.create_norm`)."""

from normlab.models.basic import (
    CNN,
    LSTM_NORMS,
    MLP,
    BasicBlock,
    LSTMClassifier,
    ResNet,
    build,
    cnn,
    list_models,
    lstm_classifier,
    mlp,
    resnet,
)
from normlab.models.fixup import FixupBasicBlock, FixupResNet, fixup_resnet
from normlab.models.selfnorm import self_normalizing_mlp

__all__: list[str] = [
    "MLP",
    "CNN",
    "ResNet",
    "BasicBlock",
    "LSTMClassifier",
    "LSTM_NORMS",
    "mlp",
    "cnn",
    "resnet",
    "lstm_classifier",
    "build",
    "list_models",
    "FixupBasicBlock",
    "FixupResNet",
    "fixup_resnet",
    "self_normalizing_mlp",
]
