"""Speed and memory of every normlab activation-normalization layer against its peers.

For each *cell* (layer, shape, dtype, layout, mode, pass) every implementation of the
layer is timed in the same run, interleaved (a shuffled order in every round, so
drift in the machine's load reaches all of them alike), warm-up calls excluded, and
the median kept:

* ``normlab``: the layer as users build it (``normlab.nn.X(C)``, default path);
* ``normlab-reference``: the composite over :mod:`normlab.stats` (``path="reference"``),
  the default path before native dispatch;
* ``normlab-fused`` / ``normlab-save-memory``: the fused C++ kernels of
  :mod:`normlab.kernels` (their one-off compile is timed separately);
* ``torch``: torch.nn's layer of the same math, where one exists;
* ``composite``: the straightforward eager implementation (mean, var, arithmetic);
* ``loop``: Online Norm's per-sample loop (forward and the paper's backward);
* ``copy``: a copy of a tensor of the same size, dtype and layout, whose bandwidth is
  the floor a memory-bound layer is measured against.

``fwd`` in train mode runs with autograd recording (the forward half of a training
step); in eval mode under ``torch.no_grad()`` (inference). ``fwd+bwd`` adds
``y.backward(g)``. ``gbps`` counts the bytes a layer must move at least (fwd: read x,
write y; fwd+bwd: also read g and x, write dx) over its median time.
``peak_saved_bytes`` is the activation memory a training step keeps: the bytes of
the distinct storages autograd saves for backward during the forward, counted with
``torch.autograd.graph.saved_tensors_hooks`` (deterministic; parameters included).

``python -m normlab bench --quick`` runs in about a minute; see docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn as tnn

import normlab
from normlab import functional as NF
from normlab import nn as nl

__all__ = ["run", "BenchResult", "LAYERS", "DEFAULT_SHAPES", "QUICK_SHAPES", "saved_bytes",
           "main_table", "summary_table", "measure_comparisons"]

DEFAULT_SHAPES = [(32, 64, 32, 32), (8, 256, 16, 16), (2, 64, 56, 56), (1, 64, 32, 32)]
QUICK_SHAPES = [(32, 64, 16, 16)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")
EPS = 1e-5

Impl = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------- composites


def _dims(x: Tensor, first: int = 0) -> tuple[int, ...]:
    return (first,) + tuple(range(2, x.dim())) if first == 0 else tuple(range(first, x.dim()))


def _ch(t: Tensor, x: Tensor) -> Tensor:
    return t.view((1, -1) + (1,) * (x.dim() - 2))


class _Composite(tnn.Module):
    """Straightforward eager implementations: mean, var, arithmetic (float32 math)."""

    def __init__(self, kind: str, c: int, groups: int = 32, k: int = 10):
        super().__init__()
        self.kind = kind
        self.weight = tnn.Parameter(torch.ones(c))
        self.bias = tnn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.groups = groups
        if kind == "switchable":
            self.mean_logits = tnn.Parameter(torch.ones(3))
            self.var_logits = tnn.Parameter(torch.ones(3))
        if kind == "attentive":
            self.gamma = tnn.Parameter(torch.randn(k, c) * 0.1 + 1)
            self.beta = tnn.Parameter(torch.randn(k, c) * 0.1)
            self.proj = tnn.Parameter(torch.randn(k, c) * (2 / c) ** 0.5)
            self.att_bn = tnn.BatchNorm1d(k)

    def _stats(self, x: Tensor, dims) -> tuple[Tensor, Tensor]:
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        return mean, var

    def _batch(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training:
            return _ch(self.running_mean, x), _ch(self.running_var, x)
        mean, var = self._stats(x, _dims(x))
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            self.running_mean.lerp_(mean.flatten(), 0.1)
            self.running_var.lerp_(var.flatten() * n / max(n - 1, 1), 0.1)
        return mean, var

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        w, b = _ch(self.weight, x), _ch(self.bias, x)
        kind = self.kind
        if kind == "batch":
            mean, var = self._batch(x)
        elif kind == "batch_renorm":
            rm, rv = _ch(self.running_mean, x), _ch(self.running_var, x)
            if not self.training:
                mean, var = rm, rv
            else:
                mean, var = self._stats(x, _dims(x))
                with torch.no_grad():
                    sigma = torch.sqrt(rv + EPS)
                    r = (torch.sqrt(var + EPS) / sigma).clamp(1 / 3, 3)
                    d = ((mean - rm) / sigma).clamp(-5, 5)
                    self.running_mean.lerp_(mean.flatten(), 0.1)
                    self.running_var.lerp_(var.flatten(), 0.1)
                y = (x - mean) / torch.sqrt(var + EPS) * r + d
                return (y * w + b).to(dtype)
        elif kind == "layer":
            mean, var = self._stats(x, _dims(x, 1))
        elif kind == "channel_layer":
            mean, var = self._stats(x, (1,))
        elif kind == "rms":
            y = x * torch.rsqrt((x * x).mean(_dims(x, 1), keepdim=True) + EPS)
            return (y * w).to(dtype)
        elif kind == "instance":
            mean, var = self._stats(x, _dims(x, 2))
            return ((x - mean) / torch.sqrt(var + EPS)).to(dtype)
        elif kind == "group":
            n, c = x.shape[:2]
            xg = x.reshape(n, self.groups, -1)
            mean, var = self._stats(xg, (2,))
            y = ((xg - mean) / torch.sqrt(var + EPS)).reshape(x.shape)
            return (y * w + b).to(dtype)
        elif kind == "switchable":
            terms = [self._stats(x, _dims(x, 2)), self._stats(x, _dims(x, 1)), self._batch(x)]
            wm = torch.softmax(self.mean_logits, 0)
            wv = torch.softmax(self.var_logits, 0)
            mean = sum(wm[i] * terms[i][0] for i in range(3))
            var = sum(wv[i] * terms[i][1] for i in range(3))
        elif kind == "attentive":
            mean, var = self._batch(x)
            xhat = (x - mean) / torch.sqrt(var + EPS)
            im, iv = self._stats(x, _dims(x, 2))
            s = (im / torch.sqrt(iv + 1e-3)).flatten(1)
            lam = F.hardsigmoid(self.att_bn(s @ self.proj.t()))
            per_sample = (x.shape[0], -1) + (1,) * (x.dim() - 2)
            gamma, beta = (lam @ self.gamma).view(per_sample), (lam @ self.beta).view(per_sample)
            return (xhat * gamma + beta).to(dtype)
        else:
            raise ValueError(kind)
        return ((x - mean) / torch.sqrt(var + EPS) * w + b).to(dtype)


class _OnlineNormLoop(torch.autograd.Function):
    """Online Norm one sample at a time (Chiley et al. 2019, Alg. 1 and 2): the
    forward updates the streaming statistics after each sample, the backward runs the
    u, v error controllers sample by sample."""

    @staticmethod
    def forward(ctx, x, state, af, ab, eps):
        mu, var, u, v = state
        n, c = x.shape[:2]
        xr = x.float().reshape(n, c, -1)
        ys, scales = [], []
        for t in range(n):
            xt = xr[t]
            m = xt.mean(1)
            s2 = ((xt - m[:, None]) ** 2).mean(1)
            scale = torch.sqrt(var + eps)
            ys.append((xt - mu[:, None]) / scale[:, None])
            scales.append(scale)
            var.copy_(af * var + (1 - af) * s2 + af * (1 - af) * (m - mu) ** 2)
            mu.add_((1 - af) * (m - mu))
        y = torch.stack(ys)
        ctx.save_for_backward(y, torch.stack(scales))
        ctx.state, ctx.ab, ctx.shape = (u, v), ab, x.shape
        return y.reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, scales = ctx.saved_tensors
        u, v = ctx.state
        n, c = ctx.shape[:2]
        g = grad.float().reshape(n, c, -1)
        k = 1 - ctx.ab
        dx = torch.empty_like(g)
        for t in range(n):
            gp = g[t] - k * v[:, None] * y[t]
            v.add_((gp * y[t]).mean(1))
            dx[t] = gp / scales[t][:, None] - k * u[:, None]
            u.add_(dx[t].mean(1))
        return dx.reshape(ctx.shape).to(grad.dtype), None, None, None, None


class _OnlineLoop(tnn.Module):
    """The per-sample loop with OnlineNorm's defaults: affine, then layer scaling."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = tnn.Parameter(torch.ones(c))
        self.bias = tnn.Parameter(torch.zeros(c))
        self.state = (torch.zeros(c), torch.ones(c), torch.zeros(c), torch.zeros(c))

    def forward(self, x: Tensor) -> Tensor:
        y = _OnlineNormLoop.apply(x, self.state, 0.999, 0.99, EPS)
        y = y * _ch(self.weight, y).to(y.dtype) + _ch(self.bias, y).to(y.dtype)
        yf = y.float()
        return (yf * torch.rsqrt((yf * yf).mean(_dims(yf, 1), keepdim=True) + EPS)).to(x.dtype)


class _Functional(tnn.Module):
    """A normlab functional call with ``path="reference"`` and its own parameters."""

    def __init__(self, kind: str, c: int):
        super().__init__()
        self.kind = kind
        self.weight = tnn.Parameter(torch.ones(c))
        self.bias = tnn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: Tensor) -> Tensor:
        k, w, b = self.kind, self.weight, self.bias
        if k == "batch":
            return NF.batch_norm(x, self.running_mean, self.running_var, w, b, self.training,
                                0.1, EPS, path="reference")
        if k == "layer":
            return NF.layer_norm(x, w, b, EPS, path="reference")
        if k == "channel_layer":
            return NF.channel_layer_norm(x, w, b, EPS, path="reference")
        if k == "instance":
            return NF.instance_norm(x, None, None, None, None, True, 0.1, EPS, path="reference")
        if k == "group":
            return NF.group_norm(x, 32, w, b, EPS, path="reference")
        raise ValueError(k)


class _ChannelsLastLN(tnn.Module):
    """timm's LayerNorm2d: C moved last, torch.nn.LayerNorm(C), moved back."""

    def __init__(self, c: int):
        super().__init__()
        self.ln = tnn.LayerNorm(c, eps=EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _BNActTorch(tnn.Sequential):
    def __init__(self, c: int):
        super().__init__(tnn.BatchNorm2d(c), tnn.LeakyReLU(0.01))


def _bn_act(c: int, **kw) -> tnn.Module:
    return nl.BatchNorm(c, activation="leaky_relu", **kw)


# ----------------------------------------------------------------------------- the layers


@dataclass
class LayerSpec:
    """One benchmarked layer: how to build each implementation for C channels and an
    input shape, and whether eval differs from train."""

    name: str
    impls: dict[str, Callable[[int, tuple[int, ...]], tnn.Module]]
    has_eval: bool = True
    train_only_impls: tuple[str, ...] = ()
    needs_kernels: tuple[str, ...] = ()
    note: str = ""


def _torch_in(c, shape):
    return tnn.InstanceNorm2d(c) if len(shape) == 4 else tnn.InstanceNorm1d(c)


def _torch_bn(c, shape):
    return {2: tnn.BatchNorm1d, 3: tnn.BatchNorm1d, 4: tnn.BatchNorm2d,
            5: tnn.BatchNorm3d}[len(shape)](c)


LAYERS: dict[str, LayerSpec] = {
    spec.name: spec
    for spec in [
        LayerSpec("BatchNorm", {
            "normlab": lambda c, s: nl.BatchNorm(c),
            "normlab-fused": lambda c, s: nl.BatchNorm(c, fused=True),
            "normlab-reference": lambda c, s: _Functional("batch", c),
            "torch": _torch_bn,
            "composite": lambda c, s: _Composite("batch", c),
        }, train_only_impls=("normlab-fused",), needs_kernels=("normlab-fused",)),
        LayerSpec("BatchNorm+LeakyReLU", {
            "normlab": lambda c, s: _bn_act(c),
            "normlab-fused": lambda c, s: _bn_act(c, fused=True),
            "normlab-save-memory": lambda c, s: _bn_act(c, fused=True, save_memory=True),
            "torch": lambda c, s: _BNActTorch(c),
        }, train_only_impls=("normlab-fused", "normlab-save-memory"),
            needs_kernels=("normlab-fused", "normlab-save-memory")),
        LayerSpec("BatchRenorm", {
            "normlab": lambda c, s: nl.BatchRenorm(c),
            "composite": lambda c, s: _Composite("batch_renorm", c),
        }),
        LayerSpec("LayerNorm", {
            "normlab": lambda c, s: nl.LayerNorm(c, layout="channels_first"),
            "normlab-fused": lambda c, s: nl.LayerNorm(c, fused=True, layout="channels_first"),
            "normlab-reference": lambda c, s: _Functional("layer", c),
            "torch": lambda c, s: tnn.LayerNorm(s[1:], eps=EPS),
            "composite": lambda c, s: _Composite("layer", c),
        }, has_eval=False, needs_kernels=("normlab-fused",),
            note="torch: nn.LayerNorm(x.shape[1:]) (elementwise affine)"),
        LayerSpec("ChannelLayerNorm", {
            "normlab": lambda c, s: nl.ChannelLayerNorm(c),
            "normlab-reference": lambda c, s: _Functional("channel_layer", c),
            "torch": lambda c, s: _ChannelsLastLN(c),
            "composite": lambda c, s: _Composite("channel_layer", c),
        }, has_eval=False, note="torch: permute, nn.LayerNorm(C), permute (timm)"),
        LayerSpec("RMSNorm", {
            "normlab": lambda c, s: nl.RMSNorm(c, eps=EPS, layout="channels_first"),
            "torch": lambda c, s: tnn.RMSNorm(s[1:], eps=EPS),
            "composite": lambda c, s: _Composite("rms", c),
        }, has_eval=False),
        LayerSpec("InstanceNorm", {
            "normlab": lambda c, s: nl.InstanceNorm(c),
            "normlab-reference": lambda c, s: _Functional("instance", c),
            "torch": _torch_in,
            "composite": lambda c, s: _Composite("instance", c),
        }, has_eval=False),
        LayerSpec("GroupNorm", {
            "normlab": lambda c, s: nl.GroupNorm(c, 32),
            "normlab-fused": lambda c, s: nl.GroupNorm(c, 32, fused=True),
            "normlab-reference": lambda c, s: _Functional("group", c),
            "torch": lambda c, s: tnn.GroupNorm(32, c, eps=EPS),
            "composite": lambda c, s: _Composite("group", c),
        }, has_eval=False, needs_kernels=("normlab-fused",)),
        LayerSpec("SwitchableNorm", {
            "normlab": lambda c, s: nl.SwitchableNorm(c),
            "composite": lambda c, s: _Composite("switchable", c),
        }),
        LayerSpec("AttentiveNorm", {
            "normlab": lambda c, s: nl.AttentiveNorm(c),
            "composite": lambda c, s: _Composite("attentive", c),
        }),
        LayerSpec("OnlineNorm", {
            "normlab": lambda c, s: nl.OnlineNorm(c),
            "loop": lambda c, s: _OnlineLoop(c),
        }),
        LayerSpec("SELU", {
            "normlab": lambda c, s: nl.SELU(),
            "torch": lambda c, s: tnn.SELU(),
        }, has_eval=False),
    ]
}


# ----------------------------------------------------------------------------- measuring


def saved_bytes(forward: Callable[[], Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``forward()``
    runs (the activation memory a training step keeps until its backward)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def _bytes_moved(numel: int, itemsize: int, pass_: str) -> int:
    return numel * itemsize * (2 if pass_ == "fwd" else 5)


def _make_input(shape, dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
        g = g.contiguous(memory_format=fmt)
    return x, g


def _callable(module: tnn.Module, x: Tensor, g: Tensor, mode: str, pass_: str):
    module.train(mode == "train")
    if pass_ == "fwd" and mode == "eval":
        def run():
            with torch.no_grad():
                module(x)
        return run, None
    xr = x.detach().clone().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]

    if pass_ == "fwd":
        def run():
            module(xr)
        return run, None

    def run():
        xr.grad = None
        for p in params:
            p.grad = None
        module(xr).backward(g)

    def forward_only():
        return module(xr)

    return run, forward_only


def _time(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, clock: str):
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(warmup):
            f()
    names = list(fns)
    for _ in range(repeats):
        random.shuffle(names)
        for k in names:
            w0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            c1, w1 = time.process_time(), time.perf_counter()
            wall[k].append((w1 - w0) * 1e3)
            cpu[k].append((c1 - c0) * 1e3)
    return ({k: statistics.median(v) for k, v in wall.items()},
            {k: statistics.median(v) for k, v in cpu.items()})


@dataclass
class BenchResult:
    """What :func:`run` measured: ``records`` (one dict per implementation and cell),
    ``comparisons`` (:func:`measure_comparisons`) and ``meta``."""

    records: list[dict]
    comparisons: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def to_json(self, path: str) -> None:
        """Write the records (a JSON list)."""
        with open(path, "w") as f:
            json.dump(self.records, f, indent=1)

    def to_markdown(self) -> str:
        return _markdown(self)


def _machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "normlab": normlab.__version__, "python": platform.python_version(),
            "load_avg_1min": load}


def _kernels_build() -> dict:
    """Load (compiling if needed) the fused kernels; the compile time, separately."""
    from normlab import kernels

    t0 = time.perf_counter()
    try:
        kernels.load_library()
    except kernels.KernelBuildError as e:
        return {"available": False, "error": str(e)[:500]}
    return {"available": True, "load_or_compile_s": round(time.perf_counter() - t0, 2)}


def run(
    layers: Sequence[str] | None = None,
    shapes: Sequence[tuple[int, ...]] | None = None,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    layouts: Sequence[str] = LAYOUTS,
    modes: Sequence[str] = ("train", "eval"),
    passes: Sequence[str] = ("fwd", "fwd+bwd"),
    repeats: int = 15,
    warmup: int = 2,
    threads: int = 1,
    clock: str | None = None,
    comparisons: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Benchmark the layers; see the module docstring for what is measured.

    Args:
        layers: names from :data:`LAYERS` (default: all).
        shapes: input shapes ``(N, C, *)`` (default :data:`DEFAULT_SHAPES`).
        dtypes, layouts, modes, passes: the grid (``layouts``: "nchw",
            "channels_last"; channels_last only for 4-d and 5-d shapes).
        repeats: timed calls per implementation and cell (median kept).
        warmup: untimed calls first.
        threads: torch intra-op threads (``torch.set_num_threads``); the fused
            kernels use the same number.
        clock: "cpu" (process CPU time: on a shared machine it leaves out the time
            other processes hold the cores) or "wall"; default "cpu" with one thread,
            else "wall".
        comparisons: also measure the head-to-head comparisons
            (:func:`measure_comparisons`).
    """
    torch.manual_seed(seed)
    random.seed(seed)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    clock = clock or ("cpu" if threads == 1 else "wall")
    if clock not in ("cpu", "wall"):
        raise ValueError(f"normlab.bench: clock must be 'cpu' or 'wall', got {clock!r}")
    names = list(LAYERS) if layers is None else list(layers)
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        raise ValueError(f"normlab.bench: unknown layers {unknown}; known: {list(LAYERS)}")
    shapes = [tuple(s) for s in (shapes or DEFAULT_SHAPES)]
    for s in shapes:
        if len(s) < 2:
            raise ValueError(f"normlab.bench: shapes must be (N, C, *), got {s}")
    meta = {"machine": _machine(), "threads": threads, "clock": clock, "repeats": repeats,
            "warmup": warmup}
    if any(LAYERS[n].needs_kernels for n in names) or comparisons:
        meta["kernels"] = _kernels_build()
    say = progress or (lambda s: None)
    records: list[dict] = []
    try:
        for name in names:
            spec = LAYERS[name]
            for shape in shapes:
                for dt in dtypes:
                    for layout in layouts:
                        if layout == "channels_last" and len(shape) not in (4, 5):
                            continue
                        for mode in modes:
                            if mode == "eval" and not spec.has_eval:
                                continue
                            for pass_ in passes:
                                records += _cell(spec, shape, dt, layout, mode, pass_,
                                                 repeats, warmup, clock, meta, seed)
                say(f"{name} {'x'.join(map(str, shape))} done ({len(records)} records)")
        result = BenchResult(records, [], meta)
        if comparisons:
            result.comparisons = measure_comparisons(repeats=repeats, warmup=warmup, clock=clock,
                                             records=records, progress=say)
        return result
    finally:
        torch.set_num_threads(old_threads)


def _cell(spec, shape, dt, layout, mode, pass_, repeats, warmup, clock, meta, seed):
    dtype = DTYPES[dt]
    c = shape[1]
    x, g = _make_input(shape, dtype, layout, seed)
    kernels_ok = meta.get("kernels", {}).get("available", False)
    fns, forwards, errors = {}, {}, {}
    for impl, make in spec.impls.items():
        if mode == "eval" and impl in spec.train_only_impls:
            continue
        if impl in spec.needs_kernels and not kernels_ok:
            errors[impl] = "kernels not available"
            continue
        try:
            torch.manual_seed(seed)
            module = make(c, shape)
            fn, fwd = _callable(module, x, g, mode, pass_)
            fn()  # fails here, if it fails
            fns[impl], forwards[impl] = fn, fwd
        except Exception as e:  # a peer that cannot run this cell is reported, not fatal
            errors[impl] = f"{type(e).__name__}: {e}"[:300]
    copy_dst = torch.empty_like(x)
    fns["copy"] = lambda: copy_dst.copy_(x)
    wall, cpu = _time(fns, repeats, warmup, clock)
    chosen = cpu if clock == "cpu" else wall
    moved = _bytes_moved(x.numel(), x.element_size(), pass_)
    copy_bytes = 2 * x.numel() * x.element_size()
    base = {"layer": spec.name, "shape": list(shape), "dtype": dt, "layout": layout,
            "mode": mode, "pass": pass_, "threads": torch.get_num_threads(), "clock": clock}
    torch_ms = chosen.get("torch")
    out = []
    for impl in list(fns) + list(errors):
        ms = chosen.get(impl)
        rec = dict(base, impl=impl, median_ms=None if ms is None else round(ms, 6),
                   median_wall_ms=None if impl not in wall else round(wall[impl], 6),
                   median_cpu_ms=None if impl not in cpu else round(cpu[impl], 6),
                   repeats=repeats, ratio_to_torch=None, ratio_to_copy=None, gbps=None,
                   peak_saved_bytes=None, error=errors.get(impl))
        if ms is not None and ms > 0:
            b = copy_bytes if impl == "copy" else moved
            rec["gbps"] = round(b / (ms * 1e-3) / 1e9, 6)
            rec["ratio_to_copy"] = round(chosen["copy"] / ms, 4)
            if torch_ms is not None and impl != "copy":
                rec["ratio_to_torch"] = round(torch_ms / ms, 4)
        if forwards.get(impl) is not None:
            rec["peak_saved_bytes"] = saved_bytes(forwards[impl])
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- comparisons
#
# Head-to-head timings beyond the grid of cells, each a ratio "peer's time over
# normlab's" (> 1: normlab faster) or, for memory, "peer's bytes over normlab's". They
# say nothing of what a ratio should be: the targets an issue set for them, and the
# verdict against those, are the benchmark script's (scripts/bench_targets.py).


def _pair(make_a, make_b, shape, mode, pass_, repeats, warmup, clock, dtype="float32",
          layout="nchw"):
    """Time two module factories on one cell, interleaved; returns (ms_a, ms_b)."""
    x, g = _make_input(shape, DTYPES[dtype], layout)
    fa, _ = _callable(make_a(shape[1], shape), x, g, mode, pass_)
    fb, _ = _callable(make_b(shape[1], shape), x, g, mode, pass_)
    wall, cpu = _time({"a": fa, "b": fb}, repeats, warmup, clock)
    t = cpu if clock == "cpu" else wall
    return t["a"], t["b"]


def _default_path_comparisons(records, repeats, warmup, clock) -> list[dict]:
    """The worst ratio to torch.nn of each default path over the records, and that cell
    measured again with three times the repeats next to a second instance of torch's
    layer ("torch-again", the same code): its ratio is the noise of one cell."""
    out = []
    for layer in ("BatchNorm", "GroupNorm", "LayerNorm", "InstanceNorm"):
        mine = [r for r in records if r["layer"] == layer and r["impl"] == "normlab"
                and r["ratio_to_torch"] is not None]
        if not mine:
            continue
        worst = min(mine, key=lambda r: r["ratio_to_torch"])
        below = sum(r["ratio_to_torch"] < 0.95 for r in mine)
        detail = (f"{len(mine)} cells, {below} below 0.95, median "
                  f"{statistics.median(r['ratio_to_torch'] for r in mine):.2f}; worst "
                  f"{worst['shape']} {worst['dtype']} {worst['layout']} {worst['mode']} "
                  f"{worst['pass']}")
        spec = LAYERS[layer]
        again = replace(spec, impls={**spec.impls, "torch-again": spec.impls["torch"]})
        recheck = _cell(again, tuple(worst["shape"]), worst["dtype"], worst["layout"],
                        worst["mode"], worst["pass"], 3 * repeats, warmup, clock, {}, 0)
        ratio = {r["impl"]: r["ratio_to_torch"] for r in recheck}
        if ratio.get("normlab") is not None and ratio.get("torch-again") is not None:
            detail += (f"; re-measured with {3 * repeats} repeats: normlab "
                       f"{ratio['normlab']:.2f}, torch-again {ratio['torch-again']:.2f}")
        out.append(_comparison(f"default_path/{layer}",
                               f"{layer} default path vs torch.nn, worst cell",
                               worst["ratio_to_torch"], detail))
    return out


def _fused_bn_comparisons(repeats, warmup, clock) -> list[dict]:
    """Fused BatchNorm training fwd+bwd against torch.nn.BatchNorm2d at (32, 64, 32, 32),
    with a copy of the tensor timed in the same run: a training step must move at least
    8 tensors' worth of bytes (forward: read x for the statistics, read x, write y;
    backward: read g and x for the sums, read g and x, write dx), 4 copies, unless the
    tensor stays in cache; so "k x torch" needs torch at k x that floor or more."""
    shape, out = (32, 64, 32, 32), []
    for layout in ("nchw", "channels_last"):
        name = f"fused BatchNorm train fwd+bwd vs torch.nn.BatchNorm2d, {layout} {shape}"
        x, g = _make_input(shape, torch.float32, layout)
        copy_to = torch.empty_like(x)
        fns = {"torch": _callable(_torch_bn(64, shape), x, g, "train", "fwd+bwd")[0],
               "fused": _callable(nl.BatchNorm(64, fused=True), x, g, "train", "fwd+bwd")[0],
               "copy": lambda x=x, copy_to=copy_to: copy_to.copy_(x)}
        wall, cpu = _time(fns, repeats, warmup, clock)
        t = cpu if clock == "cpu" else wall
        floor = 4.0 * t["copy"]
        out.append(_comparison(
            f"fused_batch_norm/{layout}", name, t["torch"] / t["fused"],
            f"torch {t['torch']:.3f} ms, fused {t['fused']:.3f} ms; copy {t['copy']:.3f} ms, "
            f"so the 8-pass floor is about {floor:.3f} ms: torch at {t['torch'] / floor:.2f}x "
            f"the floor, fused at {t['fused'] / floor:.2f}x"))
    return out


def _online_comparisons(fused_ok, repeats, warmup, clock) -> list[dict]:
    """Online Norm (default path, and fused where the kernels load) against its
    per-sample loop at batch 128, and against BatchNorm."""
    online = [("", "online", lambda c, s: nl.OnlineNorm(c))]
    if fused_ok:
        online.append((" fused", "online_fused", lambda c, s: nl.OnlineNorm(c, fused=True)))
    out = []
    for label, key, make_on in online:
        for shape in ((128, 64, 16, 16), (128, 256)):
            t_loop, t_on = _pair(lambda c, s: _OnlineLoop(c), make_on, shape, "train",
                                 "fwd+bwd", max(5, repeats // 3), 1, clock)
            out.append(_comparison(
                f"{key}/loop/{'x'.join(map(str, shape))}",
                f"OnlineNorm{label} vs per-sample loop, train fwd+bwd {shape}",
                t_loop / t_on, f"loop {t_loop:.3f} ms, normlab {t_on:.3f} ms"))
    shape = (32, 64, 16, 16)
    for label, key, make_on in online:
        for peer_key, peer, make_peer in (("torch_bn", "torch.nn.BatchNorm2d", _torch_bn),
                                          ("normlab_bn", "normlab BatchNorm",
                                           lambda c, s: nl.BatchNorm(c))):
            t_bn, t_on = _pair(make_peer, make_on, shape, "train", "fwd+bwd", repeats, warmup,
                               clock)
            out.append(_comparison(
                f"{key}/{peer_key}",
                f"OnlineNorm{label} vs BatchNorm ({peer}), train fwd+bwd {shape}",
                t_bn / t_on, f"BN {t_bn:.3f} ms, OnlineNorm{label} {t_on:.3f} ms"))
    return out


def _mixture_comparisons(repeats, warmup, clock) -> list[dict]:
    """Switchable and Attentive Norm against torch.nn.BatchNorm2d."""
    out = []
    for layer, make in (("SwitchableNorm", lambda c, s: nl.SwitchableNorm(c)),
                        ("AttentiveNorm", lambda c, s: nl.AttentiveNorm(c))):
        for shape in ((32, 64, 16, 16), (32, 64, 32, 32)):
            t_bn, t_x = _pair(_torch_bn, make, shape, "train", "fwd+bwd", repeats, warmup,
                              clock)
            out.append(_comparison(
                f"{layer}/torch_bn/{'x'.join(map(str, shape))}",
                f"{layer} vs torch.nn.BatchNorm2d, train fwd+bwd {shape}", t_bn / t_x,
                f"BN {t_bn:.3f} ms, {layer} {t_x:.3f} ms"))
    return out


def _memory_comparison(fused_ok) -> dict:
    """What a training step keeps for BN -> LeakyReLU -> conv3x3: torch's over
    save_memory's bytes."""
    shape = (32, 64, 32, 32)
    x = torch.randn(shape, requires_grad=True)
    conv = tnn.Conv2d(64, 64, 3, padding=1, bias=False)
    kept = {}
    for label, block in (
        ("torch BN2d + LeakyReLU", _BNActTorch(64)),
        ("normlab BatchNorm(activation)", _bn_act(64)),
        ("normlab fused", _bn_act(64, fused=True) if fused_ok else None),
        ("normlab save_memory", _bn_act(64, fused=fused_ok, save_memory=True)),
    ):
        if block is not None:
            kept[label] = saved_bytes(lambda b=block: conv(b(x)))
    return _comparison(
        "memory/save_memory",
        "memory-saving BatchNorm: bytes kept by BN+LeakyReLU+conv, torch / save_memory",
        kept["torch BN2d + LeakyReLU"] / kept["normlab save_memory"],
        "; ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in kept.items()))


def _comparison(key: str, name: str, measured: float, detail: str) -> dict:
    return {"id": key, "comparison": name, "measured": round(measured, 3), "detail": detail}


def measure_comparisons(repeats=15, warmup=2, clock="cpu", records=(),
                        progress=None) -> list[dict]:
    """The head-to-head comparisons, each ``{"id", "comparison", "measured",
    "detail"}``: ``measured`` is the peer's time over normlab's (> 1: normlab faster),
    or for ``memory/...`` the peer's saved bytes over normlab's. ``records`` (those of
    :func:`run`) give the default paths' worst cells; without them those are left out.
    A comparison whose kernels cannot be built reads ``measured`` 0 and says why."""
    say = progress or (lambda s: None)
    out = _default_path_comparisons(records, repeats, warmup, clock)
    try:
        from normlab import kernels

        kernels.load_library()
        fused_ok = True
    except Exception:  # noqa: BLE001 - reported in the comparison's detail
        fused_ok = False
    if fused_ok:
        out += _fused_bn_comparisons(repeats, warmup, clock)
    else:
        out += [_comparison(f"fused_batch_norm/{layout}",
                            f"fused BatchNorm train fwd+bwd vs torch, {layout}", 0.0,
                            "kernels not available") for layout in ("nchw", "channels_last")]
    say("fused comparisons done")
    out += _online_comparisons(fused_ok, repeats, warmup, clock)
    say("online comparisons done")
    out += _mixture_comparisons(repeats, warmup, clock)
    say("mixture comparisons done")
    return out + [_memory_comparison(fused_ok)]


# ----------------------------------------------------------------------------- report


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def main_table(records: list[dict]) -> str:
    """One Markdown row per cell: each implementation's median ms, its ratio to torch
    (or, without a torch peer, to normlab), normlab's GB/s against the copy's, and the
    bytes normlab keeps for backward."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in records:
        key = (r["layer"], tuple(r["shape"]), r["dtype"], r["layout"], r["mode"], r["pass"])
        cells.setdefault(key, {})[r["impl"]] = r
    lines = ["| layer | shape | dtype | layout | mode | pass | implementations: ms (x vs "
             "torch, else vs normlab) | normlab GB/s (copy) | normlab saved MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, impls in cells.items():
        layer, shape, dt, layout, mode, pass_ = key
        ref = impls.get("torch") or impls.get("normlab")
        parts = []
        for impl, r in impls.items():
            if impl == "copy":
                continue
            if r["median_ms"] is None:
                parts.append(f"{impl}: n/a")
                continue
            ratio = ""
            if ref is not None and ref is not r and ref["median_ms"]:
                ratio = f" ({ref['median_ms'] / r['median_ms']:.2f}x)"
            parts.append(f"{impl} {_fmt(r['median_ms'])}{ratio}")
        nl_rec = impls.get("normlab", {})
        copy = impls.get("copy", {})
        saved = nl_rec.get("peak_saved_bytes")
        lines.append(
            f"| {layer} | {'x'.join(map(str, shape))} | {dt} | {layout} | {mode} | {pass_} | "
            f"{'; '.join(parts)} | {_fmt(nl_rec.get('gbps'))} ({_fmt(copy.get('gbps'))}) | "
            f"{_fmt(None if saved is None else saved / 2**20)} |"
        )
    return "\n".join(lines)


def summary_table(records: list[dict]) -> str:
    """Per layer, implementation, layout and dtype: the ratio of the peer's median
    time to the implementation's over all cells (min / median / max; > 1 is faster
    than the peer). The peer is torch.nn's layer where there is one, else normlab's
    default path."""
    groups: dict[tuple, list[float]] = {}
    by_cell: dict[tuple, dict[str, dict]] = {}
    for r in records:
        key = (r["layer"], tuple(r["shape"]), r["dtype"], r["layout"], r["mode"], r["pass"])
        by_cell.setdefault(key, {})[r["impl"]] = r
    for key, impls in by_cell.items():
        peer_name = "torch" if "torch" in impls else "normlab"
        peer = impls.get(peer_name)
        if peer is None or not peer["median_ms"]:
            continue
        for impl, r in impls.items():
            if impl in ("copy", peer_name) or not r["median_ms"]:
                continue
            groups.setdefault((key[0], impl, peer_name, key[3], key[2]), []).append(
                peer["median_ms"] / r["median_ms"])
    lines = ["| layer | implementation | vs | layout | dtype | cells | min | median | max |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (layer, impl, peer, layout, dt), v in groups.items():
        lines.append(f"| {layer} | {impl} | {peer} | {layout} | {dt} | {len(v)} | "
                     f"{min(v):.2f} | {statistics.median(v):.2f} | {max(v):.2f} |")
    return "\n".join(lines)


def _markdown(result: BenchResult) -> str:
    m = result.meta
    mach = m.get("machine", {})
    head = [
        "# normlab bench",
        "",
        f"Machine: {mach.get('cpu')} ({mach.get('cores')} cores), torch {mach.get('torch')}, "
        f"normlab {mach.get('normlab')}; load average at start {_fmt(mach.get('load_avg_1min'))}. "
        f"{m.get('threads')} intra-op thread(s); clock: {m.get('clock')} (median of "
        f"{m.get('repeats')} interleaved repeats after {m.get('warmup')} warm-up calls).",
    ]
    k = m.get("kernels")
    if k:
        head.append(
            f"Fused kernels: {'available' if k.get('available') else 'NOT available'}"
            + (f", load (or first compile) {k['load_or_compile_s']} s, timed separately."
               if k.get("available") else f" ({k.get('error')})"))
    parts = ["\n".join(head), ""]
    if result.comparisons:
        parts += ["## Comparisons (peer's time, or bytes, over normlab's)", "",
                  "| comparison | measured | detail |", "|---|---|---|"]
        for t in result.comparisons:
            parts.append(f"| {t['comparison']} | {t['measured']} | {t['detail']} |")
        parts.append("")
    if result.records:
        parts += ["## Summary: speed relative to the peer", "", summary_table(result.records),
                  "", "## All cells", "", main_table(result.records), ""]
    return "\n".join(parts)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32x64x32x32"`` or ``"32,64,32,32"`` -> ``(32, 64, 32, 32)``."""
    try:
        shape = tuple(int(p) for p in text.replace(",", "x").split("x") if p)
    except ValueError:
        raise ValueError(f"normlab bench: bad shape {text!r}, expected e.g. 32x64x32x32") from None
    if len(shape) < 2 or any(s < 1 for s in shape) or math.prod(shape) == 0:
        raise ValueError(f"normlab bench: bad shape {text!r}, expected (N, C, *) positive")
    return shape
