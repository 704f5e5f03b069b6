"""BatchNorm and BatchRenorm against torch.nn, float64 references written from the
papers' equations, gradcheck, and the defining properties of Batch Renormalization."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

from normlab import functional as NF
from normlab import nn as nl

TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}
PAPER = (5000, 40000, 25000)  # Ioffe 2017: r_max relaxed by 40k steps, d_max by 25k, from 5k


# ----------------------------------------------------------------------------- references


def _dims(x):
    return (0,) + tuple(range(2, x.dim()))


def _ch(t, x):
    """A per-channel vector shaped to broadcast against (N, C, *)."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def ref_batch_stats(x):
    """float64 per-channel mean and biased variance over (N, *), from the sums."""
    x = x.double()
    n = x.numel() // x.shape[1]
    mean = x.sum(_dims(x), keepdim=True) / n
    var = ((x - mean) ** 2).sum(_dims(x), keepdim=True) / n
    return mean, var, n


def ref_bn_train(x, weight=None, bias=None, eps=1e-5):
    """Ioffe & Szegedy 2015, Alg. 1, in float64."""
    mean, var, _ = ref_batch_stats(x)
    y = (x.double() - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * _ch(weight.double(), x) + _ch(bias.double(), x)
    return y


def ref_brn_train(x, running_mean, running_var, weight=None, bias=None, eps=1e-5,
                  r_max=3.0, d_max=5.0):
    """Ioffe 2017, Alg. 1, in float64; r and d are constants (no gradient)."""
    x = x.double()
    n = x.numel() // x.shape[1]
    mu_b = x.sum(_dims(x), keepdim=True) / n
    sigma_b = torch.sqrt(((x - mu_b) ** 2).sum(_dims(x), keepdim=True) / n + eps)
    mu = _ch(running_mean.double(), x)
    sigma = torch.sqrt(_ch(running_var.double(), x) + eps)
    r = (sigma_b.detach() / sigma).clamp(1 / r_max, r_max)
    d = ((mu_b.detach() - mu) / sigma).clamp(-d_max, d_max)
    y = (x - mu_b) / sigma_b * r + d
    if weight is not None:
        y = y * _ch(weight.double(), x) + _ch(bias.double(), x)
    return y


def assert_rel(actual, expected, rtol=1e-5):
    """Element-wise within ``rtol`` relative, with an absolute floor of rtol times the
    tensor's largest magnitude: elements near zero come out of a difference of O(max)
    terms (x - mean, g - mean(g) - ...), so their error is float32 rounding of O(max)."""
    expected = expected.detach().to(actual.dtype)
    atol = rtol * float(expected.detach().abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _random_affine(*mods, c):
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    with torch.no_grad():
        for m in mods:
            m.weight.copy_(w)
            m.bias.copy_(b)


def _shape(rank, n=4, c=3, s=3):
    return (n, c) + (s,) * (rank - 2)


# ----------------------------------------------------------------------------- BatchNorm vs torch


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_matches_torch_train_and_eval(rank, momentum, affine):
    c = 3
    ours = nl.BatchNorm(c, momentum=momentum, affine=affine)
    ref = TORCH_BN[rank](c, momentum=momentum, affine=affine)
    if affine:
        _random_affine(ours, ref, c=c)
    for mode in ["train"] * 3 + ["eval"]:
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = torch.randn(_shape(rank)) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        assert_rel(ya, yb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert_rel(xa.grad, xb.grad)
        if affine:
            assert_rel(ours.weight.grad, ref.weight.grad)
            assert_rel(ours.bias.grad, ref.bias.grad)
            ours.zero_grad()
            ref.zero_grad()
        assert_rel(ours.running_mean, ref.running_mean)
        assert_rel(ours.running_var, ref.running_var)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("rank", [2, 4])
def test_batchnorm_without_running_stats_matches_torch(rank):
    ours = nl.BatchNorm(3, track_running_stats=False)
    ref = TORCH_BN[rank](3, track_running_stats=False)
    assert ours.running_mean is None and "running_mean" not in ours.state_dict()
    x = torch.randn(_shape(rank))
    for train in (True, False):  # batch statistics in eval too
        ours.train(train)
        ref.train(train)
        assert_rel(ours(x), ref(x))
        assert_rel(ours(x).double(), ref_bn_train(x))


def test_batchnorm_equals_float64_reference():
    x = torch.randn(5, 4, 3, 2, dtype=torch.float64) * 3 + 2
    bn = nl.BatchNorm(4).double()
    _random_affine(bn, c=4)
    y = bn(x)
    torch.testing.assert_close(y, ref_bn_train(x, bn.weight, bn.bias), rtol=1e-12, atol=1e-12)
    _, var, n = ref_batch_stats(x)
    # running_var: 0.9 * 1 + 0.1 * unbiased batch variance
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var.flatten() * n / (n - 1))


def test_momentum_none_is_cumulative_average():
    bn = nl.BatchNorm(2, momentum=None)
    batches = [torch.randn(6, 2, 3) * (i + 1) + i for i in range(4)]
    for x in batches:
        bn(x)
    means = torch.stack([x.double().mean((0, 2)) for x in batches])
    variances = torch.stack([x.double().var((0, 2), unbiased=True) for x in batches])
    torch.testing.assert_close(bn.running_mean.double(), means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), variances.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_state_dict_loads_both_ways(rank):
    ref = TORCH_BN[rank](3)
    ours = nl.BatchNorm(3)
    assert list(ours.state_dict()) == list(ref.state_dict())
    _random_affine(ref, c=3)
    for _ in range(3):
        ref(torch.randn(_shape(rank)) * 2 + 1)
    ours.load_state_dict(ref.state_dict())
    ref.eval()
    ours.eval()
    x = torch.randn(_shape(rank)) + 1
    assert_rel(ours(x), ref(x))
    assert int(ours.num_batches_tracked) == 3

    # and back: trained in normlab, loaded into torch.nn
    ours2 = nl.BatchNorm(3)
    _random_affine(ours2, c=3)
    for _ in range(2):
        ours2(torch.randn(_shape(rank)) * 3 - 1)
    ref2 = TORCH_BN[rank](3)
    ref2.load_state_dict(ours2.state_dict())
    ours2.eval()
    ref2.eval()
    assert_rel(ours2(x), ref2(x))
    assert int(ref2.num_batches_tracked) == 2


def test_state_dict_without_num_batches_tracked_loads():
    """Old torch.nn checkpoints (version 1) lack num_batches_tracked."""
    sd = torch.nn.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    bn = nl.BatchNorm(3)
    bn.load_state_dict(sd)
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_gradcheck(train):
    bn = nl.BatchNorm(3).double().train(train)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3))
        bn.running_var.copy_(torch.rand(3) + 0.5)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return functional_call(bn, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("rank", [3, 4])
def test_batchnorm_mask_equals_unpadded(rank):
    """Padded (N, C, T) with a mask == BatchNorm over the valid positions only."""
    c = 3
    shape = (4, c, 5) if rank == 3 else (3, c, 4, 3)
    x = torch.randn(shape) * 2 + 1
    mask = torch.rand((shape[0], 1) + shape[2:]) > 0.4
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = True
    # Padding holds garbage that must not matter.
    x_padded = torch.where(mask, x, torch.full_like(x, 1e3)).requires_grad_()
    valid = x.movedim(1, -1)[mask.squeeze(1)].clone().requires_grad_()  # (M, C)

    padded_bn, plain_bn = nl.BatchNorm(c), nl.BatchNorm(c)
    torch_bn = torch.nn.BatchNorm1d(c)
    _random_affine(padded_bn, plain_bn, torch_bn, c=c)
    yp = padded_bn(x_padded, mask=mask)
    yv = plain_bn(valid)
    ym = yp.movedim(1, -1)[mask.squeeze(1)]
    assert_rel(ym, yv)
    assert_rel(yv, torch_bn(valid))
    assert_rel(padded_bn.running_mean, plain_bn.running_mean)
    assert_rel(padded_bn.running_var, torch_bn.running_var)
    # Gradients of a loss on the valid outputs.
    g = torch.randn_like(yv)
    (ym * g).sum().backward()
    (yv * g).sum().backward()
    assert_rel(x_padded.grad.movedim(1, -1)[mask.squeeze(1)], valid.grad)
    assert float(x_padded.grad.movedim(1, -1)[~mask.squeeze(1)].abs().max()) == 0.0
    assert_rel(padded_bn.weight.grad, plain_bn.weight.grad)
    assert_rel(padded_bn.bias.grad, plain_bn.bias.grad)


# ----------------------------------------------------------------------------- properties


@given(
    rank=st.integers(2, 5),
    n=st.integers(2, 4),
    c=st.integers(1, 4),
    s=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    offset=st.floats(-100, 100),
    scale=st.floats(0.01, 100),
)
def test_batchnorm_property_vs_float64(rank, n, c, s, dtype, offset, scale):
    x = (torch.randn(_shape(rank, n, c, s), dtype=torch.float64) * scale + offset).to(dtype)
    bn = nl.BatchNorm(c).to(dtype)
    _random_affine(bn, c=c)
    y = bn(x)
    assert y.dtype == dtype
    expected = ref_bn_train(x, bn.weight, bn.bias)
    # float32: |offset|/scale up to 1e4 amplifies the rounding of x itself (2**-24 of
    # |x|) in x - mean, so the bound scales with it; float64 is exact to ~1e-12.
    rtol = 1e-12 if dtype == torch.float64 else 1e-6 * (1 + abs(offset) / scale)
    torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=rtol * 10)


@given(
    rank=st.integers(2, 4),
    c=st.integers(1, 4),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    train=st.booleans(),
)
def test_batchnorm_half_precision_vs_float32(rank, c, dtype, train):
    x = (torch.randn(_shape(rank, 4, c, 3)) * 2 + 1).to(dtype)
    bn = nl.BatchNorm(c).train(train)
    _random_affine(bn, c=c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c))
        bn.running_var.copy_(torch.rand(c) + 0.5)
    bn32 = nl.BatchNorm(c).train(train)
    bn32.load_state_dict(bn.state_dict())
    y = bn(x)
    assert y.dtype == dtype
    assert bn.running_mean.dtype == torch.float32
    y32 = bn32(x.float())  # same rounded input, float32 all the way
    # Only the final rounding to the half type differs: half an ulp, 2**-11 (float16)
    # or 2**-8 (bfloat16) relative; twice that as tolerance.
    rtol = 2**-10 if dtype == torch.float16 else 2**-7
    torch.testing.assert_close(y.float(), y32, rtol=rtol, atol=1e-3)
    torch.testing.assert_close(bn.running_mean, bn32.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bn.running_var, bn32.running_var, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layer", ["bn", "brn"])
def test_large_mean_float32_and_float16(layer):
    """1e4 + N(0,1) in float32 within 1e-3 relative L2 of float64; 300 + N(0,1) in
    float16 (x**2 overflows float16) normalizes to within float16 rounding."""
    make = (lambda: nl.BatchNorm(4)) if layer == "bn" else (lambda: nl.BatchRenorm(4, r_max=1,
                                                                                    d_max=0))
    x = 1e4 + torch.randn(64, 4, 8)
    y = make()(x)
    exact = ref_bn_train(x)
    assert float((y.detach().double() - exact).norm() / exact.norm()) < 1e-3
    xh = (300 + torch.randn(64, 4, 8)).half()
    yh = make()(xh)
    assert yh.dtype == torch.float16 and torch.isfinite(yh).all()
    torch.testing.assert_close(yh.double(), ref_bn_train(xh), rtol=2**-10, atol=1e-3)


# ----------------------------------------------------------------------------- BatchRenorm


def _set_running(m, mean, var):
    with torch.no_grad():
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)


@pytest.mark.parametrize("rank", [2, 4])
def test_renorm_with_rmax_1_dmax_0_is_batchnorm(rank):
    brn = nl.BatchRenorm(3, r_max=1.0, d_max=0.0)
    bn = nl.BatchNorm(3)
    _random_affine(brn, bn, c=3)
    _set_running(brn, torch.randn(3) * 3, torch.rand(3) * 4 + 0.1)
    _set_running(bn, brn.running_mean, brn.running_var)
    torch_bn = TORCH_BN[rank](3)
    torch_bn.load_state_dict(bn.state_dict())
    for _ in range(3):
        x = torch.randn(_shape(rank)) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = brn(xa), bn(xb)
        assert_rel(ya, torch_bn(x))
        torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert_rel(xa.grad, xb.grad)
        assert_rel(brn.weight.grad, bn.weight.grad)
        assert_rel(brn.bias.grad, bn.bias.grad)
        brn.zero_grad()
        bn.zero_grad()
        assert_rel(brn.running_mean, torch_bn.running_mean)
        assert_rel(brn.running_var, torch_bn.running_var)
    brn.eval()
    torch_bn.eval()
    x = torch.randn(_shape(rank))
    assert_rel(brn(x), torch_bn(x))
    assert brn.state_dict().keys() == torch_bn.state_dict().keys()


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_unclipped_renorm_normalizes_with_running_stats(rank):
    """The defining property: with r and d unclipped, the training output is
    (x - running_mean) / sqrt(running_var + eps), whatever the batch statistics."""
    brn = nl.BatchRenorm(3, affine=False, r_max=1e6, d_max=1e6)
    rm, rv = torch.randn(3) * 2, torch.rand(3) * 3 + 0.2
    _set_running(brn, rm, rv)
    x = torch.randn(_shape(rank)) * 3 + 1.5
    y = brn(x)
    expected = (x.double() - _ch(rm.double(), x)) / torch.sqrt(_ch(rv.double(), x) + 1e-5)
    # float32 output; (x - mu_B)/sigma_B * r + d re-expresses it via batch statistics,
    # a few float32 roundings of O(max |y|) terms.
    assert_rel(y, expected)
    # and the running statistics moved towards the batch, as in BatchNorm
    _, var, n = ref_batch_stats(x)
    assert_rel(brn.running_var, 0.9 * rv + 0.1 * (var.flatten() * n / (n - 1)).float())


def test_renorm_differs_from_batchnorm_when_clipped():
    """With finite limits, the output is the float64 reference with clipped r, d (and is
    neither BN nor the running-stat normalization)."""
    brn = nl.BatchRenorm(4, r_max=1.5, d_max=0.5)
    _random_affine(brn, c=4)
    rm, rv = torch.tensor([0.0, 3.0, -3.0, 0.2]), torch.tensor([1.0, 9.0, 0.05, 1.0])
    _set_running(brn, rm, rv)
    x = torch.randn(6, 4, 5) * 2 + 0.5
    y = brn(x)
    expected = ref_brn_train(x, rm, rv, brn.weight, brn.bias, r_max=1.5, d_max=0.5)
    assert_rel(y, expected)
    assert (y.double() - ref_bn_train(x, brn.weight, brn.bias)).abs().max() > 0.1


@given(
    rank=st.integers(2, 4),
    c=st.integers(1, 3),
    r_max=st.floats(1.0, 4.0),
    d_max=st.floats(0.0, 3.0),
    shift=st.floats(-3, 3),
    log_var=st.floats(-3, 3),
)
def test_renorm_property_vs_float64(rank, c, r_max, d_max, shift, log_var):
    brn = nl.BatchRenorm(c, r_max=r_max, d_max=d_max).double()
    _random_affine(brn, c=c)
    rm = torch.randn(c, dtype=torch.float64) + shift
    rv = torch.full((c,), float(torch.tensor(log_var).exp()), dtype=torch.float64)
    _set_running(brn, rm, rv)
    x = torch.randn(_shape(rank, 3, c, 2), dtype=torch.float64) * 2
    y = brn(x)
    expected = ref_brn_train(x, rm, rv, brn.weight, brn.bias, r_max=r_max, d_max=d_max)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


def _bn_backward(g, x, eps=1e-5):
    """Closed-form input gradient of affine-free batch norm (Ioffe & Szegedy 2015,
    sec. 3), float64: dx = (g - mean(g) - xhat * mean(g * xhat)) / sigma_B."""
    mean, var, _ = ref_batch_stats(x)
    xhat = (x.double() - mean) / torch.sqrt(var + eps)
    d = _dims(x)
    return (g - g.mean(d, keepdim=True) - xhat * (g * xhat).mean(d, keepdim=True)) / torch.sqrt(
        var + eps
    )


def test_renorm_has_no_gradient_through_r_and_d():
    """dL/dx equals the float64 reference in which r and d are constants: BN's backward
    of the upstream gradient scaled by gamma * r. Were r and d differentiated, the
    unclipped channels would get gamma * g / sigma instead (renorm = running-stat
    normalization there), which this test tells apart."""
    c = 4
    brn = nl.BatchRenorm(c, r_max=2.0, d_max=1.0).double()
    _random_affine(brn, c=c)
    # channel 0, 3 unclipped; channel 1 clipped r (running var tiny); 2 clipped d.
    rm = torch.tensor([0.1, 0.0, 5.0, -0.2], dtype=torch.float64)
    rv = torch.tensor([1.2, 1e-3, 1.0, 0.8], dtype=torch.float64)
    _set_running(brn, rm, rv)
    x = (torch.randn(5, c, 3, dtype=torch.float64)).requires_grad_()
    g = torch.randn(5, c, 3, dtype=torch.float64)
    brn(x).backward(g)

    # r, d from the batch (as constants), written from the paper.
    mean, var, _ = ref_batch_stats(x.detach())
    sigma = torch.sqrt(_ch(rv, x) + 1e-5)
    r = (torch.sqrt(var + 1e-5) / sigma).clamp(0.5, 2.0)
    d = ((mean - _ch(rm, x)) / sigma).clamp(-1.0, 1.0)
    assert 0.5 < float(r[0, 0, 0]) < 2.0 and abs(float(d[0, 0, 0])) < 1.0  # unclipped
    assert float(r[0, 1, 0]) == 2.0 and abs(float(d[0, 2, 0])) == 1.0  # clipped
    gamma = _ch(brn.weight.detach(), x)
    expected = _bn_backward(g * gamma * r, x.detach())
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)
    # The gradient that differentiating through r and d would give on channel 0:
    through = (g * gamma / sigma)[:, 0]
    assert (x.grad[:, 0] - through).abs().max() > 1e-3

    # weight and bias gradients: sum g * ((x - mu)/sigma_B * r + d) and sum g
    xhat = (x.detach() - mean) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(brn.weight.grad, (g * (xhat * r + d)).sum(_dims(x)))
    torch.testing.assert_close(brn.bias.grad, g.sum(_dims(x)))


@pytest.mark.parametrize("train", [True, False])
def test_renorm_gradcheck(train):
    """gradcheck perturbs x, which moves the batch statistics; r and d are held
    constant only where they are clipped, so the training case uses running statistics
    that saturate both (r = r_max, d = -d_max) and resets them on every call."""
    brn = nl.BatchRenorm(3, r_max=1.5, d_max=0.5).double().train(train)
    rm = torch.full((3,), 10.0, dtype=torch.float64)
    rv = torch.full((3,), 1e-2, dtype=torch.float64)
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        _set_running(brn, rm, rv)
        return functional_call(brn, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_renorm_eval_uses_running_stats():
    brn = nl.BatchRenorm(3)
    _random_affine(brn, c=3)
    _set_running(brn, torch.randn(3), torch.rand(3) + 0.5)
    ref = torch.nn.BatchNorm2d(3)
    ref.load_state_dict(brn.state_dict())
    brn.eval()
    ref.eval()
    x = torch.randn(2, 3, 4, 4)
    assert_rel(brn(x), ref(x))


def test_renorm_paper_schedule_values():
    """r_max = 1, d_max = 0 up to 5k steps, then linear: d_max reaches 5 at 25k and
    r_max reaches 3 at 40k (Ioffe 2017, sec. 4)."""

    def paper(step):
        def lin(end):
            return min(max((step - 5000) / (end - 5000), 0.0), 1.0)

        return 1.0 + 2.0 * lin(40000), 5.0 * lin(25000)

    for step in [0, 1000, 5000, 5001, 15000, 25000, 30000, 40000, 100000]:
        r, d = NF.renorm_limits(step, 3.0, 5.0, PAPER)
        er, ed = paper(step)
        assert r == pytest.approx(er, abs=1e-12) and d == pytest.approx(ed, abs=1e-12), step
    assert NF.renorm_limits(5000, 3.0, 5.0, PAPER) == (1.0, 0.0)
    assert NF.renorm_limits(25000, 3.0, 5.0, PAPER) == pytest.approx((1 + 2 * 20 / 35, 5.0))
    assert NF.renorm_limits(40000, 3.0, 5.0, PAPER) == pytest.approx((3.0, 5.0))
    assert NF.renorm_limits(123, 3.0, 5.0, None) == (3.0, 5.0)

    brn = nl.BatchRenorm(2, warmup="paper")
    assert brn.warmup == PAPER
    for step in (0, 5000, 25000, 40000):
        brn.num_batches_tracked.fill_(step)
        assert brn.current_limits() == pytest.approx(paper(step))


def test_renorm_module_applies_the_scheduled_limits():
    rm, rv = torch.tensor([2.0, -2.0]), torch.tensor([4.0, 0.01])
    x = torch.randn(6, 2, 3)
    for step in (0, 25000):
        brn = nl.BatchRenorm(2, warmup="paper")
        _set_running(brn, rm, rv)
        brn.num_batches_tracked.fill_(step)
        r_max, d_max = brn.current_limits()
        y = brn(x)
        assert_rel(y, ref_brn_train(x, rm, rv, brn.weight, brn.bias, r_max=r_max, d_max=d_max))
        if step == 0:  # still in warm-up: plain batch norm
            assert_rel(y, ref_bn_train(x))
        assert int(brn.num_batches_tracked) == step + 1


def test_renorm_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"BatchRenorm\(3\).*r_max"):
        nl.BatchRenorm(3, r_max=0.5)
    with pytest.raises(ValueError, match=r"BatchRenorm\(3\).*d_max"):
        nl.BatchRenorm(3, d_max=-1)
    with pytest.raises(ValueError, match="warmup"):
        nl.BatchRenorm(3, warmup=(1, 2))
