"""Bad input: errors that name the layer, what it expected and what it got; NaN in,
NaN out; a NaN batch never overwrites running statistics without a warning."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import normlab
from normlab import nn as nl

C = 4
LAYERS = {
    "BatchNorm": lambda: nl.BatchNorm(C),
    "BatchRenorm": lambda: nl.BatchRenorm(C),
    "LayerNorm": lambda: nl.LayerNorm(C),
    "ChannelLayerNorm": lambda: nl.ChannelLayerNorm(C),
    "RMSNorm": lambda: nl.RMSNorm(C),
    "InstanceNorm": lambda: nl.InstanceNorm(C, affine=True, track_running_stats=True),
    "GroupNorm": lambda: nl.GroupNorm(C, num_groups=2),
}
NAMES = sorted(LAYERS)


def _min_rank(name):
    return 3 if name == "InstanceNorm" else 2


# ----------------------------------------------------------------------------- rank, channels


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("train", [True, False])
def test_wrong_rank(name, train):
    layer = LAYERS[name]().train(train)
    for bad in (torch.randn(C), torch.randn(())) + ((torch.randn(3, C),) if _min_rank(name) == 3
                                                   else ()):
        with pytest.raises(ValueError) as info:
            layer(bad)
        msg = str(info.value)
        assert msg.startswith(f"{name}({C}):"), msg  # names the layer
        assert f"at least {_min_rank(name)} dimensions" in msg  # what it expected
        assert f"got shape {tuple(bad.shape)}" in msg  # what it got


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("train", [True, False])
def test_wrong_channel_count(name, train):
    layer = LAYERS[name]().train(train)
    bad = torch.randn(2, C + 1, 3)
    with pytest.raises(ValueError) as info:
        layer(bad)
    msg = str(info.value)
    assert msg.startswith(f"{name}({C}):"), msg
    assert f"expected {C} channels" in msg and f"with {C + 1} channels" in msg
    assert str(tuple(bad.shape)) in msg


@pytest.mark.parametrize("name", NAMES)
def test_integer_input_is_rejected(name):
    with pytest.raises(TypeError, match=re.escape(f"{name}({C})")):
        LAYERS[name]()(torch.ones(2, C, 3, dtype=torch.long))


@pytest.mark.parametrize("make", [lambda c: nl.BatchNorm(c), lambda c: nl.GroupNorm(c, 2),
                                  lambda c: nl.LayerNorm(c)])
@pytest.mark.parametrize("c", [0, -3, 2.5, True, "8"])
def test_bad_channel_argument(make, c):
    with pytest.raises(ValueError, match="num_channels must be a positive int"):
        make(c)


# ----------------------------------------------------------------------------- groups


@pytest.mark.parametrize("c, g", [(6, 4), (10, 3), (4, 8)])
def test_group_count_must_divide_channels(c, g):
    with pytest.raises(ValueError) as info:
        nl.GroupNorm(c, num_groups=g)
    msg = str(info.value)
    assert msg.startswith(f"GroupNorm({c}):")
    assert f"num_groups={g} does not divide num_channels={c}" in msg
    # and it says what would work
    divisors = [d for d in range(1, c + 1) if c % d == 0]
    assert str(divisors) in msg
    with pytest.raises(ValueError, match="does not divide"):
        normlab.create_norm("gn", c, num_groups=g)


@pytest.mark.parametrize("g", [0, -2, 1.5, None])
def test_group_count_must_be_positive_int(g):
    with pytest.raises(ValueError, match=r"GroupNorm\(8\): num_groups must be a positive int"):
        nl.GroupNorm(8, num_groups=g)


# ----------------------------------------------------------------------------- one value


@pytest.mark.parametrize("name", ["BatchNorm", "BatchRenorm"])
@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1), (1, C, 1, 1, 1)])
def test_batch_stats_need_more_than_one_value_per_channel(name, shape):
    layer = LAYERS[name]().train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(shape)
    with pytest.raises(ValueError) as info:
        layer(x)
    msg = str(info.value)
    assert msg.startswith(f"{name}({C}):")
    assert "more than 1 value per channel" in msg and str(shape) in msg
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(layer.state_dict()[key], before[key])
    # eval with running statistics handles a single value fine (torch.nn does too)
    layer.eval()
    torch.testing.assert_close(layer(x), x / (1 + 1e-5) ** 0.5)
    # and two values per channel train
    layer.train()(torch.randn((2,) + shape[1:]))


def test_masked_batch_with_one_valid_value_per_channel_is_rejected():
    bn = nl.BatchNorm(C)
    mask = torch.zeros(3, 1, 5, dtype=torch.bool)
    mask[1, 0, 2] = True  # a single valid position: no variance to estimate
    with pytest.raises(ValueError, match=r"BatchNorm\(4\): .*more than 1 valid value"):
        bn(torch.randn(3, C, 5), mask=mask)
    assert torch.equal(bn.running_var, torch.ones(C))
    mask[2, 0, 0] = True
    bn(torch.randn(3, C, 5), mask=mask)  # two are enough


@pytest.mark.parametrize("name", ["BatchNorm", "BatchRenorm", "LayerNorm", "RMSNorm",
                                  "GroupNorm"])
def test_mask_errors(name):
    layer = LAYERS[name]()
    x = torch.randn(2, C, 5)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 4\).*\(2, 4, 5\)"):
        layer(x, mask=torch.ones(2, 1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        layer(x, mask=torch.ones(2, 1, 5))


def test_instance_norm_needs_more_than_one_spatial_element():
    layer = nl.InstanceNorm(C)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(3, C, 1, 1))
    msg = str(info.value)
    assert msg.startswith(f"InstanceNorm({C}):") and "more than 1 spatial element" in msg
    assert "(3, 4, 1, 1)" in msg


# ----------------------------------------------------------------------------- NaN


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("train", [True, False])
def test_nan_in_gives_nan_out_where_it_reaches(name, bad_value, train):
    """The outputs whose statistics include the bad value are NaN (or inf), never a
    plausible-looking number; every other output equals the clean computation."""
    layer = LAYERS[name]().train(train)
    x = torch.randn(3, C, 5)
    bad = x.clone()
    bad[0, 1, 2] = bad_value
    clean = LAYERS[name]().train(train)
    clean.load_state_dict(layer.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y = layer(bad)
    # Which outputs share statistics with element (0, 1, 2):
    reach = torch.zeros_like(x, dtype=torch.bool)
    if name in ("BatchNorm", "BatchRenorm"):
        if train:
            reach[:, 1] = True
        else:
            reach[0, 1, 2] = True
    elif name in ("LayerNorm", "RMSNorm"):
        reach[0] = True
    elif name == "ChannelLayerNorm":
        reach[0, :, 2] = True
    elif name == "InstanceNorm":
        if train:
            reach[0, 1] = True
        else:
            reach[0, 1, 2] = True
    elif name == "GroupNorm":
        reach[0, :2] = True  # channels 0 and 1 form group 0
    if name == "RMSNorm" and bad_value == float("inf"):
        # x / sqrt(mean(x^2)) with one element -> inf: the others' limit is exactly 0
        # (no centring, so no NaN reaches them); the inf element itself is inf/inf.
        assert torch.isnan(y[0, 1, 2])
        assert float(y[0].detach().nan_to_num(0).abs().max()) == 0.0
        reach = torch.zeros_like(reach)
        reach[0] = True
    else:
        assert not torch.isfinite(y[reach]).any(), f"{name}: finite output from a NaN statistic"
    assert torch.isfinite(y[~reach]).all()
    # Everything else is the clean computation: the bad value reaches nothing more.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y_clean = clean(x)
    torch.testing.assert_close(y[~reach], y_clean[~reach], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["BatchNorm", "BatchRenorm", "InstanceNorm"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_nan_batch_keeps_running_stats_and_warns(name, bad_value, momentum):
    if name in ("BatchRenorm", "InstanceNorm") and momentum is None:
        # no cumulative-average mode (InstanceNorm: None means no update, as in torch.nn)
        momentum = 0.1
    make = {
        "BatchNorm": lambda: nl.BatchNorm(C, momentum=momentum),
        "BatchRenorm": lambda: nl.BatchRenorm(C, momentum=momentum),
        "InstanceNorm": lambda: nl.InstanceNorm(C, momentum=momentum, track_running_stats=True),
    }[name]
    layer, clean = make(), make()
    warm = torch.randn(4, C, 5) * 2 + 1
    layer(warm)
    clean(warm)
    before = {k: getattr(layer, k).clone() for k in ("running_mean", "running_var")}

    x = torch.randn(4, C, 5) + 3
    bad = x.clone()
    bad[2, 1, 3] = bad_value
    bad[0, 3, 0] = bad_value
    with pytest.warns(RuntimeWarning, match=re.escape(f"{name}({C})") + ".*channels \\[1, 3\\]"):
        y = layer(bad)
    assert not torch.isfinite(y[2, 1, 3])
    clean(x)
    for key in ("running_mean", "running_var"):
        now, old, ref = getattr(layer, key), before[key], getattr(clean, key)
        assert torch.isfinite(now).all()
        assert torch.equal(now[[1, 3]], old[[1, 3]]), key  # untouched
        # channels 0 and 2 updated exactly as from the clean batch
        torch.testing.assert_close(now[[0, 2]], ref[[0, 2]], rtol=1e-6, atol=1e-7)
        assert not torch.equal(now[[0, 2]], old[[0, 2]])

    # a clean batch afterwards: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        layer(x)


@pytest.mark.parametrize("name", ["BatchNorm", "BatchRenorm", "InstanceNorm"])
def test_nan_in_eval_leaves_running_stats_alone(name):
    layer = LAYERS[name]()
    layer(torch.randn(4, C, 5))
    layer.eval()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, C, 5)
    x[1, 2, 1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing to update, nothing to say
        y = layer(x)
    assert torch.isnan(y[1, 2, 1]) and torch.isfinite(y[0]).all()
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("cls", [nl.BatchNorm, nl.BatchRenorm, nl.InstanceNorm])
def test_docstring_says_what_nan_does_to_running_stats(cls):
    doc = " ".join(cls.__doc__.split())
    assert "NaN" in doc and "running statistics" in doc and "RuntimeWarning" in doc
