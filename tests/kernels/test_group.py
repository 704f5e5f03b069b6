"""The fused group norm / layer norm kernels (``GroupNorm(C, G, fused=True)``,
``LayerNorm(C, fused=True)``, normlab.kernels.group) against float64 math written
here from the equations (outputs, dx, dweight, dbias), against the default path, on
contiguous and channels_last inputs. Tests that run the kernel are marked ``kernels``
(the first use compiles it; skipped only where no C++ compiler exists); the fallbacks
that never reach it are not."""

from __future__ import annotations

import copy

import pytest
import torch

from normlab import functional as NF
from normlab.kernels import group as K
from normlab.nn import GroupNorm, LayerNorm
from normlab.registry import create_norm


def _ref(x, num_groups, weight, bias, eps=1e-5):
    """Group norm in float64, from the equation: per (sample, group) mean and biased
    variance over the group's channels and all trailing positions."""
    xd = x.double()
    n, c = x.shape[:2]
    xg = xd.reshape(n, num_groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def _close(a, b, rtol, what="", scale=None):
    """max |a - b| <= rtol * max |b| (entries near 0 come out of O(max) terms), or
    rtol * scale when the terms that cancel into b are larger than b."""
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max())
    scale = max(float(b.abs().max()), scale or 0.0)
    assert err <= rtol * scale + 1e-30, (what, err, scale)


def _dx_scale(x, num_groups, weight, g, eps=1e-5):
    """The size of the terms dx is a difference of: max |w_c g| / sqrt(var + eps). (In
    groups of two elements dx cancels to about eps / var of them.)"""
    xg = x.double().reshape(x.shape[0], num_groups, -1)
    invstd = float(torch.rsqrt(xg.var(-1, unbiased=False) + eps).max())
    w = 1.0 if weight is None else float(weight.detach().abs().max())
    return float(g.abs().max()) * w * invstd


def _fmt(x, layout):
    if layout == "cl":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    return x.contiguous()


def _params(c, affine, dtype=torch.float32):
    if not affine:
        return None, None
    return (torch.empty(c, dtype=dtype).uniform_(0.5, 2.0).requires_grad_(True),
            torch.empty(c, dtype=dtype).uniform_(-0.5, 0.5).requires_grad_(True))


def _run(fn, x, g, weight, bias):
    """Output and gradients (dx, dweight, dbias) of fn(x, weight, bias) for dL/dy = g."""
    xr = x.detach().clone().requires_grad_(True)
    y = fn(xr, weight, bias)
    params = [p for p in (weight, bias) if p is not None]
    grads = torch.autograd.grad(y, [xr] + params, g)
    return y.detach(), list(grads)


def _check_against_float64(x, num_groups, affine, g=None, rtol=2e-6):
    c = x.shape[1]
    w, b = _params(c, affine)
    g = torch.randn(x.shape) if g is None else g
    y, grads = _run(lambda t, w_, b_: K.group_norm(t, num_groups, w_, b_), x, g, w, b)
    wd = None if w is None else w.detach().double().requires_grad_(True)
    bd = None if b is None else b.detach().double().requires_grad_(True)
    y_ref, grads_ref = _run(lambda t, w_, b_: _ref(t, num_groups, w_, b_), x.double(),
                            g.double(), wd, bd)
    _close(y, y_ref, rtol, "y")
    _close(grads[0], grads_ref[0], rtol, "dx", _dx_scale(x, num_groups, w, g))
    names = ("dweight", "dbias")[:len(grads) - 1]
    for name, a, r in zip(names, grads[1:], grads_ref[1:], strict=True):
        _close(a, r, rtol, name)
    return y, grads


# (shape, layout): NCHW and channels_last, C below, at, and across the kernel's block of
# 64 channels, (N, C, L), (N, C), 5-d, batch 1.
CASES = [
    ((4, 6, 5, 7), "nchw"),
    ((4, 6, 5, 7), "cl"),
    ((2, 80, 3, 5), "cl"),
    ((2, 64, 4, 4), "cl"),
    ((2, 64, 9, 9), "nchw"),
    ((3, 8, 2, 3, 4), "cl"),
    ((3, 10, 33), "nchw"),
    ((5, 12), "nchw"),
    ((1, 8, 6, 6), "nchw"),
    ((1, 8, 6, 6), "cl"),
]


@pytest.mark.kernels
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_fused_matches_float64_for_every_group_count(shape, layout, affine):
    c = shape[1]
    x = _fmt(torch.randn(shape) * 3 + 1, layout)
    length = x.numel() // (shape[0] * c)
    tried = 0
    for num_groups in sorted({1, 2, c // 2, c}):
        if (c // num_groups) * length < 2:
            continue  # one element per group: the default path (tested below)
        assert K.supports(x, num_groups)
        y, (dx, *_) = _check_against_float64(x, num_groups, affine)
        if layout == "cl":  # the output and dx keep the input's memory layout
            assert y.stride() == x.stride() and dx.stride() == x.stride()
        tried += 1
    assert tried >= 3


@pytest.mark.kernels
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("num_groups", [1, 4])
def test_large_mean_normalizes_to_float32_rounding(layout, num_groups):
    """x = 1e4 + N(0, 1): torch's channels_last kernel (E[x^2] - E[x]^2 in float32)
    is off by a factor there; the shifted sums are not."""
    x = _fmt(1e4 + torch.randn(3, 80, 6, 6), layout)
    w, b = _params(80, True)
    y = K.group_norm(x, num_groups, w, b)
    want = _ref(x, num_groups, w.detach().double(), b.detach().double())
    assert float((y.detach().double() - want).abs().max()) < 1e-4
    _check_against_float64(x, num_groups, True, rtol=1e-5)


@pytest.mark.kernels
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_a_far_off_first_estimate_of_the_mean_is_corrected(layout):
    """The kernels shift by the mean of the first values of a group (the first 256 in
    NCHW, the first 16 rows in channels_last). Here those are 100 away from the rest,
    1e4 + N(0, 1): the shifted sums would cancel (checked: without the second pass
    about the first pass's mean the outputs are off by 1e-5 to 1e-4 relative)."""
    x = 1e4 + torch.randn(1, 2, 512, 512)
    x[:, :, 0, :256 if layout == "nchw" else 16] += 100
    _check_against_float64(_fmt(x, layout), 1, True, rtol=1e-5)


@pytest.mark.kernels
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_layers_equal_their_default_paths_train_and_eval(layout):
    torch.manual_seed(1)
    x = _fmt(torch.randn(4, 16, 5, 5) * 2 - 1, layout)
    g = torch.randn(x.shape)
    for make in (lambda f: GroupNorm(16, 4, fused=f), lambda f: LayerNorm(16, fused=f)):
        base = make(False)
        with torch.no_grad():
            base.weight.uniform_(0.5, 2.0)
            base.bias.uniform_(-0.5, 0.5)
        fused = copy.deepcopy(base)
        fused.fused = True
        assert "fused=True" in repr(fused) and "fused" not in repr(base)
        for training in (True, False):
            base.train(training)
            fused.train(training)
            y0, g0 = _run(lambda t, w_, b_, m=base: m(t), x, g, base.weight, base.bias)
            y1, g1 = _run(lambda t, w_, b_, m=fused: m(t), x, g, fused.weight, fused.bias)
            if layout == "cl":
                assert y1.is_contiguous(memory_format=torch.channels_last)
            _close(y1, y0, 2e-6, "y")
            for name, a, r in zip(("dx", "dweight", "dbias"), g1, g0, strict=True):
                _close(a, r, 2e-6, name)


@pytest.mark.kernels
def test_layer_norm_is_over_all_of_c_times_positions():
    torch.manual_seed(2)
    layer = LayerNorm(6, fused=True)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 6, 7, 4).contiguous(memory_format=torch.channels_last)
    y = layer(x)
    xd = x.double()
    mean = xd.mean((1, 2, 3), keepdim=True)
    var = xd.var((1, 2, 3), unbiased=False, keepdim=True)
    want = (xd - mean) / torch.sqrt(var + 1e-5) * layer.weight.double().view(1, 6, 1, 1) \
        + layer.bias.double().view(1, 6, 1, 1)
    _close(y, want, 2e-6)
    # (N, C): torch.nn.LayerNorm(C)
    x2 = torch.randn(5, 6)
    ref = torch.nn.functional.layer_norm(x2.double(), (6,), layer.weight.double(),
                                         layer.bias.double())
    _close(layer(x2), ref, 2e-6)


@pytest.mark.kernels
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_bfloat16_equals_float32_math_on_the_same_values(layout):
    x = _fmt(torch.randn(3, 16, 5, 5) * 2 + 3, layout).bfloat16()
    g = torch.randn(x.shape).bfloat16()
    w, b = _params(16, True)
    y, (dx, dw, db) = _run(lambda t, w_, b_: K.group_norm(t, 4, w_, b_), x, g, w, b)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    assert dw.dtype == torch.float32
    wd, bd = w.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    y_ref, (dx_ref, dw_ref, db_ref) = _run(lambda t, w_, b_: _ref(t, 4, w_, b_), x.double(),
                                           g.double(), wd, bd)
    # computed in float32 from the bfloat16 values, rounded once to bfloat16 (2^-8)
    _close(y, y_ref, 2 ** -8, "y")
    _close(dx, dx_ref, 2 ** -8, "dx")
    _close(dw, dw_ref, 1e-5, "dweight")
    _close(db, db_ref, 1e-5, "dbias")


@pytest.mark.kernels
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_one_and_two_threads_give_identical_results(layout):
    x = _fmt(torch.randn(6, 32, 6, 6), layout)
    g = torch.randn(x.shape)
    w, b = _params(32, True)
    old = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(_run(lambda t, w_, b_: K.group_norm(t, 8, w_, b_), x, g, w, b))
    finally:
        torch.set_num_threads(old)
    (y1, g1), (y2, g2) = out
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2, strict=True))


@pytest.mark.kernels
def test_gradient_in_another_layout_and_no_affine_grads():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 8, 4, 4)  # NCHW gradient for a channels_last input
    _check_against_float64(x, 2, True, g=g)
    # parameters that need no gradient get none; x that needs none gets none
    w, b = torch.ones(8), torch.zeros(8, requires_grad=True)
    y = K.group_norm(x, 2, w, b)
    (db,) = torch.autograd.grad(y, [b], g)
    _close(db, g.double().sum((0, 2, 3)), 1e-6)
    # a weight and no bias (LayerNorm(C, bias=False))
    w = torch.empty(8).uniform_(0.5, 2.0).requires_grad_(True)
    y, (dx, dw) = _run(lambda t, w_, b_: K.group_norm(t, 2, w_, None), x, g, w, None)
    wd = w.detach().double().requires_grad_(True)
    y_ref, (dx_ref, dw_ref) = _run(lambda t, w_, b_: _ref(t, 2, w_, None), x.double(),
                                   g.double(), wd, None)
    _close(y, y_ref, 2e-6, "y")
    _close(dx, dx_ref, 2e-6, "dx", _dx_scale(x, 2, w, g))
    _close(dw, dw_ref, 2e-6, "dweight")


@pytest.mark.kernels
def test_double_backward_is_refused_with_a_clear_error():
    layer = GroupNorm(8, 2, fused=True)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    y = layer(x)
    with pytest.raises(RuntimeError, match=r"GroupNorm\(8\).*first-order only.*fused=False"):
        torch.autograd.grad((y ** 2).sum(), x, create_graph=True)


@pytest.mark.kernels
def test_registry_builds_the_fused_layer():
    layer = create_norm("gn", 64, fused=True)
    assert isinstance(layer, GroupNorm) and layer.fused and layer.num_groups == 32
    x = torch.randn(2, 64, 3, 3)
    _close(layer(x), GroupNorm(64, 32)(x), 2e-6)


# ----------------------------------------------------------------------------- fallbacks


@pytest.fixture
def no_kernel(monkeypatch):
    """Make any call into the fused kernel fail, to show a path does not reach it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel was called")
    monkeypatch.setattr(K._FusedGroupNorm, "apply", refuse)


def test_unsupported_inputs_take_the_default_path(no_kernel):
    layer = GroupNorm(8, 4, fused=True)
    x = torch.randn(3, 8, 5, 5)
    cases = [  # (input, groups): other dtypes, another layout, one element per group
        (x.double(), 4),
        (x.half(), 4),
        (x.transpose(2, 3), 4),
        (torch.randn(3, 8), 8),
    ]
    for xi, groups in cases:
        assert not K.supports(xi, groups), (xi.dtype, xi.shape, groups)
        lay = GroupNorm(8, groups, fused=True).to(xi.dtype)
        with torch.no_grad():
            lay.weight.uniform_(0.5, 2.0)
            lay.bias.uniform_(-0.5, 0.5)
        want = NF.group_norm(xi.float(), groups, lay.weight.float(), lay.bias.float())
        _close(lay(xi), want, 1e-3 if xi.dtype == torch.float16 else 1e-6)
    # a mask goes to the default path (the kernel takes no mask)
    mask = torch.ones(3, 1, 5, 5, dtype=torch.bool)
    mask[:, :, 0] = False
    _close(layer(x, mask=mask), NF.group_norm(x, 4, layer.weight, layer.bias, mask=mask), 1e-6)
    ln = LayerNorm(8, fused=True)
    _close(ln(x, mask=mask), NF.layer_norm(x, ln.weight, ln.bias, mask=mask), 1e-6)
    # float64 parameters with float32 input
    assert not K.supports(x, 4, torch.ones(8, dtype=torch.float64))


def test_supports_and_repr_without_compiling():
    x = torch.randn(2, 8, 3, 3)
    assert K.supports(x, 2) and K.supports(x.contiguous(memory_format=torch.channels_last), 2)
    assert K.supports(torch.randn(2, 8), 4) and not K.supports(torch.randn(2, 8), 8)
    assert not K.supports(x, 3) and not K.supports(torch.randn(0, 8, 3, 3), 2)
    assert "fused=True" in repr(GroupNorm(8, 2, fused=True))
    assert "fused=True" in repr(LayerNorm(8, fused=True))
    assert GroupNorm(8, 2).fused is False and LayerNorm(8).fused is False
