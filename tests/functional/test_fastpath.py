"""The fast paths against the reference paths they replace.

* The default ("auto") paths of batch/group/layer/instance/channel-layer norm, which
  call torch's native kernels (shifted where their float sums are weak), against the
  composite over normlab.stats (``path="reference"``) and float64.
* The memory-saving batch norm (eager), layer scaling, instance moments and the
  constant-coefficient scan: gradcheck in float64 and equality with the composites.
* The fused C++ kernels (``normlab.kernels``): marked ``kernels`` (the first use
  compiles them, about 10 s; skipped only where no C++ compiler exists).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from normlab import functional as NF
from normlab import nn as nl
from normlab import stats
from normlab.bench import saved_bytes
from normlab.functional.core import instance_moments_fast, update_running_pair_
from normlab.functional.online import _LayerScaling, linear_scan
from normlab.kernels.fused import _SaveOutputBatchNorm

CL = torch.channels_last


def _input(shape, dtype=torch.float32, layout="nchw", offset=0.0, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=CL)
    return x


def _grads(fn, x, params, g):
    x = x.detach().clone().requires_grad_(True)
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    y = fn(x, *ps)
    grads = torch.autograd.grad(y, [x, *ps], g)
    return y.detach(), grads


def _close(a, b, rtol):
    """Relative to the largest magnitude (entries near 0 come out of differences of
    O(max) terms): max |a - b| <= rtol * max |b|."""
    a, b = a.double(), b.double()
    assert float((a - b).abs().max()) <= rtol * float(b.abs().max()) + 1e-30


LAYOUTS = [((4, 6, 5, 7), "nchw"), ((4, 6, 5, 7), "cl"), ((8, 6), "nchw"), ((3, 6, 9), "nchw")]


# ----------------------------------------------------------------------------- default paths


@pytest.mark.parametrize("shape,layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_default_equals_reference(shape, layout, dtype, training):
    c = shape[1]
    x = _input(shape, dtype, layout, offset=3.0, scale=2.0)
    g = _input(shape, dtype, layout, seed=1)
    w, b = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    runs = {}
    rm0, rv0 = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    for path in ("auto", "reference"):
        rm, rv = rm0.clone(), rv0.clone()

        def fn(x, w, b, rm=rm, rv=rv, path=path):
            return NF.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-5, path=path)

        runs[path] = (*_grads(fn, x, (w, b), g), rm, rv)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    (ya, ga, rma, rva), (yr, gr, rmr, rvr) = runs["auto"], runs["reference"]
    _close(ya, yr, rtol)
    for a, r in zip(ga, gr, strict=True):
        _close(a, r, rtol * 10)
    _close(rma, rmr, rtol)
    _close(rva, rvr, rtol)


@pytest.mark.parametrize("name", ["group", "layer", "instance", "channel_layer"])
@pytest.mark.parametrize("shape,layout", LAYOUTS[:2] + [((3, 6, 9), "nchw")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_norms_default_equal_reference(name, shape, layout, dtype):
    c = shape[1]
    x = _input(shape, dtype, layout, offset=-2.0, scale=3.0)
    g = _input(shape, dtype, layout, seed=1)
    w, b = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    calls = {
        "group": lambda x, w, b, p: NF.group_norm(x, 3, w, b, 1e-5, path=p),
        "layer": lambda x, w, b, p: NF.layer_norm(x, w, b, 1e-5, path=p),
        "instance": lambda x, w, b, p: NF.instance_norm(x, None, None, w, b, path=p),
        "channel_layer": lambda x, w, b, p: NF.channel_layer_norm(x, w, b, 1e-5, path=p),
    }
    ya, ga = _grads(lambda x, w, b: calls[name](x, w, b, "auto"), x, (w, b), g)
    yr, gr = _grads(lambda x, w, b: calls[name](x, w, b, "reference"), x, (w, b), g)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    _close(ya, yr, rtol)
    for a, r in zip(ga, gr, strict=True):
        _close(a, r, rtol * 10)


def test_instance_norm_running_stats_default_equals_reference():
    x = _input((5, 4, 6, 6), offset=1.0, scale=2.0)
    stats_ = {}
    for path in ("auto", "reference"):
        rm, rv = torch.zeros(4), torch.ones(4)
        NF.instance_norm(x, rm, rv, None, None, True, 0.2, path=path)
        stats_[path] = (rm, rv)
    for a, r in zip(stats_["auto"], stats_["reference"], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_large_mean_channels_last_and_nchw_default_paths(layout):
    """1e4 + N(0, 1) in float32: batch and group norm within 1e-3 relative L2 of
    float64 on both layouts (torch's own channels_last kernels are not: 5e-3 for batch
    norm, 2e2 for group norm)."""
    x = _input((8, 8, 6, 6), offset=1e4, layout=layout)
    x64 = x.double()
    for fn in (lambda t: NF.batch_norm(t, None, None, training=True),
               lambda t: NF.group_norm(t, 4)):
        y, exact = fn(x), fn(x64)
        assert float((y.double() - exact).norm() / exact.norm()) < 1e-3
    rm, rv = torch.zeros(8), torch.ones(8)
    NF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rm.double(), x64.mean((0, 2, 3)), rtol=1e-7, atol=2e-3)
    torch.testing.assert_close(rv.double(), x64.var((0, 2, 3)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("offset", [0.0, 3.0, 30.0, 300.0, 1e4])
@pytest.mark.parametrize("case", ["bn_cl", "bn_2d", "gn_cl", "ln_cl"])
def test_float_sum_kernels_are_kept_or_redone_within_1e4(case, offset):
    """torch's channels_last and (N, C) kernels sum in float32; the default path keeps
    their result only where the statistics bound the error below 1e-4 and otherwise
    normalizes the shifted input. Either way: within 1e-4 relative L2 of float64, at
    |mean| / std from 0 to 1e4 and groups of up to 16k elements."""
    shape = {"bn_cl": (16, 8, 32, 32), "bn_2d": (4096, 8), "gn_cl": (4, 16, 32, 32),
             "ln_cl": (2, 8, 32, 32)}[case]
    x = _input(shape, offset=offset, layout="nchw" if case == "bn_2d" else "cl")
    call = {"bn_cl": lambda t: NF.batch_norm(t, None, None, training=True),
            "bn_2d": lambda t: NF.batch_norm(t, None, None, training=True),
            "gn_cl": lambda t: NF.group_norm(t, 4), "ln_cl": lambda t: NF.layer_norm(t)}[case]
    y = call(x)
    exact = call(x.double().contiguous())
    assert float((y.double() - exact).norm() / exact.norm()) < 1e-4
    if case != "bn_2d":
        assert y.is_contiguous(memory_format=CL)


def test_channels_last_batch_norm_shifts_only_when_the_bound_asks(monkeypatch):
    from normlab.functional import fastpath

    shifts = []
    original = fastpath._first_value_per_channel
    monkeypatch.setattr(fastpath, "_first_value_per_channel",
                        lambda t: shifts.append(1) or original(t))
    bn = nl.BatchNorm(8)
    bn(_input((8, 8, 16, 16), layout="cl", offset=2.0))  # R = 2: the kernel's sums are fine
    assert shifts == []
    bn(_input((8, 8, 16, 16), layout="cl", offset=1e3))
    assert shifts == [1]
    # The redo's running statistics are those of the batch (the first call's undone).
    rm, rv = torch.zeros(8), torch.ones(8)
    x = _input((8, 8, 16, 16), layout="cl", offset=1e3)
    NF.batch_norm(x, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(rm.double(), x.double().mean((0, 2, 3)), rtol=1e-7, atol=0)
    torch.testing.assert_close(rv.double(), x.double().var((0, 2, 3)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape,layout", [((3, 4, 5, 5), "nchw"), ((3, 4, 5, 5), "cl"),
                                          ((6, 4), "nchw")])
def test_overflowing_variance_spares_running_var(shape, layout):
    """A finite batch whose variance overflows float32 (values near 3e19): the running
    variance of that channel keeps its value, with a warning, on every native path."""
    bn = nl.BatchNorm(4)
    x = _input(shape, layout=layout)
    x[:, 1] = x[:, 1] * 3e19
    before = bn.running_var.clone()
    with pytest.warns(RuntimeWarning, match=re.escape("BatchNorm(4)") + ".*channels \\[1\\]"):
        bn(x)
    assert torch.isfinite(bn.running_var).all() and torch.isfinite(bn.running_mean).all()
    assert torch.equal(bn.running_var[1], before[1])
    assert not torch.equal(bn.running_var[[0, 2, 3]], before[[0, 2, 3]])


def test_channels_last_stays_channels_last():
    x = _input((4, 8, 5, 5), layout="cl")
    assert NF.batch_norm(x, None, None, training=True).is_contiguous(memory_format=CL)
    assert NF.group_norm(x, 4).is_contiguous(memory_format=CL)


@pytest.mark.parametrize("shape,layout", [((3, 4, 5, 5), "nchw"), ((3, 4, 5, 5), "cl"),
                                          ((6, 4), "nchw")])
def test_nan_batch_spares_running_stats_on_native_paths(shape, layout):
    bn = nl.BatchNorm(4)
    x = _input(shape, layout=layout)
    before = bn.running_mean.clone(), bn.running_var.clone()
    x[(1, 2) + (3,) * (x.dim() - 2)] = float("nan")
    with pytest.warns(RuntimeWarning, match=re.escape("BatchNorm(4)") + ".*channels \\[2\\]"):
        y = bn(x)
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, [0, 1, 3]]).all()
    assert torch.equal(bn.running_mean[2], before[0][2])
    assert torch.equal(bn.running_var[2], before[1][2])
    assert not torch.equal(bn.running_mean[[0, 1, 3]], before[0][[0, 1, 3]])


def test_update_running_pair_is_update_running():
    for bad in (False, True):
        batch = torch.randn(2, 5)
        if bad:
            batch[1, 3] = float("inf")
        rm, rv = torch.randn(5), torch.rand(5)
        rm2, rv2 = rm.clone(), rv.clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            update_running_pair_(rm, rv, batch, 0.25, "pair")
            NF.update_running_(rm2, batch[0], 0.25, "single")
            NF.update_running_(rv2, batch[1], 0.25, "single")
        assert torch.equal(rm, rm2) and torch.equal(rv, rv2)
        assert len(caught) == (2 if bad else 0)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_default_batch_norm_double_backward(layout):
    """Double backward (Hessian-vector products, claim 5) works on the native paths."""
    x = _input((3, 2, 3, 3), torch.float64, layout).requires_grad_(True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: NF.batch_norm(x, None, None, w, b, training=True)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


# ----------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("act,slope", [(0, 0.0), (2, 0.1)])
def test_save_output_batch_norm_gradcheck(act, slope):
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: _SaveOutputBatchNorm.apply(x, w, b, 1e-5, act, slope)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_save_memory_equals_default_and_keeps_less():
    """BatchNorm(activation, save_memory=True) without the fused kernel: the same
    outputs, gradients and running statistics as the default path, and a block
    BN -> LeakyReLU -> conv keeps one activation tensor less."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6) * 2 + 1
    g = torch.randn(4, 8, 6, 6)
    plain = nl.BatchNorm(8, activation="leaky_relu", negative_slope=0.1)
    saving = nl.BatchNorm(8, activation="leaky_relu", negative_slope=0.1, save_memory=True)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.normal_()
    saving.load_state_dict(plain.state_dict())
    outs = []
    for m in (plain, saving):
        xr = x.clone().requires_grad_(True)
        y = m(xr)
        y.backward(g)
        outs.append((y.detach(), xr.grad, m.weight.grad, m.bias.grad, m.running_mean,
                     m.running_var))
    for a, r in zip(*outs, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
    xr = x.clone().requires_grad_(True)
    kept_plain = saved_bytes(lambda: conv(plain(xr)))
    kept_saving = saved_bytes(lambda: conv(saving(xr)))
    assert kept_plain - kept_saving >= x.numel() * 4  # at least one float32 tensor less


def test_save_memory_rejects_relu():
    with pytest.raises(ValueError, match=r"BatchNorm\(4\).*invertible"):
        nl.BatchNorm(4, activation="relu", save_memory=True)


def test_layer_scaling_gradcheck_and_formula():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _LayerScaling.apply(t, 1e-5), (x,))
    y = NF.layer_scaling(x.detach())
    ref = x.detach() / torch.sqrt((x.detach() ** 2).mean((1, 2), keepdim=True) + 1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 7])
def test_instance_moments_fast_gradcheck_and_values(length):
    x = torch.randn(3, 4, length, dtype=torch.float64) * 2 + 5
    mean, var = instance_moments_fast(x)
    ref = stats.moments(x, 2)
    torch.testing.assert_close(mean, ref.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref.var, rtol=1e-10, atol=1e-12)
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: sum(v.sum() * (i + 1) for i, v in
                                                  enumerate(instance_moments_fast(t))), (xg,))


@pytest.mark.parametrize("a", [0.5, 0.9, 0.999, 1.0])
def test_constant_scan_equals_general_scan(a):
    n = 2000 if a == 0.5 else 300
    inp = torch.randn(n, 3, dtype=torch.float64)
    init = torch.randn(3, dtype=torch.float64)
    fast = linear_scan(a, inp, init)
    general = linear_scan(torch.full((n, 1), a, dtype=torch.float64), inp, init)
    loop, z = [], init
    for t in range(n):
        z = a * z + inp[t]
        loop.append(z)
    torch.testing.assert_close(fast, torch.stack(loop), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(general, torch.stack(loop), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- fused kernels

FUSED_CASES = [
    ((8, 6, 5, 7), "nchw"), ((8, 6, 5, 7), "cl"), ((16, 6), "nchw"), ((4, 5, 33), "nchw"),
    ((2, 3, 70, 70), "nchw"),  # rows longer than the kernel's 4096-element chunks
]


def _fused_vs_default(shape, layout, dtype, activation, affine, save_memory, offset=0.0):
    c = shape[1]
    x = _input(shape, torch.float32, layout, offset=offset, scale=2.0).to(dtype)
    g = _input(shape, torch.float32, layout, seed=1).to(dtype)
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        m = nl.BatchNorm(c, affine=affine, activation=activation, negative_slope=0.1,
                         fused=fused, save_memory=save_memory and fused)
        if affine:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
        xr = x.clone().requires_grad_(True)
        y = m(xr)
        y.backward(g)
        grads = [xr.grad] + ([m.weight.grad, m.bias.grad] if affine else [])
        results.append((y.detach(), grads, m.running_mean.clone(), m.running_var.clone()))
    return results


@pytest.mark.kernels
@pytest.mark.parametrize("shape,layout", FUSED_CASES)
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("affine", [True, False])
def test_fused_equals_default_float32(shape, layout, activation, affine):
    (yd, gd, rmd, rvd), (yf, gf, rmf, rvf) = _fused_vs_default(
        shape, layout, torch.float32, activation, affine, False)
    _close(yf, yd, 2e-6)
    for a, r in zip(gf, gd, strict=True):
        _close(a, r, 2e-5)
    torch.testing.assert_close(rmf, rmd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rvf, rvd, rtol=1e-5, atol=1e-6)


@pytest.mark.kernels
@pytest.mark.parametrize("shape,layout", FUSED_CASES[:3])
@pytest.mark.parametrize("activation", [None, "leaky_relu"])
def test_fused_save_memory_equals_default(shape, layout, activation):
    (yd, gd, rmd, rvd), (yf, gf, rmf, rvf) = _fused_vs_default(
        shape, layout, torch.float32, activation, True, True)
    _close(yf, yd, 2e-6)
    for a, r in zip(gf, gd, strict=True):
        _close(a, r, 5e-5)
    torch.testing.assert_close(rmf, rmd, rtol=1e-6, atol=1e-6)


@pytest.mark.kernels
@pytest.mark.parametrize("shape,layout", FUSED_CASES[:3])
def test_fused_bfloat16_equals_float32_math(shape, layout):
    """bfloat16: the fused kernel computes in float32; only the final rounding differs."""
    (yd, gd, _, _), (yf, gf, _, _) = _fused_vs_default(
        shape, layout, torch.bfloat16, "leaky_relu", True, False)
    assert yf.dtype == torch.bfloat16 and gf[0].dtype == torch.bfloat16
    _close(yf, yd, 2**-7)
    _close(gf[0], gd[0], 2**-6)


@pytest.mark.kernels
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_fused_large_mean_is_exact_to_float32(layout):
    x = _input((16, 4, 8, 8), offset=1e4, layout=layout)
    m = nl.BatchNorm(4, fused=True)
    y = m(x)
    exact = NF.batch_norm(x.double(), None, None, training=True)
    assert float((y.detach().double() - exact).norm() / exact.norm()) < 1e-6


@pytest.mark.kernels
def test_fused_nan_spares_running_stats_and_double_backward_is_refused():
    m = nl.BatchNorm(3, fused=True)
    x = torch.randn(4, 3, 5, 5)
    x[0, 1, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"BatchNorm\(3\).*channels \[1\]"):
        y = m(x)
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()
    assert m.running_mean[1] == 0 and m.running_var[1] == 1
    xr = torch.randn(4, 3, 5, 5, requires_grad=True)
    (gx,) = torch.autograd.grad(m(xr).sum(), xr, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


@pytest.mark.kernels
def test_fused_falls_back_where_the_kernel_does_not_apply():
    """float64 input and eval mode take the default path (identical results)."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    a, b = nl.BatchNorm(3, dtype=torch.float64, fused=True), nl.BatchNorm(3, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    a.eval()
    b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
