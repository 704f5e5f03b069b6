"""Time the lab's typical training runs with the committed ``normlab.train`` at a git
revision against the working tree's, in the same process, and check that both give
the same results.

    PYTHONPATH=src python scripts/train_speed.py [--rev main] [--repeats 7] [--steps 300]
    PYTHONPATH=src python scripts/train_speed.py --check-only

The old ``train.py`` is read with ``git show REV:src/normlab/train.py`` into a module
of its own; a run uses it by replacing ``normlab.train.train`` for the length of the
run (``claims.design.train_run`` imports it at call time). Runs are single-threaded,
timed in CPU seconds of this process (``time.process_time``; other users of a shared
machine cost wall time, less CPU time), and interleaved old/new with the order
alternating, so drifting load hits both alike. Each configuration prints runs per
CPU-second, the median over the repeats and the spread (min-max), for both, and the
median and quartiles of the paired speed ratio (new/old within each repeat).

``--check`` (on by default) first trains a set of configurations (mlp and cnn; bn, gn
and no norm; batch 2 and 32; a cosine schedule with warm-up; a torch scheduler;
callbacks; a diverging run; ``accuracy=False``; clipping; ``log_every`` > 1;
two parameter groups; no test data; ``augment``) with both
and requires the ``TrainResult`` dicts (timings left out) and the trained weights to be
equal bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

import normlab.train as new_train
from normlab import models
from normlab.claims import design

REPO = Path(__file__).resolve().parents[1]
TIMINGS = ("wall_time_s", "train_time_s", "steps_per_s", "samples_per_s")


def load_old(rev: str) -> types.ModuleType:
    """``src/normlab/train.py`` as committed at ``rev``, as a module."""
    source = subprocess.run(["git", "show", f"{rev}:src/normlab/train.py"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("normlab_train_at_rev")
    module.__file__ = f"{rev}:src/normlab/train.py"
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def using(train_fn):
    """``normlab.train.train`` is ``train_fn`` inside the block."""
    saved = new_train.train
    new_train.train = train_fn
    try:
        yield
    finally:
        new_train.train = saved


# --------------------------------------------------------------------------- equality


def _data(n=96, d=(1, 8, 8), classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, *d, generator=g) + y.view(-1, 1, 1, 1).float()
    return x, y


def _check_cases() -> list[tuple[str, str, dict, dict]]:
    """(name, model, build kwargs, train kwargs)."""
    def stop_at_7(step, model, info):
        return step == 7

    def lr_log(step, model, info):
        return None

    def step_lr(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)

    def two_groups(params):  # Fixup-like: the first tensor at a tenth of the rate
        return torch.optim.SGD([{"params": params[:1], "lr": 0.005},
                                {"params": params[1:]}], lr=0.05, momentum=0.9)

    return [
        ("mlp bn b32", "mlp", {"norm": "bn"}, {"batch_size": 32}),
        ("mlp bn b2", "mlp", {"norm": "bn"}, {"batch_size": 2}),
        ("mlp none b2", "mlp", {"norm": "none"}, {"batch_size": 2}),
        ("cnn bn b32", "cnn", {"norm": "bn"}, {"batch_size": 32}),
        ("cnn gn b2", "cnn", {"norm": "gn"}, {"batch_size": 2}),
        ("mlp cosine warm-up", "mlp", {"norm": "bn"},
         {"schedule": "cosine", "warmup_steps": 5, "batch_size": 8}),
        ("mlp scheduler", "mlp", {"norm": "bn"}, {"scheduler": step_lr, "batch_size": 8}),
        ("mlp callbacks stop", "mlp", {"norm": "bn"},
         {"callbacks": (lr_log, stop_at_7), "batch_size": 8}),
        ("mlp diverging", "mlp", {"norm": "none"}, {"lr": 1e6, "batch_size": 8}),
        ("mlp divergence_loss", "mlp", {"norm": "bn"},
         {"divergence_loss": 1.0, "batch_size": 8}),
        ("mlp accuracy=False", "mlp", {"norm": "bn"},
         {"accuracy": False, "loss_fn": _regression_loss, "batch_size": 8}),
        ("mlp clip adam log_every 3", "mlp", {"norm": "bn", "dropout": 0.2},
         {"optimizer": "adam", "lr": 0.01, "clip_grad_norm": 0.5, "log_every": 3,
          "batch_size": 8}),
        ("mlp two groups cosine", "mlp", {"norm": "bn"},
         {"optimizer": two_groups, "schedule": "cosine", "batch_size": 8}),
        ("mlp no test data", "mlp", {"norm": "bn"}, {"batch_size": 8, "test": False}),
        ("cnn bn crop_flip", "cnn", {"norm": "bn"}, {"augment": "crop_flip", "batch_size": 8}),
        ("mlp wd nesterov eval_every 4", "mlp", {"norm": "bn"},
         {"weight_decay": 1e-3, "nesterov": True, "eval_every": 4, "batch_size": 8}),
    ]


def _regression_loss(out, y):
    return torch.nn.functional.mse_loss(out[:, 0], y.float())


def _one(train_fn, model_name, build, kwargs, x, y, xt, yt):
    torch.manual_seed(0)
    net = models.build(model_name, (1, 8, 8), 4, **build)
    if not kwargs.pop("test", True):
        xt = yt = None
    result = train_fn(net, x, y, xt, yt, steps=20, progress=False,
                      **{"lr": 0.05, **kwargs}).to_dict()
    for key in TIMINGS:
        result.pop(key)
    return result, net.state_dict()


def check(old) -> bool:
    """Both trains give equal results and weights on every case; prints each."""
    x, y = _data()
    xt, yt = _data(n=40, seed=1)
    ok = True
    for name, model_name, build, kwargs in _check_cases():
        a, sa = _one(old.train, model_name, build, dict(kwargs), x, y, xt, yt)
        b, sb = _one(new_train.train, model_name, build, dict(kwargs), x, y, xt, yt)
        same = a == b and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        ok &= same
        print(f"  {'identical' if same else 'DIFFERENT'}  {name}  (steps_done "
              f"{b['steps_done']}, diverged {b['diverged']})")
    return ok


# --------------------------------------------------------------------------- speed


def configurations(steps: int) -> list[tuple[str, dict]]:
    """The lab's typical runs (claims 1-9): design.train_run on digits."""
    cnn = {"width": 16, "depth": 3}
    mlp = {"width": 64, "depth": 3}
    return [(f"{m} {norm} batch {b}", {"model": m, "norm": norm, "batch_size": b,
                                       "steps": steps, "model_kwargs": kw})
            for m, kw in (("mlp", mlp), ("cnn", cnn)) for norm in ("bn",)
            for b in (2, 32)]


def time_run(train_fn, kwargs: dict) -> float:
    """CPU seconds of one design.train_run with ``train_fn`` as the loop."""
    with using(train_fn):
        t0 = time.process_time()
        design.train_run(**kwargs)
        return time.process_time() - t0


def measure(old, steps: int, repeats: int) -> None:
    print(f"runs per CPU-second (median of {repeats}, [min-max]); {steps} steps, 1 thread")
    for name, kwargs in configurations(steps):
        times = {"old": [], "new": []}
        time_run(new_train.train, kwargs)  # warm: data loading, first-call caches
        for i in range(repeats):
            order = ("old", "new") if i % 2 == 0 else ("new", "old")
            for which in order:
                fn = old.train if which == "old" else new_train.train
                times[which].append(time_run(fn, kwargs))
        rates = {k: sorted(1.0 / t for t in v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in rates.items()}
        # Each repeat's old and new ran back to back: their ratio cancels slow drifts
        # of the machine's load that the medians of each side keep.
        ratios = sorted(o / n for o, n in zip(times["old"], times["new"], strict=True))
        q1, q2, q3 = statistics.quantiles(ratios, n=4)
        print(f"  {name:18s} old {med['old']:6.3f} [{rates['old'][0]:.3f}-{rates['old'][-1]:.3f}]"
              f"  new {med['new']:6.3f} [{rates['new'][0]:.3f}-{rates['new'][-1]:.3f}]"
              f"  paired new/old {q2:.3f} (quartiles {q1:.3f}-{q3:.3f})", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="main", help="git revision of the old train.py")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--no-check", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    old = load_old(args.rev)
    if not args.no_check:
        print(f"results of {args.rev}:train.py vs the working tree's:")
        if not check(old):
            print("results differ")
            return 1
    if not args.check_only:
        measure(old, args.steps, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
