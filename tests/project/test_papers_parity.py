"""normlab against the papers' own code where they differ (issue 14, item 4): Fixup's
block as the official FixupBasicBlock, weight norm's init_scale, and the documented
differences of SwitchableNorm and AttentiveNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab import nn as nl
from normlab.models.fixup import FixupBasicBlock, fixup_resnet


def _official_cifar_fixup(sd: dict, x: torch.Tensor, n: int) -> torch.Tensor:
    """The CIFAR Fixup ResNet of Zhang, Dauphin & Ma's code, as its structure reads
    (FixupBasicBlock: ``identity = x``; with a downsample, ``identity =
    downsample(x + bias1a)``, an AvgPool2d(1, stride) then zero channels), in float64
    from a state_dict."""
    x = torch.relu(F.conv2d(x, sd["conv1.weight"], padding=1) + sd["bias1"])
    for stage in (1, 2, 3):
        for j in range(n):
            p = f"layer{stage}.{j}."
            stride = 2 if stage > 1 and j == 0 else 1
            out = F.conv2d(x + sd[p + "bias1a"], sd[p + "conv1.weight"], stride=stride,
                             padding=1)
            out = torch.relu(out + sd[p + "bias1b"])
            out = F.conv2d(out + sd[p + "bias2a"], sd[p + "conv2.weight"], padding=1)
            out = out * sd[p + "scale"] + sd[p + "bias2b"]
            if stride > 1:
                identity = F.avg_pool2d(x + sd[p + "bias1a"], 1, stride)
                identity = torch.cat((identity, torch.zeros_like(identity)), 1)
            else:
                identity = x
            x = torch.relu(out + identity)
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return F.linear(x + sd["bias2"], sd["fc.weight"], sd["fc.bias"])


def _randomize_(model: nn.Module) -> None:
    """Every parameter non-zero (Fixup's init zeroes conv2, the biases and the
    classifier, which would hide where a bias is added)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(r * (0.1 if "conv" in name else 0.3) + (1.0 if "scale" in name else 0.0))


def test_fixup_resnet20_equals_the_official_structure():
    model = fixup_resnet(20).double()
    _randomize_(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    torch.testing.assert_close(model(x), _official_cifar_fixup(sd, x, 3), rtol=1e-10,
                               atol=1e-10)


def test_fixup_identity_block_adds_bias1a_only_in_the_branch():
    block = FixupBasicBlock(8, 8, 1).double()
    _randomize_(block)
    assert not block.downsamples
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(block(x), torch.relu(block.branch(x) + x))
    down = FixupBasicBlock(8, 16, 2).double()
    _randomize_(down)
    assert down.downsamples
    shifted = x + down.bias1a
    identity = torch.cat((shifted[:, :, ::2, ::2], torch.zeros(2, 8, 3, 3, dtype=x.dtype)), 1)
    torch.testing.assert_close(down(x), torch.relu(down.branch(x) + identity))


def test_fixup_init_still_gives_zero_output():
    model = fixup_resnet(20)
    assert torch.equal(model(torch.randn(2, 3, 8, 8)), torch.zeros(2, 10))


@pytest.mark.parametrize("init_scale", [1.0, 0.1])
def test_data_dependent_init_scale_as_the_official_code(init_scale):
    """Salimans & Kingma's code: g = init_scale / sigma, b = -mu * init_scale / sigma, so
    every unit's pre-activation on the init batch has mean 0 and std init_scale."""
    torch.manual_seed(0)
    model = nn.Sequential(nl.weight_norm(nn.Linear(6, 5)), nn.ReLU(),
                          nl.weight_norm(nn.Linear(5, 4)))
    batch = torch.randn(64, 6) * 2 + 1
    normlab.init.data_dependent_init_(model, batch, init_scale=init_scale)
    with torch.no_grad():
        first = model[0](batch)
        second = model(batch)
    for y in (first, second):
        torch.testing.assert_close(y.mean(0), torch.zeros(y.shape[1]), rtol=0, atol=1e-5)
        torch.testing.assert_close(y.double().var(0, unbiased=False).sqrt().float(),
                                   torch.full((y.shape[1],), init_scale), rtol=1e-4, atol=1e-5)


def test_data_dependent_init_scale_must_be_positive():
    model = nn.Sequential(nl.weight_norm(nn.Linear(3, 2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="init_scale must be a positive number, got 0"):
        normlab.init.data_dependent_init_(model, torch.randn(8, 3), init_scale=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_switchable_norm_running_var_start_difference_decays_as_documented():
    """The docstring: the official code starts running_var at 0, normlab at 1; after t
    training steps the two differ by exactly (1 - momentum)^t."""
    ours, official_start = nl.SwitchableNorm(3), nl.SwitchableNorm(3)
    with torch.no_grad():
        official_start.running_var.zero_()
    for _ in range(7):
        x = torch.randn(4, 3, 5)
        ours(x)
        official_start(x)
    torch.testing.assert_close(ours.running_var - official_start.running_var,
                               torch.full((3,), 0.9 ** 7), rtol=1e-5, atol=1e-6)
    assert "running_var" in nl.SwitchableNorm.__doc__ and "0.9^t" in nl.SwitchableNorm.__doc__


def test_attentive_norm_documents_its_biased_variance():
    doc = nl.AttentiveNorm.__doc__
    assert "unbiased" in doc and "sqrt((L - 1) / L)" in doc
