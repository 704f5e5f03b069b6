"""Claims 18-21 (GHN, MC batch norm, BN-LSTM per-step statistics, input-BN LSTM) on the
lab's protocol: each measures at a tiny budget, yields finite per-seed values for every
declared effect, is judged and plotted; and the properties of their run functions
against independent computations."""

import math

import pytest
import torch

from normlab.claims import _curves as C
from normlab.claims import get_claim
from normlab.claims.base import Budget, RunContext, make_spec
from normlab.claims.protocol import judge

TINY = Budget("test", step_scale=0.02, seeds=2, decisive=False)


@pytest.mark.parametrize("number", [18, 19, 20, 21])
def test_claim_measures_judges_and_plots(number, tmp_path):
    claim = get_claim(str(number))
    ctx = RunContext(claim.id, TINY, tmp_path, log=lambda line: None)
    measured = claim.measure(ctx)
    for effect in claim.effects:
        values = measured["effects"][effect.key]
        assert len(values) == TINY.seeds, effect.key
        assert all(math.isfinite(v) for v in values), (effect.key, values)
    record = judge(claim, measured, False)
    assert record["verdict"] == "inconclusive"  # a non-decisive budget never decides
    assert len(record["effects"]) == len(claim.effects)
    # measure is deterministic given the stored runs: a second call reuses them all
    again = RunContext(claim.id, TINY, tmp_path, log=lambda line: None)
    assert claim.measure(again)["effects"] == measured["effects"]
    assert again.runs_done == 0
    (tmp_path / "plots").mkdir()
    files = claim.plot(measured, tmp_path / "plots")
    assert files and all((tmp_path / "plots" / f).stat().st_size > 1000 for f in files)


def _result(steps, accs, planned, classes=10):
    return {"curves": {"step": steps, "test_acc": accs, "val_acc": accs},
            "planned": planned, "num_classes": classes}


def test_area_is_the_mean_over_planned_evaluations_with_chance_for_missing_ones():
    planned = C.planned_steps(10, 3)
    assert planned == [3, 6, 9, 10]
    full = _result(planned, [0.2, 0.4, 0.6, 0.8], planned)
    assert C.area(full) == pytest.approx(0.5)
    # a run that diverged after step 6: the two missing evaluations count as chance
    cut = _result([3, 6], [0.2, 0.4], planned)
    assert C.area(cut) == pytest.approx((0.2 + 0.4 + 0.1 + 0.1) / 4)
    assert C.val_area(cut) == C.area(cut, "val_acc")
    assert C.train_loss_area({"train_loss_mean": None, "num_classes": 10}) == \
        pytest.approx(math.log(10))


def _tiny_data(seed=0):
    from normlab.data import Dataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 1, 4, 4, generator=g)
    y = (x.flatten(1).sum(1) > 0).long()
    fit = Dataset(name="tiny", x_train=x[:64], y_train=y[:64], x_test=x[64:80],
                  y_test=y[64:80], num_classes=2)
    return fit, (x[80:], y[80:])


def test_train_with_curves_does_not_disturb_training_and_reports_the_final_model():
    """The evaluations in the callback (eval mode, BN running statistics) must leave the
    training run bit for bit what normlab.train.train makes without them, and the last
    point of the curves must be the trained model's own evaluation."""
    from normlab import models
    from normlab.train import evaluate, train

    fit, val = _tiny_data()
    torch.manual_seed(0)
    a = models.mlp(fit.in_shape, 2, norm="bn", width=8, depth=1)
    b = models.mlp(fit.in_shape, 2, norm="bn", width=8, depth=1)
    b.load_state_dict(a.state_dict())
    res = C.train_with_curves(a, fit, val, steps=12, batch_size=8, lr=0.05, seed=3,
                              eval_every=4, optimizer="sgd")
    ref = train(b, fit.x_train, fit.y_train, steps=12, batch_size=8, lr=0.05, seed=3,
                progress=False)
    assert res["curves"]["step"] == [4, 8, 12]
    assert res["train_loss_mean"] == pytest.approx(sum(ref.curve["loss"]) / 12, rel=1e-6)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    test_loss, test_acc = evaluate(b, fit.x_test, fit.y_test)
    assert res["final_test_acc"] == test_acc and res["final_test_loss"] == \
        pytest.approx(test_loss)
    assert res["final_val_acc"] == evaluate(b, *val)[1]
    assert C.final_val(res) == res["final_val_acc"]  # the rate-selection score reads it
    assert C.final_val(dict(res, final_val_acc=None)) == 0.5  # diverged: chance


def test_unit_interval_maps_the_fit_split_onto_0_1():
    fit, val = _tiny_data()
    f01, (xv, _) = C.unit_interval(fit, val)
    assert float(f01.x_train.min()) == 0.0 and float(f01.x_train.max()) == 1.0
    for x in (f01.x_test, xv):
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    lo, hi = fit.x_train.min(), fit.x_train.max()
    assert torch.allclose(f01.x_train, (fit.x_train - lo) / (hi - lo))


def test_ghn_net_is_the_hamming_computation_with_no_bias_and_no_norm():
    from normlab.claims.c18_ghn_fast_learning import build

    torch.manual_seed(0)
    net = build("ghn", 6, 3, width=5, depth=1).double()
    assert not any(name.endswith("bias") for name, _ in net.named_parameters())
    assert not any("Norm" in type(m).__name__ for m in net.modules())
    x = torch.rand(4, 6, dtype=torch.float64)
    w1, w2 = net[1].weight, net[3].weight
    # -GHD/L from the fuzzy-XOR definition, then relu(0.5 + h); unnormalized output
    ghd = (x[:, None, :] + w1[None] - 2 * x[:, None, :] * w1[None]).sum(-1)
    hidden = torch.relu(0.5 - ghd / 6)
    out = -0.5 * (hidden[:, None, :] + w2[None] - 2 * hidden[:, None, :] * w2[None]).sum(-1)
    assert torch.allclose(net(x), out, atol=1e-12)


def test_gaussian_pll_matches_scipy():
    from scipy import stats

    from normlab.claims.c19_mcbn_uncertainty import gaussian_pll

    g = torch.Generator().manual_seed(0)
    mean, y = torch.randn(50, 1, generator=g), torch.randn(50, 1, generator=g)
    ref = stats.norm.logpdf(y.double().numpy(), mean.double().numpy(), math.sqrt(0.7)).mean()
    assert gaussian_pll(mean.double(), 0.7, y.double()) == pytest.approx(ref, rel=1e-10)


def test_diabetes_split_is_a_standardised_partition():
    from normlab.claims.c19_mcbn_uncertainty import diabetes_split

    x_tr, y_tr, x_va, y_va, x_te, y_te = diabetes_split(3)
    assert len(x_tr) + len(x_va) + len(x_te) == 442
    assert torch.allclose(x_tr.double().mean(0), torch.zeros(10, dtype=torch.float64),
                          atol=1e-5)
    assert float(y_tr.double().std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    rows = {tuple(r.tolist()) for r in torch.cat([x_tr, x_va, x_te])}
    assert len(rows) == 442  # the three parts are disjoint


def test_mcbn_run_key_holds_the_whole_tau_grid():
    """Issue 18: the old hand-written key stored only the grid's length."""
    from normlab.claims.c19_mcbn_uncertainty import INV_TAU_FACTORS, mcbn_split

    kw = {"split": 0, "steps": 10, "lr": 1e-3, "batch_size": 32, "width": 50, "depth": 2,
          "samples": 8, "inv_tau_factors": list(INV_TAU_FACTORS), "fractions": [0.6, 0.2, 0.2]}
    other = dict(kw, inv_tau_factors=[2 * f for f in INV_TAU_FACTORS])
    assert make_spec(mcbn_split, kw).key != make_spec(mcbn_split, other).key


def test_bnlstm_variants_differ_only_in_how_statistics_are_kept():
    from normlab.claims.c20_bnlstm_per_step import build

    torch.manual_seed(0)
    per_step = build("per_step", (1, 8, 8), 10, hidden=6)
    torch.manual_seed(0)
    shared = build("shared", (1, 8, 8), 10, hidden=6)
    for name in ("norm_ih", "norm_hh", "norm_c"):
        for a, b in zip(getattr(per_step.rnn, name), getattr(shared.rnn, name), strict=True):
            assert a.running_mean.dim() == 2 and b.running_mean.dim() == 1
            assert torch.equal(a.weight, b.weight)  # the same gamma (0.1)
    # training statistics of the shared input term pool every step: after one batch,
    # its running mean is momentum x the mean of W_x x over batch and steps
    x = torch.randn(5, 1, 8, 8)
    shared.train()
    shared(x)
    seq = x.permute(0, 2, 1, 3).flatten(2)
    wx = seq.double() @ shared.rnn.weight_ih_l0.double().t()
    m = shared.rnn.norm_ih[0]
    assert torch.allclose(m.running_mean.double(), m.momentum * wx.mean((0, 1)), atol=1e-5)


def test_lstm_reference_has_the_bnlstm_bias_init():
    from normlab.claims.c20_bnlstm_per_step import build

    model = build("lstm", (1, 8, 8), 10, hidden=6)
    b_ih, b_hh = model.rnn.bias_ih_l0.detach(), model.rnn.bias_hh_l0.detach()
    assert torch.equal(b_ih[6:12], torch.ones(6))  # forget gate (torch's i, f, g, o)
    assert float(b_ih[:6].abs().sum() + b_ih[12:].abs().sum() + b_hh.abs().sum()) == 0.0
