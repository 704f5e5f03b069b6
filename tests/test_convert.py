"""normlab.convert: swap_norm, freeze_batchnorm / unfreeze_batchnorm, fold_batchnorm."""

import copy
import io
import logging
import pickle

import pytest
import torch
from torch import nn

import normlab
from normlab import convert
from normlab import nn as L


class Block(nn.Module):
    """torchvision's ResNet BasicBlock layout: conv-bn-relu-conv-bn + shortcut."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(Block(16, 16), Block(16, 48, 2))
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        return self.fc(x.mean((2, 3)))


def _warm_up_running_stats(model, steps=3, shape=(8, 3, 8, 8)):
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape) * 2 + 1)
    for m in model.modules():  # non-trivial affine parameters
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def _norm_layers(model):
    return [m for m in model.modules() if convert.is_norm_layer(m)]


# --- swap_norm -----------------------------------------------------------------------


def test_swap_to_group_norm_replaces_every_bn_and_picks_dividing_group_counts(caplog):
    model = TinyResNet()
    with caplog.at_level(logging.INFO, logger="normlab.convert"):
        model, replaced = convert.swap_norm(model, "gn")
    norms = _norm_layers(model)
    assert len(norms) == 6 and all(isinstance(m, L.GroupNorm) for m in norms)
    for m in norms:
        assert m.num_channels % m.num_groups == 0
    by_path = {r.path: r for r in replaced}
    assert set(by_path) == {
        "bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2",
        "layer1.1.downsample.1",
    }
    # C = 48: opacus's min(32, C) = 32 does not divide 48; the summary says what was chosen.
    assert model.layer1[1].bn1.num_groups == 24
    assert "num_groups=24" in by_path["layer1.1.bn1"].note
    assert "layer1.1.bn1" in caplog.text
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_swap_copies_affine_and_keeps_dtype_device_and_mode():
    model = TinyResNet().double()
    _warm_up_running_stats(model.float())
    model = model.double()
    model.layer1[0].bn1.weight.requires_grad_(False)
    model.eval()
    model.layer1[1].train()  # a mixed-mode model keeps each layer's mode
    old = {n: (m.weight.clone(), m.bias.clone(), m.training)
           for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    model, _ = convert.swap_norm(model, "ln")
    for n, m in model.named_modules():
        if n in old:
            w, b, training = old[n]
            assert isinstance(m, L.LayerNorm)
            assert m.weight.dtype == torch.float64
            torch.testing.assert_close(m.weight, w, rtol=0, atol=0)
            torch.testing.assert_close(m.bias, b, rtol=0, atol=0)
            assert m.training == training
    assert not model.layer1[0].bn1.weight.requires_grad
    assert model.layer1[0].bn2.weight.requires_grad


def test_swap_torch_bn_to_normlab_bn_keeps_the_function():
    model = TinyResNet()
    _warm_up_running_stats(model)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    swapped, replaced = convert.swap_norm(copy.deepcopy(model), "bn")
    assert all(isinstance(m, L.BatchNorm) for m in _norm_layers(swapped))
    assert all("running_var" in r.note for r in replaced)
    torch.testing.assert_close(swapped(x), expected, rtol=1e-5, atol=1e-6)
    # and back again to torch.nn's class through a callable
    back, _ = convert.swap_norm(swapped, nn.BatchNorm2d)
    assert all(type(m) is nn.BatchNorm2d for m in _norm_layers(back))
    torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-6)


def test_swap_running_stats_not_copied_between_different_statistics():
    bn = nn.BatchNorm1d(6)
    bn.running_mean.fill_(3.0)
    new, replaced = convert.swap_norm(nn.Sequential(bn), "in", track_running_stats=True)
    assert torch.equal(new[0].running_mean, torch.zeros(6))
    assert "running_mean" not in replaced[0].note


def test_swap_keeps_last_dim_layernorm_for_channel_first_norms_unless_asked():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.BatchNorm1d(8))
    model, replaced = convert.swap_norm(model, "bn")
    assert isinstance(model[1], nn.LayerNorm) and isinstance(model[2], L.BatchNorm)
    assert replaced[0].new is None and "last dimension" in replaced[0].note
    model, _ = convert.swap_norm(model, "gn", include_layer_norm=True)
    assert isinstance(model[1], L.GroupNorm) and isinstance(model[2], L.GroupNorm)
    assert model(torch.randn(3, 4)).shape == (3, 8)


def test_swap_root_module_shared_modules_and_errors():
    new, replaced = convert.swap_norm(nn.BatchNorm2d(8), "gn", num_groups=4)
    assert isinstance(new, L.GroupNorm) and new.num_groups == 4 and replaced[0].path == ""
    shared = nn.BatchNorm1d(4)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    model, _ = convert.swap_norm(model, "none")
    assert model["a"] is model["b"][0] and isinstance(model["a"], L.Identity)
    with pytest.raises(ValueError, match="unknown normalization 'nope'.*batch"):
        convert.swap_norm(TinyResNet(), "nope")
    # an explicit group count that does not divide one layer's channels names that layer
    model = TinyResNet()
    with pytest.raises(ValueError, match=r"replace bn1 .*num_groups=32 does not divide.*16"):
        convert.swap_norm(model, "gn", num_groups=32)
    assert all(isinstance(m, nn.BatchNorm2d) for m in _norm_layers(model))  # left as it was


# --- freeze_batchnorm ----------------------------------------------------------------


class BNDropNet(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = bn
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)))


@pytest.mark.parametrize("make_bn", [lambda: nn.BatchNorm2d(6), lambda: L.BatchNorm(6)])
def test_freeze_uses_and_keeps_running_stats_in_train_mode(make_bn):
    model = BNDropNet(make_bn())
    _warm_up_running_stats(model, shape=(8, 3, 5, 5))
    x = torch.randn(4, 3, 5, 5)
    model.eval()
    conv_out = model.conv(x)
    expected = model.bn(conv_out)  # eval-mode BN
    frozen = convert.freeze_batchnorm(model.train())
    state = {k: v.clone() for k, v in model.bn.state_dict().items()}
    assert frozen is model and convert.is_frozen(model.bn)
    assert model.bn.training  # the flag is only lowered during the BN's own forward
    torch.testing.assert_close(model.bn(conv_out), expected, rtol=0, atol=0)
    out = model(x)
    assert (out == 0).float().mean() > 0.2  # dropout is still active: the model trains
    for k, v in model.bn.state_dict().items():
        assert torch.equal(v, state[k]), k
    model.train()  # does not undo the freeze
    torch.testing.assert_close(model.bn(conv_out), expected, rtol=0, atol=0)
    # frozen behaviour survives deepcopy and pickling
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert convert.is_frozen(clone.bn)
        torch.testing.assert_close(clone.bn(conv_out), expected, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # the freeze adds nothing to the state_dict
    assert set(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)) == set(
        BNDropNet(make_bn()).state_dict())
    convert.unfreeze_batchnorm(model)
    assert not convert.is_frozen(model.bn)
    before = model.bn.running_mean.clone()
    model.bn(conv_out)
    assert not torch.equal(model.bn.running_mean, before)


def test_freeze_restores_training_flag_after_an_error():
    bn = L.BatchNorm(4)
    convert.freeze_batchnorm(bn)
    with pytest.raises(ValueError, match="BatchNorm"):
        bn(torch.randn(2, 5))
    assert bn.training


# --- fold_batchnorm ------------------------------------------------------------------


def _assert_folded_equal(model, x):
    model.eval()
    expected = model(x)
    folded = convert.fold_batchnorm(model)
    remaining = [m for m in folded.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d,
                                                              L.BatchNorm))]
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    return folded, remaining


def test_fold_resnet_traced_with_fx():
    model = TinyResNet()
    _warm_up_running_stats(model)
    original_state = copy.deepcopy(model.state_dict())
    folded, remaining = _assert_folded_equal(model, torch.randn(5, 3, 8, 8))
    assert remaining == []
    for k, v in model.state_dict().items():  # the original model is untouched
        assert torch.equal(v, original_state[k])


def test_fold_linear_and_normlab_bn_in_sequential():
    model = nn.Sequential(
        nn.Conv1d(3, 5, 3), L.BatchNorm(5), nn.ReLU(), nn.Flatten(),
        nn.Linear(30, 7, bias=False), nn.BatchNorm1d(7),
    )
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 8) * 3 - 1)
    _, remaining = _assert_folded_equal(model, torch.randn(6, 3, 8))
    assert remaining == []


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return self.body(x)
        return self.body(-x)


def test_fold_falls_back_to_sequential_pairs():
    model = Untraceable()
    _warm_up_running_stats(model, shape=(8, 2, 6, 6))
    _, remaining = _assert_folded_equal(model, torch.randn(3, 2, 6, 6).abs())
    assert remaining == []


def test_fold_leaves_bn_whose_input_is_shared():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding would change the second use of y

    model = TwoUsers()
    _warm_up_running_stats(model, shape=(8, 2, 4, 4))
    _, remaining = _assert_folded_equal(model, torch.randn(2, 2, 4, 4))
    assert len(remaining) == 1


def test_fold_refuses_training_mode():
    model = TinyResNet()
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        convert.fold_batchnorm(model)
    model.eval()
    model.bn1.train()
    with pytest.raises(ValueError, match="bn1"):
        convert.fold_batchnorm(model)


def test_normlab_namespace_exposes_convert():
    assert normlab.convert.swap_norm is convert.swap_norm
    assert convert.to_sync_batchnorm is normlab.nn.sync.to_sync_batchnorm
    # outside a process group the converted model computes what it did
    model = TinyResNet()
    _warm_up_running_stats(model)
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    synced = convert.to_sync_batchnorm(copy.deepcopy(model))
    assert all(isinstance(m, L.SyncBatchNorm) for m in _norm_layers(synced))
    torch.testing.assert_close(synced(x), expected, rtol=1e-5, atol=1e-6)
