"""Self-normalizing networks: SELU constants and fixed point, Alpha Dropout, LeCun
init, and the depth behaviour of a self-normalizing MLP."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from normlab.init import lecun_normal_
from normlab.models import self_normalizing_mlp
from normlab.nn import SELU, AlphaDropout
from normlab.nn.selu import ALPHA01, LAMBDA01, SELU_SATURATION, alpha_dropout_affine

# ---------------------------------------------------------------------------------------
# float64 references written from the paper's equations


def closed_form_constants():
    """alpha01 and lambda01 from the closed forms (SNNs notebook), float64."""
    c = math.erfc(1 / math.sqrt(2))
    e = math.e
    pi = math.pi
    alpha = -math.sqrt(2 / pi) / (c * math.sqrt(e) - 1)
    lam = (1 - math.sqrt(e) * c) * math.sqrt(
        2 * pi
        / (2 + pi - 2 * math.sqrt(e) * (2 + pi) * c + e * pi * c**2
           + 2 * e**2 * math.erfc(math.sqrt(2)))
    )
    return alpha, lam


def gaussian_expectation(f, mean, var, n=200_001, width=12.0):
    """E[f(z)] for z ~ N(mean, var), trapezoid rule on each side of 0 (SELU has a kink
    there), in float64. f maps a float64 tensor to a float64 tensor."""
    sd = math.sqrt(var)
    lo, hi = mean - width * sd, mean + width * sd
    total = 0.0
    for a, b in ((lo, min(0.0, hi)), (max(0.0, lo), hi)):
        if b <= a:
            continue
        z = np.linspace(a, b, n)
        pdf = np.exp(-((z - mean) ** 2) / (2 * var)) / math.sqrt(2 * math.pi * var)
        fz = f(torch.from_numpy(z)).numpy()
        total += np.trapezoid(fz * pdf, z)
    return total


def selu_moment_map(mu, nu, omega=0.0, tau=1.0):
    """The paper's g: (mu, nu) -> (E[selu(z)], E[selu(z)^2]), z ~ N(mu omega, nu tau),
    using normlab's SELU."""
    act = SELU()
    m1 = gaussian_expectation(act, mu * omega, nu * tau)
    m2 = gaussian_expectation(lambda z: act(z) ** 2, mu * omega, nu * tau)
    return m1, m2


# ---------------------------------------------------------------------------------------
# SELU


def test_constants_match_closed_forms():
    alpha, lam = closed_form_constants()
    assert abs(alpha - ALPHA01) < 1e-14
    assert abs(lam - LAMBDA01) < 1e-14
    assert abs(SELU_SATURATION - (-lam * alpha)) < 1e-14
    assert abs(SELU_SATURATION - (-1.7580993408473766)) < 1e-15


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selu_matches_torch(dtype):
    x = (torch.randn(4096, dtype=dtype) * 3).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = SELU()(x)
    y_ref = torch.nn.functional.selu(x_ref)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_selu_of_standard_normal_has_mean_0_variance_1():
    # Exact (quadrature) and sampled.
    m1, m2 = selu_moment_map(0.0, 1.0)
    assert abs(m1) < 1e-7
    assert abs(m2 - m1**2 - 1.0) < 1e-7
    y = SELU()(torch.randn(1_000_000, dtype=torch.float64))
    assert abs(y.mean().item()) < 5e-3
    assert abs(y.var().item() - 1.0) < 6e-3


def test_selu_with_other_constants_misses_the_fixed_point():
    # The property is specific to (alpha01, lambda01): ELU-like alpha = 1 does not have it.
    m1 = gaussian_expectation(SELU(alpha=1.0, scale=LAMBDA01), 0.0, 1.0)
    assert abs(m1) > 0.05


def test_moment_map_jacobian_at_fixed_point():
    # Finite differences of g at (mu, nu) = (0, 1), omega = 0, tau = 1 (the paper's
    # Jacobian [[0, .0888], [0, .7826]], spectral norm 0.7877 < 1: a stable fixed point).
    h = 1e-4
    jac = np.zeros((2, 2))
    for j, (dmu, dnu) in enumerate(((h, 0.0), (0.0, h))):
        plus = selu_moment_map(0.0 + dmu, 1.0 + dnu)
        minus = selu_moment_map(0.0 - dmu, 1.0 - dnu)
        jac[:, j] = (np.array(plus) - np.array(minus)) / (2 * h)
    assert abs(jac[0, 0]) < 1e-9 and abs(jac[1, 0]) < 1e-9
    assert abs(jac[0, 1] - 0.0888) < 5e-4
    assert abs(jac[1, 1] - 0.7826) < 5e-4
    assert abs(np.linalg.norm(jac, 2) - 0.7877) < 5e-4


def test_selu_rejects_bad_constants():
    with pytest.raises(ValueError, match="SELU"):
        SELU(alpha=0.0)


# ---------------------------------------------------------------------------------------
# Alpha Dropout


def test_affine_correction_closed_form_values():
    q = 0.9
    alpha_p = -LAMBDA01 * ALPHA01
    a_ref = (q + alpha_p**2 * q * (1 - q)) ** -0.5
    b_ref = -a_ref * (1 - q) * alpha_p
    a, b = alpha_dropout_affine(1 - q)
    assert abs(a - a_ref) < 1e-15 and abs(b - b_ref) < 1e-15
    assert round(a, 5) == 0.92128 and round(b, 5) == 0.16197
    drop = AlphaDropout(0.1)
    assert abs(drop.a - a_ref) < 1e-15 and abs(drop.b - b_ref) < 1e-15


def test_alpha_dropout_keeps_zero_one_at_q_09():
    x = torch.randn(2_000_000, dtype=torch.float64)
    y = AlphaDropout(0.1).train()(x)
    assert abs(y.mean().item()) < 4e-3
    assert abs(y.var().item() - 1.0) < 5e-3
    # Without the affine correction (plain "set to alpha'") the moments drift.
    keep = torch.rand_like(x) < 0.9
    raw = torch.where(keep, x, torch.full_like(x, SELU_SATURATION))
    assert abs(raw.mean().item()) > 0.1


def test_alpha_dropout_keeps_a_general_fixed_point():
    mean, var = 0.3, 2.0
    x = mean + math.sqrt(var) * torch.randn(2_000_000, dtype=torch.float64)
    y = AlphaDropout(0.25, mean=mean, var=var).train()(x)
    assert abs(y.mean().item() - mean) < 6e-3
    assert abs(y.var().item() - var) < 1.5e-2


def test_alpha_dropout_is_torch_alpha_dropout_map():
    # Recover torch.nn.AlphaDropout's affine map from its output and compare.
    p = 0.2
    x = torch.randn(50_000, dtype=torch.float64)
    y_t = nn.AlphaDropout(p).train()(x)
    drop = AlphaDropout(p)
    dropped_value = drop.a * SELU_SATURATION + drop.b
    dropped = torch.isclose(y_t, torch.full_like(y_t, dropped_value), rtol=0, atol=1e-12)
    assert abs(dropped.double().mean().item() - p) < 1e-2
    kept = ~dropped
    torch.testing.assert_close(y_t[kept], drop.a * x[kept] + drop.b)
    # Ours: the same two-valued structure and the same drop rate.
    y = drop.train()(x)
    ours_dropped = torch.isclose(y, torch.full_like(y, dropped_value), rtol=0, atol=1e-12)
    assert abs(ours_dropped.double().mean().item() - p) < 1e-2
    torch.testing.assert_close(y[~ours_dropped], drop.a * x[~ours_dropped] + drop.b)
    # And the same output statistics, within Monte Carlo error.
    assert abs(y.mean().item() - y_t.mean().item()) < 3e-2
    assert abs(y.var().item() - y_t.var().item()) < 4e-2


def test_alpha_dropout_identity_in_eval_and_at_p0():
    x = torch.randn(64, 32)
    assert torch.equal(AlphaDropout(0.3).eval()(x), x)
    assert torch.equal(AlphaDropout(0.0).train()(x), x)
    assert not torch.equal(AlphaDropout(0.3).train()(x), x)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_alpha_dropout_rejects_bad_p(p):
    with pytest.raises(ValueError, match="AlphaDropout.*p"):
        AlphaDropout(p)


# ---------------------------------------------------------------------------------------
# LeCun init


def test_lecun_normal_equals_torch_kaiming_fan_in_linear():
    w = torch.empty(64, 32, 3, 3)
    w_ref = torch.empty(64, 32, 3, 3)
    lecun_normal_(w, generator=torch.Generator().manual_seed(3))
    nn.init.kaiming_normal_(w_ref, mode="fan_in", nonlinearity="linear",
                            generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(w, w_ref)


def test_lecun_normal_std():
    w = lecun_normal_(torch.empty(256, 288))
    assert abs(w.std().item() * math.sqrt(288) - 1.0) < 0.01
    assert abs(w.mean().item()) < 0.01 / math.sqrt(288) * 10


def test_lecun_normal_rejects_vectors():
    with pytest.raises(ValueError, match="lecun_normal_"):
        lecun_normal_(torch.empty(10))


# ---------------------------------------------------------------------------------------
# Deep networks


def _hidden_moments(model, x):
    """(mean, var) of the output of every activation / dropout of a Sequential."""
    out = []
    for layer in model:
        x = layer(x)
        if not isinstance(layer, nn.Linear):
            out.append((x.mean().item(), x.var().item()))
    return out


def test_64_layer_selu_net_stays_at_zero_one_and_relu_collapses():
    torch.manual_seed(1)
    depth, width = 64, 512
    x = torch.randn(128, width)
    snn = self_normalizing_mlp(width, width, depth, 10)
    with torch.no_grad():
        selu_moments = _hidden_moments(snn[:-1], x)
    assert len(selu_moments) == depth
    for mean, var in selu_moments:
        assert abs(mean) < 0.1 and abs(var - 1.0) < 0.1
    mean, var = selu_moments[-1]
    assert abs(mean) < 0.05 and abs(var - 1.0) < 0.05

    # The same net with ReLU and the same (LeCun) init: the second moment halves at
    # every layer, so after 64 layers the signal is gone (about 2**-64).
    layers = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        lecun_normal_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    with torch.no_grad():
        relu_moments = _hidden_moments(nn.Sequential(*layers), x)
    assert relu_moments[-1][1] < 1e-12
    assert relu_moments[9][1] < 1e-2  # already collapsing after 10 layers


def test_selu_net_with_alpha_dropout_keeps_zero_one_in_training():
    torch.manual_seed(2)
    model = self_normalizing_mlp(128, 128, 16, 10, dropout=0.1).train()
    assert sum(isinstance(m, AlphaDropout) for m in model) == 16
    with torch.no_grad():
        moments = _hidden_moments(model[:-1], torch.randn(512, 128))
    for mean, var in moments:
        assert abs(mean) < 0.1 and abs(var - 1.0) < 0.1


def test_self_normalizing_mlp_structure_and_init():
    model = self_normalizing_mlp(20, 300, 3, 5)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (20, 300), (300, 300), (300, 300), (300, 5)]
    assert sum(isinstance(m, SELU) for m in model) == 3
    assert not any(isinstance(m, AlphaDropout) for m in model)
    for m in linears:
        assert torch.all(m.bias == 0)
    big = torch.cat([m.weight.flatten() * math.sqrt(m.in_features) for m in linears[1:3]])
    assert abs(big.std().item() - 1.0) < 0.02
    assert model(torch.randn(7, 20)).shape == (7, 5)
    assert len(self_normalizing_mlp(4, 8, 0, 2)) == 1


@pytest.mark.parametrize(
    "kwargs",
    [dict(depth=-1), dict(hidden_features=0), dict(dropout=1.0), dict(in_features=2.5)],
)
def test_self_normalizing_mlp_rejects_bad_arguments(kwargs):
    args = dict(in_features=4, hidden_features=8, depth=2, out_features=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match="self_normalizing_mlp"):
        self_normalizing_mlp(**args)
