"""Claim 12: Online Normalization at batch size 1 matches BatchNorm at a normal batch size."""

from __future__ import annotations

from pathlib import Path

from normlab.claims._batch_sweep import (
    epochs_at,
    points,
    pts,
    sampling_noise,
    scaled_lr,
    steps_for_epochs,
    summary,
)
from normlab.claims.base import Claim, RunContext, save_plot

DATA = "digits"
MODEL = "cnn"
MODEL_KWARGS = {"width": 16, "depth": 3}
BASE_LR = 0.05  # at batch 32, scaled linearly with the batch
#: epochs at the quick / default / full budgets (the same for both batch sizes)
EPOCHS = {"quick": 2.0, "default": 8.0, "full": 20.0}
#: (norm, batch size) of the runs; the first two are judged, the third is a reference.
RUNS = (("on", 1), ("bn", 32), ("on", 32))
#: ON at batch 1 may fall at most this far below BN at batch 32.
MAX_SHORTFALL = 0.01


def measure(ctx: RunContext) -> dict:
    ds = ctx.dataset(DATA)
    n_train = int(ds.x_train.shape[0])
    epochs = epochs_at(ctx, **EPOCHS)
    seeds = list(range(ctx.budget.seeds))
    results: dict[str, dict] = {}
    for norm, bs in RUNS:
        steps = steps_for_epochs(epochs, n_train, bs)
        lr = scaled_lr(BASE_LR, bs)
        runs = [ctx.train(model=MODEL, norm=norm, data=DATA, batch_size=bs, lr=lr,
                          steps=steps, seed=s, model_kwargs=MODEL_KWARGS) for s in seeds]
        entry = summary([r["final_test_acc"] for r in runs])
        entry.update({"batch_size": bs, "steps": steps, "lr": lr,
                      "diverged": sum(bool(r["diverged"]) for r in runs),
                      "train_seconds": sum(r["train_time_s"] for r in runs) / len(runs),
                      "evals_seed0": runs[0]["evals"]})
        results[f"{norm}@{bs}"] = entry
    on1, bn32 = results["on@1"], results["bn@32"]
    return {
        "epochs": epochs,
        "seeds": len(seeds),
        "runs": results,
        "shortfall": bn32["mean"] - on1["mean"],
        "seed_range": max(on1["range"], bn32["range"]),
        "test_noise": sampling_noise(0.5 * (on1["mean"] + bn32["mean"]), int(ds.x_test.shape[0])),
    }


def judge(m: dict) -> tuple[str, str]:
    short, noise = m["shortfall"], max(m["seed_range"], m["test_noise"])
    on1, bn32 = m["runs"]["on@1"], m["runs"]["bn@32"]
    facts = (f"ON at batch 1 {points(on1['mean'])} vs BN at batch 32 {points(bn32['mean'])} "
             f"mean test accuracy after {m['epochs']:g} epochs each; shortfall "
             f"{pts(short)} (limit {pts(MAX_SHORTFALL)}; noise {pts(noise)} = max(seed range "
             f"{pts(m['seed_range'])}, test-set sampling {pts(m['test_noise'])})).")
    if short <= MAX_SHORTFALL:
        return "reproduced", facts
    if short > MAX_SHORTFALL + noise:
        return "not reproduced", facts
    return "inconclusive", "The shortfall is within the noise of the limit: " + facts


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"on@1": ("Online Norm, batch 1", "tab:red", "-"),
              "bn@32": ("BatchNorm, batch 32", "tab:blue", "-"),
              "on@32": ("Online Norm, batch 32", "tab:red", ":")}
    for key, (label, color, ls) in styles.items():
        run = m["runs"].get(key)
        if run is None:
            continue
        ev = run["evals_seed0"]
        # x axis in epochs, so batch 1 and batch 32 compare at equal samples seen
        epochs = [s * m["epochs"] / run["steps"] for s in ev["step"]]
        ax.plot(epochs, [100 * a for a in ev["test_acc"]], ls, color=color,
                label=f"{label}: {100 * run['mean']:.1f}%")
    ax.set_xlabel("epochs (samples seen / training set size)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Online Norm at batch 1 vs BN at batch 32 (CNN, {DATA})")
    ax.grid(alpha=0.3)
    ax.legend(title=f"curves: seed 0; legend: mean of {m['seeds']}")
    return save_plot(fig, out_dir, "online_batch1_curves.png")


CLAIM = Claim(
    number=12,
    id="online_batch1",
    title="Online Norm at batch size 1 matches BN at a normal batch size",
    statement=("Online Normalization normalizes with streaming estimates of the statistics "
               "and needs no batch: trained with batch size 1 it matches batch normalization "
               "at normal batch sizes, e.g. CIFAR-10 ResNet-20 92.3% vs BN 92.2% (BN at batch "
               "128), ImageNet ResNet-50 76.3% vs 76.4%."),
    source=("Chiley et al., Online Normalization for Training Neural Networks, NeurIPS 2019, "
            "experiments (CIFAR-10/100 ResNet-20, ImageNet ResNet-50); authors' "
            "ExpReproducibility.md and poster."),
    setup=(f"CNN (width 16, depth 3) on {DATA}; Online Norm (alpha_f 0.999, alpha_b 0.99, "
           f"layer scaling) at batch 1 vs BN at batch 32, the same number of epochs "
           f"({EPOCHS['default']:g} at the default budget, {EPOCHS['quick']:g} at quick; batch 1 "
           "makes 32x "
           "the steps), SGD momentum 0.9, learning rate scaled linearly with the batch "
           f"({BASE_LR} at batch 32, {BASE_LR / 32:g} at batch 1); Online Norm at batch 32 as a "
           "reference. Final test accuracy, mean over the budget's seeds."),
    criterion=(f"Reproduced if ON at batch 1 is at most {100 * MAX_SHORTFALL:g} point below BN "
               f"at batch 32 (mean test accuracy; above is fine). Not reproduced if it is more "
               f"than {100 * MAX_SHORTFALL:g} point plus the noise below, noise = max(the "
               "larger seed-to-seed range of the two, two standard errors of a difference of two "
               "test accuracies from the finite test set, 2 sqrt(2p(1-p)/n_test)). Inconclusive "
               "in between."),
    measure=measure,
    judge=judge,
    requires=("normlab.nn.OnlineNorm", "normlab.nn.BatchNorm"),
    plot=plot,
    takeaway=("When memory forces batch size 1, Online Norm keeps BN-like training without a "
              "batch; expect many more (cheaper) steps per epoch."),
)
