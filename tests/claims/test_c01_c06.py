"""Claims 1-6 (the Batch Normalization paper's) on the lab's protocol, and the lab's
measurement probes (normlab.claims._probes) against independent computations."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from normlab import models
from normlab.claims import _probes as probes
from normlab.claims import get_claim
from normlab.claims.base import Budget, RunContext
from normlab.claims.protocol import judge

TINY = Budget("test", step_scale=0.02, seeds=2, decisive=False)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- claims


@pytest.mark.parametrize("number", [1, 2, 3, 4, 5, 6])
def test_claim_measures_judges_and_plots(number, tmp_path):
    claim = get_claim(number)
    ctx = RunContext(claim.id, TINY, tmp_path, log=lambda _line: None)
    measured = claim.measure(ctx)
    for effect in claim.effects:
        values = measured["effects"][effect.key]
        assert len(values) == TINY.seeds, effect.key
        assert all(math.isfinite(v) for v in values), (effect.key, values)
    record = judge(claim, measured, False)
    assert record["verdict"] == "inconclusive"  # a non-decisive budget never decides
    assert [r["key"] for r in record["effects"]] == [e.key for e in claim.effects]
    names = claim.plot(measured, tmp_path)
    assert names and all((tmp_path / n).stat().st_size > 1000 for n in names)
    # measure() is a deterministic function of the stored runs: a second call reuses them
    again = RunContext(claim.id, TINY, tmp_path, log=lambda _line: None)
    assert claim.measure(again)["effects"] == measured["effects"]
    assert again.runs_done == 0


def test_claim_texts_have_no_measured_numbers_in_lessons():
    for number in range(1, 7):
        claim = get_claim(number)
        assert claim.setup_change and claim.scale_note and claim.criterion_change
        for text in claim.lessons.values():
            assert not any(ch.isdigit() for ch in text), (number, text)


def test_c01_target_passage_on_the_smoothed_curve():
    from normlab.claims.c01_bn_fewer_steps import area, eval_steps, steps_to_target

    at = eval_steps(400, 40)
    assert at[0] == 2 and at[-1] == 400 and at == sorted(set(at))
    # log-spaced: past the first integer steps, every gap is the same small factor
    assert all(b / a < 1.2 for a, b in zip(at[:-1], at[1:], strict=True) if a >= 20)
    n = len(at)
    # one lucky evaluation above the target is smoothed away; a sustained rise is not
    vals = [0.5] * n
    vals[5] = 1.0
    for i in range(20, n):
        vals[i] = 0.97
    run = {"eval_at": at, "num_classes": 10,
           "curve": {"test_acc": vals, "val_acc": vals}}
    # the centred 3-point window first lies wholly on the plateau at index 21
    assert steps_to_target(run, 0.95) == (at[21], True)
    assert steps_to_target(run, 0.99) == (at[-1], False)
    assert area(run, "test_acc") == pytest.approx(sum(vals) / n)
    # a diverged run's missing evaluations count at chance
    short = {"eval_at": at, "num_classes": 10, "curve": {"test_acc": [0.9, 0.9]}}
    assert area(short, "test_acc") == pytest.approx((1.8 + 0.1 * (n - 2)) / n)


def test_c02_largest_trainable_rate_interpolates_in_log_rate():
    from normlab.claims.c02_bn_higher_lr import largest_trainable

    lrs = [0.01, 0.1, 1.0, 10.0]
    value, state = largest_trainable(lrs, [0.9, 0.9, 0.7, 0.1], 0.5)
    assert state == "bracketed"
    assert value == pytest.approx(0.0 + (0.7 - 0.5) / (0.7 - 0.1))  # log10(1) + 1/3 decade
    assert largest_trainable(lrs, [0.9] * 4, 0.5) == (pytest.approx(1.0), "above")
    assert largest_trainable(lrs, [0.1] * 4, 0.5) == (pytest.approx(-2.5), "below")


def test_c03_sensitivity_is_the_mean_absolute_change_from_scale_one():
    from normlab.claims.c03_bn_init_scale import sensitivity

    assert sensitivity([80.0, 95.0, 90.0], [0.1, 1.0, 10.0]) == pytest.approx(10.0)
    assert sensitivity([95.0, 95.0, 95.0], [0.1, 1.0, 10.0]) == 0.0


def test_c05_and_c06_ratios_map_undefined_values_to_no_evidence():
    from normlab.claims.c05_bn_conditioning import kappa_ratio
    from normlab.claims.c06_internal_covariate_shift import drift_ratio

    assert kappa_ratio({"condition": 8.0}, {"condition": 2.0}) == 4.0
    assert kappa_ratio({"condition": None}, {"condition": 2.0}) == 1.0
    assert drift_ratio({"total_drift": 6.0}, {"total_drift": 1.5}) == 4.0
    assert drift_ratio({"total_drift": None}, {"total_drift": 1.5}) == 1.0


# --------------------------------------------------------------------------- probes


def _tiny(norm, seed=0):
    torch.manual_seed(seed)
    net = models.build("mlp", (1, 2, 2), 3, norm=norm, width=3, depth=2)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(12, 1, 2, 2, generator=gen)
    y = torch.randint(0, 3, (12,), generator=gen)
    return net, x, y


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def _exact_hessian(net, x, y):
    """The full loss Hessian in float64 from torch.autograd.functional.hessian."""
    net = copy.deepcopy(net).double().train()
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in net.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters() if p.requires_grad])

    def loss(flat):
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            k = math.prod(shape)
            params[name] = flat[i:i + k].reshape(shape)
            i += k
        out = torch.func.functional_call(net, params, (x.double(),))
        return nn.functional.cross_entropy(out, y)

    return torch.autograd.functional.hessian(loss, flat0)


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_hessian_spectrum_matches_the_exact_hessian(norm):
    net, x, y = _tiny(norm)
    before = _state(net)
    h = _exact_hessian(net, x, y)
    eig = torch.linalg.eigvalsh(h)
    out = probes.hessian_spectrum(net, x, y, power_iters=200, probes=200, seed=3)
    assert out["num_params"] == h.shape[0]
    assert out["lambda_max"] == pytest.approx(float(eig[-1]), rel=1e-3, abs=1e-6)
    assert out["lambda_min"] == pytest.approx(float(eig[0]), rel=1e-3, abs=1e-6)
    # Hutchinson is unbiased: the exact trace lies within a few standard errors
    assert abs(out["trace"] - float(h.trace())) < 4 * out["trace_se"] + 1e-9
    if out["condition"] is not None:
        assert out["condition"] == pytest.approx(out["lambda_max"] * h.shape[0] / out["trace"])
    after = _state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)  # probing changes nothing


def test_hvp_matches_a_finite_difference_of_gradients():
    net, x, y = _tiny("bn", seed=2)
    net = copy.deepcopy(net).double()
    params, hvp = probes.hvp_operator(net, x.double(), y)
    gen = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    hv = hvp(v)

    def grad_at(eps):
        with torch.no_grad():
            for p, d in zip(params, v, strict=True):
                p.add_(eps * d)
        loss = nn.functional.cross_entropy(net(x.double()), y)
        g = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, d in zip(params, v, strict=True):
                p.sub_(eps * d)
        return g

    eps = 1e-5
    fd = [(a - b) / (2 * eps) for a, b in zip(grad_at(eps), grad_at(-eps), strict=True)]
    for a, b in zip(hv, fd, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_hessian_spectrum_refuses_too_few_probes():
    net, x, y = _tiny("none")
    with pytest.raises(ValueError, match="probes >= 2"):
        probes.hessian_spectrum(net, x, y, power_iters=5, probes=1)


def test_layer_inputs_are_the_hidden_linears_inputs_and_leave_bn_alone():
    net, x, y = _tiny("bn")
    before = _state(net)
    inputs = probes.layer_inputs(net, x)
    lin = probes.hidden_linears(net)
    assert len(inputs) == 2
    torch.testing.assert_close(inputs[0], x.flatten(1))
    # the second hidden Linear sees the first block's output: Linear -> BN (batch stats) -> ReLU
    h = lin[0](x.flatten(1))
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + net.features[2].eps)
    h = torch.relu(h * net.features[2].weight + net.features[2].bias)
    torch.testing.assert_close(inputs[1], h.detach())
    after = _state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_interval_drift_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 4)), rng.normal(1.0, 2.0, size=(50, 4))
    mu_a, sd_a, mu_b, sd_b = a.mean(0), a.std(0), b.mean(0), b.std(0)
    rms_a = np.sqrt(np.mean(mu_a ** 2 + sd_a ** 2))
    rms_b = np.sqrt(np.mean(mu_b ** 2 + sd_b ** 2))
    want = np.mean(np.abs(mu_b - mu_a) + np.abs(sd_b - sd_a)) / (0.5 * (rms_a + rms_b))
    got_a = probes.unit_stats(torch.tensor(a))
    got_b = probes.unit_stats(torch.tensor(b))
    assert probes.interval_drift(*got_a, *got_b) == pytest.approx(float(want))
    assert probes.interval_drift(*got_a, *got_a) == 0.0
    with pytest.raises(ValueError, match="interval_drift"):
        probes.interval_drift([1.0], [1.0], [1.0, 2.0], [1.0, 2.0])


def test_gradient_shift_against_a_manual_step():
    net, x, y = _tiny("none", seed=4)
    before = _state(net)
    lr = 0.3
    out = probes.gradient_shift(net, x, y, 1, lr)
    ref = copy.deepcopy(net)
    lin0, lin1 = probes.hidden_linears(ref)
    loss = nn.functional.cross_entropy(ref(x), y)
    g_w0, g_b0, g1 = torch.autograd.grad(loss, [lin0.weight, lin0.bias, lin1.weight])
    with torch.no_grad():
        lin0.weight -= lr * g_w0
        lin0.bias -= lr * g_b0
    g1_after = torch.autograd.grad(nn.functional.cross_entropy(ref(x), y), lin1.weight)[0]
    assert out["rel_l2"] == pytest.approx(float((g1 - g1_after).norm() / g1.norm()), rel=1e-5)
    cos = float((g1 * g1_after).sum() / (g1.norm() * g1_after.norm()))
    assert out["cos"] == pytest.approx(cos, rel=1e-5)
    after = _state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
