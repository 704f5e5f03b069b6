"""Weight Normalization (Salimans & Kingma 2016), its data-dependent init, and the
Arpit et al. (2019) init and warm-up."""

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as tp

import normlab
from normlab.init import (
    ArpitWarmup,
    arpit_init_,
    arpit_warmup,
    data_dependent_init_,
)
from normlab.nn import WeightNorm, remove_weight_norm, weight_norm

D = torch.float64




def unit_norms(w, dim):
    """Float64 reference: the 2-norm of w over every axis but ``dim``."""
    w = w.detach().to(D)
    others = [d for d in range(w.dim()) if d != dim]
    return w.pow(2).sum(others).sqrt()


def wn(layer, dim=0):
    return weight_norm(layer, dim=dim)


def g_of(m):
    return m.parametrizations.weight.original0


def v_of(m):
    return m.parametrizations.weight.original1


LAYERS = [
    (lambda: nn.Linear(7, 5), (4, 7)),
    (lambda: nn.Conv1d(4, 6, 3), (2, 4, 9)),
    (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1), (2, 4, 6, 6)),
    (lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 4)),
]


# ------------------------------------------------------------------ reparametrization


@pytest.mark.parametrize("make,shape", LAYERS)
@pytest.mark.parametrize("dim", [0, None])
def test_matches_torch_weight_norm(make, shape, dim):
    ours = make().to(D)
    ref = copy.deepcopy(ours)
    weight_norm(ours, dim=dim)
    tp.weight_norm(ref, dim=dim)
    with torch.no_grad():  # a g that is not ||v||, shared by both
        g_of(ours).mul_(torch.rand_like(g_of(ours)) + 0.5)
        g_of(ref).copy_(g_of(ours))
    x = torch.randn(shape, dtype=D)
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    (y.sin().sum()).backward()
    (y_ref.sin().sum()).backward()
    for a, b in [(g_of(ours), g_of(ref)), (v_of(ours), v_of(ref))]:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    # the same state_dict keys and shapes: checkpoints load in both directions
    sd, sd_ref = ours.state_dict(), ref.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in sd_ref.items()}
    fresh_ref = make().to(D)
    tp.weight_norm(fresh_ref, dim=dim)
    fresh_ref.load_state_dict(sd)
    torch.testing.assert_close(fresh_ref(x), y, rtol=1e-12, atol=1e-12)
    fresh = make().to(D)
    weight_norm(fresh, dim=dim)
    fresh.load_state_dict(sd_ref)
    torch.testing.assert_close(fresh(x), y_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make,shape", LAYERS)
def test_registration_keeps_function_and_g_is_norm_v(make, shape):
    layer = make().to(D)
    x = torch.randn(shape, dtype=D)
    w0 = layer.weight.detach().clone()
    y0 = layer(x).detach()
    weight_norm(layer)
    torch.testing.assert_close(g_of(layer).detach().flatten(), unit_norms(w0, 0))
    torch.testing.assert_close(v_of(layer).detach(), w0)
    torch.testing.assert_close(layer(x), y0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make,shape", LAYERS)
def test_norm_is_g_and_output_invariant_to_scaling_v(make, shape):
    layer = wn(make().to(D))
    with torch.no_grad():
        g_of(layer).copy_(torch.randn_like(g_of(layer)))
    g = g_of(layer).detach().flatten()
    w = layer.weight
    # ||w_unit|| = |g| per output unit
    torch.testing.assert_close(unit_norms(w, 0), g.abs(), rtol=1e-12, atol=1e-12)
    # w = g v / ||v||, written out independently
    v = v_of(layer).detach()
    ref = g.view(-1, *[1] * (v.dim() - 1)) * v / unit_norms(v, 0).view(-1, *[1] * (v.dim() - 1))
    torch.testing.assert_close(w, ref, rtol=1e-12, atol=1e-12)
    x = torch.randn(shape, dtype=D)
    y0 = layer(x).detach()
    scale = torch.rand(v.shape[0], dtype=D) * 10 + 0.1
    with torch.no_grad():
        v_of(layer).mul_(scale.view(-1, *[1] * (v.dim() - 1)))
    torch.testing.assert_close(layer(x), y0, rtol=1e-12, atol=1e-12)


def test_gradients_follow_the_paper_and_are_orthogonal_to_v():
    layer = wn(nn.Linear(6, 4).to(D))
    with torch.no_grad():
        g_of(layer).copy_(torch.randn(4, 1, dtype=D))
    x = torch.randn(10, 6, dtype=D)
    w = layer.weight  # computed from g and v once, used for the whole forward
    w.retain_grad()
    loss = (nn.functional.linear(x, w, layer.bias) ** 3).sum()
    loss.backward()
    gw = w.grad  # dL/dw
    g, v = g_of(layer).detach(), v_of(layer).detach()
    vn = v.norm(dim=1, keepdim=True)
    # eq. 3 of the paper, per unit: grad_g = grad_w . v/||v||,
    # grad_v = g/||v|| (I - w w^T/||w||^2) grad_w
    grad_g = (gw * v / vn).sum(1, keepdim=True)
    wd = w.detach()
    proj = gw - wd * (wd * gw).sum(1, keepdim=True) / wd.pow(2).sum(1, keepdim=True)
    grad_v = g / vn * proj
    torch.testing.assert_close(g_of(layer).grad, grad_g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v_of(layer).grad, grad_v, rtol=1e-10, atol=1e-12)
    # v . grad_v L = 0 per unit (relative to the sizes involved)
    dots = (v * v_of(layer).grad).sum(1)
    assert dots.abs().max() < 1e-12 * (v.norm() * v_of(layer).grad.norm())
    assert v_of(layer).grad.abs().max() > 1e-3  # the gradient itself is not zero


def test_sgd_on_v_only_grows_its_norm():
    layer = wn(nn.Linear(8, 3).to(D))
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(32, 8, dtype=D)
    norms = [unit_norms(v_of(layer), 0)]
    for _ in range(5):
        opt.zero_grad()
        (layer(x).tanh().sum()).backward()
        opt.step()
        norms.append(unit_norms(v_of(layer), 0))
    steps = torch.stack(norms)
    assert (steps[1:] >= steps[:-1] * (1 - 1e-12)).all()
    assert (steps[-1] > steps[0] * (1 + 1e-6)).any()


def test_gradcheck_parametrization():
    p = WeightNorm(dim=0)
    g = torch.randn(3, 1, 1, dtype=D, requires_grad=True)
    v = torch.randn(3, 2, 4, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(p, (g, v))
    assert torch.autograd.gradgradcheck(p, (g, v))
    p_all = WeightNorm(dim=None)
    assert torch.autograd.gradcheck(p_all, (torch.randn((), dtype=D, requires_grad=True), v))


def test_dim_none_and_negative_dims():
    layer = wn(nn.Linear(5, 4).to(D), dim=None)
    assert g_of(layer).shape == ()
    torch.testing.assert_close(layer.weight.detach().norm(), g_of(layer).detach().abs())
    # negative dims count from the end (dim=-1 of a Linear weight: one norm per input)
    layer = wn(nn.Linear(5, 4).to(D), dim=-1)
    assert g_of(layer).shape == (1, 5)
    torch.testing.assert_close(unit_norms(layer.weight, 1), g_of(layer).detach().flatten())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    layer = nn.Linear(16, 8)
    w32 = layer.weight.detach().clone()
    weight_norm(layer.to(dtype))
    with torch.no_grad():
        g_of(layer).mul_(2)
    ref = 2 * w32.to(dtype).float()
    torch.testing.assert_close(layer.weight.float(), ref, rtol=2e-2, atol=2e-2)
    assert layer.weight.dtype == dtype


# ------------------------------------------------------------------ transposed convs


def test_conv_transpose_uses_dim_1_and_refuses_dim_0():
    conv = nn.ConvTranspose2d(3, 5, 3).to(D)
    with pytest.raises(ValueError, match=r"ConvTranspose2d.*dim=1"):
        weight_norm(conv)
    weight_norm(conv, dim=1)
    with torch.no_grad():
        g_of(conv).copy_(torch.rand(1, 5, 1, 1, dtype=D) + 0.5)
    # one norm per output channel (dim 1 of the (C_in, C_out, k, k) weight)
    torch.testing.assert_close(unit_norms(conv.weight, 1), g_of(conv).detach().flatten())
    with pytest.raises(ValueError, match="groups=2"):
        weight_norm(nn.ConvTranspose2d(4, 6, 3, groups=2), dim=1)


# ------------------------------------------------------------------ copy, pickle, remove


def test_deepcopy_pickle_and_torch_save():
    model = nn.Sequential(wn(nn.Conv2d(3, 4, 3)), nn.ReLU(), nn.Flatten(), wn(nn.Linear(16, 2)))
    with torch.no_grad():
        g_of(model[0]).mul_(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 4, 4)
    y = model(x).detach()

    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), y)
    with torch.no_grad():
        g_of(clone[0]).zero_()
    torch.testing.assert_close(model(x), y)  # independent copy

    m2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    torch.testing.assert_close(m2(x), y)
    assert isinstance(m2[0].parametrizations.weight[0], WeightNorm)
    ids = {id(p) for p in m2.parameters()}
    assert {id(p) for p in opt2.param_groups[0]["params"]} == ids  # same Parameter objects
    assert set(m2.state_dict()) == set(model.state_dict())
    m3 = pickle.loads(pickle.dumps(m2))  # an unpickled model pickles again
    torch.testing.assert_close(m3(x), y)

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    m4 = torch.load(buf, weights_only=False)
    torch.testing.assert_close(m4(x), y)
    # gradients still reach g and v after loading
    m4(x).sum().backward()
    assert g_of(m4[0]).grad is not None and v_of(m4[0]).grad is not None


def test_remove_weight_norm_folds_back():
    layer = wn(nn.Conv2d(3, 4, 3).to(D))
    with torch.no_grad():
        g_of(layer).copy_(torch.randn(4, 1, 1, 1, dtype=D))
    g, v = g_of(layer).detach().clone(), v_of(layer).detach().clone()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    y = layer(x).detach()
    out = remove_weight_norm(layer)
    assert out is layer and type(layer) is nn.Conv2d
    assert set(dict(layer.named_parameters())) == {"weight", "bias"}
    torch.testing.assert_close(layer.weight.detach(), g * v / unit_norms(v, 0).view(-1, 1, 1, 1))
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not weight-normalized"):
        remove_weight_norm(layer)


def test_bad_inputs():
    with pytest.raises(TypeError, match="nn.Module"):
        weight_norm(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="Linear has no tensor called 'kernel'"):
        weight_norm(nn.Linear(2, 2), name="kernel")
    with pytest.raises(ValueError, match="out of range"):
        weight_norm(nn.Linear(2, 2), dim=2)
    with pytest.raises(TypeError, match="dim must be"):
        weight_norm(nn.Linear(2, 2), dim=1.0)
    layer = wn(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Linear.weight is already weight-normalized"):
        weight_norm(layer)
    holder = nn.Module()
    holder.register_buffer("weight", torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="floating point"):
        weight_norm(holder)
    with pytest.raises(ValueError, match="not weight-normalized"):
        remove_weight_norm(nn.Linear(2, 2))


# ------------------------------------------------------------------ data-dependent init


def _outputs(model, x, layers):
    """Each layer's output in a fresh forward pass (independent of the init's hooks)."""
    got = {}
    hs = [m.register_forward_hook(lambda m, a, o, i=i: got.setdefault(i, o.detach()))
          for i, m in enumerate(layers)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return [got[i] for i in range(len(layers))]


def _mean_std(y, channel):
    y = y.to(D).movedim(channel, 0).reshape(y.shape[channel], -1)
    return y.mean(1), y.var(1, unbiased=False).sqrt()


def test_data_dependent_init_gives_mean_0_std_1_per_unit():
    model = nn.Sequential(
        wn(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(), nn.MaxPool2d(2),
        wn(nn.Conv2d(8, 6, 3)), nn.ReLU(), nn.Flatten(),
        wn(nn.Linear(24, 10)), nn.ReLU(), wn(nn.Linear(10, 4)),
    )
    with torch.no_grad():
        for m in model:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.bias.uniform_(-1, 1)  # a non-zero starting bias
    x = torch.randn(64, 3, 8, 8) * 3 + 1
    layers = [model[0], model[3], model[6], model[8]]
    before = _outputs(model, x, layers)
    g0 = g_of(model[0]).detach().flatten().clone()
    b0 = model[0].bias.detach().clone()
    assert data_dependent_init_(model, x) is model
    for y in _outputs(model, x, layers):
        mean, std = _mean_std(y, 1)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
        torch.testing.assert_close(std, torch.ones_like(std), atol=1e-5, rtol=0)
    # the paper's update of the first layer: g <- g/sigma, b <- (b - mu)/sigma
    mu, sigma = _mean_std(before[0], 1)
    torch.testing.assert_close(g_of(model[0]).detach().flatten().to(D), g0.to(D) / sigma)
    torch.testing.assert_close(model[0].bias.detach().to(D), (b0.to(D) - mu) / sigma)


class _ReverseOrder(nn.Module):
    """Modules registered in the reverse of the order forward() calls them."""

    def __init__(self):
        super().__init__()
        self.last = wn(nn.Linear(6, 3))
        self.middle = wn(nn.Linear(6, 6))
        self.first = wn(nn.Linear(5, 6))

    def forward(self, x):
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


def test_data_dependent_init_follows_forward_order():
    model = _ReverseOrder()
    x = torch.randn(100, 5) * 2 - 1
    data_dependent_init_(model, x)
    for y in _outputs(model, x, [model.first, model.middle, model.last]):
        mean, std = _mean_std(y, 1)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
        torch.testing.assert_close(std, torch.ones_like(std), atol=1e-5, rtol=0)


def test_data_dependent_init_sequence_linear_and_shared_layer():
    shared = wn(nn.Linear(4, 4))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = shared

        def forward(self, x):  # (N, L, F): units on the last axis
            return self.shared(torch.relu(self.shared(x)))

    model = Twice()
    x = torch.randn(16, 7, 4) + 2
    data_dependent_init_(model, x)
    with torch.no_grad():
        y = shared(x)  # the first call is the one initialized
    mean, std = _mean_std(y, 2)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-5, rtol=0)


def test_data_dependent_init_transposed_and_unbatched_conv():
    up = weight_norm(nn.ConvTranspose2d(3, 5, 3, stride=2), dim=1)
    x = torch.randn(8, 3, 4, 4) - 0.5
    data_dependent_init_(up, x)
    with torch.no_grad():
        mean, std = _mean_std(up(x), 1)
    torch.testing.assert_close(mean, torch.zeros(5, dtype=D), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(5, dtype=D), atol=1e-5, rtol=0)
    conv = wn(nn.Conv1d(3, 4, 3))
    x = torch.randn(3, 50) + 1  # unbatched (C, L): units on axis 0
    data_dependent_init_(conv, x)
    with torch.no_grad():
        mean, std = _mean_std(conv(x), 0)
    torch.testing.assert_close(mean, torch.zeros(4, dtype=D), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(4, dtype=D), atol=1e-5, rtol=0)


def test_data_dependent_init_without_bias_sets_scale_only():
    layer = wn(nn.Linear(5, 3, bias=False).to(D))
    x = torch.randn(200, 5, dtype=D) + 1.5
    with torch.no_grad():
        mu0, s0 = _mean_std(layer(x), 1)
    data_dependent_init_(layer, x)
    with torch.no_grad():
        mu, std = _mean_std(layer(x), 1)
    torch.testing.assert_close(std, torch.ones_like(std))
    torch.testing.assert_close(mu, mu0 / s0)  # the mean is not corrected (no bias)
    assert mu.abs().min() > 0.1


def test_data_dependent_init_bad_inputs():
    with pytest.raises(ValueError, match="no layer weight-normalized"):
        data_dependent_init_(nn.Linear(3, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"'0'.*dim=None.*dim=0"):
        data_dependent_init_(nn.Sequential(wn(nn.Linear(3, 3), dim=None)), torch.randn(4, 3))
    model = nn.Sequential(wn(nn.Linear(3, 3)), nn.ReLU(), wn(nn.Linear(3, 2)))
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    g = g_of(model[0]).detach().clone()
    with pytest.raises(ValueError, match="layer '0' produced non-finite"):
        data_dependent_init_(model, x)
    torch.testing.assert_close(g_of(model[0]).detach(), g)  # nothing was poisoned
    assert not model[0]._forward_hooks  # hooks removed after the error


def test_data_dependent_init_dead_unit_warns_and_stays_finite():
    layer = wn(nn.Linear(3, 2))
    with torch.no_grad():
        v_of(layer)[1] = torch.tensor([1.0, 0.0, 0.0])
    x = torch.randn(10, 3)
    x[:, 0] = 2.0  # unit 1 sees a constant
    with pytest.warns(UserWarning, match="1 unit"):
        data_dependent_init_(layer, x)
    assert torch.isfinite(layer.weight).all() and torch.isfinite(layer.bias).all()
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y[:, 1], torch.zeros(10), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ Arpit et al. init


def _mlp(depth, width, din, bias=True):
    layers = []
    for i in range(depth):
        layers += [wn(nn.Linear(din if i == 0 else width, width, bias=bias)), nn.ReLU()]
    return nn.Sequential(*layers)


def test_arpit_plain_net_values():
    model = nn.Sequential(
        wn(nn.Conv2d(3, 16, 3)), nn.ReLU(), wn(nn.Conv2d(16, 8, 3)), nn.ReLU(),
        nn.Flatten(), wn(nn.Linear(8, 20)), nn.ReLU(), nn.Linear(20, 3),
    )
    classifier = copy.deepcopy(model[7].state_dict())
    arpit_init_(model)
    for m, fan_in, fan_out in [(model[0], 3, 16), (model[2], 16, 8), (model[5], 8, 20)]:
        g = g_of(m).detach()
        torch.testing.assert_close(g, torch.full_like(g, math.sqrt(2 * fan_in / fan_out)))
        assert (m.bias == 0).all()
        v = v_of(m).detach().reshape(m.weight.shape[0], -1).to(D)
        gram = v @ v.T if v.shape[0] <= v.shape[1] else v.T @ v
        torch.testing.assert_close(gram, torch.eye(gram.shape[0], dtype=D), atol=1e-5, rtol=0)
    for k, t in model[7].state_dict().items():  # the plain classifier is untouched
        assert torch.equal(t, classifier[k])


def test_arpit_keeps_the_forward_norm_through_100_layers():
    width, depth = 256, 100
    ratios, per_layer, default = [], [], []
    for seed in range(4):
        torch.manual_seed(seed)
        model = _mlp(depth, width, width)
        x = torch.randn(16, width)
        with torch.no_grad():
            default.append(float(model(x).norm() / x.norm()))  # g = ||v||, torch's default v
        arpit_init_(model, generator=torch.Generator().manual_seed(seed))
        h = x
        with torch.no_grad():
            for i in range(0, 2 * depth, 2):
                h_next = model[i + 1](model[i](h))
                per_layer.append(float(h_next.norm() / h.norm()) ** 2)
                h = h_next
        ratios.append(float(h.norm() / x.norm()))
    # each layer preserves the squared norm in expectation ...
    assert abs(sum(per_layer) / len(per_layer) - 1) < 0.03, sum(per_layer) / len(per_layer)
    # ... so 100 layers stay within about [0.5, 2] ...
    assert all(0.5 <= r <= 2.0 for r in ratios), ratios
    # ... while the default (g = ||v||, torch's default init of v) drifts away
    assert all(r < 0.1 for r in default), default


class _Block(nn.Module):
    def __init__(self, cin, cout, n):
        super().__init__()
        self.conv1 = wn(nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = wn(nn.Conv2d(cout, cout, 3, padding=1))
        self.conv2.arpit_role = "residual"
        self.shortcut = None
        if cin != cout:
            self.shortcut = wn(nn.Conv2d(cin, cout, 1))
            self.shortcut.arpit_role = "linear"

    def forward(self, x):
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + self.conv2(torch.relu(self.conv1(x)))


def _resnet(n, widths=(8, 16, 32)):
    stem = wn(nn.Conv2d(3, widths[0], 3, padding=1))
    stem.arpit_role = "linear"
    blocks, cin = [], widths[0]
    for w in widths:
        for _ in range(n):
            blocks.append(_Block(cin, w, n))
            cin = w
    return nn.Sequential(stem, *blocks)


def test_arpit_residual_gains_and_bounded_growth():
    n = 6
    model = _resnet(n)
    arpit_init_(model, blocks_per_stage=n)
    stem, block = model[0], model[2]
    torch.testing.assert_close(g_of(stem).detach(), torch.full_like(g_of(stem), math.sqrt(3 / 8)))
    for m, gain in [(block.conv1, 2.0), (block.conv2, 1.0 / n)]:
        torch.testing.assert_close(g_of(m).detach(), torch.full_like(g_of(m), math.sqrt(gain)))
    sc = model[1 + n].shortcut  # first block of stage 2: 8 -> 16 channels
    torch.testing.assert_close(g_of(sc).detach(), torch.full_like(g_of(sc), math.sqrt(8 / 16)))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        h = stem(x)
        ratios = []
        for s in range(3):
            start = h
            for b in model[1 + s * n : 1 + (s + 1) * n]:
                h = b(h)
            ratios.append(float(h.norm() / start.norm()) ** 2)
    # each block adds about 1/N of the squared norm: at most (1 + 1/N)^N < e per stage
    assert all(1.0 < r < math.e * 1.3 for r in ratios), ratios
    # the plain-net gain on the branch ends makes the signal explode instead
    arpit_init_(model, gains={f"{i}.conv2": 2.0 for i in range(1, 1 + 3 * n)})
    with torch.no_grad():
        assert float(model(x).norm() / stem(x).norm()) > 100


def test_arpit_bad_inputs():
    model = _resnet(2)
    with pytest.raises(ValueError, match=r"'1.conv2' is marked 'residual'.*blocks_per_stage"):
        arpit_init_(model)
    with pytest.raises(ValueError, match="not weight-normalized layers"):
        arpit_init_(model, blocks_per_stage=2, gains={"nope": 1.0})
    model[0].arpit_role = "tanh"
    with pytest.raises(ValueError, match="arpit_role='tanh'"):
        arpit_init_(model, blocks_per_stage=2)
    with pytest.raises(ValueError, match="no layer weight-normalized"):
        arpit_init_(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="positive int"):
        arpit_init_(_mlp(2, 4, 4), blocks_per_stage=0)
    with pytest.raises(ValueError, match="gain must be positive"):
        arpit_init_(_mlp(1, 4, 4), gains={"0": -1.0})
    convt = nn.Sequential(weight_norm(nn.ConvTranspose2d(2, 3, 3), dim=1))
    arpit_init_(convt, gains={"0": 1.0})  # transposed conv: units on dim 1
    v = v_of(convt[0]).detach().movedim(1, 0).reshape(3, -1).to(D)
    torch.testing.assert_close(v @ v.T, torch.eye(3, dtype=D), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ warm-up


def test_arpit_warmup_schedule():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.1}, {"params": [], "lr": 0.02}], lr=0.1)
    sched = arpit_warmup(opt, warmup_steps=8, lr0=0.01)
    assert isinstance(sched, ArpitWarmup)
    seen = []
    for _ in range(12):
        seen.append([grp["lr"] for grp in opt.param_groups])
        opt.step()
        sched.step()
    for t, lrs in enumerate(seen):
        a = min(1.0, t / 8)
        for lr, base in zip(lrs, [0.1, 0.02], strict=True):
            assert lr == pytest.approx(0.01 + a * a * (base - 0.01), rel=1e-12, abs=1e-15)
    assert seen[0] == pytest.approx([0.01, 0.01]) and seen[8] == pytest.approx([0.1, 0.02])
    # the ramp is quadratic: half-way the rate has covered a quarter of the distance
    assert seen[4][0] == pytest.approx(0.01 + 0.25 * 0.09)


def test_arpit_warmup_default_and_bad_inputs():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = arpit_warmup(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 1 / 16, 4 / 16, 9 / 16, 1.0, 1.0])
    assert arpit_warmup(torch.optim.SGD([p], lr=0.3), 0).get_last_lr() == [0.3]
    with pytest.raises(ValueError, match="warmup_steps"):
        arpit_warmup(opt, -1)
    with pytest.raises(ValueError, match="lr0"):
        arpit_warmup(opt, 3, lr0=float("nan"))


def test_public_api():
    assert normlab.init.data_dependent_init_ is data_dependent_init_
    assert normlab.init.arpit_init_ is arpit_init_
    assert normlab.nn.weight_norm is weight_norm
    assert normlab.nn.remove_weight_norm is remove_weight_norm
