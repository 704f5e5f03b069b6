"""LayerNorm and RMSNorm over the last dimensions, as torch.nn (issue 14, item 3): the
sequence layout (N, L, C) of transformers, torch's state_dict, and no call that
silently normalizes something other than the torch call it looks like."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
import normlab.functional as NF
from normlab import convert
from normlab import nn as nl


def _ref_layer_norm(x, dims, weight, bias, eps):
    """Ba et al.'s equation in float64 over ``dims``, elementwise affine."""
    x = x.double()
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


def _ref_rms_norm(x, dims, weight, eps):
    x = x.double()
    y = x / torch.sqrt((x * x).mean(dims, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


def _randomize(*layers):
    gen = torch.Generator().manual_seed(1)
    shape = layers[0].weight.shape
    w, b = torch.rand(shape, generator=gen) + 0.5, torch.rand(shape, generator=gen) - 0.5
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(w)
            if getattr(layer, "bias", None) is not None:
                layer.bias.copy_(b)


@pytest.mark.parametrize("make", [lambda d: nl.LayerNorm(d, layout="last"),
                                  lambda d: nl.LayerNorm([d]), lambda d: nl.LayerNorm(d)],
                         ids=["int-last", "list", "int-inferred"])
def test_layer_norm_last_dim_equals_torch(make):
    d, eps = 8, 1e-6
    ours, theirs = make(d), nn.LayerNorm(d, eps=eps)
    ours.eps = eps
    _randomize(ours, theirs)
    x = (torch.randn(3, 5, d) * 3 + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), theirs(x2)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(y.double(), _ref_layer_norm(x, -1, ours.weight, ours.bias, eps),
                               rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    # torch's state_dict, both ways
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    nn.LayerNorm(d).load_state_dict(ours.state_dict())
    make(d).load_state_dict(theirs.state_dict())


def test_multi_dim_normalized_shape_and_no_bias_equal_torch():
    shape = (2, 3, 4)
    ours = nl.LayerNorm(shape, eps=1e-3, bias=False)
    theirs = nn.LayerNorm(shape, eps=1e-3, bias=False)
    _randomize(ours, theirs)
    assert ours.weight.shape == shape and ours.bias is None
    x = torch.randn(5, *shape)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours(x).double(),
                               _ref_layer_norm(x, (-3, -2, -1), ours.weight, None, 1e-3),
                               rtol=1e-5, atol=1e-5)
    rms, trms = nl.RMSNorm(shape, 1e-3), nn.RMSNorm(shape, 1e-3)
    _randomize(rms, trms)
    torch.testing.assert_close(rms(x), trms(x))
    torch.testing.assert_close(rms(x).double(), _ref_rms_norm(x, (-3, -2, -1), rms.weight, 1e-3),
                               rtol=1e-5, atol=1e-5)
    assert rms.state_dict().keys() == trms.state_dict().keys()


def test_rms_norm_last_dim_equals_torch_and_equations():
    ours, theirs = nl.RMSNorm(6, layout="last"), nn.RMSNorm(6)
    _randomize(ours, theirs)
    x = torch.randn(2, 7, 6) * 2 + 1
    torch.testing.assert_close(ours(x), theirs(x))
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(ours(x).double(), _ref_rms_norm(x, -1, ours.weight, eps),
                               rtol=1e-5, atol=1e-5)


def test_mask_path_over_last_dims_matches_equations_and_gradcheck():
    """The composite over normlab.stats (taken with a mask): an all-True mask gives the
    unmasked result; a mask hiding some features leaves them out of the statistics;
    gradients checked in float64."""
    ln = nl.LayerNorm(5, layout="last").double()
    _randomize(ln)
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    full = torch.ones(1, 1, 5, dtype=torch.bool)
    torch.testing.assert_close(ln(x, mask=full), ln(x))
    mask = torch.tensor([True, True, False, True, True]).view(1, 1, 5)
    y = ln(x, mask=mask)
    kept = x.detach()[..., mask.flatten()]
    ref = _ref_layer_norm(kept, -1, ln.weight[mask.flatten()], ln.bias[mask.flatten()], ln.eps)
    torch.testing.assert_close(y[..., mask.flatten()], ref)
    assert torch.autograd.gradcheck(lambda t: ln(t, mask=mask), (x,))
    rms = nl.RMSNorm(5, layout="last").double()
    assert torch.autograd.gradcheck(lambda t: rms(t, mask=mask), (x,))


def test_inferred_layout_channel_first_when_only_dim1_fits():
    ln = nl.LayerNorm(4)
    _randomize(ln)
    x = torch.randn(2, 4, 3, 5)
    w = ln.weight.view(1, 4, 1, 1)
    b = ln.bias.view(1, 4, 1, 1)
    ref = _ref_layer_norm(x, (1, 2, 3), None, None, ln.eps) * w.double() + b.double()
    torch.testing.assert_close(ln(x).double(), ref, rtol=1e-5, atol=1e-5)
    # (N, C): the same numbers in both layouts, torch's
    x2 = torch.randn(6, 4)
    first = nl.LayerNorm(4, layout="channels_first")
    first.load_state_dict(ln.state_dict())
    torch.testing.assert_close(ln(x2), first(x2))
    theirs = nn.LayerNorm(4)
    theirs.load_state_dict(ln.state_dict())
    torch.testing.assert_close(ln(x2), theirs(x2))


@pytest.mark.parametrize("cls", [nl.LayerNorm, nl.RMSNorm])
def test_ambiguous_input_raises_with_both_spellings(cls):
    layer = cls(5)
    for x in (torch.randn(2, 5, 5), torch.randn(2, 5, 3, 5)):
        with pytest.raises(ValueError) as info:
            layer(x)
        msg = str(info.value)
        name = cls.__name__
        assert msg.startswith(f"{name}(5): input of shape {tuple(x.shape)} fits both layouts")
        assert f"{name}(5, layout='last')" in msg and f"{name}(5, layout='channels_first')" in msg
        assert f"torch.nn.{name}(5)" in msg
    # each explicit spelling computes its own normalization
    x = torch.randn(2, 5, 5)
    torch.testing.assert_close(cls(5, layout="last")(x), getattr(nn, cls.__name__)(5)(x))
    assert not torch.allclose(cls(5, layout="channels_first")(x), cls(5, layout="last")(x))


def test_bad_layout_arguments():
    with pytest.raises(ValueError, match="layout must be 'channels_first', 'last' or None"):
        nl.LayerNorm(4, layout="first")
    with pytest.raises(ValueError, match="takes the channel count as an int"):
        nl.LayerNorm((2, 4), layout="channels_first")
    with pytest.raises(ValueError, match="disagree"):
        nl.LayerNorm(4, affine=False, elementwise_affine=True)
    assert nl.LayerNorm(4, elementwise_affine=False).weight is None
    with pytest.raises(ValueError, match=r"LayerNorm\(4\): expected input of shape \(\*, 4\)"):
        nl.LayerNorm(4, layout="last")(torch.randn(2, 4, 3))


def test_functional_torch_style_call_shows_both_spellings():
    x = torch.randn(2, 3, 4)
    w, b = torch.randn(4), torch.randn(4)
    with pytest.raises(TypeError) as info:
        NF.layer_norm(x, (4,), w, b)
    msg = str(info.value)
    assert "normalized_shape=" in msg and "layer_norm(x, weight, bias, eps)" in msg
    torch.testing.assert_close(NF.layer_norm(x, w, b, 1e-5, normalized_shape=(4,)),
                               torch.nn.functional.layer_norm(x, (4,), w, b))
    with pytest.raises(TypeError, match="normalized_shape="):
        NF.rms_norm(x, [4], w)
    torch.testing.assert_close(NF.rms_norm(x, w, normalized_shape=4),
                               torch.nn.functional.rms_norm(x, (4,), w))


class TinyViT(nn.Module):
    """A transformer block in timm's ViT layout: tokens (N, L, D), LayerNorm(D, 1e-6)."""

    def __init__(self, d=16):
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d, bias=False)

    def forward(self, x):
        h = self.embed(x)
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.norm(h)


def test_swap_norm_into_a_vit_keeps_its_function():
    model = TinyViT().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 16, 3)  # 16 tokens of width 16: (N, L, D) with L == D
    expected = model(x)
    state = model.state_dict()
    swapped, replaced = convert.swap_norm(model, "ln")
    assert isinstance(swapped.norm1, nl.LayerNorm) and swapped.norm1.layout == "last"
    assert swapped.norm1.eps == 1e-6 and swapped.norm.bias is None
    torch.testing.assert_close(swapped(x), expected)
    assert swapped.state_dict().keys() == state.keys()
    swapped, _ = convert.swap_norm(swapped, "rms")
    assert all(isinstance(getattr(swapped, n), nl.RMSNorm) for n in ("norm1", "norm2", "norm"))
    assert all(r.new is not None for r in replaced)


def test_create_norm_by_name_is_channel_first():
    """The lab's CNNs build norms by name: "ln"/"rms" are the channel-first layers, so
    an (N, C, H, W) input with W == C is never ambiguous."""
    for name in ("ln", "rms"):
        layer = normlab.create_norm(name, 8)
        assert layer.layout == "channels_first"
        assert layer(torch.randn(2, 8, 4, 8)).shape == (2, 8, 4, 8)
    assert normlab.create_norm("ln", 8, layout="last").layout == "last"
