"""Try normlab as a hostile user would and print, per area, how many cases got a
clear answer.

Every case is one call with an input or argument that is wrong (or an edge case
torch.nn accepts). A case counts as *clear* when

* a refused call raised ValueError or TypeError whose message names the layer (its
  class name) and, for a constructor argument, the argument, and left every
  parameter and buffer exactly as it was; or
* an edge case torch.nn accepts (an empty batch, training on the meta device) gave an
  output of the input's shape without changing a running statistic.

Anything else is listed: another exception type, a message that names no layer, a
state changed by a refused call, or an invalid argument silently accepted.

    PYTHONPATH=src python scripts/hostile_inputs.py [--cli] [--verbose]

``--cli`` adds the ``normlab train`` / ``normlab study`` argument cases (each one a
subprocess, about a minute in all); ``--sync`` the SyncBatchNorm cases on 2 gloo
ranks (half a minute).
"""

# Every case builds a lambda over the loop's layer and calls it at once: B023 does not apply.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict

import torch

from normlab import create_norm, list_norms
from normlab import nn as nl

C = 4
RESULTS: dict[str, list[tuple[str, str]]] = defaultdict(list)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if v.device.type != "meta"}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(torch.nan_to_num(a[k]), torch.nan_to_num(b[k])) for k in a
    )


def record(area: str, case: str, verdict: str) -> None:
    RESULTS[area].append((case, verdict))


def refused(area, case, name, fn, module=None, words=()):
    """``fn()`` must raise ValueError/TypeError naming ``name`` (and ``words``)."""
    before = _state(module) if module is not None else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except (ValueError, TypeError) as e:
        msg = str(e)
        if name not in msg or not all(w in msg for w in words):
            return record(area, case, f"unclear message: {type(e).__name__}: {msg[:120]}")
        if module is not None and not _same(before, _state(module)):
            return record(area, case, "state changed by a refused call")
        return record(area, case, "clear")
    except Exception as e:  # noqa: BLE001 - what we are looking for
        return record(area, case, f"unclear: {type(e).__name__}: {str(e)[:120]}")
    record(area, case, "silently accepted")


def accepted_or_refused(area, case, name, fn, module, x_shape, stats_keys=()):
    """An edge case torch.nn accepts: either an output of shape ``x_shape`` with the
    running statistics ``stats_keys`` unchanged, or a clear refusal."""
    before = _state(module)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = fn()
    except (ValueError, TypeError) as e:
        msg = str(e)
        if name not in msg:
            return record(area, case, f"unclear message: {type(e).__name__}: {msg[:120]}")
        if not _same(before, _state(module)):
            return record(area, case, "state changed by a refused call")
        return record(area, case, "clear")
    except Exception as e:  # noqa: BLE001
        return record(area, case, f"unclear: {type(e).__name__}: {str(e)[:120]}")
    y = y[0] if isinstance(y, tuple) else y
    if tuple(y.shape) != tuple(x_shape):
        return record(area, case, f"wrong output shape {tuple(y.shape)}")
    after = _state(module)
    for k in stats_keys:
        if k in before and not torch.equal(before[k], after[k]):
            return record(area, case, f"{k} changed by an empty batch")
    record(area, case, "clear")


# ----------------------------------------------------------------------------- layers

def variants():
    """(label, factory, min_rank, trains_on_one_value) for every layer over (N, C, *)."""
    out = [(n, (lambda n=n: create_norm(n, C)), 3 if n == "instance" else 2) for n in list_norms()
           if n != "none"]
    out += [
        ("batch(save_memory)", lambda: nl.BatchNorm(C, save_memory=True), 2),
        ("batch(relu)", lambda: nl.BatchNorm(C, activation="relu"), 2),
        ("batch(momentum=None)", lambda: nl.BatchNorm(C, momentum=None), 2),
        ("batch_renorm(paper)", lambda: nl.BatchRenorm(C, warmup="paper"), 2),
        ("instance(tracked)", lambda: nl.InstanceNorm(C, affine=True, track_running_stats=True),
         3),
        ("switchable(no bn)", lambda: nl.SwitchableNorm(C, using_bn=False), 2),
        ("attentive(group)", lambda: nl.AttentiveNorm(C, num_components=3, norm="group",
                                                       num_groups=2), 2),
        ("online(ac)", lambda: nl.OnlineNorm(C, ecm="ac"), 2),
        ("group(1)", lambda: nl.GroupNorm(C, 1), 2),
        ("double_threshold", lambda: nl.DoubleThreshold(C), 2),
    ]
    return out


def layer_inputs():
    for label, make, rank in variants():
        for train in (True, False):
            layer = make().train(train)
            name = type(layer).__name__
            area = "layer inputs"
            case = f"{label} {'train' if train else 'eval'}"
            shape = (2, C) + (3,) * (rank - 1)
            refused(area, f"{case}: list", name, lambda: layer([[1.0] * C] * 2), layer)
            refused(area, f"{case}: rank 1", name, lambda: layer(torch.randn(C)), layer)
            refused(area, f"{case}: scalar", name, lambda: layer(torch.randn(())), layer)
            refused(area, f"{case}: C+2", name,
                    lambda: layer(torch.randn(2, C + 2, *shape[2:])), layer)
            refused(area, f"{case}: int64", name,
                    lambda: layer(torch.ones(shape, dtype=torch.long)), layer)
            refused(area, f"{case}: bool", name,
                    lambda: layer(torch.ones(shape, dtype=torch.bool)), layer)
            refused(area, f"{case}: complex", name,
                    lambda: layer(torch.ones(shape, dtype=torch.complex64)), layer)
            if train and getattr(layer, "running_mean", None) is not None:
                one = (1, C) + (1,) * (rank - 2)
                if label.startswith(("batch", "sync", "switchable", "attentive")):
                    refused(area, f"{case}: one value per channel", name,
                            lambda: layer(torch.randn(one)), layer)
            if label.startswith("attentive") and train and "group" not in label:
                refused(area, f"{case}: N=1", name, lambda: layer(torch.randn(1, C, 3, 3)), layer)


def empty_and_meta():
    for label, make, rank in variants():
        for train in (True, False):
            layer = make().train(train)
            name = type(layer).__name__
            mode = "train" if train else "eval"
            shape = (0, C) + (3,) * (rank - 1)
            keys = ("running_mean", "running_var", "u", "v", "attention_running_mean",
                    "attention_running_var")
            accepted_or_refused("empty batch", f"{label} {mode}", name,
                                lambda: layer(torch.randn(shape)), layer, shape, keys)
            meta = make().to("meta").train(train)
            shape = (2, C) + (3,) * (rank - 1)
            accepted_or_refused("meta device", f"{label} {mode}", name,
                                lambda: meta(torch.empty(shape, device="meta")), meta, shape)


def other_layers():
    area = "recurrent, GHN, SELU inputs"
    for cls in (nl.BNLSTM, nl.InputBNLSTM, nl.LNLSTM):
        for train in (True, False):
            m = cls(3, 5, max_steps=4).train(train) if cls is not nl.LNLSTM else \
                cls(3, 5).train(train)
            name = cls.__name__
            case = f"{name} {'train' if train else 'eval'}"
            refused(area, f"{case}: list", name, lambda: m([[1.0] * 3]), m)
            refused(area, f"{case}: 2-D", name, lambda: m(torch.randn(2, 3)), m)
            refused(area, f"{case}: F=4", name, lambda: m(torch.randn(2, 2, 4)), m)
            refused(area, f"{case}: int", name, lambda: m(torch.ones(2, 2, 3, dtype=torch.long)),
                    m)
            refused(area, f"{case}: hx wrong", name,
                    lambda: m(torch.randn(2, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))),
                    m)
            if cls is nl.BNLSTM and train:
                refused(area, f"{case}: N=1", name, lambda: m(torch.randn(2, 1, 3)), m)
            refused(area, f"{case}: lengths > T", name,
                    lambda: m(torch.randn(2, 2, 3), lengths=[3, 1]), m)
            refused(area, f"{case}: float lengths", name,
                    lambda: m(torch.randn(2, 2, 3), lengths=torch.tensor([1.0, 2.0])), m)
            accepted_or_refused("empty batch", f"{case}", name,
                                lambda: m(torch.randn(2, 0, 3)), m, (2, 0, 5),
                                ("cell_norms.0.running_mean", "input_norms.0.running_mean"))
            meta = (cls(3, 5, max_steps=4) if cls is not nl.LNLSTM else cls(3, 5)).to(
                "meta").train(train)
            accepted_or_refused("meta device", case, name,
                                lambda: meta(torch.empty(2, 2, 3, device="meta")), meta, (2, 2, 5))
    for m, good in ((nl.GHNLinear(3, 5), (2, 3)), (nl.GHNConv2d(3, 5, 3), (2, 3, 6, 6))):
        name = type(m).__name__
        refused(area, f"{name}: list", name, lambda: m([1.0, 2.0, 3.0]), m)
        refused(area, f"{name}: scalar", name, lambda: m(torch.randn(())), m)
        refused(area, f"{name}: wrong features", name,
                lambda: m(torch.randn(*good[:-1], good[-1] + 1) if len(good) == 2 else
                          torch.randn(2, 4, 6, 6)), m)
        refused(area, f"{name}: int", name, lambda: m(torch.ones(good, dtype=torch.long)), m)
        refused(area, f"{name}: float64 into float32", name,
                lambda: m(torch.ones(good, dtype=torch.float64)), m)
    for m in (nl.SELU(), nl.AlphaDropout(0.1)):
        name = type(m).__name__
        refused(area, f"{name}: list", name, lambda: m([1.0, 2.0]), m)
        refused(area, f"{name}: int", name, lambda: m(torch.ones(3, dtype=torch.long)), m)
        refused(area, f"{name}: bool", name, lambda: m(torch.ones(3, dtype=torch.bool)), m)


# ----------------------------------------------------------------------- constructors

BAD_FLOATS = {"str": "x", "nan": math.nan, "inf": math.inf, "-1": -1.0, "None": None,
              "list": [1.0], "bool": True}


def _ctor_cases():
    """(class label, factory(**kw), argument, {label: (value, must_refuse)})."""
    def floats(allow_none=False, allow_neg=False, allow_inf=False):
        return {k: (v, not ((k == "None" and allow_none) or (k == "-1" and allow_neg)
                            or (k == "inf" and allow_inf)))
                for k, v in BAD_FLOATS.items()}

    cases = []
    for label, make, _ in variants():
        if label in ("double_threshold",):
            continue
        make = _with_kwargs(label)
        cls_kw = {"eps": floats(allow_none=label == "rms")}
        if label.startswith(("batch", "sync", "instance", "switchable", "attentive")):
            cls_kw["momentum"] = floats(allow_none=not label.startswith("batch_renorm"))
        cases.append((label, make, cls_kw))
    extra = {
        "batch_renorm": (lambda **k: nl.BatchRenorm(C, **k),
                         {"r_max": floats(allow_inf=True), "d_max": floats(allow_inf=True)}),
        "attentive": (lambda **k: nl.AttentiveNorm(C, **k),
                      {"attention_eps": floats(), "num_components": floats()}),
        "online": (lambda **k: nl.OnlineNorm(C, **k),
                   {"ls_eps": floats(), "alpha_fwd": floats(), "alpha_bkw": floats(),
                    "clamp_value": floats(allow_inf=True)}),
        "group": (lambda **k: nl.GroupNorm(C, **k), {"num_groups": floats()}),
        "batch(activation)": (lambda **k: nl.BatchNorm(C, activation="leaky_relu", **k),
                              {"negative_slope": floats(allow_neg=True)}),
        "selu": (lambda **k: nl.SELU(**k), {"alpha": floats(), "scale": floats()}),
        "alpha_dropout": (lambda **k: nl.AlphaDropout(**k),
                          {"p": floats(), "var": floats(), "mean": floats(allow_neg=True),
                           "alpha_prime": floats(allow_neg=True)}),
        "double_threshold": (lambda **k: nl.DoubleThreshold(C, **k),
                             {"alpha": floats(), "r_init": floats(allow_neg=True)}),
        "bnlstm": (lambda **k: nl.BNLSTM(3, 5, **k),
                   {"eps": floats(), "momentum": floats(allow_none=True),
                    "dropout": floats(), "max_steps": floats(allow_none=True)}),
        "lnlstm": (lambda **k: nl.LNLSTM(3, 5, **k), {"eps": floats(), "dropout": floats()}),
    }
    for label, (make, args) in extra.items():
        cases.append((label, make, args))
    return cases


def constructors():
    area = "constructor arguments"
    for label, make, args in _ctor_cases():
        for arg, values in args.items():
            for vlabel, (value, must) in values.items():
                def build(make=make, arg=arg, value=value):
                    return make(**{arg: value})

                probe = _probe_name(make)
                if probe is None:
                    continue
                if not must:
                    continue
                refused(area, f"{label}({arg}={vlabel})", probe, build, words=(arg,))
    for bad in ("4", 4.0, None, True):
        refused(area, f"create_norm('group', {bad!r})", "GroupNorm",
                lambda bad=bad: create_norm("group", bad), words=("num_channels",))
        refused(area, f"create_norm('bn', {bad!r})", "BatchNorm",
                lambda bad=bad: create_norm("bn", bad), words=("num_channels",))
    refused(area, "create_norm(3, 4)", "create_norm", lambda: create_norm(3, C))
    refused(area, "create_norm('nope', 4)", "create_norm", lambda: create_norm("nope", C))


def _with_kwargs(label):
    """A factory taking keywords for the variant called ``label``."""
    name, _, rest = label.partition("(")
    fixed = {"batch(save_memory)": {"save_memory": True}, "batch(relu)": {"activation": "relu"},
             "batch(momentum=None)": {}, "batch_renorm(paper)": {"warmup": "paper"},
             "instance(tracked)": {"track_running_stats": True},
             "switchable(no bn)": {"using_bn": False},
             "attentive(group)": {"norm": "group", "num_groups": 2},
             "online(ac)": {"ecm": "ac"}}.get(label, {})
    if label == "group(1)":
        return lambda **k: nl.GroupNorm(C, 1, **k)
    return lambda **k: create_norm(name, C, **fixed, **k)


def _probe_name(make):
    try:
        m = make()
    except Exception:  # noqa: BLE001
        return None
    return type(m).__name__


def functions():
    """weight_norm, ENorm and train(): public functions with arguments to check."""
    from normlab.train import train

    area = "weight norm, ENorm, train()"
    lin = torch.nn.Linear(3, 2)
    refused(area, "weight_norm(3)", "weight_norm", lambda: nl.weight_norm(3))
    refused(area, "weight_norm(dim='x')", "weight_norm", lambda: nl.weight_norm(lin, dim="x"),
            lin)
    refused(area, "weight_norm(dim=5)", "weight_norm", lambda: nl.weight_norm(lin, dim=5), lin)
    refused(area, "weight_norm(name='nope')", "weight_norm",
            lambda: nl.weight_norm(lin, name="nope"), lin)
    refused(area, "remove_weight_norm(plain)", "remove_weight_norm",
            lambda: nl.remove_weight_norm(lin), lin)
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    for c in (math.nan, "x", -1.0, 0.0, math.inf, True):
        refused(area, f"ENorm(c={c!r})", "ENorm", lambda c=c: nl.ENorm(mlp, c=c), mlp)
    refused(area, "ENorm(a conv net without hidden layers)", "ENorm",
            lambda: nl.ENorm(torch.nn.Sequential(torch.nn.Linear(3, 2))))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    for arg, value in (("batch_size", 0), ("lr", math.nan), ("lr", -0.1), ("steps", -5),
                       ("momentum", 2.0), ("weight_decay", -1.0), ("clip_grad_norm", -1.0),
                       ("eval_every", 0), ("warmup_steps", -3), ("batch_size", "8")):
        kw = {"steps": 2, "progress": False, arg: value}
        refused(area, f"train({arg}={value!r})", "train: ",
                lambda kw=kw: train(mlp, x, y, **kw), mlp, words=(arg,))


# ------------------------------------------------------------------------------- CLI

CLI_CASES = [
    ["--batch-size", "0"], ["--batch-size", "-3"], ["--lr", "-0.1"], ["--lr", "nan"],
    ["--lr", "inf"], ["--steps", "-5"], ["--steps", "0"], ["--weight-decay", "-1"],
    ["--clip", "-1"], ["--clip", "nan"], ["--eval-every", "0"], ["--warmup", "-3"],
    ["--momentum", "2"], ["--momentum", "-0.5"], ["--threads", "-2"], ["--dropout", "1.5"],
    ["--init-scale", "nan"], ["--width", "0"], ["--depth", "-1"],
    ["--norm-kw", "eps=abc"], ["--norm-kw", "bogus=1"], ["--norm-kw", "noequals"],
    ["--norm", "nope"], ["--model", "nope"], ["--data", "nope"], ["--device", "cuda"],
    ["--device", "banana"], ["--json", "/nonexistent-dir/r.json"], ["--save", "{tmp}"],
    ["--dist-timeout", "0"], ["--dist-timeout", "nan"],
]


def cli():
    area = "CLI"
    tmp = tempfile.mkdtemp()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    base = [sys.executable, "-m", "normlab", "train", "--data", "digits", "--steps", "2",
            "--no-progress"]
    cases = [(c, base + [a.format(tmp=tmp) for a in c]) for c in CLI_CASES]
    afile = os.path.join(tmp, "a-file")
    open(afile, "w").close()
    # /proc takes no new file even from root (a chmod-ed folder would not stop root).
    for out in (afile, "/proc/normlab-study"):
        cases.append((["study --out", out], [sys.executable, "-m", "normlab", "study",
                                             "--quick", "--no-grid", "--claims", "1",
                                             "--out", out]))
    for label, cmd in cases:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        err = p.stderr.strip().splitlines()
        opt = label[0].split()[-1]
        if p.returncode == 2 and len(err) == 1 and opt.lstrip("-").split("-")[0] in err[0]:
            record(area, " ".join(label), "clear")
        else:
            last = err[-1][:100] if err else ""
            record(area, " ".join(label), f"exit {p.returncode}: {last}")
    p = subprocess.run(base + ["--model", "mlp", "--lr", "1e30", "--momentum", "0"],
                       capture_output=True, text=True, env=env, timeout=300)
    record(area, "a diverged run (--lr 1e30)",
           "clear" if p.returncode == 3 and "DIVERGED" in p.stdout else f"exit {p.returncode}")


# ------------------------------------------------------------------ SyncBatchNorm, 2 ranks

SYNC_TIMEOUT_S = 3


def _sync_disagreements(rank, group, res):
    def attempt(key, fn):
        try:
            fn()
            res[key] = None
        except Exception as e:  # noqa: BLE001
            res[key] = (type(e).__name__, str(e))

    c = (4, 6)[rank]
    for key, make in (("SyncBatchNorm: channel counts 4 / 6", lambda: nl.SyncBatchNorm(c)),
                      ("BatchRenorm: channel counts 4 / 6", lambda: nl.BatchRenorm(c)),
                      ("SwitchableNorm: channel counts 4 / 6", lambda: nl.SwitchableNorm(c)),
                      ("AttentiveNorm: channel counts 4 / 6", lambda: nl.AttentiveNorm(c, 3))):
        m = nl.to_sync_batchnorm(torch.nn.Sequential(make()), process_group=group)[0].train()
        attempt(key, lambda m=m: m(torch.randn(3, c, 5)))
    dt = (torch.float32, torch.float64)[rank]
    m = nl.SyncBatchNorm(4, process_group=group, dtype=dt).train()
    attempt("SyncBatchNorm: dtypes float32 / float64", lambda: m(torch.randn(3, 4, 5, dtype=dt)))
    a, b = (nl.SyncBatchNorm(4, process_group=group).train() for _ in range(2))
    x = torch.randn(3, 4, 5)
    a(x)
    attempt("SyncBatchNorm: a call skipped on rank 1", lambda: (a if rank == 0 else b)(x))
    mask = torch.ones(3, 4, 5, dtype=torch.bool) if rank == 0 else None
    attempt("SyncBatchNorm: mask on rank 0 only", lambda: a(x, mask=mask))


def _sync_worker(rank, world, port, folder):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    short = datetime.timedelta(seconds=SYNC_TIMEOUT_S)
    groups = [dist.new_group([0, 1], timeout=short) for _ in range(5)]
    res = {}
    _sync_disagreements(rank, groups[0], res)
    # Cases that break their group (a timeout or a death): a fresh group each.
    skips = {
        "rank 1 in eval()": lambda m: m.train(rank == 0)(torch.randn(3, 4, 5)),
        "rank 1 never calls forward": lambda m: m(torch.randn(3, 4, 5)) if rank == 0 else None,
        "rank 1 gives 6 channels to SyncBatchNorm(4)":
            lambda m: m(torch.randn(3, 4 + 2 * rank, 5)),
    }
    for i, (key, fn) in enumerate(skips.items(), start=1):
        m = nl.SyncBatchNorm(4, process_group=groups[i]).train()
        start = time.monotonic()
        try:
            fn(m)
            res[key] = None
        except Exception as e:  # noqa: BLE001
            res[key] = (type(e).__name__, str(e), time.monotonic() - start)
        dist.barrier()
    if rank == 1:
        torch.save(res, os.path.join(folder, "rank1.pt"))
        os._exit(0)
    m = nl.SyncBatchNorm(4, process_group=groups[4]).train()
    try:
        m(torch.randn(3, 4, 5))
        res["rank 1 died"] = None
    except Exception as e:  # noqa: BLE001
        res["rank 1 died"] = (type(e).__name__, str(e), 0.0)
    torch.save(res, os.path.join(folder, "rank0.pt"))
    os._exit(0)


def sync():
    """SyncBatchNorm and the protocol layers across 2 gloo ranks: a case is clear when
    every rank that raised named the layer, the rank that waited did so for the
    group's timeout (not torch's 30 minutes), and no process aborted."""
    import socket

    import torch.multiprocessing as mp

    folder = tempfile.mkdtemp()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_sync_worker, args=(2, port, folder), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError("the ranks did not finish in 180 s")
    except Exception as e:  # noqa: BLE001 - a rank aborted (gloo's SIGABRT) or hung
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        return record("SyncBatchNorm, 2 gloo ranks", "the whole run",
                      f"unclear: {type(e).__name__}: {str(e)[:150]}")
    ranks = [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False)
             for r in range(2)]
    for key in ranks[0]:
        got = [r.get(key) for r in ranks]
        names = ("SyncBatchNorm", "BatchRenorm", "SwitchableNorm", "AttentiveNorm")
        raised = [g for g in got if g is not None]
        ok = raised and all(
            g[0] in ("ValueError", "RuntimeError") and g[1].split("(")[0] in names
            and (len(g) < 3 or g[2] < SYNC_TIMEOUT_S + 30) for g in raised)
        if key.startswith("rank 1") and key != "rank 1 gives 6 channels to SyncBatchNorm(4)":
            ok = ok and got[0] is not None  # the rank left waiting must fail
        elif key != "rank 1 gives 6 channels to SyncBatchNorm(4)":
            ok = ok and len(raised) == 2 and got[0][1].split(":", 1)[1] == got[1][1].split(
                ":", 1)[1]  # the same error on every rank
        else:
            ok = ok and len(raised) == 2
        record("SyncBatchNorm, 2 gloo ranks", key,
               "clear" if ok else f"{[g and g[:2] for g in got]}"[:200])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cli", action="store_true")
    ap.add_argument("--sync", action="store_true", help="SyncBatchNorm cases on 2 gloo ranks")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    layer_inputs()
    empty_and_meta()
    other_layers()
    constructors()
    functions()
    if args.cli:
        cli()
    if args.sync:
        sync()
    total = clear = 0
    print(f"| {'area':30s} | cases | clear |")
    print(f"|{'-' * 32}|-------|-------|")
    for area, rows in RESULTS.items():
        ok = sum(v == "clear" for _, v in rows)
        total += len(rows)
        clear += ok
        print(f"| {area:30s} | {len(rows):5d} | {ok:5d} |")
    print(f"| {'all':30s} | {total:5d} | {clear:5d} |")
    bad = [(a, c, v) for a, rows in RESULTS.items() for c, v in rows if v != "clear"]
    if bad:
        print(f"\n{len(bad)} case(s) without a clear answer:")
        for a, c, v in bad if args.verbose else bad[:60]:
            print(f"  [{a}] {c}: {v}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
