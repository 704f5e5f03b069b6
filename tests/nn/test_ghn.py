"""Generalized Hamming Network layers: the computed bias, Hamming distance on binary
inputs, the normalised variant and the double-threshold activation."""

import itertools

import numpy as np
import pytest
import torch

from normlab.nn import DoubleThreshold, GHNConv2d, GHNLinear
from normlab.nn.ghn import fuzzy_xor, generalized_hamming_distance

# ---------------------------------------------------------------------------------------
# float64 references, written with explicit loops over receptive fields


def conv_patches(x, kernel, stride, padding, dilation):
    """numpy (N, C, H, W) -> dict {(i, j): (N, C, kh, kw) patch} with zero padding."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    kh, kw = kernel
    h_out = (x.shape[2] - dilation * (kh - 1) - 1) // stride + 1
    w_out = (x.shape[3] - dilation * (kw - 1) - 1) // stride + 1
    return {
        (i, j): x[:, :, i * stride: i * stride + dilation * (kh - 1) + 1: dilation,
                  j * stride: j * stride + dilation * (kw - 1) + 1: dilation]
        for i in range(h_out) for j in range(w_out)
    }, (h_out, w_out)


def ref_conv(x, w, stride, padding, dilation, groups, fn):
    """Apply fn(patch (N, L), weight (L,)) -> (N,) at every position and out channel."""
    patches, (h_out, w_out) = conv_patches(x, w.shape[2:], stride, padding, dilation)
    n, c_out = x.shape[0], w.shape[0]
    cin_g, cout_g = x.shape[1] // groups, c_out // groups
    out = np.zeros((n, c_out, h_out, w_out))
    for (i, j), patch in patches.items():
        for o in range(c_out):
            g = o // cout_g
            p = patch[:, g * cin_g:(g + 1) * cin_g].reshape(n, -1)
            out[:, o, i, j] = fn(p, w[o].reshape(-1))
    return out


def neg_half_ghd(p, w):
    """-1/2 sum_l (x_l + w_l - 2 x_l w_l), one row of p per sample."""
    return -0.5 * (p + w - 2 * p * w).sum(1)


def paper_form(p, w):
    """w . (x - 1/2) - 1/2 sum x."""
    return (p - 0.5) @ w - 0.5 * p.sum(1)


# ---------------------------------------------------------------------------------------
# GHNLinear


def test_fuzzy_xor_is_xor_on_bits():
    for a, b in itertools.product((0.0, 1.0), repeat=2):
        assert fuzzy_xor(torch.tensor(a), torch.tensor(b)).item() == float(int(a) ^ int(b))


@pytest.mark.parametrize("normalized", [False, True])
def test_linear_binary_inputs_give_hamming_distance(normalized):
    x = torch.randint(0, 2, (50, 37)).double()
    w = torch.randint(0, 2, (11, 37)).double()
    layer = GHNLinear(37, 11, normalized=normalized).double()
    with torch.no_grad():
        layer.weight.copy_(w)
    hamming = (x[:, None, :] != w[None, :, :]).sum(-1).double()  # differing positions
    h = layer(x)
    if normalized:
        torch.testing.assert_close(-h * 37, hamming, rtol=0, atol=1e-12)
    else:
        assert torch.equal(-2 * h, hamming)
    assert torch.equal(generalized_hamming_distance(x, w), hamming)


def test_linear_output_formula():
    x = torch.randn(9, 4, 23, dtype=torch.float64)
    layer = GHNLinear(23, 6).double()
    w = layer.weight.detach().numpy()
    xn = x.numpy().reshape(-1, 23)
    ref = np.stack([neg_half_ghd(xn, w[o]) for o in range(6)], 1)
    ref2 = np.stack([paper_form(xn, w[o]) for o in range(6)], 1)
    np.testing.assert_allclose(ref, ref2, rtol=0, atol=1e-12)  # the algebra
    out = layer(x)
    assert out.shape == (9, 4, 6)
    np.testing.assert_allclose(out.detach().numpy().reshape(-1, 6), ref, rtol=1e-12, atol=1e-12)


def test_linear_normalized_variant():
    x = torch.rand(20, 40, dtype=torch.float64)
    layer = GHNLinear(40, 5, normalized=True).double()
    with torch.no_grad():
        layer.weight.uniform_(0, 1)
    w = layer.weight.detach().numpy()
    xn = x.numpy()
    # -GHD / L = (2/L) w.x - mean(w) - mean(x)
    ref = np.stack([2 / 40 * xn @ w[o] - w[o].mean() - xn.mean(1) for o in range(5)], 1)
    out = layer(x).detach().numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    # For fuzzy values in [0, 1] it lies in [-1, 0] whatever the width.
    assert out.max() <= 0 and out.min() >= -1
    plain = GHNLinear(40, 5).double()
    plain.load_state_dict(layer.state_dict())
    np.testing.assert_allclose(out, 2 / 40 * plain(x).detach().numpy(), rtol=1e-12)


def test_no_bias_parameter():
    for layer in (GHNLinear(8, 3), GHNConv2d(2, 4, 3)):
        assert layer.bias is None
        assert [n for n, _ in layer.named_parameters()] == ["weight"]
        assert list(layer.state_dict()) == ["weight"]


def test_gradcheck():
    lin = GHNLinear(5, 3, normalized=True).double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lin, (x,))
    conv = GHNConv2d(4, 4, 3, padding=1, groups=2).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (x,))


# ---------------------------------------------------------------------------------------
# GHNConv2d


CONV_CASES = [
    dict(stride=1, padding=0, dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=1),
    dict(stride=1, padding=2, dilation=2, groups=1),
    dict(stride=1, padding=1, dilation=1, groups=2),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_binary_inputs_give_hamming_distance(case):
    x = torch.randint(0, 2, (3, 4, 7, 8)).double()
    layer = GHNConv2d(4, 6, 3, **case).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randint(0, 2, layer.weight.shape).double())
    w = layer.weight.detach().numpy()
    hamming = ref_conv(x.numpy(), w, case["stride"], case["padding"], case["dilation"],
                       case["groups"], lambda p, wo: (p != wo).sum(1))
    np.testing.assert_array_equal(-2 * layer(x).detach().numpy(), hamming)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("normalized", [False, True])
def test_conv_output_formula(case, normalized):
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    layer = GHNConv2d(4, 6, (3, 2), normalized=normalized, **case).double()
    w = layer.weight.detach().numpy()
    args = (case["stride"], case["padding"], case["dilation"], case["groups"])
    ref = ref_conv(x.numpy(), w, *args, neg_half_ghd)
    np.testing.assert_allclose(ref, ref_conv(x.numpy(), w, *args, paper_form), atol=1e-12)
    if normalized:
        ref = ref * 2 / layer.fan_in
        assert layer.fan_in == (4 // case["groups"]) * 6
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-12, atol=1e-12)


def test_bad_inputs_name_the_layer():
    with pytest.raises(ValueError, match=r"GHNLinear\(8, 3\).*\(\*, 8\)"):
        GHNLinear(8, 3)(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"GHNConv2d\(2, 4\).*\(N, 2, H, W\)"):
        GHNConv2d(2, 4, 3)(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"GHNConv2d\(2, 4\)"):
        GHNConv2d(2, 4, 3)(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match=r"DoubleThreshold\(3\)"):
        DoubleThreshold(3)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="DoubleThreshold"):
        DoubleThreshold(3, alpha=0.0)


# ---------------------------------------------------------------------------------------
# Double thresholding


def ref_double_threshold(h, r, alpha, dims):
    h = h.numpy()
    low = h.min(axis=dims, keepdims=True)
    high = h.max(axis=dims, keepdims=True)
    r = r.reshape((1, -1) + (1,) * (h.ndim - 2))

    def sig(t):
        return 1 / (1 + np.exp(-t))

    gate = sig(-alpha * (h - r * low)) + sig(alpha * (h - r * high))
    return 0.5 + (h - 0.5) * gate


@pytest.mark.parametrize("shape, dims", [((4, 6, 5, 5), (2, 3)), ((4, 6), (1,))])
def test_double_threshold_formula(shape, dims):
    h = torch.randn(*shape, dtype=torch.float64) * 10
    act = DoubleThreshold(6).double()
    with torch.no_grad():
        act.r.copy_(torch.linspace(-0.5, 1.0, 6))
    ref = ref_double_threshold(h, act.r.detach().numpy(), 0.2, dims)
    np.testing.assert_allclose(act(h).detach().numpy(), ref, rtol=1e-12, atol=1e-12)


def test_double_threshold_with_r_zero_is_identity():
    act = DoubleThreshold(3, r_init=0.0).double()
    h = torch.randn(5, 3, 4, dtype=torch.float64) * 20
    torch.testing.assert_close(act(h), h)


def test_double_threshold_keeps_extremes_and_pulls_middle_to_half():
    # One sample, one channel, values from -20 to 20: thresholds at r*min = -10 and
    # r*max = +10. Sharp sigmoids show the two regimes plainly.
    h = torch.linspace(-20, 20, 81, dtype=torch.float64).view(1, 1, -1)
    act = DoubleThreshold(1, alpha=5.0, r_init=0.5).double()
    out = act(h).detach().flatten()
    v = h.flatten()
    extreme = v.abs() >= 12
    middle = v.abs() <= 8
    torch.testing.assert_close(out[extreme], v[extreme], rtol=0, atol=1e-3)
    torch.testing.assert_close(out[middle], torch.full_like(out[middle], 0.5), rtol=0, atol=1e-3)
    # With the default, soft alpha = 0.2, the middle is still pulled towards 1/2 much
    # more than the extremes are.
    soft = DoubleThreshold(1).double()(h).detach().flatten()
    away = v != 0.5  # the fixed point 1/2 itself has nothing to shrink
    shrink = (soft[away] - 0.5).abs() / (v[away] - 0.5).abs()
    assert shrink[v[away].abs() <= 2].max() < 0.5 < shrink[v[away].abs() >= 18].min()
