"""Claims 1-7 (BatchNorm's own claims): verdict logic on synthetic measurements, each
measurement end to end at a tiny budget (cached on a second call), the plots, and the
measuring helpers against independent references."""

import copy
import math

import pytest
import torch

from normlab.claims import all_claims
from normlab.claims import c01_bn_fewer_steps as c01
from normlab.claims import c02_bn_higher_lr as c02
from normlab.claims import c03_bn_init_scale as c03
from normlab.claims import c04_bn_less_dropout as c04
from normlab.claims import c05_bn_conditioning as c05
from normlab.claims import c06_internal_covariate_shift as c06
from normlab.claims import c07_bn_small_batch as c07
from normlab.claims.base import Budget, RunContext

TINY = Budget("test", step_scale=0.02, seeds=1)
MODULES = [c01, c02, c03, c04, c05, c06, c07]


def _ctx(tmp_path, claim):
    return RunContext(claim.id, TINY, tmp_path, log=lambda s: None)


def _measure_twice(tmp_path, claim):
    """measure() twice in one context: the second call must only reuse stored runs."""
    ctx = _ctx(tmp_path, claim)
    first = claim.measure(ctx)
    done, reused = ctx.runs_done, ctx.runs_reused
    assert done > 0
    second = claim.measure(ctx)
    assert ctx.runs_done == done
    assert ctx.runs_reused > reused
    assert second == first
    return first


def _check_plot(tmp_path, claim, measured):
    out = tmp_path / "plots"
    out.mkdir()
    names = claim.plot(measured, out)
    assert names
    for name in names:
        assert name.startswith(claim.id) and name.endswith(".png")
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_claims_are_discovered_with_numbers_1_to_7():
    found = {c.number: c for c in all_claims()}
    for number, module in enumerate(MODULES, start=1):
        claim = module.CLAIM
        assert found[number] is claim
        assert claim.criterion and claim.statement and claim.source and claim.setup
        assert claim.missing_requirements() == []


# --------------------------------------------------------------------------- claim 1


def test_first_step_reaching():
    evals = {"step": [5, 10, 15, 20], "test_acc": [0.2, 0.6, 0.59, 0.9]}
    assert c01.first_step_reaching(evals, 0.6) == 10
    assert c01.first_step_reaching(evals, 0.2) == 5
    assert c01.first_step_reaching(evals, 0.95) is None


def _c01_measured(ratios):
    return {"per_seed": [{"seed": i, "target_acc": 0.95, "steps_none": 300,
                          "steps_bn": None if r is None else int(300 / r), "ratio": r}
                         for i, r in enumerate(ratios)]}


def test_c01_judge_branches():
    assert c01.judge(_c01_measured([4.0, 3.0]))[0] == "reproduced"
    assert c01.judge(_c01_measured([1.2, None]))[0] == "not reproduced"
    assert c01.judge(_c01_measured([4.0, 1.2]))[0] == "inconclusive"
    assert c01.judge(_c01_measured([2.0, 2.5]))[0] == "inconclusive"
    verdict, reason = c01.judge(_c01_measured([None]))
    assert verdict == "not reproduced" and "never reached" in reason


def test_c01_measure_cached_and_plot(tmp_path):
    m = _measure_twice(tmp_path, c01.CLAIM)
    assert set(m["best_lr"]) == {"none", "bn"} and m["best_lr"]["bn"] in c01.LRS
    row = m["per_seed"][0]
    assert 0.0 <= row["target_acc"] <= 1.0
    # the no-norm net reaches its own best accuracy by definition
    assert row["steps_none"] is not None and 1 <= row["steps_none"] <= m["steps"]
    assert m["eval_every"] == 1 and len(m["curves"]["bn"][0]["step"]) == m["steps"]
    assert c01.judge(m)[0] in ("reproduced", "not reproduced", "inconclusive")
    _check_plot(tmp_path, c01.CLAIM, m)


# --------------------------------------------------------------------------- claim 2


def test_largest_training_lr_uses_accuracy_and_divergence():
    runs = [{"final_test_acc": 0.9, "diverged": False},
            {"final_test_acc": 0.8, "diverged": True},
            {"final_test_acc": 0.6, "diverged": False},
            {"final_test_acc": 0.3, "diverged": False}]
    assert c02.largest_training_lr([0.01, 0.1, 1.0, 10.0], runs) == 1.0
    assert c02.largest_training_lr([0.01, 0.1], [runs[3], runs[1]]) is None


def _c02_measured(none, bn):
    return {"lrs": list(c02.LRS), "seeds": list(range(len(none))),
            "largest_lr": {"none": none, "bn": bn}}


def test_c02_judge_branches():
    lrs = c02.LRS
    assert c02.judge(_c02_measured([lrs[4], lrs[3]], [lrs[6], lrs[5]]))[0] == "reproduced"
    assert c02.judge(_c02_measured([lrs[4]], [lrs[4]]))[0] == "not reproduced"
    assert c02.judge(_c02_measured([lrs[4]], [lrs[5]]))[0] == "inconclusive"  # only ~3x
    verdict, reason = c02.judge(_c02_measured([lrs[-1]], [lrs[-1]]))
    assert verdict == "inconclusive" and "top of the grid" in reason
    assert c02.judge(_c02_measured([None], [lrs[3]]))[0] == "inconclusive"


def test_c02_grid_is_half_decades():
    ratios = [b / a for a, b in zip(c02.LRS, c02.LRS[1:], strict=False)]
    assert all(abs(r - math.sqrt(10)) < 1e-3 for r in ratios)
    assert c02.LRS[0] == pytest.approx(1e-3) and c02.LRS[-1] == pytest.approx(10.0)


def test_c02_measure_cached_and_plot(tmp_path):
    m = _measure_twice(tmp_path, c02.CLAIM)
    for norm in ("none", "bn"):
        accs = m["final_test_acc"][norm][0]
        assert len(accs) == len(c02.LRS)
        assert all(a is None or 0.0 <= a <= 1.0 for a in accs)
        assert m["largest_lr"][norm][0] is None or m["largest_lr"][norm][0] in c02.LRS
    _check_plot(tmp_path, c02.CLAIM, m)


# --------------------------------------------------------------------------- claim 3


def _c03_measured(plain, bn):
    return {"seeds": list(range(len(plain))), "spread": {"none": plain, "bn": bn}}


def test_c03_judge_branches():
    assert c03.judge(_c03_measured([0.8, 0.6], [0.03, 0.05]))[0] == "reproduced"
    assert c03.judge(_c03_measured([0.8], [0.79]))[0] == "not reproduced"
    assert c03.judge(_c03_measured([0.8, 0.8], [0.03, 0.2]))[0] == "inconclusive"
    assert c03.judge(_c03_measured([0.8], [0.06]))[0] == "inconclusive"  # BN spread > 0.05
    verdict, reason = c03.judge(_c03_measured([0.02], [0.0]))
    assert verdict == "inconclusive" and "nothing" in reason


def test_c03_measure_cached_and_plot(tmp_path):
    m = _measure_twice(tmp_path, c03.CLAIM)
    for norm in ("none", "bn"):
        accs = m["final_test_acc"][norm][0]
        assert len(accs) == len(m["init_scales"])
        assert m["spread"][norm][0] == pytest.approx(max(accs) - min(accs))
    _check_plot(tmp_path, c03.CLAIM, m)


def test_init_scale_leaves_bn_net_function_unchanged():
    # The premise of claim 3 (Ioffe & Szegedy section 3.3): with a BN after every conv,
    # scaling the hidden weights does not change the network's function.
    from normlab import models

    torch.manual_seed(0)
    a = models.build("cnn", (1, 8, 8), 10, norm="bn", width=4, depth=2, init_scale=1.0)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for m in b.features:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(10.0)
    x = torch.randn(16, 1, 8, 8)
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- claim 4


def _c04_measured(plain, bn):
    """plain/bn: mean accuracies at p = 0, 0.2, 0.5."""
    mean = {"none": dict(zip(["0.0", "0.2", "0.5"], plain, strict=True)),
            "bn": dict(zip(["0.0", "0.2", "0.5"], bn, strict=True))}
    best = {n: max(("0.2", "0.5"), key=mean[n].get) for n in mean}
    gain = {n: mean[n][best[n]] - mean[n]["0.0"] for n in mean}
    return {"seeds": [0, 1, 2], "mean_test_acc": mean, "best_dropout": best,
            "dropout_gain": gain}


def test_c04_judge_branches():
    assert c04.judge(_c04_measured([0.90, 0.93, 0.92], [0.95, 0.955, 0.94]))[0] == "reproduced"
    # dropout helps BN as much as the plain net
    assert c04.judge(_c04_measured([0.90, 0.93, 0.92], [0.90, 0.93, 0.92]))[0] \
        == "not reproduced"
    # BN alone falls short of the plain net with dropout
    assert c04.judge(_c04_measured([0.90, 0.93, 0.92], [0.91, 0.91, 0.90]))[0] \
        == "not reproduced"
    verdict, reason = c04.judge(_c04_measured([0.93, 0.93, 0.92], [0.95, 0.95, 0.94]))
    assert verdict == "inconclusive" and "does not help" in reason


def test_c04_measure_cached_and_plot(tmp_path):
    m = _measure_twice(tmp_path, c04.CLAIM)
    for norm in ("none", "bn"):
        means = m["mean_test_acc"][norm]
        assert set(means) == {str(p) for p in m["dropouts"]}
        best = m["best_dropout"][norm]
        assert m["dropout_gain"][norm] == pytest.approx(means[best] - means["0.0"])
    _check_plot(tmp_path, c04.CLAIM, m)


# --------------------------------------------------------------------------- claim 5


def test_hessian_spectrum_matches_the_exact_hessian():
    """Power iteration and Hutchinson on HVPs against the eigenvalues and trace of the
    full Hessian, built column by column from float64 autograd (torch.func)."""
    torch.manual_seed(0)
    from normlab import models

    for norm in ("none", "bn"):
        net = models.build("mlp", (1, 2, 2), 3, norm=norm, width=3, depth=1).double()
        x, y = torch.randn(12, 1, 2, 2, dtype=torch.float64), torch.arange(12) % 3
        names = [n for n, _ in net.named_parameters()]
        shapes = [p.shape for _, p in net.named_parameters()]
        flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

        def loss_of(flat, net=net, names=names, shapes=shapes, x=x, y=y):
            params, i = {}, 0
            for name, shape in zip(names, shapes, strict=True):
                k = math.prod(shape)
                params[name] = flat[i:i + k].reshape(shape)
                i += k
            out = torch.func.functional_call(net, params, (x,))
            return torch.nn.functional.cross_entropy(out, y)

        hess = torch.autograd.functional.hessian(loss_of, flat0)
        eig = torch.linalg.eigvalsh(hess)
        got = c05.hessian_spectrum(net.float(), x.float(), y, power_iters=400, probes=400)
        assert got["num_params"] == flat0.numel()
        assert got["lambda_max"] == pytest.approx(float(eig[-1]), rel=1e-3, abs=1e-5)
        assert got["lambda_min"] == pytest.approx(float(eig[0]), rel=1e-2, abs=1e-4)
        assert abs(got["trace"] - float(hess.trace())) < 4 * got["trace_se"] + 1e-6


def _c05_measured(pairs):
    """pairs: per seed, ((plain init, bn init), (plain trained, bn trained)) kappas."""
    res = {"none": [], "bn": []}
    for (pi, bi), (pt, bt) in pairs:
        res["none"].append({"init": {"condition": pi}, "trained": {"condition": pt}})
        res["bn"].append({"init": {"condition": bi}, "trained": {"condition": bt}})
    return {"seeds": list(range(len(pairs))), "results": res}


def test_c05_judge_branches():
    assert c05.judge(_c05_measured([((100, 40), (300, 100))]))[0] == "reproduced"
    assert c05.judge(_c05_measured([((100, 120), (300, 300))]))[0] == "not reproduced"
    assert c05.judge(_c05_measured([((100, 40), (300, 200))]))[0] == "inconclusive"
    verdict, reason = c05.judge(_c05_measured([((100, None), (300, 100))]))
    assert verdict == "inconclusive" and "undefined" in reason


def test_c05_measure_cached_and_plot(tmp_path):
    m = _measure_twice(tmp_path, c05.CLAIM)
    for norm in ("none", "bn"):
        for when in ("init", "trained"):
            r = m["results"][norm][0][when]
            assert r["lambda_max"] > 0 and r["lambda_min"] <= r["lambda_max"]
            assert r["num_params"] > 1000 and len(r["weight_norms"]) == c05.DEPTH
    _check_plot(tmp_path, c05.CLAIM, m)


# --------------------------------------------------------------------------- claim 6


def test_interval_drift_against_hand_computation():
    mu_a, sd_a = [0.0, 1.0], [1.0, 2.0]
    mu_b, sd_b = [0.5, 1.0], [1.0, 1.0]
    moved = (0.5 + 0.0 + 0.0 + 1.0) / 2
    rms_a = math.sqrt((0 + 1 + 1 + 4) / 2)
    rms_b = math.sqrt((0.25 + 1 + 1 + 1) / 2)
    want = moved / (0.5 * (rms_a + rms_b))
    assert c06.interval_drift(mu_a, sd_a, mu_b, sd_b) == pytest.approx(want)
    assert c06.interval_drift(mu_a, sd_a, mu_a, sd_a) == 0.0
    # scale-free: the same relative change at 10x the scale drifts the same
    assert c06.interval_drift([10 * v for v in mu_a], [10 * v for v in sd_a],
                              [10 * v for v in mu_b], [10 * v for v in sd_b]) \
        == pytest.approx(want)


def test_layer_io_and_gradient_shift():
    from normlab import models

    torch.manual_seed(0)
    net = models.build("mlp", (1, 4, 4), 3, norm="bn", width=5, depth=3)
    x, y = torch.randn(20, 1, 4, 4), torch.arange(20) % 3
    before = copy.deepcopy(net.state_dict())
    inputs, outputs = c06.layer_io(net, x)
    assert [t.shape for t in inputs] == [(20, 16), (20, 5), (20, 5)]
    assert [t.shape for t in outputs] == [(20, 5)] * 3
    # the next layer's input is ReLU(BN(pre-norm)) computed from batch statistics
    pre = outputs[0]
    bn = (pre - pre.mean(0)) / torch.sqrt(pre.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(inputs[1], torch.relu(bn), rtol=1e-4, atol=1e-5)
    # measuring does not touch the model (running statistics included)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # no step on the earlier layers: no shift
    assert c06.gradient_shift(net, x, y, layer=2, lr=0.0) == pytest.approx(
        {"rel_l2": 0.0, "cos": 1.0})
    assert c06.gradient_shift(net, x, y, layer=2, lr=0.5)["rel_l2"] > 0


def _c06_measured(plain, bn, acc=0.9):
    def r(d):
        return {"total_drift": d, "final_test_acc": acc, "diverged": False,
                "grad_shift_rel_l2": [0.1, 0.2]}
    return {"seeds": list(range(len(plain))),
            "results": {"none": [r(d) for d in plain], "bn": [r(d) for d in bn]}}


def test_c06_judge_branches():
    assert c06.judge(_c06_measured([6.0, 5.0], [1.0, 2.5]))[0] == "reproduced"
    assert c06.judge(_c06_measured([1.0], [1.2]))[0] == "not reproduced"
    assert c06.judge(_c06_measured([6.0, 5.0], [1.0, 4.0]))[0] == "inconclusive"
    verdict, reason = c06.judge(_c06_measured([6.0], [1.0], acc=0.2))
    assert verdict == "inconclusive" and "did not train" in reason


def test_c06_measure_cached_and_plot(tmp_path):
    m = _measure_twice(tmp_path, c06.CLAIM)
    for norm in ("none", "bn"):
        r = m["results"][norm][0]
        assert r["steps"][0] == 0 and r["steps"][-1] == m["steps"]
        assert len(r["drift"]) == len(r["steps"]) - 1 and all(d >= 0 for d in r["drift"])
        assert r["total_drift"] == pytest.approx(sum(r["drift"]))
        for when in ("depth_init", "depth_trained"):
            assert len(r[when]["post_std"]) == c06.DEPTH
    # with BN (train mode) every pre-activation is standardised, so after ReLU of a
    # unit normal the output mean is 1/sqrt(2 pi) = 0.399 at init (gamma 1, beta 0)
    post = m["results"]["bn"][0]["depth_init"]["post_mean"]
    assert all(abs(p - 1 / math.sqrt(2 * math.pi)) < 0.05 for p in post)
    _check_plot(tmp_path, c06.CLAIM, m)


# --------------------------------------------------------------------------- claim 7


def test_lr_rules():
    assert c07.lr_rules(32) == {"linear": 0.05, "sqrt": 0.05}
    assert c07.lr_rules(2) == pytest.approx({"linear": 0.05 / 16, "sqrt": 0.05 / 4})


def _c07_measured(bn, plain):
    """bn/plain: (acc at batch 2, acc at batch 32)."""
    best = {n: {"2": {"mean_acc": a[0]}, "32": {"mean_acc": a[1]}}
            for n, a in (("bn", bn), ("none", plain))}
    return {"batches": [2, 32], "small": 2, "reference": 32, "best": best,
            "drop": {"bn": bn[1] - bn[0], "none": plain[1] - plain[0]}}


def test_c07_judge_branches():
    assert c07.judge(_c07_measured((0.80, 0.95), (0.93, 0.94)))[0] == "reproduced"
    assert c07.judge(_c07_measured((0.94, 0.95), (0.93, 0.94)))[0] == "not reproduced"
    # a drop, but the plain net drops as much: not BN's doing
    assert c07.judge(_c07_measured((0.80, 0.95), (0.80, 0.95)))[0] == "not reproduced"
    assert c07.judge(_c07_measured((0.91, 0.95), (0.93, 0.95)))[0] == "inconclusive"


def test_c07_measure_cached_and_plot(tmp_path):
    m = _measure_twice(tmp_path, c07.CLAIM)
    num_train = 1438  # digits' training split
    for bs in m["batches"]:
        assert m["steps"][str(bs)] == max(5, round(m["epochs"] * num_train / bs))
    for norm in ("none", "bn"):
        assert m["drop"][norm] == pytest.approx(
            m["best"][norm]["32"]["mean_acc"] - m["best"][norm]["2"]["mean_acc"])
    _check_plot(tmp_path, c07.CLAIM, m)
