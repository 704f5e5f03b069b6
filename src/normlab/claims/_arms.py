"""The arms of claims 14 to 17 that :func:`normlab.claims.design.train_run` cannot build
or train, and their one run function, :func:`arm_run`.

``train_run`` builds a :func:`normlab.models.build` model and passes JSON
``train_kwargs`` to :func:`normlab.train.train`; these arms need a builder of their
own (a SELU network, weight-normalized MLPs with or without Arpit et al.'s init,
Fixup's ResNet) or Python objects in the loop (Fixup's two optimiser groups, an ENorm
cycle after every step, Arpit et al.'s warm-up scheduler). :func:`arm_run` names the
arm by a string and builds those objects itself, so a run stays a module-level
function of JSON arguments (content-keyed by :meth:`RunContext.map`), trained by the
one loop, :func:`normlab.train.train`, on the seed's split of
:func:`normlab.claims.design.split`, with the same initial-weight seeding
(``torch.manual_seed(seed)`` before building) and batch order as ``train_run``.

Not a claim module (the leading underscore keeps :func:`normlab.claims.all_claims`
from loading it as one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["MLP_ARMS", "RESNET_ARMS", "WN_RESNET_ARMS", "ARMS", "build_arm", "wn_resnet",
           "arm_run", "arpit_warmup_cosine", "loss_or_chance", "dot_plot"]

#: MLP arms: the SELU network (LeCun init), ReLU MLPs (He init) without and with BN,
#: and ReLU MLPs whose hidden layers are weight-normalized, with torch's default
#: init (g = ||v||) or Arpit et al.'s.
MLP_ARMS = ("selu", "relu", "relu_bn", "wn_standard", "wn_arpit")
#: ResNet arms: CIFAR-style ResNet with BN, without normalization (He init), Fixup.
RESNET_ARMS = ("resnet_bn", "resnet_plain", "fixup")
#: Arpit et al.'s weight-normalized ResNet without BN (:func:`wn_resnet`), with the
#: standard init (He-normal ``v``, ``g = ||v||``) or Arpit et al.'s.
WN_RESNET_ARMS = ("wn_resnet_standard", "wn_resnet_arpit")
ARMS = MLP_ARMS + RESNET_ARMS + WN_RESNET_ARMS


def wn_mlp(in_features: int, num_classes: int, width: int, depth: int):
    """Flatten, ``depth`` x [weight-normalized Linear -> ReLU], a plain Linear head (the
    paper's classifier is not weight-normalized)."""
    from torch import nn

    from normlab.nn import weight_norm

    layers: list = [nn.Flatten()]
    fan_in = in_features
    for _ in range(depth):
        layers += [weight_norm(nn.Linear(fan_in, width)), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


def _wn_block_class():
    from torch import nn

    class WNBlock(nn.Module):
        """``x + conv2(relu(conv1(x)))``, the shortcut a 1x1 convolution where the
        shape changes; no ReLU after the sum (Arpit et al.'s WN ResNet)."""

        def __init__(self, conv1, conv2, shortcut):
            super().__init__()
            self.conv1, self.conv2, self.shortcut = conv1, conv2, shortcut

        def forward(self, x):
            identity = x if self.shortcut is None else self.shortcut(x)
            return identity + self.conv2(self.conv1(x).relu())

    return WNBlock


def wn_resnet(in_shape: Sequence[int], num_classes: int, width: int, depth: int,
              init: str = "arpit", generator=None):
    r"""Arpit, Campos & Bengio's weight-normalized CIFAR ResNet (no BN) of ``depth``
    ``6n + 2``: a 3x3 stem of ``width`` channels (no ReLU after it), 3 stages of ``n``
    blocks ``out = x + conv2(relu(conv1(x)))`` with ``width``, ``2 width``, ``4 width``
    channels (stride 2 and a 1x1 shortcut at the first block of stages 2 and 3), global
    average pooling and a plain ``Linear`` classifier. Every convolution is
    weight-normalized (:func:`normlab.nn.weight_norm`, one norm per output channel),
    with its bias.

    ``init="arpit"``: :func:`normlab.init.arpit_init_` with the paper's gains (stem and
    shortcut 1, ``conv1`` 2, ``conv2`` ``1/n``): orthogonal ``v``, zero biases,
    ``g = sqrt(gain C_in / C_out)``. ``init="standard"``: the paper's baseline, ``v``
    He-normal (``N(0, 2 / fan_in)``), zero biases and torch's weight-norm init
    ``g = ||v||`` (the layer computes ``w = v``). The caller seeds torch's RNG (the
    classifier, and the standard init's ``v``); ``generator`` draws Arpit's ``v``.

    Shape: input ``(N, *in_shape)``, output ``(N, num_classes)``.
    """
    from torch import nn

    from normlab.init import arpit_init_
    from normlab.nn import weight_norm

    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"claims._arms: a WN ResNet's depth must be 6n + 2 >= 8, got {depth}")
    if init not in ("arpit", "standard"):
        raise ValueError(f"claims._arms: wn_resnet init must be 'arpit' or 'standard', "
                         f"got {init!r}")
    n = (depth - 2) // 6

    def conv(c_in: int, c_out: int, k: int, stride: int = 1, role: str = "relu"):
        layer = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2)
        if init == "standard":  # He et al.'s normal init, before g = ||v|| copies it
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        layer = weight_norm(layer)
        layer.arpit_role = role
        return layer

    block = _wn_block_class()
    stages, c_in = [], width
    for stage in range(3):
        c_out, blocks = width * 2 ** stage, []
        for i in range(n):
            stride = 2 if stage and not i else 1
            short = conv(c_in, c_out, 1, stride, "linear") if stride > 1 or c_in != c_out \
                else None
            blocks.append(block(conv(c_in, c_out, 3, stride),
                                conv(c_out, c_out, 3, role="residual"), short))
            c_in = c_out
        stages.append(nn.Sequential(*blocks))
    net = nn.Sequential(conv(in_shape[0], width, 3, role="linear"), *stages,
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
    if init == "arpit":
        arpit_init_(net, blocks_per_stage=n, generator=generator)
    return net


def build_arm(arm: str, in_shape: Sequence[int], num_classes: int, width: int, depth: int,
              seed: int = 0):
    """The model of ``arm`` (one of :data:`ARMS`); ``depth`` is hidden layers for an MLP
    and the ResNet's depth ``6n + 2`` for a ResNet arm (:func:`wn_resnet` for
    :data:`WN_RESNET_ARMS`). The caller seeds torch's RNG."""
    import torch
    from torch import nn

    from normlab import models
    from normlab.init import arpit_init_

    if arm not in ARMS:
        raise ValueError(f"claims._arms: unknown arm {arm!r}; known: {', '.join(ARMS)}")
    features = math.prod(in_shape)
    if arm == "selu":
        return nn.Sequential(nn.Flatten(), models.self_normalizing_mlp(
            features, width, depth, num_classes))
    if arm in ("relu", "relu_bn"):
        return models.build("mlp", in_shape, num_classes, norm="bn" if arm == "relu_bn"
                            else "none", width=width, depth=depth)
    if arm in WN_RESNET_ARMS:
        return wn_resnet(in_shape, num_classes, width, depth, arm.removeprefix("wn_resnet_"),
                         torch.Generator().manual_seed(seed))
    if arm.startswith("wn_"):
        net = wn_mlp(features, num_classes, width, depth)
        if arm == "wn_arpit":
            arpit_init_(net, generator=torch.Generator().manual_seed(seed))
        return net
    if (depth - 2) % 6:
        raise ValueError(f"claims._arms: a ResNet's depth must be 6n + 2, got {depth}")
    if arm == "fixup":
        return models.fixup_resnet(depth, num_classes, width=width, in_channels=in_shape[0])
    return models.resnet(in_shape, num_classes, norm="bn" if arm == "resnet_bn" else "none",
                         width=width, depth=(depth - 2) // 6)


def _loop_options(arm: str, model, lr: float, momentum: float, weight_decay: float,
                  warmup_steps: int, enorm_c: float | None,
                  scalar_lr: float | None) -> dict:
    """The keyword arguments of :func:`normlab.train.train` that hold Python objects:
    Fixup's optimiser groups, ENorm's cycle after every step, Arpit et al.'s warm-up."""
    import torch

    from normlab.init import arpit_warmup, fixup_param_groups
    from normlab.nn import ENorm

    opts: dict = {"momentum": momentum, "weight_decay": weight_decay}
    holder: dict = {}

    def make_opt(params):
        if arm == "fixup":  # weights at lr, scalar biases and multipliers at scalar_lr
            factor = (scalar_lr if scalar_lr is not None else lr / 10) / lr
            groups = fixup_param_groups(model, lr, weight_decay, factor)
            opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if enorm_c is not None:
            # the official code's layers: every hidden layer but the classifier's input
            holder["enorm"] = ENorm([*model.features, model.head], c=enorm_c, optimizer=opt,
                                    balance_last_hidden=False)
        return opt

    opts["optimizer"] = make_opt
    if enorm_c is not None:
        opts["callbacks"] = [lambda step, net, info: holder["enorm"].step()]
    if warmup_steps:
        opts["scheduler"] = lambda opt: arpit_warmup(opt, warmup_steps)
    return opts


def arm_run(*, arm: str, data: str = "digits", width: int = 64, depth: int = 8,
            batch_size: int = 32, lr: float = 0.01, steps: int = 200, seed: int = 0,
            momentum: float = 0.9, weight_decay: float = 0.0, schedule: str = "constant",
            warmup_steps: int = 0, enorm_c: float | None = None,
            scalar_lr: float | None = None, eval_every: int | None = None,
            curve: bool = False, data_dir: str | None = None, augment: str | None = None,
            log_every: int = 1) -> dict:
    """Build ``arm`` with ``torch.manual_seed(seed)``, train it with
    :func:`normlab.train.train` on the seed's fit split of ``data`` and return the
    training result (on :func:`normlab.claims.design.current_device`, as ``train_run``)
    with the final validation accuracy and loss (``val_acc``,
    ``val_loss``: None when the run diverged) and ``num_classes``.

    ``warmup_steps`` > 0 runs Arpit et al.'s quadratic warm-up
    (:func:`normlab.init.arpit_warmup`, then the constant rate; with ``schedule=
    "cosine"`` the ramp multiplies the cosine the other arms follow,
    :func:`arpit_warmup_cosine`); ``enorm_c`` runs one ENorm cycle (``c = enorm_c``) after every
    step on a ``relu`` MLP; ``scalar_lr`` is Fixup's rate of its scalars (default
    ``lr / 10``). ``curve=False`` drops the per-step training curve.

    ``data_dir`` reads ``data`` from that folder (``data="cifar10"``: the official
    test set, a validation fifth of the training images drawn by the seed; see
    :func:`normlab.claims.design.split`); ``augment`` and ``log_every`` pass to
    :func:`normlab.train.train` (``"crop_flip"``: random 4-pixel-padded crops and
    flips). The defaults (embedded data, no augmentation, a log every step) are the
    behaviour before these options. The result's ``config["param_groups"]`` lists the
    optimiser's groups as built, before any schedule: their name, rate, weight decay,
    momentum and how many tensors and values each trains."""
    import torch

    from normlab.claims.design import current_device, split, with_validation
    from normlab.train import train

    if enorm_c is not None and arm != "relu":
        raise ValueError(f"claims._arms: ENorm needs the plain 'relu' MLP, got arm {arm!r}")
    fit, (x_val, y_val) = split(data, seed, data_dir=data_dir)
    device = current_device()
    torch.manual_seed(seed)
    net = build_arm(arm, fit.in_shape, fit.num_classes, width, depth, seed)
    opts = _loop_options(arm, net, lr, momentum, weight_decay, warmup_steps, enorm_c,
                         scalar_lr)
    if warmup_steps and schedule == "cosine":  # one scheduler owns both
        opts["scheduler"] = lambda opt: arpit_warmup_cosine(opt, warmup_steps, steps)
        schedule = "constant"
    groups: list = []
    opts["optimizer"] = _recording(opts["optimizer"], groups)
    result = train(net, fit, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                   schedule=schedule, eval_every=eval_every, progress=False, device=device,
                   augment=augment, log_every=log_every, **opts).to_dict()
    result["config"]["param_groups"] = groups
    return with_validation(result, net, (x_val, y_val), fit.num_classes, device, curve)


def arpit_warmup_cosine(optimizer, warmup_steps: int, steps: int):
    r"""Arpit et al.'s quadratic warm-up on top of the training loop's cosine: every
    group's rate at (0-based) step ``t`` is

    .. math::
        \text{lr}_t = \text{lr} \cdot \min(1, t / T)^2 \cdot
        \tfrac12 \bigl(1 + \cos(\pi t / \text{steps})\bigr)

    (``T`` = ``warmup_steps``; the second factor is :func:`normlab.train.lr_at`'s
    cosine at rate 1, the schedule of the arms without warm-up), as the paper's code
    ramps from 0 towards its schedule's current rate. A torch ``LambdaLR`` subclass
    named ``ArpitWarmupCosine`` (the name the run's config records)."""
    from torch.optim.lr_scheduler import LambdaLR

    from normlab.train import lr_at

    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) \
            or not 0 < warmup_steps <= steps:
        raise ValueError(f"claims._arms: warmup_steps must be an int in 1..steps ({steps}), "
                         f"got {warmup_steps!r}")

    class ArpitWarmupCosine(LambdaLR):
        pass

    def factor(t: int) -> float:
        return min(1.0, t / warmup_steps) ** 2 * lr_at(t, steps, 1.0, "cosine")

    return ArpitWarmupCosine(optimizer, factor)


def _recording(make_opt, groups: list):
    """``make_opt`` that also appends a description of each group of the optimiser it
    makes to ``groups``, read when it is built: the loop rescales the groups' rates
    every step, so the stored rates are the ones the run was asked for."""
    def make(params):
        opt = make_opt(params)
        groups.extend({"name": g.get("name", "all"), "lr": g["lr"],
                       "weight_decay": g["weight_decay"], "momentum": g["momentum"],
                       "tensors": len(g["params"]),
                       "numel": sum(p.numel() for p in g["params"])}
                      for g in opt.param_groups)
        return opt
    return make


def loss_or_chance(result: Mapping, key: str = "final_train_loss") -> float:
    """The run's loss, or the cross-entropy of a uniform guess, ``ln(classes)``, where
    the run diverged or produced none: a diverged arm counts as having learned
    nothing, never as missing."""
    value = result.get(key)
    if result.get("diverged") or value is None or not math.isfinite(value):
        return math.log(float(result.get("num_classes") or 10))
    return float(value)


def dot_plot(ax, groups: Mapping[str, Sequence[float]], colors: Mapping[str, str],
             ylabel: str) -> None:
    """One column of dots per group (one dot per seed) with its mean as a bar, seed
    ``i`` joined across groups by a thin line (the paired design)."""
    labels = list(groups)
    for i, label in enumerate(labels):
        vals = list(groups[label])
        ax.scatter([i] * len(vals), vals, color=colors.get(label, "k"), alpha=0.7, zorder=3)
        mean = sum(vals) / len(vals)
        ax.plot([i - 0.2, i + 0.2], [mean, mean], color=colors.get(label, "k"), lw=2.5)
    per_seed = list(zip(*groups.values(), strict=True))
    for seed_vals in per_seed:
        ax.plot(range(len(labels)), seed_vals, color="0.6", lw=0.6, zorder=1)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
