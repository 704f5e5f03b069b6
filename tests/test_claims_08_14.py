"""Claims 8-14: each judge reaches each verdict on synthetic measurements, each measure
runs end to end at a tiny budget (sane values, cached on a second call), each plot
writes its PNG files."""

from __future__ import annotations

import copy
import math

import pytest

from normlab.claims import Budget, RunContext, get_claim
from normlab.claims._batch_sweep import (
    sampling_noise,
    scaled_lr,
    spread,
    steps_for_epochs,
    summary,
)

TINY = Budget("test", step_scale=0.01, seeds=1)
IDS = {8: "gn_batch_stable", 9: "ln_tiny_batch", 10: "sn_matches_best", 11: "an_beats_bn",
       12: "online_batch1", 13: "selu_self_normalizes", 14: "selu_deep_mlp"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Each claim measured once at the tiny budget: {number: (claim, ctx, measured)}."""
    cache = {}

    def get(number: int):
        if number not in cache:
            claim = get_claim(number)
            ctx = RunContext(claim.id, TINY, tmp_path_factory.mktemp(f"c{number}"),
                             log=lambda line: None)
            cache[number] = (claim, ctx, claim.measure(ctx))
        return cache[number]

    return get


def _check_common(number, measured, tmp_path):
    """The claim is registered, its measurement is JSON-safe, a second measure reuses
    every run, and its plot writes PNG files prefixed with its id."""
    import json

    claim, ctx, m = measured(number)
    assert claim.number == number and claim.id == IDS[number]
    assert claim.missing_requirements() == []
    json.dumps(m, allow_nan=False)
    done, reused = ctx.runs_done, ctx.runs_reused
    assert done > 0
    again = claim.measure(ctx)
    assert ctx.runs_done == done and ctx.runs_reused > reused
    assert again == m
    verdict, reason = claim.judge(m)
    assert verdict in ("reproduced", "not reproduced", "inconclusive") and reason
    # the report rebuilds verdicts from the stored JSON
    assert claim.judge(json.loads(json.dumps(m))) == (verdict, reason)
    files = claim.plot(m, tmp_path)
    assert files
    for name in files:
        assert name.startswith(claim.id) and name.endswith(".png")
        assert (tmp_path / name).read_bytes()[:8] == PNG
    return m, files


def _n_train() -> int:
    from normlab import data

    return int(data.load("digits").x_train.shape[0])


def _acc(x):
    assert x is not None and 0.0 <= x <= 1.0
    return x


# ------------------------------------------------------------------ shared helpers


def test_batch_sweep_helpers():
    assert scaled_lr(0.05, 32) == pytest.approx(0.05)
    assert scaled_lr(0.05, 2) == pytest.approx(0.05 / 16)
    # the same samples at every batch size
    assert steps_for_epochs(2.0, 1000, 4) == 500
    assert steps_for_epochs(2.0, 1000, 32) == 62
    assert steps_for_epochs(0.001, 1000, 32) == 10  # the minimum
    with pytest.raises(ValueError, match="steps_for_epochs"):
        steps_for_epochs(1.0, 1000, 0)
    s = summary([0.5, None, 0.7])
    assert s["mean"] == pytest.approx(0.4) and s["range"] == pytest.approx(0.7)
    assert spread([0.3]) == 0.0


def test_sampling_noise_is_two_standard_errors_of_a_difference():
    import numpy as np

    rng = np.random.default_rng(0)
    n, p = 360, 0.97
    diffs = (rng.binomial(n, p, 200_000) - rng.binomial(n, p, 200_000)) / n
    assert sampling_noise(p, n) == pytest.approx(2 * diffs.std(), rel=0.02)
    assert sampling_noise(p, n) == pytest.approx(0.0254, abs=5e-4)  # 2.5 points
    assert sampling_noise(1.0, n) == 0.0
    with pytest.raises(ValueError, match="sampling_noise"):
        sampling_noise(0.5, 0)


# ------------------------------------------------------------------ claim 8


def _m08(gn_spread, gap, noise, test_noise=0.0):
    return {"gn_spread": gn_spread, "gap_at_smallest": gap, "seed_range": noise,
            "test_noise": test_noise, "smallest_batch": 2, "batch_sizes": [2, 4, 8, 32]}


def test_c08_judge_branches():
    judge = get_claim(8).judge
    assert judge(_m08(0.005, 0.10, 0.005))[0] == "reproduced"
    assert judge(_m08(0.05, 0.10, 0.005))[0] == "not reproduced"  # GN not stable
    assert judge(_m08(0.03, 0.10, 0.005, test_noise=0.02))[0] == "inconclusive"  # noisy
    assert judge(_m08(0.005, -0.01, 0.0))[0] == "not reproduced"  # GN not ahead
    assert judge(_m08(0.005, 0.008, 0.0))[0] == "inconclusive"  # ahead by < 1 point
    # a wide seed range, or a small test set, raises the bar
    assert judge(_m08(0.005, 0.02, 0.03))[0] == "inconclusive"
    assert judge(_m08(0.005, 0.02, 0.0, test_noise=0.025))[0] == "inconclusive"
    assert "10.0 points" in judge(_m08(0.005, 0.10, 0.005))[1]


def test_c08_measure_and_plot(measured, tmp_path):
    m, _ = _check_common(8, measured, tmp_path)
    n_train = _n_train()
    assert m["batch_sizes"] == [2, 32]  # a custom budget takes the quick sweep
    for norm in ("gn", "bn"):
        for b in m["batch_sizes"]:
            _acc(m["acc"][norm][str(b)]["mean"])
    # the same epochs at every batch size (above the 10-step minimum)
    assert m["steps"]["2"] == round(m["epochs"] * n_train / 2) > 10
    assert m["lr"]["2"] == pytest.approx(m["lr"]["32"] / 16)
    means = [m["acc"]["gn"][str(b)]["mean"] for b in m["batch_sizes"]]
    assert m["gn_spread"] == pytest.approx(max(means) - min(means))


# ------------------------------------------------------------------ claim 9


def _m09(ln1, ln2, ln32, noise=0.0, test_noise=0.0):
    return {"ln_gap_to_batch32": {"1": ln32 - ln1, "2": ln32 - ln2}, "seed_range": noise,
            "test_noise": test_noise,
            "ln": {"1": {"mean": ln1}, "2": {"mean": ln2}, "32": {"mean": ln32}},
            "bn": {"1": {"refused": True}}}


def test_c09_judge_branches():
    judge = get_claim(9).judge
    assert judge(_m09(0.95, 0.96, 0.96))[0] == "reproduced"
    assert judge(_m09(0.90, 0.96, 0.96))[0] == "not reproduced"
    assert judge(_m09(0.935, 0.96, 0.96, noise=0.02))[0] == "inconclusive"
    assert judge(_m09(0.935, 0.96, 0.96, test_noise=0.02))[0] == "inconclusive"
    assert "refused" in judge(_m09(0.95, 0.96, 0.96))[1]


def test_c09_measure_records_bn_refusal(measured, tmp_path):
    m, _ = _check_common(9, measured, tmp_path)
    n_train = _n_train()
    for b in ("1", "2", "32"):
        _acc(m["ln"][b]["mean"])
    # normlab's BatchNorm refuses one value per channel in training, and says so
    assert m["bn"]["1"]["refused"] is True and m["bn_batch1_refused"] is True
    assert "per channel" in m["bn"]["1"]["error"]
    assert m["bn"]["2"]["refused"] is False
    _acc(m["bn"]["2"]["mean"])
    assert m["ln"]["1"]["steps"] == round(m["epochs"] * n_train)
    assert m["ln"]["2"]["steps"] == round(m["epochs"] * n_train / 2)


# ------------------------------------------------------------------ claim 10


def _m10(shortfalls, w_small, w_large, noise=0.0, test_noise=0.0):
    return {"sn_shortfall": {str(b): s for b, s in zip((2, 8, 32), shortfalls, strict=True)},
            "seed_range": noise, "test_noise": test_noise, "bn_weight_drop": w_large - w_small,
            "batch_sizes": [2, 8, 32],
            "sn_bn_weight": {"2": w_small, "8": 0.3, "32": w_large}}


def test_c10_judge_branches():
    judge = get_claim(10).judge
    assert judge(_m10((0.0, -0.01, 0.005), 0.2, 0.4))[0] == "reproduced"
    assert judge(_m10((0.03, 0.0, 0.0), 0.2, 0.4))[0] == "not reproduced"  # SN behind
    assert judge(_m10((0.0, 0.0, 0.0), 0.4, 0.3))[0] == "not reproduced"  # weights wrong way
    assert judge(_m10((0.0, 0.0, 0.0), 0.35, 0.37))[0] == "inconclusive"  # barely moved
    assert judge(_m10((0.015, 0.0, 0.0), 0.2, 0.4, noise=0.01))[0] == "inconclusive"
    assert judge(_m10((0.025, 0.0, 0.0), 0.2, 0.4, test_noise=0.02))[0] == "inconclusive"


def test_c10_measure_weights_and_plot(measured, tmp_path):
    m, files = _check_common(10, measured, tmp_path)
    assert len(m["batch_sizes"]) >= 2
    for b in m["batch_sizes"]:
        for norm in ("sn", "bn", "gn"):
            _acc(m["acc"][norm][str(b)]["mean"])
        for kind in ("mean", "var"):
            w = m["sn_weights"][str(b)][kind]
            # softmax weights over IN, LN, BN: positive, summing to 1
            assert all(v > 0 for v in w.values())
            assert sum(w.values()) == pytest.approx(1.0, abs=1e-9)
    small, large = str(min(m["batch_sizes"])), str(max(m["batch_sizes"]))
    assert m["bn_weight_drop"] == pytest.approx(m["sn_bn_weight"][large]
                                                - m["sn_bn_weight"][small])
    assert "sn_matches_best_weights.png" in files


# ------------------------------------------------------------------ claim 11


def _m11(diffs):
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else None
    return {"mean_diff": mean, "diff_se": None if sd is None else sd / math.sqrt(n), "seeds": n,
            "mean_acc": {"an": 0.9 + mean, "bn": 0.9}}


def test_c11_judge_branches():
    judge = get_claim(11).judge
    assert judge(_m11([0.02, 0.021, 0.019, 0.02, 0.022]))[0] == "reproduced"
    assert judge(_m11([-0.01, 0.0, -0.02]))[0] == "not reproduced"
    assert judge(_m11([0.03, -0.02, 0.01]))[0] == "inconclusive"  # within the noise
    assert judge(_m11([0.02]))[0] == "inconclusive"  # one seed


def test_c11_measure_paired_seeds(measured, tmp_path):
    m, _ = _check_common(11, measured, tmp_path)
    assert m["seeds"] >= 2 and len(m["acc"]["an"]) == len(m["acc"]["bn"]) == m["seeds"]
    for a in m["acc"]["an"] + m["acc"]["bn"]:
        _acc(a)
    diffs = [a - b for a, b in zip(m["acc"]["an"], m["acc"]["bn"], strict=True)]
    assert m["paired_diffs"] == pytest.approx(diffs)
    assert m["diff_se"] is not None and m["diff_se"] >= 0


# ------------------------------------------------------------------ claim 12


def _m12(on1, bn32, noise=0.0, test_noise=0.0):
    return {"shortfall": bn32 - on1, "seed_range": noise, "test_noise": test_noise, "epochs": 8,
            "runs": {"on@1": {"mean": on1}, "bn@32": {"mean": bn32}}}


def test_c12_judge_branches():
    judge = get_claim(12).judge
    assert judge(_m12(0.97, 0.975))[0] == "reproduced"
    assert judge(_m12(0.99, 0.97))[0] == "reproduced"  # better is fine
    assert judge(_m12(0.93, 0.97))[0] == "not reproduced"
    assert judge(_m12(0.955, 0.97, noise=0.01))[0] == "inconclusive"
    assert judge(_m12(0.955, 0.97, test_noise=0.01))[0] == "inconclusive"


def test_c12_measure_streams_at_batch1(measured, tmp_path):
    m, _ = _check_common(12, measured, tmp_path)
    n_train = _n_train()
    on1, bn32 = m["runs"]["on@1"], m["runs"]["bn@32"]
    _acc(on1["mean"])
    _acc(bn32["mean"])
    assert on1["batch_size"] == 1 and bn32["batch_size"] == 32
    assert on1["steps"] == round(m["epochs"] * n_train)  # an epoch of batches of 1
    assert on1["lr"] == pytest.approx(bn32["lr"] / 32)
    assert m["shortfall"] == pytest.approx(bn32["mean"] - on1["mean"])


# ------------------------------------------------------------------ claim 13


def _m13(selu, relu_lecun, relu_he):
    return {"tail_layers": 16, "depth": 64, "input_stds": [0.5, 1.0, 2.0],
            "nets": {"selu_lecun": {"max_final_distance": selu},
                     "relu_lecun": {"min_final_distance": relu_lecun},
                     "relu_he": {"min_final_distance": relu_he}}}


def test_c13_judge_branches():
    judge = get_claim(13).judge
    assert judge(_m13(0.05, 1.0, 0.7))[0] == "reproduced"
    assert judge(_m13(0.5, 1.0, 0.7))[0] == "not reproduced"
    assert judge(_m13(0.05, 1.0, 0.05))[0] == "not reproduced"  # a ReLU net at (0, 1)
    assert judge(_m13(0.15, 1.0, 0.7))[0] == "inconclusive"


def test_c13_activation_stats_reference():
    """The statistics are those of the layers' outputs: against a direct float64
    computation with the same generator draws, and the known ReLU/LeCun collapse (the
    second moment halves per layer)."""
    import torch

    from normlab.claims.c13_selu_self_normalizes import activation_stats

    st = activation_stats("relu", "lecun", depth=3, width=64, batch=32, input_std=1.0, seed=3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 64, generator=gen, dtype=torch.float64)
    for layer in range(3):
        w = torch.randn(64, 64, generator=gen, dtype=torch.float64) / 8.0  # N(0, 1/64)
        x = torch.relu(x @ w.T)
        assert st["mean"][layer] == pytest.approx(float(x.mean()), rel=1e-9)
        assert st["var"][layer] == pytest.approx(float(x.var(unbiased=False)), rel=1e-9)
    deep = activation_stats("relu", "lecun", depth=20, width=256, batch=256, input_std=1.0,
                            seed=0)
    second = [v + mu ** 2 for mu, v in zip(deep["mean"], deep["var"], strict=True)]
    ratios = [b / a for a, b in zip(second[5:], second[6:], strict=False)]
    assert sum(ratios) / len(ratios) == pytest.approx(0.5, abs=0.08)


def test_c13_measure_and_plot(measured, tmp_path):
    m, _ = _check_common(13, measured, tmp_path)
    assert set(m["nets"]) == {"selu_lecun", "relu_lecun", "relu_he"}
    for net in m["nets"].values():
        for entry in net["by_input_std"].values():
            assert len(entry["curve_seed0"]["mean"]) == m["depth"]
            assert all(v >= 0 for v in entry["curve_seed0"]["var"])
    # SELU's fixed point is attracting already within a few layers from any input scale
    assert m["nets"]["selu_lecun"]["max_final_distance"] < 0.3


# ------------------------------------------------------------------ claim 14


def _m14(selu_acc, selu_loss, relu_acc, relu_loss, noise=0.0, test_noise=0.0):
    return {"deepest": 32, "seed_range": noise, "test_noise": test_noise, "results": {
        "selu": {"32": {"test_acc": selu_acc, "train_loss": selu_loss, "best_lr": 0.003}},
        "relu": {"32": {"test_acc": relu_acc, "train_loss": relu_loss, "best_lr": 0.001}}}}


def test_c14_judge_branches():
    judge = get_claim(14).judge
    assert judge(_m14(0.9, 0.2, 0.5, 1.2))[0] == "reproduced"
    assert judge(_m14(0.9, 0.2, 0.5, None))[0] == "reproduced"  # ReLU diverged
    assert judge(_m14(0.5, 1.2, 0.9, 0.2))[0] == "not reproduced"
    assert judge(_m14(0.9, 0.3, 0.85, 0.2))[0] == "not reproduced"  # higher loss
    assert judge(_m14(0.91, 0.2, 0.90, 0.3))[0] == "inconclusive"
    assert judge(_m14(0.95, 0.2, 0.90, 0.3, noise=0.08))[0] == "inconclusive"
    assert judge(_m14(0.95, 0.2, 0.90, 0.3, test_noise=0.06))[0] == "inconclusive"


def test_c14_measure_and_plot(measured, tmp_path):
    m, _ = _check_common(14, measured, tmp_path)
    assert set(m["results"]) == {"selu", "relu", "relu_bn"}
    for model in m["results"].values():
        for depth in m["depths"]:
            r = model[str(depth)]
            assert r["best_lr"] in m["lrs"]
            _acc(r["test_acc"])
            # the chosen rate has the lowest training loss of the grid
            losses = [e["train_loss"] for e in r["by_lr"].values() if e["train_loss"] is not None]
            assert r["train_loss"] == pytest.approx(min(losses))


def test_c14_models_have_the_requested_depth():
    from torch import nn

    from normlab.claims.c14_selu_deep_mlp import _build

    for model in ("selu", "relu", "relu_bn"):
        net = _build(model, 8, (1, 8, 8), 10)
        linears = [mod for mod in net.modules() if isinstance(mod, nn.Linear)]
        assert len(linears) == 9  # 8 hidden layers and the head
        assert all(lin.in_features == 64 for lin in linears)


def test_judges_do_not_mutate_their_input():
    m = _m10((0.0, 0.0, 0.0), 0.2, 0.4)
    before = copy.deepcopy(m)
    get_claim(10).judge(m)
    assert m == before
