"""The lab's statistical protocol (normlab.claims.protocol), its content-keyed runs
(normlab.claims.base) and its design helpers (normlab.claims.design)."""

import math

import pytest
from scipy import stats

from normlab.claims import protocol as P
from normlab.claims.base import BUDGETS, Budget, PendingRuns, RunContext, make_spec
from normlab.claims.design import select_lr


def test_interval_is_students_t_over_seeds():
    vals = [1.0, 2.0, 1.5, 0.5, 2.2]
    iv = P.interval(vals)
    n, mean = len(vals), sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)  # the textbook formula
    assert iv.estimate == pytest.approx(mean)
    assert iv.low == pytest.approx(mean - half) and iv.high == pytest.approx(mean + half)
    assert iv.half_width == pytest.approx(half)


def test_one_seed_has_no_interval_and_is_inconclusive():
    e = P.Effect("d", "d", "points", "greater", threshold=0.0)
    verdict, rows = P.evaluate([e], {"d": [50.0]})
    assert rows[0]["low"] is None and verdict == "inconclusive"


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        P.interval([1.0, float("nan")])


@pytest.mark.parametrize("vals, verdict", [
    ([2.0, 2.5, 3.0, 2.2, 2.8], "reproduced"),        # whole interval above 0
    ([-2.0, -2.5, -3.0, -2.2, -2.8], "not reproduced"),  # whole interval below 0
    ([-1.0, 1.0, 0.5, -0.5, 0.2], "inconclusive"),    # straddles 0
])
def test_superiority_rule(vals, verdict):
    e = P.Effect("d", "d", "points", "greater", threshold=0.0)
    assert P.evaluate([e], {"d": vals})[0] == verdict
    mirrored = P.Effect("d", "d", "points", "less", threshold=0.0)
    flipped = {"reproduced": "reproduced", "not reproduced": "not reproduced",
               "inconclusive": "inconclusive"}[verdict]
    assert P.evaluate([mirrored], {"d": [-v for v in vals]})[0] == flipped


@pytest.mark.parametrize("vals, verdict", [
    ([0.1, -0.2, 0.0, 0.15, -0.1], "reproduced"),     # inside (-1, 1)
    ([3.0, 3.5, 2.8, 3.2, 3.1], "not reproduced"),    # entirely outside
    ([0.2, 1.5, 0.9, 1.1, 0.4], "inconclusive"),      # crosses the margin
])
def test_equivalence_rule(vals, verdict):
    e = P.Effect("d", "d", "points", "equivalent", margin=1.0)
    assert P.evaluate([e], {"d": vals})[0] == verdict


def test_a_point_estimate_inside_the_margin_is_not_enough():
    # mean 0.3 inside ±1, but the interval reaches past the margin: not reproduced yet
    e = P.Effect("d", "d", "points", "equivalent", margin=1.0)
    assert P.evaluate([e], {"d": [-2.0, 2.5, 0.3, -1.5, 2.2]})[0] == "inconclusive"


def test_premise_failure_is_not_testable_and_quick_is_never_decisive():
    claim = P.Effect("c", "c", "points", "greater", threshold=0.0)
    premise = P.Effect("p", "p", "points", "greater", threshold=0.0, role="premise")
    up, down = [2.0, 2.5, 3.0, 2.2, 2.8], [-2.0, -2.5, -3.0, -2.2, -2.8]
    assert P.evaluate([claim, premise], {"c": up, "p": down})[0] == "not testable at this scale"
    assert P.evaluate([claim, premise], {"c": up, "p": up})[0] == "reproduced"
    assert P.evaluate([claim, premise], {"c": up, "p": up}, decisive=False)[0] == "inconclusive"
    assert not BUDGETS["quick"].decisive and BUDGETS["default"].seeds >= 5


def test_effect_declaration_is_checked():
    with pytest.raises(ValueError, match="margin"):
        P.Effect("d", "d", "points", "equivalent")
    with pytest.raises(ValueError, match="test must be"):
        P.Effect("d", "d", "points", "bigger")


def _square(x: int) -> dict:
    return {"y": x * x}


def test_runs_are_keyed_by_content_and_reused(tmp_path):
    a, b = make_spec(_square, {"x": 3}), make_spec(_square, {"x": 4})
    assert a.key != b.key and a.key == make_spec(_square, {"x": 3}).key
    ctx = RunContext("t", BUDGETS["default"], tmp_path)
    assert ctx.map(_square, [{"x": 3}, {"x": 4}]) == [{"y": 9}, {"y": 16}]
    assert ctx.runs_done == 2
    again = RunContext("t", BUDGETS["default"], tmp_path)
    assert again.map(_square, [{"x": 3}]) == [{"y": 9}] and again.runs_done == 0


def test_the_code_hash_is_part_of_the_key(monkeypatch):
    from normlab.claims import base

    before = make_spec(_square, {"x": 3}).key
    monkeypatch.setattr(base, "_CODE_HASH", "0" * 64)
    assert make_spec(_square, {"x": 3}).key != before


def test_planning_mode_lists_the_missing_runs(tmp_path):
    ctx = RunContext("t", BUDGETS["default"], tmp_path, plan=True)
    with pytest.raises(PendingRuns) as info:
        ctx.map(_square, [{"x": 1}, {"x": 2}, {"x": 1}])
    assert sorted(s.kwargs["x"] for s in info.value.specs) == [1, 2]


def test_lambdas_cannot_be_runs(tmp_path):
    with pytest.raises(TypeError, match="module level"):
        make_spec(lambda: {}, {})


def _quadratic_score(lr: float, seed: int) -> dict:
    # validation accuracy peaking at lr = 0.3 (log scale), the same for every seed
    return {"val_acc": 1.0 - (math.log10(lr) - math.log10(0.3)) ** 2, "num_classes": 10}


def test_select_lr_extends_the_grid_until_the_best_is_bracketed(tmp_path):
    ctx = RunContext("t", Budget("test", 1.0, 2), tmp_path)
    sel = select_lr(ctx, _quadratic_score, lambda lr, s: {"lr": lr, "seed": s},
                    [0.01, 0.03, 0.1], [0, 1])
    assert sel["lr"] == pytest.approx(0.3) and sel["bracketed"]
    assert sel["grid"] == pytest.approx([0.01, 0.03, 0.1, 0.3, 0.9])
    stuck = select_lr(ctx, _quadratic_score, lambda lr, s: {"lr": lr, "seed": s},
                      [1e-4, 3e-4], [0])
    assert not stuck["bracketed"] and len(stuck["grid"]) == 4  # two extensions at most


def _shifted_score(lr: float, seed: int, peak: float) -> dict:
    # validation accuracy peaking at lr = peak (log scale)
    return {"val_acc": 1.0 - (math.log10(lr) - math.log10(peak)) ** 2, "num_classes": 10}


def test_select_lrs_is_select_lr_per_arm_with_the_first_round_in_one_batch(tmp_path):
    from normlab.claims.design import select_lrs

    def maker(peak):
        return lambda lr, s: {"lr": lr, "seed": s, "peak": peak}

    makes = {arm: maker(peak) for arm, peak in (("low", 0.01), ("mid", 0.05), ("high", 3.0))}
    grid = [0.01, 0.03, 0.1]
    alone = {arm: select_lr(RunContext("a", Budget("test", 1.0, 2), tmp_path / arm),
                            _shifted_score, make, grid, [0, 1]) for arm, make in makes.items()}
    planned = RunContext("p", Budget("test", 1.0, 2), tmp_path / "planned", plan=True)
    with pytest.raises(PendingRuns) as info:  # the first call asks for every arm's round
        select_lrs(planned, _shifted_score, makes, grid, [0, 1])
    assert len(info.value.specs) == len(makes) * len(grid) * 2
    ctx = RunContext("b", Budget("test", 1.0, 2), tmp_path / "together")
    together = select_lrs(ctx, _shifted_score, makes, grid, [0, 1])
    assert together == alone
    assert together["mid"]["bracketed"] and together["high"]["lr"] == pytest.approx(0.9)


def test_the_device_is_part_of_the_key_and_checked():
    from normlab.claims.design import current_device, on_device

    cpu, cuda = make_spec(_square, {"x": 3}), make_spec(_square, {"x": 3}, device="cuda")
    assert cpu.key != cuda.key and cuda.device == "cuda"
    assert current_device() == "cpu"
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"), on_device("tpu"):
        pass


def test_a_run_with_non_finite_outputs_scores_chance():
    from normlab.claims.design import accuracy_or_chance

    assert accuracy_or_chance({"final_test_acc": 0.9, "final_test_loss": 0.3}) == 0.9
    assert accuracy_or_chance({"final_test_acc": 0.0, "final_test_loss": None,
                               "num_classes": 10}) == pytest.approx(0.1)
    assert accuracy_or_chance({"final_test_acc": None, "num_classes": 4}) == 0.25
    assert accuracy_or_chance({"val_acc": 0.5, "val_loss": None, "num_classes": 2},
                              "val_acc") == 0.5
