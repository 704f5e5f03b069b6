"""swap_norm on norm-activation layers (timm's BatchNormAct2d style: a norm with drop
and act modules applied after it) keeps the activation (issue 14, item 5; the real
timm model is in tests/project/test_interop_real.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normlab import convert
from normlab import nn as nl


class BatchNormAct(nn.BatchNorm2d):
    """Batch norm, then drop, then act, as timm's BatchNormAct2d."""

    def __init__(self, c):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def test_swap_keeps_drop_and_act_and_the_function():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct(4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    assert (expected < 0).any()  # SiLU's small negative outputs: the act is there
    swapped, replaced = convert.swap_norm(model, "bn")
    assert isinstance(swapped[1], nl.BatchNorm) and isinstance(swapped[1].act, nn.SiLU)
    assert "kept its drop and act" in replaced[0].note
    torch.testing.assert_close(swapped(x), expected)
    bn = swapped[1]
    plain = F.batch_norm(swapped[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                           False, 0.0, bn.eps)
    torch.testing.assert_close(swapped(x), F.silu(plain))
