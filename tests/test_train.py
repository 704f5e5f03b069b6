"""normlab.train: deterministic loop, curves, divergence, sharding, CLI."""

import json
import math

import pytest
import torch
from torch import nn

from normlab import cli, models
from normlab.train import _Progress, batch_indices, evaluate, lr_at, train


def _blobs(n=240, d=6, classes=3, seed=0, sep=3.0):
    """An easy task: Gaussian blobs around well separated class centres (the same
    centres for every seed; the seed draws the samples)."""
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * sep
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = centres[y] + torch.randn(n, d, generator=g)
    return x, y


def _mlp(seed=0, norm="bn", dropout=0.0):
    torch.manual_seed(seed)
    return models.mlp((6,), 3, norm=norm, width=16, depth=2, dropout=dropout)


def test_same_seed_same_numbers_bit_for_bit():
    x, y = _blobs()
    xt, yt = _blobs(seed=1)
    runs = []
    for i in range(2):
        model = _mlp(dropout=0.2)  # dropout draws from the RNG that train() seeds,
        torch.manual_seed(1000 + i)  # whatever the caller's global RNG state is
        r = train(model, x, y, xt, yt, steps=40, batch_size=8, lr=0.05, seed=3,
                  eval_every=10, progress=False)
        runs.append((r, model.state_dict()))
    (a, sa), (b, sb) = runs
    assert a.curve == b.curve and a.evals == b.evals
    assert a.curve["loss"] and len(set(a.curve["loss"])) > 1
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = train(_mlp(dropout=0.2), x, y, xt, yt, steps=40, batch_size=8, lr=0.05, seed=4,
              progress=False)
    assert c.curve["loss"] != a.curve["loss"]  # the seed matters


def test_global_rng_is_left_alone():
    x, y = _blobs()
    model = _mlp(dropout=0.3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(model, x, y, steps=5, batch_size=8, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_loss_goes_down_on_an_easy_task():
    x, y = _blobs()
    xt, yt = _blobs(seed=1)
    r = train(_mlp(), x, y, xt, yt, steps=120, batch_size=16, lr=0.05, progress=False,
              eval_every=40)
    first = sum(r.curve["loss"][:10]) / 10
    last = sum(r.curve["loss"][-10:]) / 10
    assert last < 0.3 * first
    assert r.final_test_acc > 0.9 and not r.diverged
    assert r.steps_done == 120 and r.curve["step"] == list(range(1, 121))
    assert r.evals["step"] == [40, 80, 120] and r.best_test_acc >= r.evals["test_acc"][0]
    assert r.final_train_loss == pytest.approx(sum(r.curve["loss"][-12:]) / 12)
    loss, acc = evaluate(_mlp().eval(), xt, yt)
    assert acc < r.final_test_acc  # an untrained model does worse


def test_accepts_a_dataset_and_logs_every_k_steps():
    class DS:
        pass

    ds = DS()
    ds.x_train, ds.y_train = _blobs()
    ds.x_test, ds.y_test = _blobs(seed=1)
    r = train(_mlp(), ds, steps=20, batch_size=8, log_every=5, progress=False)
    assert r.curve["step"] == [5, 10, 15, 20]
    assert r.config["num_test"] == len(ds.x_test) and r.final_test_acc is not None


class _Explodes(nn.Module):
    """Finite logits for three calls, then NaN."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.lin(x)
        return out * float("nan") if self.calls > 3 and self.training else out


def test_divergence_stops_the_run_and_is_recorded():
    x, y = _blobs()
    xt, yt = _blobs(seed=1)
    model = _Explodes()
    r = train(model, x, y, xt, yt, steps=50, batch_size=8, progress=False)
    assert r.diverged and r.diverged_step == 3 and r.steps_done == 3
    assert "non-finite loss" in r.diverged_reason
    assert math.isnan(r.curve["loss"][-1])
    assert r.final_test_acc is not None  # still evaluated, with the last finite weights
    assert torch.isfinite(model.lin.weight).all()  # the NaN step did not update
    d = json.loads(r.to_json())  # strict JSON: the NaN became null
    assert d["diverged"] is True and d["curve"]["loss"][-1] is None


def test_huge_learning_rate_diverges_without_raising():
    x, y = _blobs()
    r = train(_mlp(norm="none"), x * 100, y, steps=200, batch_size=8, lr=1e6,
              progress=False, divergence_loss=1e4)
    assert r.diverged and r.steps_done < 200
    json.loads(r.to_json())


def test_gradient_clipping_bounds_the_update():
    x, y = _blobs()
    model = _mlp(norm="none")
    before = [p.detach().clone() for p in model.parameters()]
    train(model, x * 1000, y, steps=1, batch_size=8, lr=1.0, momentum=0.0,
          clip_grad_norm=0.01, progress=False)
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum()
                          for p, b in zip(model.parameters(), before, strict=True)))
    assert float(step) <= 0.01 * 1.0001


def test_weight_decay_and_optimizers():
    x, y = _blobs()
    norms = {}
    for wd in (0.0, 0.1):
        model = _mlp()
        train(model, x, y, steps=30, batch_size=8, lr=0.05, weight_decay=wd, progress=False)
        norms[wd] = float(model.features[1].weight.detach().norm())
    assert norms[0.1] < norms[0.0]
    for opt in ("adam", "adamw", lambda params: torch.optim.SGD(params, lr=0.0)):
        r = train(_mlp(), x, y, steps=5, batch_size=8, lr=0.01, optimizer=opt,
                  progress=False)
        assert r.steps_done == 5
    with pytest.raises(ValueError, match="optimizer"):
        train(_mlp(), x, y, steps=1, optimizer="lbfgs", progress=False)


def test_lr_schedules():
    assert lr_at(0, 100, 0.1) == lr_at(99, 100, 0.1) == 0.1
    assert lr_at(0, 100, 0.1, "cosine") == pytest.approx(0.1)
    assert lr_at(50, 100, 0.1, "cosine") == pytest.approx(0.05)
    assert lr_at(100, 100, 0.1, "cosine") == pytest.approx(0.0)
    assert [lr_at(s, 100, 0.1, warmup_steps=4) for s in range(5)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1])
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, 0.1, "step")
    x, y = _blobs()
    r = train(_mlp(), x, y, steps=10, batch_size=8, lr=0.1, schedule="cosine", progress=False)
    assert r.curve["lr"] == pytest.approx([lr_at(s, 10, 0.1, "cosine") for s in range(10)])


def test_batches_drop_the_last_partial_batch_and_cover_each_epoch():
    it = batch_indices(10, 4, seed=0)
    epoch1 = [next(it) for _ in range(2)]
    assert all(len(b) == 4 for b in epoch1)
    assert len(set(torch.cat(epoch1).tolist())) == 8  # no repeats within an epoch
    a = [b.tolist() for b, _ in zip(batch_indices(10, 4, seed=0), range(6), strict=False)]
    b = [b.tolist() for b, _ in zip(batch_indices(10, 4, seed=0), range(6), strict=False)]
    assert a == b
    with pytest.raises(ValueError, match="cannot fill one batch"):
        next(batch_indices(3, 4, seed=0))


def test_ranks_shard_the_same_global_batch():
    single = batch_indices(40, 8, seed=5)
    ranks = [batch_indices(40, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):
        glob = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat(parts), glob)


def test_callbacks_see_every_step_and_can_stop():
    x, y = _blobs()
    seen = []

    def cb(step, model, info):
        seen.append((step, info["lr"]))
        return step == 7

    r = train(_mlp(), x, y, steps=20, batch_size=8, callbacks=[cb], progress=False)
    assert [s for s, _ in seen] == list(range(1, 8))
    assert r.steps_done == 7 and not r.diverged


def test_progress_bar_auto_off_without_a_terminal_and_forced_on(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert _Progress(None, 10, "x", 8).bar is None  # pytest's stderr is not a TTY
    assert _Progress(False, 10, "x", 8).bar is None
    x, y = _blobs()
    r = train(_mlp(), x, y, *_blobs(seed=1), steps=12, batch_size=8, progress=True,
              eval_every=4, desc="demo")
    err = capsys.readouterr().err
    assert "demo" in err and "12/12" in err and "samples/s" in err
    assert r.steps_done == 12


def test_result_is_json_serialisable(tmp_path):
    x, y = _blobs()
    r = train(_mlp(), x, y, *_blobs(seed=1), steps=6, batch_size=8, progress=False,
              config={"model": "mlp"})
    path = tmp_path / "r.json"
    r.to_json(path)
    d = json.loads(path.read_text())
    assert d["config"]["model"] == "mlp" and d["config"]["batch_size"] == 8
    assert d["final_test_acc"] == r.final_test_acc and d["steps_done"] == 6
    assert d["num_params"] == sum(p.numel() for p in _mlp().parameters())


def test_cli_train(tmp_path, capsys):
    path = tmp_path / "result.json"
    rc = cli.main(["train", "--data", "digits", "--model", "cnn", "--norm", "gn",
                   "--width", "8", "--batch-size", "8", "--lr", "0.05", "--steps", "30",
                   "--norm-kw", "num_groups=4", "--json", str(path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "steps/s" in out
    d = json.loads(path.read_text())
    assert d["steps_done"] == 30 and d["config"]["norm_kwargs"] == {"num_groups": 4}
    assert d["config"]["data"] == "digits" and 0.0 <= d["final_test_acc"] <= 1.0
    # the same command again gives the same numbers
    rc = cli.main(["train", "--data", "digits", "--model", "cnn", "--norm", "gn",
                   "--width", "8", "--batch-size", "8", "--lr", "0.05", "--steps", "30",
                   "--norm-kw", "num_groups=4", "--json", str(tmp_path / "again.json"),
                   "--no-progress"])
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["curve"] == d["curve"] and again["final_test_acc"] == d["final_test_acc"]


def test_ddp_on_two_ranks_equals_one_process_with_the_global_batch(tmp_path):
    """The sharding hook: 2 ranks x batch 4 under DDP (gloo, CPU) take the same steps
    as one process with batch 8, since each global batch is split between the ranks."""
    import _dist_workers as W  # tests/ is on sys.path under pytest

    x, y = _blobs()
    single = _mlp(norm="none")
    torch.save({"x": x, "y": y, "state": single.state_dict()}, tmp_path / "setup.pt")
    W.launch(W.worker_ddp_train, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["steps"] == r1["steps"] == 10
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k])  # replicas stay identical
    train(single, x, y, steps=10, batch_size=8, lr=0.05, seed=1, progress=False)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-5, atol=1e-6)


def test_cli_train_reports_bad_arguments(tmp_path, capsys):
    assert cli.main(["train", "--data", "cifar10", "--data-dir", str(tmp_path / "no"),
                     "--no-progress"]) == 2
    assert "CIFAR-10 folder not found" in capsys.readouterr().err
    assert cli.main(["train", "--data", "digits", "--model", "mlp", "--norm", "in",
                     "--no-progress"]) == 2
    assert "cannot normalize" in capsys.readouterr().err


def test_callable_optimizer_keeps_each_group_rate_ratio():
    """The schedule scales every parameter group alike: a group the optimizer factory
    gives lr/10 stays at a tenth of the scheduled rate (it used to be overwritten)."""
    x, y = _blobs()
    model = _mlp(norm="none")
    params = list(model.parameters())
    created = []

    def make(_):
        opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.005}],
                              lr=0.05)
        created.append(opt)
        return opt

    seen = []

    def record(step, m, info):
        seen.append((info["lr"], [g["lr"] for g in created[0].param_groups]))

    train(model, x, y, steps=6, batch_size=8, lr=0.05, optimizer=make, schedule="cosine",
          seed=0, progress=False, callbacks=[record])
    assert len(seen) == 6 and seen[-1][0] < 0.05  # the cosine schedule moved the rate
    for scheduled, (first, second) in seen:
        assert first == pytest.approx(scheduled, rel=1e-12)
        assert second == pytest.approx(scheduled / 10, rel=1e-12)


def _manual_sgd(model, x, y, rates, batch_size, seed, loss_fn):
    """Plain SGD written out (no momentum, no optimizer object): p -= rate * grad on the
    same seeded batches as train(), one rate per step."""
    batches = batch_indices(len(x), batch_size, seed)
    for rate in rates:
        idx = next(batches)
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= rate * p.grad
    return model


def test_scheduler_owns_the_rates_and_matches_plain_sgd_written_out():
    x, y = _blobs()
    model, ref = _mlp(norm="none"), _mlp(norm="none")
    factor = [1.0, 0.5, 0.25, 2.0, 1.0, 0.1, 0.3, 1.5]

    def sched(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factor[min(s, 7)])

    r = train(model, x, y, steps=8, batch_size=8, lr=0.05, momentum=0.0, seed=4,
              scheduler=sched, progress=False)
    rates = [0.05 * f for f in factor]
    assert r.curve["lr"] == pytest.approx(rates, rel=1e-12)
    _manual_sgd(ref, x, y, rates, 8, 4, nn.functional.cross_entropy)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_scheduler_conflicting_with_a_schedule_is_refused_before_anything_changes():
    x, y = _blobs()
    model = _mlp(norm="none")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def sched(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    for kwargs in ({"schedule": "cosine"}, {"warmup_steps": 3}):
        with pytest.raises(ValueError, match="scheduler owns the learning rates"):
            train(model, x, y, steps=5, batch_size=8, scheduler=sched, progress=False,
                  **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_regression_without_accuracy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    w = torch.randn(6, 1, generator=g)
    y = x @ w
    torch.manual_seed(0)
    model = models.mlp((6,), 1, norm="none", width=16, depth=1)
    mse = nn.functional.mse_loss
    r = train(model, x[:160], y[:160], x[160:], y[160:], steps=150, batch_size=16, lr=0.02,
              loss_fn=mse, accuracy=False, eval_every=50, progress=True)
    assert r.final_test_acc is None and r.best_test_acc is None
    assert all(a is None for a in r.curve["acc"]) and all(a is None for a in r.evals["test_acc"])
    with torch.no_grad():
        direct = float(mse(model(x[160:]), y[160:]))
    assert r.final_test_loss == pytest.approx(direct, rel=1e-5)
    assert r.final_test_loss < 0.2 * float(y[160:].var())  # it learned the linear map
    json.dumps(r.to_dict(), allow_nan=False)
    loss, acc = evaluate(model, x[160:], y[160:], loss_fn=mse, accuracy=False)
    assert acc is None and loss == pytest.approx(direct, rel=1e-5)


def test_an_optimizer_with_its_own_zero_grad_keeps_it_and_gives_the_same_run():
    # train() clears the gradients itself for torch's Optimizer.zero_grad (which only
    # sets them to None); an optimizer class that overrides zero_grad must still get
    # its call every step, and clearing either way must train the same numbers.
    calls = []

    class CountingSGD(torch.optim.SGD):
        def zero_grad(self, set_to_none=True):
            calls.append(set_to_none)
            super().zero_grad(set_to_none=set_to_none)

    x, y = _blobs()
    runs = []
    for make in (None, lambda p: CountingSGD(p, lr=0.05, momentum=0.9)):
        model = _mlp()
        kw = {"optimizer": make} if make else {}
        r = train(model, x, y, steps=12, batch_size=8, lr=0.05, progress=False, **kw)
        runs.append((r.curve, model.state_dict()))
    assert calls == [True] * 12
    (ca, sa), (cb, sb) = runs
    assert ca == cb and all(torch.equal(sa[k], sb[k]) for k in sa)
