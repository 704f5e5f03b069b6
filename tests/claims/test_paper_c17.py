"""Claim 17 at the papers' scale (``normlab study --scale paper``): Arpit, Campos &
Bengio's weight-normalized CIFAR ResNets with the standard init, their init, their init
plus warm-up, against a BN ResNet; tested on generated CIFAR-format batches at a tiny
budget. Also the WN ResNet arms of ``claims._arms`` (which layers are weight-normalized,
the paper's g rule, the forward pass) and the warm-up on top of the cosine schedule,
each against an independent float64 computation."""

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _cifar import TINY, check_paper_record, write_cifar
from normlab.claims import _arms, _paper
from normlab.claims import c17_weightnorm_arpit_init as c17
from normlab.claims.base import BUDGETS, RunContext, make_spec
from normlab.nn.weight import weight_norm_list
from normlab.study import run_study


def _g_v(conv) -> tuple[torch.Tensor, torch.Tensor]:
    plist = conv.parametrizations.weight
    return plist.original0.detach().double(), plist.original1.detach().double()


def _blocks(net) -> list:
    return [b for stage in net[1:4] for b in stage]


# ------------------------------------------------------------------ the paper setup


def test_paper_kwargs_are_the_setup_in_words(tmp_path):
    ctx = RunContext(claim_id="weightnorm_arpit_init", budget=BUDGETS["default"],
                     out_dir=tmp_path, scale="paper", data_dir="/data/cifar")
    steps = _paper.steps_for(ctx, c17.PAPER_EPOCHS, c17.PAPER_BATCH, 40_000)
    assert steps == 9375  # 30 epochs of the 40,000 images left after validation
    common = {"data": "cifar10", "data_dir": "/data/cifar", "width": 16, "depth": 56,
              "batch_size": 128, "lr": 0.1, "steps": 9375, "seed": 3, "momentum": 0.9,
              "weight_decay": 1e-4, "schedule": "cosine", "augment": "crop_flip",
              "eval_every": 9375, "log_every": 46}
    want_arm = {"wn_standard": "wn_resnet_standard", "wn_arpit": "wn_resnet_arpit",
                "wn_arpit_warmup": "wn_resnet_arpit", "bn": "resnet_bn"}
    for name in c17.ARMS:
        kw = c17.paper_kwargs(ctx, name, 3, steps)
        warm = 937 if name == "wn_arpit_warmup" else 0  # the first 10% of 9,375 steps
        assert kw == {"arm": want_arm[name], **common, "warmup_steps": warm}
    text = c17.CLAIM.paper_setup
    for words in ("ResNet-56", "3 stages of 9 blocks", "CIFAR-10", "1/N = 1/9",
                  "g = ||v||", "He-normal v", "T = 937", "0.1 at batch 128", "9,375 steps",
                  "30 epochs", "weight decay 1e-4", "cosine", "not measured on a GPU"):
        assert words in text
    assert c17.CLAIM.scales == ("small", "paper")


def test_paper_scale_study_trains_the_four_arms_at_bns_rate(tmp_path, monkeypatch):
    # ResNet-8 at batch 32 on 40 images keeps the study to seconds on a CPU; the real
    # setup's arguments are checked exactly above
    monkeypatch.setattr(c17, "PAPER_DEPTH", 8)
    monkeypatch.setattr(c17, "PAPER_BATCH", 32)
    root = write_cifar(tmp_path / "cifar", per_class=1)
    summary = run_study(tmp_path / "out", budget=TINY, claims=[17], workers=0,
                        scale="paper", data_dir=root, log=lambda line: None)
    rec = summary["claims"][0]
    check_paper_record(rec, tmp_path / "out", c17.CLAIM)
    m = rec["measured"]
    assert (m["scale"], m["depth"], m["batch"], m["steps"], m["epochs"]) == \
        ("paper", 8, 32, 10, 8.0)  # the budget's 10 steps of 32 of 40 images
    assert m["lr"] == {name: {"lr": 0.025} for name in c17.ARMS}  # 0.1 x 32/128
    assert m["label"] == "ResNet-8 (width 16) on CIFAR-10" and m["warmup_steps"] == 1
    assert set(m["effects"]) == {"init_gain", "bn_gap", "warmup_gain"}
    assert all(len(v) == 2 for v in m["effects"].values())
    assert len(rec["run_files"]) == 8  # 4 arms x 2 seeds
    acc: dict = {}
    for name in rec["run_files"]:
        stored = json.loads((tmp_path / "out" / "runs" / name).read_text())
        kw, res = stored["kwargs"], stored["result"]
        cfg = res["config"]
        assert kw["data_dir"] == str(root.resolve()) and kw["data"] == "cifar10"
        assert (kw["depth"], kw["width"], kw["batch_size"], kw["lr"]) == (8, 16, 32, 0.025)
        assert (cfg["weight_decay"], cfg["momentum"], cfg["augment"]) == \
            (1e-4, 0.9, "crop_flip")
        assert (cfg["batch_size"], cfg["lr"], cfg["steps"]) == (32, 0.025, 10)
        assert cfg["num_train"] == 40 and cfg["num_test"] == 10  # the folder's split
        assert cfg["param_groups"] == [{**cfg["param_groups"][0], "name": "all",
                                        "lr": 0.025, "weight_decay": 1e-4}]
        # the warm-up arm's scheduler multiplies the cosine every other arm follows
        warm = kw["warmup_steps"] == 1
        assert cfg["schedule"] == ("ArpitWarmupCosine" if warm else "cosine")
        assert kw["schedule"] == "cosine"
        small = {k: v for k, v in kw.items() if k != "data_dir"}
        assert make_spec(_arms.arm_run, small).key != stored["key"]
        value = 0.1 if res["final_test_loss"] is None else res["final_test_acc"]
        arm = "wn_arpit_warmup" if warm else {
            "wn_resnet_standard": "wn_standard", "wn_resnet_arpit": "wn_arpit",
            "resnet_bn": "bn"}[kw["arm"]]
        acc[(arm, kw["seed"])] = 100 * value
    assert {a for a, _ in acc} == set(c17.ARMS)
    seeds = m["seeds"]

    def diff(a, b):
        return [acc[a, s] - acc[b, s] for s in seeds]

    assert m["effects"]["init_gain"] == pytest.approx(diff("wn_arpit", "wn_standard"),
                                                      abs=1e-9)
    assert m["effects"]["bn_gap"] == pytest.approx(diff("bn", "wn_arpit"), abs=1e-9)
    assert m["effects"]["warmup_gain"] == pytest.approx(
        diff("wn_arpit_warmup", "wn_arpit"), abs=1e-9)
    # the plot's title names the paper-scale net, data and fixed rate
    title = c17._title(m)
    assert title.startswith("ResNet-8 (width 16) on CIFAR-10") and "batch 32" in title
    assert "8 epochs = 10 steps" in title and "BN's fixed rate" in title
    assert "digits" not in title and "MLP" not in title


def test_plot_title_at_the_small_scale_is_unchanged():
    m = {"depth": 24, "steps": 300}
    assert c17._title(m) == ("24-layer ReLU MLP (width 32) on digits, 300 steps, batch 64; "
                             "each arm at its rate chosen on validation; dotted: chance")


# ------------------------------------------------------------- the WN ResNet arms


def test_wn_resnet_is_weight_normalized_where_the_paper_says():
    torch.manual_seed(0)
    net = _arms.build_arm("wn_resnet_arpit", (3, 8, 8), 10, width=4, depth=14, seed=0)
    convs = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    # every convolution (stem, both of every block, the two 1x1 shortcuts) normalized
    # per output channel; the classifier a plain Linear; no BatchNorm anywhere
    assert len(convs) == 1 + 3 * 2 * 2 + 2
    for name, conv in convs:
        plist = weight_norm_list(conv, "weight")
        assert plist is not None and plist[0].dim == 0, name
        assert conv.bias is not None
    assert isinstance(net[-1], nn.Linear) and weight_norm_list(net[-1], "weight") is None
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    shortcuts = [b.shortcut for b in _blocks(net)]
    assert [s is not None for s in shortcuts] == [False, False, True, False, True, False]
    assert all(s.kernel_size == (1, 1) and s.stride == (2, 2) for s in shortcuts if s)
    # the forward pass from w = g v / ||v||, in float64: stem with no ReLU, blocks
    # x + conv2(relu(conv1(x))) with no ReLU after the sum, mean pool, Linear
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)

    def conv(layer, h):
        g, v = _g_v(layer)
        w = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return F.conv2d(h, w, layer.bias.detach().double(), layer.stride, layer.padding)

    h = conv(net[0], x)
    for b in _blocks(net):
        skip = h if b.shortcut is None else conv(b.shortcut, h)
        h = skip + conv(b.conv2, conv(b.conv1, h).clamp(min=0))
    lin = net[-1]
    want = h.mean((2, 3)) @ lin.weight.detach().double().T + lin.bias.detach().double()
    torch.testing.assert_close(net.double()(x), want, rtol=1e-10, atol=1e-10)


def test_arpit_init_sets_g_per_the_papers_rule():
    n = 2
    net = _arms.build_arm("wn_resnet_arpit", (3, 8, 8), 10, width=4, depth=6 * n + 2,
                          seed=1)

    def ratio(layer) -> float:  # C_in / C_out, from the shapes, in float64
        return layer.in_channels / layer.out_channels

    want = [(net[0], math.sqrt(1.0 * ratio(net[0])))]  # stem: gain 1
    for b in _blocks(net):
        want.append((b.conv1, math.sqrt(2.0 * ratio(b.conv1))))  # ReLU follows: gain 2
        want.append((b.conv2, math.sqrt(ratio(b.conv2) / n)))  # residual: gain 1/N
        if b.shortcut is not None:
            want.append((b.shortcut, math.sqrt(1.0 * ratio(b.shortcut))))
    assert len(want) == 15
    for layer, g_want in want:
        g, v = _g_v(layer)
        assert torch.allclose(g, torch.full_like(g, g_want), rtol=1e-6, atol=0)
        rows = v.flatten(1)  # orthogonal: orthonormal rows, or columns where rows > cols
        gram = rows @ rows.T if rows.shape[0] <= rows.shape[1] else rows.T @ rows
        torch.testing.assert_close(gram, torch.eye(len(gram), dtype=torch.float64),
                                   rtol=0, atol=1e-5)
        assert not layer.bias.detach().any()
    # the same seed, the same v (the generator is the seed's)
    again = _arms.build_arm("wn_resnet_arpit", (3, 8, 8), 10, width=4, depth=14, seed=1)
    assert torch.equal(_g_v(again[1][0].conv1)[1], _g_v(net[1][0].conv1)[1])


def test_standard_init_is_he_normal_v_with_g_the_norm_of_v():
    torch.manual_seed(2)
    net = _arms.build_arm("wn_resnet_standard", (3, 8, 8), 10, width=16, depth=8, seed=2)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            g, v = _g_v(m)
            norms = v.flatten(1).norm(dim=1)
            torch.testing.assert_close(g.flatten(), norms, rtol=1e-6, atol=0)  # w = v
            assert not m.bias.detach().any()
    # He-normal: std sqrt(2 / fan_in), on the largest layer (64 x 64 x 9 values)
    _, v = _g_v(net[3][0].conv2)
    fan_in = v[0].numel()
    assert v.mean().abs() < 0.05 * math.sqrt(2 / fan_in)
    assert v.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)


def test_at_the_setups_depth_the_standard_init_explodes_and_arpits_keeps_the_scale():
    # the paper's motivation, at ResNet-56: the standard init's blocks each add a
    # branch as large as their input, Arpit's keep the forward signal's norm
    x = torch.randn(2, 3, 32, 32)
    rms = {}
    for arm in ("wn_resnet_standard", "wn_resnet_arpit"):
        torch.manual_seed(0)
        net = _arms.build_arm(arm, (3, 32, 32), 10, width=16, depth=c17.PAPER_DEPTH, seed=0)
        with torch.no_grad():
            h = net[:4](x)  # stem and the three stages, before pooling
        rms[arm] = (h.pow(2).mean().sqrt() / x.pow(2).mean().sqrt()).item()
    assert rms["wn_resnet_standard"] > 1e3
    assert 0.1 < rms["wn_resnet_arpit"] < 10


def test_wn_resnet_refuses_bad_depth_and_init():
    with pytest.raises(ValueError, match=r"claims\._arms: a WN ResNet's depth must be 6n \+ 2"):
        _arms.build_arm("wn_resnet_arpit", (3, 8, 8), 10, width=4, depth=12)
    with pytest.raises(ValueError, match="init must be 'arpit' or 'standard', got 'he'"):
        _arms.wn_resnet((3, 8, 8), 10, width=4, depth=8, init="he")


# ------------------------------------------------------- warm-up on top of the cosine


def _spy_rates(monkeypatch) -> list:
    """Wrap :func:`normlab.train.train` (arm_run imports it at call time) to record the
    rate of every group at every ``optimizer.step()``, the rates that update used."""
    import normlab.train

    rates: list = []
    real = normlab.train.train

    def spy(model, ds, **kw):
        make = kw["optimizer"]

        def make_and_watch(params):
            opt = make(params)
            opt.register_step_pre_hook(
                lambda o, args, kwargs: rates.append([g["lr"] for g in o.param_groups]))
            return opt

        kw["optimizer"] = make_and_watch
        return real(model, ds, **kw)

    monkeypatch.setattr(normlab.train, "train", spy)
    return rates


def test_arpit_warmup_multiplies_the_cosine_of_the_other_arms(monkeypatch):
    rates = _spy_rates(monkeypatch)
    steps, warm, lr = 8, 3, 0.05
    r = _arms.arm_run(arm="wn_resnet_arpit", width=4, depth=8, batch_size=16, lr=lr,
                      steps=steps, schedule="cosine", warmup_steps=warm)
    assert r["config"]["schedule"] == "ArpitWarmupCosine"
    # the rate of every update: the paper's quadratic ramp from 0 times half a cosine
    # over the whole run, in float64
    want = [lr * min(1.0, t / warm) ** 2 * 0.5 * (1 + math.cos(math.pi * t / steps))
            for t in range(steps)]
    assert [row[0] for row in rates] == pytest.approx(want, rel=1e-12, abs=1e-15)
    rates.clear()
    plain = _arms.arm_run(arm="wn_resnet_arpit", width=4, depth=8, batch_size=16, lr=lr,
                          steps=steps, schedule="cosine")
    assert plain["config"]["schedule"] == "cosine"
    cosine = [lr * 0.5 * (1 + math.cos(math.pi * t / steps)) for t in range(steps)]
    assert [row[0] for row in rates] == pytest.approx(cosine, rel=1e-12)
    # past the warm-up the two arms run at the same rate
    assert want[warm:] == pytest.approx(cosine[warm:], rel=1e-12)


def test_arpit_warmup_with_the_constant_rate_is_unchanged(monkeypatch):
    rates = _spy_rates(monkeypatch)
    r = _arms.arm_run(arm="wn_arpit", width=8, depth=3, batch_size=16, lr=0.02, steps=6,
                      warmup_steps=4)
    assert r["config"]["schedule"] == "ArpitWarmup"
    want = [0.02 * min(1.0, t / 4) ** 2 for t in range(6)]
    assert [row[0] for row in rates] == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_warmup_cosine_refuses_a_warmup_longer_than_the_run():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"claims\._arms: warmup_steps must be an int in "
                                         r"1\.\.steps \(5\), got 6"):
        _arms.arpit_warmup_cosine(opt, 6, 5)
    assert opt.param_groups[0]["lr"] == 0.1
