"""Real torchvision and timm models with normlab's layers and tools (issue 14, item 5).

Marked ``interop``: not part of ``make test``. ``make test-interop`` builds
``.venv-interop`` with torch 2.14.1, torchvision 0.29.1 and timm 1.0.31 and runs them.
timm and torchvision are imported inside the tests, so that collecting this file
without them (``make test``, which deselects it) needs neither.
"""

from __future__ import annotations

import copy
import functools
import tempfile

import pytest
import torch
from torch import nn

import normlab
from normlab import convert
from normlab import nn as nl

pytestmark = pytest.mark.interop

CLASSES = [nl.BatchNorm, nl.BatchRenorm, nl.SyncBatchNorm, nl.LayerNorm, nl.ChannelLayerNorm,
           nl.RMSNorm, nl.InstanceNorm, nl.GroupNorm, nl.SwitchableNorm, nl.AttentiveNorm,
           nl.OnlineNorm, nl.Identity]


def _by_name(name: str):
    """``norm_layer`` building the norm called ``name``: a plain function, since timm's
    get_norm_layer drops the positional arguments of a functools.partial."""
    def norm_layer(num_channels, **kwargs):
        return normlab.create_norm(name, num_channels, **kwargs)

    return norm_layer


NORM_LAYERS = (
    [pytest.param(_by_name(name), id=f"create_norm:{name}") for name in normlab.list_norms()]
    + [pytest.param(cls, id=cls.__name__) for cls in CLASSES]
    + [pytest.param(functools.partial(nl.GroupNorm, num_groups=32), id="GroupNorm(G=32)")]
)
TIMM_MODELS = {
    "resnet18": {},
    "efficientnet_b0": {},
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
}


def _check_trains(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    y = model(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def _normlab_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__module__.startswith("normlab.nn")]


@pytest.mark.parametrize("norm_layer", NORM_LAYERS)
def test_torchvision_resnet_with_normlab_layer(norm_layer):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5, norm_layer=norm_layer)
    assert len(_normlab_norms(model)) == 20  # every norm of a ResNet-18
    _check_trains(model, torch.randn(2, 3, 64, 64))  # 2 x 2 in the last stage: InstanceNorm


@pytest.mark.parametrize("norm_layer", NORM_LAYERS)
def test_timm_resnet_with_normlab_layer(norm_layer):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5, norm_layer=norm_layer)
    assert len(_normlab_norms(model)) == 20
    _check_trains(model, torch.randn(2, 3, 64, 64))


def _timm(name: str) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **TIMM_MODELS[name])


def _warm_up(model: nn.Module, x: torch.Tensor) -> None:
    """A few training forwards, so that running statistics are not at their init."""
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(x * (1 + i) + i)


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_swap_norm_on_timm_models(name):
    model = _timm(name)
    x = torch.randn(2, 3, 32, 32)
    if name.startswith("vit"):
        # torch.nn.LayerNorm over the last dimension -> normlab's, the same function
        model.eval()
        expected = model(x)
        swapped, replaced = convert.swap_norm(model, "ln")
        assert replaced and all(r.new is not None for r in replaced)
        assert all(m.layout == "last" for m in _normlab_norms(swapped))
        torch.testing.assert_close(swapped(x), expected)
        _check_trains(swapped, x)
        return
    norms = sum(1 for m in model.modules() if convert.is_norm_layer(m))
    swapped, replaced = convert.swap_norm(model, "gn")
    # every norm, timm's BatchNormAct2d and LayerNorm2d (channel-first) included
    assert norms >= 17 and [r for r in replaced if r.new] == replaced, [str(r) for r in replaced]
    assert len(replaced) == norms
    _check_trains(swapped, x)


def test_swap_norm_keeps_timm_norm_act_activation():
    """EfficientNet's BatchNormAct2d (BN + SiLU) swapped to normlab's BatchNorm, running
    statistics copied: the activation stays, so the eval outputs are the model's."""
    model = _timm("efficientnet_b0")
    x = torch.randn(2, 3, 32, 32)
    _warm_up(model, x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        swapped, replaced = convert.swap_norm(copy.deepcopy(model), "bn")
        assert all("kept its drop and act" in r.note for r in replaced)
        assert all(isinstance(m.act, (nn.SiLU, nn.Identity)) for m in _normlab_norms(swapped))
        torch.testing.assert_close(swapped(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_fold_batchnorm_on_timm_models_keeps_eval_outputs(name):
    model = _timm(name)
    x = torch.randn(2, 3, 32, 32)
    _warm_up(model, x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        folded = convert.fold_batchnorm(copy.deepcopy(model))
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_freeze_batchnorm_on_timm_models_keeps_running_stats(name):
    model = _timm(name)
    x = torch.randn(2, 3, 32, 32)
    _warm_up(model, x)
    convert.freeze_batchnorm(model)
    before = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    model(x).square().mean().backward()
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


def test_to_sync_batchnorm_keeps_timm_batchnormact_act_and_drop_two_ranks():
    """timm's BatchNormAct2d becomes SyncBatchNormAct (its SiLU kept): in one process it
    is the model itself; on 2 gloo ranks with half the batch each, the outputs, input
    gradients, summed parameter gradients and running statistics are the
    single-process model's on the whole batch."""
    import _dist_workers as W
    import _interop_workers as IW

    model = IW.build_efficientnet()
    timm_bnact = [m for m in model.modules() if type(m).__name__ == "BatchNormAct2d"]
    assert timm_bnact
    converted = normlab.nn.to_sync_batchnorm(copy.deepcopy(model))
    assert not any(type(m).__name__ == "BatchNormAct2d" for m in converted.modules())
    assert converted.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    g = torch.randn(4, 5, dtype=torch.float64)
    ref = IW.train_step(copy.deepcopy(model), x, g)
    one = IW.train_step(converted, x, g)  # no process group: exactly the original
    torch.testing.assert_close(one["y"], ref["y"])
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"state": model.state_dict(), "x": x, "g": g}, f"{folder}/inputs.pt")
        W.launch(IW.sync_worker, 2, folder, timeout_s=300)
        ranks = [torch.load(f"{folder}/rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["kinds"] == ["SyncBatchNormAct"]
    assert ranks[0]["acts"] == sorted({type(m.act).__name__ for m in timm_bnact})
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), ref["y"])
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), ref["dx"])
    for n, grad in ref["grads"].items():
        torch.testing.assert_close(ranks[0]["grads"][n] + ranks[1]["grads"][n], grad, msg=n)
    for n, buf in ref["buffers"].items():
        for r in ranks:
            torch.testing.assert_close(r["buffers"][n], buf, msg=n)
