"""Claim 2: BN allows much higher learning rates."""

from __future__ import annotations

from pathlib import Path

from normlab.claims.base import Claim, RunContext, save_plot

MODEL = "cnn"
MODEL_KWARGS = {"width": 16, "depth": 3}
BATCH = 32
#: log-spaced by half decades (factor ~3.16): 0.001 ... 10
LRS = tuple(round(10 ** (k / 2 - 3), 6) for k in range(9))
TRAINS_ACC = 0.5  # "trains": not diverged and final test accuracy >= 0.5 (chance: 0.1)
MIN_FACTOR = 10.0  # reproduced: BN's largest training lr >= 10x (two grid steps) in every seed


def trains(run: dict) -> bool:
    acc = run["final_test_acc"]
    return (not run["diverged"]) and acc is not None and acc >= TRAINS_ACC


def largest_training_lr(lrs, runs) -> float | None:
    ok = [lr for lr, run in zip(lrs, runs, strict=True) if trains(run)]
    return max(ok) if ok else None


def measure(ctx: RunContext) -> dict:
    steps = ctx.budget.steps(200)
    seeds = list(range(ctx.budget.seeds))
    acc = {}
    diverged = {}
    largest = {}
    for norm in ("none", "bn"):
        acc[norm], diverged[norm], largest[norm] = [], [], []
        for seed in seeds:
            runs = [ctx.train(model=MODEL, norm=norm, batch_size=BATCH, lr=lr, steps=steps,
                              seed=seed, model_kwargs=MODEL_KWARGS) for lr in LRS]
            acc[norm].append([r["final_test_acc"] if not r["diverged"] else None
                              for r in runs])
            diverged[norm].append([bool(r["diverged"]) for r in runs])
            largest[norm].append(largest_training_lr(LRS, runs))
    return {"data": ctx.data, "model": MODEL, "model_kwargs": MODEL_KWARGS, "batch": BATCH,
            "steps": steps, "seeds": seeds, "lrs": list(LRS), "trains_acc": TRAINS_ACC,
            "final_test_acc": acc, "diverged": diverged, "largest_lr": largest}


def judge(m: dict) -> tuple[str, str]:
    top = max(m["lrs"])
    rows = []
    factors = []
    for i, seed in enumerate(m["seeds"]):
        lr_none, lr_bn = m["largest_lr"]["none"][i], m["largest_lr"]["bn"][i]
        rows.append(f"seed {seed}: no norm {lr_none}, BN {lr_bn}")
        if lr_none is None or lr_bn is None:
            return "inconclusive", f"a network trained at none of the rates ({'; '.join(rows)})."
        if lr_none >= top:
            return "inconclusive", f"the no-norm net still trains at the top of the grid " \
                                   f"({top:g}), so its limit was not found ({'; '.join(rows)})."
        factors.append(lr_bn / lr_none)
    desc = "; ".join(rows)
    # The grid's rates are rounded to 6 decimals: compare with a 0.1% tolerance.
    if all(f >= MIN_FACTOR * 0.999 for f in factors):
        return "reproduced", f"the largest rate that still trains is >= {MIN_FACTOR:g}x higher " \
                             f"with BN in every seed ({desc})."
    if all(f <= 1.001 for f in factors):
        return "not reproduced", f"BN's largest training rate is no higher than the plain " \
                                 f"net's in any seed ({desc})."
    return "inconclusive", f"BN trains at higher rates, but less than {MIN_FACTOR:g}x higher " \
                           f"in some seed ({desc})."


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"none": ("tab:gray", "no normalization"), "bn": ("tab:blue", "BatchNorm")}
    for norm, (color, label) in styles.items():
        for i, accs in enumerate(m["final_test_acc"][norm]):
            ys = [a if a is not None else 0.0 for a in accs]
            ax.plot(m["lrs"], ys, "o-", color=color, alpha=0.85, label=label if i == 0 else None)
            for lr, d in zip(m["lrs"], m["diverged"][norm][i], strict=True):
                if d:
                    ax.plot([lr], [0.0], "x", color=color, ms=9)
    ax.axhline(m["trains_acc"], color="k", ls=":", lw=0.8, label="'trains' threshold")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (SGD, momentum 0.9)")
    ax.set_ylabel(f"final test accuracy after {m['steps']} steps")
    ax.set_ylim(-0.03, 1.01)
    ax.set_title(f"Learning-rate sensitivity, {m['model']} on {m['data']} (x: diverged)",
                 fontsize=10)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    return save_plot(fig, out_dir, "bn_higher_lr_sensitivity.png")


CLAIM = Claim(
    number=2,
    id="bn_higher_lr",
    title="BN allows much higher learning rates",
    statement="Batch Normalization enables higher learning rates: in a batch-normalized "
              "model, we have been able to achieve a training speedup from higher learning "
              "rates, with no ill side effects (BN-x5 and BN-x30 used 5 and 30 times the "
              "baseline rate).",
    source="Ioffe & Szegedy 2015, section 3.3 and section 4.2.1 (BN-x5, BN-x30); seed "
           "article 000 ('allow for increased learning rate')",
    setup="3-block CNN (width 16) on the study's dataset (digits by default), batch 32, SGD "
          "momentum 0.9, constant lr from 0.001 to 10 in factors of sqrt(10) (9 rates), 200 "
          "steps at the default budget (x0.25 quick), no norm vs BN; seeds: the budget's.",
    criterion="A run 'trains' if it did not diverge and its final test accuracy is >= 0.5 "
              "(chance 0.1). Per seed, take the largest rate in the grid that trains, with "
              "and without BN. Reproduced if BN's is >= 10x the plain net's (two grid steps) "
              "in every seed; not reproduced if BN's is no higher in every seed; "
              "inconclusive otherwise, or if the plain net still trains at the top rate (10), "
              "or a net trains at no rate.",
    measure=measure,
    judge=judge,
    requires=("normlab.nn.BatchNorm",),
    plot=plot,
    takeaway="BN extended the usable learning rates of this CNN 10x upward (1.0 vs 0.1): "
             "with BN, try larger rates before anything else.",
)
