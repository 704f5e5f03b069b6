"""Claim 8: GroupNorm is stable across batch sizes and beats BatchNorm at batch 2."""

from __future__ import annotations

from pathlib import Path

from normlab.claims import _paper
from normlab.claims.base import Claim, RunContext, save_plot
from normlab.claims.design import accuracy_or_chance, select_lr, train_run
from normlab.claims.protocol import Effect, points

DATA = "digits"
MODEL = "cnn"
MODEL_KWARGS = {"width": 16, "depth": 3}
NORMS = ("gn", "bn")
SMALL, LARGE = 2, 32
#: The learning-rate grid at batch 32; at batch b it is scaled by b / 32 (linear rule).
LR_GRID = (0.015, 0.05, 0.15)
#: Epochs at every batch size, and at least this many steps (so batch 32 converges too).
EPOCHS = 4.0
MIN_STEPS = 600
#: The old protocol's noise figure for both comparisons (points): max(seed range 1.7,
#: test-set sampling term 2.4) in the committed default study before this protocol.
PREVIOUS_NOISE = 2.4
#: GN's accuracy may move by less than this between batch 32 and batch 2 (points).
STABLE_MARGIN = 2.0

# The "paper" scale (``normlab study --scale paper --data-dir DIR``): Wu & He's
# comparison moved from ResNet-50 on ImageNet to ResNet-20 on CIFAR-10 with He et al.'s
# recipe (claims/_paper.py), sized for a few GPU-hours.
PAPER_EPOCHS = _paper.BATCH_SWEEP_EPOCHS


def _steps(ctx: RunContext, batch: int, num_train: int) -> int:
    steps = max(MIN_STEPS, round(EPOCHS * num_train / batch))
    return ctx.budget.steps(steps)


def _kwargs(ctx, norm, batch, num_train):
    steps = _steps(ctx, batch, num_train)

    def make(lr: float, seed: int) -> dict:
        return {"model": MODEL, "norm": norm, "data": DATA, "batch_size": batch, "lr": lr,
                "steps": steps, "seed": seed, "model_kwargs": MODEL_KWARGS,
                "train_kwargs": {"eval_every": steps}}
    return make


def measure_paper(ctx: RunContext) -> dict:
    """The paper-scale measurement: the four arms at fixed, linearly scaled rates (no
    selection, as in the paper), every seed in one batch of runs."""
    arms = {f"{norm}_b{batch}": {"norm": norm, "batch": batch}
            for norm in NORMS for batch in (SMALL, LARGE)}
    out = _paper.run_arms(ctx, arms, PAPER_EPOCHS)
    return {"effects": _effects(out["acc"]), "acc": out["acc"], "lr": out["lr"],
            "seeds": ctx.seeds,
            "steps": {str(b): out["steps"][f"gn_b{b}"] for b in (SMALL, LARGE)},
            "label": "ResNet-20 on CIFAR-10 (fixed rates, linear rule)"}


def _effects(acc: dict) -> dict:
    gap = [g - b for g, b in zip(acc[f"gn_b{SMALL}"], acc[f"bn_b{SMALL}"], strict=True)]
    gn_change = [s - lg for s, lg in zip(acc[f"gn_b{SMALL}"], acc[f"gn_b{LARGE}"], strict=True)]
    return {"gap_small": gap, "gn_change": gn_change}


def measure(ctx: RunContext) -> dict:
    from normlab.claims.design import split

    if ctx.scale == "paper":
        return measure_paper(ctx)
    num_train = split(DATA, 0)[0].num_train
    seeds = ctx.seeds
    chosen, acc = {}, {}
    for norm in NORMS:
        for batch in (SMALL, LARGE):
            make = _kwargs(ctx, norm, batch, num_train)
            grid = [lr * batch / 32 for lr in LR_GRID]
            sel = select_lr(ctx, train_run, make, grid, seeds[:2])
            runs = ctx.map(train_run, [make(sel["lr"], s) for s in seeds])
            name = f"{norm}_b{batch}"
            chosen[name] = sel
            acc[name] = [points(accuracy_or_chance(r)) for r in runs]
    return {"effects": _effects(acc), "acc": acc, "lr": chosen, "seeds": seeds,
            "steps": {str(b): _steps(ctx, b, num_train) for b in (SMALL, LARGE)}}


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (norm, label, color) in enumerate((("gn", "GroupNorm", "tab:green"),
                                              ("bn", "BatchNorm", "tab:blue"))):
        for j, batch in enumerate((SMALL, LARGE)):
            vals = m["acc"][f"{norm}_b{batch}"]
            x = j + (i - 0.5) * 0.3
            ax.scatter([x] * len(vals), vals, color=color, alpha=0.6,
                       label=label if j == 0 else None)
            ax.plot([x - 0.1, x + 0.1], [sum(vals) / len(vals)] * 2, color=color, lw=2)
    ax.set_xticks([0, 1])
    ax.set_xticklabels([f"batch {SMALL}", f"batch {LARGE}"])
    ax.set_ylabel("test accuracy (%), one dot per seed")
    label = m.get("label", f"CNN on {DATA}, lr chosen per arm on validation")
    ax.set_title(f"GN vs BN, {label}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_plot(fig, out_dir, "gn_batch_stable_acc_vs_batch.png")


CLAIM = Claim(
    number=8,
    id="gn_batch_stable",
    title="GroupNorm is stable across batch sizes and beats BN at batch 2",
    statement=("GN's accuracy is stable in a wide range of batch sizes: its ResNet-50 "
               "ImageNet error stays at about 24.0-24.2% from 32 down to 2 images per GPU, "
               "while BN's rises to 34.7%; at batch 2, GN has 10.6% lower error than BN."),
    source="Wu & He, Group Normalization, ECCV 2018, Fig. 1 and Table 2 (sensitivity to "
           "batch sizes).",
    setup=(f"CNN (width 16, depth 3) on {DATA}; GN (2 channels a group) and BN at batch "
           f"{SMALL} and {LARGE}. Each seed draws its own train/validation/test split, "
           "initial weights and batch order, shared by the four arms. Every arm trains "
           f"{EPOCHS:g} epochs and at least {MIN_STEPS} steps (SGD, momentum 0.9, constant "
           "rate); each arm's rate is chosen on validation accuracy (seeds 0-1) from "
           f"{list(LR_GRID)} x batch/32, extended while the best is at an edge."),
    measure=measure,
    effects=(
        Effect("gap_small", f"GN minus BN test accuracy at batch {SMALL}", "points",
               "greater", threshold=0.0, previous_noise=PREVIOUS_NOISE),
        Effect("gn_change", f"GN test accuracy at batch {SMALL} minus at batch {LARGE}",
               "points", "equivalent", margin=STABLE_MARGIN, previous_noise=PREVIOUS_NOISE),
    ),
    lessons={
        "reproduced": "Where the batch per device is tiny, GroupNorm kept its accuracy "
                      "and BatchNorm did not: prefer GN there.",
        "not reproduced": "At this scale the small-batch penalty of BatchNorm, or GN's "
                          "stability, did not show as the paper states.",
        "inconclusive": "The measurement cannot yet tell GN and BN apart at the smallest "
                        "batch with the confidence the protocol asks for.",
    },
    setup_change=("Before: same epochs at batch 2, 4, 8, 32 with one rate scaled linearly, "
                  "2 seeds on one fixed split, judged on max(seed range, an unpaired "
                  "sampling term). Now: a paired design over 10 seeds with seed-drawn "
                  "splits, each arm's rate chosen on validation, a step floor so batch 32 "
                  "converges, and the two effects judged by their 95% intervals."),
    criterion_change=("GN's spread over batch sizes <= 2 points and GN - BN at batch 2 > "
                      "max(1 point, noise) on means",
                      "GN - BN at batch 2: interval above 0; GN(batch 2) - GN(batch 32): "
                      "interval inside ±2 points"),
    scale_note=("BN's statistics here pool over the 8x8 feature maps (at batch 2, 128 "
                "values a channel in the first layer), so the small-batch noise is milder "
                "than in an ImageNet ResNet's late stages."),
    width_note=("The old figure came from 2 seeds on one fixed test split (a seed range or a "
                "sampling term, with no t multiplier), which understates the 95% uncertainty; "
                "the new interval draws a split per seed, so it counts the test set's sampling "
                "too, and with 10 seeds it is 2.26 standard errors wide on each side. Every "
                "arm's rate is also chosen per arm on validation; halving the interval would "
                "take several times the seeds at a cost over the claim's CPU share (batch-2 "
                "runs take thousands of steps)."),
    requires=("normlab.nn.GroupNorm", "normlab.nn.BatchNorm"),
    plot=plot,
    scales=("small", "paper"),
    paper_setup=("ResNet-20 (normlab.models.resnet, depth 3, widths 16/32/64) on CIFAR-10 "
                 "read from --data-dir: the official test set, and a stratified fifth of "
                 "the 50,000 training images, drawn by the seed, held out for validation "
                 "(reported only), leaving 40,000 to train on. GN (at most 32 groups, at "
                 f"least 2 channels a group) and BN at batch {SMALL} and {LARGE} on one "
                 f"device; every arm {PAPER_EPOCHS:g} epochs (200,000 steps at batch "
                 f"{SMALL}, 12,500 at {LARGE}), SGD with momentum 0.9, weight decay 1e-4 on "
                 "every parameter, a cosine schedule from He et al.'s rate 0.1 at batch 128 "
                 f"scaled linearly to the batch (0.0015625 at {SMALL}, 0.025 at {LARGE}; no "
                 "rate selection, as in the paper), random crops with 4-pixel padding and "
                 "horizontal flips. The budget's seeds (10 by default, 20 with --full); "
                 "each seed draws its validation part, initial weights, batch order and "
                 "augmentation, shared by the four arms. 425,000 steps a seed: about 6 "
                 "GPU-hours for 10 seeds one run at a time by an estimate of 5 ms a step "
                 "(not measured on a GPU), less with several --workers sharing the GPU."),
)
