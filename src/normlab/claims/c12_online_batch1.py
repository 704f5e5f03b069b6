"""Claim 12: Online Normalization, which needs no batch, matches BatchNorm at the same
batch size."""

from __future__ import annotations

from pathlib import Path

from normlab.claims._batch import MLP, MLP_KWARGS, arm_steps, num_fit, paired, run_arms, seed_dots
from normlab.claims.base import Claim, RunContext, save_plot
from normlab.claims.design import train_run
from normlab.claims.protocol import Effect

DATA = "mnist5k"  # 28x28 MNIST, closest to the paper's Fashion-MNIST MLP; 1,000 test images
BATCH = 32
#: Epochs, and at least this many steps.
EPOCHS = 8.0
MIN_STEPS = 600
#: "Matches" = within this many points: the paper's ON-BN differences are 0.0-0.1 points
#: (CIFAR-10/100, ImageNet, Fashion-MNIST) while the next-best norm on CIFAR-10 (IN 90.4,
#: GN 90.3) is 1.9 points behind BN; half that gap, rounded to 1 point.
MARGIN = 1.0


def measure(ctx: RunContext) -> dict:
    steps = arm_steps(ctx, BATCH, num_fit(DATA), EPOCHS, MIN_STEPS)
    arms = {norm: {"model": MLP, "norm": norm, "data": DATA, "batch_size": BATCH,
                   "model_kwargs": MLP_KWARGS} for norm in ("on", "bn")}
    out = run_arms(ctx, train_run, arms, {"on": steps, "bn": steps})
    acc = out["acc"]
    return {"effects": {"on_minus_bn": paired(acc["on"], acc["bn"])}, "acc": acc,
            "lr": out["lr"], "steps": steps, "seeds": ctx.seeds}


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    seed_dots(ax, [("BatchNorm", m["acc"]["bn"], "tab:blue"),
                   ("Online Norm", m["acc"]["on"], "tab:red")])
    ax.set_title(f"Online Norm vs BN at batch {BATCH} (MLP on {DATA}, {m['steps']} steps)\n"
                 "lr chosen per arm on validation; grey lines join a seed", fontsize=9)
    return save_plot(fig, out_dir, "online_batch1_acc.png")


CLAIM = Claim(
    number=12,
    id="online_batch1",
    title="Online Norm (no batch statistics) matches BN at the same batch size",
    statement=("Online Normalization normalizes with streaming estimates of the statistics "
               "and needs no batch (it runs at batch size 1); at the same training setup it "
               "matches batch normalization, e.g. CIFAR-10 ResNet-20 92.3% vs BN 92.2%, "
               "ImageNet ResNet-50 76.3% vs 76.4%, Fashion-MNIST MLP 88.9% vs 88.8%."),
    source=("Chiley et al., Online Normalization for Training Neural Networks, NeurIPS 2019, "
            "experiments (CIFAR-10/100 ResNet-20, ImageNet ResNet-50, Fashion-MNIST MLP); "
            "authors' ExpReproducibility.md and poster."),
    setup=(f"MLP (2 hidden layers of 64) on {DATA}; Online Norm (alpha_f 0.999, alpha_b 0.99, "
           f"layer scaling) and BN at the same batch, {BATCH}, each {EPOCHS:g} epochs and at "
           f"least {MIN_STEPS} steps (SGD, momentum 0.9, constant rate). Each seed draws its "
           "own split, initial weights and batch order, shared by the two arms; each arm's "
           "rate is chosen on validation accuracy (seeds 0-1) from [0.015, 0.05, 0.15], "
           "extended while the best is at an edge."),
    measure=measure,
    effects=(
        Effect("on_minus_bn", f"Online Norm minus BN test accuracy at batch {BATCH}",
               "points", "equivalent", margin=MARGIN, previous_noise=2.1),
    ),
    lessons={
        "reproduced": "Online Norm trains like BN without using batch statistics, so it "
                      "is an option where the batch is tiny or samples arrive one at a "
                      "time; expect a slower step (its statistics are a per-sample scan).",
        "not reproduced": "At this scale Online Norm's streaming statistics did not match "
                          "BN at the same batch within the margin.",
        "inconclusive": "The measurement cannot yet tell whether Online Norm matches BN "
                        "at the same batch within the margin.",
    },
    setup_change=("Before: ON at batch 1 against BN at batch 32 in a CNN on digits, the same "
                  "epochs (so the two arms differed in normalizer, batch and steps at once), "
                  "one rate scaled linearly, 2 seeds on one split, a point-estimate rule. "
                  "Now: ON and BN at the same batch, as the paper compares them, in an MLP "
                  "on 28x28 MNIST (the paper's own small-scale test is a Fashion-MNIST MLP; "
                  "1,000 test images a seed), each arm's rate chosen on validation, 10 paired "
                  "seeds with seed-drawn splits, judged by an equivalence interval."),
    criterion_change=("ON at batch 1 at most 1 point below BN at batch 32 (point estimate; "
                      "not reproduced beyond 1 point plus max(seed range, unpaired sampling "
                      "term))",
                      f"ON - BN at batch {BATCH}: interval inside ±{MARGIN:g} point to "
                      "reproduce, entirely outside not to"),
    scale_note=("The paper's ON results are 250-epoch CIFAR and 90-epoch ImageNet ResNets "
                "with tuned momenta (alpha_f, alpha_b per dataset); here ON uses its ImageNet "
                "defaults in a 2-layer MLP for a few epochs, where its streaming statistics "
                "have fewer steps to settle."),
    width_note=("The old figure came from 2 seeds on one fixed test split (a seed range or a "
                "sampling term, with no t multiplier), which understates the 95% uncertainty; "
                "the new interval draws a split per seed, so it counts the test set's sampling "
                "too, and with 10 seeds it is 2.26 standard errors wide on each side. Halving "
                "it would take several times the seeds, beyond the claim's CPU share."),
    requires=("normlab.nn.OnlineNorm", "normlab.nn.BatchNorm"),
    plot=plot,
)
