"""The fused Online Norm kernel (``OnlineNorm(C, fused=True)``, normlab.kernels.online)
against the default path and against the float64 per-sample loop of test_online.py
(written from the paper's Algorithms 1 and 2), over several steps: outputs, dx, dweight,
dbias and the four buffers. Tests that run the kernel are marked ``kernels`` (the first
use compiles it; skipped only where no C++ compiler exists); the fallbacks that never
reach it are not."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from nn.test_online import RefOnlineNorm
from normlab.nn import OnlineNorm


def _close(a, b, rtol, what=""):
    """max |a - b| <= rtol * max |b| (entries near 0 come out of O(max) terms)."""
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max())
    assert err <= rtol * float(b.abs().max()) + 1e-30, (what, err, float(b.abs().max()))


def _pair(c, affine=True, ecm="ls", dtype=torch.float32, **kw):
    """A default and a fused layer with the same (non-trivial) parameters."""
    torch.manual_seed(0)
    base = OnlineNorm(c, affine=affine, ecm=ecm, dtype=dtype, **kw)
    if affine:
        with torch.no_grad():
            base.weight.uniform_(0.5, 2.0)
            base.bias.uniform_(-0.5, 0.5)
    fused = copy.deepcopy(base)
    fused.fused = True
    return base, fused


def _step(layer, x, g):
    xr = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(xr)
    y.backward(g)
    grads = [xr.grad] + ([layer.weight.grad, layer.bias.grad] if layer.affine else [])
    return y.detach(), grads


def _state(layer):
    return [layer.running_mean, layer.running_var, layer.u, layer.v]


SHAPES = [(16, 6), (8, 5, 33), (8, 6, 5, 7), (1, 4, 3, 3), (1, 7), (3, 3, 70, 70)]


@pytest.mark.kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("ecm", ["ls", None])
def test_fused_equals_default_over_steps(shape, affine, ecm):
    c = shape[1]
    # Fast decays, so that the scans and the controllers matter within a few steps.
    base, fused = _pair(c, affine, ecm, alpha_fwd=0.9, alpha_bkw=0.8)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(shape, generator=gen) * (1 + step) + 2.0 * step
        g = torch.randn(shape, generator=gen) + 0.3
        yd, gd = _step(base, x, g)
        yf, gf = _step(fused, x, g)
        _close(yf, yd, 2e-6, "out")
        for name, a, b in zip(("dx", "dweight", "dbias"), gf, gd, strict=False):
            _close(a, b, 2e-5, name)
        for name, a, b in zip(("mean", "var", "u", "v"), _state(fused), _state(base),
                              strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert fused.u.abs().max() > 1e-3 and fused.v.abs().max() > 1e-3
    assert int(fused.num_batches_tracked) == 3


@pytest.mark.kernels
@pytest.mark.parametrize("shape", [(6, 3, 4, 5), (9, 4)])
def test_fused_matches_float64_per_sample_reference(shape):
    c = shape[1]
    _, fused = _pair(c, True, "ls", alpha_fwd=0.9, alpha_bkw=0.8)
    ref = RefOnlineNorm(c, 0.9, 0.8, 1e-5, "ls", fused.weight, fused.bias)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        x = torch.randn(shape, generator=gen) * 2 + step
        g = torch.randn(shape, generator=gen)
        y, (dx, dw, db) = _step(fused, x, g)
        ref_y = ref.forward(x)
        ref_grads = ref.backward(g)
        _close(y, ref_y, 1e-6, "out")
        _close(dx, ref_grads["x"], 1e-5, "dx")
        _close(dw, ref_grads["weight"], 1e-5, "dweight")
        _close(db, ref_grads["bias"], 1e-5, "dbias")
        for name, buf in zip(("mu", "var", "u", "v"), _state(fused), strict=True):
            torch.testing.assert_close(buf.double(), getattr(ref, name), rtol=1e-5,
                                       atol=1e-6, msg=name)


@pytest.mark.kernels
def test_fused_large_mean_is_exact_to_float32():
    """1e4 + N(0, 1): the per-row shift keeps the normalization exact to float32
    rounding (x * a + b with a cancelling b would lose about 1e4 ulps)."""
    shape = (8, 3, 6, 6)
    gen = torch.Generator().manual_seed(3)
    x = (1e4 + torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    g = torch.randn(shape, generator=gen)
    _, fused = _pair(3, True, "ls", alpha_fwd=0.5, alpha_bkw=0.8)
    with torch.no_grad():  # start the statistics at the data, so the output is O(1)
        fused.running_mean.fill_(1e4)
    ref = RefOnlineNorm(3, 0.5, 0.8, 1e-5, "ls", fused.weight, fused.bias)
    ref.mu.fill_(1e4)
    y, (dx, _, _) = _step(fused, x, g)
    ref_y = ref.forward(x)
    _close(y, ref_y, 2e-6, "out")
    _close(dx, ref.backward(g)["x"], 2e-5, "dx")
    torch.testing.assert_close(fused.running_mean.double(), ref.mu, rtol=1e-7, atol=0)
    torch.testing.assert_close(fused.running_var.double(), ref.var, rtol=1e-5, atol=0)


@pytest.mark.kernels
def test_fused_bfloat16_computes_in_float32():
    shape = (6, 4, 5, 5)
    x = torch.randn(shape).bfloat16()
    g = torch.randn(shape).bfloat16()
    base, fused = _pair(4)
    yd, gd = _step(base, x.float(), g.float())  # float32 math on the same values
    yf, gf = _step(fused, x, g)
    assert yf.dtype == torch.bfloat16 and gf[0].dtype == torch.bfloat16
    _close(yf, yd, 2**-7, "out")
    _close(gf[0], gd[0], 2**-6, "dx")
    _close(gf[1], gd[1], 1e-4, "dweight")  # parameter grads are float32 sums


@pytest.mark.kernels
def test_fused_threads_give_identical_results():
    """The parallel path (C x L large enough) splits channels only: bitwise equal."""
    shape = (3, 64, 24, 24)
    x, g = torch.randn(shape), torch.randn(shape)
    _, one = _pair(64)
    two = copy.deepcopy(one)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, g1 = _step(one, x, g)
        torch.set_num_threads(2)
        y2, g2 = _step(two, x, g)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)
    for a, b in zip(g1 + _state(one), g2 + _state(two), strict=True):
        assert torch.equal(a, b)


@pytest.mark.kernels
def test_fused_nan_batch_leaves_state_guarded():
    base, fused = _pair(3, alpha_fwd=0.9)
    x = torch.randn(4, 3, 5)
    g = torch.randn(4, 3, 5)
    for layer in (base, fused):
        _step(layer, x, g)
    before = [t.clone() for t in _state(fused)]
    x = torch.randn(4, 3, 5)
    x[1, 0, 2] = float("nan")
    outs = []
    for layer in (base, fused):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs.append(_step(layer, x, g)[0])
        messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
        # forward: channel 0's statistics; backward: every channel's controllers
        assert sum("OnlineNorm(3)" in m and "[0]" in m for m in messages) == 2, messages
        assert sum("OnlineNorm(3)" in m and "[0, 1, 2]" in m for m in messages) == 2
    # Layer scaling spreads sample 1's NaN over that sample; the later samples see it in
    # channel 0's statistics (and, through layer scaling, in all their channels).
    y = outs[1]
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1:]).all()
    mean, var, u, v = _state(fused)
    assert mean[0] == before[0][0] and var[0] == before[1][0]
    assert (mean[1:] != before[0][1:]).all() and (var[1:] != before[1][1:]).all()
    # In backward the NaN reaches every channel's controllers (through layer scaling's
    # per-sample sum), so all of them keep their old values.
    assert torch.equal(u, before[2]) and torch.equal(v, before[3])
    for a, b in zip(_state(base), _state(fused), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.kernels
def test_fused_double_backward_is_refused():
    _, fused = _pair(3)
    x = torch.randn(4, 3, 5, requires_grad=True)
    (gx,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


@pytest.mark.parametrize("case", ["eval", "ac", "float64", "channels_last"])
def test_fused_falls_back_where_the_kernel_does_not_apply(case):
    """These take the default path: results identical to fused=False."""
    dtype = torch.float64 if case == "float64" else torch.float32
    base, fused = _pair(3, ecm="ac" if case == "ac" else "ls", dtype=dtype)
    x = torch.randn(5, 3, 4, 4, dtype=dtype) * 3
    g = torch.randn(5, 3, 4, 4, dtype=dtype)
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if case == "eval":
        base.eval()
        fused.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yd, gd = _step(base, x, g)
        yf, gf = _step(fused, x, g)
    assert torch.equal(yd, yf)
    for a, b in zip(gd + _state(base), gf + _state(fused), strict=True):
        assert torch.equal(a, b)
    assert "fused=True" in repr(fused)
