"""Every normlab layer where PyTorch users take it: copy.deepcopy, pickle, torch.save /
torch.load (state_dict with weights_only=True, whole module), torch.autocast (CPU,
bfloat16), torch.func (vmap, functional_call, stack_module_state), channels_last, and
construction on the meta device followed by to_empty() and reset_parameters().

:data:`CASES` lists every layer: each norm of :func:`normlab.list_norms` (built by
:func:`normlab.create_norm`) and the layers the registry does not build. The slow
suites ``test_compile.py`` and ``test_export.py`` import it from here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.overrides import TorchFunctionMode

import normlab
from normlab import nn as nlnn
from normlab.convert import swap_norm

C = 8  # channels of the registry cases
BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


@dataclass(frozen=True)
class Case:
    """One layer to test: how to build it and what input it takes."""

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    #: inputs in [0, 1] (Generalized Hamming layers read them as fuzzy truth values)
    unit_input: bool = False
    #: torch.nn's layer of the same math, for the channels_last comparison
    peer: Callable[[], nn.Module] | None = None
    #: an LSTM: input (T, N, F), output ``out, (h, c)``
    recurrent: bool = False

    def input(self, seed: int = 0) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.unit_input:
            return torch.rand(self.shape, generator=g)
        # Off-centre and wider than N(0, 1), so that statistics are not trivial.
        return torch.randn(self.shape, generator=g) * 2.0 + 0.5


# torch.nn's layer of the same math as a registry norm on (4, C, 5, 5) input. Batch
# Renorm, Switchable, Attentive and Online Norm have none. torch.nn.SyncBatchNorm runs
# BatchNorm2d's kernels when it is not distributed (and refuses CPU input in training),
# so BatchNorm2d stands for it.
_REGISTRY_PEERS = {
    "batch": lambda: nn.BatchNorm2d(C),
    "sync_batch": lambda: nn.BatchNorm2d(C),
    "layer": lambda: nn.LayerNorm((C, 5, 5)),
    "rms": lambda: nn.RMSNorm((C, 5, 5)),
    "instance": lambda: nn.InstanceNorm2d(C),
    "group": lambda: nn.GroupNorm(normlab.nn.choose_num_groups(C), C),
    "none": lambda: nn.Identity(),
}

_LSTM_SHAPE = (4, 3, 6)  # (T, N, F)


def _registry_cases() -> list[Case]:
    cases = []
    for name in normlab.list_norms():
        cases.append(Case(name, functools.partial(normlab.create_norm, name, C), (4, C, 5, 5),
                          peer=_REGISTRY_PEERS.get(name)))
    return cases


def _torch_weight_norm_conv() -> nn.Module:
    return nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1))


CASES: list[Case] = _registry_cases() + [
    Case("weight_norm(Linear)", lambda: nlnn.weight_norm(nn.Linear(6, 5)), (4, 6)),
    Case("weight_norm(Conv2d)", lambda: nlnn.weight_norm(nn.Conv2d(3, 4, 3, padding=1)),
         (2, 3, 6, 6), peer=_torch_weight_norm_conv),
    Case("SELU", nlnn.SELU, (4, C, 5, 5), peer=nn.SELU),
    Case("AlphaDropout", lambda: nlnn.AlphaDropout(0.2), (4, C, 5, 5),
         peer=lambda: nn.AlphaDropout(0.2)),
    Case("GHNLinear", lambda: nlnn.GHNLinear(6, 5), (4, 6), unit_input=True),
    Case("GHNConv2d", lambda: nlnn.GHNConv2d(3, 4, 3, padding=1), (2, 3, 6, 6),
         unit_input=True, peer=lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False)),
    Case("DoubleThreshold", lambda: nlnn.DoubleThreshold(C), (4, C, 5, 5)),
    Case("BNLSTM", lambda: nlnn.BNLSTM(6, 5), _LSTM_SHAPE, recurrent=True),
    Case("InputBNLSTM", lambda: nlnn.InputBNLSTM(6, 5), _LSTM_SHAPE, recurrent=True),
    Case("LNLSTM", lambda: nlnn.LNLSTM(6, 5), _LSTM_SHAPE, recurrent=True),
    Case("SyncBatchNorm", lambda: nlnn.SyncBatchNorm(C), (4, C, 5, 5),
         peer=lambda: nn.BatchNorm2d(C)),
]
CASE_IDS = [c.name for c in CASES]


def tensors(out) -> list[Tensor]:
    """The tensors of a layer's output, flattened (an LSTM gives out, (h, c))."""
    if isinstance(out, Tensor):
        return [out]
    return [t for item in out for t in tensors(item)]


def warm(case: Case, module: nn.Module | None = None, steps: int = 2) -> nn.Module:
    """A layer whose running statistics have seen ``steps`` training batches, so that
    eval-mode outputs depend on them, with non-trivial affine parameters."""
    m = case.build() if module is None else module
    m.train()
    with torch.no_grad():
        for s in range(steps):
            m(case.input(seed=100 + s))
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    return m


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def assert_same_outputs(a: nn.Module, b: nn.Module, case: Case, training: bool) -> None:
    """Same outputs (and, in training, the same state afterwards); same RNG draws."""
    a.train(training)
    b.train(training)
    x = case.input(seed=1)
    torch.manual_seed(3)
    ya = tensors(a(x))
    torch.manual_seed(3)
    yb = tensors(b(x))
    for ta, tb in zip(ya, yb, strict=True):
        torch.testing.assert_close(ta, tb, rtol=0, atol=0)
    assert_same_state(a, b)


def _round_trip_save(obj, weights_only: bool):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


# --------------------------------------------------------------------- copy, pickle, save


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_deepcopy(case):
    m = warm(case)
    c = copy.deepcopy(m)
    assert type(c) is type(m)
    assert_same_state(m, c)
    assert_same_outputs(m, c, case, training=False)
    assert_same_outputs(m, c, case, training=True)
    # The copy owns its tensors: changing it leaves the original alone.
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for t in list(c.parameters()) + list(c.buffers()):
            t.zero_()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pickle(case):
    m = warm(case)
    c = pickle.loads(pickle.dumps(m))
    assert type(c).__name__ == type(m).__name__
    assert_same_state(m, c)
    assert_same_outputs(m, c, case, training=False)
    assert_same_outputs(m, c, case, training=True)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_dict_save_load_weights_only(case):
    m = warm(case).eval()
    state = _round_trip_save(m.state_dict(), weights_only=True)
    fresh = case.build()
    fresh.load_state_dict(state)  # strict: the same keys
    assert_same_state(m, fresh)
    assert_same_outputs(m, fresh, case, training=False)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_whole_module_save_load(case):
    m = warm(case).eval()
    c = _round_trip_save(m, weights_only=False)
    assert type(c).__name__ == type(m).__name__
    assert_same_outputs(m, c, case, training=False)
    assert_same_outputs(m, c, case, training=True)


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), nn.ReLU(),
        nn.Conv2d(C, 2 * C, 3, padding=1, bias=False), nn.BatchNorm2d(2 * C), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * C, 3),
    )


@pytest.mark.parametrize("name", normlab.list_norms())
def test_swapped_model_copies_pickles_and_saves(name):
    torch.manual_seed(0)
    model, replaced = swap_norm(_small_cnn(), name)
    assert len(replaced) == 2
    model.train()
    with torch.no_grad():
        for s in range(2):
            model(torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(s)) + 0.5)
    model.eval()
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    y = model(x)

    fresh, _ = swap_norm(_small_cnn(), name)
    fresh.load_state_dict(_round_trip_save(model.state_dict(), weights_only=True))
    others = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
              _round_trip_save(model, weights_only=False), fresh]
    for other in others:
        assert_same_state(model, other)
        torch.testing.assert_close(other.eval()(x), y, rtol=0, atol=0)


# ----------------------------------------------------------------------------- autocast


def _float_buffers(m: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in m.named_buffers() if v.is_floating_point()}


def _bf16(a):
    return a.to(torch.bfloat16).float() if isinstance(a, Tensor) and a.is_floating_point() else a


class _Bfloat16Matmuls(TorchFunctionMode):
    """float32 arithmetic except for the matmuls, which are done as autocast's CPU policy
    does them: operands rounded to bfloat16, the result rounded to bfloat16."""

    OPS = {torch.matmul, torch.mm, torch.bmm, F.linear, F.conv2d, Tensor.matmul,
           Tensor.__matmul__, Tensor.mm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.OPS:
            return func(*args, **kwargs)
        return _bf16(func(*map(_bf16, args), **{k: _bf16(v) for k, v in kwargs.items()}))


def _statistics_of_input(case: Case, key: str) -> bool:
    """False for the running statistics of a matmul's output, which autocast computes
    in bfloat16 (the LSTMs' gates, Attentive Norm's attention); True for statistics of
    the layer's input itself."""
    return not case.recurrent and not key.startswith("attention_")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_autocast_bfloat16(case, training):
    """Under torch.autocast("cpu", bfloat16), a layer fed bfloat16 input keeps its
    running statistics in float32, with float32's values, and its outputs are within
    bfloat16 rounding of float32's.

    The float32 reference is the same layer (a copy) run without autocast on the same
    values, upcast. Tolerance: ``k * u * (|ref| + rms(ref))`` with u = 2^-8, bfloat16's
    unit roundoff, and k = 2: the rounding of the output and at most one intermediate
    rounding (torch's native half-precision kernels and Online Norm's affine in the
    input dtype have one; measured: at most 1.5 roundings).

    The LSTMs are compared with float32 arithmetic whose gate matmuls are rounded as
    autocast's (:class:`_Bfloat16Matmuls`), with k = 4 for their four time steps
    (measured: at most 3.0). Against plain float32 their error is larger, up to 14
    roundings for LN-LSTM: layer norm of a bfloat16 matmul output amplifies its
    rounding by the gates' |mean| / std, which no float32 arithmetic after the matmul
    can undo (torch.nn.LSTM under autocast, with no norm, measured 0.6 to 1.9).
    """
    base = warm(case)
    mixed = copy.deepcopy(base).train(training)
    ref = copy.deepcopy(base).train(training)
    if getattr(ref, "eps", 1.0) is None:
        # RMSNorm's eps=None is finfo(input dtype).eps (torch.nn.RMSNorm's convention):
        # the float32 reference must use the bfloat16 input's eps.
        ref.eps = torch.finfo(torch.bfloat16).eps
    x = case.input(seed=1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(5)
        out = tensors(mixed(x))
    torch.manual_seed(5)
    with _Bfloat16Matmuls() if case.recurrent else contextlib.nullcontext():
        expected = tensors(ref(x.float()))
    k = 4.0 if case.recurrent else 2.0

    def within(y: Tensor, r: Tensor) -> tuple[bool, str]:
        tol = k * BF16_U * (r.abs() + r.pow(2).mean().sqrt())
        err = (y.float() - r).abs()
        ratio = (err / tol).max().item() * k
        return bool((err <= tol).all()), f"{ratio:.3g} bfloat16 roundings (allowed {k})"

    for y, r in zip(out, expected, strict=True):
        ok, what = within(y, r)
        assert ok, f"{case.name} output: {what}"

    bufs, ref_bufs = _float_buffers(mixed), _float_buffers(ref)
    assert list(bufs) == list(ref_bufs)
    for key, b in bufs.items():
        assert b.dtype == torch.float32, f"{case.name}.{key} became {b.dtype}"
        if _statistics_of_input(case, key):
            # Statistics of the input itself: float32 accumulation gives float32's
            # values (a bfloat16 accumulation would be off by about u = 4e-3).
            torch.testing.assert_close(b, ref_bufs[key], rtol=1e-5, atol=1e-6, msg=key)
        else:
            _check_matmul_statistic(case.name, key, b, ref_bufs, k)


def _check_matmul_statistic(name: str, key: str, value: Tensor, ref: dict, k: float) -> None:
    """A running mean or variance of values z that a bfloat16 matmul rounded, each by
    at most u |z|: the mean moves by at most u sqrt(var + mean^2) and the variance by
    at most 2u sqrt(var (var + mean^2)), per channel (``k`` roundings allowed)."""
    mean_key = key.replace("running_var", "running_mean")
    mean, var = ref[mean_key], ref[mean_key.replace("running_mean", "running_var")]
    spread = (var + mean * mean).sqrt()
    tol = k * BF16_U * (spread if key == mean_key else 2 * (var * spread * spread).sqrt())
    err = (value - ref[key]).abs()
    ratio = (err / tol.clamp(min=1e-12)).max().item() * k
    assert bool((err <= tol).all()), f"{name}.{key}: {ratio:.3g} roundings (allowed {k})"


# ------------------------------------------------------------------ torch.func: vmap etc.


def _bn_model(track_running_stats: bool) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, C, 3, padding=1), nlnn.BatchNorm(C, track_running_stats=track_running_stats),
        nn.ReLU(), nn.Flatten(), nn.Linear(C * 5 * 5, 3),
    )


def _bn_mode(mode: str, seed: int = 0) -> nn.Module:
    """normlab's BatchNorm in a mode that updates no running statistic: eval with
    running statistics from training, or training with track_running_stats=False."""
    torch.manual_seed(seed)
    if mode == "eval":
        model = _bn_model(True).train()
        with torch.no_grad():
            for s in range(3):
                model(torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(s)) + 1)
        return model.eval()
    return _bn_model(False).train()


@pytest.mark.parametrize("mode", ["eval", "no_running_stats"])
def test_vmap_per_sample_gradients(mode):
    """The pytorch #85533 use case: per-sample gradients of a model with BatchNorm by
    vmap(grad(...)) over functional_call, equal to a loop over the samples."""
    model = _bn_mode(mode)
    x = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(p, b, xi, ti):
        out = functional_call(model, (p, b), (xi.unsqueeze(0),))
        return F.cross_entropy(out, ti.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, None, 0, 0))(params, buffers, x, target)

    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), target[i : i + 1]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():  # nothing was updated
        assert torch.equal(v, state_before[k]), k


@pytest.mark.parametrize("mode", ["eval", "no_running_stats"])
def test_vmap_ensemble_stack_module_state(mode):
    """An ensemble of models with BatchNorm run as one vmap over stacked parameters and
    buffers (torch.func.stack_module_state), equal to running each model."""
    models = [_bn_mode(mode, seed=s) for s in range(3)]
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")

    def run(p, b, x):
        return functional_call(skeleton, (p, b), (x,))

    x = torch.randn(5, 3, 5, 5, generator=torch.Generator().manual_seed(2)) + 0.5
    out = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    for k, m in enumerate(models):
        torch.testing.assert_close(out[k], m(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ channels_last


def _is_channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


FOUR_D = [c for c in CASES if len(c.shape) == 4]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", FOUR_D, ids=[c.name for c in FOUR_D])
def test_channels_last(case, training):
    """channels_last input gives the same values as contiguous input, and a
    channels_last output wherever torch.nn's layer of the same math gives one (its
    behaviour is measured here, not assumed: torch.nn's InstanceNorm2d and LayerNorm
    return contiguous outputs, BatchNorm2d, GroupNorm, RMSNorm and Conv2d keep
    channels_last)."""
    base = warm(case)
    a = copy.deepcopy(base).train(training)
    b = copy.deepcopy(base).train(training)
    x = case.input(seed=1)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(4)
    y_cl = a(x_cl)
    torch.manual_seed(4)
    y = b(x)
    if training and isinstance(a, nlnn.AlphaDropout):
        # Its random mask fills memory in order, so it differs between layouts (as
        # torch.nn.AlphaDropout's does): check that y is an alpha dropout of x instead.
        kept = torch.isclose(y_cl, a.a * x_cl + a.b)
        dropped = torch.isclose(y_cl, torch.full_like(y_cl, a.a * a.alpha_prime + a.b))
        assert bool((kept | dropped).all()) and 0 < int(dropped.sum()) < x.numel()
    else:
        torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)
    if case.peer is not None:
        peer = case.peer().train(training)
        if _is_channels_last(peer(x_cl)):
            assert _is_channels_last(y_cl), f"{case.name}: torch.nn keeps channels_last"


# ---------------------------------------------------------------------------- meta device


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_meta_device_then_to_empty_and_reset(case):
    """A layer built on the meta device (no memory), materialised by to_empty() and
    initialised by reset_parameters(), equals one built on the CPU with the same seed."""
    torch.manual_seed(0)
    ref = case.build()
    with torch.device("meta"):
        m = case.build()
    tensors_of = list(m.parameters()) + list(m.buffers())
    assert all(t.is_meta for t in tensors_of)
    m = m.to_empty(device="cpu")
    if tensors_of:  # (SELU, AlphaDropout, Identity hold no tensor)
        torch.manual_seed(0)
        m.reset_parameters()
    assert_same_state(ref, m)
    assert_same_outputs(ref, m, case, training=True)


@pytest.mark.parametrize("name", normlab.list_norms())
def test_create_norm_on_meta_device(name):
    m = normlab.create_norm(name, C, device="meta")
    assert all(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
    m = m.to_empty(device="cpu")
    if hasattr(m, "reset_parameters"):
        torch.manual_seed(0)
        m.reset_parameters()
    torch.manual_seed(0)
    ref = normlab.create_norm(name, C)
    assert_same_state(ref, m)


def test_weight_norm_reset_parameters_reaches_g_and_v():
    """nn.Linear.reset_parameters initialises ``self.weight`` in place; on a
    weight-normalized layer that tensor is recomputed from g and v, so the reset must
    go through the parametrization or it is silently lost."""
    torch.manual_seed(0)
    layer = nlnn.weight_norm(nn.Linear(6, 5))
    g = layer.parametrizations.weight.original0
    v = layer.parametrizations.weight.original1
    with torch.no_grad():
        g.fill_(7.0)
        v.fill_(1.0)
    torch.manual_seed(1)
    layer.reset_parameters()
    torch.manual_seed(1)
    plain = nn.Linear(6, 5)
    assert layer.parametrizations.weight.original0 is g  # the same Parameter objects
    torch.testing.assert_close(layer.weight, plain.weight)
    torch.testing.assert_close(g, plain.weight.norm(dim=1, keepdim=True))
