"""Switchable Normalization against float64 references written from Luo et al. (2019),
torch.nn's IN/LN/BN for one-hot mixtures, gradcheck, and the method's properties."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import normlab
from normlab.functional.mixture import pooled_moments
from normlab.nn import SwitchableNorm
from normlab.registry import create_norm

TERMS = ("instance", "layer", "batch")


def ref_switchable(x, mean_logits, var_logits, weight, bias, eps=1e-5, running=None,
                   using_bn=True):
    """float64 SN, each statistic computed directly over its own axes."""
    x = x.detach().double()
    n, c = x.shape[:2]
    xr = x.reshape(n, c, -1)
    length = xr.shape[2]
    stats = {"layer": (xr.mean((1, 2)).view(n, 1, 1), xr.var((1, 2), unbiased=False).view(n, 1, 1))}
    if length > 1:
        stats["instance"] = (xr.mean(2, keepdim=True), xr.var(2, unbiased=False, keepdim=True))
    if using_bn:
        if running is None:
            stats["batch"] = (xr.mean((0, 2)).view(1, c, 1),
                              xr.var((0, 2), unbiased=False).view(1, c, 1))
        else:
            stats["batch"] = (running[0].double().view(1, c, 1),
                              running[1].double().view(1, c, 1))
    idx = [TERMS.index(t) for t in TERMS if t in stats]
    wm = torch.softmax(mean_logits.detach().double()[idx], 0)
    wv = torch.softmax(var_logits.detach().double()[idx], 0)
    used = [t for t in TERMS if t in stats]
    mean = sum(wm[i] * stats[t][0] for i, t in enumerate(used))
    var = sum(wv[i] * stats[t][1] for i, t in enumerate(used))
    y = (xr - mean) / torch.sqrt(var + eps)
    y = y * weight.detach().double().view(1, c, 1) + bias.detach().double().view(1, c, 1)
    return y.reshape(x.shape)


def _random_layer(c, **kw):
    layer = SwitchableNorm(c, dtype=torch.float64, **kw)
    with torch.no_grad():
        layer.mean_logits.copy_(torch.randn(3))
        layer.var_logits.copy_(torch.randn(3))
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (3, 4, 7), (2, 3, 2, 3, 4)])
def test_training_and_eval_match_reference(shape):
    c = shape[1]
    layer = _random_layer(c, momentum=0.3)
    n_len = shape[0] * int(torch.tensor(shape[2:]).prod())
    rm = torch.zeros(c, dtype=torch.float64)
    rv = torch.ones(c, dtype=torch.float64)
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) * (1 + step) + step
        y = layer(x)
        torch.testing.assert_close(y, ref_switchable(x, layer.mean_logits, layer.var_logits,
                                                     layer.weight, layer.bias))
        xt = x.transpose(0, 1).reshape(c, -1)
        rm = 0.7 * rm + 0.3 * xt.mean(1)
        rv = 0.7 * rv + 0.3 * xt.var(1, unbiased=True)
        assert xt.shape[1] == n_len
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    assert int(layer.num_batches_tracked) == 3
    layer.eval()
    x = torch.randn(shape, dtype=torch.float64) + 1
    torch.testing.assert_close(
        layer(x),
        ref_switchable(x, layer.mean_logits, layer.var_logits, layer.weight, layer.bias,
                       running=(rm, rv)),
    )
    torch.testing.assert_close(layer.running_mean, rm)  # eval does not update


@pytest.mark.parametrize("term", TERMS)
def test_one_hot_logits_reproduce_torch_norm(term):
    n, c = 4, 3
    x = torch.randn(n, c, 5, 5, dtype=torch.float64) * 2 + 1
    layer = _random_layer(c)
    one_hot = torch.full((3,), -1e4, dtype=torch.float64)
    one_hot[TERMS.index(term)] = 0.0
    with torch.no_grad():
        layer.mean_logits.copy_(one_hot)
        layer.var_logits.copy_(one_hot)
    w, b = layer.weight.detach(), layer.bias.detach()
    if term == "instance":
        expected = F.instance_norm(x, weight=w, bias=b, eps=1e-5)
    elif term == "layer":
        expected = F.group_norm(x, 1, w, b, eps=1e-5)  # LN over (C, H, W), per-channel affine
    else:
        rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
        expected = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    if term == "batch":
        torch.testing.assert_close(layer.running_mean, rm)
        torch.testing.assert_close(layer.running_var, rv)
        layer.eval()
        torch.testing.assert_close(
            layer(x), F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5),
            rtol=1e-12, atol=1e-12,
        )


def test_derived_statistics_equal_direct_ones():
    x = torch.randn(5, 6, 4, 3, dtype=torch.float64) * 3 + 10
    xr = x.reshape(5, 6, -1)
    mu_in, var_in = xr.mean(2, keepdim=True), xr.var(2, unbiased=False, keepdim=True)
    mu_ln, var_ln = pooled_moments(mu_in, var_in, 1)
    torch.testing.assert_close(mu_ln.flatten(), xr.mean((1, 2)))
    torch.testing.assert_close(var_ln.flatten(), xr.var((1, 2), unbiased=False))
    mu_bn, var_bn = pooled_moments(mu_in, var_in, 0)
    torch.testing.assert_close(mu_bn.flatten(), xr.mean((0, 2)))
    torch.testing.assert_close(var_bn.flatten(), xr.var((0, 2), unbiased=False))
    # With N = 1 the batch statistics are the instance statistics.
    mu1, var1 = pooled_moments(mu_in[:1], var_in[:1], 0)
    torch.testing.assert_close(mu1, mu_in[:1], rtol=0, atol=0)
    torch.testing.assert_close(var1, var_in[:1], rtol=0, atol=0)


def test_batch_of_one_bn_term_equals_in_term():
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    outs = {}
    for term in ("instance", "batch"):
        layer = _random_layer(3)
        with torch.no_grad():
            layer.weight.fill_(1.0)
            layer.bias.zero_()
            for logits in (layer.mean_logits, layer.var_logits):
                logits.fill_(-1e4)
                logits[TERMS.index(term)] = 0.0
        outs[term] = layer(x)
    torch.testing.assert_close(outs["batch"], outs["instance"], rtol=1e-12, atol=1e-12)


def test_single_trailing_element_is_finite_and_drops_in():
    """N x C x 1 x 1 (NaN in the official code) and (N, C) input: finite, and equal to
    the LN + BN mixture with the IN term left out."""
    layer = _random_layer(5)
    x = torch.randn(4, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.mean_logits.grad).all()
    assert layer.mean_logits.grad[0] == 0 and layer.var_logits.grad[0] == 0
    torch.testing.assert_close(
        y, ref_switchable(x, layer.mean_logits, layer.var_logits, layer.weight, layer.bias)
    )
    layer2 = copy.deepcopy(layer)
    torch.testing.assert_close(layer2(x.detach().flatten(1)), y.detach().flatten(1))
    w = layer.mixture_weights(with_instance=False)
    assert w["mean"]["instance"] == 0.0
    assert abs(sum(w["mean"].values()) - 1) < 1e-12


def test_eval_uses_running_stats_for_the_bn_term_only():
    layer = _random_layer(3)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([5.0, -2.0, 0.5]))
        layer.running_var.copy_(torch.tensor([4.0, 0.25, 9.0]))
    layer.eval()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2 + 1
    y = layer(x)
    torch.testing.assert_close(
        y, ref_switchable(x, layer.mean_logits, layer.var_logits, layer.weight, layer.bias,
                          running=(layer.running_mean, layer.running_var)),
    )
    # IN and LN still come from the sample, and a sample's output is its own.
    torch.testing.assert_close(layer(x[3:4]), y[3:4])
    # Changing the running statistics changes the output only through the BN term.
    with torch.no_grad():
        layer.mean_logits[2] = -1e4
        layer.var_logits[2] = -1e4
    y_no_bn = layer(x)
    with torch.no_grad():
        layer.running_mean.add_(100.0)
        layer.running_var.mul_(50.0)
    torch.testing.assert_close(layer(x), y_no_bn, rtol=0, atol=0)


def test_without_running_stats_eval_uses_batch_statistics():
    layer = _random_layer(3, track_running_stats=False)
    assert layer.running_mean is None
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    layer.eval()
    torch.testing.assert_close(
        layer(x), ref_switchable(x, layer.mean_logits, layer.var_logits, layer.weight,
                                 layer.bias)
    )


def test_using_bn_false_mixes_in_and_ln_and_trains_at_batch_one():
    layer = _random_layer(3, using_bn=False)
    assert layer.running_mean is None and "running_mean" not in layer.state_dict()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(
        layer(x), ref_switchable(x, layer.mean_logits, layer.var_logits, layer.weight,
                                 layer.bias, using_bn=False)
    )
    w = layer.mixture_weights()
    assert w["mean"]["batch"] == 0.0 and w["var"]["batch"] == 0.0
    expected = torch.softmax(layer.mean_logits.detach()[:2], 0)
    assert w["mean"]["instance"] == pytest.approx(float(expected[0]), abs=1e-7)


def test_mixture_weights_report_softmax():
    layer = SwitchableNorm(4)
    w = layer.mixture_weights()
    for kind in ("mean", "var"):
        assert list(w[kind]) == list(TERMS)
        for term in TERMS:
            assert w[kind][term] == pytest.approx(1 / 3)
    with torch.no_grad():
        layer.mean_logits.copy_(torch.tensor([2.0, 0.0, -1.0]))
        layer.var_logits.copy_(torch.tensor([0.0, 3.0, 0.0]))
    w = layer.mixture_weights()
    for kind, logits in (("mean", layer.mean_logits), ("var", layer.var_logits)):
        sm = torch.softmax(logits.detach(), 0)
        assert [w[kind][t] for t in TERMS] == pytest.approx(sm.tolist(), abs=1e-7)


@pytest.mark.parametrize(
    "shape, kw",
    [((3, 2, 3, 3), {}), ((2, 3, 4), {"using_bn": False}), ((4, 3), {}), ((3, 2, 1, 1), {})],
)
def test_gradcheck(shape, kw):
    layer = _random_layer(shape[1], **kw)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def fn(x, ml, vl, w, b):
        return normlab.functional.switchable_norm(
            x, ml, vl, None, None, w, b, training=True, using_bn=layer.using_bn
        )

    params = (layer.mean_logits, layer.var_logits, layer.weight, layer.bias)
    assert torch.autograd.gradcheck(fn, (x, *params))


def test_gradcheck_eval_with_running_stats():
    layer = _random_layer(3)
    layer(torch.randn(4, 3, 3, 3, dtype=torch.float64))
    layer.eval()
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_momentum_none_is_cumulative_average():
    layer = SwitchableNorm(2, momentum=None, dtype=torch.float64)
    xs = [torch.randn(3, 2, 4, dtype=torch.float64) + i for i in range(3)]
    for x in xs:
        layer(x)
    means = torch.stack([x.transpose(0, 1).reshape(2, -1).mean(1) for x in xs])
    torch.testing.assert_close(layer.running_mean, means.mean(0))


def test_last_gamma_and_initial_state():
    layer = SwitchableNorm(4, last_gamma=True)
    assert torch.all(layer.weight == 0) and torch.all(layer.bias == 0)
    x = torch.randn(2, 4, 3, 3)
    assert torch.all(layer(x) == 0)
    plain = SwitchableNorm(4)
    assert torch.all(plain.weight == 1)
    assert torch.equal(plain.mean_logits, plain.var_logits)
    assert set(plain.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                       "num_batches_tracked", "mean_logits", "var_logits"}


def test_large_offset_float32_is_accurate():
    x = torch.randn(8, 4, 8, 8) + 1e4
    layer = SwitchableNorm(4)
    ref = ref_switchable(x, layer.mean_logits, layer.var_logits, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x).double(), ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input(dtype):
    layer = SwitchableNorm(4)
    x = torch.randn(4, 4, 6, 6) * 3 + 2
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    ref = ref_switchable(x.to(dtype).float(), layer.mean_logits, layer.var_logits,
                         layer.weight, layer.bias)
    torch.testing.assert_close(y.double(), ref, rtol=0.02, atol=0.03)
    assert layer.running_mean.dtype == torch.float32


def test_errors_name_the_layer():
    layer = SwitchableNorm(3)
    with pytest.raises(ValueError, match=r"SwitchableNorm\(3\).*channels"):
        layer(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"SwitchableNorm\(3\).*dimensions"):
        layer(torch.randn(3))
    with pytest.raises(ValueError, match=r"SwitchableNorm\(3\).*using_bn=False"):
        layer(torch.randn(1, 3))  # one value per channel for the BN term
    SwitchableNorm(3, using_bn=False)(torch.randn(1, 3))  # fine without it


def test_registry_and_exports():
    for name in ("switchable", "sn", "SwitchNorm"):
        layer = create_norm(name, 6, using_bn=False)
        assert isinstance(layer, normlab.nn.SwitchableNorm) and not layer.using_bn
    assert isinstance(layer, normlab.nn.NormBase)
    assert layer.num_channels == 6 and layer.weight.shape == (6,) and layer.bias.shape == (6,)


def test_swap_norm_carries_batchnorm_state():
    from normlab.convert import swap_norm

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU()).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    for _ in range(3):
        net(torch.randn(4, 3, 9, 9, dtype=torch.float64) + 1)
    net.eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    expected = net(x)
    net, replaced = swap_norm(net, "sn")
    sn = net[1]
    assert isinstance(sn, SwitchableNorm) and len(replaced) == 1 and not sn.training
    with torch.no_grad():  # BN term only: the swapped model is the BN model in eval
        for logits in (sn.mean_logits, sn.var_logits):
            logits.copy_(torch.tensor([-1e4, -1e4, 0.0]))
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)


def test_nan_reaches_what_shares_its_statistics_and_spares_the_buffers():
    layer = SwitchableNorm(4)
    layer(torch.randn(3, 4, 5))
    before = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(3, 4, 5)
    x[0, 1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"SwitchableNorm\(4\).*\[1\]"):
        y = layer(x)
    reach = torch.zeros_like(x, dtype=torch.bool)
    reach[0] = True  # IN and LN statistics of sample 0
    reach[:, 1] = True  # BN statistics of channel 1
    assert torch.isnan(y[reach]).all() and torch.isfinite(y[~reach]).all()
    assert layer.running_mean[1] == before[0][1] and layer.running_var[1] == before[1][1]
    assert torch.isfinite(layer.running_mean).all() and layer.running_mean[0] != before[0][0]
    with pytest.raises(TypeError, match=r"SwitchableNorm\(4\)"):
        layer(torch.ones(2, 4, 3, dtype=torch.long))
