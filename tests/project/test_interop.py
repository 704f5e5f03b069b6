"""Drop-in use of normlab layers by the model factories people use.

timm and torchvision build their norms through a ``norm_layer`` callable called with
the channel count first. Neither is installed here (both pull a CUDA build of torch),
so local replicas of their call patterns always run, and the tests against the real
libraries run only where they are importable.
"""

from __future__ import annotations

import functools
import types

import pytest
import torch
from torch import nn

import normlab
from normlab import nn as nlnn

# normlab's layer classes, each taking the channel count first.
CLASSES = [nlnn.BatchNorm, nlnn.BatchRenorm, nlnn.SyncBatchNorm, nlnn.LayerNorm,
           nlnn.ChannelLayerNorm, nlnn.RMSNorm, nlnn.InstanceNorm, nlnn.GroupNorm,
           nlnn.SwitchableNorm, nlnn.AttentiveNorm, nlnn.OnlineNorm, nlnn.Identity]

NORM_LAYERS = (
    [pytest.param(functools.partial(normlab.create_norm, name), id=f"create_norm:{name}")
     for name in normlab.list_norms()]
    + [pytest.param(cls, id=cls.__name__) for cls in CLASSES]
    + [pytest.param(functools.partial(nlnn.GroupNorm, num_groups=32), id="GroupNorm(G=32)")]
)


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__module__.startswith("normlab.nn")]


def _check_model(model: nn.Module, x: torch.Tensor, expected_norms: int) -> None:
    norms = _norms(model)
    assert len(norms) == expected_norms
    model.train()
    y = model(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


# ------------------------------------------------------------- timm's convention, replicated


class TimmStyleNet(nn.Module):
    """A small convolutional net in timm's style: ``norm_layer(num_channels)``, the
    channel count first, for every norm, resolved first as timm's ``get_norm_layer``
    does (see :func:`timm_style_get_norm_layer`)."""

    def __init__(self, norm_layer=nn.BatchNorm2d, widths=(32, 64)):
        super().__init__()
        norm_layer = timm_style_get_norm_layer(norm_layer)
        layers, cin = [], 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), norm_layer(w), nn.ReLU()]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def timm_style_get_norm_layer(norm_layer):
    """How timm resolves ``norm_layer``: a class or a plain function passes as is; a
    ``functools.partial`` keeps its *keyword* arguments and loses its positional ones
    (they are re-bound later); a string is looked up in timm's own table."""
    assert isinstance(norm_layer, (type, str, types.FunctionType, functools.partial))
    if isinstance(norm_layer, functools.partial):
        keywords, func = dict(norm_layer.keywords), norm_layer.func
        return functools.partial(func, **keywords) if keywords else func
    return norm_layer


@pytest.mark.parametrize(
    "norm_layer",
    [pytest.param(cls, id=cls.__name__) for cls in CLASSES]
    + [pytest.param(functools.partial(nlnn.GroupNorm, num_groups=8), id="GroupNorm(G=8)"),
       pytest.param(functools.partial(nlnn.BatchNorm, momentum=0.01), id="BatchNorm(m=0.01)")]
    + [pytest.param(lambda c, name=name, **kw: normlab.create_norm(name, c, **kw),
                    id=f"lambda:create_norm:{name}") for name in normlab.list_norms()],
)
def test_timm_style_factory_accepts_normlab_layers(norm_layer):
    torch.manual_seed(0)
    model = TimmStyleNet(norm_layer)
    _check_model(model, torch.randn(4, 3, 8, 8), expected_norms=2)
    assert [n.num_channels for n in _norms(model)] == [32, 64]


def test_timm_style_resolution_drops_positional_partial_arguments():
    """Why the docs recommend a class, a keyword partial of a class, or a lambda for
    timm: ``partial(create_norm, "gn")`` loses "gn" in timm's resolution, and the
    channel count then lands where the name belongs."""
    with pytest.raises((TypeError, ValueError)):
        TimmStyleNet(functools.partial(normlab.create_norm, "gn"))


# ---------------------------------------------------- torchvision's ResNet, replicated


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock's use of ``norm_layer``: ``norm_layer(planes)``
    after each of the two 3x3 convolutions."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm_layer=None):
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: ``norm_layer(width)`` twice, then
    ``norm_layer(planes * expansion)``."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm_layer=None):
        super().__init__()
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet skeleton (stem, stages with a norm in the downsample path,
    zero_init_residual), narrower and shorter."""

    def __init__(self, block, layers=(1, 1), widths=(32, 64), norm_layer=None,
                 zero_init_residual=False):
        super().__init__()
        self._norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, 3, 1, 1, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.stages = nn.Sequential(*[
            self._make_layer(block, w, n, stride=1 if i == 0 else 2)
            for i, (w, n) in enumerate(zip(widths, layers, strict=True))
        ])
        self.fc = nn.Linear(widths[-1] * block.expansion, 10)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and getattr(m.bn3, "weight", None) is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and getattr(m.bn2, "weight", None) is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                self._norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self._norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, norm_layer=self._norm_layer)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(self.stages(x).mean((2, 3)))


@pytest.mark.parametrize("block, norms", [(BasicBlock, 1 + 2 + (2 + 1)),
                                          (Bottleneck, 1 + (3 + 1) + (3 + 1))],
                         ids=["BasicBlock", "Bottleneck"])
@pytest.mark.parametrize("norm_layer", NORM_LAYERS)
def test_torchvision_style_resnet_accepts_normlab_layers(norm_layer, block, norms):
    torch.manual_seed(0)
    model = ResNet(block, norm_layer=norm_layer, zero_init_residual=True)
    _check_model(model, torch.randn(2, 3, 8, 8), expected_norms=norms)


def test_torchvision_style_resnet_with_the_documented_group_norm_partial():
    """The recipe in docs/choosing.md: ``partial(normlab.nn.GroupNorm, num_groups=32)``
    (torchvision calls ``norm_layer(num_channels)``, normlab takes the channel count
    first, so the group count goes by keyword). Every norm is a 32-group GroupNorm over
    the channel count its convolution produces, and normalizes as torch.nn.GroupNorm."""
    torch.manual_seed(0)
    model = ResNet(Bottleneck, norm_layer=functools.partial(nlnn.GroupNorm, num_groups=32))
    norms = _norms(model)
    assert all(type(n) is nlnn.GroupNorm and n.num_groups == 32 for n in norms)
    assert sorted({n.num_channels for n in norms}) == [32, 64, 128, 256]
    x = torch.randn(2, 32, 4, 4) * 3 + 1
    reference = nn.GroupNorm(32, 32)
    torch.testing.assert_close(norms[0](x), reference(x), rtol=1e-5, atol=1e-5)
    _check_model(model, torch.randn(2, 3, 8, 8), expected_norms=len(norms))


# --------------------------------------------------------------- the real libraries


def test_torchvision_resnet18_with_normlab_group_norm():
    tv = pytest.importorskip(
        "torchvision", reason="torchvision is optional (it pulls a CUDA build of torch); "
        "the replica above covers its norm_layer call pattern")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10,
                               norm_layer=functools.partial(nlnn.GroupNorm, num_groups=32))
    norms = _norms(model)
    assert len(norms) == 20 and all(n.num_groups == 32 for n in norms)
    _check_model(model, torch.randn(2, 3, 32, 32), expected_norms=20)


@pytest.mark.parametrize("norm_layer", [nlnn.BatchNorm,
                                        functools.partial(nlnn.GroupNorm, num_groups=32),
                                        lambda c, **kw: normlab.create_norm("ln2d", c, **kw)],
                         ids=["BatchNorm", "GroupNorm(G=32)", "lambda:ln2d"])
def test_timm_resnet18_with_normlab_layers(norm_layer):
    timm = pytest.importorskip(
        "timm", reason="timm is optional (it pulls a CUDA build of torch); the replica "
        "above covers its norm_layer call pattern")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10,
                              norm_layer=norm_layer)
    norms = _norms(model)
    assert len(norms) == 20
    _check_model(model, torch.randn(2, 3, 32, 32), expected_norms=20)


# ------------------------------------------------------------- names other libraries use

# (name as another library spells it, normlab's canonical name, where it comes from)
FOREIGN_NAMES = [
    ("batchnorm2d", "batch", "timm, torch.nn"),
    ("batchnorm1d", "batch", "timm, torch.nn"),
    ("BatchNorm", "batch", "Flax, torch.nn"),
    ("batch_normalization", "batch", "Keras"),
    ("BN", "batch", "mmcv, detectron2"),
    ("BN1d", "batch", "mmcv"),
    ("BN2d", "batch", "mmcv"),
    ("BN3d", "batch", "mmcv"),
    ("SyncBN", "sync_batch", "mmcv, detectron2"),
    ("MMSyncBN", "sync_batch", "mmcv"),
    ("naiveSyncBN", "sync_batch", "detectron2"),
    ("nnSyncBN", "sync_batch", "detectron2"),
    ("SyncBatchNorm", "sync_batch", "torch.nn"),
    ("GN", "group", "mmcv, detectron2"),
    ("groupnorm", "group", "timm"),
    ("GroupNorm", "group", "torch.nn, Flax"),
    ("group_normalization", "group", "Keras"),
    ("groupnorm1", "layer", "timm (GroupNorm with one group)"),
    ("LN", "layer", "mmcv"),
    ("layernorm", "layer", "timm"),
    ("layer_normalization", "layer", "Keras"),
    ("layernormfp32", "layer", "timm"),
    ("layernorm2d", "layer_channels", "timm"),
    ("layernorm2dfp32", "layer_channels", "timm"),
    ("rmsnorm", "rms", "timm"),
    ("RMSNorm", "rms", "torch.nn, Flax"),
    ("rmsnormfp32", "rms", "timm"),
    ("IN", "instance", "mmcv"),
    ("IN1d", "instance", "mmcv"),
    ("IN2d", "instance", "mmcv"),
    ("IN3d", "instance", "mmcv"),
    ("InstanceNorm2d", "instance", "torch.nn"),
]


@pytest.mark.parametrize("foreign, canonical, source", FOREIGN_NAMES,
                         ids=[f[0] for f in FOREIGN_NAMES])
def test_create_norm_accepts_other_libraries_names(foreign, canonical, source):
    assert normlab.get_norm_spec(foreign).name == canonical
    layer = normlab.create_norm(foreign, 64)
    expected = normlab.create_norm(canonical, 64)
    assert type(layer) is type(expected)
    x = torch.randn(4, 64, 3, 3) * 2 + 1
    torch.testing.assert_close(layer(x), expected(x), rtol=0, atol=0)


def test_group_norm_with_one_group_is_layer_norm():
    """groupnorm1 (timm's GroupNorm1) is normlab's LayerNorm over C x *: the same math
    as torch.nn.GroupNorm(1, C)."""
    x = torch.randn(3, 6, 4, 4) * 2 + 1
    torch.testing.assert_close(normlab.create_norm("groupnorm1", 6)(x),
                               nn.GroupNorm(1, 6)(x), rtol=1e-5, atol=1e-5)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="known names: .*batch"):
        normlab.create_norm("FrozenBN", 8)
