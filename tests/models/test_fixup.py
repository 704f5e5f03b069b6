"""Fixup: a residual network without normalization, zero at initialisation, with the
paper's branch rescaling and optimiser groups."""

import math

import pytest
import torch
from torch import nn

from normlab.init import fixup_param_groups
from normlab.models import FixupBasicBlock, fixup_resnet


def _no_norm_layers(model):
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                  nn.modules.instancenorm._InstanceNorm)
    return not any(isinstance(m, norm_types) or "Norm" in type(m).__name__
                   for m in model.modules())


@pytest.mark.parametrize("depth, n", [(8, 1), (20, 3), (32, 5)])
def test_structure(depth, n):
    model = fixup_resnet(depth, num_classes=7, width=4)
    assert _no_norm_layers(model)
    assert model.num_branches == 3 * n
    blocks = model.blocks()
    assert len(blocks) == 3 * n
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth  # stem + 2 per block, + the classifier
    assert [b.planes for b in blocks] == [4] * n + [8] * n + [16] * n
    assert all(c.bias is None for c in convs)
    # Scalar biases and multipliers only: every non-conv, non-fc parameter is a scalar.
    for name, p in model.named_parameters():
        if not (name.endswith("weight") or name == "fc.bias"):
            assert p.numel() == 1, name
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 7)


def test_output_is_exactly_zero_at_init():
    torch.manual_seed(0)
    model = fixup_resnet(20, width=8)
    out = model(torch.randn(4, 3, 16, 16) * 5 + 1)
    assert torch.equal(out, torch.zeros(4, 10))
    # The pooled features are not zero: the zeros come from the classifier init.
    assert model.features(torch.randn(2, 3, 16, 16)).abs().sum() > 0


def _reference_shortcut(x, stride, out_channels):
    """Parameter-free shortcut from its equation: S(x)[c, i, j] = x[c, s i, s j] for
    c < C_in, and 0 for the added channels (written with explicit indices)."""
    n, c_in, h, w = x.shape
    h_out, w_out = math.ceil(h / stride), math.ceil(w / stride)
    out = torch.zeros(n, out_channels, h_out, w_out, dtype=x.dtype)
    for i in range(h_out):
        for j in range(w_out):
            out[:, :c_in, i, j] = x[:, :, stride * i, stride * j]
    return out


def test_every_block_is_the_identity_at_init():
    torch.manual_seed(0)
    model = fixup_resnet(14, width=8)
    x = torch.relu(model.conv1(torch.randn(3, 3, 16, 16)))  # a post-ReLU input
    for block in model.blocks():
        with torch.no_grad():
            y = block(x)
        assert torch.equal(block.branch(x), torch.zeros_like(y))
        assert torch.equal(y, _reference_shortcut(x, block.stride, block.planes))
        if block.stride == 1 and block.planes == block.in_planes:
            assert torch.equal(y, x)
        x = y


def test_shortcut_handles_odd_sizes():
    block = FixupBasicBlock(4, 8, stride=2)
    x = torch.rand(2, 4, 7, 9)
    y = block(x)
    assert y.shape == (2, 8, 4, 5)
    assert torch.equal(y, _reference_shortcut(x, 2, 8))


def test_branch_weight_std_is_he_times_rescaling():
    torch.manual_seed(0)
    depth = 56
    model = fixup_resnet(depth)
    L = (depth - 2) // 6 * 3  # 27 residual branches
    m = 2  # layers per basic-block branch
    factor = L ** (-1 / (2 * m - 2))
    for stage in (model.layer1, model.layer2, model.layer3):
        w = torch.cat([b.conv1.weight.flatten() for b in stage])
        c_out = stage[0].conv1.out_channels
        he = math.sqrt(2 / (c_out * 9))
        # Thousands of samples per stage: the std is within a few per cent.
        assert abs(w.std().item() / (he * factor) - 1) < 0.05
        assert abs(w.mean().item()) < 0.05 * he * factor
        for b in stage:
            assert torch.equal(b.conv2.weight, torch.zeros_like(b.conv2.weight))
            assert b.scale.item() == 1.0
    stem = model.conv1.weight
    assert abs(stem.std().item() / math.sqrt(2 / (16 * 9)) - 1) < 0.15
    assert torch.equal(model.fc.weight, torch.zeros_like(model.fc.weight))
    assert torch.equal(model.fc.bias, torch.zeros_like(model.fc.bias))


def test_param_groups():
    model = fixup_resnet(20)
    groups = fixup_param_groups(model, lr=0.1, weight_decay=5e-4)
    assert [g["name"] for g in groups] == ["weights", "scalars"]
    weights, scalars = groups
    assert weights["lr"] == 0.1 and scalars["lr"] == pytest.approx(0.01)
    assert weights["weight_decay"] == scalars["weight_decay"] == 5e-4
    names = {id(p): n for n, p in model.named_parameters()}
    scalar_names = {names[id(p)] for p in scalars["params"]}
    weight_names = {names[id(p)] for p in weights["params"]}
    # Every scalar bias and multiplier (and the classifier's bias) is in the slow group,
    # every weight in the other; together they hold each parameter exactly once.
    expected_scalars = {n for n, p in model.named_parameters() if p.numel() == 1} | {"fc.bias"}
    assert scalar_names == expected_scalars
    assert all(n.endswith("weight") for n in weight_names)
    assert len(scalars["params"]) + len(weights["params"]) == len(list(model.parameters()))
    assert not scalar_names & weight_names
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # accepted as is


def test_param_groups_bad_arguments():
    with pytest.raises(ValueError, match="fixup_param_groups: lr"):
        fixup_param_groups(fixup_resnet(8), lr=0.0)
    with pytest.raises(ValueError, match="fixup_param_groups"):
        fixup_param_groups(nn.Identity(), lr=0.1)


def test_first_step_only_classifier_has_gradient():
    torch.manual_seed(0)
    model = fixup_resnet(14, width=8)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        if name.startswith("fc."):
            assert p.grad.abs().sum() > 0, name
        else:
            assert torch.equal(p.grad, torch.zeros_like(p)), name


def test_trains_without_normalization():
    # A few SGD steps on a small problem: the loss must fall well below its initial
    # value of exactly log(num_classes) (the output is zero at init).
    torch.manual_seed(0)
    model = fixup_resnet(8, num_classes=2, width=8)
    x = torch.randn(16, 3, 8, 8)
    y = (x.mean((1, 2, 3)) > 0).long()
    opt = torch.optim.SGD(fixup_param_groups(model, lr=0.1), momentum=0.9)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert min(losses[-5:]) < 0.5 * losses[0]
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("depth", [7, 9, 2, 0, 20.0])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match="fixup_resnet: depth must be 6n"):
        fixup_resnet(depth)


def test_bad_input_names_the_model():
    with pytest.raises(ValueError, match="FixupResNet: expected input of shape"):
        fixup_resnet(8)(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="FixupBasicBlock"):
        FixupBasicBlock(8, 4)
