"""Claim 3: BN makes the initial weight scale matter less."""

from __future__ import annotations

from pathlib import Path

from normlab.claims.base import Claim, RunContext, save_plot

MODEL = "cnn"
WIDTH, DEPTH = 16, 3
BATCH = 32
LR = 0.05
MAX_BN_SPREAD = 0.05  # reproduced: BN's spread <= 5 points ...
MIN_GAP = 0.10  # ... and at least 10 points below the plain net's, in every seed
MIN_PLAIN_SPREAD = 0.05  # below this the scale does not matter even without BN
SAME_GAP = 0.02  # not reproduced: BN's spread within 2 points of (or above) the plain net's


def scales_for(budget) -> list[float]:
    return budget.pick(quick=[0.1, 1.0, 10.0], default=[0.1, 0.3, 1.0, 3.0, 10.0],
                       full=[0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0])


def spread(values) -> float:
    return max(values) - min(values)


def measure(ctx: RunContext) -> dict:
    steps = ctx.budget.steps(300)
    seeds = list(range(ctx.budget.seeds))
    scales = scales_for(ctx.budget)
    acc, diverged, spreads = {}, {}, {}
    for norm in ("none", "bn"):
        acc[norm], diverged[norm], spreads[norm] = [], [], []
        for seed in seeds:
            runs = [ctx.train(model=MODEL, norm=norm, batch_size=BATCH, lr=LR, steps=steps,
                              seed=seed, model_kwargs={"width": WIDTH, "depth": DEPTH,
                                                       "init_scale": s})
                    for s in scales]
            # A diverged run stopped before its bad update: its accuracy is that of the
            # model it left, which is what a user would get.
            accs = [r["final_test_acc"] or 0.0 for r in runs]
            acc[norm].append(accs)
            diverged[norm].append([bool(r["diverged"]) for r in runs])
            spreads[norm].append(spread(accs))
    return {"data": ctx.data, "model": MODEL, "width": WIDTH, "depth": DEPTH, "batch": BATCH,
            "lr": LR, "steps": steps, "seeds": seeds, "init_scales": scales,
            "final_test_acc": acc, "diverged": diverged, "spread": spreads}


def judge(m: dict) -> tuple[str, str]:
    rows = [f"seed {seed}: spread no norm {m['spread']['none'][i]:.3f}, "
            f"BN {m['spread']['bn'][i]:.3f}" for i, seed in enumerate(m["seeds"])]
    desc = "; ".join(rows)
    plain, bn = m["spread"]["none"], m["spread"]["bn"]
    if all(p < MIN_PLAIN_SPREAD for p in plain):
        return "inconclusive", f"the init scale moves the plain net's accuracy by less than " \
                               f"{MIN_PLAIN_SPREAD:g} over this range, so there is nothing " \
                               f"for BN to reduce ({desc})."
    if all(b <= MAX_BN_SPREAD and p - b >= MIN_GAP for p, b in zip(plain, bn, strict=True)):
        return "reproduced", f"BN's accuracy spread over init scales is <= {MAX_BN_SPREAD:g} " \
                             f"and >= {MIN_GAP:g} below the plain net's in every seed ({desc})."
    if all(b >= p - SAME_GAP for p, b in zip(plain, bn, strict=True)):
        return "not reproduced", f"BN's spread is not smaller than the plain net's by more " \
                                 f"than {SAME_GAP:g} in any seed ({desc})."
    return "inconclusive", f"BN reduces the spread in some seed, but not to the criterion's " \
                           f"bar in every seed ({desc})."


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"none": ("tab:gray", "no normalization"), "bn": ("tab:blue", "BatchNorm")}
    for norm, (color, label) in styles.items():
        for i, accs in enumerate(m["final_test_acc"][norm]):
            ax.plot(m["init_scales"], accs, "o-", color=color, alpha=0.85,
                    label=label if i == 0 else None)
            for s, a, d in zip(m["init_scales"], accs, m["diverged"][norm][i], strict=True):
                if d:
                    ax.plot([s], [a], "x", color="tab:red", ms=9)
    ax.set_xscale("log")
    ax.set_xlabel("initial weight scale (multiplies He init of every hidden conv)")
    ax.set_ylabel(f"final test accuracy after {m['steps']} steps")
    ax.set_ylim(-0.03, 1.01)
    ax.set_title(f"Init-scale sensitivity, {m['model']} on {m['data']}, lr {m['lr']:g} "
                 "(red x: diverged)", fontsize=10)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    return save_plot(fig, out_dir, "bn_init_scale.png")


CLAIM = Claim(
    number=3,
    id="bn_init_scale",
    title="BN makes the initial weight scale matter less",
    statement="Because BatchNorm is normalizing on the fly, the choice of initial weight "
              "scale matters less, even if starting with weights that would normally "
              "increase the number of epochs.",
    source="seed article 003; Ioffe & Szegedy 2015, section 3.3 (BN is invariant to the "
           "scale of the weights: BN(aWu) = BN(Wu))",
    setup="3-block CNN (width 16) on the study's dataset (digits by default); every hidden "
          "conv initialised He-normal times a scale s in {0.1, 0.3, 1, 3, 10} ({0.1, 1, 10} "
          "quick); batch 32, SGD momentum 0.9, one fixed lr 0.05 for every scale (a user "
          "who does not retune), 300 steps at the default budget (x0.25 quick), no norm vs "
          "BN; seeds: the budget's.",
    criterion="Per seed, spread = max - min of the final test accuracy over the init scales "
              "(a diverged run counts with the accuracy of the model it left). Inconclusive "
              "if the plain net's spread is < 0.05 in every seed (nothing to reduce). "
              "Reproduced if BN's spread is <= 0.05 and at least 0.10 below the plain net's "
              "in every seed; not reproduced if BN's spread is >= the plain net's minus 0.02 "
              "in every seed; inconclusive otherwise.",
    measure=measure,
    judge=judge,
    requires=("normlab.nn.BatchNorm",),
    plot=plot,
    takeaway="With BN the init scale hardly matters (a few points over 0.1-10 vs ~90 for the "
             "plain net); a very large scale still slows BN nets (smaller effective lr).",
)
