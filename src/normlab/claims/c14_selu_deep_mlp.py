"""Claim 14: deep self-normalizing MLPs train where deep ReLU MLPs without normalization
struggle."""

from __future__ import annotations

import math
from pathlib import Path

from normlab.claims._batch_sweep import by_budget, mean, points, pts, sampling_noise, spread
from normlab.claims.base import Claim, RunContext, save_plot

DATA = "digits"
WIDTH = 64  # the input dimension of digits, as the paper's Fig. 1 (width = input size)
BATCH = 32
#: The grid must reach down far enough for every model: deep nets without BN need small
#: rates (0.001 was the best of SELU and plain ReLU at depth 32 on a grid starting there).
LRS = (0.0003, 0.001, 0.003, 0.01, 0.03)
DEFAULT_STEPS = 400
#: model name -> label; "selu" is normlab.models.self_normalizing_mlp, the others
#: normlab.models.mlp (He init) without and with BatchNorm.
MODELS = {"selu": "SELU (self-normalizing)", "relu": "ReLU, no norm", "relu_bn": "ReLU + BN"}
#: SELU must beat ReLU without norm at the deepest depth by more than this (or the seed
#: range, if larger) in test accuracy, and have a lower training loss.
MIN_ACC_GAP = 0.02


def _depths(ctx: RunContext) -> list[int]:
    return list(by_budget(ctx, quick=(8, 32), default=(8, 16, 32)))


def _build(model: str, depth: int, in_shape, num_classes: int):
    from torch import nn

    from normlab import models

    if model == "selu":
        features = math.prod(in_shape)
        return nn.Sequential(nn.Flatten(), models.self_normalizing_mlp(
            features, WIDTH, depth, num_classes))
    norm = "bn" if model == "relu_bn" else "none"
    return models.build("mlp", in_shape, num_classes, norm=norm, width=WIDTH, depth=depth)


def _train(ctx: RunContext, model: str, depth: int, lr: float, steps: int, seed: int) -> dict:
    key = (f"deep-mlp|{model}|{DATA}|depth={depth}|width={WIDTH}|batch={BATCH}|lr={lr}|"
           f"steps={steps}|seed={seed}")

    def fn() -> dict:
        import torch

        from normlab.train import train

        ds = ctx.dataset(DATA)
        torch.manual_seed(seed)
        net = _build(model, depth, ds.in_shape, ds.num_classes)
        r = train(net, ds, steps=steps, batch_size=BATCH, lr=lr, seed=seed,
                  progress=False).to_dict()  # JSON-safe: a non-finite loss becomes None
        return {"final_test_acc": r["final_test_acc"], "final_train_loss":
                r["final_train_loss"], "diverged": r["diverged"], "curve_loss": r["curve"]["loss"]}

    return ctx.run(key, fn)


def _loss_or_inf(run: dict) -> float:
    loss = run["final_train_loss"]
    if run["diverged"] or loss is None or not math.isfinite(loss):
        return math.inf
    return loss


def measure(ctx: RunContext) -> dict:
    steps = ctx.budget.steps(DEFAULT_STEPS)
    seeds = list(range(ctx.budget.seeds))
    depths = _depths(ctx)
    results: dict[str, dict] = {}
    for model in MODELS:
        results[model] = {}
        for depth in depths:
            by_lr = {}
            for lr in LRS:
                runs = [_train(ctx, model, depth, lr, steps, s) for s in seeds]
                losses = [_loss_or_inf(r) for r in runs]
                by_lr[str(lr)] = {
                    "train_loss": None if math.inf in losses else mean(losses),
                    "test_acc": [r["final_test_acc"] or 0.0 for r in runs],
                    "diverged": sum(bool(r["diverged"]) for r in runs),
                    "curve_loss_seed0": runs[0]["curve_loss"],
                }
            # the learning rate with the lowest mean final training loss (diverged: worst)
            best = min(by_lr, key=lambda k: math.inf if by_lr[k]["train_loss"] is None
                       else by_lr[k]["train_loss"])
            results[model][str(depth)] = {
                "best_lr": float(best),
                "train_loss": by_lr[best]["train_loss"],
                "test_acc": mean(by_lr[best]["test_acc"]),
                "test_acc_range": spread(by_lr[best]["test_acc"]),
                "by_lr": {lr: {k: v for k, v in e.items() if k != "curve_loss_seed0"}
                          for lr, e in by_lr.items()},
                "curve_loss_seed0": by_lr[best]["curve_loss_seed0"],
            }
    deepest = str(max(depths))
    num_test = int(ctx.dataset(DATA).x_test.shape[0])
    return {"depths": depths, "steps": steps, "seeds": len(seeds), "batch_size": BATCH,
            "lrs": list(LRS), "results": results, "deepest": int(deepest),
            "seed_range": max(results[m][deepest]["test_acc_range"] for m in ("selu", "relu")),
            "test_noise": sampling_noise(0.5 * (results["selu"][deepest]["test_acc"]
                                                + results["relu"][deepest]["test_acc"]), num_test)}


def judge(m: dict) -> tuple[str, str]:
    d = str(m["deepest"])
    selu, relu = m["results"]["selu"][d], m["results"]["relu"][d]
    gap = selu["test_acc"] - relu["test_acc"]
    threshold = max(MIN_ACC_GAP, m["seed_range"], m["test_noise"])

    def loss_text(x):
        return "diverged" if x is None else f"{x:.3f}"

    s_loss = math.inf if selu["train_loss"] is None else selu["train_loss"]
    r_loss = math.inf if relu["train_loss"] is None else relu["train_loss"]
    facts = (f"At depth {d}: SELU test accuracy {points(selu['test_acc'])}, final training loss "
             f"{loss_text(selu['train_loss'])} (lr {selu['best_lr']:g}); ReLU without norm "
             f"{points(relu['test_acc'])}, loss {loss_text(relu['train_loss'])} (lr "
             f"{relu['best_lr']:g}); accuracy gap {pts(gap)} (needed > {pts(threshold)} = max("
             f"{pts(MIN_ACC_GAP)}, seed range {pts(m['seed_range'])}, test-set sampling "
             f"{pts(m['test_noise'])})).")
    if gap <= 0 or s_loss >= r_loss:
        return "not reproduced", facts
    if gap > threshold:
        return "reproduced", facts
    return "inconclusive", "SELU is ahead, but by no more than the threshold: " + facts


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"selu": "tab:red", "relu": "tab:gray", "relu_bn": "tab:blue"}
    depths = m["depths"]
    fig, axes = plt.subplots(1, len(depths) + 1, figsize=(4 * (len(depths) + 1), 3.6))
    for ax, depth in zip(axes[:-1], depths, strict=True):
        for model, label in MODELS.items():
            r = m["results"][model][str(depth)]
            loss = [v if v is not None and math.isfinite(v) else float("nan")
                    for v in r["curve_loss_seed0"]]
            # a running mean over 20 steps makes the curves readable
            k = 20
            smooth = [mean(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
            ax.plot(range(1, len(smooth) + 1), smooth, color=colors[model],
                    label=f"{label} (lr {r['best_lr']:g})")
        ax.set_yscale("log")
        ax.set_title(f"{depth} hidden layers")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("training loss (20-step mean, seed 0)")
    ax = axes[-1]
    for model, label in MODELS.items():
        ax.plot(depths, [100 * m["results"][model][str(dd)]["test_acc"] for dd in depths], "o-",
                color=colors[model], label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths)
    ax.set_xticklabels([str(dd) for dd in depths])
    ax.set_xlabel("hidden layers")
    ax.set_ylabel("test accuracy (%), best lr")
    ax.set_title("test accuracy vs depth")
    ax.grid(alpha=0.3)
    fig.suptitle(f"Deep MLPs (width {WIDTH}) on {DATA}: {m['steps']} steps, batch "
                 f"{m['batch_size']}, best of lr {m['lrs']}")
    return save_plot(fig, out_dir, "selu_deep_mlp_training.png")


CLAIM = Claim(
    number=14,
    id="selu_deep_mlp",
    title="Deep self-normalizing MLPs train where deep plain ReLU MLPs struggle",
    statement=("Self-normalizing networks allow training very deep feed-forward networks: "
               "with 8, 16 and 32 layers, SNNs' training loss falls smoothly, while "
               "feed-forward networks with ReLU need normalization (BN) and still train with "
               "high-variance losses; FNNs without normalization are hard to train deep."),
    source=("Klambauer, Unterthiner, Mayr & Hochreiter, Self-Normalizing Neural Networks, "
            "NeurIPS 2017, section 1 and Fig. 1 (MNIST / CIFAR-10, 8/16/32 layers)."),
    setup=(f"MLPs of width {WIDTH} (the input size) on {DATA} with 8, 16 and 32 hidden layers "
           "(quick: 8 and 32): SELU + LeCun init (normlab.models.self_normalizing_mlp, no "
           "dropout) vs ReLU + He init without normalization vs ReLU + BN; batch "
           f"{BATCH}, SGD momentum 0.9, {DEFAULT_STEPS} steps at the default budget (a quarter "
           f"at quick), each model at the learning rate from {list(LRS)} with the lowest mean "
           "final training loss; mean over the budget's seeds."),
    criterion=(f"At the deepest depth, reproduced if SELU's final training loss is below the "
               f"plain ReLU MLP's and its mean test accuracy is higher by more than max("
               f"{100 * MIN_ACC_GAP:g} points, the seed-to-seed range of either, two standard "
               "errors of a difference of two test accuracies from the finite test set, "
               "2 sqrt(2p(1-p)/n_test)). Not reproduced "
               "if SELU's test accuracy is not higher or its training loss not lower. "
               "Inconclusive if SELU is ahead on both but by no more than that threshold. "
               "ReLU + BN is reported, not judged."),
    measure=measure,
    judge=judge,
    requires=("normlab.models.self_normalizing_mlp", "normlab.nn.SELU"),
    plot=plot,
    takeaway=("For a deep MLP without normalization layers, SELU with LeCun init is a simple "
              "way to keep it trainable; a plain ReLU stack needs BN or careful tuning."),
)
