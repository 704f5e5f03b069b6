"""Claim 9: LayerNorm trains at batch size 1 and at tiny batches."""

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
MODEL = "mlp"
MODEL_KWARGS = {"width": 64, "depth": 2}
BASE_LR = 0.05  # at batch 32, scaled linearly with the batch
#: epochs at the quick / default / full budgets (the same at every batch size)
EPOCHS = {"quick": 3.0, "default": 10.0, "full": 20.0}
LN_BATCHES = (1, 2, 32)
BN_BATCHES = (1, 2, 32)
#: LN at batch 1 and 2 must stay within this of LN at batch 32.
MAX_GAP = 0.02


def _bn_attempt(ctx: RunContext, bs: int, steps: int, seed: int) -> dict:
    """Train BN at ``bs``; a layer that refuses (ValueError: one value per channel in
    training) is recorded as refused, with its message, not as an accuracy."""
    key = f"bn-attempt|{MODEL}|{MODEL_KWARGS}|{DATA}|bs={bs}|steps={steps}|seed={seed}"

    def fn() -> dict:
        import torch

        from normlab import models
        from normlab.train import train

        ds = ctx.dataset(DATA)
        torch.manual_seed(seed)
        net = models.build(MODEL, ds.in_shape, ds.num_classes, norm="bn", **MODEL_KWARGS)
        try:
            r = train(net, ds, steps=steps, batch_size=bs, lr=scaled_lr(BASE_LR, bs),
                      seed=seed, progress=False)
        except ValueError as err:
            if "per channel" not in str(err):
                raise  # some other failure: not the refusal this claim records
            return {"refused": True, "error": str(err).splitlines()[0][:300],
                    "final_test_acc": None, "diverged": False}
        return {"refused": False, "error": None, "final_test_acc": r.final_test_acc,
                "diverged": r.diverged}

    return ctx.run(key, fn)


def measure(ctx: RunContext) -> dict:
    ds = ctx.dataset(DATA)
    n_train = int(ds.x_train.shape[0])
    epochs = epochs_at(ctx, **EPOCHS)
    seeds = list(range(ctx.budget.seeds))
    ln: dict[str, dict] = {}
    for bs in LN_BATCHES:
        steps = steps_for_epochs(epochs, n_train, bs)
        runs = [ctx.train(model=MODEL, norm="ln", data=DATA, batch_size=bs,
                          lr=scaled_lr(BASE_LR, bs), steps=steps, seed=s,
                          model_kwargs=MODEL_KWARGS) for s in seeds]
        ln[str(bs)] = summary([r["final_test_acc"] for r in runs])
        ln[str(bs)]["steps"] = steps
    bn: dict[str, dict] = {}
    for bs in BN_BATCHES:
        steps = steps_for_epochs(epochs, n_train, bs)
        runs = [_bn_attempt(ctx, bs, steps, s) for s in seeds]
        refused = [r for r in runs if r["refused"]]
        entry = {"steps": steps, "refused": len(refused) == len(runs),
                 "error": refused[0]["error"] if refused else None}
        if not refused:
            entry.update(summary([r["final_test_acc"] for r in runs]))
        bn[str(bs)] = entry
    ref = ln[str(max(LN_BATCHES))]["mean"]
    gaps = {str(b): ref - ln[str(b)]["mean"] for b in LN_BATCHES if b != max(LN_BATCHES)}
    return {
        "epochs": epochs,
        "seeds": len(seeds),
        "lr": {str(b): scaled_lr(BASE_LR, b) for b in sorted(set(LN_BATCHES + BN_BATCHES))},
        "ln": ln,
        "bn": bn,
        "ln_gap_to_batch32": gaps,
        "seed_range": max(v["range"] for v in ln.values()),
        "test_noise": sampling_noise(sum(v["mean"] for v in ln.values()) / len(ln),
                                     int(ds.x_test.shape[0])),
        "bn_batch1_refused": bn["1"]["refused"] if "1" in bn else None,
    }


def judge(m: dict) -> tuple[str, str]:
    gaps, noise = m["ln_gap_to_batch32"], max(m["seed_range"], m["test_noise"])
    worst_b = max(gaps, key=lambda b: gaps[b])
    worst = gaps[worst_b]
    ln = m["ln"]
    bn1 = m["bn"].get("1", {})
    bn_text = ("BN at batch 1 was refused (one value per channel)" if bn1.get("refused")
               else f"BN at batch 1 reached {points(bn1.get('mean', 0.0))}")
    facts = (f"LN test accuracy: batch 1 {points(ln['1']['mean'])}, batch 2 "
             f"{points(ln['2']['mean'])}, batch 32 {points(ln['32']['mean'])}; largest "
             f"shortfall {pts(worst)} at batch {worst_b} (limit {pts(MAX_GAP)}; noise "
             f"{pts(noise)} = max(seed range {pts(m['seed_range'])}, test-set sampling "
             f"{pts(m['test_noise'])})); {bn_text}.")
    if worst <= MAX_GAP:
        return "reproduced", facts
    if worst > MAX_GAP + noise:
        return "not reproduced", facts
    return "inconclusive", "The shortfall is within the noise of the limit: " + facts


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    for b in LN_BATCHES:
        labels.append(f"LN\nbatch {b}")
        values.append(100 * m["ln"][str(b)]["mean"])
        colors.append("tab:orange")
    for b in BN_BATCHES:
        entry = m["bn"][str(b)]
        labels.append(f"BN\nbatch {b}")
        values.append(0.0 if entry["refused"] else 100 * entry["mean"])
        colors.append("tab:blue")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bars = ax.bar(range(len(values)), values, color=colors)
    for i, (bar, b) in enumerate(zip(bars, list(LN_BATCHES) + list(BN_BATCHES), strict=True)):
        refused = i >= len(LN_BATCHES) and m["bn"][str(b)]["refused"]
        text = "refused:\none value\nper channel" if refused else f"{bar.get_height():.1f}"
        ax.text(bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 2) + 1, text,
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels)
    ax.set_ylim(0, 110)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"LayerNorm at tiny batches (MLP, {DATA}, {m['epochs']:g} epochs each)")
    ax.grid(axis="y", alpha=0.3)
    return save_plot(fig, out_dir, "ln_tiny_batch_acc.png")


CLAIM = Claim(
    number=9,
    id="ln_tiny_batch",
    title="LayerNorm trains at batch size 1 and tiny batches",
    statement=("Layer Normalization normalizes each sample on its own, over all of its "
               "features: 'that makes sense if you only ever see one example at a time ... "
               "or have tiny batches (m < 4)'; its computation does not depend on the batch, "
               "so it works at batch size 1, where batch normalization cannot be used."),
    source=("Ba, Kiros & Hinton, Layer Normalization, 2016, sections 1 and 3; seed article "
            "003 (normalization layers)."),
    setup=(f"MLP (2 hidden layers of 64) on {DATA}; LN at batch 1, 2 and 32 and BN at batch 1, "
           f"2 and 32, each for the same number of epochs ({EPOCHS['default']:g} at the default "
           f"budget, {EPOCHS['quick']:g} at quick), SGD momentum 0.9, learning rate scaled "
           f"linearly with the batch ({BASE_LR} at batch 32); final test accuracy, mean over the "
           "budget's seeds. BN at batch 1 is attempted and its refusal recorded."),
    criterion=(f"Reproduced if LN's mean test accuracy at batch 1 and at batch 2 are each at "
               f"most {100 * MAX_GAP:g} points below LN's at batch 32. Not reproduced if either "
               f"falls short by more than {100 * MAX_GAP:g} points plus the noise, max(the "
               "largest seed-to-seed range of the LN runs, two standard errors of a difference "
               "of two test accuracies from the finite test set, 2 sqrt(2p(1-p)/n_test)); "
               "inconclusive in between. BN at batch 1 (refused or not) "
               "and BN at batch 2 are reported for comparison, not judged."),
    measure=measure,
    judge=judge,
    requires=("normlab.nn.LayerNorm", "normlab.nn.BatchNorm"),
    plot=plot,
    takeaway=("For batch size 1 or a few samples (online learning, RNNs, memory-bound "
              "models), use LayerNorm: it needs no batch at all."),
)
