"""Claim 1: BN reaches the unnormalised network's accuracy in far fewer steps."""

from __future__ import annotations

import math
from pathlib import Path

from normlab.claims import _paper
from normlab.claims._bn_paper import ARMS, differences, seed_dots, tuned_runs
from normlab.claims.base import Claim, RunContext, save_plot
from normlab.claims.design import select_lrs
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


def _curve_train(net, fit, val, *, steps: int, eval_points: int, seed: int,
                 **train_kwargs) -> tuple:
    """Train ``net`` on ``fit`` with :func:`normlab.train.train` (``train_kwargs`` pass
    through), evaluating accuracy on ``val = (x_val, y_val)`` and on the test set at
    :func:`eval_steps` steps. Returns the :class:`normlab.train.TrainResult` and the
    curve record that :func:`curve_run` returns."""
    from normlab.claims.design import current_device
    from normlab.train import evaluate, train

    device = current_device()
    at = set(eval_steps(steps, eval_points))
    curve = {"step": [], "val_acc": [], "test_acc": []}

    def probe(step, model, _info):
        if step in at:
            curve["step"].append(step)
            curve["val_acc"].append(evaluate(model, val[0], val[1], device=device)[1])
            curve["test_acc"].append(evaluate(model, fit.x_test, fit.y_test, device=device)[1])
        return False

    result = train(net, fit, steps=steps, seed=seed, progress=False, device=device,
                   callbacks=[probe], **train_kwargs)
    return result, {"diverged": result.diverged, "steps_done": result.steps_done,
                    "final_test_acc": result.final_test_acc, "num_classes": fit.num_classes,
                    "eval_at": sorted(at), "curve": curve}


def curve_run(*, norm: str, lr: float, steps: int, seed: int, eval_points: int) -> dict:
    """Train the CNN (``norm``) on the seed's fit split, evaluating validation and test
    accuracy at :func:`eval_steps` steps; returns the curves and the final accuracies."""
    import torch

    from normlab import models
    from normlab.claims.design import split

    fit, val = split(DATA, seed)
    torch.manual_seed(seed)
    net = models.build(MODEL, fit.in_shape, fit.num_classes, norm=norm, **MODEL_KWARGS)
    return _curve_train(net, fit, val, steps=steps, eval_points=eval_points, seed=seed,
                        batch_size=BATCH, lr=lr, eval_every=steps)[1]


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


def _summary(sel: dict, runs: dict, target: float) -> dict:
    """The effects and the record of both arms' runs (``runs[norm]``: one curve result
    per seed, ``sel[norm]``: the rate selection), steps counted to ``target``."""
    reach = {n: [steps_to_target(r, target) for r in runs[n]] for n in runs}
    ratio = [p[0] / b[0] for p, b in zip(reach["none"], reach["bn"], strict=True)]
    auc = {n: [points(area(r, "test_acc")) for r in runs[n]] for n in runs}
    return {"effects": {"ratio": ratio, "auc_gap": differences(auc["bn"], auc["none"])},
            "steps_to_target": {n: [s for s, _ in reach[n]] for n in reach},
            "reached": {n: [ok for _, ok in reach[n]] for n in reach},
            "auc": auc, "lr": sel, "target": target,
            "curves": {n: [r["curve"] for r in runs[n]] for n in runs}}


# The "paper" scale (``normlab study --scale paper --data-dir DIR``): the same
# measurement on ResNet-20 and CIFAR-10 with He et al.'s recipe (claims/_paper.py), at a
# constant rate as at the small scale.
PAPER_BATCH = 128
#: Every arm's budget: 12,500 steps at batch 128 on 40,000 images.
PAPER_EPOCHS = 40.0
#: The rates tried (at batch 128; linear rule otherwise), extended while the best is at
#: an edge: He et al.'s 0.1 down in steps of about 3, claim 3's grid (the plain ResNet-20
#: diverged at 0.01 and trained at 0.003 on generated CIFAR-format data).
PAPER_LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
#: The declared CIFAR-10 target on the smoothed test curve (see the paper setup).
PAPER_TARGET = 0.80
PAPER_LABEL = "ResNet-20 on CIFAR-10"


def paper_curve_run(*, eval_points: int, model: str, norm: str, data: str,
                    data_dir: str | None, batch_size: int, lr: float, steps: int, seed: int,
                    model_kwargs: dict, train_kwargs: dict) -> dict:
    """:func:`curve_run`'s measurement on the arguments of
    :func:`normlab.claims.design.train_run` (the paper scale's model, data folder and
    recipe); the result also carries the training configuration (``config``)."""
    import torch

    from normlab import models
    from normlab.claims.design import split

    fit, val = split(data, seed, data_dir=data_dir)
    torch.manual_seed(seed)
    net = models.build(model, fit.in_shape, fit.num_classes, norm=norm, **model_kwargs)
    result, out = _curve_train(net, fit, val, steps=steps, eval_points=eval_points,
                               seed=seed, batch_size=batch_size, lr=lr, **train_kwargs)
    return {**out, "config": result.config}


def _paper_make(ctx: RunContext, norm: str, steps: int, eval_points: int):
    def make(lr, seed):
        kw = _paper.run_kwargs(ctx, norm=norm, batch=PAPER_BATCH, seed=seed, steps=steps,
                               lr=lr)
        # a constant rate, as at the small scale: a decaying schedule would make the
        # late steps' gains depend on the budget rather than on the arm's speed
        kw["train_kwargs"]["schedule"] = "constant"
        return {**kw, "eval_points": eval_points}
    return make


def measure_paper(ctx: RunContext) -> dict:
    """The paper-scale measurement: as :func:`measure` (each arm's rate chosen on
    validation by the area under its curve) on ResNet-20 and CIFAR-10, each stage's runs
    of both arms in one batch so that they can share the GPU."""
    steps = _paper.steps_for(ctx, PAPER_EPOCHS, PAPER_BATCH, _paper.num_train(ctx))
    points_n = ctx.budget.pick(quick=20, default=EVAL_POINTS)
    norms, seeds = [norm for norm, _, _ in ARMS], ctx.seeds
    grid = [_paper.linear_lr(PAPER_BATCH, lr) for lr in PAPER_LR_GRID]
    make = {norm: _paper_make(ctx, norm, steps, points_n) for norm in norms}
    sel = select_lrs(ctx, paper_curve_run, make, grid, seeds[:2],
                     score=lambda r: area(r, "val_acc"))
    results = ctx.map(paper_curve_run, [make[norm](sel[norm]["lr"], s) for norm in norms
                                        for s in seeds])
    runs = {norm: results[k * len(seeds):(k + 1) * len(seeds)]
            for k, norm in enumerate(norms)}
    return {**_summary(sel, runs, PAPER_TARGET), "steps": steps, "seeds": seeds,
            "batch": PAPER_BATCH, "label": PAPER_LABEL}


def measure(ctx: RunContext) -> dict:
    if ctx.scale == "paper":
        return measure_paper(ctx)
    steps = ctx.budget.steps(STEPS)
    points_n = ctx.budget.pick(quick=20, default=EVAL_POINTS)

    def make(norm):
        return lambda lr, seed: {"norm": norm, "lr": lr, "steps": steps, "seed": seed,
                                 "eval_points": points_n}

    sel, runs = {}, {}
    for norm, _, _ in ARMS:
        sel[norm], runs[norm] = tuned_runs(ctx, curve_run, make(norm), LR_GRID,
                                           score=lambda r: area(r, "val_acc"))
    return {**_summary(sel, runs, TARGET), "steps": steps, "seeds": ctx.seeds}


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
    model = m.get("label", f"CNN on {DATA}")
    fig.suptitle(f"{model}, each arm at its validation-chosen rate (constant)", fontsize=10)
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
    scales=("small", "paper"),
    paper_setup=(
        "Moved from the paper's Inception on ImageNet to ResNet-20 (normlab.models.resnet, "
        "depth 3, widths 16/32/64) on CIFAR-10 read from --data-dir: the official "
        "10,000-image test set, and a stratified fifth of the 50,000 training images, drawn "
        "by the seed, held out for validation, leaving 40,000 to train on. No normalization "
        "vs BN after every conv (shortcut projections included), He-normal init. "
        f"Batch {PAPER_BATCH}, {PAPER_EPOCHS:g} epochs "
        f"({round(PAPER_EPOCHS * 40_000 / PAPER_BATCH):,} steps) for every run, SGD with "
        "momentum 0.9, weight decay 1e-4 on every parameter, random crops with 4-pixel "
        "padding and horizontal flips (He et al.'s recipe), but at a constant rate rather "
        "than the cosine, as at the small scale: the claim is about speed, and a decaying "
        "rate would tie each curve's late gains to the length of the budget, not to the "
        "arm. Each arm's rate is chosen by the area under its validation-accuracy curve "
        f"(seeds 0-1) from {list(PAPER_LR_GRID)} (He et al.'s 0.1 down in steps of about "
        "3; claim 3's grid), extended by 3x (at most twice) while the best is at an "
        "edge, because the "
        "claim is about speed: a fixed 0.1 for both would leave the plain net diverging "
        "(without a norm a He-initialised ResNet's activations double in variance every "
        "block; on generated CIFAR-format data it diverged within 6 steps at 0.01), and a "
        "diverged run counts at chance from where it stopped, so it never reaches the "
        "target. Validation and test accuracy are evaluated at "
        f"{EVAL_POINTS} log-spaced steps from step 2 to the last (39 distinct steps, each "
        "20,000 images: the validation fifth and the test set). The declared target, "
        f"fixed before any run: {PAPER_TARGET:.0%} test accuracy on the curve smoothed over "
        f"{SMOOTH} evaluations (the small scale's {TARGET:.0%} is for digits). Why 80%: "
        "the target plays the role of the baseline Inception's final accuracy, a level "
        "the plain net reaches; He et al.'s ResNet-20 with BN reaches 91.25% only after "
        "164 epochs and two rate drops (their Figure 6: the test error falls sharply at "
        "each drop), so at a constant rate it stays well below that, and a ResNet without "
        "normalization must train at a far smaller rate (Zhang et al. 2019: a standard "
        "ResNet without normalization does not train at BN's rate). 80% is a level a "
        "constant-rate ResNet-20 with crops and flips should pass within the budget with "
        "BN and that the plain net must reach for the comparison to be the paper's. "
        "Whether the plain ResNet-20 reaches it in 40 epochs is not known before a run: "
        "where it does not, its steps count at the last evaluation (censored), which "
        "makes the ratio smaller than the truth, the conservative side for a 'greater' "
        "effect, as at the small scale. Per seed: the steps ratio, no norm over BN, and "
        "the area under the test curve (against log step), BN minus no norm; the "
        f"thresholds as at the small scale (ratio above {MIN_RATIO:g}x, the paper's 14x "
        "being Inception's). Cut to fit a few GPU-hours: 40 epochs rather than He et "
        "al.'s 164, no schedule. The budget's seeds (10 by default, 20 with --full); each "
        "seed draws its validation part, initial weights, batch order and augmentation, "
        "shared by both arms. About 1 GPU-hour (1.6 with --full), an estimate, not "
        "measured on a GPU: 30 to 38 full runs (the selection's 5 to 7 rates x 2 seeds "
        "an arm, less the plain net's diverging runs, which stop early, and the other 8 "
        "seeds of both arms), each 12,500 steps at an assumed 5 ms (about 60 s) plus 39 "
        "evaluations at an assumed 1 s (about 40 s), one run at a time; less with several "
        "--workers sharing the GPU."),
)
