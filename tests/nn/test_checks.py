"""Constructor arguments are checked (wrong type, NaN, out of range -> an error naming
the layer, the argument and the value); empty batches behave as torch.nn's; training
on the meta device works where torch.nn's does."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from normlab import create_norm, list_norms, models
from normlab import nn as nl

C = 4

# (label, factory taking the keyword, argument, value, expected exception)
BAD_ARGS = [
    *[(n, lambda n=n, **k: create_norm(n, C, **k), "eps", v, e)
      for n in ("batch", "batch_renorm", "sync_batch", "layer", "layer_channels", "instance",
                "group", "switchable", "attentive", "online")
      for v, e in (("x", TypeError), (math.nan, ValueError), (math.inf, ValueError),
                   (-1.0, ValueError), (None, TypeError), (True, TypeError))],
    ("rms", lambda **k: nl.RMSNorm(C, **k), "eps", math.nan, ValueError),
    *[(n, lambda n=n, **k: create_norm(n, C, **k), "momentum", v, e)
      for n in ("batch", "sync_batch", "instance", "switchable", "attentive")
      for v, e in (("x", TypeError), (math.nan, ValueError), (1.5, ValueError),
                   (-0.1, ValueError), ([0.1], TypeError))],
    ("batch_renorm", lambda **k: nl.BatchRenorm(C, **k), "r_max", "3", TypeError),
    ("batch_renorm", lambda **k: nl.BatchRenorm(C, **k), "r_max", math.nan, ValueError),
    ("batch_renorm", lambda **k: nl.BatchRenorm(C, **k), "d_max", -1.0, ValueError),
    ("attentive", lambda **k: nl.AttentiveNorm(C, **k), "attention_eps", -1.0, ValueError),
    ("attentive", lambda **k: nl.AttentiveNorm(C, **k), "attention_eps", "x", TypeError),
    ("attentive", lambda **k: nl.AttentiveNorm(C, norm="group", **k), "num_groups", "2",
     TypeError),
    ("online", lambda **k: nl.OnlineNorm(C, **k), "ls_eps", -1.0, ValueError),
    ("online", lambda **k: nl.OnlineNorm(C, **k), "alpha_fwd", "0.9", TypeError),
    ("online", lambda **k: nl.OnlineNorm(C, **k), "alpha_bkw", math.nan, ValueError),
    ("online", lambda **k: nl.OnlineNorm(C, **k), "clamp_value", 0.0, ValueError),
    ("batch", lambda **k: nl.BatchNorm(C, activation="leaky_relu", **k), "negative_slope",
     math.nan, ValueError),
    ("SELU", lambda **k: nl.SELU(**k), "alpha", math.inf, ValueError),
    ("SELU", lambda **k: nl.SELU(**k), "scale", "1", TypeError),
    ("AlphaDropout", lambda **k: nl.AlphaDropout(**k), "var", math.nan, ValueError),
    ("AlphaDropout", lambda **k: nl.AlphaDropout(**k), "mean", None, TypeError),
    ("DoubleThreshold", lambda **k: nl.DoubleThreshold(C, **k), "alpha", math.nan,
     ValueError),
    ("DoubleThreshold", lambda **k: nl.DoubleThreshold(C, **k), "r_init", "x", TypeError),
    ("BNLSTM", lambda **k: nl.BNLSTM(3, 5, **k), "eps", -1.0, ValueError),
    ("BNLSTM", lambda **k: nl.BNLSTM(3, 5, **k), "momentum", "x", TypeError),
    ("BNLSTM", lambda **k: nl.BNLSTM(3, 5, **k), "dropout", None, TypeError),
    ("LNLSTM", lambda **k: nl.LNLSTM(3, 5, **k), "eps", "x", TypeError),
    ("LNLSTM", lambda **k: nl.LNLSTM(3, 5, **k), "eps", math.nan, ValueError),
    ("InputBNLSTM", lambda **k: nl.InputBNLSTM(3, 5, **k), "gamma_init", math.nan, ValueError),
]


@pytest.mark.parametrize("label, make, arg, value, exc", BAD_ARGS,
                         ids=[f"{a[0]}-{a[2]}={a[3]!r}" for a in BAD_ARGS])
def test_bad_constructor_argument_is_refused_naming_layer_argument_and_value(
        label, make, arg, value, exc):
    with pytest.raises(exc) as info:
        make(**{arg: value})
    msg = str(info.value)
    layer = type(make()).__name__
    assert msg.startswith(layer), msg  # the layer
    assert f"{arg} " in msg and "must be" in msg, msg  # the argument and what it expects
    assert f"got {value!r}" in msg, msg  # what it got


@pytest.mark.parametrize("bad", ["4", 4.0, None, True, 0])
def test_create_norm_group_checks_the_channel_count_before_choosing_groups(bad):
    with pytest.raises(ValueError, match=r"^GroupNorm: num_channels must be a positive int.*"
                                         + re.escape(repr(bad))):
        create_norm("group", bad)


@pytest.mark.parametrize("make", [
    lambda: nl.BatchNorm(C, eps=0, momentum=None),
    lambda: nl.BatchNorm(C, eps=np.float32(1e-3), momentum=np.float64(0.5)),
    lambda: nl.BatchNorm(C, momentum=torch.tensor(0.2)),
    lambda: nl.BatchNorm(C, momentum=0.0),
    lambda: nl.BatchNorm(C, momentum=1),
    lambda: nl.RMSNorm(C, eps=None),
    lambda: nl.BatchRenorm(C, r_max=math.inf, d_max=math.inf),
    lambda: nl.OnlineNorm(C, ecm="ac", clamp_value=math.inf, ls_eps=0.0),
    lambda: nl.AttentiveNorm(C, attention_eps=0.0),
    lambda: nl.BNLSTM(3, 5, momentum=None, forget_bias=None),
])
def test_valid_edge_values_are_accepted_and_kept_as_floats(make):
    m = make()
    for name in ("eps", "momentum", "r_max", "d_max", "clamp_value", "ls_eps",
                 "attention_eps"):
        v = getattr(m, name, None)
        assert v is None or type(v) is float, (name, v)


# ----------------------------------------------------------------------------- empty batch

BATCH_STAT_LAYERS = {
    "batch": lambda: nl.BatchNorm(C),
    "batch(save_memory)": lambda: nl.BatchNorm(C, save_memory=True),
    "batch_renorm": lambda: nl.BatchRenorm(C),
    "switchable": lambda: nl.SwitchableNorm(C),
    "attentive": lambda: nl.AttentiveNorm(C, 3),
    "online": lambda: nl.OnlineNorm(C),
}


@pytest.mark.parametrize("label", sorted(BATCH_STAT_LAYERS))
@pytest.mark.parametrize("shape", [(0, C, 3, 3), (2, C, 0)])
def test_empty_batch_behaves_as_torch_batchnorm(label, shape):
    m = BATCH_STAT_LAYERS[label]()
    ref = torch.nn.BatchNorm2d(C) if len(shape) == 4 else torch.nn.BatchNorm1d(C)
    m(torch.randn(6, C, 3, 3) + 2.0)  # running statistics away from their init
    ref(torch.randn(6, C, 3, 3).flatten(2) if len(shape) == 3 else torch.randn(6, C, 3, 3))
    running = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or k in "uv"}
    count, ref_count = int(m.num_batches_tracked), int(ref.num_batches_tracked)
    x = torch.randn(shape, requires_grad=True)
    y = m(x)
    x_ref = torch.randn(shape, requires_grad=True)
    y_ref = ref(x_ref)
    assert y.shape == y_ref.shape == shape
    for k, v in running.items():  # torch leaves its running statistics alone too
        assert torch.equal(v, m.state_dict()[k]), k
    # torch 2.13 counts the empty batch; normlab's counter moves alike.
    assert int(m.num_batches_tracked) - count == int(ref.num_batches_tracked) - ref_count == 1
    y.sum().backward()
    y_ref.sum().backward()
    assert x.grad.shape == shape
    for p in m.parameters():  # as torch: zero gradients, not None
        assert p.grad is not None and not p.grad.any()


def test_empty_batch_in_eval_gives_an_empty_output():
    for make in BATCH_STAT_LAYERS.values():
        m = make().eval()
        assert m(torch.randn(0, C, 3, 3)).shape == (0, C, 3, 3)


@pytest.mark.parametrize("cls", [nl.BNLSTM, nl.InputBNLSTM, nl.LNLSTM])
@pytest.mark.parametrize("batch_first", [False, True])
def test_recurrent_empty_batch_matches_torch_lstm_shapes_and_keeps_state(cls, batch_first):
    m = cls(3, 5, num_layers=2, batch_first=batch_first)
    ref = torch.nn.LSTM(3, 5, num_layers=2, batch_first=batch_first)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn((0, 2, 3) if batch_first else (2, 0, 3))
    out, (h, c) = m(x)
    out_ref, (h_ref, c_ref) = ref(x)
    assert out.shape == out_ref.shape and h.shape == h_ref.shape and c.shape == c_ref.shape
    for k, v in before.items():
        assert torch.equal(v, m.state_dict()[k]), k


# ----------------------------------------------------------------------------- meta device

META_LAYERS = {n: (lambda n=n: create_norm(n, C)) for n in list_norms() if n != "none"}
META_LAYERS.update({
    "batch(momentum=None)": lambda: nl.BatchNorm(C, momentum=None),
    "batch(save_memory)": lambda: nl.BatchNorm(C, save_memory=True),
    "batch_renorm(paper)": lambda: nl.BatchRenorm(C, warmup="paper"),
    "instance(tracked)": lambda: nl.InstanceNorm(C, track_running_stats=True),
    "online(ac)": lambda: nl.OnlineNorm(C, ecm="ac"),
})


@pytest.mark.parametrize("label", sorted(META_LAYERS))
def test_training_on_the_meta_device_infers_shapes_as_torch_does(label):
    with torch.device("meta"):
        m = META_LAYERS[label]()
        ref = torch.nn.BatchNorm2d(C)
    x = torch.empty(2, C, 3, 3, device="meta")
    y, y_ref = m.train()(x), ref.train()(x)
    assert y.device.type == "meta" and y.shape == y_ref.shape == x.shape


@pytest.mark.parametrize("cls", [nl.BNLSTM, nl.InputBNLSTM])
def test_recurrent_training_on_the_meta_device(cls):
    with torch.device("meta"):
        m = cls(3, 5, max_steps=8)
    out, (h, _) = m(torch.empty(6, 2, 3, device="meta"))
    assert out.shape == (6, 2, 5) and h.shape == (1, 2, 5) and out.device.type == "meta"


@pytest.mark.parametrize("norm", ["bn", "sn", "an", "on", "brn"])
def test_model_builder_runs_a_training_forward_on_the_meta_device(norm):
    with torch.device("meta"):
        model = models.build("cnn", (1, 8, 8), 10, norm=norm)
    y = model.train()(torch.empty(3, 1, 8, 8, device="meta"))
    assert y.shape == (3, 10) and y.device.type == "meta"
