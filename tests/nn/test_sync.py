"""normlab.nn.SyncBatchNorm, the synchronisation protocol and to_sync_batchnorm.

Multi-process checks run real gloo process groups on 127.0.0.1 (two groups in all:
2 ranks and 3 ranks, spawned once per module); each rank's results are compared in
this process with single-process references on the concatenated batch.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import _dist_workers as W  # tests/ is on sys.path under pytest
import normlab
from normlab import functional as NF
from normlab import stats
from normlab.nn import BatchNorm, BatchRenorm, NormBase, SyncBatchNorm, to_sync_batchnorm
from normlab.nn.sync import moments_fn_for, sync_batch_norm

D = torch.float64


def close(actual, expected, rtol=1e-5):
    """Equal within ``rtol`` relative to the size of ``expected`` (elementwise and overall)."""
    actual, expected = actual.detach(), expected.detach()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-12))


def _randn(*shape, dtype=D, gen):
    return torch.randn(*shape, dtype=dtype, generator=gen)


def _bn_case(gen, sizes, C, spatial, momentum=0.1, affine=True, steps=2):
    n = sum(sizes)
    xs = [_randn(n, C, *spatial, gen=gen) * 2 + 3 for _ in range(steps)]
    return {
        "sizes": sizes, "C": C, "momentum": momentum, "affine": affine,
        "xs": xs, "gs": [_randn(n, C, *spatial, gen=gen) for _ in range(steps)],
        "weight": torch.rand(C, dtype=D, generator=gen) + 0.5,
        "bias": _randn(C, gen=gen),
    }


def _mixture_case(gen, cls, kwargs, sizes, tail, steps=2):
    """A Switchable/Attentive Norm with perturbed parameters and running statistics
    (so that every term and component matters), and its inputs."""
    kwargs = {**kwargs, "dtype": D}
    layer = W.MIXTURES[cls](**kwargs)
    with torch.no_grad():
        for t in layer.parameters():
            t.add_(0.5 * _randn(*t.shape, gen=gen))
        for name, t in layer.named_buffers():
            if name.endswith("running_mean"):
                t.copy_(_randn(*t.shape, gen=gen))
            elif name.endswith("running_var"):
                t.copy_(torch.rand(*t.shape, dtype=D, generator=gen) + 0.5)
    n = sum(sizes)
    return {
        "cls": cls, "kwargs": kwargs, "state": layer.state_dict(), "sizes": sizes,
        "xs": [_randn(n, *tail, gen=gen) * 2 + 1 for _ in range(steps)],
        "gs": [_randn(n, *tail, gen=gen) for _ in range(steps)],
    }


def _reference(layer: nn.Module, case: dict, mask_key=None) -> dict:
    """The single-process run of the same steps on the whole (concatenated) batch."""
    if case["affine"]:
        with torch.no_grad():
            layer.weight.copy_(case["weight"])
            layer.bias.copy_(case["bias"])
    return W._train_steps(layer.train(), {**case, "sizes": [sum(case["sizes"])]}, 0, mask_key)


def _compare_steps(results: list[dict], ref: dict, sizes) -> None:
    """Concatenated outputs and input gradients, summed parameter gradients and every
    rank's buffers equal the reference's."""
    for step in range(len(ref["y"])):
        ranks = [r for r, n in zip(results, sizes, strict=True) if n is not None]
        close(torch.cat([r["y"][step] for r in ranks]), ref["y"][step])
        close(torch.cat([r["dx"][step] for r in ranks]), ref["dx"][step])
        if ref["dw"][step] is not None:
            close(sum(r["dw"][step] for r in ranks), ref["dw"][step])
            close(sum(r["db"][step] for r in ranks), ref["db"][step])
        else:
            assert all(r["dw"][step] is None for r in ranks)
    for r in results:
        if r is None:
            continue
        close(r["running_mean"], ref["running_mean"])
        close(r["running_var"], ref["running_var"])
        assert int(r["num_batches_tracked"]) == int(ref["num_batches_tracked"])


# ------------------------------------------------------------------ two ranks


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    gen = torch.Generator().manual_seed(1)
    folder = str(tmp_path_factory.mktemp("sync2"))
    inputs = {}
    case = _bn_case(gen, [1, 4], 3, (2, 3))
    case["x_eval"] = _randn(5, 3, 2, 3, gen=gen)
    inputs["bn4d"] = case
    case = _bn_case(gen, [2, 3], 3, (4,), momentum=0.3)
    case.update(r_max=1.5, d_max=0.5, state={
        "weight": case["weight"], "bias": case["bias"],
        # running statistics far enough from the batches' that r and d clip
        "running_mean": torch.tensor([3.5, 2.0, 3.0], dtype=D),
        "running_var": torch.tensor([1.0, 16.0, 4.0], dtype=D),
        "num_batches_tracked": torch.tensor(3),
    })
    inputs["renorm"] = case
    inputs["moments"] = {
        "sizes": [3, 0], "x": _randn(3, 4, 5, gen=gen) + 7,
        # each rank has its own loss sum(a[r] * mean + b[r] * var)
        "a": _randn(2, 1, 4, 1, gen=gen), "b": _randn(2, 1, 4, 1, gen=gen),
    }
    inputs["offset32"] = {
        "sizes": [3, 5], "C": 4,
        "x": (1e4 + _randn(8, 4, 6, gen=gen)).float(),
    }
    inputs["too_small"] = {"sizes": [1, 0], "C": 3, "x": _randn(1, 3, gen=gen)}
    inputs["sn4d"] = _mixture_case(gen, "SwitchableNorm", {"num_channels": 3}, [1, 4],
                                   (3, 2, 3))
    inputs["sn2d"] = _mixture_case(gen, "SwitchableNorm", {"num_channels": 4, "momentum": 0.3},
                                   [1, 3], (4,))
    inputs["an3d"] = _mixture_case(gen, "AttentiveNorm",
                                   {"num_channels": 4, "num_components": 3}, [1, 4], (4, 5))
    torch.manual_seed(2)
    inputs["ddp"] = {
        "sizes": [4, 4], "lr": 0.1, "init": W.TinyNet().double().state_dict(),
        "xs": [_randn(8, 2, 5, 5, gen=gen) for _ in range(3)],
        "ts": [torch.randint(0, 3, (8,), generator=gen) for _ in range(3)],
    }
    torch.save(inputs, os.path.join(folder, "inputs.pt"))
    W.launch(W.worker_two, 2, folder)
    results = [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False)
               for r in range(2)]
    return inputs, results


def test_two_ranks_uneven_batches_match_batchnorm_on_concatenated_batch(two_ranks):
    inputs, results = two_ranks
    case = inputs["bn4d"]
    ref_layer = nn.BatchNorm2d(3, momentum=case["momentum"], dtype=D)
    ref = _reference(ref_layer, case)
    _compare_steps([r["bn4d"] for r in results], ref, case["sizes"])
    # eval: running statistics, identical on both ranks
    with torch.no_grad():
        ref_eval = ref_layer.eval()(case["x_eval"])
    close(torch.cat([r["bn4d"]["eval_y"] for r in results]), ref_eval)
    assert results[0]["bn4d"]["state_keys"] == sorted(ref_layer.state_dict())


def test_two_ranks_communication_header_and_statistics_gathers_forward_one_reduce_backward_none_in_eval(two_ranks):  # noqa: E501
    _, results = two_ranks
    for r in results:
        # per step: the header's all_gather, the statistics' all_gather, one all_reduce
        assert r["bn4d"]["train_calls"] == {"all_gather": 4, "all_reduce": 2}  # two steps
        assert r["bn4d"]["eval_calls"] == {"all_gather": 0, "all_reduce": 0}


def test_two_ranks_running_stats_bitwise_identical_on_every_rank(two_ranks):
    _, results = two_ranks
    for key in ("running_mean", "running_var"):
        assert torch.equal(results[0]["bn4d"][key], results[1]["bn4d"][key])


def test_two_ranks_batch_renorm_protocol_matches_batch_renorm_on_concatenated_batch(two_ranks):
    inputs, results = two_ranks
    case = inputs["renorm"]
    layer = BatchRenorm(3, momentum=case["momentum"], r_max=case["r_max"],
                        d_max=case["d_max"], dtype=D)
    layer.load_state_dict(case["state"])
    ref = W._train_steps(layer.train(), {**case, "sizes": [5]}, 0)
    _compare_steps([r["renorm"] for r in results], ref, case["sizes"])
    # the clipping was active, so this is not plain batch norm in disguise
    bn = _reference(nn.BatchNorm1d(3, dtype=D), case)
    assert (ref["y"][0] - bn["y"][0]).abs().max() > 1e-2


def test_two_ranks_sync_moments_values_and_gradients_with_an_empty_rank(two_ranks):
    inputs, results = two_ranks
    case = inputs["moments"]
    x = case["x"].clone().requires_grad_(True)
    m = stats.moments(x, (0, 2))
    ((m.mean * case["a"]).sum() + (m.var * case["b"]).sum()).backward()  # sum of both losses
    for r in results:
        close(r["moments"]["mean"], m.mean.detach())
        close(r["moments"]["var"], m.var.detach())
        assert torch.equal(r["moments"]["count"], torch.full((1, 4, 1), 15.0, dtype=D))
    assert results[1]["moments"]["dx"].shape == (0, 4, 5)
    close(torch.cat([r["moments"]["dx"] for r in results]), x.grad)


def test_two_ranks_float32_far_from_zero_is_as_accurate_as_single_process(two_ranks):
    inputs, results = two_ranks
    x = inputs["offset32"]["x"]
    exact = nn.BatchNorm1d(4, dtype=D).train()(x.double())
    local = BatchNorm(4).train()(x)
    y = torch.cat([r["offset32"]["y"] for r in results])
    assert y.dtype == torch.float32
    err = (y.double() - exact).abs().max().item()
    err_local = (local.double() - exact).abs().max().item()
    assert err < 1e-3, err  # the naive E[x^2] - E[x]^2 merge gives errors of order 1
    assert err <= 2 * err_local + 1e-6, (err, err_local)
    close(results[0]["offset32"]["running_var"].double(),
          x.double().var((0, 2)) * 0.1 + 0.9, rtol=1e-4)


def test_two_ranks_one_value_in_total_raises_on_every_rank(two_ranks):
    _, results = two_ranks
    for r in results:
        assert r["too_small"] is not None
        assert "more than 1 value per channel over all 2 rank(s), got 1" in r["too_small"]


def _compare_mixture(results: list[dict], ref: dict) -> None:
    """Concatenated outputs and input gradients, summed gradients of every parameter
    and every rank's buffers equal the single-process run's, within 1e-5."""
    for step in range(len(ref["y"])):
        close(torch.cat([r["y"][step] for r in results]), ref["y"][step])
        close(torch.cat([r["dx"][step] for r in results]), ref["dx"][step])
        for name, g in ref["grads"][step].items():
            close(sum(r["grads"][step][name] for r in results), g)
    for r in results:
        assert sorted(r["buffers"]) == sorted(ref["buffers"])
        for name, b in ref["buffers"].items():
            if b.is_floating_point():
                close(r["buffers"][name], b)
            else:
                assert torch.equal(r["buffers"][name], b), name


@pytest.mark.parametrize(
    "key, gathers_per_step",
    [("sn4d", 1), ("sn2d", 1), ("an3d", 2)],  # AN: x-hat and the attention's batch norm
)
def test_two_ranks_switchable_and_attentive_norm_match_the_concatenated_batch(
    two_ranks, key, gathers_per_step
):
    inputs, results = two_ranks
    case = inputs[key]
    ref = W.train_steps_all(W.make_mixture(case), {**case, "sizes": [sum(case["sizes"])]}, 0)
    _compare_mixture([r[key] for r in results], ref)
    steps = len(case["xs"])
    for r in results:  # per moments: header and statistics gathers forward, one reduce back
        assert r[key]["calls"] == {"all_gather": 2 * gathers_per_step * steps,
                                   "all_reduce": gathers_per_step * steps}
    # rank 0 has one sample: its own batch statistics would be far from these (and
    # on (N, C) input, or for the attention, would raise)
    if key == "sn4d":
        local = W.train_steps_all(W.make_mixture(case), {**case, "sizes": [1]}, 0)
        assert (local["y"][0] - results[0][key]["y"][0]).abs().max() > 1e-2


def test_two_ranks_ddp_training_matches_single_process_double_batch(two_ranks):
    inputs, results = two_ranks
    case = inputs["ddp"]
    model = W.TinyNet().double()
    model.load_state_dict(case["init"])
    opt = torch.optim.SGD(model.parameters(), lr=case["lr"], momentum=0.9)
    for x, t in zip(case["xs"], case["ts"], strict=True):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), t).backward()
        opt.step()
    expected = model.state_dict()
    for r in results:
        assert sorted(r["ddp"]) == sorted(expected)
        for k, v in expected.items():
            if v.is_floating_point():
                close(r["ddp"][k], v)
            else:
                assert torch.equal(r["ddp"][k], v), k
    # the run moved the parameters: the comparison is not of the initial values
    assert (expected["conv.weight"] - case["init"]["conv.weight"]).abs().max() > 1e-3


# ---------------------------------------------------------------- three ranks


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    gen = torch.Generator().manual_seed(3)
    folder = str(tmp_path_factory.mktemp("sync3"))
    inputs = {
        "bn2d": _bn_case(gen, [1, 3, 5], 4, (), momentum=None),
        "mask": _bn_case(gen, [2, 1, 3], 3, (5,), affine=False),
        "empty": _bn_case(gen, [0, 2, 3], 2, (3, 2)),
        "subgroup": _bn_case(gen, [2, 3], 3, (2,)),
        "solo": _bn_case(gen, [4], 3, (2,)),
    }
    masks = []
    for _ in range(2):
        m = torch.rand(6, 1, 5, generator=gen) > 0.4
        m[:, :, 0] = True  # every sample keeps at least one element
        masks.append(m)
    inputs["mask"]["masks"] = masks
    torch.save(inputs, os.path.join(folder, "inputs.pt"))
    W.launch(W.worker_three, 3, folder)
    results = [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False)
               for r in range(3)]
    return inputs, results


def test_three_ranks_batches_1_3_5_of_nc_input_cumulative_momentum(three_ranks):
    inputs, results = three_ranks
    case = inputs["bn2d"]
    ref = _reference(nn.BatchNorm1d(4, momentum=None, dtype=D), case)
    _compare_steps([r["bn2d"] for r in results], ref, case["sizes"])


def test_three_ranks_masked_input_without_affine(three_ranks):
    inputs, results = three_ranks
    case = inputs["mask"]
    ref = _reference(BatchNorm(3, affine=False, dtype=D), case, mask_key="masks")
    _compare_steps([r["mask"] for r in results], ref, case["sizes"])


def test_three_ranks_a_rank_with_an_empty_batch(three_ranks):
    inputs, results = three_ranks
    case = inputs["empty"]
    ref = _reference(nn.BatchNorm2d(2, dtype=D), case)
    assert results[0]["empty"]["y"][0].shape == (0, 2, 3, 2)
    _compare_steps([r["empty"] for r in results], ref, case["sizes"])


def test_three_ranks_process_group_of_two_ranks(three_ranks):
    inputs, results = three_ranks
    case = inputs["subgroup"]
    ref = _reference(nn.BatchNorm1d(3, dtype=D), case)
    assert "subgroup" not in results[1]
    _compare_steps([results[0]["subgroup"], results[2]["subgroup"]], ref, case["sizes"])
    assert results[0]["converted_type"] == "SyncBatchNorm"


def test_three_ranks_group_of_one_rank_is_batchnorm_without_communication(three_ranks):
    inputs, results = three_ranks
    case = inputs["solo"]
    ref = _reference(BatchNorm(3, dtype=D), case)
    got = results[1]["solo"]
    assert got["calls"] == {"all_gather": 0, "all_reduce": 0}
    for key in ("y", "dx", "dw", "db"):
        for a, b in zip(got[key], ref[key], strict=True):
            assert torch.equal(a, b), key
    assert torch.equal(got["running_var"], ref["running_var"])


# ------------------------------------------------- single process (no process group)


def _steps(layer, xs, gs):
    out = []
    for x, g in zip(xs, gs, strict=True):
        x = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        (y * g).sum().backward()
        out.append((y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    return out


def test_without_process_group_it_is_batchnorm():
    xs = [torch.randn(4, 3, 2, 2, dtype=D) * 3 + 1 for _ in range(2)]
    gs = [torch.randn(4, 3, 2, 2, dtype=D) for _ in range(2)]
    sync = SyncBatchNorm(3, dtype=D)
    mine = BatchNorm(3, dtype=D)
    ref = nn.BatchNorm2d(3, dtype=D)
    for layer in (sync, mine, ref):
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    a, b, c = _steps(sync, xs, gs), _steps(mine, xs, gs), _steps(ref, xs, gs)
    for sa, sb, sc in zip(a, b, c, strict=True):
        for ta, tb, tc in zip(sa, sb, sc, strict=True):
            assert torch.equal(ta, tb)
            close(ta, tc)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(sync, k), getattr(mine, k))
        close(getattr(sync, k).double(), getattr(ref, k).double())
    x = torch.randn(5, 3, 2, 2, dtype=D)
    assert torch.equal(sync.eval()(x), mine.eval()(x))
    close(sync(x), ref.eval()(x))


@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (2, 3), (3, 2, 5)])
def test_autograd_function_matches_torch_batchnorm_and_updates_running_stats(shape):
    x = torch.randn(*shape, dtype=D) * 2 - 1
    g = torch.randn(*shape, dtype=D)
    c = shape[1]
    w = (torch.rand(c, dtype=D) + 0.5).requires_grad_(True)
    b = torch.randn(c, dtype=D).requires_grad_(True)
    rm, rv = torch.zeros(c, dtype=D), torch.ones(c, dtype=D)
    xa = x.clone().requires_grad_(True)
    y = sync_batch_norm(xa, rm, rv, w, b, momentum=0.2)
    (y * g).sum().backward()
    ref = nn.BatchNorm1d(c, momentum=0.2, dtype=D) if len(shape) < 4 else nn.BatchNorm2d(
        c, momentum=0.2, dtype=D)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
    xr = x.clone().requires_grad_(True)
    yr = ref.train()(xr)
    (yr * g).sum().backward()
    close(y.detach(), yr.detach())
    close(xa.grad, xr.grad)
    close(w.grad, ref.weight.grad)
    close(b.grad, ref.bias.grad)
    close(rm, ref.running_mean)
    close(rv, ref.running_var)


def test_gradcheck_of_the_custom_backward():
    x = torch.randn(3, 2, 2, 2, dtype=D, requires_grad=True)
    w = (torch.rand(2, dtype=D) + 0.5).requires_grad_(True)
    b = torch.randn(2, dtype=D, requires_grad=True)
    assert gradcheck(lambda x, w, b: sync_batch_norm(x, weight=w, bias=b), (x, w, b))
    # (N, C) with N = 2, no affine
    x2 = torch.randn(2, 3, dtype=D, requires_grad=True)
    assert gradcheck(lambda x: sync_batch_norm(x, eps=1e-3), (x2,))
    # masked: padded elements get only the direct term, the statistics ignore them
    mask = torch.tensor([[[True, True, False, True]], [[True, False, False, True]]])
    x3 = torch.randn(2, 3, 4, dtype=D, requires_grad=True)
    w3 = (torch.rand(3, dtype=D) + 0.5).requires_grad_(True)
    assert gradcheck(lambda x, w: sync_batch_norm(x, weight=w, mask=mask), (x3, w3))


def test_masked_function_path_matches_batchnorm_with_mask():
    x = torch.randn(3, 2, 6, dtype=D)
    mask = torch.rand(3, 1, 6) > 0.3
    mask[:, :, 0] = True
    g = torch.randn(3, 2, 6, dtype=D)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    rma, rva = torch.zeros(2, dtype=D), torch.ones(2, dtype=D)
    ref = BatchNorm(2, affine=False, dtype=D).train()
    ya = sync_batch_norm(xa, rma, rva, mask=mask)
    yb = ref(xb, mask=mask)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    close(ya.detach(), yb.detach())
    close(xa.grad, xb.grad)
    close(rma, ref.running_mean)
    close(rva, ref.running_var)


def test_half_precision_input_computes_in_float32():
    x = torch.randn(6, 3, 4) * 2 + 5
    y = sync_batch_norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = nn.functional.batch_norm(x.bfloat16().float(), None, None, training=True)
    close(y.float(), ref, rtol=1e-2)


def test_one_value_per_channel_raises_naming_the_layer():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sync_batch_norm(torch.randn(1, 3), name="SyncBatchNorm(3)")
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(3\).*more than 1 value"):
        SyncBatchNorm(3).train()(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(3\).*channels"):
        SyncBatchNorm(3)(torch.randn(4, 5))


def test_state_dict_loads_both_ways_with_batchnorm_and_torch():
    sync = SyncBatchNorm(4)
    sync.train()(torch.randn(8, 4, 3) * 2 + 1)
    with torch.no_grad():
        sync.weight.mul_(1.5)
        sync.bias.add_(0.3)
    sd = sync.state_dict()
    mine, torch_bn = BatchNorm(4), nn.BatchNorm1d(4)
    mine.load_state_dict(sd)
    torch_bn.load_state_dict(sd)
    back = SyncBatchNorm(4)
    back.load_state_dict(torch_bn.state_dict())
    assert sorted(sd) == sorted(torch_bn.state_dict()) == sorted(mine.state_dict())
    x = torch.randn(5, 4, 3)
    y = sync.eval()(x)
    for other in (mine, torch_bn, back):
        torch.testing.assert_close(other.eval()(x), y)


def test_not_a_torch_syncbatchnorm_so_ddp_accepts_it_on_cpu():
    layer = SyncBatchNorm(3)
    assert not isinstance(layer, nn.SyncBatchNorm)
    assert isinstance(layer, BatchNorm) and isinstance(layer, NormBase)


def test_registry_names():
    for name in ("sync_batch", "SyncBN", "sync-bn", "syncbatchnorm"):
        layer = normlab.create_norm(name, 8, momentum=0.2)
        assert type(layer) is SyncBatchNorm and layer.momentum == 0.2


# ------------------------------------------------------------------------- hook


def test_moments_fn_hook_replaces_the_batch_statistics():
    x = torch.randn(4, 2, 3, dtype=D)
    fixed = stats.Moments(torch.full((1, 2, 1), 0.5, dtype=D),
                          torch.full((1, 2, 1), 4.0, dtype=D),
                          torch.full((1, 2, 1), 100.0, dtype=D))
    seen = []

    def fake(t, dims, mask=None):
        seen.append(tuple(dims))
        return fixed

    rm, rv = torch.zeros(2, dtype=D), torch.ones(2, dtype=D)
    y = NF.batch_norm(x, rm, rv, training=True, momentum=1.0, moments_fn=fake)
    close(y, (x - 0.5) / (4.0 + 1e-5) ** 0.5)
    close(rv, torch.full((2,), 4.0 * 100 / 99, dtype=D))  # unbiased with the hook's count
    rm, rv = torch.zeros(2, dtype=D), torch.ones(2, dtype=D)
    NF.batch_renorm(x, rm, rv, training=True, momentum=1.0, moments_fn=fake)
    close(rm, torch.full((2,), 0.5, dtype=D))
    assert seen == [(0, 2), (0, 2)]
    # one value in total according to the hook: rejected
    one = stats.Moments(fixed.mean, fixed.var, torch.ones(1, 2, 1))
    with pytest.raises(ValueError, match="over all ranks, got 1"):
        NF.batch_norm(torch.randn(1, 2, dtype=D), None, None, training=True,
                     moments_fn=lambda t, d, mask=None: one)


def test_batch_renorm_protocol_without_process_group_is_unchanged():
    a = BatchRenorm(3, r_max=1.5, d_max=0.5)
    b = copy.deepcopy(a)
    b.sync_batch_stats = True
    assert moments_fn_for(a) is None and moments_fn_for(b) is None  # world size 1
    for _ in range(2):
        x = torch.randn(6, 3, 4) * 2 + 1
        assert torch.equal(a(x), b(x))
    assert torch.equal(a.running_var, b.running_var)


def test_mixtures_follow_the_protocol_and_are_unchanged_without_process_group():
    sn, an = normlab.nn.SwitchableNorm(3), normlab.nn.AttentiveNorm(3, num_components=2)
    refs = [copy.deepcopy(sn), copy.deepcopy(an)]
    model = to_sync_batchnorm(nn.Sequential(sn, nn.Sequential(an)))
    assert model[0] is sn and model[1][0] is an  # kept, not replaced
    assert sn.sync_batch_stats and an.sync_batch_stats
    assert not refs[0].sync_batch_stats and not type(sn).sync_batch_stats  # per instance
    assert moments_fn_for(sn) is None and moments_fn_for(an) is None  # world size 1
    for _ in range(2):
        x = torch.randn(5, 3, 2, 2) * 2 + 1
        assert torch.equal(model(x), refs[1](refs[0](x)))
    for a, b in ((sn, refs[0]), (an, refs[1])):
        for (name, t), u in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(t, u), name


def test_mixture_functionals_take_the_batch_moments_from_the_hook():
    from normlab.functional import mixture as FM

    x = torch.randn(4, 3, 5, dtype=D) * 2 + 1
    logits = torch.tensor([0.3, -0.2, 0.9], dtype=D)
    calls = []

    def local(t, dims, mask=None):  # what sync_moments is on one rank
        calls.append(tuple(dims))
        return stats.moments(t, dims, mask=mask)

    for fn in (None, local):
        rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
        y = FM.switchable_norm(x, logits, -logits, rm, rv, training=True, momentum=1.0,
                               moments_fn=fn)
        if fn is None:
            y0, rv0 = y, rv
    close(y, y0, rtol=1e-12)
    close(rv, rv0, rtol=1e-12)
    close(rv0, x.var((0, 2)), rtol=1e-12)  # unbiased over N x L
    assert calls == [(0, 2)]
    # the size check is on the hook's (global) count: one local sample is fine when
    # the hook says there are more, one value in total raises
    one = torch.randn(1, 3, dtype=D)

    def fake(count):
        def moments(t, dims, mask=None):
            shape = [1 if i in dims else n for i, n in enumerate(t.shape)]
            return stats.Moments(torch.zeros(shape, dtype=D), torch.ones(shape, dtype=D),
                                 torch.full(shape, float(count), dtype=D))
        return moments

    with pytest.raises(ValueError, match="switchable_norm"):
        FM.switchable_norm(one, logits, logits, training=True)
    y = FM.switchable_norm(one, logits, logits, training=True, moments_fn=fake(6))
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="over all ranks in training, got 1"):
        FM.switchable_norm(one, logits, logits, training=True, moments_fn=fake(1))
    proj = torch.randn(2, 3, dtype=D)
    with pytest.raises(ValueError, match="N=1"):
        FM.attentive_norm(one, torch.ones(2, 3, dtype=D), torch.zeros(2, 3, dtype=D), proj,
                          training=True)
    y = FM.attentive_norm(one, torch.ones(2, 3, dtype=D), torch.zeros(2, 3, dtype=D), proj,
                          training=True, moments_fn=fake(6))
    assert torch.isfinite(y).all()


def _combined(x, cuts):
    spans = list(zip(cuts[:-1], cuts[1:], strict=True))
    ms = [stats.moments(x[a:b], 0, keepdim=False) for a, b in spans]  # empty part: NaN mean
    return stats.combine_moments(torch.stack([m.mean for m in ms]),
                                 torch.stack([m.var for m in ms]),
                                 torch.tensor([[b - a] for a, b in spans]))


def test_combine_moments_equals_moments_of_concatenation():
    x = torch.randn(11, 3, dtype=D) + 1e4
    cuts = [0, 1, 1, 5, 11]  # parts of 1, 0, 4 and 6 rows
    m = _combined(x, cuts)
    ref = stats.moments(x, 0, keepdim=False)
    close(m.mean, ref.mean, rtol=1e-14)
    close(m.var, ref.var, rtol=1e-9)
    assert torch.equal(m.count, torch.full((3,), 11.0, dtype=D))
    # float32 parts far from zero: no cancellation in the merge. The error left is
    # that of the parts' float32 means (|mean| * 2**-24 each), far below the O(1)
    # error of merging sums of squares in float32.
    m32 = _combined(x.float(), cuts)
    exact = stats.moments(x.float().double(), 0, keepdim=False)
    close(m32.var.double(), exact.var, rtol=2e-3)
    means = torch.randn(3, 2, dtype=D, requires_grad=True)
    variances = (torch.rand(3, 2, dtype=D) + 0.1).requires_grad_(True)
    counts = torch.tensor([[2.0], [0.0], [5.0]], dtype=D)
    assert gradcheck(lambda m, v: tuple(stats.combine_moments(m, v, counts)[:2]),
                     (means, variances))


# ------------------------------------------------------------------- conversion


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style: batch norm followed by an activation in forward."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def _model():
    m = nn.Sequential(
        nn.Conv1d(2, 3, 1),
        nn.BatchNorm1d(3, eps=1e-3, momentum=0.3),
        nn.Sequential(nn.BatchNorm2d(3, affine=False), BatchNorm(3, momentum=None)),
        nn.BatchNorm3d(3, track_running_stats=False),
        BatchRenorm(3, r_max=2.0),
        nn.SyncBatchNorm(3),
        nn.BatchNorm1d(3, dtype=D),
    )
    m[2][1].eval()
    m[1].weight.requires_grad_(False)
    return m


def test_to_sync_batchnorm_converts_and_keeps_everything():
    model = _model()
    before = {n: (type(mod), mod) for n, mod in model.named_modules()}
    ref = copy.deepcopy(model)
    out = to_sync_batchnorm(model)
    assert out is model
    for name in ("1", "2.0", "2.1", "3", "5", "6"):
        old_type, old = before[name]
        new = model.get_submodule(name)
        assert type(new) is SyncBatchNorm, name
        assert new.eps == old.eps and new.momentum == old.momentum
        assert new.affine == old.affine
        assert new.track_running_stats == old.track_running_stats
        assert new.training == old.training
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert getattr(new, key) is getattr(old, key), (name, key)
        assert sorted(new.state_dict()) == sorted(old.state_dict())
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    assert model[6].weight.dtype == D and model[6].running_mean.dtype == D
    assert model[2][1].training is False
    assert type(model[4]) is BatchRenorm and model[4].sync_batch_stats
    assert model[4] is before["4"][1] and model[4].r_max == 2.0
    # same outputs as before the conversion (no process group: world size 1)
    x1 = torch.randn(4, 3, 5)
    close(model[1](x1), ref[1](x1))
    x2 = torch.randn(4, 3, 2, 2)
    close(model[2](x2), ref[2](x2))
    x3 = torch.randn(4, 3, 2, 2, 2)
    close(model[3](x3), ref[3](x3))
    close(model[4](x1), ref[4](x1))
    close(model[6](x1.double()), ref[6](x1.double()))
    close(model[1].running_var, ref[1].running_var)


def test_to_sync_batchnorm_root_layer_and_optimizer_references():
    bn = nn.BatchNorm2d(4)
    opt = torch.optim.SGD(bn.parameters(), lr=1.0)
    sync = to_sync_batchnorm(bn)
    assert type(sync) is SyncBatchNorm
    sync(torch.randn(3, 4, 2, 2)).pow(2).sum().backward()
    w = sync.weight.detach().clone()
    opt.step()  # the optimizer holds the same Parameter objects
    assert not torch.equal(sync.weight.detach(), w)


def test_to_sync_batchnorm_refuses_subclasses_with_their_own_forward():
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    model.add_module("block", nn.Sequential(BatchNormAct2d(4)))
    with pytest.raises(TypeError, match=r"'block\.0'.*BatchNormAct2d"):
        to_sync_batchnorm(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = to_sync_batchnorm(model, on_subclass="keep")
    assert type(kept.block[0]) is BatchNormAct2d
    assert any("block.0" in str(w.message) for w in caught)
    assert (kept(torch.randn(2, 3, 2, 2)) >= 0).all()  # the activation is still there
    with pytest.raises(ValueError, match="on_subclass"):
        to_sync_batchnorm(model, on_subclass="drop")


def test_to_sync_batchnorm_lazy_batchnorm():
    lazy = nn.Sequential(nn.LazyBatchNorm2d())
    with pytest.raises(TypeError, match="lazy"):
        to_sync_batchnorm(lazy)
    lazy(torch.randn(2, 5, 3, 3))  # initialises: becomes a BatchNorm2d
    assert type(to_sync_batchnorm(lazy)[0]) is SyncBatchNorm
