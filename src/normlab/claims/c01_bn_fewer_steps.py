"""Claim 1: BN reaches the unnormalised network's accuracy in far fewer steps."""

from __future__ import annotations

import math
from pathlib import Path

from normlab.claims._bn_paper import ARMS, differences, seed_dots, tuned_runs
from normlab.claims.base import Claim, RunContext, save_plot
from normlab.claims.protocol import Effect, points

DATA = "digits"
MODEL = "cnn"
MODEL_KWARGS = {"width": 16, "depth": 3}
BATCH = 32
#: Every arm's step budget at the default budget: about 11 epochs of the fit split, past
#: where the plain CNN's accuracy levels off.
STEPS = 400
#: The learning-rate grid of each arm (extended while the best rate is at an edge).
LR_GRID = (0.01, 0.03, 0.1, 0.3)
#: Accuracy is evaluated at this many log-spaced steps (from step 2 to the last).
EVAL_POINTS = 40
#: The declared target: test accuracy on the smoothed curve (digits, 10 classes).
TARGET = 0.95
#: The smoothing: a centred moving average over this many evaluations.
SMOOTH = 3
#: "Far fewer steps" at this scale: at least this ratio (the paper's 14x was Inception
#: on ImageNet; 3x is the bar the lab declared for a 3-block CNN on small data).
MIN_RATIO = 3.0


def eval_steps(steps: int, count: int = EVAL_POINTS) -> list[int]:
    """``count`` log-spaced evaluation steps from 2 to ``steps`` (duplicates dropped)."""
    if steps <= 2:
        return [steps]
    ratio = (steps / 2) ** (1 / (count - 1))
    return sorted({min(steps, round(2 * ratio ** i)) for i in range(count)})


def curve_run(*, norm: str, lr: float, steps: int, seed: int, eval_points: int) -> dict:
    """Train the CNN (``norm``) on the seed's fit split, evaluating validation and test
    accuracy at :func:`eval_steps` steps; returns the curves and the final accuracies."""
    import torch

    from normlab import models
    from normlab.claims.design import current_device, split
    from normlab.train import evaluate, train

    fit, (x_val, y_val) = split(DATA, seed)
    device = current_device()
    at = set(eval_steps(steps, eval_points))
    curve = {"step": [], "val_acc": [], "test_acc": []}

    def probe(step, model, _info):
        if step in at:
            curve["step"].append(step)
            curve["val_acc"].append(evaluate(model, x_val, y_val, device=device)[1])
            curve["test_acc"].append(evaluate(model, fit.x_test, fit.y_test, device=device)[1])
        return False

    torch.manual_seed(seed)
    net = models.build(MODEL, fit.in_shape, fit.num_classes, norm=norm, **MODEL_KWARGS)
    result = train(net, fit, steps=steps, batch_size=BATCH, lr=lr, seed=seed,
                   eval_every=steps, progress=False, device=device, callbacks=[probe])
    return {"diverged": result.diverged, "steps_done": result.steps_done,
            "final_test_acc": result.final_test_acc, "num_classes": fit.num_classes,
            "eval_at": sorted(at), "curve": curve}


def _filled(result: dict, key: str) -> list[float]:
    """The run's accuracies at every evaluation step; a diverged run (no later values)
    counts at chance from where it stopped."""
    chance = 1.0 / result["num_classes"]
    vals = [chance if v is None or not math.isfinite(v) else v for v in result["curve"][key]]
    return vals + [chance] * (len(result["eval_at"]) - len(vals))


def area(result: dict, key: str) -> float:
    """Mean accuracy over the log-spaced evaluations: the area under the accuracy curve
    against log(step), which rewards reaching a high accuracy early."""
    vals = _filled(result, key)
    return sum(vals) / len(vals)


def steps_to_target(result: dict, target: float = TARGET) -> tuple[int, bool]:
    """The first evaluation step where the smoothed test-accuracy curve reaches
    ``target``, and whether it did (else the last step: a censored value)."""
    at = result["eval_at"]
    vals = _filled(result, "test_acc")
    h = SMOOTH // 2
    for i, step in enumerate(at):
        window = vals[max(0, i - h):i + h + 1]
        if sum(window) / len(window) >= target:
            return step, True
    return at[-1], False


def measure(ctx: RunContext) -> dict:
    steps = ctx.budget.steps(STEPS)
    points_n = ctx.budget.pick(quick=20, default=EVAL_POINTS)

    def make(norm):
        return lambda lr, seed: {"norm": norm, "lr": lr, "steps": steps, "seed": seed,
                                 "eval_points": points_n}

    sel, runs = {}, {}
    for norm, _, _ in ARMS:
        sel[norm], runs[norm] = tuned_runs(ctx, curve_run, make(norm), LR_GRID,
                                           score=lambda r: area(r, "val_acc"))
    reach = {n: [steps_to_target(r) for r in runs[n]] for n in runs}
    ratio = [p[0] / b[0] for p, b in zip(reach["none"], reach["bn"], strict=True)]
    auc = {n: [points(area(r, "test_acc")) for r in runs[n]] for n in runs}
    return {"effects": {"ratio": ratio, "auc_gap": differences(auc["bn"], auc["none"])},
            "steps_to_target": {n: [s for s, _ in reach[n]] for n in reach},
            "reached": {n: [ok for _, ok in reach[n]] for n in reach},
            "auc": auc, "lr": sel, "steps": steps, "target": TARGET, "seeds": ctx.seeds,
            "curves": {n: [r["curve"] for r in runs[n]] for n in runs}}


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    for norm, label, color in ARMS:
        for i, c in enumerate(m["curves"][norm]):
            ax.plot(c["step"], c["test_acc"], color=color, alpha=0.6, lw=1.1,
                    label=f"{label} (lr {m['lr'][norm]['lr']:g})" if i == 0 else None)
    ax.axhline(m["target"], color="k", ls=":", lw=0.8, label="declared target")
    ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy, one curve per seed")
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    seed_dots(ax2, 0, m["effects"]["ratio"], "tab:blue")
    ax2.axhline(MIN_RATIO, color="k", ls=":", lw=0.8)
    ax2.set_xlim(-0.6, 0.6)
    ax2.set_xticks([0], ["steps to target:\nno norm / BN"])
    ax2.set_ylabel("ratio (x), one dot per seed")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"CNN on {DATA}, each arm at its validation-chosen rate", fontsize=10)
    return save_plot(fig, out_dir, "bn_fewer_steps_curves.png")


CLAIM = Claim(
    number=1,
    id="bn_fewer_steps",
    title="BN reaches the plain network's accuracy in far fewer steps",
    statement="Batch-normalized Inception matches the accuracy of the baseline Inception in "
              "14 times fewer training steps (the seed articles: '14 times fewer training "
              "steps').",
    source="Ioffe & Szegedy 2015, section 4.2.2 and Figure 2 (BN-Baseline vs Inception); "
           "seed articles 001 and 002",
    setup=(f"3-block CNN (width 16) on {DATA}, batch {BATCH}, SGD momentum 0.9, constant "
           f"rate, {STEPS} steps per arm (about 11 epochs, past where the plain net levels "
           "off), no normalization vs BN. Each seed draws its own train/validation/test "
           "split, initial weights and batch order, shared by both arms. Each arm's rate is "
           f"chosen from {list(LR_GRID)} (extended while the best is at an edge) by the area "
           "under its validation-accuracy curve (mean over the evaluations, seeds 0-1), "
           f"because the claim is about speed. Accuracy is evaluated at {EVAL_POINTS} "
           f"log-spaced steps. Per seed: steps for the test-accuracy curve, smoothed over "
           f"{SMOOTH} evaluations, to reach the declared target {TARGET:.0%} (a run that "
           "never reaches it counts at its last step), as a ratio no-norm over BN; and the "
           "area under the test-accuracy curve (against log step), BN minus no norm."),
    measure=measure,
    effects=(
        Effect("ratio", "steps to the target accuracy, no norm over BN", "x", "greater",
               threshold=MIN_RATIO),
        Effect("auc_gap", "area under the test-accuracy curve (log steps), BN minus no norm",
               "points", "greater", threshold=0.0),
    ),
    lessons={
        "reproduced": "BN reached the plain CNN's accuracy in far fewer steps and learned "
                      "faster throughout: with BN, expect to need fewer steps.",
        "not reproduced": "At this scale BN's saving in steps, if any, was not of the size "
                          "the paper reports for Inception: on a small, easy task expect a "
                          "modest saving at most.",
        "inconclusive": "The measurement cannot yet tell whether BN saves steps at the size "
                        "the claim states, with the confidence the protocol asks for.",
    },
    setup_change=("Before: each net's rate chosen by best TEST accuracy, the target the "
                  "plain net's best test accuracy (a maximum of a noisy curve), first "
                  "passage on the raw curve evaluated every 1% of training, 2 seeds on one "
                  "split. Now (issue 18): rates chosen on validation by the area under the "
                  "validation curve (the claim is about speed), a declared target (95%) on a "
                  "smoothed, log-spaced test curve, a second, smoother effect (area under "
                  "the test curve), 10 seeds with seed-drawn splits. The old measurement "
                  "had one finite ratio (BN never reached the target in seed 0), so it "
                  "shows no seed range: previous_noise is null."),
    criterion_change=("ratio >= 3 in every seed: reproduced; < 1.5 in every seed: not "
                      "reproduced",
                      "steps-to-target ratio: interval above 3x; area under the test curve, "
                      "BN minus no norm: interval above 0"),
    scale_note=("The paper's 14x comes from Inception on ImageNet, trained for millions of "
                "steps with a tuned schedule; a 3-block CNN on 8x8 digits reaches a high "
                "accuracy within a few epochs with or without BN, which leaves little room "
                "for a large ratio."),
    requires=("normlab.nn.BatchNorm",),
    plot=plot,
)
