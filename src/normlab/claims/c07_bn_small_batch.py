"""Claim 7: BN degrades at small batch sizes."""

from __future__ import annotations

import math
from pathlib import Path

from normlab.claims.base import Claim, RunContext, save_plot

MODEL = "cnn"
MODEL_KWARGS = {"width": 16, "depth": 3}
BASE_BATCH, BASE_LR = 32, 0.05
SMALL, REFERENCE = 2, 32
MIN_DROP = 0.05  # reproduced: BN loses >= 5 points from batch 32 to batch 2 ...
MIN_EXCESS = 0.03  # ... and >= 3 points more than the plain net loses
NO_DROP = 0.02  # not reproduced: BN loses < 2 points, or < 1 point more than the plain net
NO_EXCESS = 0.01


def batches_for(budget) -> list[int]:
    return budget.pick(quick=[2, 32], default=[2, 4, 8, 32, 128])


def epochs_for(budget) -> float:
    # Every batch size sees the same number of epochs (Wu & He's protocol), so batch 2
    # takes 16x the steps of batch 32: this is what the budget pays for.
    return 3.0 * budget.step_scale


def lr_rules(batch: int) -> dict[str, float]:
    """The two standard ways to move the batch-32 rate to another batch size."""
    return {"linear": round(BASE_LR * batch / BASE_BATCH, 8),
            "sqrt": round(BASE_LR * math.sqrt(batch / BASE_BATCH), 8)}


def _mean(values):
    return sum(values) / len(values)


def measure(ctx: RunContext) -> dict:
    seeds = list(range(ctx.budget.seeds))
    batches = batches_for(ctx.budget)
    epochs = epochs_for(ctx.budget)
    num_train = ctx.dataset().num_train
    acc: dict = {}
    best: dict = {}
    steps_by_batch = {}
    for norm in ("none", "bn"):
        acc[norm], best[norm] = {}, {}
        for bs in batches:
            steps = max(5, int(round(epochs * num_train / bs)))
            steps_by_batch[str(bs)] = steps
            acc[norm][str(bs)] = {}
            for rule, lr in lr_rules(bs).items():
                runs = [ctx.train(model=MODEL, norm=norm, batch_size=bs, lr=lr, steps=steps,
                                  seed=seed, model_kwargs=MODEL_KWARGS) for seed in seeds]
                acc[norm][str(bs)][rule] = [r["final_test_acc"] if not r["diverged"]
                                            else 0.0 for r in runs]
            rule = max(acc[norm][str(bs)], key=lambda k, n=norm, b=bs: _mean(acc[n][str(b)][k]))
            best[norm][str(bs)] = {"rule": rule, "mean_acc": _mean(acc[norm][str(bs)][rule]),
                                   "acc": acc[norm][str(bs)][rule]}
    drop = {norm: best[norm][str(REFERENCE)]["mean_acc"] - best[norm][str(SMALL)]["mean_acc"]
            for norm in ("none", "bn")}
    return {"data": ctx.data, "model": MODEL, "model_kwargs": MODEL_KWARGS, "epochs": epochs,
            "seeds": seeds, "batches": batches, "steps": steps_by_batch,
            "lrs": {str(bs): lr_rules(bs) for bs in batches}, "final_test_acc": acc,
            "best": best, "small": SMALL, "reference": REFERENCE, "drop": drop}


def judge(m: dict) -> tuple[str, str]:
    d_bn, d_plain = m["drop"]["bn"], m["drop"]["none"]
    excess = d_bn - d_plain
    b = m["best"]
    accs = ", ".join(f"batch {bs}: BN {b['bn'][str(bs)]['mean_acc']:.3f} / no norm "
                     f"{b['none'][str(bs)]['mean_acc']:.3f}" for bs in m["batches"])
    desc = (f"drop from batch {m['reference']} to {m['small']}: BN {d_bn:+.3f}, no norm "
            f"{d_plain:+.3f} ({accs})")
    if d_bn >= MIN_DROP and excess >= MIN_EXCESS:
        return "reproduced", f"BN loses >= {MIN_DROP:g} at batch {m['small']} and >= " \
                             f"{MIN_EXCESS:g} more than the plain net ({desc})."
    if d_bn < NO_DROP or excess < NO_EXCESS:
        return "not reproduced", f"BN's accuracy drop at batch {m['small']} is below " \
                                 f"{NO_DROP:g}, or within {NO_EXCESS:g} of the plain " \
                                 f"net's ({desc})."
    return "inconclusive", f"BN degrades at batch {m['small']}, but between the criterion's " \
                           f"bars ({desc})."


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"none": ("tab:gray", "no normalization"), "bn": ("tab:blue", "BatchNorm")}
    for norm, (color, label) in styles.items():
        means = [m["best"][norm][str(bs)]["mean_acc"] for bs in m["batches"]]
        ax.plot(m["batches"], means, "o-", color=color, label=f"{label} (better lr rule)")
        for bs in m["batches"]:
            vals = m["best"][norm][str(bs)]["acc"]
            ax.plot([bs] * len(vals), vals, ".", color=color, alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(m["batches"], [str(bs) for bs in m["batches"]])
    ax.set_xlabel("batch size (same number of epochs; lr scaled linearly or by sqrt)")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"Accuracy vs batch size, {m['model']} on {m['data']}, {m['epochs']:g} "
                 "epochs", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_plot(fig, out_dir, "bn_small_batch.png")


CLAIM = Claim(
    number=7,
    id="bn_small_batch",
    title="BN degrades at small batch sizes",
    statement="BatchNorm needs batch size > 8 to obtain accurate batch statistics (seed "
              "article 000); BN's error increases rapidly when the batch size becomes "
              "small (Wu & He: ResNet-50 on ImageNet, 23.6% error at 32 images per GPU, "
              "34.7% at 2).",
    source="seed article 000; Wu & He 2018, section 1 and Figure 1",
    setup="3-block CNN (width 16) on the study's dataset (digits by default), batch sizes "
          "{2, 4, 8, 32, 128} ({2, 32} quick), the same number of epochs for every batch "
          "size (3 at the default budget, 0.75 quick), SGD momentum 0.9 with lr 0.05 at batch "
          "32 moved to each batch size by the linear and the square-root rule (the better "
          "of the two, by mean accuracy, is kept), evaluated with running statistics; BN "
          "and, as a control for what small batches do to plain SGD, no normalization; "
          "seeds: the budget's.",
    criterion="Drop = mean final test accuracy at batch 32 minus at batch 2, each net at its "
              "better lr rule. Reproduced if BN's drop is >= 0.05 and at least 0.03 larger "
              "than the plain net's; not reproduced if BN's drop is < 0.02 or less than "
              "0.01 larger than the plain net's; inconclusive otherwise.",
    measure=measure,
    judge=judge,
    requires=("normlab.nn.BatchNorm",),
    plot=plot,
    takeaway="A BN CNN on 8x8 digits lost nothing at batch 2 (statistics also pool over "
             "pixels); the batch-size penalty needs bigger or harder settings to show.",
)
