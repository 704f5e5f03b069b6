"""Attentive Normalization against a float64 reference written from Li, Sun & Wu (2020),
torch.nn.BatchNorm2d for K = 1 with the attention saturated at 1, gradcheck, and the
method's properties."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import normlab
from normlab.nn import AttentiveNorm
from normlab.registry import create_norm


def ref_attentive(x, layer, running=None, att_running=None):
    """float64 AN from the equations; statistics taken directly over their axes."""
    x = x.detach().double()
    n, c = x.shape[:2]
    xr = x.reshape(n, c, -1)
    eps = layer.eps
    p = {k: v.detach().double() for k, v in layer.named_parameters()}
    if layer.norm == "batch":
        if running is None:
            mu = xr.mean((0, 2)).view(1, c, 1)
            var = xr.var((0, 2), unbiased=False).view(1, c, 1)
        else:
            mu, var = running[0].double().view(1, c, 1), running[1].double().view(1, c, 1)
        xhat = (xr - mu) / torch.sqrt(var + eps)
    else:
        xhat = F.group_norm(xr, layer.num_groups, eps=eps)
    s = xr.mean(2) / torch.sqrt(xr.var(2, unbiased=False) + layer.attention_eps)
    z = s @ p["attention_proj"].t()
    if layer.norm == "batch":
        if att_running is None:
            zm, zv = z.mean(0), z.var(0, unbiased=False)
        else:
            zm, zv = att_running[0].double(), att_running[1].double()
        z = (z - zm) / torch.sqrt(zv + eps) * p["attention_weight"] + p["attention_bias"]
    else:
        z = F.layer_norm(z, (z.shape[1],), p["attention_weight"], p["attention_bias"], eps)
    lam = torch.clamp(z + 3, 0, 6) / 6
    gamma = lam @ p["component_weight"]
    beta = lam @ p["component_bias"]
    y = gamma[:, :, None] * xhat + beta[:, :, None]
    return y.reshape(x.shape), lam


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("shape", [(6, 4, 5, 5), (5, 6, 7), (8, 4)])
def test_matches_reference_train_and_eval(norm, shape):
    c = shape[1]
    layer = AttentiveNorm(c, num_components=3, norm=norm, num_groups=2, momentum=0.2,
                          dtype=torch.float64)
    with torch.no_grad():
        layer.attention_weight.uniform_(0.5, 2.0)
        layer.attention_bias.uniform_(-1.0, 1.0)
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    arm, arv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) * (1 + step) + step
        y = layer(x)
        y_ref, lam = ref_attentive(x, layer)
        torch.testing.assert_close(y, y_ref)
        assert lam.min() >= 0 and lam.max() <= 1
        if norm == "batch":
            xt = x.transpose(0, 1).reshape(c, -1)
            rm = 0.8 * rm + 0.2 * xt.mean(1)
            rv = 0.8 * rv + 0.2 * xt.var(1, unbiased=True)
            xr = x.reshape(shape[0], c, -1).double()
            s = xr.mean(2) / torch.sqrt(xr.var(2, unbiased=False) + 1e-3)
            z = s @ layer.attention_proj.detach().t()
            arm = 0.8 * arm + 0.2 * z.mean(0)
            arv = 0.8 * arv + 0.2 * z.var(0, unbiased=True)
    if norm == "batch":
        torch.testing.assert_close(layer.running_mean, rm)
        torch.testing.assert_close(layer.running_var, rv)
        torch.testing.assert_close(layer.attention_running_mean, arm)
        torch.testing.assert_close(layer.attention_running_var, arv)
    else:
        assert layer.running_mean is None and layer.attention_running_mean is None
    layer.eval()
    x = torch.randn(shape, dtype=torch.float64) + 0.5
    run = (rm, rv) if norm == "batch" else None
    att = (arm, arv) if norm == "batch" else None
    y_ref, lam_ref = ref_attentive(x, layer, running=run, att_running=att)
    torch.testing.assert_close(layer(x), y_ref)
    torch.testing.assert_close(layer.attention_weights(x), lam_ref)
    # In eval a sample's output does not depend on the rest of its batch.
    torch.testing.assert_close(layer(x[1:2]), y_ref[1:2])


def test_k1_with_attention_one_is_batchnorm_with_affine():
    c = 5
    an = AttentiveNorm(c, num_components=1, momentum=0.1, dtype=torch.float64)
    with torch.no_grad():  # hsigmoid(z) = 1 for z >= 3: saturate the attention at 1
        an.attention_weight.zero_()
        an.attention_bias.fill_(3.0)
    bn = torch.nn.BatchNorm2d(c, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(an.component_weight[0])
        bn.bias.copy_(an.component_bias[0])
    for step in range(3):
        x = torch.randn(4, c, 6, 6, dtype=torch.float64) * 2 + step
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        ya, yb = an(xa), bn(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(an.component_weight.grad[0], bn.weight.grad)
        torch.testing.assert_close(an.component_bias.grad[0], bn.bias.grad)
        an.zero_grad()
        bn.zero_grad()
    torch.testing.assert_close(an.running_mean, bn.running_mean)
    torch.testing.assert_close(an.running_var, bn.running_var)
    assert int(an.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    an.eval()
    bn.eval()
    x = torch.randn(3, c, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(an(x), bn(x), rtol=1e-12, atol=1e-12)


def test_samples_get_different_affine():
    layer = AttentiveNorm(8, num_components=4, dtype=torch.float64)
    x = torch.randn(6, 8, 5, 5, dtype=torch.float64) + torch.randn(6, 8, 1, 1,
                                                                  dtype=torch.float64)
    y, lam = normlab.functional.attentive_norm(
        x, layer.component_weight, layer.component_bias, layer.attention_proj,
        layer.attention_weight, layer.attention_bias, return_attention=True,
    )
    torch.testing.assert_close(lam, ref_attentive(x, layer)[1])
    gamma = lam @ layer.component_weight.detach()
    dist = torch.cdist(gamma, gamma) + torch.eye(6, dtype=torch.float64)
    assert dist.min() > 1e-3, "two samples got the same gamma"
    # ... and it is the per-sample affine that makes outputs differ from one BN affine.
    xhat = F.batch_norm(x, None, None, training=True, eps=layer.eps)
    torch.testing.assert_close(
        y, gamma[:, :, None, None] * xhat + (lam @ layer.component_bias.detach())[:, :, None, None]
    )


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_scale_invariance_in_training(norm):
    layer = AttentiveNorm(6, num_components=4, norm=norm, num_groups=3, dtype=torch.float64,
                          track_running_stats=False)
    x = torch.randn(8, 6, 5, 5, dtype=torch.float64) * 10 + torch.randn(8, 6, 1, 1,
                                                                       dtype=torch.float64) * 5
    y = layer(x)
    for a in (0.5, 3.0, 40.0):
        torch.testing.assert_close(layer(a * x), y, rtol=0, atol=2e-4)
    # Not a vacuous statement: a shift does change the output.
    assert (layer(x + 3.0) - y).abs().max() > 1e-2


def test_parameter_count_delta():
    for c, k in ((64, 10), (256, 20), (32, 5)):
        an = AttentiveNorm(c, num_components=k)
        bn = torch.nn.BatchNorm2d(c)
        count = sum(p.numel() for p in an.parameters())
        base = sum(p.numel() for p in bn.parameters())
        assert count - base == 2 * k * c + c * k + 2 * k - 2 * c


def test_initialisation():
    torch.manual_seed(4)
    layer = AttentiveNorm(512, num_components=10)
    w, b = layer.component_weight.detach(), layer.component_bias.detach()
    assert abs(w.mean() - 1) < 0.01 and abs(w.std() - 0.1) < 0.01
    assert abs(b.mean()) < 0.01 and abs(b.std() - 0.1) < 0.01
    assert torch.all(layer.attention_weight == 1) and torch.all(layer.attention_bias == 0)
    assert layer.weight is None and layer.bias is None  # no per-channel affine
    zero = AttentiveNorm(8, num_components=3, last_gamma=True)
    assert torch.all(zero.component_weight == 0) and torch.all(zero.component_bias == 0)
    assert set(layer.state_dict()) == {
        "component_weight", "component_bias", "attention_proj", "attention_weight",
        "attention_bias", "running_mean", "running_var", "num_batches_tracked",
        "attention_running_mean", "attention_running_var",
    }


@pytest.mark.parametrize("norm, shape", [("batch", (4, 4, 3, 3)), ("group", (3, 4, 3, 3)),
                                         ("batch", (5, 3))])
def test_gradcheck(norm, shape):
    c = shape[1]
    layer = AttentiveNorm(c, num_components=3, norm=norm, num_groups=2, dtype=torch.float64)
    with torch.no_grad():
        layer.attention_weight.uniform_(0.5, 1.5)  # keep z inside hsigmoid's linear part
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = [layer.component_weight, layer.component_bias, layer.attention_proj,
              layer.attention_weight, layer.attention_bias]

    def fn(x, cw, cb, proj, aw, ab):
        return normlab.functional.attentive_norm(
            x, cw, cb, proj, aw, ab, training=True, norm=norm, num_groups=2
        )

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_group_variant_trains_at_batch_one_and_batch_variant_refuses():
    layer = AttentiveNorm(4, num_components=3, norm="group", num_groups=2, dtype=torch.float64)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref_attentive(x, layer)[0])
    with pytest.raises(ValueError, match=r"AttentiveNorm\(4\).*norm='group'"):
        AttentiveNorm(4, num_components=3)(torch.randn(1, 4, 5, 5))


def test_attention_weights_do_not_touch_running_stats():
    layer = AttentiveNorm(4, num_components=3)
    x = torch.randn(5, 4, 3, 3)
    before = copy.deepcopy(layer.state_dict())
    lam = layer.attention_weights(x)
    assert lam.shape == (5, 3)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_errors_name_the_layer():
    layer = AttentiveNorm(3, num_components=2)
    with pytest.raises(ValueError, match=r"AttentiveNorm\(3\).*channels"):
        layer(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"AttentiveNorm\(3\).*dimensions"):
        layer(torch.randn(3))
    with pytest.raises(ValueError, match=r"AttentiveNorm\(6\).*num_groups"):
        AttentiveNorm(6, norm="group", num_groups=4)
    with pytest.raises(ValueError, match=r"AttentiveNorm\(6\).*num_components"):
        AttentiveNorm(6, num_components=0)
    with pytest.raises(ValueError, match=r"AttentiveNorm\(6\).*norm"):
        AttentiveNorm(6, norm="layer")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input(dtype):
    layer = AttentiveNorm(4, num_components=3, track_running_stats=False)
    x = torch.randn(6, 4, 5, 5) * 2 + 1
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref_attentive(x.to(dtype).float(), layer)[0],
                               rtol=0.02, atol=0.03)


def test_registry_and_exports():
    for name in ("attentive", "an", "AttentiveNorm"):
        layer = create_norm(name, 16, num_components=4)
        assert isinstance(layer, normlab.nn.AttentiveNorm) and layer.num_components == 4
    assert isinstance(layer, normlab.nn.NormBase) and layer.num_channels == 16
    assert create_norm("an", 16, norm="group").num_groups == 8


def test_swap_norm_builds_attentive_layers():
    from normlab.convert import swap_norm

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    net(torch.randn(4, 3, 9, 9) + 2)
    net, replaced = swap_norm(net, "an", num_components=3)
    an = net[1]
    assert isinstance(an, AttentiveNorm) and an.num_components == 3 and len(replaced) == 1
    assert an.running_mean.abs().min() > 0  # BatchNorm's running statistics came along
    net(torch.randn(4, 3, 9, 9)).sum().backward()
    assert an.component_weight.grad is not None and an.attention_proj.grad is not None


def test_nan_input_spares_the_buffers():
    layer = AttentiveNorm(4, num_components=3)
    layer(torch.randn(3, 4, 5))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 4, 5)
    x[0, 1, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"AttentiveNorm\(4\)"):
        y = layer(x)
    # The attention's batch norm spreads sample 0's NaN to every sample's lambda.
    assert torch.isnan(y).all()
    assert layer.running_mean[1] == before["running_mean"][1]
    assert layer.running_mean[0] != before["running_mean"][0]
    torch.testing.assert_close(layer.attention_running_mean, before["attention_running_mean"])
    torch.testing.assert_close(layer.attention_running_var, before["attention_running_var"])
    with pytest.raises(TypeError, match=r"AttentiveNorm\(4\)"):
        layer(torch.ones(2, 4, 3, dtype=torch.long))
