"""Online Normalization: the scans against a per-sample loop written from the paper's
equations (forward and the paper's own backward), partition invariance, causality,
convergence, eval, ECMs, state and errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import normlab
from normlab import functional as NF
from normlab.nn import OnlineNorm
from normlab.registry import create_norm

# ---------------------------------------------------------------------------------------
# Reference: one sample at a time, float64, straight from Chiley et al. (2019), Alg. 1-2.
# ---------------------------------------------------------------------------------------


class RefOnlineNorm:
    """Per-sample loop of the forward and the paper's backward, with affine and ECM."""

    def __init__(self, c, alpha_fwd, alpha_bkw, eps, ecm, weight=None, bias=None,
                 ls_eps=1e-5, clamp=5.0):
        self.af, self.ab, self.eps, self.ecm = alpha_fwd, alpha_bkw, eps, ecm
        self.ls_eps, self.clamp = ls_eps, clamp
        self.mu = torch.zeros(c, dtype=torch.float64)
        self.var = torch.ones(c, dtype=torch.float64)
        self.u = torch.zeros(c, dtype=torch.float64)
        self.v = torch.zeros(c, dtype=torch.float64)
        self.weight = None if weight is None else weight.detach().double().clone()
        self.bias = None if bias is None else bias.detach().double().clone()

    def forward(self, x, training=True):
        x = x.detach().double()
        n, c = x.shape[:2]
        xr = x.reshape(n, c, -1)
        ys, scales = [], []
        for t in range(n):
            xt = xr[t]
            if training:
                m = xt.mean(1)
                s2 = ((xt - m[:, None]) ** 2).mean(1)
                scale = torch.sqrt(self.var + self.eps)
                ys.append((xt - self.mu[:, None]) / scale[:, None])
                scales.append(scale)
                self.var = (self.af * self.var + (1 - self.af) * s2
                            + self.af * (1 - self.af) * (m - self.mu) ** 2)
                self.mu = self.mu + (1 - self.af) * (m - self.mu)
            else:
                ys.append((xt - self.mu[:, None]) / torch.sqrt(self.var + self.eps)[:, None])
        y = torch.stack(ys)
        z = y
        if self.weight is not None:
            z = z * self.weight[None, :, None] + self.bias[None, :, None]
        out, ls_scale = z, None
        if self.ecm == "ls":
            ls_scale = torch.sqrt((z * z).mean((1, 2), keepdim=True) + self.ls_eps)
            out = z / ls_scale
        elif self.ecm == "ac":
            out = z.clamp(-self.clamp, self.clamp)
        self.cache = (y, torch.stack(scales) if scales else None, z, out, ls_scale, x.shape)
        return out.reshape(x.shape)

    def backward(self, grad_out):
        y, scales, z, out, ls_scale, shape = self.cache
        n, c = shape[:2]
        g = grad_out.detach().double().reshape(n, c, -1)
        if self.ecm == "ls":
            proj = (g * out).mean((1, 2), keepdim=True) * out
            g = (g - proj) / ls_scale
        elif self.ecm == "ac":
            g = torch.where(out.abs() >= self.clamp, torch.zeros_like(g), g)
        grads = {}
        if self.weight is not None:
            grads["weight"] = (g * y).sum((0, 2))
            grads["bias"] = g.sum((0, 2))
            g = g * self.weight[None, :, None]
        dx = torch.empty_like(g)
        k = 1 - self.ab
        for t in range(n):
            gp = g[t] - k * self.v[:, None] * y[t]
            self.v = self.v + (gp * y[t]).mean(1)
            gp = gp / scales[t][:, None]
            dx[t] = gp - k * self.u[:, None]
            self.u = self.u + dx[t].mean(1)
        grads["x"] = dx.reshape(shape)
        return grads


def _layer(c, ecm="ls", dtype=torch.float64, **kw):
    layer = OnlineNorm(c, ecm=ecm, dtype=dtype, **kw)
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.uniform_(-0.5, 0.5)
    return layer


def _step(layer, x, g):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    out.backward(g)
    return out.detach(), x.grad


def _assert_state(layer, ref, rtol=1e-10, atol=1e-12):
    for name in ("mu", "var", "u", "v"):
        buf = {"mu": layer.running_mean, "var": layer.running_var, "u": layer.u,
               "v": layer.v}[name]
        torch.testing.assert_close(buf.double(), getattr(ref, name), rtol=rtol, atol=atol,
                                   msg=f"state {name}")


@pytest.mark.parametrize("ecm", ["ls", "ac", None])
@pytest.mark.parametrize("shape", [(7, 3, 4, 5), (9, 4), (5, 2, 6)])
def test_matches_per_sample_reference_over_steps(ecm, shape):
    c = shape[1]
    alpha_fwd, alpha_bkw = 0.9, 0.8  # fast decays so that every term matters
    layer = _layer(c, ecm, alpha_fwd=alpha_fwd, alpha_bkw=alpha_bkw)
    if ecm == "ac":
        with torch.no_grad():
            layer.weight.fill_(4.0)  # make some activations clamp
    ref = RefOnlineNorm(c, alpha_fwd, alpha_bkw, 1e-5, ecm, layer.weight, layer.bias)
    clamped = 0
    for step in range(4):
        x = torch.randn(shape, dtype=torch.float64) * (1 + step) + 2.0 * step
        g = torch.randn(shape, dtype=torch.float64)
        out, dx = _step(layer, x, g)
        ref_out = ref.forward(x)
        ref_grads = ref.backward(g)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dx, ref_grads["x"], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(layer.weight.grad, ref_grads["weight"], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(layer.bias.grad, ref_grads["bias"], rtol=1e-9, atol=1e-11)
        _assert_state(layer, ref, rtol=1e-9, atol=1e-11)
        clamped += int((out.abs() >= 5).sum())
    if ecm == "ac":
        assert clamped > 0, "the clamping branch was not exercised"
    # The controllers moved away from their zero start: the backward terms were active.
    assert layer.u.abs().max() > 1e-3 and layer.v.abs().max() > 1e-3


def test_float32_layer_matches_reference_at_paper_defaults():
    shape = (16, 8, 6, 6)
    layer = _layer(8, "ls", dtype=torch.float32)
    ref = RefOnlineNorm(8, 0.999, 0.99, 1e-5, "ls", layer.weight, layer.bias)
    for _ in range(3):
        x = torch.randn(shape) * 3 + 1
        g = torch.randn(shape)
        out, dx = _step(layer, x, g)
        torch.testing.assert_close(out.double(), ref.forward(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx.double(), ref.backward(g)["x"], rtol=1e-4, atol=1e-5)
    _assert_state(layer, ref, rtol=1e-5, atol=1e-6)


def test_long_batch_with_fast_decay_is_stable():
    # alpha^-N would overflow float64 here (0.5^-3000 = 1e903): the scan must not use it.
    n, c = 3000, 2
    alpha_fwd, alpha_bkw = 0.5, 0.5
    layer = _layer(c, None, alpha_fwd=alpha_fwd, alpha_bkw=alpha_bkw, affine=False)
    ref = RefOnlineNorm(c, alpha_fwd, alpha_bkw, 1e-5, None)
    x = torch.randn(n, c, 3, dtype=torch.float64) * 2 + 1
    g = torch.randn(n, c, 3, dtype=torch.float64)
    out, dx = _step(layer, x, g)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    torch.testing.assert_close(out, ref.forward(x), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(dx, ref.backward(g)["x"], rtol=1e-8, atol=1e-10)
    _assert_state(layer, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("ecm", ["ls", "ac"])
def test_partition_invariance(ecm):
    """One batch of N gives the outputs, gradients and final state of N batches of 1
    (and of any other split)."""
    n, shape = 10, (10, 3, 4, 4)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    g = torch.randn(shape, dtype=torch.float64)
    base = _layer(3, ecm, alpha_fwd=0.8, alpha_bkw=0.7)
    results = {}
    for split in ([n], [1] * n, [3, 5, 2]):
        layer = copy.deepcopy(base)
        outs, dxs = [], []
        wgrad = torch.zeros(3, dtype=torch.float64)
        start = 0
        for size in split:
            out, dx = _step(layer, x[start:start + size], g[start:start + size])
            outs.append(out)
            dxs.append(dx)
            wgrad += layer.weight.grad
            start += size
        state = torch.stack([layer.running_mean, layer.running_var, layer.u, layer.v])
        results[len(split)] = (torch.cat(outs), torch.cat(dxs), wgrad, state)
    whole = results[1]
    for key in (n, 3):
        for a, b in zip(whole, results[key], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_causality_forward_and_backward():
    """Output t does not depend on samples after t; the input gradient of sample t does
    not depend on the upstream gradients of samples after t."""
    shape = (8, 3, 5)
    x = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    x2, g2 = x.clone(), g.clone()
    x2[5:] = torch.randn(3, 3, 5, dtype=torch.float64) * 10 + 7
    g2[5:] = torch.randn(3, 3, 5, dtype=torch.float64) * 10
    base = _layer(3, None, alpha_fwd=0.7, alpha_bkw=0.6)
    out1, dx1 = _step(copy.deepcopy(base), x, g)
    out2, dx2 = _step(copy.deepcopy(base), x2, g2)
    torch.testing.assert_close(out1[:5], out2[:5], rtol=0, atol=0)
    torch.testing.assert_close(dx1[:5], dx2[:5], rtol=1e-13, atol=1e-14)
    assert not torch.allclose(out1[5:], out2[5:])
    assert not torch.allclose(dx1[5:], dx2[5:])


def test_statistics_converge_on_a_stationary_stream():
    torch.manual_seed(1)
    c, length = 4, 16
    true_mean = torch.tensor([3.0, -1.0, 0.0, 10.0], dtype=torch.float64)
    true_std = torch.tensor([2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    layer = OnlineNorm(c, alpha_fwd=0.99, alpha_bkw=0.99, affine=False, ecm=None,
                       dtype=torch.float64)
    late = []
    for step in range(40):
        x = torch.randn(64, c, length, dtype=torch.float64) * true_std[:, None] + \
            true_mean[:, None]
        y = layer(x)
        if step >= 30:
            late.append(y.detach())
    torch.testing.assert_close(layer.running_mean, true_mean, rtol=0, atol=0.12)
    torch.testing.assert_close(layer.running_var.sqrt() / true_std,
                               torch.ones(c, dtype=torch.float64), rtol=0, atol=0.08)
    y = torch.cat(late).transpose(0, 1).reshape(c, -1)
    torch.testing.assert_close(y.mean(1), torch.zeros(c, dtype=torch.float64), rtol=0,
                               atol=0.06)
    torch.testing.assert_close(y.var(1), torch.ones(c, dtype=torch.float64), rtol=0,
                               atol=0.1)


def test_controllers_enforce_bn_gradient_constraints_on_a_stream():
    """With an upstream gradient that has a mean and a component along y, the paper's
    controllers drive the running means of dL/dx and of g'*y to zero: u and v settle,
    so their per-sample increments (exactly those means) vanish."""
    torch.manual_seed(2)
    c, length = 3, 8
    layer = OnlineNorm(c, alpha_fwd=0.99, alpha_bkw=0.9, affine=False, ecm=None,
                       dtype=torch.float64)
    mean_dx, mean_gy, u_hist, v_hist = [], [], [], []
    for _ in range(60):
        x = (torch.randn(32, c, length, dtype=torch.float64) * 2 + 1).requires_grad_(True)
        y = layer(x)
        g = 0.7 + 1.5 * y.detach() + torch.randn_like(y)
        y.backward(g)
        mean_dx.append(x.grad.mean().item())
        mean_gy.append((g * y.detach()).mean().item())
        u_hist.append(layer.u.clone())
        v_hist.append(layer.v.clone())
    n_late = 32 * 30
    u_rate = ((u_hist[-1] - u_hist[29]) / n_late).abs().max().item()
    v_rate = ((v_hist[-1] - v_hist[29]) / n_late).abs().max().item()
    gy = sum(mean_gy[30:]) / 30  # ~1.5: what an uncontrolled gradient would carry
    assert gy > 1.0
    assert v_rate < 0.02 * gy, (v_rate, gy)
    assert u_rate < 0.02 * 0.7, u_rate
    late_dx = sum(mean_dx[30:]) / 30
    early_g_over_sigma = 0.7 / math.sqrt(4.0)  # the mean dx would have without u
    assert abs(late_dx) < 0.05 * early_g_over_sigma, late_dx


def test_eval_equals_training_forward_with_frozen_buffers():
    layer = _layer(3, "ls", alpha_fwd=0.9)
    for _ in range(3):  # move the buffers away from their initial values
        layer(torch.randn(6, 3, 4, 4, dtype=torch.float64) * 3 + 2)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y_eval = layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"eval changed {k}"
    for i in range(5):
        fresh = copy.deepcopy(layer).train()
        y_train = fresh(x[i:i + 1])
        torch.testing.assert_close(y_eval[i:i + 1], y_train, rtol=1e-12, atol=1e-12)
    # A sample's eval output does not depend on the rest of its batch.
    torch.testing.assert_close(layer(x[2:3]), y_eval[2:3], rtol=1e-12, atol=1e-12)


def test_eval_gradient_is_the_true_gradient():
    layer = _layer(3, "ls", alpha_fwd=0.9)
    layer(torch.randn(4, 3, 5, dtype=torch.float64) + 1)
    layer.eval()
    x = torch.randn(3, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.count_nonzero(layer.u) == 0 and torch.count_nonzero(layer.v) == 0


@pytest.mark.parametrize("ecm", ["ls", "ac"])
def test_affine_and_ecm_gradcheck(ecm):
    c = 3
    x = torch.randn(4, c, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)

    def head(x, w, b):
        z = x * w.view(1, c, 1) + b.view(1, c, 1)
        return NF.layer_scaling(z, 1e-5) if ecm == "ls" else NF.activation_clamp(z * 4, 5.0)

    assert torch.autograd.gradcheck(head, (x, w, b))


def test_layer_scaling_and_clamp_values():
    z = torch.randn(3, 4, 5, dtype=torch.float64) * 3
    ls = NF.layer_scaling(z, 1e-5)
    ms = (z * z).mean((1, 2), keepdim=True)
    torch.testing.assert_close(ls, z / torch.sqrt(ms + 1e-5))
    torch.testing.assert_close((ls * ls).mean((1, 2)), ms.flatten() / (ms.flatten() + 1e-5))
    ac = NF.activation_clamp(z, 5.0)
    assert ac.abs().max() <= 5.0
    torch.testing.assert_close(ac[z.abs() < 5], z[z.abs() < 5], rtol=0, atol=0)


def test_backward_mutates_controllers_and_is_not_idempotent():
    layer = _layer(3, None, alpha_bkw=0.5)
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y) + 1
    (dx1,) = torch.autograd.grad(y, x, g, retain_graph=True)
    u1, v1 = layer.u.clone(), layer.v.clone()
    assert u1.abs().max() > 0 and v1.abs().max() > 0
    (dx2,) = torch.autograd.grad(y, x, g)
    assert not torch.allclose(dx1, dx2)
    assert not torch.allclose(layer.u, u1)
    assert not torch.allclose(layer.v, v1)


def test_forward_updates_only_forward_state():
    layer = OnlineNorm(3, dtype=torch.float64)
    with torch.no_grad():
        layer(torch.randn(4, 3, 5, dtype=torch.float64) + 5)
    assert layer.running_mean.abs().min() > 0
    assert torch.count_nonzero(layer.u) == 0 and torch.count_nonzero(layer.v) == 0
    assert int(layer.num_batches_tracked) == 1


def test_linear_scan_matches_loop_with_any_coefficients():
    torch.manual_seed(3)
    for n in (1, 2, 5, 64, 77):
        a = torch.randn(n, 4, dtype=torch.float64)  # negative and near-zero included
        a[n // 2] = 0.0
        b = torch.randn(n, 4, dtype=torch.float64)
        z0 = torch.randn(4, dtype=torch.float64)
        z, ref = z0.clone(), []
        for t in range(n):
            z = a[t] * z + b[t]
            ref.append(z)
        torch.testing.assert_close(NF.linear_scan(a, b, z0), torch.stack(ref), rtol=1e-10,
                                   atol=1e-10)
        torch.testing.assert_close(NF.linear_scan(0.9, b, z0),
                                   NF.linear_scan(torch.full_like(b, 0.9), b, z0))


def test_state_dict_and_initial_values():
    layer = OnlineNorm(5)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                       "u", "v"}
    for key, value in (("running_mean", 0.0), ("running_var", 1.0), ("u", 0.0), ("v", 0.0),
                       ("weight", 1.0), ("bias", 0.0)):
        assert sd[key].shape == (5,)
        assert torch.all(sd[key] == value), key
    # Identity affine at init, no ECM: the first sample is normalized by (0, 1).
    plain = OnlineNorm(2, ecm=None)
    x = torch.randn(1, 2, 3)
    torch.testing.assert_close(plain(x), x / math.sqrt(1 + 1e-5))
    assert OnlineNorm(4, affine=False).weight is None
    # Round trip.
    other = OnlineNorm(5)
    other.load_state_dict(sd)


def test_nonfinite_input_does_not_poison_the_state():
    layer = OnlineNorm(3, ecm=None, affine=False)
    layer(torch.randn(4, 3, 5) + 2)
    before = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(4, 3, 5)
    x[1, 0, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"OnlineNorm\(3\).*\[0\]"):
        y = layer(x)
    # NaN in gives NaN out: the bad value itself, then channel 0 of every later sample
    # (normalized by statistics that now include it); nothing else.
    assert torch.isnan(y[1, 0, 2]) and torch.isnan(y[2:, 0]).all()
    assert torch.isfinite(y[:, 1:]).all() and torch.isfinite(y[0]).all()
    assert layer.running_mean[0] == before[0][0] and layer.running_var[0] == before[1][0]
    assert layer.running_mean[1] != before[0][1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    ref = OnlineNorm(4)
    half = copy.deepcopy(ref)
    x = torch.randn(6, 4, 5, 5) * 2 + 1
    y32 = ref(x)
    xh = x.to(dtype).requires_grad_(True)
    yh = half(xh)
    assert yh.dtype == dtype
    torch.testing.assert_close(yh.float(), y32.detach(), rtol=0.05, atol=0.05)
    yh.float().sum().backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad.float()).all()
    assert half.running_mean.dtype == torch.float32


def test_errors_name_the_layer():
    layer = OnlineNorm(3)
    with pytest.raises(ValueError, match=r"OnlineNorm\(3\).*channels"):
        layer(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"OnlineNorm\(3\).*dimensions"):
        layer(torch.randn(3))
    with pytest.raises(TypeError, match=r"OnlineNorm\(3\)"):
        layer(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"OnlineNorm\(3\).*ecm"):
        OnlineNorm(3, ecm="bn")
    with pytest.raises(ValueError, match=r"OnlineNorm\(3\).*alpha_fwd"):
        OnlineNorm(3, alpha_fwd=1.5)


def test_registry_and_exports():
    for name in ("online", "on", "OnlineNorm"):
        layer = create_norm(name, 6, alpha_fwd=0.9, ecm="ac")
        assert isinstance(layer, normlab.nn.OnlineNorm)
        assert layer.alpha_fwd == 0.9 and layer.ecm == "ac" and layer.num_channels == 6
    assert isinstance(layer, normlab.nn.NormBase)


def test_swap_norm_builds_online_layers():
    from normlab.convert import swap_norm

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
    net, replaced = swap_norm(net, "on", ecm="ac")
    on = net[1]
    assert isinstance(on, OnlineNorm) and on.ecm == "ac" and len(replaced) == 1
    assert on.weight.min() >= 0.5  # the per-channel affine came along
    assert torch.all(on.running_var == 1)  # BN's running stats are not ON's state
    net(torch.randn(1, 3, 9, 9)).sum().backward()
    assert on.u.abs().max() > 0


# ---------------------------------------------------------------------------------------
# The default training step as one function (functional.online_norm_step): online norm,
# affine and layer scaling, forward and the paper's backward, against the loop above.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(9, 4), (6, 3, 7), (5, 3, 4, 5), (1, 3, 4, 4), (1, 5)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("ecm", ["ls", None])
def test_step_function_matches_per_sample_reference(shape, affine, ecm):
    c = shape[1]
    alpha_fwd, alpha_bkw = 0.8, 0.7
    layer = _layer(c, ecm, affine=affine, alpha_fwd=alpha_fwd, alpha_bkw=alpha_bkw)
    ref = RefOnlineNorm(c, alpha_fwd, alpha_bkw, 1e-5, ecm, layer.weight, layer.bias)
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + step) + 3.0 * step
        g = torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5
        out, dx = _step(layer, x, g)
        ref_out = ref.forward(x)
        ref_grads = ref.backward(g)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dx, ref_grads["x"], rtol=1e-9, atol=1e-11)
        if affine:
            torch.testing.assert_close(layer.weight.grad, ref_grads["weight"], rtol=1e-9,
                                       atol=1e-11)
            torch.testing.assert_close(layer.bias.grad, ref_grads["bias"], rtol=1e-9,
                                       atol=1e-11)
        _assert_state(layer, ref, rtol=1e-9, atol=1e-11)
    assert layer.u.abs().max() > 1e-4 and layer.v.abs().max() > 1e-4


def test_step_function_direct_call_and_parameter_grads_only():
    """The functional form equals the layer; with an input that needs no gradient, the
    parameter gradients are still right and u, v are left alone (no dx, no controllers:
    as the separate online_norm function does)."""
    from normlab.functional.online import online_norm_step

    c, shape = 3, (6, 3, 5)
    layer = _layer(c, "ls", alpha_fwd=0.8, alpha_bkw=0.7)
    ref = RefOnlineNorm(c, 0.8, 0.7, 1e-5, "ls", layer.weight, layer.bias)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    g = torch.randn(shape, dtype=torch.float64)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    buffers = [t.clone() for t in (layer.running_mean, layer.running_var, layer.u, layer.v)]
    out = online_norm_step(x, *buffers, w, b, 0.8, 0.7, 1e-5, layer_scaling=True)
    out.backward(g)
    ref_out = ref.forward(x)
    ref_grads = ref.backward(g)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, ref_grads["weight"], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(b.grad, ref_grads["bias"], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(buffers[0], ref.mu, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(buffers[2]) == 0 and torch.count_nonzero(buffers[3]) == 0


def test_step_function_large_mean_is_exact_to_float32():
    """1e4 + N(0, 1) in float32: x - (row mean) is exact, so the default path keeps
    float32 accuracy (x * a + b with a cancelling b would lose about 1e4 ulps)."""
    shape = (8, 3, 6, 6)
    gen = torch.Generator().manual_seed(3)
    x = (1e4 + torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    g = torch.randn(shape, generator=gen)
    layer = _layer(3, "ls", dtype=torch.float32, alpha_fwd=0.5, alpha_bkw=0.8)
    with torch.no_grad():  # start the statistics at the data, so the output is O(1)
        layer.running_mean.fill_(1e4)
    ref = RefOnlineNorm(3, 0.5, 0.8, 1e-5, "ls", layer.weight, layer.bias)
    ref.mu.fill_(1e4)
    out, dx = _step(layer, x, g)
    ref_out = ref.forward(x)
    ref_dx = ref.backward(g)["x"]
    assert float((out.double() - ref_out).abs().max()) <= 2e-6 * float(ref_out.abs().max())
    assert float((dx.double() - ref_dx).abs().max()) <= 2e-5 * float(ref_dx.abs().max())
    torch.testing.assert_close(layer.running_mean.double(), ref.mu, rtol=1e-7, atol=0)
    torch.testing.assert_close(layer.running_var.double(), ref.var, rtol=1e-5, atol=0)


def test_step_function_layouts_and_inplace_output():
    """channels_last input gives the contiguous input's results; the output may be
    modified in place (ReLU(inplace=True)) without touching what backward reads."""
    base = _layer(4, "ls", dtype=torch.float32, alpha_fwd=0.9, alpha_bkw=0.8)
    x = torch.randn(5, 4, 3, 6) * 2 + 1
    g = torch.randn(5, 4, 3, 6)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    out_a, dx_a = _step(a, x, g)
    out_b, dx_b = _step(b, x.contiguous(memory_format=torch.channels_last), g)
    torch.testing.assert_close(out_b, out_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx_b, dx_a, rtol=1e-5, atol=1e-6)
    c = copy.deepcopy(base)
    xr = x.clone().requires_grad_(True)
    y = torch.relu_(c(xr))
    y.backward(g)
    mask = (out_a > 0).float()
    ref = copy.deepcopy(base)
    xr2 = x.clone().requires_grad_(True)
    ref(xr2).backward(g * mask)
    torch.testing.assert_close(xr.grad, xr2.grad, rtol=0, atol=0)


def test_step_function_nan_stays_in_its_entry_without_ecm():
    """A NaN entry makes that output and the later samples of its channel NaN (they
    are normalized by statistics that include it), and nothing else: the rest of its
    own row is normalized by the earlier statistics, as in the per-sample loop."""
    layer = OnlineNorm(3, ecm=None, affine=False, dtype=torch.float64)
    ref = RefOnlineNorm(3, 0.999, 0.99, 1e-5, None)
    x = torch.randn(4, 3, 5, dtype=torch.float64) + 2
    x[1, 0, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"OnlineNorm\(3\)"):
        y = layer(x)
    expected = ref.forward(x)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(y), nan) and nan.sum() == 1 + 2 * 5
    torch.testing.assert_close(y[~nan], expected[~nan], rtol=1e-10, atol=1e-12)


def _scan_loop(a, b, z0):
    z, out = z0.clone(), []
    for t in range(b.shape[0]):
        z = a[t] * z + b[t]
        out.append(z)
    return torch.stack(out)


@pytest.mark.parametrize("case", ["uniform", "near_zero", "tiny", "long", "ones",
                                  "fallback"])
def test_product_scan_equals_hillis_steele_scan(case):
    """Coefficient tensors in (0, 1] take the chunked cumprod/cumsum scan; it equals the
    Hillis-Steele scan and the plain loop, also for coefficients near 0 (many chunks or
    the Hillis-Steele fallback) and long N; coefficients <= 0 fall back."""
    from normlab.functional.online import _hillis_steele_scan, _product_scan

    gen = torch.Generator().manual_seed(5)
    n = 5000 if case == "long" else 200
    a = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    if case == "uniform":
        a = 0.5 + 0.5 * a
    elif case == "near_zero":  # down to ~1e-5: chunks of ~25 steps, 8 of them
        a = 1e-12 + 1e-3 * a
        a[::7] = 1.0
    elif case == "tiny":  # down to ~1e-9: too many chunks, Hillis-Steele
        a = 1e-30 + 1e-6 * a
    elif case == "long":
        a = 0.6 + 0.4 * a  # prod over 5000 steps ~ e^-1000: 9 chunks
    elif case == "ones":
        a = torch.ones(n, 3, dtype=torch.float64)
    else:
        a = a - 0.2  # some coefficients <= 0
    b = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    z0 = torch.randn(3, dtype=torch.float64)
    scan = NF.linear_scan(a, b, z0)
    hs = _hillis_steele_scan(a.t(), b.t(), z0.unsqueeze(1)).t()
    torch.testing.assert_close(scan, hs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scan, _scan_loop(a, b, z0), rtol=1e-10, atol=1e-12)
    assert torch.isfinite(scan).all()
    took = _product_scan(a.t(), b.t().contiguous(), z0.unsqueeze(1), torch.empty(3, n,
                                                                             dtype=a.dtype))
    assert took == (case in ("uniform", "near_zero", "long", "ones"))
