"""Equi-normalization (Stock et al. 2019): function preservation, monotone objective,
the c-relation at the fixed point, uniqueness, optimizer state, refusals."""

import copy

import pytest
import torch
from torch import nn

import normlab
from normlab.nn import ENorm, weight_norm

D = torch.float64




def conv_net():
    """Biases everywhere, max and average pooling, a grouped conv, Flatten, Linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, groups=2), nn.LeakyReLU(0.1), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(6, 7), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3),
    ).to(D).eval()


def conv_net_spatial_flatten():
    """Flatten of a 6 x 2 x 2 map: conv channel j owns 4 Linear columns."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(2), nn.Flatten(),
        nn.Linear(24, 9), nn.PReLU(), nn.Linear(9, 2),
    ).to(D)


def mlp(widths=(6, 9, 7, 8, 3), bias=True):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(D)


def weights(model):
    return [m.weight for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]


# ---------------------------------------------------------------- independent references


def objective_ref(ws, c):
    """sum_k c^(-2k) ||W_k||^2, from the equation."""
    return sum(c ** (-2 * k) * w.detach().to(D).pow(2).sum() for k, w in enumerate(ws))


def norms_ref(model):
    """(incoming, outgoing) norms per hidden unit, with the flatten blocks spelled out."""
    ws = weights(model)
    out = []
    for a, b in zip(ws[:-1], ws[1:], strict=True):
        a, b = a.detach(), b.detach()
        inc = a.reshape(a.shape[0], -1).norm(dim=1)
        if b.dim() == 2 and a.dim() == 4:  # Flatten: channel j -> columns j*L .. (j+1)*L-1
            L = b.shape[1] // a.shape[0]
            outg = torch.stack([b[:, j * L:(j + 1) * L].norm() for j in range(a.shape[0])])
        elif b.dim() == 4:
            # grouped conv: input channel j feeds group j // (C_in/G) through column j % (C_in/G)
            cin_g = b.shape[1]
            groups = a.shape[0] // cin_g
            cout_g = b.shape[0] // groups
            outg = torch.stack([
                b[(j // cin_g) * cout_g:(j // cin_g + 1) * cout_g, j % cin_g].norm()
                for j in range(a.shape[0])
            ])
        else:
            outg = b.norm(dim=0)
        out.append((inc, outg))
    return out


# ---------------------------------------------------------------- function preservation


@pytest.mark.parametrize("make,shape", [
    (conv_net, (5, 3, 8, 8)),
    (conv_net_spatial_flatten, (4, 3, 6, 6)),
    (mlp, (10, 6)),
])
@pytest.mark.parametrize("c", [1.0, 1.3])
@pytest.mark.parametrize("bias_in_norm", [False, True])
def test_one_cycle_preserves_the_function(make, shape, c, bias_in_norm):
    torch.manual_seed(1)
    model = make()
    with torch.no_grad():
        for w in weights(model):  # unbalanced start: layers of very different scales
            w.mul_(torch.rand(w.shape[0], *[1] * (w.dim() - 1), dtype=D) * 5 + 0.1)
    x = torch.randn(shape, dtype=D)
    y0 = model(x).detach()
    before = [w.detach().clone() for w in weights(model)]
    e = ENorm(model, c=c, bias_in_norm=bias_in_norm)
    e.step()
    assert any(not torch.allclose(w, b) for w, b in zip(weights(model), before, strict=True))
    torch.testing.assert_close(model(x), y0, rtol=1e-12, atol=1e-12)
    for _ in range(10):
        e.step()
    torch.testing.assert_close(model(x), y0, rtol=1e-11, atol=1e-11)


def test_sequence_linear_and_layers_outside_the_chain():
    # a BatchNorm before the first and a Softmax after the last weight layer are fine
    model = nn.Sequential(
        nn.BatchNorm1d(5), nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4), nn.Softmax(-1)
    ).to(D).eval()
    x = torch.randn(3, 5, dtype=D)
    y0 = model(x)
    ENorm(model).step()
    torch.testing.assert_close(model(x), y0, rtol=1e-12, atol=1e-12)
    # Linear layers on (N, L, F) input
    seq = mlp()
    x = torch.randn(4, 11, 6, dtype=D)
    y0 = seq(x)
    ENorm([*seq]).step()
    torch.testing.assert_close(seq(x), y0, rtol=1e-12, atol=1e-12)


def test_biases_must_be_rescaled():
    # the official code leaves biases alone: that changes the function
    model = mlp()
    x = torch.randn(10, 6, dtype=D)
    y0 = model(x).detach()
    biases = [m.bias.detach().clone() for m in model if isinstance(m, nn.Linear)]
    ENorm(model, c=1.2).step()
    torch.testing.assert_close(model(x), y0, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        for m, b in zip([m for m in model if isinstance(m, nn.Linear)], biases, strict=True):
            m.bias.copy_(b)
    assert (model(x) - y0).abs().max() > 1e-3


def test_batchnorm_between_would_change_the_function():
    # why BN between balanced layers is refused: balancing the BN-free chain of a
    # model with BN changes what the model computes
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)
    ).to(D).train()
    x = torch.randn(16, 6, dtype=D)
    with torch.no_grad():
        model[3].weight.mul_(7)
        model[3].bias.zero_()
    y0 = model(x).detach()
    ENorm([model[0], model[2], model[3]]).step()
    assert (model(x) - y0).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is a normalization layer"):
        ENorm(model)


# ---------------------------------------------------------------- objective and fixed point


@pytest.mark.parametrize("c", [1.0, 1.2])
def test_objective_never_increases_and_converges_to_c_relation(c):
    torch.manual_seed(2)
    model = conv_net()
    with torch.no_grad():
        for w in weights(model):
            w.mul_(torch.rand(w.shape[0], *[1] * (w.dim() - 1), dtype=D) * 4 + 0.2)
    e = ENorm(model, c=c)
    objs = [float(objective_ref(weights(model), c))]
    assert e.objective() == pytest.approx(objs[0], rel=1e-12)
    for _ in range(300):
        e.step()
        objs.append(float(objective_ref(weights(model), c)))
    steps = torch.tensor(objs, dtype=D)
    assert (steps[1:] <= steps[:-1] * (1 + 1e-13)).all()
    assert objs[1] < objs[0] * 0.99
    for inc, out in norms_ref(model):
        torch.testing.assert_close(out, c * inc, rtol=1e-8, atol=0)
    for (inc, out), (inc_r, out_r) in zip(e.unit_norms(), norms_ref(model), strict=True):
        torch.testing.assert_close(inc, inc_r)
        torch.testing.assert_close(out, out_r)


def test_bias_in_norm_fixed_point():
    # biases counted as incoming weights: outgoing = c * sqrt(||row||^2 + b^2), and
    # the objective sum_k c^-2k (||W_k||^2 + ||b_k||^2) never increases
    c = 1.2
    model = mlp()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.uniform_(-2, 2)
    linears = [m for m in model if isinstance(m, nn.Linear)]

    def objective():
        return sum(c ** (-2 * k) * (m.weight.pow(2).sum() + m.bias.pow(2).sum())
                   for k, m in enumerate(linears)).item()

    e = ENorm(model, c=c, bias_in_norm=True)
    objs = [objective()]
    for _ in range(300):
        e.step()
        objs.append(objective())
    assert all(b <= a * (1 + 1e-13) for a, b in zip(objs, objs[1:], strict=False))
    assert e.objective() == pytest.approx(objs[-1], rel=1e-12)
    for a, b in zip(linears[:-1], linears[1:], strict=True):
        inc = (a.weight.detach().pow(2).sum(1) + a.bias.detach().pow(2)).sqrt()
        torch.testing.assert_close(b.weight.detach().norm(dim=0), c * inc, rtol=1e-8, atol=0)


def _rescaled_objective(ws, log_d, c):
    """F(D) = sum_k c^(-2k) ||D_k^-1 W_k D_(k-1)||^2 for an MLP, D_0 = D_q = I."""
    total = 0
    for k, w in enumerate(ws):
        m = w.detach().to(D)
        if k < len(log_d):
            m = m * torch.exp(-log_d[k]).unsqueeze(1)
        if k > 0:
            m = m * torch.exp(log_d[k - 1]).unsqueeze(0)
        total = total + c ** (-2 * k) * m.pow(2).sum()
    return total


def test_fixed_point_minimizes_the_weighted_objective():
    # checks the objective of the notes (sum_k c^-2k ||W_k||^2) numerically: the fixed
    # point of the c-step is a stationary point and a minimum of it, and not of the
    # unweighted sum of squared norms
    c = 1.5
    model = mlp(widths=(5, 7, 6, 8, 4))
    e = ENorm(model, c=c)
    for _ in range(500):
        e.step()
    ws = weights(model)
    log_d = [torch.zeros(w.shape[0], dtype=D, requires_grad=True) for w in ws[:-1]]
    grads = torch.autograd.grad(_rescaled_objective(ws, log_d, c), log_d)
    assert max(g.abs().max() for g in grads) < 1e-9
    with torch.no_grad():
        f0 = float(_rescaled_objective(ws, log_d, c))
        for _ in range(20):  # random function-preserving rescalings only increase F
            pert = [torch.randn_like(d) * 0.1 for d in log_d]
            assert float(_rescaled_objective(ws, pert, c)) > f0
    grads1 = torch.autograd.grad(_rescaled_objective(ws, log_d, 1.0), log_d)
    assert max(g.abs().max() for g in grads1) > 1e-2


def test_equivalent_copies_converge_to_the_same_weights():
    torch.manual_seed(3)
    a = conv_net()
    b = copy.deepcopy(a)
    x = torch.randn(4, 3, 8, 8, dtype=D)
    # b: the same function with random positive per-unit rescalings
    with torch.no_grad():
        layers = [m for m in b if isinstance(m, (nn.Linear, nn.Conv2d))]
        for prev, nxt in zip(layers[:-1], layers[1:], strict=True):
            s = torch.rand(prev.weight.shape[0], dtype=D) * 9 + 0.1
            prev.weight.mul_(s.view(-1, *[1] * (prev.weight.dim() - 1)))
            prev.bias.mul_(s)
            if isinstance(nxt, nn.Linear):
                nxt.weight.div_(s.repeat_interleave(nxt.in_features // s.numel()))
            else:
                cin_g = nxt.weight.shape[1]
                g = s.numel() // cin_g
                cols = s.view(g, 1, cin_g).expand(g, nxt.weight.shape[0] // g, cin_g)
                nxt.weight.div_(cols.reshape(nxt.weight.shape[0], cin_g, 1, 1))
    torch.testing.assert_close(b(x), a(x), rtol=1e-12, atol=1e-12)
    assert max((wa - wb).abs().max() for wa, wb in zip(weights(a), weights(b), strict=True)) > 0.1
    ea, eb = ENorm(a, c=1.1), ENorm(b, c=1.1)
    for _ in range(400):
        ea.step()
        eb.step()
    for wa, wb in zip(weights(a), weights(b), strict=True):
        torch.testing.assert_close(wa, wb, rtol=1e-7, atol=1e-9)
    for ma, mb in zip(a, b, strict=True):
        if isinstance(ma, (nn.Linear, nn.Conv2d)):
            torch.testing.assert_close(ma.bias, mb.bias, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------- optimizer state


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_optimizer_state_scaled_inversely(opt_name):
    torch.manual_seed(4)
    model = conv_net_spatial_flatten()
    params = list(model.parameters())
    if opt_name == "sgd":
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.Adam(params, lr=0.01, amsgrad=True)
    x = torch.randn(8, 3, 6, 6, dtype=D)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    tracked = [m.weight for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    tracked += [m.bias for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    before = {p: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
              for p in tracked}
    e = ENorm(model, c=1.2, optimizer=opt)
    e.step()
    powers = {"momentum_buffer": -1, "exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2}
    checked = 0
    for p, (p0, state0) in before.items():
        ratio = p.detach() / p0  # the per-entry rescaling applied to the parameter
        assert torch.isfinite(ratio).all()
        for key, power in powers.items():
            if key in state0:
                torch.testing.assert_close(opt.state[p][key], state0[key] * ratio**power)
                checked += 1
        if opt_name == "adam":
            assert torch.equal(opt.state[p]["step"], state0["step"])
    assert checked == len(tracked) * (1 if opt_name == "sgd" else 3)
    # something was actually rescaled
    assert any((p.detach() / p0 - 1).abs().max() > 1e-3 for p, (p0, _) in before.items())


def test_unknown_optimizer_state_is_refused():
    model = mlp()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    model(torch.randn(2, 6, dtype=D)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="'sum'.*Adagrad"):
        ENorm(model, optimizer=opt).step()


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("middle,match", [
    (nn.BatchNorm2d(4), r"'1' \(BatchNorm2d\) is a normalization layer"),
    (normlab.nn.BatchNorm(4), r"'1' \(BatchNorm\) is a normalization layer"),
    (nn.GroupNorm(2, 4), r"'1' \(GroupNorm\) is a normalization layer"),
    (nn.Tanh(), r"'1' \(Tanh\) between '0' and '2' is not known to commute"),
    (nn.ReLU6(), r"'1' \(ReLU6\)"),
    (nn.GELU(), r"'1' \(GELU\)"),
    (nn.Flatten(2), r"only Flatten\(1, -1\)"),
    (nn.MaxPool2d(2, return_indices=True), "returns indices"),
])
def test_refuses_what_breaks_the_function(middle, match):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), middle, nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match=match):
        ENorm(model)


def test_bad_models():
    class NotSequential(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(TypeError, match="nn.Sequential or a list"):
        ENorm(NotSequential())
    with pytest.raises(TypeError, match=r"item \[1\]"):
        ENorm([nn.Linear(2, 2), "relu"])
    with pytest.raises(ValueError, match="1 Linear/Conv"):
        ENorm(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(ValueError, match="without an nn.Flatten"):
        ENorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="'0' has 4 output channels but '2' expects 5"):
        ENorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(5, 2, 1)))
    with pytest.raises(ValueError, match="not a multiple"):
        ENorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(10, 2)))
    with pytest.raises(ValueError, match="transposed convolution"):
        ENorm(nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)))
    with pytest.raises(ValueError, match="parametrized"):
        ENorm(nn.Sequential(weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2)))
    shared = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="appears twice"):
        ENorm([shared, nn.ReLU(), shared])
    with pytest.raises(ValueError, match="pools a flattened"):
        ENorm(nn.Sequential(nn.Linear(3, 4), nn.MaxPool1d(2), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="c must be a positive"):
        ENorm(mlp(), c=0.0)
    with pytest.raises(TypeError, match="optimizer"):
        ENorm(mlp(), optimizer="sgd")


def test_nested_sequential_names_the_layer():
    model = nn.Sequential(
        nn.Sequential(nn.Linear(3, 4), nn.ReLU()),
        nn.Sequential(nn.Sigmoid(), nn.Linear(4, 2)),
    )
    with pytest.raises(ValueError, match=r"'1\.0' \(Sigmoid\)"):
        ENorm(model)


# ---------------------------------------------------------------- balance_last_hidden


def test_balance_last_hidden_false_leaves_the_classifier_input_as_it_is():
    """The official code's variant: the hidden layer feeding the classifier keeps its
    weights and the classifier its columns; the others still converge to the c relation,
    the function is preserved and the objective never increases."""
    torch.manual_seed(3)
    model = conv_net()
    with torch.no_grad():
        for w in weights(model):
            w.mul_(torch.rand(w.shape[0], *[1] * (w.dim() - 1), dtype=D) * 4 + 0.2)
    x = torch.randn(4, 3, 8, 8, dtype=D)
    y0 = model(x).detach()
    ws = weights(model)
    last_hidden, classifier = ws[-2].detach().clone(), ws[-1].detach().clone()
    e = ENorm(model, c=1.2, balance_last_hidden=False)
    assert e.num_balanced == len(ws) - 2
    objs = [e.objective()]
    for _ in range(300):
        e.step()
        objs.append(e.objective())
    assert all(b <= a * (1 + 1e-13) for a, b in zip(objs, objs[1:], strict=False))
    torch.testing.assert_close(model(x), y0, rtol=1e-10, atol=1e-10)
    assert torch.equal(ws[-1].detach(), classifier)
    # The last hidden layer's rows are untouched; only its columns (fed by the layer
    # before) were rescaled: every row is a positive multiple of its old row per column.
    ratio = ws[-2].detach() / last_hidden
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-12)
    norms = norms_ref(model)
    for inc, out in norms[:-1]:
        torch.testing.assert_close(out, 1.2 * inc, rtol=1e-8, atol=0)
    inc, out = norms[-1]
    assert not torch.allclose(out, 1.2 * inc, rtol=1e-3)


def test_balance_last_hidden_false_needs_two_hidden_layers():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="leaves nothing to balance"):
        ENorm(model, balance_last_hidden=False)
    ENorm(model)  # the default balances the one hidden layer
