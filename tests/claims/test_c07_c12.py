"""Claims 7, 9, 10, 11 and 12 on the lab's protocol, and their shared design pieces
(normlab.claims._batch): each claim's measure runs at a tiny budget and gives finite
per-seed values for every declared effect, the protocol judges them, the plot is
written; plus properties of the run functions that can fail."""

import math

import pytest

from normlab.claims import get_claim
from normlab.claims import protocol as P
from normlab.claims._batch import arm_steps, paired, run_arms
from normlab.claims.base import Budget, PendingRuns, RunContext
from normlab.claims.design import split

TINY = Budget("test", step_scale=0.02, seeds=2, decisive=False)


@pytest.mark.parametrize("number", [7, 9, 10, 11, 12])
def test_claim_measures_judges_and_plots(number, tmp_path):
    claim = get_claim(str(number))
    assert claim.effects and all(e.key for e in claim.effects)
    ctx = RunContext(claim.id, TINY, tmp_path)
    measured = claim.measure(ctx)
    for effect in claim.effects:
        vals = measured["effects"][effect.key]
        assert len(vals) == TINY.seeds and all(math.isfinite(v) for v in vals), effect.key
    record = P.judge(claim, measured, False)
    assert record["verdict"] == "inconclusive"  # a non-decisive budget never decides
    assert {r["key"] for r in record["effects"]} == {e.key for e in claim.effects}
    # measure is a deterministic function of the stored runs: a second call computes none
    again = RunContext(claim.id, TINY, tmp_path)
    assert claim.measure(again) == measured and again.runs_done == 0
    (tmp_path / "plots").mkdir()
    names = claim.plot(measured, tmp_path / "plots")
    for name in names:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_equivalence_claims_declare_margins_and_previous_noise():
    for number, keys in ((9, ("gap_b1", "gap_b2")), (12, ("on_minus_bn",)),
                         (10, ("sn_vs_best_b4", "sn_vs_best_b32"))):
        effects = {e.key: e for e in get_claim(str(number)).effects}
        for key in keys:
            assert effects[key].test == "equivalent" and effects[key].margin > 0
            assert effects[key].previous_noise is not None


def test_arm_steps_floor_for_large_batches_epochs_for_small(tmp_path):
    ctx = RunContext("t", Budget("default", 1.0, 5), tmp_path)
    assert arm_steps(ctx, 32, 1150, 4.0, 800) == 800        # 4 epochs = 144 steps < floor
    assert arm_steps(ctx, 1, 1150, 4.0, 800) == 4600        # 4 epochs at batch 1
    half = RunContext("t", Budget("h", 0.5, 5), tmp_path)
    assert arm_steps(half, 1, 1150, 4.0, 800) == 2300       # the budget's step scale


def _val_peak(*, batch_size: int, lr: float, steps: int, seed: int, train_kwargs) -> dict:
    # a validation score peaking at lr = 0.05 * batch / 32 (log scale); test accuracy
    # = the seed, so the final runs can be told apart
    best = 0.05 * batch_size / 32
    return {"val_acc": 1.0 - (math.log10(lr / best)) ** 2, "final_test_acc": 0.5 + seed / 10,
            "num_classes": 10, "steps": steps}


def test_run_arms_chooses_on_validation_and_reuses_selection_runs(tmp_path):
    ctx = RunContext("t", Budget("t", 1.0, 4), tmp_path)
    out = run_arms(ctx, _val_peak, {"small": {"batch_size": 4}, "large": {"batch_size": 32}},
                   {"small": 50, "large": 20})
    assert out["lr"]["small"]["lr"] == pytest.approx(0.05 * 4 / 32)
    assert out["lr"]["large"]["lr"] == pytest.approx(0.05)
    assert out["acc"]["small"] == pytest.approx([50.0, 60.0, 70.0, 80.0])  # seed order
    assert [r["steps"] for r in out["runs"]["small"]] == [50] * 4
    # seeds 0-1 of the final runs are the selection runs at the chosen rate, and
    # select_lr reuses the first rounds asked for all arms at once
    assert ctx.runs_done == 2 * 3 * 2 + 2 * 2
    assert ctx.runs_reused == 2 * 3 * 2 + 4


def test_run_arms_asks_for_every_arms_first_round_at_once(tmp_path):
    ctx = RunContext("t", Budget("t", 1.0, 3), tmp_path, plan=True)
    with pytest.raises(PendingRuns) as info:
        run_arms(ctx, _val_peak, {"a": {"batch_size": 4}, "b": {"batch_size": 32}},
                 {"a": 5, "b": 5})
    specs = info.value.specs
    assert len(specs) == 2 * 3 * 2  # 2 arms x 3 rates x seeds 0-1
    assert {s.kwargs["batch_size"] for s in specs} == {4, 32}


def test_paired_is_per_seed():
    assert paired([3.0, 5.0], [1.0, 1.5]) == [2.0, 3.5]
    with pytest.raises(ValueError):
        paired([1.0], [1.0, 2.0])


def test_sn_run_weights_start_uniform_and_move_with_training():
    from normlab.claims.c10_sn_matches_best import sn_run
    from normlab.nn import SwitchableNorm

    kw = {"model": "mlp", "norm": "sn", "data": "digits", "batch_size": 8, "seed": 0,
          "model_kwargs": {"width": 16, "depth": 2}, "train_kwargs": {}}
    still = sn_run(steps=2, lr=0.0, **kw)
    # an MLP's SN mixes LN and BN from equal logits: with lr 0 each weight stays 1/2
    assert still["bn_weight"] == pytest.approx(0.5, abs=1e-12)
    assert all(w["mean"]["instance"] == 0 for w in still["sn_weights"])
    trained = sn_run(steps=30, lr=0.05, **kw)
    # independent reference: the same model trained by train_run's recipe, its softmax
    # over the two logits read directly
    import torch

    from normlab import models
    from normlab.train import train

    fit, _ = split("digits", 0)
    torch.manual_seed(0)
    net = models.build("mlp", fit.in_shape, fit.num_classes, norm="sn", width=16, depth=2)
    train(net, fit, steps=30, batch_size=8, lr=0.05, seed=0, progress=False)
    ref = []
    for m in net.modules():
        if isinstance(m, SwitchableNorm):
            for logits in (m.mean_logits, m.var_logits):
                w = torch.softmax(logits.detach().double()[-2:], 0)  # (LN, BN) terms
                ref.append(float(w[-1]))
    assert trained["bn_weight"] == pytest.approx(sum(ref) / len(ref), abs=1e-6)
    assert trained["bn_weight"] != pytest.approx(0.5)
    assert trained["val_acc"] is not None and 0 <= trained["val_acc"] <= 1


def test_better_reference_is_chosen_on_validation_not_test():
    from normlab.claims.c10_sn_matches_best import _better

    rec = {"bn": {"lr": 0.05, "scores": {"0.05": 0.90}},
           "ln": {"lr": 0.15, "scores": {"0.15": 0.95}}}
    assert _better(rec, "bn", "ln") == "ln"
    rec["bn"]["scores"]["0.05"] = 0.95  # tie: the first named
    assert _better(rec, "bn", "ln") == "bn"
