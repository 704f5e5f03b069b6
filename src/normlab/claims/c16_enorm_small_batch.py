"""Claim 16: ENorm improves on the plain network, notably at small batches."""

from __future__ import annotations

import math
from pathlib import Path

from normlab.claims._arms import arm_run, dot_plot
from normlab.claims.base import Claim, RunContext, save_plot
from normlab.claims.design import accuracy_or_chance, select_lr
from normlab.claims.protocol import Effect, points

DATA = "digits"
DEPTH = 10  # hidden layers (the paper's fully connected run: 15 layers of 500 units)
WIDTH = 64
C = 1.2  # the paper's c for fully connected nets
WEIGHT_DECAY = 1e-3  # the paper's
MOMENTUM = 0.0  # the paper's fully connected run
SMALL, NORMAL = 8, 128
#: The paper's rate 0.1 (batch 256) in the middle of the grid at batch 128; at batch b
#: the grid is scaled by sqrt(b / 128).
LR_GRID = (0.03, 0.1, 0.3)
#: Epochs at both batch sizes, and at least this many steps (so batch 128 converges too).
EPOCHS = 8.0
MIN_STEPS = 400
ARMS = {"plain": "plain MLP", "enorm": f"MLP + ENorm (c={C})"}
COLORS = {"plain": "tab:gray", "enorm": "tab:green"}


def _steps(ctx: RunContext, batch: int, num_train: int) -> int:
    return ctx.budget.steps(max(MIN_STEPS, round(EPOCHS * num_train / batch)))


def _make(ctx: RunContext, arm: str, batch: int, num_train: int):
    steps = _steps(ctx, batch, num_train)

    def make(lr: float, seed: int) -> dict:
        return {"arm": "relu", "data": DATA, "width": WIDTH, "depth": DEPTH,
                "batch_size": batch, "lr": lr, "steps": steps, "seed": seed,
                "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY, "schedule": "cosine",
                "enorm_c": C if arm == "enorm" else None, "eval_every": steps}
    return make


def measure(ctx: RunContext) -> dict:
    from normlab.claims.design import split

    num_train = split(DATA, 0)[0].num_train
    seeds = ctx.seeds
    acc, chosen = {}, {}
    for batch in (SMALL, NORMAL):
        grid = [lr * math.sqrt(batch / NORMAL) for lr in LR_GRID]
        for arm in ARMS:
            make = _make(ctx, arm, batch, num_train)
            sel = select_lr(ctx, arm_run, make, grid, seeds[:2])
            runs = ctx.map(arm_run, [make(sel["lr"], s) for s in seeds])
            chosen[f"{arm}_b{batch}"] = sel
            acc[f"{arm}_b{batch}"] = [points(accuracy_or_chance(r)) for r in runs]
    gains = {b: [e - p for e, p in zip(acc[f"enorm_b{b}"], acc[f"plain_b{b}"], strict=True)]
             for b in (SMALL, NORMAL)}
    return {"effects": {"gain_small": gains[SMALL], "gain_normal": gains[NORMAL]},
            "acc": acc, "lr": chosen, "seeds": seeds,
            "steps": {str(b): _steps(ctx, b, num_train) for b in (SMALL, NORMAL)}}


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, batch in zip(axes, (SMALL, NORMAL), strict=True):
        groups = {f"{ARMS[a]}\nlr {m['lr'][f'{a}_b{batch}']['lr']:.3g}":
                  m["acc"][f"{a}_b{batch}"] for a in ARMS}
        colors = dict(zip(groups, COLORS.values(), strict=True))
        dot_plot(ax, groups, colors, "final test accuracy (%), one dot per seed")
        ax.set_title(f"batch {batch}, {m['steps'][str(batch)]} steps", fontsize=9)
    fig.suptitle(f"ENorm on a {DEPTH}-layer ReLU MLP (width {WIDTH}) on {DATA}; each arm at "
                 "its rate chosen on validation", fontsize=9)
    return save_plot(fig, out_dir, "enorm_small_batch_accuracy.png")


CLAIM = Claim(
    number=16,
    id="enorm_small_batch",
    title="ENorm improves on the plain network, notably at small batches",
    statement="Equi-normalization, which rescales the hidden units after every SGD step so "
              "that the weight norm is minimal while the function is unchanged, gives better "
              "test accuracy than the unnormalised baseline, and is an alternative to BN and "
              "GN for small batches.",
    source="Stock, Graham, Gribonval & Jégou, 'Equi-normalization of Neural Networks', ICLR "
           "2019 (abstract and sections 5-6: fully connected and convolutional CIFAR-10 runs, "
           "small-batch ImageNet ResNet-18)",
    setup=f"ReLU MLP of {DEPTH} hidden layers x {WIDTH} units (normlab.models.mlp, "
          f"norm='none') on {DATA}, SGD without momentum, weight decay {WEIGHT_DECAY:g}, "
          "cosine decay to 0 (the paper: linear), at batch "
          f"{SMALL} and {NORMAL}, with and without one ENorm cycle (c={C}, the paper's value "
          "for fully connected nets, over the layers the official code balances: every "
          "hidden layer but the one feeding the classifier) after every optimizer step. "
          f"Every arm trains {EPOCHS:g} epochs and at least {MIN_STEPS} steps (quick: a "
          "quarter); each arm's rate is chosen on validation accuracy (seeds 0-1) from "
          f"{list(LR_GRID)} x sqrt(batch/{NORMAL}), extended while the best is at an edge. "
          "Each seed draws its split, initial weights and batch order, shared by the arms.",
    measure=measure,
    effects=(
        Effect("gain_small", f"ENorm minus plain test accuracy at batch {SMALL}", "points",
               "greater", threshold=0.0, previous_noise=1.7),
        Effect("gain_normal", f"ENorm minus plain test accuracy at batch {NORMAL}", "points",
               "greater", threshold=0.0, previous_noise=1.0),
    ),
    lessons={
        "reproduced": "Balancing the weights after every step beat the same plain net, at "
                      "the small batch and the normal one, each at its own chosen rate.",
        "not reproduced": "At this scale ENorm did not beat the plain net at its own chosen "
                          "rate at one of the two batch sizes.",
        "inconclusive": "The seeds cannot yet tell ENorm and the plain net apart at one of "
                        "the batch sizes with the confidence the protocol asks for.",
    },
    setup_change=("Before: one rate per batch size for both arms (0.1 at batch 128, "
                  "square-root scaled), 20 epochs at both sizes (180 steps at batch 128), "
                  "2 seeds on one split, and a second ENorm variant (every hidden layer) "
                  "added after a first run. Now: each arm's rate chosen on validation with "
                  "grid extension, 8 epochs and a 400-step floor (batch 8 keeps a modest "
                  "step count, batch 128 converges), 10 paired seeds with seed-drawn splits; "
                  "only the official code's layers are measured (the paper's method), and "
                  "both batch sizes are judged, since the paper claims a gain over the "
                  "baseline in general and at small batches."),
    criterion_change=("diff = mean ENorm - plain; not reproduced if diff < -max(1 point, seed "
                      "range) at either batch; reproduced if diff > that noise at batch 8; "
                      "else inconclusive",
                      "ENorm - plain at batch 8 and at batch 128: each interval above 0"),
    scale_note=("The paper's nets are 15 x 500 on CIFAR-10 for 60 epochs and a ResNet-18 on "
                "ImageNet; here a 10 x 64 MLP on 8x8 digits. ENorm's benefit comes through "
                "the weight-decay objective's balance across layers, which matters more the "
                "deeper and longer the training; and a plain MLP has no batch statistics, so "
                "'small batch' here only changes the gradient noise, not a normalizer."),
    width_note=("The old figure came from 2 seeds on one fixed test split (a seed range or a "
                "sampling term, with no t multiplier), which understates the 95% uncertainty; "
                "the new interval draws a split per seed, so it counts the test set's sampling "
                "too, and with 10 seeds it is 2.26 standard errors wide on each side. The "
                "per-seed spread of ENorm minus plain needs about three times the seeds to "
                "halve the interval, beyond the claim's CPU share."),
    requires=("normlab.nn.ENorm",),
    plot=plot,
)
