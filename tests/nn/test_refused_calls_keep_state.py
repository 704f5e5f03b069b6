"""A call that raises leaves every parameter and buffer exactly as it was.

Every registered layer (and its variants), the recurrent, GHN, SELU and Alpha Dropout
layers are trained a step first (so that the running statistics are not their initial
values), then fed inputs they must refuse; the error must be a ValueError or TypeError
naming the layer, and the state_dict after the call must equal the one before,
bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from normlab import create_norm, list_norms
from normlab import nn as nl

C = 4


def _norm_layers():
    out = {n: (lambda n=n: create_norm(n, C)) for n in list_norms() if n != "none"}
    out.update({
        "batch(save_memory)": lambda: nl.BatchNorm(C, save_memory=True),
        "batch(momentum=None)": lambda: nl.BatchNorm(C, momentum=None),
        "batch_renorm(paper)": lambda: nl.BatchRenorm(C, warmup="paper"),
        "instance(tracked)": lambda: nl.InstanceNorm(C, affine=True, track_running_stats=True),
        "attentive(group)": lambda: nl.AttentiveNorm(C, 3, norm="group", num_groups=2),
        "online(ac)": lambda: nl.OnlineNorm(C, ecm="ac"),
        "double_threshold": lambda: nl.DoubleThreshold(C),
    })
    return out


NORMS = _norm_layers()


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_same_state(before, m):
    after = m.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert v.dtype == after[k].dtype and torch.equal(v, after[k]), k


def _refuses(m, call):
    before = _state(m)
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert type(m).__name__ in str(info.value), str(info.value)
    _assert_same_state(before, m)


def _bad_inputs(rank: int, train: bool, label: str):
    shape = (2, C) + (3,) * (rank - 1)
    bad = [
        [[1.0] * C] * 2,
        torch.randn(C),
        torch.randn(()),
        torch.randn(2, C + 2, *shape[2:]),
        torch.ones(shape, dtype=torch.long),
        torch.ones(shape, dtype=torch.bool),
        torch.ones(shape, dtype=torch.complex64),
    ]
    batch_stats = label.startswith(("batch", "sync", "switchable", "attentive"))
    if train and batch_stats and "group" not in label:
        bad.append(torch.randn((1, C) + (1,) * (rank - 2)))  # one value per channel
    if train and label == "attentive":
        bad.append(torch.randn(1, C, 3, 3))  # the attention's batch norm needs N >= 2
    return bad


@pytest.mark.parametrize("label", sorted(NORMS))
@pytest.mark.parametrize("train", [True, False])
def test_every_norm_layer_keeps_its_state_on_a_refused_call(label, train):
    m = NORMS[label]()
    rank = 3 if label.startswith("instance") else 2
    m.train()(torch.randn(4, C, 3, 3) + 1.0)  # running statistics away from their init
    m.train(train)
    for x in _bad_inputs(rank, train, label):
        _refuses(m, lambda x=x: m(x))


def test_attentive_norm_trained_on_one_sample_leaves_its_running_statistics():
    # The case: the error came after running_mean/running_var had moved.
    m = nl.AttentiveNorm(C)
    m(torch.randn(8, C, 3, 3) * 2 + 1)
    before = _state(m)
    with pytest.raises(ValueError, match=r"AttentiveNorm\(4\).*N=1"):
        m(torch.randn(1, C, 3, 3))
    _assert_same_state(before, m)
    assert int(m.num_batches_tracked) == 1


def _lstms():
    return {
        "BNLSTM": lambda: nl.BNLSTM(3, 5, max_steps=4),
        "InputBNLSTM": lambda: nl.InputBNLSTM(3, 5, statistics="frame", max_steps=4),
        "LNLSTM": lambda: nl.LNLSTM(3, 5),
    }


@pytest.mark.parametrize("name", sorted(_lstms()))
@pytest.mark.parametrize("train", [True, False])
def test_recurrent_layers_keep_their_state_on_a_refused_call(name, train):
    m = _lstms()[name]()
    m.train()(torch.randn(3, 4, 3))
    m.train(train)
    bad_calls = [
        lambda: m([[1.0, 2.0, 3.0]]),
        lambda: m(torch.randn(2, 3)),
        lambda: m(torch.randn(2, 2, 4)),
        lambda: m(torch.ones(2, 2, 3, dtype=torch.long)),
        lambda: m(torch.randn(2, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))),
        lambda: m(torch.randn(2, 2, 3), lengths=[3, 1]),
        lambda: m(torch.randn(2, 2, 3), lengths=torch.tensor([1.0, 2.0])),
    ]
    if name == "BNLSTM" and train:
        bad_calls.append(lambda: m(torch.randn(2, 1, 3)))  # one sequence: no step statistics
    for call in bad_calls:
        _refuses(m, call)


@pytest.mark.parametrize("make, good", [
    (lambda: nl.GHNLinear(3, 5), (2, 3)),
    (lambda: nl.GHNConv2d(3, 5, 3), (2, 3, 6, 6)),
])
def test_ghn_layers_refuse_wrong_inputs_by_name(make, good):
    m = make()
    wrong = (2, 4) if len(good) == 2 else (2, 4, 6, 6)
    for call in (lambda: m([1.0, 2.0, 3.0]), lambda: m(torch.randn(wrong)),
                 lambda: m(torch.ones(good, dtype=torch.long)),
                 lambda: m(torch.ones(good, dtype=torch.float64))):
        _refuses(m, call)
    # Under autocast torch casts both operands, so a mixed dtype is not refused there.
    x = torch.randn(good).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    torch.testing.assert_close(y.float(), m(x.float()), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("make", [nl.SELU, lambda: nl.AlphaDropout(0.1)])
def test_selu_and_alpha_dropout_refuse_non_float_input_by_name(make):
    m = make()
    for call in (lambda: m([1.0, 2.0]), lambda: m(torch.ones(3, dtype=torch.long)),
                 lambda: m(torch.ones(3, dtype=torch.bool))):
        _refuses(m, call)
