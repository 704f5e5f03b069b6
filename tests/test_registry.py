"""create_norm / list_norms / register_norm: names, aliases, kwargs and errors."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab import nn as nl
from normlab import registry

# (canonical name, required short aliases, class) from the list.
REQUIRED = [
    ("batch", ["bn"], nl.BatchNorm),
    ("batch_renorm", ["brn"], nl.BatchRenorm),
    ("layer", ["ln"], nl.LayerNorm),
    ("layer_channels", ["ln2d", "layernorm2d"], nl.ChannelLayerNorm),
    ("rms", ["rmsnorm"], nl.RMSNorm),
    ("instance", ["in"], nl.InstanceNorm),
    ("group", ["gn"], nl.GroupNorm),
    ("none", ["identity"], nl.Identity),
]


@pytest.fixture
def restore_registry():
    """Tests that register names put the registry back as it was."""
    specs, lookup = dict(registry._SPECS), dict(registry._LOOKUP)
    yield
    registry._SPECS.clear()
    registry._SPECS.update(specs)
    registry._LOOKUP.clear()
    registry._LOOKUP.update(lookup)


@pytest.mark.parametrize("name, aliases, cls", REQUIRED, ids=[r[0] for r in REQUIRED])
def test_names_and_aliases_build_the_right_layer(name, aliases, cls):
    assert name in normlab.list_norms()
    assert set(aliases) <= set(normlab.list_norms(with_aliases=True)[name])
    x = torch.randn(2, 8, 3, 3) + 1
    reference = None
    for key in [name, *aliases, name.upper(), name.replace("_", "-")]:
        layer = normlab.create_norm(key, 8)
        assert type(layer) is cls, key
        assert layer.num_channels == 8
        y = layer(x)
        assert y.shape == x.shape
        if reference is None:
            reference = y
        torch.testing.assert_close(y, reference, rtol=0, atol=0)  # same layer, same result
    assert normlab.get_norm_spec(aliases[0]).name == name


def test_layers_built_by_name_normalize():
    """The layers behind the names do their math: per-channel mean 0 / var 1 for BN,
    per-sample for LN, identity for none."""
    x = torch.randn(6, 4, 5) * 3 + 2
    y = normlab.create_norm("bn", 4)(x).double()
    torch.testing.assert_close(y.mean((0, 2)), torch.zeros(4, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(y.var((0, 2), unbiased=False), torch.ones(4, dtype=torch.float64),
                               atol=1e-4, rtol=0)  # var / (var + eps), eps = 1e-5
    y = normlab.create_norm("ln", 4)(x).double()
    torch.testing.assert_close(y.mean((1, 2)), torch.zeros(6, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    assert normlab.create_norm("none", 4)(x) is x


def test_kwargs_reach_the_layer():
    bn = normlab.create_norm("bn", 8, eps=1e-3, momentum=0.3, affine=False)
    assert (bn.eps, bn.momentum, bn.weight) == (1e-3, 0.3, None)
    brn = normlab.create_norm("brn", 8, r_max=2.0, d_max=1.0, warmup="paper")
    assert (brn.r_max, brn.d_max, brn.warmup) == (2.0, 1.0, (5000, 40000, 25000))
    inorm = normlab.create_norm("in", 8, affine=True, track_running_stats=True)
    assert inorm.affine and inorm.running_mean is not None
    assert normlab.create_norm("none", 8, eps=1e-3, momentum=0.1).num_channels == 8
    with pytest.raises(TypeError):
        normlab.create_norm("ln", 8, no_such_argument=1)


@pytest.mark.parametrize("c, expected", [(64, 32), (32, 16), (48, 24), (16, 8), (3, 1)])
def test_group_picks_a_group_count_that_divides(c, expected):
    gn = normlab.create_norm("gn", c)
    assert gn.num_groups == expected and c % gn.num_groups == 0
    x = torch.randn(2, c, 2, 2)
    torch.testing.assert_close(gn(x), torch.nn.GroupNorm(expected, c)(x), rtol=1e-5, atol=1e-5)
    assert normlab.create_norm("group", c, num_groups=1).num_groups == 1


def test_callables_are_built_with_channels_first():
    gn = normlab.create_norm(nl.GroupNorm, 8, num_groups=2)
    assert isinstance(gn, nl.GroupNorm) and gn.num_groups == 2
    assert isinstance(normlab.create_norm(torch.nn.BatchNorm2d, 8), torch.nn.BatchNorm2d)


@pytest.mark.parametrize("bad", ["batchy", "", "gn32", 3, None])
def test_unknown_name_lists_known_names(bad):
    with pytest.raises(ValueError) as info:
        normlab.create_norm(bad, 8)
    msg = str(info.value)
    assert repr(bad) in msg
    for name, aliases, _ in REQUIRED:
        assert name in msg and aliases[0] in msg


def test_register_norm(restore_registry):
    class Scale(torch.nn.Module):
        def __init__(self, num_channels, factor=2.0):
            super().__init__()
            self.num_channels, self.factor = num_channels, factor

        def forward(self, x):
            return x * self.factor

    normlab.register_norm("test_scale", Scale, aliases=("tscale",), description="x2")
    assert "test_scale" in normlab.list_norms()
    layer = normlab.create_norm("TScale", 4, factor=3.0)
    assert isinstance(layer, Scale) and layer.factor == 3.0
    with pytest.raises(ValueError, match="already used"):
        normlab.register_norm("test_scale_2", Scale, aliases=("bn",))
    with pytest.raises(ValueError, match="already used"):
        normlab.register_norm("batch_renorm", Scale)
    assert normlab.get_norm_spec("bn").factory is nl.BatchNorm  # failed registration: no change
    normlab.register_norm("test_scale", nl.LayerNorm, overwrite=True)
    assert isinstance(normlab.create_norm("test_scale", 4), nl.LayerNorm)


def test_restore_registry_fixture_left_no_trace():
    assert "test_scale" not in normlab.list_norms()
    assert "tscale" not in registry._LOOKUP
