"""normlab.models builders: every norm name builds, runs forward and backward."""

import pytest
import torch
from torch import nn

import normlab
from normlab import models
from normlab.models import basic
from normlab.nn import NormBase

NORMS = normlab.list_norms()




def _is_norm_layer(m: nn.Module) -> bool:
    torch_norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return isinstance(m, (NormBase, *torch_norms))


def _forward_backward(model: nn.Module, shape, n=4, num_classes=5):
    x = torch.randn(n, *shape)
    model.train()
    out = model(x)
    assert out.shape == (n, num_classes)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    hidden = [m for m in model.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)]
    assert hidden and all(m.weight.grad is not None for m in hidden)
    assert all(torch.isfinite(m.weight.grad).all() for m in hidden)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (n, num_classes)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ["cnn", "resnet"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 12)], ids=["image", "signal"])
def test_conv_models_build_and_run_with_every_norm(name, norm, shape):
    model = models.build(name, shape, 5, norm=norm, width=8)
    _forward_backward(model, shape)
    norms = [m for m in model.modules() if _is_norm_layer(m)]
    if norm == "none":
        assert norms == []
        assert not any(type(m).__module__.startswith("normlab.nn") for m in model.modules())
        assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    else:
        expected = 3 if name == "cnn" else 1 + 3 * 2 + 2  # stem, 3 blocks, 2 shortcuts
        assert len(norms) == expected
        spec = normlab.get_norm_spec(norm)
        assert all(type(m) is type(normlab.create_norm(spec.name, m.num_channels))
                   for m in norms)


@pytest.mark.parametrize("norm", NORMS)
def test_mlp_builds_and_runs_or_refuses_at_build(norm):
    shape = (1, 6, 6)
    try:
        model = models.mlp(shape, 5, norm=norm, width=16, depth=2)
    except ValueError as e:
        # only a norm that cannot work on (N, C) features may refuse, and it says so
        assert "mlp" in str(e) and normlab.get_norm_spec(norm).name in str(e)
        return
    _forward_backward(model, shape)
    norms = [m for m in model.modules() if _is_norm_layer(m)]
    assert len(norms) == (0 if norm == "none" else 2)


def test_mlp_refuses_instance_norm_clearly_and_accepts_the_usual_norms():
    with pytest.raises(ValueError, match="mlp: norm 'instance' cannot normalize"):
        models.mlp((1, 8, 8), 10, norm="in")
    for norm in ["bn", "gn", "ln", "rms", "none"]:
        _forward_backward(models.mlp((1, 8, 8), 5, norm=norm, width=16), (1, 8, 8))


@pytest.mark.parametrize("norm,cls", [("none", nn.LSTM), ("ln", normlab.nn.LNLSTM),
                                      ("bn", normlab.nn.BNLSTM),
                                      ("input_bn", normlab.nn.InputBNLSTM)])
@pytest.mark.parametrize("shape", [(1, 6, 5), (2, 7)], ids=["image_rows", "signal"])
def test_lstm_classifier_norms(norm, cls, shape):
    model = models.lstm_classifier(shape, 5, norm=norm, width=8, depth=2)
    assert type(model.rnn) is cls
    # rows of an image: H steps of C*W features; a signal: L steps of C features
    assert model.rnn.input_size == (shape[0] * shape[2] if len(shape) == 3 else shape[0])
    _forward_backward(model, shape)


def test_lstm_classifier_reads_rows_in_order():
    torch.manual_seed(0)
    model = models.lstm_classifier((1, 6, 5), 3, width=8).eval()
    x = torch.randn(2, 1, 6, 5)
    flipped = x.flip(2)  # same rows, reverse order
    assert not torch.allclose(model(x), model(flipped))
    cols = x.flip(3)  # only the order of features inside each row changes
    assert not torch.allclose(model(x), model(cols))


def test_lstm_classifier_refuses_other_norms():
    with pytest.raises(ValueError, match="not an LSTM normalization.*none"):
        models.lstm_classifier((1, 8, 8), 10, norm="gn")


def test_bias_only_without_norm_or_affine():
    with_bn = models.cnn((1, 8, 8), 3, norm="bn")
    assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d))
    no_affine = models.cnn((1, 8, 8), 3, norm="bn", affine=False)
    assert all(m.bias is not None for m in no_affine.modules() if isinstance(m, nn.Conv2d))


def test_norm_kwargs_reach_every_norm_layer():
    model = models.resnet((3, 8, 8), 10, norm="gn", width=8, num_groups=2)
    groups = {m.num_groups for m in model.modules() if isinstance(m, normlab.nn.GroupNorm)}
    assert groups == {2}


def test_init_scale_scales_hidden_weights_and_bn_removes_it():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    torch.manual_seed(1)
    a = models.cnn((1, 8, 8), 4, norm="none", init_scale=1.0)
    torch.manual_seed(1)
    b = models.cnn((1, 8, 8), 4, norm="none", init_scale=10.0)
    convs_a = [m for m in a.modules() if isinstance(m, nn.Conv2d)]
    convs_b = [m for m in b.modules() if isinstance(m, nn.Conv2d)]
    for ca, cb in zip(convs_a, convs_b, strict=True):
        torch.testing.assert_close(cb.weight, 10.0 * ca.weight)
        fan_in = ca.weight[0].numel()
        assert abs(float(ca.weight.detach().std()) / (2.0 / fan_in) ** 0.5 - 1) < 0.25  # He normal
    torch.testing.assert_close(b.head.weight, a.head.weight)  # the head is not scaled
    # ReLU network without norm: the head's input grows by 10**depth
    torch.testing.assert_close(b(x) - b.head.bias, 1000.0 * (a(x) - a.head.bias),
                               rtol=1e-4, atol=1e-4)
    # with batch norm after every conv, the function does not depend on the scale
    torch.manual_seed(1)
    c = models.cnn((1, 8, 8), 4, norm="bn", init_scale=1.0)
    torch.manual_seed(1)
    d = models.cnn((1, 8, 8), 4, norm="bn", init_scale=10.0)
    torch.testing.assert_close(c(x), d(x), rtol=1e-3, atol=1e-3)


def test_lstm_init_scale_multiplies_weight_matrices():
    torch.manual_seed(0)
    a = models.lstm_classifier((1, 4, 3), 2, width=6, init_scale=1.0)
    torch.manual_seed(0)
    b = models.lstm_classifier((1, 4, 3), 2, width=6, init_scale=0.5)
    torch.testing.assert_close(b.rnn.weight_hh_l0, 0.5 * a.rnn.weight_hh_l0)
    torch.testing.assert_close(b.rnn.bias_ih_l0, a.rnn.bias_ih_l0)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "lstm"])
def test_dropout_is_active_in_train_mode_only(name):
    kwargs = {"norm": "none"} if name == "lstm" else {"norm": "ln"}
    model = models.build(name, (1, 8, 8), 4, dropout=0.5, width=16, **kwargs)
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    x = torch.randn(6, 1, 8, 8)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    plain = models.build(name, (1, 8, 8), 4, width=16, **kwargs)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())


def test_resnet_depth_counts_blocks_and_zero_init_residual():
    model = models.resnet((3, 16, 16), 10, norm="bn", width=4, depth=3,
                          zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, basic.BasicBlock)]
    assert len(blocks) == 9  # ResNet-20
    assert all(float(b.norm2.weight.detach().abs().sum()) == 0.0 for b in blocks)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # spatial size halves entering stages 2 and 3: 16 -> 8 -> 4
    feats = model.blocks(model.stem(torch.randn(2, 3, 16, 16)))
    assert feats.shape == (2, 16, 4, 4)


def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model.*mlp"):
        models.build("vgg", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="unknown normalization"):
        models.build("cnn", (1, 8, 8), 10, norm="nonsense")
    with pytest.raises(ValueError, match="in_shape"):
        models.build("cnn", (8, 8, 8, 8), 10)
    with pytest.raises(ValueError, match="init_scale"):
        models.build("cnn", (1, 8, 8), 10, init_scale=0.0)
    with pytest.raises(ValueError, match="dropout"):
        models.build("mlp", (1, 8, 8), 10, dropout=1.0)
    assert models.list_models() == ["mlp", "cnn", "resnet", "lstm"]


def test_callable_norm_factory():
    model = models.cnn((1, 8, 8), 3, norm=nn.BatchNorm2d, width=4)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
