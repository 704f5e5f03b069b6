"""Claim 16: ENorm improves on the plain network, notably at small batches."""

from __future__ import annotations

import math
from pathlib import Path

from normlab.claims._custom_loop import acc_or_chance, mean, noise_floor, pct
from normlab.claims.base import Claim, RunContext, save_plot

DEPTH = 10  # hidden layers (the paper's fully connected run: 15 layers of 500 units)
WIDTH = 64
C = 1.2  # the paper's c for fully connected nets
WEIGHT_DECAY = 1e-3  # the paper's
MOMENTUM = 0.0  # the paper's fully connected run
SMALL, NORMAL = 8, 128
#: lr 0.1 at the normal batch (the paper: 0.1 at batch 256); square-root scaling below.
BASE_LR = 0.1
EPOCHS = 20  # the same number of epochs at both batch sizes


def lr_for(batch: int) -> float:
    return BASE_LR * math.sqrt(batch / NORMAL)


def _steps(ctx: RunContext, batch: int) -> int:
    epochs = EPOCHS * ctx.budget.step_scale
    return max(10, int(round(epochs * ctx.dataset().num_train / batch)))


def _run(ctx: RunContext, enorm: bool, batch: int, seed: int,
         balance_last_hidden: bool = True) -> dict:
    steps = _steps(ctx, batch)
    lr = lr_for(batch)
    key = (f"mlp d{DEPTH} w{WIDTH} enorm={enorm} c={C} data={ctx.data} batch={batch} lr={lr} "
           f"wd={WEIGHT_DECAY} mom={MOMENTUM} cosine steps={steps} seed={seed}")
    if enorm and not balance_last_hidden:
        key += " official-layers"

    def work() -> dict:
        import torch

        from normlab import models
        from normlab.nn import ENorm
        from normlab.train import train

        ds = ctx.dataset()
        torch.manual_seed(seed)
        model = models.mlp(ds.in_shape, ds.num_classes, norm="none", width=WIDTH, depth=DEPTH)
        holder: dict = {}

        def make_opt(params):
            opt = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
            if enorm:
                # The chain in forward order: Flatten, [Linear, Identity, ReLU] x depth, head.
                holder["enorm"] = ENorm([*model.features, model.head], c=C, optimizer=opt,
                                        balance_last_hidden=balance_last_hidden)
            return opt

        callbacks = [lambda step, net, info: holder["enorm"].step()] if enorm else []
        result = train(model, ds, steps=steps, batch_size=batch, lr=lr, optimizer=make_opt,
                       schedule="cosine", seed=seed, progress=False, callbacks=callbacks,
                       eval_every=max(1, steps // 10), log_every=max(1, steps // 200))
        return result.to_dict()

    return ctx.run(key, work)


def measure(ctx: RunContext) -> dict:
    seeds = list(range(ctx.budget.seeds))
    num_classes = ctx.dataset().num_classes
    out = {"data": ctx.data, "depth": DEPTH, "width": WIDTH, "c": C, "seeds": seeds,
           "epochs": EPOCHS * ctx.budget.step_scale, "batches": {}}
    for batch in (SMALL, NORMAL):
        row = {"lr": lr_for(batch), "steps": _steps(ctx, batch)}
        for name, flag, last in (("plain", False, True), ("enorm", True, False),
                                 ("enorm_all_layers", True, True)):
            runs = [_run(ctx, flag, batch, seed, last) for seed in seeds]
            row[name] = {"final_test_acc": [acc_or_chance(r, num_classes) for r in runs],
                         "diverged": [bool(r["diverged"]) for r in runs],
                         "evals": [{"step": r["evals"]["step"], "test_acc": r["evals"]["test_acc"]}
                                   for r in runs]}
            row[name]["mean_acc"] = mean(row[name]["final_test_acc"])
        diffs = [e - p for e, p in zip(row["enorm"]["final_test_acc"],
                                       row["plain"]["final_test_acc"], strict=True)]
        row["diff"] = mean(diffs)
        row["diff_per_seed"] = diffs
        row["noise"] = noise_floor(row["enorm"]["final_test_acc"], row["plain"]["final_test_acc"])
        out["batches"][str(batch)] = row
    return out


def judge(m: dict) -> tuple[str, str]:
    small, normal = m["batches"][str(SMALL)], m["batches"][str(NORMAL)]

    def part(row, batch):
        return (f"batch {batch}: ENorm {pct(row['enorm']['mean_acc'])} vs plain "
                f"{pct(row['plain']['mean_acc'])} (diff {100 * row['diff']:+.1f} points, "
                f"noise {100 * row['noise']:.1f})")

    desc = f"{part(small, SMALL)}; {part(normal, NORMAL)}"
    if "enorm_all_layers" in small:  # the variant that also balances the classifier's input
        desc += (f" (ENorm balancing every hidden layer, the classifier's input included: "
                 f"{pct(small['enorm_all_layers']['mean_acc'])} at batch {SMALL}, "
                 f"{pct(normal['enorm_all_layers']['mean_acc'])} at batch {NORMAL})")
    if small["diff"] < -small["noise"] or normal["diff"] < -normal["noise"]:
        return "not reproduced", f"ENorm is worse than the plain net beyond seed noise; {desc}."
    if small["diff"] > small["noise"]:
        return "reproduced", f"ENorm beats the plain net at the small batch beyond seed noise " \
                             f"and is not worse at the normal one; {desc}."
    return "inconclusive", f"the difference at the small batch is within seed noise; {desc}."


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    batches = [str(SMALL), str(NORMAL)]
    variants = [("plain", "tab:gray", "plain MLP"),
                ("enorm", "tab:green", f"MLP + ENorm (c={m['c']}, official code's layers)"),
                ("enorm_all_layers", "tab:olive", "MLP + ENorm, every hidden layer")]
    variants = [v for v in variants if v[0] in m["batches"][str(SMALL)]]
    width = 0.8 / len(variants)
    for j, (name, color, label) in enumerate(variants):
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(batches))]
        means = [m["batches"][b][name]["mean_acc"] for b in batches]
        ax.bar(xs, means, width=width, color=color, label=label)
        for x, b in zip(xs, batches, strict=True):
            accs = m["batches"][b][name]["final_test_acc"]
            ax.scatter([x] * len(accs), accs, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(batches)))
    ax.set_xticklabels([f"batch {b}\n(lr {m['batches'][b]['lr']:.3g})" for b in batches])
    lo = min(min(m["batches"][b][n]["final_test_acc"]) for b in batches for n, _, _ in variants)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_ylabel("final test accuracy (bars: mean; dots: seeds)")
    ax.set_title(f"ENorm on a {m['depth']}-layer ReLU MLP (width {m['width']}) on {m['data']}, "
                 f"{m['epochs']:g} epochs", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, axis="y")
    return save_plot(fig, out_dir, "enorm_small_batch_accuracy.png")


CLAIM = Claim(
    number=16,
    id="enorm_small_batch",
    title="ENorm improves on the plain network, notably at small batches",
    statement="Equi-normalization, which rescales the hidden units after every SGD step so "
              "that the weight norm is minimal while the function is unchanged, gives better "
              "test accuracy than the unnormalised baseline, and is an alternative to BN and "
              "GN for small batches.",
    source="Stock, Graham, Gribonval & Jégou, 'Equi-normalization of Neural Networks', ICLR "
           "2019 (abstract and sections 5-6: fully connected and convolutional CIFAR-10 runs, "
           "small-batch ImageNet ResNet-18)",
    setup=f"ReLU MLP of {DEPTH} hidden layers x {WIDTH} units (normlab.models.mlp, "
          "norm='none') on the study's dataset (digits 8x8 by default), SGD without momentum, "
          f"weight decay {WEIGHT_DECAY:g}, cosine decay to 0 (the paper: linear), lr "
          f"{BASE_LR:g} at batch {NORMAL} and {lr_for(SMALL):.3g} at batch {SMALL} (square-root "
          f"scaling), {EPOCHS} epochs at the default budget (x0.25 quick) at both batch sizes; "
          f"with and without one ENorm cycle (c={C}, the paper's value for fully connected "
          "nets) after every optimizer step. Judged: ENorm over the layers the official "
          "code balances (every hidden layer but the one feeding the classifier, "
          "balance_last_hidden=False). Also reported: ENorm over every hidden layer "
          "(normlab's default), the setup of this claim's first runs, which gave 'not "
          "reproduced' (86.4% against 92.3% at batch 128 on digits); the judged variant was "
          "added after that run, to measure the paper's own configuration, with the "
          "criterion unchanged. The same initial weights and batches for all (paired "
          "seeds); seeds: the budget's.",
    criterion="diff(b) = mean over seeds of acc(ENorm) - acc(plain) (final test accuracy) at "
              f"batch b; noise(b) = max(1 point, the larger seed range of the two at b). Not "
              f"reproduced if diff < -noise at batch {SMALL} or at batch {NORMAL} (ENorm worse "
              f"beyond noise). Otherwise reproduced if diff({SMALL}) > noise({SMALL}); "
              "inconclusive if the small-batch difference is within the noise.",
    measure=measure,
    judge=judge,
    requires=("normlab.nn.ENorm",),
    plot=plot,
    takeaway="Whether ENorm helps depends on which layers it balances: compare the official "
             "code's layers with every hidden layer on your net before relying on it.",
)
