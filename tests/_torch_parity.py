"""torch's own curated test cases for its normalization layers and ops, run through
torch and through normlab's equivalent (issue 14).

The cases are torch's: every CPU float32/float64 sample that
``torch.testing._internal.common_modules.module_db`` (BatchNorm1d/2d/3d,
InstanceNorm1d/2d/3d, GroupNorm, LayerNorm, RMSNorm) and
``common_methods_invocations.op_db`` (their functional ops) generate, each also as a
channels_last copy (4-D and 5-D inputs) and a non-contiguous copy. Importing those
modules needs ``expecttest`` and changes global state (``torch.backends`` flags,
TorchScript call wrappers), so the samples are generated and saved by a subprocess.

Each case either agrees (outputs, input and parameter gradients, and buffers, after
two training steps and then in eval for training samples, within
``torch.testing.assert_close``'s default tolerances for the dtype), or is in
:data:`REFUSALS`: normlab raises the error named there, for the design reason given,
and leaves every parameter and buffer as it was.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

import normlab.functional as NF
from normlab import nn as nl

MODULES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d", "GroupNorm", "LayerNorm", "RMSNorm")
OPS = ("nn.functional.batch_norm", "nn.functional.instance_norm", "nn.functional.group_norm",
       "nn.functional.layer_norm", "nn.functional.rms_norm")
DTYPES = (torch.float32, torch.float64)
LAYOUTS = ("contiguous", "channels_last", "non_contiguous")

_GENERATE = r"""
import sys, torch
from torch.testing._internal.common_modules import module_db
from torch.testing._internal.common_methods_invocations import op_db
modules, ops = sys.argv[2].split(","), sys.argv[3].split(",")
out = []
for dtype in (torch.float32, torch.float64):
    torch.manual_seed(0)
    for info in module_db:
        name = info.module_cls.__name__
        if name not in modules:
            continue
        for training in (True, False):
            samples = info.module_inputs_func(info, device="cpu", dtype=dtype,
                                              requires_grad=True, training=training)
            for i, s in enumerate(samples):
                out.append(dict(kind="module", name=name, training=training, index=i,
                                desc=s.desc, dtype=dtype,
                                init=(list(s.constructor_input.args),
                                      dict(s.constructor_input.kwargs)),
                                args=list(s.forward_input.args),
                                kwargs=dict(s.forward_input.kwargs)))
    for info in op_db:
        if info.name not in ops:
            continue
        for i, s in enumerate(info.sample_inputs("cpu", dtype, requires_grad=True)):
            out.append(dict(kind="op", name=info.name, variant=info.variant_test_name,
                            index=i, dtype=dtype, input=s.input, args=list(s.args),
                            kwargs=dict(s.kwargs)))
torch.save(out, sys.argv[1])
"""


def generate_samples() -> list[dict]:
    """torch's samples, generated in a subprocess (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "samples.pt")
        subprocess.run([sys.executable, "-c", _GENERATE, path, ",".join(MODULES), ",".join(OPS)],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return torch.load(path, weights_only=False)


@dataclass(frozen=True)
class Case:
    sample: dict
    layout: str

    @property
    def id(self) -> str:
        s = self.sample
        dtype = str(s["dtype"]).replace("torch.", "")
        if s["kind"] == "module":
            mode = "train" if s["training"] else "eval"
            what = f"{s['name']}-{mode}-{s['index']}-{s['desc'] or 'default'}"
        else:
            variant = f"[{s['variant']}]" if s["variant"] else ""
            what = f"{s['name'].split('.')[-1]}{variant}-{s['index']}"
        return f"{what}-{dtype}-{self.layout}"

    @property
    def input(self) -> torch.Tensor:
        s = self.sample
        return s["args"][0] if s["kind"] == "module" else s["input"]


def cases(samples: list[dict]) -> list[Case]:
    """Every sample in every layout that applies to its input."""
    out = []
    for s in samples:
        x = s["args"][0] if s["kind"] == "module" else s["input"]
        for layout in LAYOUTS:
            if layout == "channels_last" and x.dim() not in (4, 5):
                continue
            if layout == "non_contiguous" and x.numel() < 2:
                continue  # nothing to stride: the contiguous case is the same tensor
            out.append(Case(s, layout))
    return out


def relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout, a fresh leaf with x's requires_grad."""
    x = x.detach()
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        y = x.contiguous(memory_format=fmt)
    elif layout == "non_contiguous":
        # every other element of a tensor twice as long in the last dimension
        y = torch.stack((x, torch.full_like(x, float("nan"))), -1).flatten(-2)[..., ::2]
        assert not y.is_contiguous() or y.numel() < 2
    else:
        y = x.clone()
    return y.requires_grad_(True)


# ------------------------------------------------------------------ refusals by design

#: (predicate on the case, exception type, message pattern, the design reason).
REFUSALS = [
    (lambda c: c.sample["kind"] == "module" and c.sample["name"].startswith("InstanceNorm")
     and "no_batch_dim" in c.sample["desc"],
     ValueError, r"^InstanceNorm\(3\): expected (input of shape \(N, C, \*\) with at least 3 "
                 r"dimensions|3 channels in dimension 1)",
     "normlab's layers are batch-first: one InstanceNorm class serves every rank, so an "
     "unbatched (C, *) input cannot be told from a batched one, and is refused"),
    (lambda c: c.sample["kind"] == "op" and c.input.dim() < 2
     and c.sample["name"] in ("nn.functional.batch_norm", "nn.functional.instance_norm",
                              "nn.functional.group_norm"),
     ValueError, r"expected input of shape \(N, C, \*\) with at least 2 dimensions",
     "normlab's channel-first functions are batch-first (N, C, *)"),
    (lambda c: c.sample["kind"] == "op" and (c.sample["kwargs"].get("eps") or 0) < 0,
     ValueError, r"eps must be >= 0",
     "a negative eps is refused (torch computes rsqrt(var + eps), NaN below -var)"),
]


def refusal(case: Case):
    for predicate, error, pattern, reason in REFUSALS:
        if predicate(case):
            return error, pattern, reason
    return None


# ------------------------------------------------------------------ normlab's equivalents


def normlab_module(name: str, args: list, kwargs: dict, dtype) -> torch.nn.Module:
    """normlab's layer for ``torch.nn.<name>(*args, **kwargs)``: the same arguments,
    except GroupNorm's first two (torch: num_groups, num_channels; normlab: the channel
    count first, timm's convention)."""
    if name.startswith("BatchNorm"):
        layer = nl.BatchNorm(*args, **kwargs)
    elif name.startswith("InstanceNorm"):
        layer = nl.InstanceNorm(*args, **kwargs)
    elif name == "GroupNorm":
        groups, channels, *rest = args
        layer = nl.GroupNorm(channels, groups, *rest, **kwargs)
    else:
        layer = getattr(nl, name)(*args, **kwargs)
    return layer.to(dtype)


def normlab_op(name: str):
    """normlab's function for torch's op ``name``, as ``f(x, *args, **kwargs)`` taking
    torch's arguments (layer_norm and rms_norm take normalized_shape as a keyword in
    normlab, their second positional argument being the weight)."""
    if name == "nn.functional.layer_norm":
        return lambda x, shape, *a, **k: NF.layer_norm(x, *a, normalized_shape=shape, **k)
    if name == "nn.functional.rms_norm":
        return lambda x, shape, *a, **k: NF.rms_norm(x, *a, normalized_shape=shape, **k)
    return getattr(NF, name.split(".")[-1])


def torch_op(name: str):
    return getattr(torch.nn.functional, name.split(".")[-1])


# ------------------------------------------------------------------ running one case


def _close(actual, expected, what: str) -> None:
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: {actual} vs {expected}"
        return
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}")


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _randomize_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial parameters and running statistics (torch's samples start at 1 and 0,
    which would hide a mixed-up weight and bias)."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
            t.copy_(r + 0.5 if "var" in name or "weight" in name else 2 * r - 1)


def _grads(out, inputs, grad_out):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    if not wanted or not out.requires_grad:
        return [None] * len(wanted)
    return list(torch.autograd.grad(out, wanted, grad_out, allow_unused=True))


def run_module_case(case: Case) -> None:
    """Assert that torch's layer and normlab's agree on this sample (see the module
    docstring), or raise what normlab raises."""
    s = case.sample
    args, kwargs = s["init"]
    theirs = getattr(torch.nn, s["name"])(*args, **kwargs).to(s["dtype"])
    gen = torch.Generator().manual_seed(s["index"])
    _randomize_(theirs, gen)
    ours = normlab_module(s["name"], args, kwargs, s["dtype"])
    ours.load_state_dict(theirs.state_dict())  # strict: the same keys and shapes
    steps = 2 if s["training"] else 1
    for step in range(steps):
        theirs.train(s["training"])
        ours.train(s["training"])
        x = case.input.detach() * (1 + step) + step  # a different batch each step
        _compare_modules(theirs, ours, x, case.layout, f"step {step + 1}", gen)
    if s["training"]:
        theirs.eval()
        ours.eval()
        _compare_modules(theirs, ours, case.input.detach(), case.layout, "eval after training",
                         gen)


def _compare_modules(theirs, ours, x, layout, when, gen) -> None:
    xt, xo = relayout(x, layout), relayout(x, layout)
    before = _state(ours)
    try:
        yo = ours(xo)
    except Exception:
        for k, v in ours.state_dict().items():  # a refused call changes nothing
            assert torch.equal(v, before[k]), f"{k} changed by a refused call"
        raise
    yt = theirs(xt)
    _close(yo, yt, f"{when}: output")
    g = torch.rand(yt.shape, generator=gen, dtype=torch.float64).to(yt.dtype) * 2 - 1
    params_t = [p for _, p in sorted(theirs.named_parameters())]
    params_o = [p for _, p in sorted(ours.named_parameters())]
    for gt, go, what in zip(_grads(yt, [xt, *params_t], g), _grads(yo, [xo, *params_o], g),
                            ["input", *sorted(dict(theirs.named_parameters()))], strict=True):
        _close(go, gt, f"{when}: gradient of {what}")
    for k, v in theirs.state_dict().items():
        _close(ours.state_dict()[k], v, f"{when}: {k}")


def run_op_case(case: Case) -> None:
    """Assert that torch's op and normlab's agree on this sample: output, gradients of
    every input that requires one, running statistics updated in place."""
    s = case.sample

    def fresh(v):
        return v.detach().clone().requires_grad_(v.requires_grad) \
            if isinstance(v, torch.Tensor) else v

    x = case.input
    xt, xo = (relayout(x, case.layout).requires_grad_(x.requires_grad) for _ in range(2))
    at, ao = [fresh(a) for a in s["args"]], [fresh(a) for a in s["args"]]
    kt = {k: fresh(v) for k, v in s["kwargs"].items()}
    ko = {k: fresh(v) for k, v in s["kwargs"].items()}
    before = [t.clone() for t in (*ao, *ko.values()) if isinstance(t, torch.Tensor)]
    try:
        yo = normlab_op(s["name"])(xo, *ao, **ko)
    except Exception:
        after = [t for t in (*ao, *ko.values()) if isinstance(t, torch.Tensor)]
        assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
        raise
    yt = torch_op(s["name"])(xt, *at, **kt)
    _close(yo, yt, "output")
    tensors_t = [xt, *at, *kt.values()]
    tensors_o = [xo, *ao, *ko.values()]
    floats_t = [t for t in tensors_t if isinstance(t, torch.Tensor)]
    floats_o = [t for t in tensors_o if isinstance(t, torch.Tensor)]
    gen = torch.Generator().manual_seed(s["index"])
    g = torch.rand(yt.shape, generator=gen, dtype=torch.float64).to(yt.dtype) * 2 - 1
    for i, (gt, go) in enumerate(zip(_grads(yt, floats_t, g), _grads(yo, floats_o, g),
                                     strict=True)):
        _close(go, gt, f"gradient of tensor argument {i}")
    for i, (t, o) in enumerate(zip(floats_t, floats_o, strict=True)):
        _close(o.detach(), t.detach(), f"tensor argument {i} after the call (running stats)")


def run_case(case: Case) -> None:
    (run_module_case if case.sample["kind"] == "module" else run_op_case)(case)


def outcome(case: Case) -> str:
    """``"agree"``, ``"refused"`` (as :data:`REFUSALS` says) or ``"disagree: ..."``."""
    expected = refusal(case)
    try:
        run_case(case)
    except Exception as err:  # noqa: BLE001 - every failure is classified
        if expected is not None and isinstance(err, expected[0]) \
                and re.search(expected[1], str(err)):
            return "refused"
        return f"disagree: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return "agree" if expected is None else "disagree: accepted a case listed as refused"


def table(samples: list[dict]) -> dict:
    """``{(kind, name): {"cases", "agree", "refused", "disagree"}}`` over every case."""
    counts: dict = {}
    for case in cases(samples):
        key = (case.sample["kind"], case.sample["name"])
        row = counts.setdefault(key, {"cases": 0, "agree": 0, "refused": 0, "disagree": 0})
        result = outcome(case)
        row["cases"] += 1
        row[result.split(":")[0]] += 1
    return counts


__all__ = ["generate_samples", "cases", "run_case", "refusal", "outcome", "table"]
