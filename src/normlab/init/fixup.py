"""Optimiser parameter groups for Fixup (Zhang, Dauphin & Ma, ICLR 2019)."""

from __future__ import annotations

from torch import nn

__all__ = ["fixup_param_groups", "is_fixup_scalar"]


def is_fixup_scalar(name: str) -> bool:
    """True for the parameters Fixup trains at a reduced learning rate: those whose
    (last) name contains ``"bias"`` or ``"scale"`` (the scalar biases and multipliers,
    and the classifier's bias), the rule of the paper's code."""
    leaf = name.rsplit(".", 1)[-1]
    return "bias" in leaf or "scale" in leaf


def fixup_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 1e-4,
    scalar_lr_factor: float = 0.1,
) -> list[dict]:
    r"""The two optimiser groups of Fixup: weights at ``lr``, and the scalar biases and
    multipliers at ``lr * scalar_lr_factor`` (``lr / 10``).

    The paper trains the scalars ten times slower because each one aggregates the
    gradient of a whole layer; at the full rate training is unstable. A parameter is
    a "scalar" by :func:`is_fixup_scalar` (its name contains ``bias`` or ``scale``),
    which also puts the classifier's bias in the slow group, as the paper's code
    does. Weight decay applies to both groups (the paper: 1e-4 by default, 5e-4 in
    its CIFAR example). The paper scales the weights' rate with the batch,
    ``base_lr * batch / 128`` on CIFAR (``/ 256`` on ImageNet), and not the scalars':
    pass that scaled rate as ``lr`` and ``scalar_lr_factor = base_lr / (10 lr)`` to
    reproduce it exactly.

    Args:
        model: any module (typically :func:`normlab.models.fixup_resnet`).
        lr: learning rate of the weights.
        weight_decay: Default: 1e-4.
        scalar_lr_factor: Default: 0.1.

    Returns:
        ``[{"params": weights, "lr": lr, "weight_decay": wd, "name": "weights"},
        {"params": scalars, "lr": lr * scalar_lr_factor, "weight_decay": wd,
        "name": "scalars"}]``, ready for ``torch.optim.SGD(groups, momentum=0.9)``.
        Parameters with ``requires_grad=False`` are left out; an empty group is
        dropped.
    """
    if lr <= 0:
        raise ValueError(f"fixup_param_groups: lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"fixup_param_groups: weight_decay must be >= 0, got {weight_decay}")
    if scalar_lr_factor <= 0:
        raise ValueError(
            f"fixup_param_groups: scalar_lr_factor must be > 0, got {scalar_lr_factor}"
        )
    weights, scalars = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (scalars if is_fixup_scalar(name) else weights).append(param)
    groups = [
        {"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"},
        {"params": scalars, "lr": lr * scalar_lr_factor, "weight_decay": weight_decay,
         "name": "scalars"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("fixup_param_groups: the model has no trainable parameter")
    return groups
