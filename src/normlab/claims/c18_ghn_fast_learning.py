"""Claim 18: Generalized Hamming networks learn fast without BN or learned biases
(as reported by Fan 2017)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from normlab.claims._curves import (
    area,
    plot_curves,
    train_with_curves,
    unit_interval,
    val_area,
)
from normlab.claims.base import Claim, RunContext, save_plot
from normlab.claims.design import accuracy_or_chance, select_lr, split
from normlab.claims.protocol import Effect, points

DATA = "mnist5k"
WIDTH, DEPTH = 128, 2
BATCH = 32
EPOCHS = 5
#: Adam rates; 0.1 is the re-implementation's rate, the grid extends at an edge.
LR_GRID = (3e-3, 1e-2, 3e-2, 0.1)
#: The quick budget's rates (no selection): the re-implementation's for GHN.
QUICK_LR = {"ghn": 0.1, "bn": 1e-2}
NETS = ("ghn", "bn")
LABELS = {"ghn": "GHN (no BN, no learned bias)", "bn": "Linear + BatchNorm + ReLU"}
#: "As fast as BN": GHN's area under the test-accuracy curve at most this far below BN's.
LAG_MARGIN = 2.0
#: The positive control: the lowest MNIST accuracy the kamwoh/ghn re-implementation
#: reports after one epoch (no double threshold, no ReLU: 89.01%), in points.
CONTROL_BAR = 89.0
#: ... reached by GHN after as many Adam steps as the re-implementation's one epoch
#: (48,000 training images in batches of 32).
CONTROL_STEPS = 1500


class ShiftedReLU(nn.Module):
    """relu(0.5 + h): a hidden unit fires when its normalized generalized Hamming
    distance to the weights is below 1/2 (the re-implementation's activation)."""

    def forward(self, h):
        return torch.relu(0.5 + h)


def build(net: str, in_features: int, num_classes: int, width: int, depth: int):
    """``net="ghn"``: ``depth`` x [GHNLinear(normalized) -> relu(0.5 + h)] and an
    unnormalized GHNLinear output, no learned bias and no normalization anywhere;
    ``net="bn"``: ``depth`` x [Linear(no bias) -> BatchNorm -> ReLU] and a Linear output."""
    from normlab.nn import BatchNorm, GHNLinear

    layers: list = [nn.Flatten()]
    fan_in = in_features
    for _ in range(depth):
        if net == "ghn":
            layers += [GHNLinear(fan_in, width, normalized=True), ShiftedReLU()]
        elif net == "bn":
            layers += [nn.Linear(fan_in, width, bias=False), BatchNorm(width), nn.ReLU()]
        else:
            raise ValueError(f"claim 18: net must be 'ghn' or 'bn', got {net!r}")
        fan_in = width
    layers.append(GHNLinear(fan_in, num_classes) if net == "ghn"
                  else nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


def ghn_run(*, net: str, lr: float, steps: int, seed: int, data: str, batch_size: int,
            eval_every: int, width: int, depth: int) -> dict:
    """One arm of one seed: the seed's split with inputs in [0, 1], weights drawn after
    ``torch.manual_seed(seed)``, Adam, validation and test curves."""
    import math

    fit, val = unit_interval(*split(data, seed))
    torch.manual_seed(seed)
    model = build(net, math.prod(fit.in_shape), fit.num_classes, width, depth)
    return train_with_curves(model, fit, val, steps=steps, batch_size=batch_size, lr=lr,
                             seed=seed, eval_every=eval_every, optimizer="adam")


def _maker(ctx: RunContext, net: str, steps: int):
    def make(lr: float, seed: int) -> dict:
        return {"net": net, "lr": lr, "steps": steps, "seed": seed, "data": DATA,
                "batch_size": BATCH, "eval_every": max(1, steps // (4 * EPOCHS)),
                "width": WIDTH, "depth": DEPTH}
    return make


def measure(ctx: RunContext) -> dict:
    epoch = split(DATA, 0)[0].num_train // BATCH
    steps = ctx.budget.steps(EPOCHS * epoch)
    control_steps = ctx.budget.steps(CONTROL_STEPS)
    seeds = ctx.seeds
    chosen = {}
    for net in NETS:
        grid = ctx.budget.pick(quick=None, default=LR_GRID)
        if grid is None:
            chosen[net] = {"lr": QUICK_LR[net], "grid": [QUICK_LR[net]], "scores": {},
                           "bracketed": False}
        else:
            chosen[net] = select_lr(ctx, ghn_run, _maker(ctx, net, steps), grid, seeds[:2],
                                    score=val_area)
    control = _maker(ctx, "ghn", control_steps)
    todo = [_maker(ctx, net, steps)(chosen[net]["lr"], s) for net in NETS for s in seeds]
    todo += [control(chosen["ghn"]["lr"], s) for s in seeds]
    done = ctx.map(ghn_run, todo)
    n = len(seeds)
    runs = {net: done[i * n:(i + 1) * n] for i, net in enumerate(NETS)}
    auc = {net: [points(area(r)) for r in runs[net]] for net in NETS}
    final = {net: [points(accuracy_or_chance(r)) for r in runs[net]] for net in NETS}
    final["ghn_control"] = [points(accuracy_or_chance(r)) for r in done[2 * n:]]
    return {
        "effects": {"auc_gap": [g - b for g, b in zip(auc["ghn"], auc["bn"], strict=True)],
                    "ghn_control": [a - CONTROL_BAR for a in final["ghn_control"]]},
        "test_auc": auc, "final_test_acc": final, "lr": chosen, "seeds": seeds,
        "steps": steps, "control_steps": control_steps, "epoch_steps": epoch,
        "curves": {net: [{"planned": r["planned"], "curves": {
            k: r["curves"][k] for k in ("step", "test_acc")}} for r in runs[net]]
            for net in NETS},
    }


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ghn": "tab:purple", "bn": "tab:blue"}
    labels = {n: f"{LABELS[n]}, Adam {m['lr'][n]['lr']:g}" for n in NETS}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.3), width_ratios=(2.2, 1))
    plot_curves(ax, m["curves"], "test_acc", colors, labels, x_scale=m["epoch_steps"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%), thin: one seed")
    ax.set_ylim(0, 100.5)
    ax.set_title(f"{DEPTH}x{WIDTH} MLPs on {DATA} (inputs in [0, 1]), batch {BATCH}; each "
                 "net at the Adam rate\nwith the largest area under its validation curve",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    columns = (("ghn_control", f"GHN\n{m['control_steps']} steps", "tab:purple"),
               ("ghn", f"GHN\n{m['steps']} steps", "tab:purple"),
               ("bn", f"BN\n{m['steps']} steps", "tab:blue"))
    for i, (key, _, color) in enumerate(columns):
        vals = m["final_test_acc"][key]
        ax2.scatter([i] * len(vals), vals, color=color, alpha=0.6)
        ax2.plot([i - 0.2, i + 0.2], [sum(vals) / len(vals)] * 2, color=color, lw=2)
    ax2.axhline(CONTROL_BAR, color="black", ls=":", lw=0.8,
                label=f"control bar {CONTROL_BAR:g}%")
    ax2.set_xticks(range(len(columns)))
    ax2.set_xticklabels([c[1] for c in columns], fontsize=8)
    ax2.set_ylabel("final test accuracy (%), one dot per seed")
    ax2.set_title("Positive control and final accuracies", fontsize=9)
    ax2.legend(fontsize=8)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    return save_plot(fig, out_dir, "ghn_fast_learning_curves.png")


CLAIM = Claim(
    number=18,
    id="ghn_fast_learning",
    title="Generalized Hamming networks learn fast without BN or learned biases",
    statement="A generalized Hamming network, whose neurons compute -GHD(x, w)/2 = w.x - "
              "(sum(w) + sum(x))/2 with the bias computed per sample rather than learned, "
              "needs no batch normalization (which, the paper argues, only approximates this "
              "bias) and learns fast: state-of-the-art-level MNIST accuracy after few epochs "
              "(as reported; a NeurIPS reviewer was very critical, and no official code "
              "exists).",
    source="Lixin Fan, 'Revisit Fuzzy Neural Network: Demystifying Batch Normalization and "
           "ReLU with Generalized Hamming Network', NeurIPS 2017 (abstract, MNIST learning "
           "curves); the kamwoh/ghn re-implementation (normalized form, relu(0.5 + h); "
           "README: 89.0-95.9% MNIST test accuracy after one epoch, Adam 0.1)",
    setup=(f"{DEPTH}x{WIDTH} MLPs on {DATA} (real MNIST, 28x28), inputs mapped to [0, 1] with "
           "the training part's min/max: GHN (normlab.nn.GHNLinear normalized=True -> "
           "relu(0.5 + h), GHNLinear output; no learned bias, no BN) and Linear(no bias) -> "
           "normlab BatchNorm -> ReLU. Each seed draws its own train/validation/test split, "
           "initial weights and batch order, shared by both nets. Adam, batch "
           f"{BATCH}, {EPOCHS} epochs for both (x0.25 at the quick budget), validation and "
           "test accuracy every quarter epoch. Each net's Adam rate is chosen on seeds 0-1 "
           f"from {list(LR_GRID)} (extended while the best is at an edge) by the area under "
           "its validation-accuracy curve (the fastest learner on held-out data; at the "
           f"quick budget: GHN {QUICK_LR['ghn']:g}, BN {QUICK_LR['bn']:g}, no selection). "
           "Positive control: GHN at its chosen rate trained for as many Adam steps as "
           f"the re-implementation's one MNIST epoch ({CONTROL_STEPS}: 48,000 images in "
           "batches of 32), its final test accuracy against that epoch's lowest "
           f"published accuracy ({CONTROL_BAR:g}%)."),
    measure=measure,
    effects=(
        Effect("auc_gap", f"GHN minus BN area under the test-accuracy curve over {EPOCHS} "
               "epochs (mean of the quarter-epoch evaluations)", "points", "greater",
               threshold=-LAG_MARGIN, previous_noise=3.9),
        Effect("ghn_control", f"GHN test accuracy after {CONTROL_STEPS} steps minus "
               f"{CONTROL_BAR:g}% (the re-implementation's lowest published one-epoch MNIST "
               "accuracy)", "points",
               "greater", threshold=0.0, role="premise"),
    ),
    lessons={
        "reproduced": "A GHN MLP, with its bias computed per sample and no normalization, "
                      "learned about as fast as a batch-normalized MLP here.",
        "not reproduced": "A GHN MLP learned more slowly than a batch-normalized MLP here, "
                          "so do not count on the computed bias as a replacement for BN.",
        "inconclusive": "The measurement cannot yet tell whether a GHN MLP learns as fast as "
                        "a batch-normalized one.",
        "not testable at this scale": "This GHN MLP did not reach the accuracy the "
                                      "re-implementation reports on MNIST, so its speed "
                                      "against BN says nothing about the paper's networks.",
    },
    setup_change=("Before: 8x8 digits, every net's Adam rate chosen by its first-epoch "
                  "training loss, judged on test accuracy after exactly one epoch (a point on "
                  "a noisy curve) over 2 seeds on one split, with no check that the GHN setup "
                  "can reach the accuracy the method is reported to reach. Now: real MNIST "
                  "digits (mnist5k, 1,000 test images a seed) as in the paper, rates chosen on "
                  "validation, the area under the whole test-accuracy curve (smoother than one "
                  "point), a paired design over 10 seeds, and a positive control against the "
                  "re-implementation's published number (issue 18). Disclosed: the control "
                  "was first declared as GHN's accuracy at the end of the 5-epoch runs; a "
                  "first run showed GHN still climbing there, so the control now gives GHN "
                  "the re-implementation's own number of updates (1,500), the closest match "
                  "to how the published number was obtained; the claim effect and its "
                  "margin are as first declared."),
    criterion_change=("acc(BN) - acc(GHN) after one epoch <= 2 points on means (reproduced), "
                      "> 2 points + seed range (not reproduced)",
                      f"GHN - BN area under the test curve: interval above -{LAG_MARGIN:g} "
                      f"points; premise: GHN's final accuracy - {CONTROL_BAR:g}%: interval "
                      "above 0, else not testable at this scale"),
    scale_note=("The re-implementation's numbers come from a LeNet-style GHN CNN trained on "
                "48,000 MNIST images (one epoch is about 1,500 Adam steps); here an MLP sees "
                "3,200 images for a few hundred steps, so a GHN that needs many updates for "
                "its weights to grow out of the near-constant output of a normalized Hamming "
                "layer at standard initialisation can fall short here and still match the "
                "paper at full scale."),
    width_note=("The old figure came from 2 seeds on one fixed test split (a seed range or a "
                "sampling term, with no t multiplier), which understates the 95% uncertainty; "
                "the new interval draws a split per seed, so it counts the test set's sampling "
                "too, and with 10 seeds it is 2.26 standard errors wide on each side."),
    requires=("normlab.nn.GHNLinear",),
    plot=plot,
)
