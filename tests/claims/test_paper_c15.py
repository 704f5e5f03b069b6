"""Claim 15 at the papers' scale (``normlab study --scale paper``): Zhang, Dauphin &
Ma's CIFAR-10 comparison of BN, Fixup and a plain ResNet at BN's rate, tested on
generated CIFAR-format batches at a tiny budget; and the options of
``claims._arms.arm_run`` it needs (a data folder, crops and flips, Fixup's two
optimiser groups as the loop trains them)."""

import json

import pytest
import torch

from _cifar import TINY, check_paper_record, write_cifar
from normlab import data, models
from normlab.claims import _arms, _paper
from normlab.claims import c15_fixup_no_norm as c15
from normlab.claims.base import BUDGETS, RunContext, make_spec
from normlab.claims.design import split
from normlab.study import run_study
from normlab.train import lr_at


def _expected_scalars(net) -> set:
    """Fixup's slow group by its definition, not by the name rule that builds it: the
    one-element biases and multipliers, and the classifier's bias (the paper's code
    puts every "bias" in that group)."""
    return {name for name, p in net.named_parameters() if p.numel() == 1 or name == "fc.bias"}


def test_paper_kwargs_are_the_papers_resnet110_recipe(tmp_path):
    ctx = RunContext(claim_id="fixup_no_norm", budget=BUDGETS["default"], out_dir=tmp_path,
                     scale="paper", data_dir="/data/cifar")
    steps = _paper.steps_for(ctx, c15.PAPER_EPOCHS, c15.PAPER_BATCH, 40_000)
    assert steps == 9375  # 30 epochs of the 40,000 images left after validation
    common = {"data": "cifar10", "data_dir": "/data/cifar", "width": 16, "depth": 110,
              "batch_size": 128, "lr": 0.1, "steps": 9375, "seed": 3, "momentum": 0.9,
              "weight_decay": 5e-4, "schedule": "cosine", "augment": "crop_flip",
              "eval_every": 937, "log_every": 46}
    for arm in c15.ARMS:
        kw = c15.paper_kwargs(ctx, arm, 3, steps)
        want = {"arm": arm, **common, **({"scalar_lr": 0.01} if arm == "fixup" else {})}
        assert kw == want
    # ResNet-110 has L = 54 residual branches (the setup's words), and the numbers the
    # report shows are the module's
    assert models.fixup_resnet(110).num_branches == 54
    text = c15.CLAIM.paper_setup
    for words in ("ResNet-110", "CIFAR-10", "0.1 at batch 128", "at 0.01", "9,375 steps",
                  "weight decay 0.0005", "30 epochs", "no mixup", "not measured on a GPU"):
        assert words in text
    assert c15.CLAIM.scales == ("small", "paper")


def test_paper_scale_study_trains_the_three_arms_at_the_papers_rate(tmp_path, monkeypatch):
    # ResNet-8 at batch 32 on 40 images keeps the study to seconds on a CPU; the real
    # setup's arguments are checked exactly above
    monkeypatch.setattr(c15, "PAPER_DEPTH", 8)
    monkeypatch.setattr(c15, "PAPER_BATCH", 32)
    root = write_cifar(tmp_path / "cifar", per_class=1)
    summary = run_study(tmp_path / "out", budget=TINY, claims=[15], workers=0,
                        scale="paper", data_dir=root, log=lambda line: None)
    rec = summary["claims"][0]
    check_paper_record(rec, tmp_path / "out", c15.CLAIM)
    m = rec["measured"]
    assert (m["scale"], m["lr"], m["scalar_lr"], m["depth"], m["batch"]) == \
        ("paper", 0.025, 0.01, 8, 32)  # 0.1 x 32/128 for the weights, 0.01 unscaled
    assert m["label"] == "ResNet-8 (width 16) on CIFAR-10"
    assert (m["steps"], m["epochs"]) == (10, 8.0)  # the budget's 10 steps of 32 of 40 images
    assert all(len(v) == 2 for v in m["effects"].values())
    assert len(rec["run_files"]) == 6  # 3 arms x 2 seeds
    acc: dict = {}
    for name in rec["run_files"]:
        stored = json.loads((tmp_path / "out" / "runs" / name).read_text())
        kw, res = stored["kwargs"], stored["result"]
        cfg = res["config"]
        assert kw["data_dir"] == str(root.resolve()) and kw["data"] == "cifar10"
        assert (kw["depth"], kw["width"], kw["batch_size"], kw["lr"]) == (8, 16, 32, 0.025)
        assert (cfg["schedule"], cfg["weight_decay"], cfg["momentum"], cfg["augment"]) == \
            ("cosine", 5e-4, 0.9, "crop_flip")
        assert (cfg["batch_size"], cfg["lr"], cfg["steps"]) == (32, 0.025, 10)
        assert cfg["num_train"] == 40 and cfg["num_test"] == 10  # the folder's split
        groups = {g["name"]: g["lr"] for g in cfg["param_groups"]}
        if kw["arm"] == "fixup":
            assert groups == {"weights": 0.025, "scalars": pytest.approx(0.01)}
        else:
            assert groups == {"all": 0.025} and "scalar_lr" not in kw
        small = {k: v for k, v in kw.items() if k != "data_dir"}
        assert make_spec(_arms.arm_run, small).key != stored["key"]
        chance = 1 / 10
        value = chance if res["final_test_loss"] is None else res["final_test_acc"]
        acc[(kw["arm"], kw["seed"])] = 100 * value
    assert {a for a, _ in acc} == set(c15.ARMS)
    seeds = m["seeds"]
    want_fixup = [acc["fixup", s] - acc["resnet_bn", s] for s in seeds]
    want_plain = [acc["resnet_bn", s] - acc["resnet_plain", s] for s in seeds]
    assert m["effects"]["fixup_vs_bn"] == pytest.approx(want_fixup, abs=1e-9)
    assert m["effects"]["plain_behind"] == pytest.approx(want_plain, abs=1e-9)
    # the plot's titles name the paper-scale net, data and fixed rate
    rate_title, title = c15._titles(m)
    assert "paper's fixed rate 0.025" in rate_title and "0.01" in rate_title
    assert title.startswith("ResNet-8 (width 16) on CIFAR-10") and "batch 32" in title
    assert "8 epochs = 10 steps" in title
    assert "digits" not in title


def test_plot_titles_at_the_small_scale_are_unchanged():
    m = {"lr": {"lr": 0.025}, "depth": 20, "steps": 300}
    rate_title, title = c15._titles(m)
    assert rate_title == "all at BN's chosen rate 0.025"
    assert title.startswith("ResNet-20 (width 8) on digits") and "batch 32" in title


def _spy_on_train(monkeypatch) -> dict:
    """Wrap :func:`normlab.train.train` (arm_run imports it at call time) to keep the
    model, the data and the optimiser it gets, and every group's rate at every step."""
    import normlab.train

    seen: dict = {"rates": []}
    real = normlab.train.train

    def spy(model, ds, **kw):
        seen["model"], seen["data"] = model, ds
        make = kw["optimizer"]

        def make_and_keep(params):
            seen["opt"] = make(params)
            return seen["opt"]

        def record(step, net, info):
            seen["rates"].append([g["lr"] for g in seen["opt"].param_groups])

        kw["optimizer"] = make_and_keep
        kw["callbacks"] = [*kw.get("callbacks", ()), record]
        return real(model, ds, **kw)

    monkeypatch.setattr(normlab.train, "train", spy)
    return seen


def test_arm_run_reads_the_folder_and_trains_fixup_scalars_in_their_own_group(
        tmp_path, monkeypatch):
    root = write_cifar(tmp_path / "cifar", per_class=2, seed=4)
    ref = data.load_cifar10(root)
    seen = _spy_on_train(monkeypatch)
    r = _arms.arm_run(arm="fixup", data="cifar10", data_dir=str(root), width=4, depth=8,
                      batch_size=16, lr=0.05, scalar_lr=0.004, steps=4, seed=1,
                      weight_decay=5e-4, schedule="cosine", augment="crop_flip",
                      eval_every=4, log_every=2)
    # the folder's data: its test batch is the test set, the fit part is the training
    # batches less the validation fifth
    ds = seen["data"]
    assert torch.equal(ds.x_test, ref.x_test) and torch.equal(ds.y_test, ref.y_test)
    rows = {tuple(x) for x in ref.x_train.flatten(1).tolist()}
    assert ds.num_train == 80 and {tuple(x) for x in ds.x_train.flatten(1).tolist()} <= rows
    cfg = r["config"]
    assert (cfg["num_train"], cfg["num_test"], cfg["augment"], cfg["log_every"]) == \
        (80, 20, "crop_flip", 2)
    assert r["evals"]["step"][-1] == 4 and r["val_acc"] is not None
    # Fixup's scalars, and nothing else, in a group of their own at the scalar rate
    names = {id(p): n for n, p in seen["model"].named_parameters()}
    wgroup, sgroup = seen["opt"].param_groups
    assert {names[id(p)] for p in sgroup["params"]} == _expected_scalars(seen["model"])
    assert not {names[id(p)] for p in wgroup["params"]} & _expected_scalars(seen["model"])
    assert len(wgroup["params"]) + len(sgroup["params"]) == len(names)
    assert sgroup["weight_decay"] == wgroup["weight_decay"] == 5e-4
    # every step the scalars ran at scalar_lr / lr of the weights' cosine rate
    assert len(seen["rates"]) == 4
    for t, (w, s) in enumerate(seen["rates"]):
        assert w == pytest.approx(lr_at(t, 4, 0.05, "cosine"), rel=1e-12)
        assert s == pytest.approx(w * 0.004 / 0.05, rel=1e-12)
    # the stored config says the same, at the rates asked for
    stored = {g["name"]: g for g in cfg["param_groups"]}
    assert stored["weights"]["lr"] == 0.05
    assert stored["scalars"]["lr"] == pytest.approx(0.004, rel=1e-12)
    assert stored["scalars"]["tensors"] == len(_expected_scalars(seen["model"]))
    numel = sum(p.numel() for n, p in seen["model"].named_parameters()
                if n in _expected_scalars(seen["model"]))
    assert stored["scalars"]["numel"] == numel == stored["scalars"]["tensors"] - 1 + 10
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 5e-4 for g in stored.values())


def test_arm_run_defaults_read_the_embedded_data_without_augmentation():
    r = _arms.arm_run(arm="resnet_bn", width=4, depth=8, batch_size=16, lr=0.05, steps=2)
    fit, _ = split("digits", 0)
    cfg = r["config"]
    assert (cfg["augment"], cfg["log_every"], cfg["num_train"]) == (None, 1, fit.num_train)
    net = models.resnet(fit.in_shape, fit.num_classes, norm="bn", width=4, depth=1)
    assert cfg["param_groups"] == [{"name": "all", "lr": 0.05, "weight_decay": 0.0,
                                    "momentum": 0.9, "tensors": len(list(net.parameters())),
                                    "numel": sum(p.numel() for p in net.parameters())}]
