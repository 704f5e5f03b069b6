"""Claim 11: Attentive Normalization improves on BatchNorm at the same budget."""

from __future__ import annotations

import math
from pathlib import Path

from normlab.claims._batch_sweep import mean, points, pts
from normlab.claims.base import BUDGETS, Claim, RunContext, save_plot

DATA = "mnist1d"
MODEL = "cnn"
MODEL_KWARGS = {"width": 16, "depth": 3}
BATCH = 32
LR = 0.05
DEFAULT_STEPS = 1500
#: The paired mean difference must exceed this many standard errors.
MIN_T = 2.0


def _seeds(ctx: RunContext) -> list[int]:
    if ctx.budget.name in BUDGETS:
        return list(range(ctx.budget.pick(quick=2, default=5, full=10)))
    return list(range(max(2, ctx.budget.seeds)))  # a custom (test) budget: at least 2


def measure(ctx: RunContext) -> dict:
    steps = ctx.budget.steps(DEFAULT_STEPS)
    seeds = _seeds(ctx)
    acc: dict[str, list[float]] = {}
    loss: dict[str, list[float | None]] = {}
    curves: dict[str, dict] = {}
    for norm in ("an", "bn"):
        runs = [ctx.train(model=MODEL, norm=norm, data=DATA, batch_size=BATCH, lr=LR,
                          steps=steps, seed=s, model_kwargs=MODEL_KWARGS) for s in seeds]
        acc[norm] = [0.0 if r["final_test_acc"] is None else r["final_test_acc"] for r in runs]
        loss[norm] = [r["final_train_loss"] for r in runs]
        curves[norm] = runs[0]["evals"]
    diffs = [a - b for a, b in zip(acc["an"], acc["bn"], strict=True)]
    n = len(diffs)
    sd = (math.sqrt(sum((d - mean(diffs)) ** 2 for d in diffs) / (n - 1)) if n > 1 else None)
    return {
        "steps": steps,
        "batch_size": BATCH,
        "lr": LR,
        "seeds": n,
        "acc": acc,
        "final_train_loss": loss,
        "mean_acc": {k: mean(v) for k, v in acc.items()},
        "paired_diffs": diffs,
        "mean_diff": mean(diffs),
        "diff_sd": sd,
        "diff_se": None if sd is None else sd / math.sqrt(n),
        "evals_seed0": curves,
    }


def judge(m: dict) -> tuple[str, str]:
    d, se, n = m["mean_diff"], m["diff_se"], m["seeds"]
    se_text = "n/a" if se is None else pts(se)
    facts = (f"AN {points(m['mean_acc']['an'])} vs BN {points(m['mean_acc']['bn'])} mean test "
             f"accuracy over {n} seeds; paired difference AN - BN {pts(d)} "
             f"(standard error {se_text}; needed > {MIN_T:g} standard errors).")
    if d <= 0:
        return "not reproduced", "AN is not better than BN on average: " + facts
    if se is None:
        return "inconclusive", "One seed cannot tell a difference from noise: " + facts
    if d > MIN_T * se:
        return "reproduced", facts
    return "inconclusive", "AN is ahead, but within the seed-to-seed noise: " + facts


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    ax = axes[0]
    for i, (norm, color) in enumerate((("bn", "tab:blue"), ("an", "tab:red"))):
        vals = [100 * a for a in m["acc"][norm]]
        ax.scatter([i] * len(vals), vals, color=color, alpha=0.7)
        ax.plot([i - 0.2, i + 0.2], [100 * m["mean_acc"][norm]] * 2, color=color, lw=2)
        ax.text(i + 0.22, 100 * m["mean_acc"][norm], f"{100 * m['mean_acc'][norm]:.1f}",
                va="center", fontsize=8)
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["BatchNorm", "AttentiveNorm"])
    ax.set_xlim(-0.6, 1.8)
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"{m['seeds']} seeds (dots), mean (bar)")
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    for norm, label, color in (("bn", "BatchNorm", "tab:blue"), ("an", "AttentiveNorm", "tab:red")):
        ev = m["evals_seed0"][norm]
        ax.plot(ev["step"], [100 * a for a in ev["test_acc"]], color=color, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy during training (seed 0)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(f"Attentive Norm vs BN (CNN on {DATA}, batch {m['batch_size']}, "
                 f"{m['steps']} steps)")
    return save_plot(fig, out_dir, "an_beats_bn_acc.png")


CLAIM = Claim(
    number=11,
    id="an_beats_bn",
    title="Attentive Norm improves on BatchNorm at the same budget",
    statement=("Attentive Normalization, a batch-normalized standardization followed by an "
               "attention-weighted mixture of affine transforms, improves on BN at the same "
               "training recipe: ImageNet ResNet-50 top-1 error 21.59% vs 23.01% (and +0.5 to "
               "2.7 points top-1 across backbones)."),
    source=("Li, Sun & Wu, Attentive Normalization, ECCV 2020: abstract and the ImageNet "
            "classification results (ResNet-50 top-1 error); authors' AOGNet-v2 README."),
    setup=(f"1-D CNN (width 16, depth 3) on {DATA}; every norm AN (AN-BN, K = 10) or BN; batch "
           f"{BATCH}, SGD lr {LR} momentum 0.9, {DEFAULT_STEPS} steps at the default budget "
           "(a quarter at quick); 5 seeds (quick: 2), the same seeds (data order) for both."),
    criterion=(f"Reproduced if the mean over seeds of the paired difference AN - BN in final "
               f"test accuracy is positive and larger than {MIN_T:g} standard errors of that "
               "mean. Not reproduced if the mean difference is zero or negative. Inconclusive "
               "if it is positive but within that noise."),
    measure=measure,
    judge=judge,
    requires=("normlab.nn.AttentiveNorm", "normlab.nn.BatchNorm"),
    plot=plot,
    takeaway=("AN is a drop-in for BN that adds per-sample attention over affine transforms; "
              "check the gain on your task against the seed noise before paying for it."),
)
