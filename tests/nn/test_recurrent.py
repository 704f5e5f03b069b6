"""Recurrent normalization: BN-LSTM (Cooijmans et al. 2017), BN on the input term only
(Laurent et al. 2016), LN-LSTM (Ba et al. 2016).

References are the paper's equations written out again here in float64, with the
statistics taken by explicit sums over the list of valid samples; torch.nn.LSTM is
the reference for the cell itself (normalization off)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd import gradcheck
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import normlab
from normlab.nn import BNLSTM, LNLSTM, InputBNLSTM
from normlab.nn.recurrent import StepBatchNorm

D = torch.float64
EPS = 1e-5


# ---------------------------------------------------------------------------------------
# Float64 reference
# ---------------------------------------------------------------------------------------


def _bn(v, idx, gamma, beta=None, record=None):
    """Batch norm of the rows of v (M, C) with the statistics of the rows idx."""
    sel = v[idx]
    n = len(idx)
    mu = sel.sum(0) / n
    var = ((sel - mu) ** 2).sum(0) / n
    if record is not None:
        record.append((mu, var * n / (n - 1)))
    y = (v - mu) / torch.sqrt(var + EPS) * gamma
    return y if beta is None else y + beta


def _ln(v, gamma, beta=None, groups=1):
    shape = v.shape
    g = v.reshape(*shape[:-1], groups, shape[-1] // groups)
    mu = g.mean(-1, keepdim=True)
    var = ((g - mu) ** 2).mean(-1, keepdim=True)
    y = ((g - mu) / torch.sqrt(var + EPS)).reshape(shape) * gamma
    return y if beta is None else y + beta


def reference_lstm(model, x, lengths, norm_x, norm_h, norm_c, h0=None, c0=None):
    """LSTM equations, time-major x (T, N, F), one layer after the other.

    norm_x(k, xw (T, N, 4H), valid[t] lists) -> (T, N, 4H)
    norm_h(k, t, hw (N, 4H), valid_t) and norm_c(k, t, c (N, H), valid_t) -> same shape
    The state of a sample is updated only at its valid steps; output 0 elsewhere.
    """
    t_len, n, _ = x.shape
    h_size = model.hidden_size
    valid = [[i for i in range(n) if t < lengths[i]] for t in range(t_len)]
    p = {k: v.detach().to(D) for k, v in model.named_parameters()}
    inp = x.to(D).clone()
    for t in range(t_len):
        for i in range(n):
            if t >= lengths[i]:
                inp[t, i] = 0.0
    hs, cs = [], []
    for k in range(model.num_layers):
        w_ih, w_hh = p[f"weight_ih_l{k}"], p[f"weight_hh_l{k}"]
        b = p[f"bias_ih_l{k}"] + p[f"bias_hh_l{k}"]
        h = torch.zeros(n, h_size, dtype=D) if h0 is None else h0[k].to(D).clone()
        c = torch.zeros(n, h_size, dtype=D) if c0 is None else c0[k].to(D).clone()
        xw = norm_x(k, torch.einsum("tnf,gf->tng", inp, w_ih), valid)
        out = torch.zeros(t_len, n, h_size, dtype=D)
        for t in range(t_len):
            idx = valid[t]
            if not idx:
                continue
            gates = xw[t] + norm_h(k, t, h @ w_hh.T, idx) + b
            gi = torch.sigmoid(gates[:, :h_size])
            gf = torch.sigmoid(gates[:, h_size : 2 * h_size])
            gg = torch.tanh(gates[:, 2 * h_size : 3 * h_size])
            go = torch.sigmoid(gates[:, 3 * h_size :])
            c_new = gf * c + gi * gg
            h_new = go * torch.tanh(norm_c(k, t, c_new, idx))
            for i in idx:
                h[i], c[i], out[t, i] = h_new[i], c_new[i], h_new[i]
        hs.append(h)
        cs.append(c)
        inp = out
    return inp, torch.stack(hs), torch.stack(cs)


def bn_lstm_reference(model, x, lengths, records=None, **kw):
    """BN-LSTM in training: per-step batch statistics over the valid samples."""
    p = {k: v.detach().to(D) for k, v in model.named_parameters()}
    rec = records if records is not None else {}

    def norm_x(k, xw, valid):
        out = xw.clone()
        for t, idx in enumerate(valid):
            if idx:
                out[t] = _bn(xw[t], idx, p[f"norm_ih.{k}.weight"],
                             record=rec.setdefault(("ih", k), []))
        return out

    def norm_h(k, t, hw, idx):
        return _bn(hw, idx, p[f"norm_hh.{k}.weight"], record=rec.setdefault(("hh", k), []))

    def norm_c(k, t, c, idx):
        return _bn(c, idx, p[f"norm_c.{k}.weight"], p[f"norm_c.{k}.bias"],
                   record=rec.setdefault(("c", k), []))

    return reference_lstm(model, x, lengths, norm_x, norm_h, norm_c, **kw)


def bn_lstm_eval_reference(model, x, lengths, last_row, row=None):
    """BN-LSTM in eval: step t uses running row min(t, last_row) (or ``row`` if given)."""
    p = {k: v.detach().to(D) for k, v in model.named_parameters()}
    b = {k: v.to(D) for k, v in model.named_buffers()}

    def bn(name, k, t, v, beta=None):
        r = min(t, last_row) if row is None else row
        mu, var = b[f"{name}.{k}.running_mean"][r], b[f"{name}.{k}.running_var"][r]
        y = (v - mu) / torch.sqrt(var + EPS) * p[f"{name}.{k}.weight"]
        return y if beta is None else y + beta

    def norm_x(k, xw, valid):
        return torch.stack([bn("norm_ih", k, t, xw[t]) for t in range(xw.shape[0])])

    def norm_h(k, t, hw, idx):
        return bn("norm_hh", k, t, hw)

    def norm_c(k, t, c, idx):
        return bn("norm_c", k, t, c, p[f"norm_c.{k}.bias"])

    return reference_lstm(model, x, lengths, norm_x, norm_h, norm_c)


def _copy_lstm_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Parameter by parameter, by torch.nn.LSTM's names."""
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.startswith(("weight_", "bias_")):
                getattr(dst, name).copy_(p)


def _data(t=5, n=4, f=3, dtype=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, n, f, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------
# Normalization off: exactly torch.nn.LSTM
# ---------------------------------------------------------------------------------------

CLASSES = [BNLSTM, InputBNLSTM, LNLSTM]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normalization_off_equals_torch_lstm(cls, batch_first, dtype):
    ref = torch.nn.LSTM(3, 5, num_layers=2, batch_first=batch_first, dtype=dtype)
    model = cls(3, 5, num_layers=2, batch_first=batch_first, normalize=False, dtype=dtype)
    _copy_lstm_weights(ref, model)
    x = _data(6, 4, 3, dtype)
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    h0 = torch.randn(2, 4, 5, dtype=dtype)
    c0 = torch.randn(2, 4, 5, dtype=dtype)
    x.requires_grad_(True)
    out, (h, c) = model(x, (h0, c0))
    out_r, (h_r, c_r) = ref(x, (h0, c0))
    tol = {"atol": 1e-12, "rtol": 0} if dtype == D else {"atol": 2e-6, "rtol": 1e-5}
    torch.testing.assert_close(out, out_r, **tol)
    torch.testing.assert_close(h, h_r, **tol)
    torch.testing.assert_close(c, c_r, **tol)
    # Gradients too, with respect to the input and every weight.
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * g_out).sum() + h.sum() + 2 * c.sum(),
                                [x, *model.parameters()])
    grads_r = torch.autograd.grad((out_r * g_out).sum() + h_r.sum() + 2 * c_r.sum(),
                                  [x, *ref.parameters()])
    for a, b in zip(grads, grads_r, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("cls", CLASSES)
def test_normalization_off_state_dict_is_torchs(cls):
    ref = torch.nn.LSTM(3, 4, num_layers=2)
    model = cls(3, 4, num_layers=2, normalize=False)
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict())  # strict
    back = torch.nn.LSTM(3, 4, num_layers=2)
    back.load_state_dict(model.state_dict())
    x = _data(4, 2, 3, torch.float32)
    torch.testing.assert_close(back(x)[0], ref(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize("batch_first", [False, True])
def test_variable_lengths_match_packed_torch_lstm(batch_first):
    """lengths, a (N, T) mask and a PackedSequence all give what torch.nn.LSTM gives on
    the packed sequence: zeros at padding, final state at each sample's last step."""
    ref = torch.nn.LSTM(3, 4, num_layers=2, batch_first=batch_first, dtype=D)
    model = BNLSTM(3, 4, num_layers=2, batch_first=batch_first, normalize=False, dtype=D)
    _copy_lstm_weights(ref, model)
    lengths = torch.tensor([3, 6, 1, 6, 4])
    x = _data(6, 5, 3)
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    hx = (torch.randn(2, 5, 4, dtype=D), torch.randn(2, 5, 4, dtype=D))
    out_p, (h_r, c_r) = ref(packed, hx)
    out_r, _ = pad_packed_sequence(out_p, batch_first=batch_first)
    mask = torch.arange(6)[None, :] < lengths[:, None]  # (N, T)
    for kwargs in ({"lengths": lengths}, {"mask": mask}, {"lengths": lengths.tolist()}):
        out, (h, c) = model(x, hx, **kwargs)
        torch.testing.assert_close(out, out_r, atol=1e-12, rtol=0)
        torch.testing.assert_close(h, h_r, atol=1e-12, rtol=0)
        torch.testing.assert_close(c, c_r, atol=1e-12, rtol=0)
    out_pk, (h, c) = model(packed, hx)
    assert isinstance(out_pk, torch.nn.utils.rnn.PackedSequence)
    torch.testing.assert_close(out_pk.data, out_p.data, atol=1e-12, rtol=0)
    assert torch.equal(out_pk.batch_sizes, out_p.batch_sizes)
    assert torch.equal(out_pk.unsorted_indices, out_p.unsorted_indices)
    torch.testing.assert_close(h, h_r, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------
# BN-LSTM
# ---------------------------------------------------------------------------------------


def test_bnlstm_init_and_buffers():
    m = BNLSTM(3, 4, num_layers=2, max_steps=7)
    for k in range(2):
        for name in ("norm_ih", "norm_hh", "norm_c"):
            bn = getattr(m, name)[k]
            c = 4 if name == "norm_c" else 16
            assert torch.equal(bn.weight, torch.full((c,), 0.1))
            assert bn.running_mean.shape == (7, c) and bn.running_var.shape == (7, c)
            assert bn.num_batches_tracked.shape == (7,)
        assert m.norm_ih[k].bias is None and m.norm_hh[k].bias is None
        assert torch.equal(m.norm_c[k].bias, torch.zeros(4))
        b = getattr(m, f"bias_ih_l{k}") + getattr(m, f"bias_hh_l{k}")
        assert torch.equal(b, torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 8))  # i f g o


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bnlstm_training_matches_reference_with_padding(momentum):
    """Per-step statistics over the valid samples only; per-step running buffers."""
    model = BNLSTM(3, 4, num_layers=2, max_steps=10, momentum=momentum, dtype=D)
    with torch.no_grad():  # move gammas/betas off their init so errors show
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    lengths = [6, 2, 6, 4, 3]
    x = _data(6, 5, 3)
    x_garbage = x.clone()
    for i, n in enumerate(lengths):
        x_garbage[n:, i] = 1e6  # padding must not matter
    records = {}
    out, (h, c) = model(x_garbage, lengths=torch.tensor(lengths))
    out_r, h_r, c_r = bn_lstm_reference(model, x, lengths, records)
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(h, h_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(c, c_r, atol=1e-10, rtol=0)
    for i, n in enumerate(lengths):
        assert torch.all(out[n:, i] == 0)
    # One batch seen: running = 0.9 * init + 0.1 * batch (or = batch for momentum=None).
    m = 1.0 if momentum is None else momentum
    for (name, k), rec in records.items():
        bn = getattr(model, f"norm_{name}")[k]
        assert len(rec) == 6
        for t, (mu, uvar) in enumerate(rec):
            torch.testing.assert_close(bn.running_mean[t], m * mu, atol=1e-12, rtol=0)
            torch.testing.assert_close(bn.running_var[t], (1 - m) + m * uvar,
                                       atol=1e-12, rtol=0)
        assert torch.all(bn.running_mean[6:] == 0) and torch.all(bn.running_var[6:] == 1)
        assert bn.num_batches_tracked.tolist() == [1] * 6 + [0] * 4


def test_bnlstm_cumulative_momentum_is_per_step():
    """momentum=None: each step averages the batches that reached it."""
    model = BNLSTM(2, 3, momentum=None, max_steps=6, dtype=D)
    xa, xb = _data(5, 4, 2, seed=1), _data(3, 4, 2, seed=2)
    rec_a, rec_b = {}, {}
    model(xa)
    bn_lstm_reference(model, xa, [5] * 4, rec_a)
    model(xb)
    bn_lstm_reference(model, xb, [3] * 4, rec_b)
    bn = model.norm_ih[0]
    assert bn.num_batches_tracked.tolist() == [2, 2, 2, 1, 1, 0]
    mu_a = torch.stack([r[0] for r in rec_a[("ih", 0)]])
    mu_b = torch.stack([r[0] for r in rec_b[("ih", 0)]])
    torch.testing.assert_close(bn.running_mean[:3], (mu_a[:3] + mu_b) / 2, atol=1e-12, rtol=0)
    torch.testing.assert_close(bn.running_mean[3:5], mu_a[3:], atol=1e-12, rtol=0)


def test_bnlstm_padding_has_no_effect_on_gradients_or_statistics():
    torch.manual_seed(1)
    lengths = torch.tensor([5, 3, 5, 2])
    x = _data(5, 4, 3)
    x_nan = x.clone()
    for i, n in enumerate(lengths.tolist()):
        x_nan[n:, i] = float("nan")
    results = []
    for inp in (x, x_nan):
        torch.manual_seed(2)  # the same weights for both runs
        model = BNLSTM(3, 4, max_steps=8, dtype=D)
        inp = inp.clone().requires_grad_(True)
        out, (h, c) = model(inp, lengths=lengths)
        (out.sum() + h.sum() + c.sum()).backward()
        grad_x = inp.grad.clone()
        for i, n in enumerate(lengths.tolist()):
            assert torch.all(grad_x[n:, i] == 0)
        results.append((out, h, c, grad_x, [p.grad for p in model.parameters()],
                        dict(model.named_buffers())))
    (o1, h1, c1, g1, pg1, b1), (o2, h2, c2, g2, pg2, b2) = results
    assert torch.isfinite(o2).all() and torch.isfinite(g2).all()
    torch.testing.assert_close(o1, o2, atol=0, rtol=0)
    torch.testing.assert_close(h1, h2, atol=0, rtol=0)
    torch.testing.assert_close(g1, g2, atol=0, rtol=0)
    for a, b in zip(pg1, pg2, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for k in b1:
        torch.testing.assert_close(b1[k], b2[k], atol=0, rtol=0)


def test_bnlstm_step_with_one_valid_sample_uses_running_statistics():
    """Steps 3 and 4 have one valid sample: no batch variance, so they use the running
    statistics of step 2 (the last step with batch statistics, after this update)."""
    model = BNLSTM(2, 3, max_steps=8, dtype=D)
    lengths = [5, 3, 3]
    x = _data(5, 3, 2)
    out, (h, c) = model(x, lengths=torch.tensor(lengths))
    p = {k: v.detach() for k, v in model.named_parameters()}
    buf = dict(model.named_buffers())

    def stepwise(name, beta=False):
        def f(k, t, v, idx):
            if len(idx) >= 2:
                return _bn(v, idx, p[f"{name}.{k}.weight"],
                           p[f"{name}.{k}.bias"] if beta else None)
            mu, var = buf[f"{name}.{k}.running_mean"][2], buf[f"{name}.{k}.running_var"][2]
            y = (v - mu) / torch.sqrt(var + EPS) * p[f"{name}.{k}.weight"]
            return y + p[f"{name}.{k}.bias"] if beta else y
        return f

    fh, fc, fx = stepwise("norm_hh"), stepwise("norm_c", beta=True), stepwise("norm_ih")

    def norm_x(k, xw, valid):
        return torch.stack([fx(k, t, xw[t], valid[t]) for t in range(xw.shape[0])])

    out_r, h_r, c_r = reference_lstm(model, x, lengths, norm_x, fh, fc)
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(h, h_r, atol=1e-10, rtol=0)
    for name in ("norm_ih", "norm_hh", "norm_c"):
        assert buf[f"{name}.0.num_batches_tracked"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
        assert torch.all(buf[f"{name}.0.running_mean"][3:] == 0)
    # Without running statistics this is an error, not a silent zero variance.
    no_stats = BNLSTM(2, 3, track_running_stats=False, dtype=D)
    with pytest.raises(ValueError, match="only 1 valid sample"):
        no_stats(x, lengths=torch.tensor(lengths))


def _train(model, lengths_list, t_len, n=4, f=3, seed=0):
    model.train()
    g = torch.Generator().manual_seed(seed)
    for lengths in lengths_list:
        x = torch.randn(t_len, n, f, generator=g, dtype=D)
        model(x.transpose(0, 1) if model.batch_first else x, lengths=torch.tensor(lengths))


def test_bnlstm_eval_uses_per_step_running_statistics():
    model = BNLSTM(3, 4, num_layers=2, max_steps=10, momentum=0.5, dtype=D)
    _train(model, [[6, 6, 6, 6]] * 5, 6)
    model.eval()
    x = _data(6, 3, 3, seed=5)
    out, (h, c) = model(x)
    out_r, h_r, c_r = bn_lstm_eval_reference(model, x, [6] * 3, last_row=9)
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(c, c_r, atol=1e-10, rtol=0)
    # Shared statistics (every step on one row) would give another output.
    for row in (0, 5):
        out_shared, _, _ = bn_lstm_eval_reference(model, x, [6] * 3, last_row=9, row=row)
        assert (out_shared - out).abs().max() > 0.05 * out.abs().max()


def test_bnlstm_eval_past_trained_steps_reuses_last_trained_step():
    """Trained on 4 steps with max_steps=10: eval steps 4..7 use step 3's statistics."""
    model = BNLSTM(3, 4, max_steps=10, dtype=D)
    _train(model, [[4, 4, 3, 4]] * 2, 4)
    assert model.norm_c[0].num_batches_tracked.tolist() == [2] * 4 + [0] * 6
    model.eval()
    x = _data(8, 3, 3, seed=6)
    out, _ = model(x)
    out_r, _, _ = bn_lstm_eval_reference(model, x, [8] * 3, last_row=3)
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=0)
    # Using the untrained rows 4..7 (mean 0, variance 1) would give another output.
    out_untrained, _, _ = bn_lstm_eval_reference(model, x, [8] * 3, last_row=9)
    assert (out_untrained - out).abs().max() > 0.05 * out.abs().max()


def test_bnlstm_max_steps_fallback():
    """Trained on 5 steps with max_steps=3: only steps 0..2 are recorded (with a
    warning), and in eval every step from 2 on uses step 2's statistics."""
    model = BNLSTM(3, 4, max_steps=3, dtype=D)
    with pytest.warns(RuntimeWarning, match="max_steps=3"):
        _train(model, [[5, 5, 5, 5]], 5)
    for name in ("norm_ih", "norm_hh", "norm_c"):
        bn = getattr(model, name)[0]
        assert bn.running_mean.shape[0] == 3
        assert bn.num_batches_tracked.tolist() == [1, 1, 1]
    model.eval()
    x = _data(7, 2, 3, seed=7)
    out, (h, c) = model(x)
    out_r, h_r, c_r = bn_lstm_eval_reference(model, x, [7] * 2, last_row=2)
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(h, h_r, atol=1e-10, rtol=0)
    rows = model.norm_hh[0].statistics_rows(0, 7)
    assert rows.tolist() == [0, 1, 2, 2, 2, 2, 2]


@pytest.mark.parametrize("cls,kw", [(BNLSTM, {}), (InputBNLSTM, {"statistics": "frame"}),
                                    (InputBNLSTM, {"statistics": "sequence"})])
def test_eval_output_independent_of_batch(cls, kw):
    model = cls(3, 4, num_layers=2, batch_first=True, max_steps=8, dtype=D, **kw)
    _train(model, [[6, 6, 6, 6], [6, 2, 5, 6]], 6)
    model.eval()
    x = _data(6, 5, 3, seed=3).transpose(0, 1).contiguous()  # (N, T, F)
    lengths = torch.tensor([6, 4, 6, 1, 3])
    out, (h, c) = model(x, lengths=lengths)
    for i in range(5):
        n = int(lengths[i])
        out_i, (h_i, c_i) = model(x[i : i + 1, :n])
        torch.testing.assert_close(out[i : i + 1, :n], out_i, atol=1e-12, rtol=0)
        torch.testing.assert_close(h[:, i : i + 1], h_i, atol=1e-12, rtol=0)
        torch.testing.assert_close(c[:, i : i + 1], c_i, atol=1e-12, rtol=0)
    # ...while in training the same sample's output does depend on its batch.
    model.train()
    out_a, _ = model(x[:3])
    out_b, _ = model(torch.cat([x[:1], x[3:]]))
    assert (out_a[0] - out_b[0]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------
# Laurent et al.: BN of the input term only
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("statistics", ["frame", "sequence"])
def test_input_bn_lstm_matches_reference(statistics):
    model = InputBNLSTM(3, 4, num_layers=2, statistics=statistics, max_steps=8, dtype=D)
    with torch.no_grad():
        for k in range(2):
            model.norm_ih[k].weight.uniform_(0.5, 1.5)
    lengths = [5, 2, 5, 4]
    x = _data(5, 4, 3, seed=4)
    p = {k: v.detach() for k, v in model.named_parameters()}
    records = []

    def norm_x(k, xw, valid):
        gamma = p[f"norm_ih.{k}.weight"]
        if statistics == "frame":
            return torch.stack([_bn(xw[t], idx, gamma, record=records)
                                for t, idx in enumerate(valid)])
        flat = xw.reshape(-1, xw.shape[-1])
        idx = [t * xw.shape[1] + i for t, ids in enumerate(valid) for i in ids]
        return _bn(flat, idx, gamma, record=records).reshape(xw.shape)

    def identity(k, t, v, idx):
        return v

    out, (h, c) = model(x, lengths=torch.tensor(lengths))
    out_r, h_r, c_r = reference_lstm(model, x, lengths, norm_x, identity, identity)
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(h, h_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(c, c_r, atol=1e-10, rtol=0)
    bn = model.norm_ih[0]
    if statistics == "frame":
        assert bn.running_mean.shape == (8, 16)
        mu = torch.stack([r[0] for r in records[:5]])
        torch.testing.assert_close(bn.running_mean[:5], 0.1 * mu, atol=1e-12, rtol=0)
    else:
        assert bn.running_mean.shape == (16,) and bn.num_batches_tracked.dim() == 0
        torch.testing.assert_close(bn.running_mean, 0.1 * records[0][0], atol=1e-12, rtol=0)
        torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * records[0][1],
                                   atol=1e-12, rtol=0)
    # No norm anywhere but on the input term.
    assert {n.split(".")[0] for n, _ in model.named_modules() if n} == {"norm_ih"}


def test_input_bn_lstm_sequence_cumulative_momentum():
    """Sequence-wise, momentum=None: the running mean is the average of the batches'
    means over all their valid steps."""
    model = InputBNLSTM(2, 3, statistics="sequence", momentum=None, dtype=D)
    means = []
    for seed, lengths in ((1, [4, 2, 3]), (2, [1, 4, 4])):
        x = _data(4, 3, 2, seed=seed)
        model(x, lengths=torch.tensor(lengths))
        xw = x @ model.weight_ih_l0.detach().T
        means.append(torch.stack([xw[t, i] for i, n in enumerate(lengths) for t in range(n)])
                     .mean(0))
    assert int(model.norm_ih[0].num_batches_tracked) == 2
    torch.testing.assert_close(model.norm_ih[0].running_mean, (means[0] + means[1]) / 2,
                               atol=1e-12, rtol=0)


def test_input_bn_lstm_sequence_eval_uses_one_set_of_statistics():
    model = InputBNLSTM(3, 4, statistics="sequence", dtype=D)
    _train(model, [[6, 3, 6, 5]] * 2, 6)
    model.eval()
    x = _data(9, 2, 3, seed=8)  # longer than any training sequence
    p = {k: v.detach() for k, v in model.named_parameters()}
    bn = model.norm_ih[0]

    def norm_x(k, xw, valid):
        return (xw - bn.running_mean) / torch.sqrt(bn.running_var + EPS) * p["norm_ih.0.weight"]

    def identity(k, t, v, idx):
        return v

    out, _ = model(x)
    out_r, _, _ = reference_lstm(model, x, [9, 9], norm_x, identity, identity)
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------
# LN-LSTM
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_gate", [False, True])
def test_lnlstm_matches_reference(per_gate):
    model = LNLSTM(3, 4, num_layers=2, per_gate=per_gate, dtype=D)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = 4 if per_gate else 1
    p = {k: v.detach() for k, v in model.named_parameters()}
    lengths = [5, 3, 5]
    x = _data(5, 3, 3, seed=9)
    h0, c0 = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 3, 4, dtype=D)
    out, (h, c) = model(x, (h0, c0), lengths=torch.tensor(lengths))
    out_r, h_r, c_r = reference_lstm(
        model, x, lengths,
        lambda k, xw, valid: _ln(xw, p[f"norm_ih.{k}.weight"], groups=g),
        lambda k, t, hw, idx: _ln(hw, p[f"norm_hh.{k}.weight"], groups=g),
        lambda k, t, cc, idx: _ln(cc, p[f"norm_c.{k}.weight"], p[f"norm_c.{k}.bias"]),
        h0=h0, c0=c0,
    )
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(h, h_r, atol=1e-10, rtol=0)
    torch.testing.assert_close(c, c_r, atol=1e-10, rtol=0)
    assert len(list(model.buffers())) == 0


@pytest.mark.parametrize("training", [True, False])
def test_lnlstm_sample_alone_equals_sample_in_batch(training):
    model = LNLSTM(3, 5, num_layers=2, batch_first=True).train(training)
    x = torch.randn(6, 7, 3)
    lengths = torch.tensor([7, 2, 5, 7, 1, 4])
    out, (h, c) = model(x, lengths=lengths)
    for i in range(6):
        n = int(lengths[i])
        out_i, (h_i, c_i) = model(x[i : i + 1, :n])
        torch.testing.assert_close(out[i : i + 1, :n], out_i, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(h[:, i : i + 1], h_i, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(c[:, i : i + 1], c_i, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kw", [
    (BNLSTM, {"track_running_stats": False}),
    (InputBNLSTM, {"statistics": "frame"}),
    (InputBNLSTM, {"statistics": "sequence"}),
    (LNLSTM, {"per_gate": True}),
])
def test_gradcheck_float64(cls, kw):
    torch.manual_seed(3)
    model = cls(2, 2, num_layers=2, dtype=D, **kw)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    x = torch.randn(3, 3, 2, dtype=D, requires_grad=True)
    h0 = torch.randn(2, 3, 2, dtype=D, requires_grad=True)
    c0 = torch.randn(2, 3, 2, dtype=D, requires_grad=True)
    lengths = torch.tensor([3, 2, 3])

    def f(x, h0, c0, *ps):
        out, (h, c) = torch.func.functional_call(
            model, dict(zip(names, ps, strict=True)), (x, (h0, c0)), {"lengths": lengths}
        )
        return out, h, c

    assert gradcheck(f, (x, h0, c0, *params), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Misc: dropout, errors, low precision, StepBatchNorm on its own
# ---------------------------------------------------------------------------------------


def test_dropout_between_layers_only_in_training():
    model = BNLSTM(3, 4, num_layers=2, dropout=0.5, max_steps=5)
    plain = BNLSTM(3, 4, num_layers=2, max_steps=5)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(5, 4, 3)
    model.eval()
    plain.eval()
    torch.testing.assert_close(model(x)[0], plain(x)[0], atol=0, rtol=0)
    model.train()
    plain.train()
    torch.manual_seed(0)
    out_d, (h_d, _) = model(x)
    out_p, (h_p, _) = plain(x)
    torch.testing.assert_close(h_d[0], h_p[0], atol=0, rtol=0)  # layer 0 untouched
    assert (out_d - out_p).abs().max() > 1e-3


def test_errors_name_the_layer():
    m = BNLSTM(3, 4)
    with pytest.raises(ValueError, match=r"BNLSTM\(3, 4\).*input_size=3"):
        m(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match=r"BNLSTM\(3, 4\).*batched input"):
        m(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\]"):
        m(torch.randn(5, 2, 3), lengths=torch.tensor([6, 2]))
    with pytest.raises(ValueError, match="not both"):
        m(torch.randn(5, 2, 3), lengths=torch.tensor([5, 2]), mask=torch.ones(2, 5, dtype=bool))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(N, T\)"):
        m(torch.randn(5, 2, 3), mask=torch.ones(5, 2, dtype=bool))
    with pytest.raises(ValueError, match=r"h_0 of shape"):
        m(torch.randn(5, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(5, 1, 3))
    with pytest.raises(ValueError, match="statistics must be"):
        InputBNLSTM(3, 4, statistics="batch")
    with pytest.raises(ValueError, match="momentum"):
        BNLSTM(3, 4, momentum=1.5)
    m.eval()
    assert m(torch.randn(5, 1, 3))[0].shape == (5, 1, 4)  # eval: batch of 1 is fine


def test_nan_batch_does_not_poison_running_statistics():
    model = BNLSTM(2, 3, max_steps=4)
    x = torch.randn(4, 3, 2)
    x[2, 1, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = model(x)
    assert torch.isnan(out[2:]).any()
    assert any("non-finite" in str(w.message) for w in caught)
    for name in ("norm_ih", "norm_hh", "norm_c"):
        bn = getattr(model, name)[0]
        assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()


@pytest.mark.parametrize("cls", CLASSES)
def test_bfloat16_close_to_float32(cls):
    model32 = cls(3, 4)
    model16 = cls(3, 4, dtype=torch.bfloat16)
    model16.load_state_dict(model32.state_dict())  # copy_ converts to bfloat16
    x = torch.randn(6, 4, 3)
    out16, _ = model16(x.to(torch.bfloat16))
    out32, _ = model32(x)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, atol=0.1, rtol=0.1)


def test_step_batch_norm_all_at_once_equals_step_by_step():
    """The input term is normalized for all steps in one call, the recurrent term one
    step per call: both must give the same outputs and buffers."""
    a = StepBatchNorm(5, max_steps=4, dtype=D)
    b = StepBatchNorm(5, max_steps=4, dtype=D)
    x = _data(6, 3, 5)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 1], [1, 0, 0], [1, 0, 0], [0, 0, 0]],
                        dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # steps past max_steps
        for _ in range(2):
            ya = a(x, 0, mask)
            yb = torch.cat([b(x[t : t + 1], t, mask[t : t + 1]) for t in range(6)])
    valid = mask[..., None].expand_as(x)
    torch.testing.assert_close(ya[valid], yb[valid], atol=1e-12, rtol=0)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(va, vb, atol=1e-12, rtol=0, msg=ka)
    assert a.num_batches_tracked.tolist() == [2, 2, 2, 0]


def test_exported():
    assert normlab.nn.BNLSTM is BNLSTM
    assert normlab.nn.LNLSTM is LNLSTM
    assert normlab.nn.InputBNLSTM is InputBNLSTM
