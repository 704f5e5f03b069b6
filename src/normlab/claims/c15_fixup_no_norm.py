"""Claim 15: Fixup trains a deep residual network without normalization at BN's
learning rate, close to BN's accuracy."""

from __future__ import annotations

from pathlib import Path

from normlab.claims._custom_loop import acc_or_chance, fit, mean, pct, seed_range
from normlab.claims.base import Claim, RunContext, save_plot

DEPTH = 32  # ResNet-32: 3 stages of 5 basic blocks, 15 residual branches
WIDTH = 8  # channels of the first stage (then 16, 32)
BATCH = 32
#: The paper's CIFAR rate 0.1 at batch 128, scaled to our batch by its own rule
#: (weights: base_lr * batch / 128); Fixup's scalars keep base_lr / 10 (not scaled).
BASE_LR = 0.1
LR = BASE_LR * BATCH / 128
SCALAR_LR = BASE_LR / 10
WEIGHT_DECAY = 1e-4
MOMENTUM = 0.9
CLOSE = 0.02  # "close to BN": at most 2 accuracy points below it
NETS = ("bn", "fixup", "plain")
LABELS = {"bn": "ResNet-32 + BatchNorm", "fixup": "ResNet-32 Fixup (no norm)",
          "plain": "ResNet-32, no norm, no Fixup"}


def _steps(budget) -> int:
    return budget.steps(600, minimum=40)


def _data_name(ctx: RunContext) -> str:
    """The study's dataset if it holds images (C, H, W), else digits (Fixup's ResNet is
    2-D only)."""
    return ctx.data if len(ctx.dataset().in_shape) == 3 else "digits"


def _build(net: str, in_shape, num_classes: int):
    from normlab import models

    if net == "fixup":
        return models.fixup_resnet(DEPTH, num_classes, width=WIDTH, in_channels=in_shape[0])
    norm = "bn" if net == "bn" else "none"
    return models.resnet(in_shape, num_classes, norm=norm, width=WIDTH, depth=(DEPTH - 2) // 6)


def _run(ctx: RunContext, net: str, seed: int, steps: int) -> dict:
    data = _data_name(ctx)
    key = (f"{net} resnet{DEPTH} w{WIDTH} data={data} batch={BATCH} lr={LR} "
           f"scalar_lr={SCALAR_LR} wd={WEIGHT_DECAY} mom={MOMENTUM} cosine steps={steps} "
           f"seed={seed}")

    def work() -> dict:
        import torch

        from normlab.init import fixup_param_groups

        ds = ctx.dataset(data)
        torch.manual_seed(seed)
        model = _build(net, ds.in_shape, ds.num_classes)
        groups = (fixup_param_groups(model, LR, WEIGHT_DECAY, SCALAR_LR / LR)
                  if net == "fixup" else None)
        return fit(model, ds.x_train, ds.y_train, ds.x_test, ds.y_test, steps=steps,
                   batch_size=BATCH, lr=LR, seed=seed, param_groups=groups,
                   momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, schedule="cosine",
                   eval_every=max(1, steps // 20))

    return ctx.run(key, work)


def measure(ctx: RunContext) -> dict:
    steps = _steps(ctx.budget)
    seeds = list(range(ctx.budget.seeds))
    num_classes = ctx.dataset(_data_name(ctx)).num_classes
    out = {"data": _data_name(ctx), "depth": DEPTH, "width": WIDTH, "batch": BATCH, "lr": LR,
           "scalar_lr": SCALAR_LR, "steps": steps, "seeds": seeds, "nets": {}}
    for net in NETS:
        runs = [_run(ctx, net, seed, steps) for seed in seeds]
        accs = [acc_or_chance(r, num_classes) for r in runs]
        out["nets"][net] = {
            "final_test_acc": accs,
            "mean_acc": mean(accs),
            "diverged": [bool(r["diverged"]) for r in runs],
            "diverged_step": [r["diverged_step"] for r in runs],
            "final_train_loss": [r["final_train_loss"] for r in runs],
            "curves": [{"step": r["curve"]["step"], "loss": r["curve"]["loss"]} for r in runs],
            "evals": [{"step": r["evals"]["step"], "test_acc": r["evals"]["test_acc"]}
                      for r in runs],
        }
    return out


def judge(m: dict) -> tuple[str, str]:
    bn, fx, pl = (m["nets"][k] for k in NETS)
    gap = bn["mean_acc"] - fx["mean_acc"]
    fx_range = seed_range(fx["final_test_acc"])
    plain_div = sum(pl["diverged"])
    desc = (f"at lr {m['lr']:g}: BN {pct(bn['mean_acc'])}, Fixup {pct(fx['mean_acc'])} "
            f"(gap {100 * gap:+.1f} points, Fixup seed range {100 * fx_range:.1f}), plain "
            f"{pct(pl['mean_acc'])}" + (f" (diverged in {plain_div} seed(s))" if plain_div else ""))
    if any(fx["diverged"]):
        return "not reproduced", f"Fixup diverged at BN's learning rate; {desc}."
    if gap > CLOSE:
        return "not reproduced", f"Fixup is more than {100 * CLOSE:.0f} points below BN; {desc}."
    plain_fails = any(pl["diverged"]) or pl["mean_acc"] < fx["mean_acc"] - CLOSE
    if plain_fails:
        return "reproduced", (f"Fixup trains without normalization within {100 * CLOSE:.0f} "
                              f"points of BN, where the same net without Fixup fails or lags; "
                              f"{desc}.")
    return "inconclusive", (f"Fixup is within {100 * CLOSE:.0f} points of BN, but so is the "
                            f"plain net without Fixup, so this depth does not show what Fixup "
                            f"adds; {desc}.")


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from normlab.claims._custom_loop import smooth

    colors = {"bn": "tab:blue", "fixup": "tab:orange", "plain": "tab:gray"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for net in NETS:
        for i, c in enumerate(m["nets"][net]["curves"]):
            label = LABELS[net] if i == 0 else None
            ax1.plot(c["step"], smooth(c["loss"], 20), color=colors[net], lw=1.2, label=label)
        for i, e in enumerate(m["nets"][net]["evals"]):
            label = LABELS[net] if i == 0 else None
            ax2.plot(e["step"], e["test_acc"], color=colors[net], lw=1.2, marker=".",
                     label=label)
    ax1.set_yscale("log")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("training loss (moving average of 20 steps, log)")
    ax1.set_title("Training loss", fontsize=10)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("test accuracy")
    ax2.set_ylim(0, 1.01)
    ax2.set_title("Test accuracy", fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Fixup vs BatchNorm, ResNet-{m['depth']} (width {m['width']}) on {m['data']}, "
                 f"all at lr {m['lr']:g} (batch {m['batch']}, cosine); a line ends where a run "
                 "diverged", fontsize=9)
    return save_plot(fig, out_dir, "fixup_no_norm_curves.png")


CLAIM = Claim(
    number=15,
    id="fixup_no_norm",
    title="Fixup trains a deep ResNet without normalization at BN's learning rate",
    statement="Fixup (rescaled initialisation, zero-initialised last layer of every residual "
              "branch, scalar multipliers and biases) trains residual networks without any "
              "normalization layer at the learning rate of the BN network, reaching close to "
              "its accuracy (CIFAR-10 ResNet-110: 7.24% vs 6.61% test error; 10,000-layer "
              "ResNets train).",
    source="Zhang, Dauphin & Ma, 'Fixup Initialization: Residual Learning Without "
           "Normalization', ICLR 2019, section 4 and Table 1 (CIFAR-10); the paper's code's "
           "optimiser rules",
    setup=f"CIFAR-style ResNet-{DEPTH} of width {WIDTH} (stages {WIDTH}/{2 * WIDTH}/{4 * WIDTH} "
          "channels) on the study's image dataset (digits 8x8 by default; digits if the "
          "study's data is 1-D), three versions: "
          "normlab.models.resnet with BatchNorm; normlab.models.fixup_resnet (no norm, Fixup "
          "init, scalar biases/multipliers trained at lr/10 via fixup_param_groups); "
          "normlab.models.resnet with norm='none' (He init, no Fixup). All with the same SGD "
          f"(momentum {MOMENTUM}, weight decay {WEIGHT_DECAY:g}), batch {BATCH}, weight lr "
          f"{LR:g} = the paper's 0.1 x batch/128, cosine decay; Fixup's scalars at {SCALAR_LR:g} "
          "(0.1/10, as the paper); 600 steps at the default budget (x0.25 quick), seeds: the "
          "budget's.",
    criterion="acc = final test accuracy, mean over seeds (a diverged run counts as chance). "
              "Not reproduced if Fixup diverges in any seed or acc(BN) - acc(Fixup) > 2 points. "
              "Otherwise reproduced if the plain net without Fixup fails at the same lr "
              "(diverges in a seed, or acc(plain) < acc(Fixup) - 2 points); inconclusive if the "
              "plain net also trains within 2 points of Fixup (then this depth does not show "
              "what Fixup adds).",
    measure=measure,
    judge=judge,
    requires=("normlab.models.fixup_resnet", "normlab.init.fixup_param_groups"),
    plot=plot,
    takeaway="Without normalization a deep ResNet dies at BN's learning rate; Fixup's init "
             "trains it close to BN, after a slower start (give it enough steps).",
)
