"""The paper-scale setups of claims 1 (BN reaches the plain net's accuracy in fewer
steps) and 2 (BN allows higher learning rates): ResNet-20 on CIFAR-10 with He et al.'s
recipe at a constant rate, no normalization against BN at batch 128.

Two kinds of test, as for claims 3 and 11. The declared setups at the default budget
(10 seeds, 40,000 training images, batch 128) are read off the run arguments
``measure_paper`` asks for, through a context whose ``map`` records them and answers
with made-up results (nothing trains); the effects are recomputed from those results
by their definitions. End to end, ``run_study --scale paper`` trains on generated
CIFAR-format files at the tiny budget with the batch shrunk to 8 so that each test
takes seconds; every other argument is the declared one."""

import json
import math

import numpy as np
import pytest

from _cifar import FOLDER, TINY, check_paper_record, recording_ctx, write_cifar
from normlab.claims import _paper
from normlab.claims import c01_bn_fewer_steps as c01
from normlab.claims import c02_bn_higher_lr as c02
from normlab.claims.base import make_spec
from normlab.claims.design import train_run
from normlab.study import run_study

#: He et al.'s recipe as claims 1 and 2 pass it to normlab.train.train: the cosine
#: replaced by a constant rate (the small scale's design).
RECIPE = {"momentum": 0.9, "weight_decay": 1e-4, "schedule": "constant",
          "augment": "crop_flip"}
SEEDS = list(range(10))


def _check_recipe(kw, steps):
    assert (kw["model"], kw["data"], kw["data_dir"]) == ("resnet", "cifar10", FOLDER)
    assert kw["model_kwargs"] == {"width": 16, "depth": 3}
    assert kw["batch_size"] == 128 and kw["steps"] == steps
    assert kw["train_kwargs"] == {**RECIPE, "eval_every": steps, "log_every": steps // 200}


# --------------------------------------------------------------------------- claim 1

#: The made-up curves: accuracy 0.9 (1 - exp(-step / tau)), BN ten times faster;
#: validation area peaks at 0.003 for the plain net and 0.1 for BN (BN's best at the
#: grid's top, so the grid is extended to 0.3).
TAU = {"none": 3000.0, "bn": 300.0}
BEST = {"none": 0.003, "bn": 0.1}


def _log_steps(steps, count):
    """Independent of c01.eval_steps: ``count`` geometric points from 2 to ``steps``,
    rounded, without repeats."""
    return sorted(set(np.rint(np.geomspace(2, steps, count)).astype(int).tolist()))


def _c01_curve(norm, seed, steps):
    return [0.9 * (1 - math.exp(-s / (TAU[norm] * (1 + 0.05 * seed)))) for s in steps]


def _c01_result(kw):
    norm, seed, lr = kw["norm"], kw["seed"], kw["lr"]
    at = _log_steps(kw["steps"], kw["eval_points"])
    test = _c01_curve(norm, seed, at)
    val = [a - 0.05 * abs(math.log10(lr / BEST[norm])) for a in test]
    return {"diverged": False, "steps_done": kw["steps"], "final_test_acc": test[-1],
            "num_classes": 10, "eval_at": at,
            "curve": {"step": at, "val_acc": val, "test_acc": test}}


def test_claim1_paper_setup_chooses_each_rate_by_validation_area_at_a_constant_rate(
        tmp_path, monkeypatch):
    ctx, runs = recording_ctx(tmp_path, monkeypatch, c01.paper_curve_run, _c01_result)
    m = c01.measure(ctx)
    assert {n: m["lr"][n]["lr"] for n in ("none", "bn")} == BEST
    assert m["lr"]["bn"]["grid"] == [0.001, 0.003, 0.01, 0.03, 0.1, 0.3]
    assert m["lr"]["none"]["bracketed"] and m["lr"]["bn"]["bracketed"]
    for kw in runs.values():
        _check_recipe(kw, 12_500)  # 40 epochs of 40,000 images at batch 128
        assert kw["norm"] in ("none", "bn") and kw["eval_points"] == 40
    measured = [kw for kw in runs.values() if kw["lr"] == BEST[kw["norm"]]]
    assert sorted((kw["norm"], kw["seed"]) for kw in measured) == sorted(
        (n, s) for n in ("none", "bn") for s in SEEDS)
    assert all(kw["seed"] < 2 for kw in runs.values() if kw not in measured)
    # the selection's 5 rates x 2 seeds an arm, BN's also at 0.3, and the other 8
    # seeds of both arms at the chosen rates
    assert len(runs) == 2 * 5 * 2 + 2 + 2 * 8
    # the effects from their definitions: the first evaluation where the curve,
    # averaged with its neighbours, reaches 80%, and the mean accuracy in points
    at = _log_steps(12_500, 40)
    assert len(at) == 39  # the evaluation count the setup's estimate uses
    assert c01.eval_steps(12_500, 40) == at
    for j in SEEDS:
        first, auc = {}, {}
        for norm in ("none", "bn"):
            acc = np.array(_c01_curve(norm, j, at))
            smooth = [acc[max(0, i - 1):i + 2].mean() for i in range(len(acc))]
            first[norm] = next(s for s, a in zip(at, smooth, strict=True) if a >= 0.8)
            auc[norm] = 100 * acc.mean()
        assert m["steps_to_target"]["none"][j] == first["none"]
        assert m["effects"]["ratio"][j] == pytest.approx(first["none"] / first["bn"])
        assert m["effects"]["auc_gap"][j] == pytest.approx(auc["bn"] - auc["none"])
    assert m["reached"] == {"none": [True] * 10, "bn": [True] * 10}
    assert (m["target"], m["steps"], m["batch"]) == (0.8, 12_500, 128)
    assert "40 epochs (12,500 steps)" in c01.CLAIM.paper_setup
    assert "80% test accuracy" in c01.CLAIM.paper_setup
    assert c01.CLAIM.scales == ("small", "paper")


def test_claim1_paper_scale_counts_a_diverged_plain_run_as_never_reaching_the_target(
        tmp_path, monkeypatch):
    """A plain run that diverges part-way (its curve stops) is filled at chance: it
    never reaches the target and counts at the last evaluation step."""
    def result_of(kw):
        r = _c01_result(kw)
        if kw["norm"] == "none" and kw["seed"] == 3:
            cut = 10  # diverged after its tenth evaluation, below the target
            r["curve"] = {k: v[:cut] for k, v in r["curve"].items()}
            r["diverged"] = True
        return r

    ctx, _ = recording_ctx(tmp_path, monkeypatch, c01.paper_curve_run, result_of)
    m = c01.measure(ctx)
    at = _log_steps(12_500, 40)
    assert m["reached"]["none"][3] is False
    assert m["steps_to_target"]["none"][3] == at[-1] == 12_500
    bn = m["steps_to_target"]["bn"][3]
    assert m["effects"]["ratio"][3] == pytest.approx(12_500 / bn)
    acc = _c01_curve("none", 3, at)[:10] + [0.1] * (len(at) - 10)
    assert m["auc"]["none"][3] == pytest.approx(100 * sum(acc) / len(at))


# --------------------------------------------------------------------------- claim 2

GRID = [0.001, 0.00316228, 0.01, 0.0316228, 0.1, 0.316228, 1.0, 3.16228]


def _c02_acc(norm, lr, seed):
    """Final test accuracy (None: diverged): the plain net trains up to 0.0032, BN up to
    1 and, in seed 9 only, at 3.2 too (so BN's grid is extended to 10)."""
    if norm == "none":
        return 0.55 + 0.01 * seed if lr <= 0.0032 else None
    if lr <= 1.0:
        return 0.7 + 0.01 * seed
    if lr < 4:
        return 0.5 if seed == 9 else 0.2
    return None


def _c02_result(kw):
    acc = _c02_acc(kw["norm"], kw["lr"], kw["seed"])
    return {"final_test_acc": acc, "final_test_loss": None if acc is None else 1.0,
            "diverged": acc is None, "num_classes": 10, "val_acc": None, "val_loss": None}


def _largest(lrs, accs, bar=0.4):
    """The definition: the last rate reaching ``bar``, moved towards the next by the
    fraction of the accuracy drop still above the bar, in log10(rate)."""
    i = max(k for k, a in enumerate(accs) if a >= bar)
    if i == len(lrs) - 1:
        return math.log10(lrs[i])
    lo, hi = math.log10(lrs[i]), math.log10(lrs[i + 1])
    return lo + (hi - lo) * (accs[i] - bar) / (accs[i] - accs[i + 1])


def test_claim2_paper_setup_runs_every_rate_of_the_grid_in_every_seed(tmp_path, monkeypatch):
    ctx, runs = recording_ctx(tmp_path, monkeypatch, train_run, _c02_result)
    m = c02.measure(ctx)
    assert list(c02.PAPER_LR_GRID) == GRID
    # BN trains at the top in seed 9: one half-decade more, by the small scale's rule
    want = {"none": GRID, "bn": GRID + [round(GRID[-1] * math.sqrt(10), 6)]}
    for kw in runs.values():
        _check_recipe(kw, 3_125)  # 10 epochs of 40,000 images at batch 128
    assert sorted((kw["norm"], kw["lr"], kw["seed"]) for kw in runs.values()) == sorted(
        (n, lr, s) for n in want for lr in want[n] for s in SEEDS)
    assert {n: m["sweeps"][n]["lrs"] for n in want} == want
    for j in SEEDS:
        lim = {}
        for n in want:
            accs = [0.1 if a is None else a for a in (_c02_acc(n, lr, j) for lr in want[n])]
            lim[n] = _largest(want[n], accs)
        assert m["effects"]["decades"][j] == pytest.approx(lim["bn"] - lim["none"])
    assert m["sweeps"]["none"]["state"] == ["bracketed"] * 10
    assert m["sweeps"]["bn"]["state"] == ["bracketed"] * 10
    assert (m["trains_acc"], m["steps"], m["batch"]) == (0.4, 3_125, 128)
    assert "10 epochs (3,125 steps)" in c02.CLAIM.paper_setup
    assert "at least 40%" in c02.CLAIM.paper_setup
    assert c02.CLAIM.scales == ("small", "paper")


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def small_batch(monkeypatch):
    """The declared setups at batch 8, so that 40 generated training images fill a
    batch and a ResNet-20 step is fast, and with two rates of each grid (the tests
    above check the declared grids), so that each test trains about 16 runs rather than
    about 30 (at the tiny budget no rate trains, and both grids are extended twice)."""
    monkeypatch.setattr(c01, "PAPER_BATCH", 8)
    monkeypatch.setattr(c02, "PAPER_BATCH", 8)
    monkeypatch.setattr(c01, "PAPER_LR_GRID", (0.01, 0.1))
    monkeypatch.setattr(c02, "PAPER_LR_GRID", (0.1, 0.316228))


def _titles(monkeypatch, module):
    """Capture the titles of every figure ``module.plot`` saves."""
    seen = []
    original = module.save_plot

    def capture(fig, out_dir, name):
        seen.append(" ".join([fig._suptitle.get_text() if fig._suptitle else ""]
                             + [ax.get_title() for ax in fig.axes]))
        return original(fig, out_dir, name)

    monkeypatch.setattr(module, "save_plot", capture)
    return seen


def _study(tmp_path, number, claim):
    root = write_cifar(tmp_path / "cifar", per_class=1)
    summary = run_study(tmp_path / "out", budget=TINY, claims=[number], workers=0,
                        scale="paper", data_dir=root, log=lambda line: None)
    rec = summary["claims"][0]
    check_paper_record(rec, tmp_path / "out", claim)
    assert len(rec["plots"]) == 1
    stored = [json.loads((tmp_path / "out" / "runs" / name).read_text())
              for name in rec["run_files"]]
    return root, rec, stored


def _check_stored(stored, root, fn, grid):
    """Every run read the folder and trained ResNet-20 with He et al.'s recipe at a
    constant rate, batch 8 and a rate of ``grid``; the folder is in its key."""
    for run in stored:
        kw, cfg = run["kwargs"], run["result"]["config"]
        assert kw["data_dir"] == str(root.resolve()) and kw["model"] == "resnet"
        assert kw["model_kwargs"] == {"width": 16, "depth": 3} and kw["batch_size"] == 8
        assert kw["norm"] in ("none", "bn") and kw["lr"] in grid
        assert {k: kw["train_kwargs"][k] for k in RECIPE} == RECIPE
        assert (cfg["schedule"], cfg["weight_decay"], cfg["momentum"], cfg["augment"]) == (
            "constant", 1e-4, 0.9, "crop_flip")
        assert (cfg["num_train"], cfg["steps"]) == (40, 10)  # the budget's minimum
        small = {k: v for k, v in kw.items() if k != "data_dir"}
        assert make_spec(fn, small).key != run["key"]


def test_claim1_paper_scale_study_end_to_end(tmp_path, monkeypatch, small_batch):
    titles = _titles(monkeypatch, c01)
    root, rec, stored = _study(tmp_path, 1, c01.CLAIM)
    assert "ResNet-20 on CIFAR-10, each arm at its validation-chosen rate" in titles[0]
    m = rec["measured"]
    assert len(m["effects"]["ratio"]) == len(m["effects"]["auc_gap"]) == 2
    chosen = {n: m["lr"][n]["lr"] for n in ("none", "bn")}
    # the grid at batch 8 is the given one scaled linearly (x 8/128)
    grid8 = [_paper.linear_lr(8, lr) for lr in c01.PAPER_LR_GRID]
    assert grid8 == [0.000625, 0.00625]
    assert all(set(grid8) <= set(m["lr"][n]["grid"]) for n in chosen)
    _check_stored(stored, root, c01.paper_curve_run, m["lr"]["none"]["grid"]
                  + m["lr"]["bn"]["grid"])
    measured = [r for r in stored if r["kwargs"]["lr"] == chosen[r["kwargs"]["norm"]]]
    assert sorted((r["kwargs"]["norm"], r["kwargs"]["seed"]) for r in measured) == [
        ("bn", 0), ("bn", 1), ("none", 0), ("none", 1)]
    for r in stored:
        assert r["kwargs"]["eval_points"] == 20  # the quick count at a test budget
        assert r["result"]["eval_at"] == list(range(2, 11))
    # the effects from the stored curves (a diverged run's missing points at chance)
    for j in range(2):
        auc = {}
        for r in measured:
            if r["kwargs"]["seed"] == j:
                acc = [0.1 if a is None or not math.isfinite(a) else a
                       for a in r["result"]["curve"]["test_acc"]]
                acc += [0.1] * (9 - len(acc))
                auc[r["kwargs"]["norm"]] = 100 * sum(acc) / 9
        assert m["effects"]["auc_gap"][j] == pytest.approx(auc["bn"] - auc["none"])


def test_claim2_paper_scale_study_end_to_end(tmp_path, monkeypatch, small_batch):
    titles = _titles(monkeypatch, c02)
    root, rec, stored = _study(tmp_path, 2, c02.CLAIM)
    assert "Learning-rate range, ResNet-20 on CIFAR-10" in titles[0]
    m = rec["measured"]
    assert len(m["effects"]["decades"]) == 2
    grid8 = [_paper.linear_lr(8, lr) for lr in c02.PAPER_LR_GRID]
    assert grid8 == [0.00625, 0.0197643]
    for n in ("none", "bn"):
        assert set(grid8) <= set(m["sweeps"][n]["lrs"])
        lrs = m["sweeps"][n]["lrs"]
        assert sorted((r["kwargs"]["lr"], r["kwargs"]["seed"]) for r in stored
                      if r["kwargs"]["norm"] == n) == sorted(
            (lr, s) for lr in lrs for s in (0, 1))
    _check_stored(stored, root, train_run, m["sweeps"]["none"]["lrs"]
                  + m["sweeps"]["bn"]["lrs"])
    assert m["trains_acc"] == 0.4
