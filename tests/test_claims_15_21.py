"""Claims 15-21: each judge reaches each verdict on synthetic measurements, each measure
runs end to end at a tiny budget (sane values, cached on a second call), each plot writes
its PNG files; plus the pieces they are built from (the custom training loop, the
shared-statistics BN-LSTM, the GHN network, the diabetes split)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from normlab.claims import Budget, RunContext, get_claim
from normlab.claims import _custom_loop as loop

TINY = Budget("test", step_scale=0.02, seeds=1)
PNG = b"\x89PNG\r\n\x1a\n"
IDS = {15: "fixup_no_norm", 16: "enorm_small_batch", 17: "weightnorm_arpit_init",
       18: "ghn_fast_learning", 19: "mcbn_uncertainty", 20: "bnlstm_per_step",
       21: "input_bn_lstm"}


def _module(number: int):
    import importlib

    return importlib.import_module(f"normlab.claims.c{number}_{IDS[number]}")


def _measure_twice(number: int, tmp_path):
    """Measure at the tiny budget, check JSON safety, that a second call reuses every
    run and returns the same thing, that the verdict is valid and survives a JSON round
    trip, and that the plot writes PNGs named after the claim."""
    claim = get_claim(number)
    assert claim.number == number and claim.id == IDS[number]
    assert claim.missing_requirements() == []
    ctx = RunContext(claim.id, TINY, tmp_path / "study", log=lambda line: None)
    m = claim.measure(ctx)
    json.dumps(m, allow_nan=False)
    done, reused = ctx.runs_done, ctx.runs_reused
    assert done > 0 and reused == 0
    assert claim.measure(ctx) == m
    assert ctx.runs_done == done and ctx.runs_reused == done
    verdict, reason = claim.judge(m)
    assert verdict in ("reproduced", "not reproduced", "inconclusive") and reason
    assert claim.judge(json.loads(json.dumps(m))) == (verdict, reason)
    files = claim.plot(m, tmp_path)
    assert files
    for name in files:
        assert name.startswith(claim.id) and name.endswith(".png")
        assert (tmp_path / name).read_bytes()[:8] == PNG
    return m


def _acc(x):
    assert x is not None and 0.0 <= x <= 1.0
    return x


# ------------------------------------------------------------------ the custom loop


def test_fit_keeps_group_lr_ratios_under_the_schedule():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    groups = [{"params": [model[0].weight], "lr": 0.2},
              {"params": [model[0].bias], "lr": 0.02}]
    seen = []
    out = loop.fit(model, x, y, x, y, steps=6, batch_size=8, lr=0.2, seed=0,
                   param_groups=groups, schedule="cosine",
                   after_step=lambda opt: seen.append([g["lr"] for g in opt.param_groups]))
    assert out["steps_done"] == 6 and not out["diverged"]
    for step, (w, b) in enumerate(seen):
        expected = 0.2 * 0.5 * (1 + math.cos(math.pi * step / 6))
        assert w == pytest.approx(expected) and b == pytest.approx(expected / 10)
    assert out["evals"]["step"][-1] == 6 and _acc(out["final_test_acc"]) == out["evals"][
        "test_acc"][-1]


def test_fit_is_deterministic_and_flags_divergence():
    x, y = torch.randn(64, 5), torch.randint(0, 2, (64,))

    def run(lr):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 2))
        return loop.fit(model, x * (1e3 if lr > 1 else 1), y, x, y, steps=20, batch_size=16,
                        lr=lr, seed=3, momentum=0.9)

    a, b = run(0.1), run(0.1)
    assert a == b and not a["diverged"]
    bad = run(1e6)
    assert bad["diverged"] and bad["final_test_acc"] is None
    json.dumps(bad, allow_nan=False)


def test_fit_scheduler_owns_the_rate():
    from normlab.init import arpit_warmup

    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    out = loop.fit(model, x, y, steps=5, batch_size=8, lr=0.4, seed=0,
                   scheduler=lambda opt: arpit_warmup(opt, 4))
    # lr_t = alpha_t^2 * 0.4 with alpha_t = t / 4 (t = 0, 1, ...), logged before each step
    assert out["curve"]["lr"] == pytest.approx([0.4 * (t / 4) ** 2 for t in range(4)] + [0.4])


def test_fit_regression_needs_a_loss():
    with pytest.raises(ValueError, match="loss_fn"):
        loop.fit(torch.nn.Linear(2, 1), torch.randn(8, 2), torch.randn(8, 1), steps=1,
                 batch_size=4, lr=0.1, seed=0, classification=False)


def test_summaries():
    assert loop.seed_range([0.9, 0.95, 0.92]) == pytest.approx(0.05)
    assert loop.noise_floor([0.9], [0.8, 0.85]) == pytest.approx(0.05)
    assert loop.noise_floor([0.9], [0.9]) == 0.01
    assert loop.acc_or_chance({"final_test_acc": None, "diverged": True}, 10) == 0.1
    assert loop.acc_or_chance({"final_test_acc": 0.7, "diverged": False}, 10) == 0.7
    assert loop.smooth([1.0, None, 3.0, 5.0], 2) == [1.0, 1.0, 3.0, 4.0]


# ------------------------------------------------------------------ claim 15: Fixup


def _c15(bn, fixup, plain, fixup_div=False, plain_div=False):
    def net(acc, div):
        return {"mean_acc": acc, "final_test_acc": [acc], "diverged": [div]}

    return {"lr": 0.025, "nets": {"bn": net(bn, False), "fixup": net(fixup, fixup_div),
                                  "plain": net(plain, plain_div)}}


def test_c15_judge_branches():
    judge = get_claim(15).judge
    assert judge(_c15(0.97, 0.96, 0.10))[0] == "reproduced"
    assert judge(_c15(0.97, 0.96, 0.96, plain_div=True))[0] == "reproduced"
    assert judge(_c15(0.97, 0.96, 0.955))[0] == "inconclusive"
    assert judge(_c15(0.97, 0.94, 0.10))[0] == "not reproduced"
    assert judge(_c15(0.97, 0.97, 0.10, fixup_div=True))[0] == "not reproduced"


def test_c15_falls_back_to_digits_for_1d_data():
    from types import SimpleNamespace

    c15 = _module(15)

    def ctx(name, shape):
        return SimpleNamespace(data=name, dataset=lambda: SimpleNamespace(in_shape=shape))

    assert c15._data_name(ctx("mnist1d", (1, 40))) == "digits"
    assert c15._data_name(ctx("mnist5k", (1, 28, 28))) == "mnist5k"


def test_c15_measure_and_plot(tmp_path, monkeypatch):
    c15 = _module(15)
    monkeypatch.setattr(c15, "DEPTH", 8)  # ResNet-8, few steps: keeps the test fast
    monkeypatch.setattr(c15, "WIDTH", 4)
    monkeypatch.setattr(c15, "_steps", lambda budget: 16)
    m = _measure_twice(15, tmp_path)
    assert m["depth"] == 8 and m["steps"] == 16 and m["lr"] == pytest.approx(0.1 * 32 / 128)
    assert set(m["nets"]) == {"bn", "fixup", "plain"}
    for net in m["nets"].values():
        assert len(net["final_test_acc"]) == 1 and _acc(net["mean_acc"])
        assert net["evals"][0]["step"][-1] <= m["steps"]


# ------------------------------------------------------------------ claim 16: ENorm


def _c16(small_diff, normal_diff, small_noise=0.01, normal_noise=0.01):
    def row(diff, noise):
        return {"diff": diff, "noise": noise, "enorm": {"mean_acc": 0.9 + diff},
                "plain": {"mean_acc": 0.9}}

    return {"batches": {"8": row(small_diff, small_noise),
                        "128": row(normal_diff, normal_noise)}}


def test_c16_judge_branches():
    judge = get_claim(16).judge
    assert judge(_c16(0.03, 0.0))[0] == "reproduced"
    assert judge(_c16(0.005, 0.0))[0] == "inconclusive"
    assert judge(_c16(0.03, 0.0, small_noise=0.05))[0] == "inconclusive"
    assert judge(_c16(-0.03, 0.0))[0] == "not reproduced"
    assert judge(_c16(0.03, -0.05))[0] == "not reproduced"


def test_c16_measure_and_plot(tmp_path, monkeypatch):
    c16 = _module(16)
    monkeypatch.setattr(c16, "DEPTH", 3)
    m = _measure_twice(16, tmp_path)
    assert set(m["batches"]) == {"8", "128"}
    small, normal = m["batches"]["8"], m["batches"]["128"]
    assert small["steps"] > normal["steps"]  # the same epochs at both batch sizes
    assert small["lr"] == pytest.approx(0.1 * math.sqrt(8 / 128))
    for row in (small, normal):
        assert row["diff"] == pytest.approx(row["enorm"]["mean_acc"] - row["plain"]["mean_acc"])
        assert row["noise"] >= 0.01


def test_c16_enorm_keeps_the_mlp_function():
    """The chain the claim hands to ENorm is accepted and a cycle keeps the function."""
    from normlab import models
    from normlab.nn import ENorm

    torch.manual_seed(0)
    model = models.mlp((1, 8, 8), 10, norm="none", width=16, depth=4)
    enorm = ENorm([*model.features, model.head], c=1.2)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        enorm.step()
        assert torch.allclose(model(x), before, atol=1e-5)


# ------------------------------------------------------------------ claim 17: WN + Arpit


def _c17(std, arp, warm, bn, arp_div=False, spread=0.0):
    def v(acc, div=False):
        return {"mean_acc": acc, "final_test_acc": [acc, acc + spread], "diverged": [div]}

    return {"variants": {"wn_standard": v(std), "wn_arpit": v(arp, arp_div),
                         "wn_arpit_warmup": v(warm), "bn": v(bn)}}


def test_c17_judge_branches():
    judge = get_claim(17).judge
    assert judge(_c17(0.10, 0.80, 0.90, 0.95))[0] == "reproduced"
    # A holds, B undecided (warm-up changes nothing beyond noise) -> inconclusive
    assert judge(_c17(0.10, 0.80, 0.805, 0.95))[0] == "inconclusive"
    # A holds, B undecided (no WN-BN gap to narrow)
    assert judge(_c17(0.10, 0.95, 0.96, 0.95))[0] == "inconclusive"
    # A fails (standard init trains too), B holds -> inconclusive
    assert judge(_c17(0.75, 0.80, 0.90, 0.95))[0] == "inconclusive"
    # A fails (Arpit diverged), B fails (warm-up lowers accuracy)
    assert judge(_c17(0.10, 0.80, 0.60, 0.95, arp_div=True))[0] == "not reproduced"
    # the noise floor follows the seed range
    assert judge(_c17(0.10, 0.80, 0.85, 0.95, spread=0.1))[0] == "inconclusive"


def test_c17_arpit_init_keeps_gradients_where_standard_init_loses_them():
    """At depth 30, Arpit et al.'s init keeps the forward norm within a decade and the
    first layer's gradient alive; torch's default init (g = ||v||) loses the input
    signal, so the first layer gets a vanishing gradient."""
    from normlab.claims.c17_weightnorm_arpit_init import wn_mlp
    from normlab.init import arpit_init_

    torch.manual_seed(0)
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    grads, ratios = {}, {}
    for kind in ("standard", "arpit"):
        model = wn_mlp(64, 10, width=32, depth=30)
        if kind == "arpit":
            arpit_init_(model, generator=torch.Generator().manual_seed(0))
        h = model[:-1](x)
        ratios[kind] = float(h.detach().norm(dim=1).mean() / x.norm(dim=1).mean())
        torch.nn.functional.cross_entropy(model[-1](h), y).backward()
        grads[kind] = float(model[1].parametrizations.weight.original1.grad.norm())
    assert 0.1 < ratios["arpit"] < 10
    assert grads["arpit"] > 1e-3
    assert grads["standard"] < 1e-4 * grads["arpit"]


def test_c17_measure_and_plot(tmp_path, monkeypatch):
    c17 = _module(17)
    monkeypatch.setattr(c17, "DEPTH", 3)
    monkeypatch.setattr(c17, "LRS", (0.01, 0.03))
    monkeypatch.setattr(c17, "_steps", lambda budget: 20)
    m = _measure_twice(17, tmp_path)
    assert set(m["variants"]) == set(c17.VARIANTS)
    for v in m["variants"].values():
        assert v["best_lr"] in (0.01, 0.03) and set(v["sweep"]) == {"0.01", "0.03"}
        _acc(v["mean_acc"])
    assert m["warmup_steps"] == int(m["steps"] * c17.WARMUP_FRACTION)


# ------------------------------------------------------------------ claim 18: GHN


def _c18(ghn, bn, spread=0.0, diverged=False):
    def net(acc, div=False):
        return {"mean_acc_epoch1": acc, "acc_epoch1": [acc, acc + spread], "best_lr": 0.01,
                "mean_final_acc": acc, "diverged": [div]}

    return {"steps": 100, "nets": {"ghn": net(ghn, diverged), "bn": net(bn),
                                   "plain": net(0.8)}}


def test_c18_judge_branches():
    judge = get_claim(18).judge
    assert judge(_c18(0.95, 0.96))[0] == "reproduced"
    assert judge(_c18(0.97, 0.96))[0] == "reproduced"
    assert judge(_c18(0.90, 0.96))[0] == "not reproduced"
    assert judge(_c18(0.93, 0.96, spread=0.02))[0] == "inconclusive"
    assert judge(_c18(0.96, 0.96, diverged=True))[0] == "not reproduced"


def test_c18_ghn_network_has_no_learned_bias_and_no_norm():
    from normlab.claims.c18_ghn_fast_learning import ghn_mlp, unit_interval
    from normlab.nn import GHNLinear

    model = ghn_mlp(64, 10, width=16, depth=2)
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.endswith("weight") for n in names)
    assert all(isinstance(m, GHNLinear) for m in model if hasattr(m, "weight"))
    x = torch.rand(6, 1, 8, 8)
    # the output layer's per-sample bias -sum(x)/2 is the same for every class
    h = model[:-1](x)
    out = model(x)
    last = model[-1]
    expected = h @ last.weight.t() - 0.5 * last.weight.sum(1) - 0.5 * h.sum(1, keepdim=True)
    assert torch.allclose(out, expected, atol=1e-5)
    a, b = unit_interval(torch.tensor([[-2.0, 2.0]]), torch.tensor([[0.0, 5.0]]))
    assert a.tolist() == [[0.0, 1.0]] and b.tolist() == [[0.5, 1.0]]


def test_c18_measure_and_plot(tmp_path, monkeypatch):
    c18 = _module(18)
    monkeypatch.setattr(c18, "LRS", (0.003, 0.03))
    m = _measure_twice(18, tmp_path)
    assert m["steps"] >= m["epoch_steps"] > 0
    for net in m["nets"].values():
        assert net["best_lr"] in (0.003, 0.03)
        _acc(net["mean_acc_epoch1"])
        assert net["evals"][0]["step"][0] <= m["epoch_steps"]


# ------------------------------------------------------------------ claim 19: MCBN


def _c19(diffs):
    return {"pll_diff": diffs, "mean_pll_diff": sum(diffs) / len(diffs),
            "se_pll_diff": (None if len(diffs) < 2 else
                            (sum((d - sum(diffs) / len(diffs)) ** 2 for d in diffs)
                             / (len(diffs) - 1) / len(diffs)) ** 0.5),
            "mean_pll": {"mcbn": -1.0, "cubn": -1.1},
            "mean_coverage95": {"mcbn": 0.95, "cubn": 0.9}}


def test_c19_judge_branches():
    judge = get_claim(19).judge
    assert judge(_c19([0.05, 0.06, 0.04]))[0] == "reproduced"
    assert judge(_c19([-0.05, -0.06, -0.04]))[0] == "not reproduced"
    assert judge(_c19([0.05, -0.06, 0.01]))[0] == "inconclusive"
    assert judge(_c19([0.05]))[0] == "inconclusive"


def test_c19_split_and_gaussian_pll():
    from normlab.claims.c19_mcbn_uncertainty import diabetes_split, gaussian_pll
    from normlab.uncertainty import predictive_log_likelihood

    parts = diabetes_split(0)
    assert [len(p) for p in parts[::2]] == [265, 88, 89]
    assert torch.allclose(parts[0].mean(0), torch.zeros(10), atol=1e-5)
    assert parts[1].shape == (265, 1) and abs(float(parts[1].std(unbiased=False)) - 1) < 1e-4
    assert not torch.equal(diabetes_split(1)[0], parts[0])
    # the CUBN log-likelihood equals MCBN's with one sample and the same variance
    mean, y = torch.randn(20, 1), torch.randn(20, 1)
    ref = float(predictive_log_likelihood(mean[None], y, tau=1 / 0.7))
    assert gaussian_pll(mean, 0.7, y) == pytest.approx(ref, abs=1e-5)


def test_c19_measure_and_plot(tmp_path, monkeypatch):
    c19 = _module(19)
    monkeypatch.setattr(c19, "_splits", lambda budget: 2)
    monkeypatch.setattr(c19, "SAMPLES", 16)
    m = _measure_twice(19, tmp_path)
    assert len(m["splits"]) == 2 and m["se_pll_diff"] is not None
    for r in m["splits"]:
        assert r["mcbn"]["inv_tau"] > 0 and r["mcbn"]["mean_mc_var"] > 0
        for k in ("mcbn", "cubn"):
            assert math.isfinite(r[k]["test_pll"]) and 0 <= r[k]["coverage95"] <= 1
    assert m["mean_pll_diff"] == pytest.approx(
        sum(r["mcbn"]["test_pll"] - r["cubn"]["test_pll"] for r in m["splits"]) / 2)


# ------------------------------------------------------------------ claim 20: BN-LSTM


def _c20(per_step, shared, lstm, steps_bn, steps_lstm, spread=0.0):
    def v(acc):
        return {"mean_acc": acc, "final_test_acc": [acc, acc + spread]}

    return {"variants": {"per_step": v(per_step), "shared": v(shared), "lstm": v(lstm)},
            "per_seed": [{"seed": i, "target_acc": 0.8, "steps_bn": b, "steps_lstm": ls}
                         for i, (b, ls) in enumerate(zip(steps_bn, steps_lstm, strict=True))]}


def test_c20_judge_branches():
    judge = get_claim(20).judge
    assert judge(_c20(0.97, 0.90, 0.95, [100, 100], [200, 160]))[0] == "reproduced"
    # A holds, B undecided (one seed below 1.5x)
    assert judge(_c20(0.97, 0.90, 0.95, [100, 100], [200, 120]))[0] == "inconclusive"
    # A holds, B fails (BN-LSTM slower in every seed)
    assert judge(_c20(0.97, 0.90, 0.95, [100, 100], [90, 100]))[0] == "inconclusive"
    # A fails (shared better), B fails (BN-LSTM never reached the target)
    assert judge(_c20(0.90, 0.97, 0.95, [None], [100]))[0] == "not reproduced"
    # A undecided, B undecided
    assert judge(_c20(0.95, 0.945, 0.95, [100], [120]))[0] == "inconclusive"
    # B fails when BN-LSTM ends worse, whatever its speed
    assert judge(_c20(0.90, 0.97, 0.95, [100], [300]))[0] == "not reproduced"


def test_c20_shared_statistics_are_one_set_for_every_step():
    from normlab.claims.c20_bnlstm_per_step import build

    torch.manual_seed(0)
    model = build("shared", (1, 8, 8), 10)
    norms = [*model.rnn.norm_ih, *model.rnn.norm_hh, *model.rnn.norm_c]
    assert norms and all(n.max_steps is None and n.running_mean.dim() == 1 for n in norms)
    assert all(float(n.weight.detach().mean()) == pytest.approx(0.1) for n in norms)
    model.train()
    model(torch.randn(16, 1, 8, 8))
    # eval: one set of statistics for every step, so a step's output does not depend on t
    model.eval()
    norm = model.rnn.norm_hh[0]
    x = torch.randn(3, 5, norm.num_features)
    assert torch.allclose(norm(x, 0), norm(x, 7))
    per_step = build("per_step", (1, 8, 8), 10)
    assert per_step.rnn.norm_hh[0].running_mean.shape[0] == per_step.rnn.max_steps


def test_c20_lstm_has_bnlstm_bias_init():
    from normlab.claims.c20_bnlstm_per_step import HIDDEN, build

    model = build("lstm", (1, 8, 8), 10)
    b_ih, b_hh = model.rnn.bias_ih_l0.detach(), model.rnn.bias_hh_l0.detach()
    assert torch.all(b_ih[HIDDEN:2 * HIDDEN] == 1) and float(b_hh.abs().sum()) == 0
    assert float(b_ih[:HIDDEN].abs().sum() + b_ih[2 * HIDDEN:].abs().sum()) == 0


def test_c20_measure_and_plot(tmp_path, monkeypatch):
    c20 = _module(20)
    monkeypatch.setattr(c20, "HIDDEN", 16)
    monkeypatch.setattr(c20, "BATCH", 16)
    monkeypatch.setattr(c20, "_steps", lambda budget: 20)
    m = _measure_twice(20, tmp_path)
    assert set(m["variants"]) == {"per_step", "shared", "lstm"}
    for r in m["per_seed"]:
        assert 0 < r["target_acc"] <= 1
        assert r["steps_bn"] is None or 1 <= r["steps_bn"] <= m["steps"]


# ------------------------------------------------------------------ claim 21: input BN


def _c21(auc_bn, auc_lstm, acc_bn, acc_lstm):
    def v(auc, acc):
        return {"mean_train_loss_auc": auc, "mean_acc": acc, "final_test_acc": [acc],
                "train_set_acc": [1.0]}

    return {"variants": {"input_bn": v(auc_bn, acc_bn), "lstm": v(auc_lstm, acc_lstm)}}


def test_c21_judge_branches():
    judge = get_claim(21).judge
    assert judge(_c21(0.10, 0.20, 0.95, 0.95))[0] == "reproduced"
    assert judge(_c21(0.10, 0.20, 0.90, 0.95))[0] == "reproduced"  # worse still "no better"
    assert judge(_c21(0.10, 0.20, 0.98, 0.95))[0] == "not reproduced"  # generalises better
    assert judge(_c21(0.25, 0.20, 0.95, 0.95))[0] == "not reproduced"  # not faster
    assert judge(_c21(None, 0.20, 0.95, 0.95))[0] == "not reproduced"  # input-BN diverged
    assert judge(_c21(0.18, 0.20, 0.95, 0.95))[0] == "inconclusive"


def test_c21_measure_and_plot(tmp_path, monkeypatch):
    c21 = _module(21)
    monkeypatch.setattr(c21, "HIDDEN", 16)
    m = _measure_twice(21, tmp_path)
    for v in m["variants"].values():
        assert v["mean_train_loss_auc"] > 0 and _acc(v["mean_acc"])
        assert _acc(v["train_set_acc"][0])


# ------------------------------------------------------------------ all judges


def test_judges_do_not_mutate_their_input():
    cases = {15: _c15(0.97, 0.96, 0.1), 16: _c16(0.03, 0.0), 17: _c17(0.1, 0.8, 0.9, 0.95),
             18: _c18(0.95, 0.96), 19: _c19([0.05, 0.06]),
             20: _c20(0.97, 0.9, 0.95, [100], [200]), 21: _c21(0.1, 0.2, 0.95, 0.95)}
    for number, m in cases.items():
        before = copy.deepcopy(m)
        get_claim(number).judge(m)
        assert m == before
