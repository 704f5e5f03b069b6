"""torch's own test cases (module_db and op_db) for BatchNorm, InstanceNorm, GroupNorm,
LayerNorm, RMSNorm and their functional ops, run through torch and normlab: every case
agrees, or is refused by a documented design choice (see tests/_torch_parity.py).
``python scripts/torch_parity_table.py`` prints the table of outcomes."""

from __future__ import annotations

import re

import pytest
import torch

from _torch_parity import REFUSALS, cases, generate_samples, refusal, run_case
from normlab import nn as nl

SAMPLES = generate_samples()
CASES = cases(SAMPLES)


def test_every_module_and_op_has_cases():
    seen = {c.sample["name"] for c in CASES}
    from _torch_parity import MODULES, OPS

    assert seen == set(MODULES) | set(OPS)
    assert {c.sample["dtype"] for c in CASES} == {torch.float32, torch.float64}
    assert {c.layout for c in CASES} == {"contiguous", "channels_last", "non_contiguous"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_torch_case(case):
    expected = refusal(case)
    if expected is None:
        run_case(case)
        return
    error, pattern, _reason = expected
    with pytest.raises(error) as info:
        run_case(case)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_every_refusal_is_used_and_most_cases_agree():
    used = [sum(1 for c in CASES if predicate(c)) for predicate, *_ in REFUSALS]
    assert all(used), used  # no stale entry
    assert sum(used) < len(CASES) // 8  # refusals stay the exception


# --------------------------------------- what torch's samples do not cover, issue 14


@pytest.mark.parametrize("momentum", [0.3, None])
def test_instance_norm_running_stats_and_counter_as_torch(momentum):
    """torch.nn.InstanceNorm never counts batches and treats momentum=None as 0 (no
    update); normlab's checkpoints and eval outputs equal torch's after training."""
    theirs = torch.nn.InstanceNorm2d(3, momentum=momentum, affine=True,
                                     track_running_stats=True).double()
    ours = nl.InstanceNorm(3, momentum=momentum, affine=True, track_running_stats=True).double()
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * (step + 2) + step
        torch.testing.assert_close(ours(x), theirs(x))
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-12, atol=1e-12)
    assert int(ours.num_batches_tracked) == 0
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("cls", [nl.BatchNorm, nl.SyncBatchNorm, nl.InstanceNorm, nl.GroupNorm])
def test_bias_false_has_torch_state_dict(cls):
    if cls is nl.GroupNorm:
        ours, theirs = cls(4, 2, bias=False), torch.nn.GroupNorm(2, 4, bias=False)
    else:
        torch_cls = torch.nn.InstanceNorm2d if cls is nl.InstanceNorm else torch.nn.BatchNorm2d
        ours, theirs = cls(4, affine=True, bias=False), torch_cls(4, affine=True, bias=False)
    assert ours.bias is None and ours.weight.shape == (4,)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())


def test_batch_norm_eps_zero_refused_in_training_as_torch():
    bn = nl.BatchNorm(3, eps=0.0)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match=r"BatchNorm\(3\): eps must be > 0"):
        bn(torch.randn(4, 3))
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
    with pytest.raises(ValueError, match="eps must be positive"):  # torch refuses it too
        torch.nn.BatchNorm1d(3, eps=0.0)(torch.randn(4, 3))


def test_functional_errors_name_the_op():
    import normlab.functional as NF

    with pytest.raises(ValueError, match=r"group_norm: num_groups must be a positive int that "
                                         r"divides the 6 channels.*got 4"):
        NF.group_norm(torch.randn(2, 6, 3), 4)
    for fn in (NF.batch_norm, NF.instance_norm):
        with pytest.raises(ValueError, match="at least 2 dimensions"):
            fn(torch.randn(5), None, None)
    with pytest.raises(ValueError, match="layer_norm: expected input of shape"):
        NF.layer_norm(torch.randn(5))
    with pytest.raises(ValueError, match="group_norm: expected input of shape"):
        NF.group_norm(torch.randn(6), 2)
