r"""Fixup (Zhang, Dauphin & Ma, ICLR 2019): residual networks trained without any
normalization layer, by initialisation alone.

A CIFAR-style ResNet of depth :math:`6n + 2`: a 3x3 stem convolution, three stages
of :math:`n` basic blocks of widths :math:`w, 2w, 4w` (the second and third start
with stride 2), global average pooling and a linear classifier. Fixup's rules, with
:math:`L = 3n` residual branches of :math:`m = 2` layers each:

1. the last layer of every branch (``conv2``) and the classifier (weight and bias)
   start at zero, so every block is the identity and the output is exactly zero;
2. the other branch layer (``conv1``) gets He-normal weights,
   :math:`\mathrm{std} = \sqrt{2 / (C_{out} k^2)}`, times
   :math:`L^{-1/(2m-2)} = L^{-1/2}`;
3. scalar biases (init 0) before each convolution, the ReLU and the classifier,
   and one scalar multiplier (init 1) after ``conv2``.

Train with :func:`normlab.init.fixup_param_groups` (the biases and multipliers at a
tenth of the learning rate, as the paper).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["FixupBasicBlock", "FixupResNet", "fixup_resnet"]

#: Layers per residual branch of a basic block (the m of the paper).
BASIC_BLOCK_LAYERS = 2


def _he_std(conv: nn.Conv2d) -> float:
    """He-normal std, sqrt(2 / (C_out k^2)) (fan-out mode, as torchvision's ResNet)."""
    return math.sqrt(2.0 / (conv.out_channels * math.prod(conv.kernel_size)))


class FixupBasicBlock(nn.Module):
    r"""A Fixup basic block, :math:`y = \mathrm{relu}(B(x) + x)` when stride and width
    are unchanged, :math:`y = \mathrm{relu}(B(x) + S(x + a_1))` when the block
    downsamples, with the branch

    .. math::
        B(x) = \big(W_2 * (\mathrm{relu}(W_1 * (x + a_1) + a_2) + a_3)\big)\,s + a_4

    (:math:`a_1..a_4` the scalar biases ``bias1a, bias1b, bias2a, bias2b``,
    :math:`s` the scalar ``scale``) and the parameter-free shortcut

    .. math::
        S(x)_{c,i,j} = \begin{cases} x_{c,\,\sigma i,\,\sigma j} & c < C_{in} \\
        0 & C_{in} \le c < C_{out} \end{cases}

    (stride-:math:`\sigma` subsampling, then zero channels appended), the CIFAR
    shortcut ("option A") of the Fixup paper. As in the official code
    (``FixupBasicBlock``: ``identity = x``, and ``identity = downsample(x + bias1a)``
    only when there is a downsample), the scalar bias :math:`a_1` enters an identity
    shortcut nowhere but the branch. With ``conv2`` zero-initialised, :math:`B(x) = 0`
    and the block maps a non-negative (post-ReLU) input to :math:`S(x)`, which is
    :math:`x` when stride and width are unchanged.

    Args:
        in_planes: input channels.
        planes: output channels, >= ``in_planes``.
        stride: stride of ``conv1`` and of the shortcut's subsampling. Default: 1.
        num_branches: L, the number of residual branches of the network, for the
            initial rescaling of ``conv1`` (:meth:`reset_parameters`). Default: 1.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, num_branches: int = 1
                 ) -> None:
        super().__init__()
        if planes < in_planes:
            raise ValueError(
                f"FixupBasicBlock: the parameter-free shortcut can only add channels, got "
                f"in_planes={in_planes} > planes={planes}"
            )
        self.in_planes, self.planes, self.stride = in_planes, planes, stride
        self.bias1a = nn.Parameter(torch.zeros(1))
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bias1b = nn.Parameter(torch.zeros(1))
        self.bias2a = nn.Parameter(torch.zeros(1))
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.scale = nn.Parameter(torch.ones(1))
        self.bias2b = nn.Parameter(torch.zeros(1))
        self.reset_parameters(num_branches)

    def shortcut(self, x: Tensor) -> Tensor:
        """The parameter-free shortcut S: stride subsampling and zero channels."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.planes - self.in_planes
        if extra > 0:
            zeros = x.new_zeros(x.shape[0], extra, *x.shape[2:])
            x = torch.cat([x, zeros], dim=1)
        return x

    def branch(self, x: Tensor) -> Tensor:
        """The residual branch B (zero at initialisation)."""
        out = self.conv1(x + self.bias1a)
        out = torch.relu(out + self.bias1b)
        out = self.conv2(out + self.bias2a)
        return out * self.scale + self.bias2b

    @property
    def downsamples(self) -> bool:
        """True when the shortcut subsamples or adds channels (the official code's
        ``downsample`` is not None)."""
        return self.stride > 1 or self.planes != self.in_planes

    def forward(self, x: Tensor) -> Tensor:
        identity = self.shortcut(x + self.bias1a) if self.downsamples else x
        return torch.relu(self.branch(x) + identity)

    def reset_parameters(self, num_branches: int) -> None:
        """Fixup init for a network of ``num_branches`` residual branches."""
        factor = num_branches ** (-1.0 / (2 * BASIC_BLOCK_LAYERS - 2))
        with torch.no_grad():
            self.conv1.weight.normal_(0.0, _he_std(self.conv1) * factor)
            self.conv2.weight.zero_()
            for p in (self.bias1a, self.bias1b, self.bias2a, self.bias2b):
                p.zero_()
            self.scale.fill_(1.0)


class FixupResNet(nn.Module):
    r"""CIFAR-style ResNet with Fixup initialisation and no normalization layer.

    ``stem: relu(conv3x3(x) + bias1)``, then three stages of ``blocks_per_stage``
    :class:`FixupBasicBlock` (widths ``width, 2 width, 4 width``; strides 1, 2, 2),
    global average pooling, ``fc(features + bias2)``. See :mod:`normlab.models.fixup`
    for the rules; :attr:`num_branches` is the L of the paper. The stem convolution
    gets plain He-normal weights. At initialisation the output is exactly zero.

    Args:
        blocks_per_stage: n, >= 1 (depth 6n + 2).
        num_classes: Default: 10.
        width: channels of the first stage. Default: 16.
        in_channels: Default: 3.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)`; output :math:`(N, \text{num\_classes})`.
    """

    def __init__(
        self, blocks_per_stage: int, num_classes: int = 10, width: int = 16, in_channels: int = 3
    ) -> None:
        super().__init__()
        if isinstance(blocks_per_stage, bool) or not isinstance(blocks_per_stage, int) or (
            blocks_per_stage < 1
        ):
            raise ValueError(
                f"FixupResNet: blocks_per_stage must be a positive int, got {blocks_per_stage!r}"
            )
        self.blocks_per_stage = blocks_per_stage
        self.num_branches = 3 * blocks_per_stage
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bias1 = nn.Parameter(torch.zeros(1))
        stages = []
        planes = width
        for i, stage_width in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(FixupBasicBlock(planes, stage_width, stride, self.num_branches))
                planes = stage_width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bias2 = nn.Parameter(torch.zeros(1))
        self.fc = nn.Linear(4 * width, num_classes)
        self.reset_parameters()

    def blocks(self) -> list[FixupBasicBlock]:
        """The residual blocks, in order."""
        return [b for stage in (self.layer1, self.layer2, self.layer3) for b in stage]

    def reset_parameters(self) -> None:
        """Apply the Fixup initialisation (rules 1-3 of :mod:`normlab.models.fixup`)."""
        with torch.no_grad():
            self.conv1.weight.normal_(0.0, _he_std(self.conv1))
            self.bias1.zero_()
            self.bias2.zero_()
            self.fc.weight.zero_()
            self.fc.bias.zero_()
        for block in self.blocks():
            block.reset_parameters(self.num_branches)

    def features(self, x: Tensor) -> Tensor:
        """Pooled features ``(N, 4 width)``, before ``bias2`` and the classifier."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"FixupResNet: expected input of shape (N, {self.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        x = torch.relu(self.conv1(x) + self.bias1)
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x) + self.bias2)


def fixup_resnet(depth: int, num_classes: int = 10, width: int = 16, in_channels: int = 3
                 ) -> FixupResNet:
    r"""A Fixup CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, 110, ...).

    No normalization layer; He-normal branch weights scaled by :math:`L^{-1/2}`
    (:math:`L = 3n` residual branches), zero last branch layers and classifier, scalar
    biases and multipliers, parameter-free shortcuts (stride subsampling plus zero
    channels). Its output at initialisation is exactly zero. See
    :class:`FixupResNet`; train with :func:`normlab.init.fixup_param_groups`.

    Args:
        depth: 6n + 2 with n >= 1.
        num_classes: Default: 10.
        width: channels of the first stage (then 2w, 4w). Default: 16.
        in_channels: Default: 3.

    Raises:
        ValueError: ``depth`` not of the form 6n + 2, or a non-positive size.
    """
    for name, value in (("num_classes", num_classes), ("width", width),
                        ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"fixup_resnet: {name} must be a positive int, got {value!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"fixup_resnet: depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), "
            f"got {depth!r}"
        )
    return FixupResNet((depth - 2) // 6, num_classes, width, in_channels)
