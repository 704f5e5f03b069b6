"""Claim 10: Switchable Norm matches or beats the better of BN and GN at each batch size,
and its learned weights move away from BN at small batches."""

from __future__ import annotations

from pathlib import Path

from normlab.claims._batch_sweep import (
    by_budget,
    epochs_at,
    mean,
    pts,
    sampling_noise,
    scaled_lr,
    steps_for_epochs,
    summary,
)
from normlab.claims.base import Claim, RunContext

DATA = "digits"
MODEL = "cnn"
MODEL_KWARGS = {"width": 16, "depth": 3}
BASE_LR = 0.05  # at batch 32, scaled linearly with the batch
#: epochs at the quick / default / full budgets (the same at every batch size)
EPOCHS = {"quick": 3.0, "default": 5.0, "full": 15.0}
NORMS = ("sn", "bn", "gn")
TERMS = ("instance", "layer", "batch")
LABELS = {"instance": "IN", "layer": "LN", "batch": "BN"}
#: SN may fall at most this far below the better of BN and GN at any batch size.
MAX_SHORTFALL = 0.01
#: SN's weight on BN (mean of its mean- and variance-weights, averaged over layers) must
#: be at least this much lower at the smallest batch than at the largest.
MIN_BN_WEIGHT_DROP = 0.05


def _batch_sizes(ctx: RunContext) -> list[int]:
    return list(by_budget(ctx, quick=(4, 32), default=(2, 8, 32)))


def _train_sn(ctx: RunContext, bs: int, steps: int, seed: int) -> dict:
    """Train the SN network and return its test accuracy and SN's learned weights
    (per layer, and averaged over layers)."""
    lr = scaled_lr(BASE_LR, bs)
    key = (f"sn-weights|{MODEL}|{sorted(MODEL_KWARGS.items())}|{DATA}|bs={bs}|lr={lr}|"
           f"steps={steps}|seed={seed}")

    def fn() -> dict:
        import torch

        from normlab import models
        from normlab.nn import SwitchableNorm
        from normlab.train import train

        ds = ctx.dataset(DATA)
        torch.manual_seed(seed)
        net = models.build(MODEL, ds.in_shape, ds.num_classes, norm="sn", **MODEL_KWARGS)
        r = train(net, ds, steps=steps, batch_size=bs, lr=lr, seed=seed, progress=False)
        layers = [mod.mixture_weights() for mod in net.modules()
                  if isinstance(mod, SwitchableNorm)]
        avg = {kind: {t: mean([w[kind][t] for w in layers]) for t in TERMS}
               for kind in ("mean", "var")}
        return {"final_test_acc": r.final_test_acc, "diverged": r.diverged,
                "weights_per_layer": layers, "weights": avg}

    return ctx.run(key, fn)


def measure(ctx: RunContext) -> dict:
    ds = ctx.dataset(DATA)
    n_train = int(ds.x_train.shape[0])
    epochs = epochs_at(ctx, **EPOCHS)
    batch_sizes = _batch_sizes(ctx)
    seeds = list(range(ctx.budget.seeds))
    acc: dict[str, dict] = {n: {} for n in NORMS}
    weights: dict[str, dict] = {}
    for bs in batch_sizes:
        steps = steps_for_epochs(epochs, n_train, bs)
        lr = scaled_lr(BASE_LR, bs)
        sn_runs = [_train_sn(ctx, bs, steps, s) for s in seeds]
        acc["sn"][str(bs)] = summary([r["final_test_acc"] for r in sn_runs])
        weights[str(bs)] = {kind: {t: mean([r["weights"][kind][t] for r in sn_runs])
                                   for t in TERMS} for kind in ("mean", "var")}
        for norm in ("bn", "gn"):
            runs = [ctx.train(model=MODEL, norm=norm, data=DATA, batch_size=bs, lr=lr,
                              steps=steps, seed=s, model_kwargs=MODEL_KWARGS) for s in seeds]
            acc[norm][str(bs)] = summary([r["final_test_acc"] for r in runs])
    shortfall = {str(b): max(acc["bn"][str(b)]["mean"], acc["gn"][str(b)]["mean"])
                 - acc["sn"][str(b)]["mean"] for b in batch_sizes}
    bn_weight = {b: 0.5 * (w["mean"]["batch"] + w["var"]["batch"]) for b, w in weights.items()}
    small, large = str(min(batch_sizes)), str(max(batch_sizes))
    return {
        "batch_sizes": batch_sizes,
        "epochs": epochs,
        "seeds": len(seeds),
        "lr": {str(b): scaled_lr(BASE_LR, b) for b in batch_sizes},
        "acc": acc,
        "sn_shortfall": shortfall,
        "sn_weights": weights,
        "sn_bn_weight": bn_weight,
        "bn_weight_drop": bn_weight[large] - bn_weight[small],
        "seed_range": max(acc[n][str(b)]["range"] for n in NORMS for b in batch_sizes),
        "test_noise": sampling_noise(mean([acc[n][str(b)]["mean"] for n in NORMS
                                           for b in batch_sizes]), int(ds.x_test.shape[0])),
    }


def judge(m: dict) -> tuple[str, str]:
    shortfall, drop = m["sn_shortfall"], m["bn_weight_drop"]
    noise = max(m["seed_range"], m["test_noise"])
    worst_b = max(shortfall, key=lambda b: shortfall[b])
    worst = shortfall[worst_b]
    bss = m["batch_sizes"]
    small, large = str(min(bss)), str(max(bss))
    facts = (f"SN's largest shortfall behind the better of BN and GN is {pts(worst)} at "
             f"batch {worst_b} (limit {pts(MAX_SHORTFALL)}; noise {pts(noise)} = max(seed range "
             f"{pts(m['seed_range'])}, test-set sampling {pts(m['test_noise'])})); "
             f"SN's weight on BN is {m['sn_bn_weight'][small]:.3f} at batch {small} vs "
             f"{m['sn_bn_weight'][large]:.3f} at batch {large} (drop {drop:+.3f}, needed "
             f">= {MIN_BN_WEIGHT_DROP}).")
    if worst > MAX_SHORTFALL + noise or drop <= 0:
        return "not reproduced", facts
    if worst <= MAX_SHORTFALL and drop >= MIN_BN_WEIGHT_DROP:
        return "reproduced", facts
    return "inconclusive", "Within the noise of the limits: " + facts


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bss = m["batch_sizes"]
    names = []
    # SN's learned weights per batch size: one group of bars per batch size.
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    colors = {"instance": "tab:purple", "layer": "tab:orange", "batch": "tab:blue"}
    width = 0.8 / len(TERMS)
    for ax, kind in zip(axes, ("mean", "var"), strict=True):
        for i, term in enumerate(TERMS):
            vals = [m["sn_weights"][str(b)][kind][term] for b in bss]
            xs = [j + (i - 1) * width for j in range(len(bss))]
            ax.bar(xs, vals, width, color=colors[term], label=LABELS[term])
        ax.axhline(1 / 3, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(bss)))
        ax.set_xticklabels([str(b) for b in bss])
        ax.set_xlabel("batch size")
        ax.set_title(f"weights of the {'means' if kind == 'mean' else 'variances'}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("softmax weight (avg over layers)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", title="term\n(dashed:\nstart, 1/3)")
    fig.suptitle(f"Switchable Norm's learned IN/LN/BN weights (CNN, {DATA})")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    name = "sn_matches_best_weights.png"
    fig.savefig(Path(out_dir) / name, dpi=110)
    plt.close(fig)
    names.append(name)
    # Accuracy of SN, BN, GN against batch size.
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for norm, label, color in (("sn", "SwitchableNorm", "tab:red"),
                               ("bn", "BatchNorm", "tab:blue"), ("gn", "GroupNorm", "tab:green")):
        ax.plot(bss, [100 * m["acc"][norm][str(b)]["mean"] for b in bss], "o-", color=color,
                label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bss)
    ax.set_xticklabels([str(b) for b in bss])
    ax.set_xlabel("batch size (same epochs, lr scaled linearly)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"SN vs BN vs GN (CNN, {DATA}, {m['epochs']:g} epochs)")
    ax.grid(alpha=0.3)
    ax.legend(title=f"mean of {m['seeds']} seed(s)")
    fig.tight_layout()
    name = "sn_matches_best_acc_vs_batch.png"
    fig.savefig(Path(out_dir) / name, dpi=110)
    plt.close(fig)
    names.append(name)
    return names


CLAIM = Claim(
    number=10,
    id="sn_matches_best",
    title="Switchable Norm matches the better of BN and GN at every batch size",
    statement=("SN learns to select IN, LN and BN per layer and is robust to batch size: on "
               "ImageNet ResNet-50 its top-1 is 76.9/76.7/75.9/75.6% at 32/8/4/2 images per "
               "GPU, against BN 76.4/75.2/72.7/65.3% and GN 75.9/76.0/75.8/75.9%; at small "
               "batches its learned weights move from BN towards IN and LN."),
    source=("Luo, Ren, Peng, Zhang & Li, Differentiable Learning-to-Normalize via Switchable "
            "Normalization, ICLR 2019: the ImageNet ResNet-50 results per (GPUs, images per GPU) "
            "setting and the learned importance weights per setting; authors' README table."),
    setup=(f"CNN (width 16, depth 3) on {DATA} with SN, BN and GN at batch sizes 2, 8, 32 "
           f"(quick: 4, 32), each for the same number of epochs ({EPOCHS['default']:g} at the "
           f"default budget, {EPOCHS['quick']:g} at quick), SGD momentum 0.9, learning rate scaled "
           f"linearly with the batch ({BASE_LR} at batch 32); final test accuracy (mean over "
           "the budget's seeds) and SN's softmax weights averaged over its layers."),
    criterion=(f"Reproduced if at every batch size SN's mean accuracy is at most "
               f"{100 * MAX_SHORTFALL:g} point below the better of BN and GN, and SN's weight "
               "on BN (mean of its mean- and variance-weights, averaged over layers and "
               f"seeds) is at least {MIN_BN_WEIGHT_DROP} lower at the smallest batch than at "
               f"the largest. Not reproduced if SN falls more than {100 * MAX_SHORTFALL:g} "
               "point plus the noise behind the better of the two at some batch size (noise = "
               "max(the largest seed-to-seed range of any run group, two standard errors of a "
               "difference of two test accuracies from the finite test set, "
               "2 sqrt(2p(1-p)/n_test))), or its BN weight is not lower at the smallest batch. "
               "Inconclusive otherwise."),
    measure=measure,
    judge=judge,
    requires=("normlab.nn.SwitchableNorm", "normlab.nn.GroupNorm", "normlab.nn.BatchNorm"),
    plot=plot,
    takeaway=("If you do not know your batch size in advance, SN hedges between BN and the "
              "per-sample norms, at some extra compute; its weights show what the layer "
              "preferred."),
)
