"""The paper-scale setups of claims 3 (BN makes the init scale matter less) and 11
(Attentive Norm beats BN at the same recipe): ResNet-20 on CIFAR-10 with He et al.'s
recipe.

Two kinds of test. The declared setups at the default budget (10 seeds, 40,000 training
images, batch 128) are read off the run arguments ``measure_paper`` asks for, through a
context whose ``map`` records the arguments and answers with made-up results (nothing
trains), and the effects are recomputed from those results independently. End to end,
``run_study --scale paper`` trains on generated CIFAR-format files at the tiny budget,
with the batch shrunk to 8 so that each test takes seconds (a ResNet-20 step at batch
128 takes about 0.3 s on a CPU core, AN's more; claim 3 trains about 30 runs): every
other argument is the declared one."""

import json
import math

import pytest
import torch

from _cifar import FOLDER, TINY, check_paper_record, recording_ctx, write_cifar
from normlab import models
from normlab.claims import _paper
from normlab.claims import c03_bn_init_scale as c03
from normlab.claims import c11_an_beats_bn as c11
from normlab.claims.base import make_spec
from normlab.claims.design import train_run
from normlab.study import run_study

#: He et al.'s recipe as every paper-scale run must pass it to normlab.train.train.
RECIPE = {"momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine", "augment": "crop_flip"}


def _result(test_acc, val_acc=0.5):
    return {"final_test_acc": test_acc, "final_test_loss": 1.0, "val_acc": val_acc,
            "val_loss": 1.0, "num_classes": 10, "diverged": False}


def _check_recipe(kw, steps):
    assert (kw["model"], kw["data"], kw["data_dir"]) == ("resnet", "cifar10", FOLDER)
    assert kw["batch_size"] == 128 and kw["steps"] == steps
    assert kw["train_kwargs"] == {**RECIPE, "eval_every": steps, "log_every": steps // 200}


# --------------------------------------------------------------------------- claim 11


def test_claim11_paper_setup_trains_an_and_bn_on_resnet20_with_one_recipe(tmp_path,
                                                                           monkeypatch):
    # AN 0.4 points above BN in every seed, BN's accuracy varying with the seed
    def result_of(kw):
        return _result(0.80 + 0.01 * kw["seed"] + (0.004 if kw["norm"] == "an" else 0.0))

    ctx, runs = recording_ctx(tmp_path, monkeypatch, train_run, result_of)
    m = c11.measure(ctx)
    assert len(runs) == 20  # 2 arms x 10 seeds, nothing else
    for kw in runs.values():
        _check_recipe(kw, 15_625)  # 50 epochs of 40,000 images at batch 128
        assert kw["lr"] == 0.1  # He et al.'s rate, the same for both arms
        k = {"an": {"num_components": 10}, "bn": {}}[kw["norm"]]
        assert kw["model_kwargs"] == {"width": 16, "depth": 3, **k}
    assert sorted((kw["norm"], kw["seed"]) for kw in runs.values()) == sorted(
        (n, s) for n in ("an", "bn") for s in range(10))
    assert m["effects"]["an_minus_bn"] == pytest.approx([0.4] * 10, abs=1e-9)
    assert m["acc"]["bn"] == pytest.approx([80.0 + s for s in range(10)])
    assert (m["steps"], m["batch"], m["lr"]) == (15_625, 128, {"an": 0.1, "bn": 0.1})
    assert "50 epochs (15,625 steps)" in c11.CLAIM.paper_setup
    assert c11.CLAIM.scales == ("small", "paper")


def test_claim11_paper_setup_states_the_parameter_counts_of_its_two_resnet20s():
    torch.manual_seed(0)
    count = {norm: sum(p.numel() for p in models.build(
        "resnet", (3, 32, 32), 10, norm=norm, **kw).parameters())
        for norm, kw in (("bn", _paper.RESNET20),
                         ("an", {**_paper.RESNET20, "num_components": c11.PAPER_K}))}
    assert f"{count['an']:,} parameters against {count['bn']:,}" in c11.CLAIM.paper_setup


# --------------------------------------------------------------------------- claim 3


def _c03_result(kw):
    """Validation accuracy peaks at 0.003 for the plain net and at 0.1 for BN (BN's
    best is the grid's top, so the grid is extended to 0.3); the test accuracy depends
    on the arm, the init scale and the seed."""
    lr, norm = kw["lr"], kw["norm"]
    best = {"none": 0.003, "bn": 0.1}[norm]
    val = 0.9 - 0.05 * abs(math.log10(lr / best))
    s, seed = kw["model_kwargs"]["init_scale"], kw["seed"]
    drop = {"none": 0.2, "bn": 0.02}[norm] * abs(math.log10(s))
    return _result(0.85 - drop + 0.003 * seed, val)


def test_claim3_paper_setup_chooses_each_rate_at_scale_1_and_keeps_it(tmp_path, monkeypatch):
    ctx, runs = recording_ctx(tmp_path, monkeypatch, train_run, _c03_result)
    m = c03.measure(ctx)
    scales = [0.1, 0.3, 1.0, 3.0, 10.0]
    assert m["init_scales"] == scales
    assert {n: m["lr"][n]["lr"] for n in ("none", "bn")} == {"none": 0.003, "bn": 0.1}
    assert m["lr"]["bn"]["grid"] == [0.001, 0.003, 0.01, 0.03, 0.1, 0.3]
    assert m["lr"]["none"]["bracketed"] and m["lr"]["bn"]["bracketed"]
    for kw in runs.values():
        _check_recipe(kw, 6_250)  # 20 epochs of 40,000 images at batch 128
        assert kw["norm"] in ("none", "bn")
        assert set(kw["model_kwargs"]) == {"width", "depth", "init_scale"}
        assert (kw["model_kwargs"]["width"], kw["model_kwargs"]["depth"]) == (16, 3)
    selection = [kw for kw in runs.values() if kw["seed"] < 2 and kw["lr"] !=
                 m["lr"][kw["norm"]]["lr"]]
    assert all(kw["model_kwargs"]["init_scale"] == 1.0 for kw in selection)
    measured = [kw for kw in runs.values() if kw["lr"] == m["lr"][kw["norm"]]["lr"]]
    assert sorted((kw["norm"], kw["model_kwargs"]["init_scale"], kw["seed"])
                  for kw in measured) == sorted((n, s, seed) for n in ("none", "bn")
                                                for s in scales for seed in range(10))
    # 100 measured runs and the selection's 5 rates x 2 seeds an arm, BN's also at 0.3,
    # less the chosen rate's runs, which the measurement reuses
    assert len(runs) == 100 + 2 * (4 + 4) + 2
    # the effect from the definitions: mean over s != 1 of |acc(s) - acc(1)|, per seed
    for j, gap in enumerate(m["effects"]["sensitivity_gap"]):
        sens = {}
        for norm in ("none", "bn"):
            acc = {s: 100 * _c03_result({"lr": 0.1, "norm": norm, "seed": j,
                                         "model_kwargs": {"init_scale": s}})["final_test_acc"]
                   for s in scales}
            sens[norm] = sum(abs(acc[s] - acc[1.0]) for s in scales if s != 1.0) / 4
        assert gap == pytest.approx(sens["none"] - sens["bn"], abs=1e-9)
    assert len(m["effects"]["sensitivity_gap"]) == 10
    assert "20 epochs (6,250 steps)" in c03.CLAIM.paper_setup
    assert c03.CLAIM.scales == ("small", "paper")


def _convs(net):
    return {n: mod for n, mod in net.named_modules() if isinstance(mod, torch.nn.Conv2d)}


def test_resnet_init_scale_scales_every_conv_and_the_residual_branches_by_its_square():
    """What claim 3's paper setup says about init_scale on ResNet-20: every conv (stem,
    block convs, 1x1 projections) is multiplied by s and the head is not; without a
    norm a residual branch then scales by s^2 and a projection shortcut by s; with BN
    after every conv the network's (training-mode) function does not depend on s."""
    s, shape = 3.0, (3, 8, 8)
    nets = {}
    for norm in ("none", "bn"):
        for scale in (1.0, s):
            torch.manual_seed(0)
            nets[norm, scale] = models.build("resnet", shape, 10, norm=norm, width=4,
                                             depth=3, init_scale=scale).double()
    base, scaled = nets["none", 1.0], nets["none", s]
    convs = _convs(base)
    assert len(convs) == 1 + 2 * 9 + 2  # stem, 9 blocks of 2, 2 projection shortcuts
    for name, conv in convs.items():
        torch.testing.assert_close(_convs(scaled)[name].weight, s * conv.weight)
    torch.testing.assert_close(scaled.head.weight, base.head.weight)
    h = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    blk, blk_s = base.blocks[1], scaled.blocks[1]  # an identity-shortcut block
    assert isinstance(blk.shortcut, torch.nn.Identity)
    branch = blk.conv2(blk.act(blk.conv1(h)))
    # (the weights were scaled in float32: products agree to float32's precision)
    tol = {"rtol": 1e-6, "atol": 1e-5}
    torch.testing.assert_close(blk_s.conv2(blk_s.act(blk_s.conv1(h))), s**2 * branch, **tol)
    torch.testing.assert_close(blk_s(h), torch.relu(s**2 * branch + h), **tol)
    proj, proj_s = base.blocks[3].shortcut, scaled.blocks[3].shortcut
    torch.testing.assert_close(proj_s(h), s * proj(h), **tol)
    x = torch.randn(16, *shape, dtype=torch.float64)
    torch.testing.assert_close(nets["bn", s].train()(x), nets["bn", 1.0].train()(x),
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scaled(x), base(x), rtol=0.1)


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def small_batch(monkeypatch):
    """The declared setups at batch 8 (every other argument as declared), so that 40
    generated training images fill a batch and a ResNet-20 step is fast."""
    monkeypatch.setattr(c03, "PAPER_BATCH", 8)
    monkeypatch.setattr(c11, "PAPER_BATCH", 8)


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


def _stored(out, record):
    return [json.loads((out / "runs" / name).read_text()) for name in record["run_files"]]


def _check_stored(stored, root, lr_of):
    """Every run read the folder, trained ResNet-20 with He et al.'s recipe at batch 8
    and its arm's rate; the folder is in its key."""
    for run in stored:
        kw, cfg = run["kwargs"], run["result"]["config"]
        assert kw["data_dir"] == str(root.resolve()) and kw["model"] == "resnet"
        assert (kw["model_kwargs"]["width"], kw["model_kwargs"]["depth"]) == (16, 3)
        assert kw["batch_size"] == 8 and kw["lr"] == lr_of(kw)
        assert {k: kw["train_kwargs"][k] for k in RECIPE} == RECIPE
        assert (cfg["schedule"], cfg["weight_decay"], cfg["momentum"]) == ("cosine", 1e-4, 0.9)
        assert (cfg["num_train"], cfg["num_test"]) == (40, 10)
        small = {k: v for k, v in kw.items() if k != "data_dir"}
        assert make_spec(train_run, small).key != run["key"]


def test_claim11_paper_scale_study_end_to_end(tmp_path, monkeypatch, small_batch):
    root = write_cifar(tmp_path / "cifar", per_class=1)
    titles = _titles(monkeypatch, c11)
    summary = run_study(tmp_path / "out", budget=TINY, claims=[11], workers=0,
                        scale="paper", data_dir=root, log=lambda line: None)
    rec = summary["claims"][0]
    check_paper_record(rec, tmp_path / "out", c11.CLAIM)
    assert rec["plots"] == ["an_beats_bn_acc.png"]
    assert "ResNet-20 on CIFAR-10, batch 8" in titles[0] and "both at lr 0.00625" in titles[0]
    m = rec["measured"]
    assert len(m["effects"]["an_minus_bn"]) == 2
    assert m["effects"]["an_minus_bn"] == pytest.approx(
        [a - b for a, b in zip(m["acc"]["an"], m["acc"]["bn"], strict=True)])
    stored = _stored(tmp_path / "out", rec)
    assert sorted((r["kwargs"]["norm"], r["kwargs"]["seed"]) for r in stored) == [
        ("an", 0), ("an", 1), ("bn", 0), ("bn", 1)]
    _check_stored(stored, root, lambda kw: _paper.linear_lr(8))
    for r in stored:
        k = {"an": {"num_components": 10}, "bn": {}}[r["kwargs"]["norm"]]
        assert r["kwargs"]["model_kwargs"] == {"width": 16, "depth": 3, **k}
        assert r["result"]["config"]["steps"] == 10  # the budget's minimum


def test_claim3_paper_scale_study_end_to_end(tmp_path, monkeypatch, small_batch):
    root = write_cifar(tmp_path / "cifar", per_class=1)
    titles = _titles(monkeypatch, c03)
    summary = run_study(tmp_path / "out", budget=TINY, claims=[3], workers=0,
                        scale="paper", data_dir=root, log=lambda line: None)
    rec = summary["claims"][0]
    check_paper_record(rec, tmp_path / "out", c03.CLAIM)
    assert rec["plots"] == ["bn_init_scale.png"]
    assert "Init-scale sensitivity, ResNet-20 on CIFAR-10" in titles[0]
    m = rec["measured"]
    assert m["init_scales"] == [0.1, 1.0, 10.0]  # the quick scales at a test budget
    assert len(m["effects"]["sensitivity_gap"]) == 2
    chosen = {n: m["lr"][n]["lr"] for n in ("none", "bn")}
    # the grid at batch 8 is the declared one scaled linearly (x 8/128)
    grid8 = [_paper.linear_lr(8, lr) for lr in c03.PAPER_LR_GRID]
    assert all(set(grid8) <= set(m["lr"][n]["grid"]) for n in chosen)
    stored = _stored(tmp_path / "out", rec)
    measured = [r for r in stored if r["kwargs"]["lr"] == chosen[r["kwargs"]["norm"]]]
    assert sorted((r["kwargs"]["norm"], r["kwargs"]["model_kwargs"]["init_scale"],
                   r["kwargs"]["seed"]) for r in measured) == sorted(
        (n, s, seed) for n in ("none", "bn") for s in (0.1, 1.0, 10.0) for seed in (0, 1))
    _check_stored(stored, root, lambda kw: kw["lr"])
    for r in stored:
        lr, norm = r["kwargs"]["lr"], r["kwargs"]["norm"]
        assert lr in m["lr"][norm]["grid"]
        if lr != chosen[norm]:  # a selection run: at scale 1, seeds 0-1
            assert r["kwargs"]["model_kwargs"]["init_scale"] == 1.0
    # the effect from the stored accuracies, per seed (a run whose outputs went
    # non-finite, its test loss stored as None, at chance: 10%)
    for j in range(2):
        sens = {}
        for norm in ("none", "bn"):
            acc = {}
            for r in measured:
                kw, res = r["kwargs"], r["result"]
                if kw["norm"] == norm and kw["seed"] == j:
                    a = res["final_test_acc"]
                    ok = a is not None and math.isfinite(a) and res["final_test_loss"] is not None
                    acc[kw["model_kwargs"]["init_scale"]] = 100 * (a if ok else 0.1)
            sens[norm] = (abs(acc[0.1] - acc[1.0]) + abs(acc[10.0] - acc[1.0])) / 2
        assert m["effects"]["sensitivity_gap"][j] == pytest.approx(sens["none"] - sens["bn"])
