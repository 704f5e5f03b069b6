"""Small models parametrised by a normalization name: MLP, CNN, CIFAR-style ResNet and
an LSTM classifier, sized for the lab (trained on a few CPU cores in seconds to minutes).

Every builder takes the input shape without the batch dimension (``(C, H, W)`` for
images, ``(C, L)`` for 1-D signals such as MNIST-1D; :attr:`normlab.data.Dataset.in_shape`),
the number of classes, and ``norm``: any name :func:`normlab.create_norm` knows
(``"bn"``, ``"gn"``, ``"ln"``, ``"none"`` ...) or a callable taking the channel count
first. ``norm_kwargs`` go to every norm layer (``num_groups=``, ``eps=`` ...).

Shared options:

- ``init_scale``: the hidden layers' weights (every conv/linear that feeds a norm
  position, and for the LSTM its weight matrices) are initialised as usual (He normal,
  fan-in, for ReLU networks; torch.nn.LSTM's uniform for the LSTM) and then multiplied
  by ``init_scale``. The classifier head keeps torch's default init. With a
  normalization after every such layer, the network's function does not depend on
  this scale (up to ``eps``); without one, it does.
- ``dropout``: dropout probability after every hidden activation (MLP, CNN), before the
  head (ResNet, LSTM), and between stacked LSTM layers.
- Convolutions and linear layers followed by a norm have no bias (the norm's shift
  replaces it), except with ``norm="none"`` or ``affine=False``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from normlab.registry import create_norm, get_norm_spec

__all__ = [
    "MLP",
    "CNN",
    "ResNet",
    "BasicBlock",
    "LSTMClassifier",
    "mlp",
    "cnn",
    "resnet",
    "lstm_classifier",
    "build",
    "list_models",
    "LSTM_NORMS",
]

NormArg = str | Callable[..., nn.Module]


def _canonical(norm: NormArg) -> str | None:
    """The registry's canonical name of ``norm``, or None for a callable."""
    if isinstance(norm, str):
        return get_norm_spec(norm).name
    if not callable(norm):
        raise TypeError(f"norm must be a name from normlab.list_norms() or a callable, "
                        f"got {type(norm).__name__}")
    return None


def _uses_bias(norm: NormArg, norm_kwargs: dict) -> bool:
    """Whether a layer followed by ``norm`` needs its own bias."""
    return _canonical(norm) == "none" or norm_kwargs.get("affine", True) is False


def _make_norm(norm: NormArg, num_channels: int, norm_kwargs: dict) -> nn.Module:
    """The norm layer, or torch's ``nn.Identity`` for ``"none"`` (so a model without
    normalization holds no normlab layer at all)."""
    if _canonical(norm) == "none":
        return nn.Identity()
    return create_norm(norm, num_channels, **norm_kwargs)


def _in_shape(in_shape: Sequence[int], who: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) not in (2, 3) or any(s < 1 for s in shape):
        raise ValueError(f"{who}: in_shape must be (C, L) or (C, H, W) without the batch "
                         f"dimension, got {tuple(in_shape)}")
    return shape


def _check_common(who: str, num_classes: int, width: int, depth: int, dropout: float,
                  init_scale: float) -> None:
    if num_classes < 1:
        raise ValueError(f"{who}: num_classes must be >= 1, got {num_classes}")
    if width < 1:
        raise ValueError(f"{who}: width must be >= 1, got {width}")
    if depth < 1:
        raise ValueError(f"{who}: depth must be >= 1, got {depth}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{who}: dropout must be in [0, 1), got {dropout}")
    if not (math.isfinite(init_scale) and init_scale > 0):
        raise ValueError(f"{who}: init_scale must be a positive number, got {init_scale}")


def _init_hidden(layers: list[nn.Module], init_scale: float) -> None:
    """He-normal (fan-in, ReLU) init times ``init_scale``; biases 0."""
    with torch.no_grad():
        for m in layers:
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            m.weight.mul_(init_scale)
            if m.bias is not None:
                m.bias.zero_()


def _conv(dim: int, cin: int, cout: int, kernel: int, stride: int, bias: bool) -> nn.Module:
    cls = nn.Conv2d if dim == 2 else nn.Conv1d
    return cls(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias)


def _norm_label(norm: NormArg) -> str:
    return _canonical(norm) or getattr(norm, "__name__", type(norm).__name__)


# --------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    """Flatten, then ``depth`` x [Linear(width) -> norm -> ReLU -> dropout], then a
    linear head. The norms see ``(N, width)``."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, norm: NormArg = "bn",
                 width: int = 128, depth: int = 2, dropout: float = 0.0,
                 init_scale: float = 1.0, **norm_kwargs) -> None:
        super().__init__()
        who = "normlab.models.mlp"
        shape = tuple(int(s) for s in in_shape)
        _check_common(who, num_classes, width, depth, dropout, init_scale)
        self.in_shape, self.num_classes, self.norm_name = shape, num_classes, _norm_label(norm)
        bias = _uses_bias(norm, norm_kwargs)
        layers: list[nn.Module] = [nn.Flatten()]
        hidden: list[nn.Module] = []
        fan_in = math.prod(shape)
        for _ in range(depth):
            lin = nn.Linear(fan_in, width, bias=bias)
            hidden.append(lin)
            layers += [lin, self._probed_norm(norm, width, norm_kwargs), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            fan_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(fan_in, num_classes)
        _init_hidden(hidden, init_scale)

    @staticmethod
    def _probed_norm(norm: NormArg, width: int, norm_kwargs: dict) -> nn.Module:
        layer = _make_norm(norm, width, norm_kwargs)
        # An MLP's features have no spatial positions: a norm that needs them (instance
        # norm) must fail here, with a clear message, not at the first training step.
        probe = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                out = copy.deepcopy(layer).train()(probe)
        except Exception as e:
            raise ValueError(
                f"normlab.models.mlp: norm {_norm_label(norm)!r} cannot normalize an MLP's "
                f"(N, {width}) features ({type(e).__name__}: {e}); use cnn/resnet for it"
            ) from e
        if not isinstance(out, Tensor) or out.shape != probe.shape:
            raise ValueError(f"normlab.models.mlp: norm {_norm_label(norm)!r} changed the "
                             f"shape of (N, {width}) features")
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def mlp(in_shape: Sequence[int], num_classes: int, norm: NormArg = "bn", width: int = 128,
        depth: int = 2, dropout: float = 0.0, init_scale: float = 1.0, **norm_kwargs) -> MLP:
    """An MLP: ``depth`` hidden layers of ``width`` units, each Linear -> norm -> ReLU
    (-> dropout). Norms that need spatial positions (instance norm) raise ValueError."""
    return MLP(in_shape, num_classes, norm, width, depth, dropout, init_scale, **norm_kwargs)


# --------------------------------------------------------------------------- CNN


class CNN(nn.Module):
    """``depth`` blocks of conv3x3 -> norm -> ReLU (-> dropout), block i with
    ``width * 2**i`` channels, a 2x max-pool after every block but the last while the
    spatial size is at least 4 (so every norm sees at least 2 positions per side),
    then global average pooling and a linear head. 2-D input uses Conv2d, 1-D input
    ``(C, L)`` Conv1d."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, norm: NormArg = "bn",
                 width: int = 16, depth: int = 3, dropout: float = 0.0,
                 init_scale: float = 1.0, **norm_kwargs) -> None:
        super().__init__()
        who = "normlab.models.cnn"
        shape = _in_shape(in_shape, who)
        _check_common(who, num_classes, width, depth, dropout, init_scale)
        self.in_shape, self.num_classes, self.norm_name = shape, num_classes, _norm_label(norm)
        dim = len(shape) - 1
        bias = _uses_bias(norm, norm_kwargs)
        pool = nn.MaxPool2d if dim == 2 else nn.MaxPool1d
        layers: list[nn.Module] = []
        convs: list[nn.Module] = []
        cin, size = shape[0], min(shape[1:])
        for i in range(depth):
            cout = width * 2**i
            conv = _conv(dim, cin, cout, 3, 1, bias)
            convs.append(conv)
            layers += [conv, _make_norm(norm, cout, norm_kwargs), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            if i < depth - 1 and size >= 4:
                layers.append(pool(2))
                size //= 2
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if dim == 2 else nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(cin, num_classes)
        _init_hidden(convs, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def cnn(in_shape: Sequence[int], num_classes: int, norm: NormArg = "bn", width: int = 16,
        depth: int = 3, dropout: float = 0.0, init_scale: float = 1.0, **norm_kwargs) -> CNN:
    """A small CNN: ``depth`` conv blocks (``width``, ``2*width``, ``4*width`` ...
    channels) with pooling, global average pooling, linear head. See :class:`CNN`."""
    return CNN(in_shape, num_classes, norm, width, depth, dropout, init_scale, **norm_kwargs)


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """conv3 -> norm -> ReLU -> conv3 -> norm, plus the shortcut (identity, or a 1x1
    conv -> norm when the shape changes), then ReLU (He et al. 2016, post-activation)."""

    def __init__(self, dim: int, cin: int, cout: int, stride: int, norm: NormArg,
                 norm_kwargs: dict) -> None:
        super().__init__()
        bias = _uses_bias(norm, norm_kwargs)
        self.conv1 = _conv(dim, cin, cout, 3, stride, bias)
        self.norm1 = _make_norm(norm, cout, norm_kwargs)
        self.conv2 = _conv(dim, cout, cout, 3, 1, bias)
        self.norm2 = _make_norm(norm, cout, norm_kwargs)
        self.act = nn.ReLU()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(dim, cin, cout, 1, stride, bias),
                                          _make_norm(norm, cout, norm_kwargs))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): a 3x3 stem conv -> norm -> ReLU,
    three stages of ``depth`` :class:`BasicBlock` each with ``width``, ``2*width``,
    ``4*width`` channels (stride 2 entering stages 2 and 3 while the spatial size is at
    least 4), global average pooling, dropout, linear head: ResNet-(6*depth+2), so
    ``depth=1`` is ResNet-8, ``depth=3`` ResNet-20. ``zero_init_residual`` starts the
    last norm of each block at gain 0 (Goyal et al. 2017), when it has a gain."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, norm: NormArg = "bn",
                 width: int = 16, depth: int = 1, dropout: float = 0.0,
                 init_scale: float = 1.0, zero_init_residual: bool = False,
                 **norm_kwargs) -> None:
        super().__init__()
        who = "normlab.models.resnet"
        shape = _in_shape(in_shape, who)
        _check_common(who, num_classes, width, depth, dropout, init_scale)
        self.in_shape, self.num_classes, self.norm_name = shape, num_classes, _norm_label(norm)
        dim = len(shape) - 1
        bias = _uses_bias(norm, norm_kwargs)
        self.stem = nn.Sequential(_conv(dim, shape[0], width, 3, 1, bias),
                                  _make_norm(norm, width, norm_kwargs), nn.ReLU())
        blocks: list[nn.Module] = []
        cin, size = width, min(shape[1:])
        for stage in range(3):
            cout = width * 2**stage
            for b in range(depth):
                stride = 2 if (stage > 0 and b == 0 and size >= 4) else 1
                size = size // stride
                blocks.append(BasicBlock(dim, cin, cout, stride, norm, norm_kwargs))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1) if dim == 2 else nn.AdaptiveAvgPool1d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(cin, num_classes)
        convs = [m for m in self.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
        _init_hidden(convs, init_scale)
        if zero_init_residual:
            for blk in blocks:
                w = getattr(blk.norm2, "weight", None)
                if isinstance(w, Tensor):
                    with torch.no_grad():
                        w.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.head(self.dropout(self.pool(x).flatten(1)))


def resnet(in_shape: Sequence[int], num_classes: int, norm: NormArg = "bn", width: int = 16,
           depth: int = 1, dropout: float = 0.0, init_scale: float = 1.0,
           zero_init_residual: bool = False, **norm_kwargs) -> ResNet:
    """A CIFAR-style ResNet-(6*depth+2) of base ``width``. See :class:`ResNet`."""
    return ResNet(in_shape, num_classes, norm, width, depth, dropout, init_scale,
                  zero_init_residual, **norm_kwargs)


# --------------------------------------------------------------------------- LSTM

#: What ``lstm_classifier(norm=...)`` accepts, and the recurrent layer each name builds.
LSTM_NORMS = {
    "none": "torch.nn.LSTM",
    "layer": "normlab.nn.LNLSTM (LN-LSTM, Ba et al. 2016); aliases ln, layernorm, ln_lstm",
    "batch": "normlab.nn.BNLSTM (per-time-step BN, Cooijmans et al. 2017); aliases bn, "
             "bn_lstm",
    "input_bn": "normlab.nn.InputBNLSTM (BN of the input-to-hidden term only, Laurent et al. "
                "2016); aliases bn_input, laurent",
}
_LSTM_ALIASES = {"ln_lstm": "layer", "bn_lstm": "batch", "input_bn": "input_bn",
                 "bn_input": "input_bn", "laurent": "input_bn", "input_bn_lstm": "input_bn"}
_LSTM_CLASSES = {"layer": "LNLSTM", "batch": "BNLSTM", "input_bn": "InputBNLSTM"}


def _lstm_kind(norm: str) -> str:
    if not isinstance(norm, str):
        raise TypeError("normlab.models.lstm_classifier: norm must be a name, one of "
                        f"{sorted(LSTM_NORMS)}, got {type(norm).__name__}")
    key = norm.strip().lower().replace("-", "_").replace(" ", "_")
    if key in _LSTM_ALIASES:
        return _LSTM_ALIASES[key]
    try:
        kind = get_norm_spec(key).name
    except ValueError:
        kind = None
    if kind not in LSTM_NORMS:
        raise ValueError(
            f"normlab.models.lstm_classifier: norm {norm!r} is not an LSTM normalization; "
            "accepted: " + "; ".join(f"{k} -> {v}" for k, v in LSTM_NORMS.items())
        )
    return kind


class LSTMClassifier(nn.Module):
    """Reads an image ``(N, C, H, W)`` row by row (H steps of C*W features) or a 1-D
    signal ``(N, C, L)`` step by step (L steps of C features) with a ``depth``-layer
    LSTM of ``width`` units, and classifies the last hidden state (dropout -> linear).

    ``norm`` (see :data:`LSTM_NORMS`): ``"none"`` (torch.nn.LSTM), ``"ln"`` (LN-LSTM),
    ``"bn"`` (BN-LSTM, per-time-step statistics) or ``"input_bn"`` (BN of the
    input-to-hidden term); ``norm_kwargs`` go to that layer (``eps``, ``momentum``,
    ``gamma_init``, ``forget_bias`` ...). ``init_scale`` multiplies the recurrent and
    input weight matrices after torch.nn.LSTM's uniform init.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, norm: str = "none",
                 width: int = 128, depth: int = 1, dropout: float = 0.0,
                 init_scale: float = 1.0, **norm_kwargs) -> None:
        super().__init__()
        who = "normlab.models.lstm_classifier"
        shape = _in_shape(in_shape, who)
        _check_common(who, num_classes, width, depth, dropout, init_scale)
        self.in_shape, self.num_classes = shape, num_classes
        self.norm_name = kind = _lstm_kind(norm)
        features = shape[0] * shape[2] if len(shape) == 3 else shape[0]
        self.steps = shape[1]
        kw = dict(num_layers=depth, batch_first=True, dropout=dropout if depth > 1 else 0.0)
        if kind == "none":
            if norm_kwargs:
                raise ValueError(f"{who}: norm='none' takes no norm keywords, got "
                                 f"{sorted(norm_kwargs)}")
            self.rnn = nn.LSTM(features, width, **kw)
        else:
            from normlab import nn as nlnn

            cls = getattr(nlnn, _LSTM_CLASSES[kind], None)
            if cls is None:
                raise ValueError(f"{who}: norm {norm!r} needs normlab.nn."
                                 f"{_LSTM_CLASSES[kind]}, which this normlab does not have")
            self.rnn = cls(features, width, **kw, **norm_kwargs)
        with torch.no_grad():
            for name, p in self.rnn.named_parameters():
                if name.startswith(("weight_ih", "weight_hh")):
                    p.mul_(init_scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:  # (N, C, H, W) -> (N, H, C*W): one row per step
            seq = x.permute(0, 2, 1, 3).flatten(2)
        elif x.dim() == 3:  # (N, C, L) -> (N, L, C)
            seq = x.transpose(1, 2)
        else:
            raise ValueError(f"LSTMClassifier: expected input (N, C, L) or (N, C, H, W), got "
                             f"shape {tuple(x.shape)}")
        out, _ = self.rnn(seq)
        return self.head(self.dropout(out[:, -1]))


def lstm_classifier(in_shape: Sequence[int], num_classes: int, norm: str = "none",
                    width: int = 128, depth: int = 1, dropout: float = 0.0,
                    init_scale: float = 1.0, **norm_kwargs) -> LSTMClassifier:
    """An LSTM classifier over rows of an image or steps of a signal; ``norm`` is one of
    :data:`LSTM_NORMS` (``"none"``, ``"ln"``, ``"bn"``, ``"input_bn"``). See
    :class:`LSTMClassifier`."""
    return LSTMClassifier(in_shape, num_classes, norm, width, depth, dropout, init_scale,
                          **norm_kwargs)


# --------------------------------------------------------------------------- by name

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet": resnet,
    "lstm": lstm_classifier,
}
_MODEL_ALIASES = {"lstm_classifier": "lstm", "rnn": "lstm", "resnet8": "resnet",
                  "convnet": "cnn", "fc": "mlp"}


def list_models() -> list[str]:
    """The model names :func:`build` accepts (``"mlp"``, ``"cnn"``, ...), in the order
    they were registered."""
    return list(_BUILDERS)


def build(name: str, in_shape: Sequence[int], num_classes: int, norm: NormArg = "bn",
          **kwargs) -> nn.Module:
    """Build the model called ``name`` (``"mlp"``, ``"cnn"``, ``"resnet"``, ``"lstm"``)
    for inputs of ``in_shape`` (no batch dimension) and ``num_classes`` classes.

    ``kwargs``: ``width``, ``depth``, ``dropout``, ``init_scale``
    (``zero_init_residual`` for the ResNet), and any other keyword goes to the norm
    layers. Each builder's defaults suit the embedded datasets; the LSTM's default
    norm is ``"none"`` when ``norm`` is not given explicitly to :func:`lstm_classifier`,
    but :func:`build` passes ``norm`` through (``"bn"`` builds a BN-LSTM).
    """
    key = str(name).strip().lower().replace("-", "_")
    key = _MODEL_ALIASES.get(key, key)
    if key not in _BUILDERS:
        raise ValueError(f"normlab.models.build: unknown model {name!r}; known: "
                         + ", ".join(list_models()))
    return _BUILDERS[key](in_shape, num_classes, norm=norm, **kwargs)
