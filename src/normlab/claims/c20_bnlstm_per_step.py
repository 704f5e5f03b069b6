"""Claim 20: BN in recurrent nets needs per-time-step statistics, and BN-LSTM
converges faster than a plain LSTM on a sequential task."""

from __future__ import annotations

from pathlib import Path

from normlab.claims._curves import area, plot_curves, run_variants, train_with_curves, val_area
from normlab.claims.base import Claim, RunContext, save_plot
from normlab.claims.design import accuracy_or_chance, split
from normlab.claims.protocol import Effect, points

DATA = "digits"
HIDDEN = 64
BATCH = 64
STEPS = 240
EVALS = 20
#: Adam rates; the grid extends at an edge. (Centred on 1.8e-2: a first grid around the
#: paper's 2e-3 left every arm's best at or past its top, see setup_change.)
LR_GRID = (6e-3, 1.8e-2, 5.4e-2)
QUICK_LR = 2e-3
CLIP = 1.0  # the paper's gradient clipping
#: "Ends no worse": BN-LSTM's final accuracy at most this far below the LSTM's (points).
FINAL_MARGIN = 1.0
VARIANTS = ("per_step", "shared", "lstm")
LABELS = {"per_step": "BN-LSTM, per-step statistics",
          "shared": "BN-LSTM, statistics shared across steps",
          "lstm": "LSTM (torch.nn.LSTM, no norm)"}


def share_statistics(rnn) -> None:
    """Replace every per-step BN of a :class:`normlab.nn.BNLSTM` by one whose statistics
    are shared by all time steps (``StepBatchNorm(max_steps=None)``, same gamma).

    What "shared" means here: the input term ``W_x x_t`` is computed for all steps at
    once, so in training it is normalized with the mean and variance pooled over the
    batch *and all steps*; the recurrent term and the cell, computed one step at a time,
    can only be normalized with the batch statistics of their own step in training (a
    step cannot use statistics of steps not yet computed), but every step feeds one
    shared set of running statistics, and in eval every step is normalized with that one
    set. Per-step BN-LSTM instead keeps statistics, and running averages, per step.
    """
    from torch import nn

    from normlab.nn.recurrent import StepBatchNorm

    for name in ("norm_ih", "norm_hh", "norm_c"):
        old = getattr(rnn, name)
        setattr(rnn, name, nn.ModuleList(
            StepBatchNorm(m.num_features, None, m.eps, m.momentum, m.affine,
                          m.bias is not None, m.weight_init, m.track_running_stats)
            for m in old))


def build(variant: str, in_shape, num_classes: int, hidden: int):
    """The LSTM classifier (rows of the image as time steps) of ``variant``."""
    import torch

    from normlab import models

    if variant == "lstm":
        model = models.lstm_classifier(in_shape, num_classes, norm="none", width=hidden)
        # BN-LSTM's bias init (forget gate 1, every other bias 0), so only the
        # normalization differs.
        with torch.no_grad():
            for name, p in model.rnn.named_parameters():
                if name.startswith("bias"):
                    p.zero_()
                    if name.startswith("bias_ih"):
                        p[hidden:2 * hidden] = 1.0
        return model
    if variant not in ("per_step", "shared"):
        raise ValueError(f"claim 20: variant must be one of {VARIANTS}, got {variant!r}")
    model = models.lstm_classifier(in_shape, num_classes, norm="bn", width=hidden)
    if variant == "shared":
        share_statistics(model.rnn)
    return model


def lstm_run(*, variant: str, lr: float, steps: int, seed: int, data: str, batch_size: int,
             hidden: int, clip: float, eval_every: int) -> dict:
    """One arm of one seed: the seed's split, weights drawn after
    ``torch.manual_seed(seed)``, Adam with gradient clipping, validation and test curves."""
    import torch

    fit, val = split(data, seed)
    torch.manual_seed(seed)
    model = build(variant, fit.in_shape, fit.num_classes, hidden)
    return train_with_curves(model, fit, val, steps=steps, batch_size=batch_size, lr=lr,
                             seed=seed, eval_every=eval_every, optimizer="adam",
                             clip_grad_norm=clip)


def _maker(variant: str, steps: int):
    def make(lr: float, seed: int) -> dict:
        return {"variant": variant, "lr": lr, "steps": steps, "seed": seed, "data": DATA,
                "batch_size": BATCH, "hidden": HIDDEN, "clip": CLIP,
                "eval_every": max(1, steps // EVALS)}
    return make


def measure(ctx: RunContext) -> dict:
    steps = ctx.budget.steps(STEPS)
    seeds = ctx.seeds
    chosen, runs = run_variants(ctx, lstm_run, lambda v: _maker(v, steps), VARIANTS, LR_GRID,
                                QUICK_LR, val_area)
    final = {v: [points(accuracy_or_chance(r)) for r in runs[v]] for v in VARIANTS}
    auc = {v: [points(area(r)) for r in runs[v]] for v in VARIANTS}

    def diff(values, a, b):
        return [x - y for x, y in zip(values[a], values[b], strict=True)]

    return {
        "effects": {"per_step_vs_shared": diff(final, "per_step", "shared"),
                    "speed": diff(auc, "per_step", "lstm"),
                    "final_gap": diff(final, "per_step", "lstm")},
        "final_test_acc": final, "test_auc": auc, "lr": chosen, "seeds": seeds,
        "steps": steps,
        "curves": {v: [{"planned": r["planned"], "curves": {
            k: r["curves"][k] for k in ("step", "test_acc")}} for r in runs[v]]
            for v in VARIANTS},
    }


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"per_step": "tab:blue", "shared": "tab:orange", "lstm": "tab:gray"}
    labels = {v: f"{LABELS[v]}, Adam {m['lr'][v]['lr']:g}" for v in VARIANTS}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.3), width_ratios=(2.2, 1))
    plot_curves(ax, m["curves"], "test_acc", colors, labels)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy (%, eval mode), thin: one seed")
    ax.set_ylim(0, 100.5)
    ax.set_title(f"Row-by-row {DATA} ({HIDDEN} hidden units, batch {BATCH}, clip {CLIP:g}); "
                 "each arm at the Adam rate\nwith the largest area under its validation "
                 "curve", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    for i, v in enumerate(VARIANTS):
        vals = m["final_test_acc"][v]
        ax2.scatter([i] * len(vals), vals, color=colors[v], alpha=0.6)
        ax2.plot([i - 0.2, i + 0.2], [sum(vals) / len(vals)] * 2, color=colors[v], lw=2)
    ax2.set_xticks(range(len(VARIANTS)))
    ax2.set_xticklabels(["per-step", "shared", "LSTM"])
    ax2.set_ylabel("final test accuracy (%), one dot per seed")
    ax2.set_title(f"After {m['steps']} steps", fontsize=9)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    return save_plot(fig, out_dir, "bnlstm_per_step_curves.png")


CLAIM = Claim(
    number=20,
    id="bnlstm_per_step",
    title="BN-LSTM needs per-step statistics and converges faster than an LSTM",
    statement="Batch-normalizing the input-to-hidden and hidden-to-hidden transitions of an "
              "LSTM (BN-LSTM) works when each time step keeps its own statistics (sharing "
              "them across time 'severely degrades performance'), and BN-LSTM converges "
              "faster than the plain LSTM on every task (sequential MNIST 99.0% vs 98.9%, "
              "permuted 95.4% vs 90.2%).",
    source="Cooijmans, Ballas, Laurent, Gülçehre & Courville, 'Recurrent Batch "
           "Normalization', ICLR 2017, sections 3-4, Figure 2 and Table 1",
    setup=(f"{DATA} (8x8) read row by row: 8 steps of 8 pixels; "
           f"normlab.models.lstm_classifier with {HIDDEN} hidden units: BN-LSTM "
           "(normlab.nn.BNLSTM, per-step statistics, gamma 0.1, forget bias 1), the same with "
           "statistics shared across steps (every StepBatchNorm replaced by a sequence-wise "
           "one: the input term pooled over all steps in training, the recurrent and cell "
           "terms with their own step's batch statistics in training, one set of running "
           "statistics for every step in eval), and torch.nn.LSTM with the same bias init. "
           "Each seed draws its own train/validation/test split, initial weights and batch "
           f"order, shared by the three arms. Adam, clipping {CLIP:g}, batch {BATCH}, "
           f"{STEPS} steps for every arm (about 13 epochs; x0.25 at the quick budget), "
           f"validation and test accuracy (eval mode) {EVALS} times a run. Each arm's rate "
           f"is chosen on seeds 0-1 from {list(LR_GRID)} (extended while the best is at an "
           "edge) by the area under its validation-accuracy curve (quick: the paper's 2e-3, "
           "no selection)."),
    measure=measure,
    effects=(
        Effect("per_step_vs_shared", "per-step minus shared-statistics BN-LSTM final test "
               "accuracy", "points", "greater", threshold=0.0, previous_noise=5.6),
        Effect("speed", "BN-LSTM minus LSTM area under the test-accuracy curve (mean of the "
               "evaluations over the run)", "points", "greater", threshold=0.0,
               previous_noise=1.0),
        Effect("final_gap", "BN-LSTM minus LSTM final test accuracy", "points", "greater",
               threshold=-FINAL_MARGIN, previous_noise=1.0),
    ),
    lessons={
        "reproduced": "If you batch-normalize an RNN, keep statistics per time step; the "
                      "per-step BN-LSTM learned faster than a plain LSTM and ended no worse.",
        "not reproduced": "At this scale per-step statistics, or BN-LSTM's faster "
                          "convergence over a plain LSTM, did not show as the paper states.",
        "inconclusive": "The measurement cannot yet decide every part of the claim (per-step "
                        "against shared statistics, speed and final accuracy against an LSTM) "
                        "with the confidence the protocol asks for.",
    },
    setup_change=("Before: one Adam rate (2e-3) for every arm, 800 steps, 2 seeds on one "
                  "fixed split, speed judged on the first evaluation reaching 95% of the "
                  "lower final accuracy (a first passage on a noisy curve) and final "
                  "accuracies on max(1 point, seed range). Now: each arm's rate chosen on "
                  "validation, a paired design over 10 seeds with seed-drawn splits, speed as "
                  "the area under the whole test-accuracy curve (smoother), and three effects "
                  "judged by their 95% intervals: per-step vs shared (superiority), BN-LSTM vs "
                  "LSTM speed (superiority) and final accuracy (non-inferiority at 1 point). "
                  f"The runs are shorter ({STEPS} steps, about 13 epochs) to pay for the rate "
                  "selection within the cost limit; the curves show whether the arms have "
                  "levelled off. Disclosed: the rate grid was first centred on the paper's "
                  "2e-3 (6.67e-4, 2e-3, 6e-3); in that first run every arm's best rate was "
                  "at or past the grid's top and the per-step BN-LSTM's still at the top "
                  "after two extensions (not bracketed), so the grid is now (6e-3, 1.8e-2, "
                  "5.4e-2); the effects and margins are as first declared."),
    criterion_change=("A: per-step - shared final accuracy > max(1 point, seed range); B: "
                      "LSTM needs >= 1.5x BN-LSTM's steps to 95% of the lower final accuracy "
                      "in every seed and BN-LSTM ends no worse than LSTM - noise; both on means",
                      "per-step - shared final accuracy: interval above 0; BN-LSTM - LSTM area "
                      "under the test curve: interval above 0; BN-LSTM - LSTM final accuracy: "
                      f"interval above -{FINAL_MARGIN:g} point"),
    scale_note=("The paper's sequences are 784 pixels (sequential MNIST) or 100-180 "
                "characters, where BN's control of the gradient through many steps matters; "
                "here 8 rows of 8 pixels, so an LSTM has little trouble to overcome, and the "
                "per-step statistics differ across only 8 steps."),
    width_note=("The old figures were a fixed 1-point floor and a two-seed range, not measured "
                "95% intervals. Halving the speed interval would take tens of seeds, far "
                "beyond the claim's CPU share."),
    requires=("normlab.nn.BNLSTM",),
    plot=plot,
)
