"""MC Batch Norm (Teye et al. 2018) and the derived stochastic-normalization noise model
(after Shekhovtsov & Flach 2018)."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab.uncertainty import (
    StochasticNormalization,
    mc_batchnorm,
    predictive_log_likelihood,
    sample_batch_noise,
)

# ---------------------------------------------------------------------------------------
# References


def reference_prediction(model, batch, inputs):
    """One MCBN sample from torch's own layers: run ``batch`` through a copy in train
    mode, read each BN layer's input there (already normalized upstream by the same
    batch), put its mean and biased variance into the running statistics, and predict
    ``inputs`` in eval mode."""
    ref = copy.deepcopy(model)
    bns = [m for m in ref.modules()
           if isinstance(m, (nn.modules.batchnorm._BatchNorm, normlab.nn.BatchNorm))]
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod, args[0]))
             for m in bns]
    ref.train()
    with torch.no_grad():
        ref(batch)
    for h in hooks:
        h.remove()
    for m in bns:
        x = seen[m]
        dims = [0] + list(range(2, x.dim()))
        with torch.no_grad():
            m.running_mean.copy_(x.mean(dims))
            m.running_var.copy_(x.var(dims, unbiased=False))
    ref.eval()
    with torch.no_grad():
        return ref(inputs)


def mlp(bn=nn.BatchNorm1d):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), bn(16), nn.ReLU(), nn.Linear(16, 16),
                          normlab.nn.BatchNorm(16), nn.ReLU(), nn.Linear(16, 2)).double()
    _randomize_bn(model)
    return model


def _randomize_bn(model):
    # Trained-looking running statistics and affine parameters, far from the defaults,
    # so that using them instead of the batch's would show.
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_mean") and m.running_mean is not None:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.num_batches_tracked.fill_(7)


def conv_net(dim, bn_cls):
    torch.manual_seed(0)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    model = nn.Sequential(conv(2, 4, 3, padding=1), bn_cls(4), nn.ReLU(),
                          conv(4, 4, 3, padding=1), bn_cls(4), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(3)).double()
    model(torch.randn(2, 2, *([4] * dim), dtype=torch.float64))  # materialise LazyLinear
    _randomize_bn(model)
    return model


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------
# MC Batch Norm


def test_samples_match_reference_and_moments():
    model = mlp()
    batches = [torch.randn(32, 5, dtype=torch.float64) * 2 + 1 for _ in range(4)]
    x = torch.randn(10, 5, dtype=torch.float64)
    out = mc_batchnorm(model, x, batches, samples=4, return_samples=True)
    refs = torch.stack([reference_prediction(model, b, x) for b in batches])
    torch.testing.assert_close(out.samples, refs, rtol=1e-10, atol=1e-10)
    r = refs.numpy()
    np.testing.assert_allclose(out.mean.numpy(), r.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.var.numpy(), r.var(0), rtol=1e-8, atol=1e-12)
    # The samples differ from each other and from the ordinary eval prediction.
    assert out.var.min() > 0
    with torch.no_grad():
        plain = model.eval()(x)
    assert not torch.allclose(out.mean, plain, atol=1e-3)
    # tau adds the inverse precision.
    with_tau = mc_batchnorm(model, x, batches, samples=4, tau=4.0)
    torch.testing.assert_close(with_tau.var, out.var + 0.25)
    torch.testing.assert_close(with_tau.mean, out.mean)
    assert with_tau.samples is None


@pytest.mark.parametrize(
    "dim, bn_cls",
    [(1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d), (2, normlab.nn.BatchNorm)],
)
def test_conv_models_all_batchnorm_kinds(dim, bn_cls):
    model = conv_net(dim, bn_cls)
    size = [4] * dim
    train = torch.randn(40, 2, *size, dtype=torch.float64)
    x = torch.randn(3, 2, *size, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    out = mc_batchnorm(model, x, train, samples=3, batch_size=8, generator=gen,
                       return_samples=True)
    # The same batches, drawn again from a generator with the same seed.
    gen = torch.Generator().manual_seed(5)
    batches = [train[torch.randperm(40, generator=gen)[:8]] for _ in range(3)]
    refs = torch.stack([reference_prediction(model, b, x) for b in batches])
    torch.testing.assert_close(out.samples, refs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_model_state_and_modes_are_restored(mode):
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.ReLU(),
                          nn.Linear(16, 16), normlab.nn.BatchNorm(16, momentum=None),
                          nn.ReLU(), nn.Linear(16, 2))
    _randomize_bn(model)
    model.train(mode != "eval")
    if mode == "mixed":
        model[1].eval()  # a frozen BN inside a training model
    flags = [m.training for m in model.modules()]
    before = state(model)
    mc_batchnorm(model, torch.randn(7, 5), torch.randn(100, 5), samples=5, batch_size=16)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [m.training for m in model.modules()] == flags
    assert "forward" not in model[1].__dict__ and "forward" not in model[5].__dict__
    # The layers behave as before: a train step updates the running stats again.
    model.train()
    model(torch.randn(8, 5))
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


def test_state_restored_after_an_error():
    model = mlp()
    before = state(model)
    model.train()
    with pytest.raises(ValueError, match=r"mc_batchnorm: layer 1 \(BatchNorm1d\(16\)\)"):
        # a training batch of one sample: one value per channel in the first BN
        mc_batchnorm(model, torch.randn(3, 5, dtype=torch.float64),
                     [torch.randn(1, 5, dtype=torch.float64)], samples=2)
    assert model.training and all(m.training for m in model.modules())
    assert all("forward" not in m.__dict__ for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_prediction_does_not_depend_on_other_test_inputs():
    model = mlp()
    train = torch.randn(200, 5, dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64)
    kw = dict(samples=4, batch_size=16, return_samples=True)
    full = mc_batchnorm(model, x, train, generator=torch.Generator().manual_seed(1), **kw)
    for i in (0, 3):
        alone = mc_batchnorm(model, x[i:i + 1], train, generator=torch.Generator().manual_seed(1),
                             **kw)
        torch.testing.assert_close(alone.samples[:, 0], full.samples[:, i], rtol=1e-12, atol=0)
    # ... and replacing the other test inputs changes nothing either.
    x2 = x.clone()
    x2[1:] = torch.randn(5, 5, dtype=torch.float64) * 10
    other = mc_batchnorm(model, x2, train, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(other.samples[:, 0], full.samples[:, 0], rtol=1e-12, atol=0)


def test_spread_shrinks_as_batch_size_grows():
    model = mlp()
    train = torch.randn(2000, 5, dtype=torch.float64) * 1.5 + 0.5
    x = torch.randn(20, 5, dtype=torch.float64)
    spread = {}
    for m in (4, 16, 64, 256):
        gen = torch.Generator().manual_seed(m)
        spread[m] = mc_batchnorm(model, x, train, samples=24, batch_size=m,
                                 generator=gen).var.mean().item()
    assert spread[4] > spread[16] > spread[64] > spread[256]
    # Roughly 1/M: each 4x larger batch cuts the spread by well over 2x.
    assert spread[256] < spread[4] / 20


def test_dataloader_of_pairs():
    model = mlp()
    data = torch.utils.data.TensorDataset(torch.randn(64, 5, dtype=torch.float64),
                                          torch.randn(64, 2, dtype=torch.float64))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)
    x = torch.randn(4, 5, dtype=torch.float64)
    out = mc_batchnorm(model, x, loader, samples=6, return_samples=True)  # cycles: 4 batches
    batches = [b[0] for b in loader]
    refs = torch.stack([reference_prediction(model, batches[t % 4], x) for t in range(6)])
    torch.testing.assert_close(out.samples, refs, rtol=1e-10, atol=1e-10)


def test_warns_about_other_layers_with_running_statistics():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Unflatten(1, (2, 2)),
                          nn.InstanceNorm1d(2, track_running_stats=True))
    with pytest.warns(RuntimeWarning, match=r"layer 3 \(InstanceNorm1d\).*not sampled"):
        mc_batchnorm(model, torch.randn(3, 5), torch.randn(40, 5), samples=2, batch_size=8)


def test_bad_arguments():
    model = mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    train = torch.randn(50, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="has no BatchNorm layer"):
        mc_batchnorm(nn.Linear(5, 2), x, train, batch_size=8)
    renorm = nn.Sequential(nn.Linear(5, 4), normlab.nn.BatchRenorm(4))
    with pytest.raises(ValueError, match=r"layer 1 \(BatchRenorm\)"):
        mc_batchnorm(renorm, torch.randn(3, 5), torch.randn(50, 5), batch_size=8)
    with pytest.raises(ValueError, match="batch_size .*is required"):
        mc_batchnorm(model, x, train)
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[2, 50\]"):
        mc_batchnorm(model, x, train, batch_size=51)
    with pytest.raises(ValueError, match="batch_size applies only"):
        mc_batchnorm(model, x, [train[:8]], batch_size=8)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        mc_batchnorm(model, x, train, samples=0, batch_size=8)
    with pytest.raises(ValueError, match="tau"):
        mc_batchnorm(model, x, train, batch_size=8, tau=0.0)
    with pytest.raises(ValueError, match="ran out after 2 batches"):
        mc_batchnorm(model, x, iter([train[:8], train[8:16]]), samples=3)
    with pytest.raises(TypeError, match="item 0 is dict"):
        mc_batchnorm(model, x, [{"x": train[:8]}], samples=1)


# ---------------------------------------------------------------------------------------
# Predictive log-likelihood


def test_pll_single_sample_is_gaussian_log_density():
    tau = 2.5
    pred = torch.randn(1, 30, 1, dtype=torch.float64)
    y = torch.randn(30, 1, dtype=torch.float64)
    sd = 1 / math.sqrt(tau)
    z = (y - pred[0]).numpy()
    logpdf = -0.5 * (z / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)
    pll = predictive_log_likelihood(pred, y, tau, reduction="none")
    np.testing.assert_allclose(pll.numpy(), logpdf[:, 0], rtol=1e-12)
    assert predictive_log_likelihood(pred, y, tau).item() == pytest.approx(logpdf.mean())


def test_pll_is_log_of_the_mixture_density():
    tau = 0.7
    preds = torch.randn(5, 8, 3, dtype=torch.float64)
    y = torch.randn(8, 3, dtype=torch.float64)
    p, t = preds.numpy(), y.numpy()
    dens = np.prod(np.sqrt(tau / (2 * np.pi)) * np.exp(-tau / 2 * (t - p) ** 2), axis=2)
    ref = np.log(dens.mean(0))
    np.testing.assert_allclose(predictive_log_likelihood(preds, y, tau, "none").numpy(), ref,
                               rtol=1e-10)


# ---------------------------------------------------------------------------------------
# Stochastic normalization noise


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return np.abs(fa - fb).max()


def ks_critical(n, m, alpha=1e-3):
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def empirical_bn_noise(k, m, mu=3.0, sigma=2.0):
    """(sigma / sigma_B, (mu_B - mu) / sigma_B) of k Gaussian batches of size m."""
    x = mu + sigma * torch.randn(k, m, dtype=torch.float64)
    mu_b = x.mean(1)
    sigma_b = x.var(1, unbiased=False).sqrt()
    return (sigma / sigma_b).numpy(), ((mu_b - mu) / sigma_b).numpy()


def test_noise_sampler_matches_batch_statistics_of_gaussian_data():
    k, m = 20_000, 8
    s_emp, u_emp = empirical_bn_noise(k, m)
    s, u = sample_batch_noise(k, m, dtype=torch.float64)
    s, u = s.numpy(), u.numpy()
    crit = ks_critical(k, k)
    assert ks_statistic(s, s_emp) < crit
    assert ks_statistic(u, u_emp) < crit
    assert ks_statistic(u / s, u_emp / s_emp) < crit  # (mu_B - mu) / sigma ~ N(0, 1/M)
    # E[s^2] = M E[1 / chi2_{M-1}] = M / (M - 3).
    assert abs((s**2).mean() - m / (m - 3)) < 0.05
    # The test has power: chi2 with M degrees of freedom (a plausible slip) is rejected.
    wrong = np.sqrt(m / torch.distributions.Chi2(torch.tensor(float(m))).sample((k,)).numpy())
    assert ks_statistic(wrong, s_emp) > 2 * crit


def test_stochastic_normalization_layer():
    layer = StochasticNormalization(4, batch_size=16)
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    y = layer.train()(x)
    # One affine map per channel, shared by every sample and position: y = s x - u.
    for c in range(4):
        xc, yc = x[:, c].flatten(), y[:, c].flatten()
        s = (yc[1] - yc[0]) / (xc[1] - xc[0])
        u = s * xc[0] - yc[0]
        torch.testing.assert_close(yc, s * xc - u)
        assert s > 0
    assert not torch.allclose(y, x)
    assert torch.equal(layer.eval()(x), x)
    affine = StochasticNormalization(4, batch_size=16, affine=True).double().eval()
    with torch.no_grad():
        affine.weight.fill_(2.0)
        affine.bias.fill_(-1.0)
    torch.testing.assert_close(affine(x), 2 * x - 1)
    with pytest.raises(ValueError, match=r"StochasticNormalization\(4\)"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="batch_size must be an int >= 2"):
        StochasticNormalization(4, batch_size=1)
