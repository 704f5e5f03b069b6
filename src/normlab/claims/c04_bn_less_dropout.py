"""Claim 4: BN reduces the need for dropout."""

from __future__ import annotations

from pathlib import Path

from normlab.claims.base import Claim, RunContext, save_plot

MODEL = "mlp"
WIDTH, DEPTH = 256, 3
BATCH = 32
LR = 0.05
MIN_PLAIN_GAIN = 0.01  # dropout must help the plain net by >= 1 point, else nothing to reduce
BN_GAIN_FRACTION = 0.5  # reproduced: BN's gain from dropout is at most half the plain net's
BN_MATCH_TOL = 0.005  # ... and BN without dropout is within 0.5 point of the best plain net


def dropouts_for(budget) -> list[float]:
    return budget.pick(quick=[0.0, 0.5], default=[0.0, 0.2, 0.5])


def seeds_for(budget) -> list[int]:
    # Dropout's effect is a point or two: more seeds than the budget's default to average
    # the test-set noise (359 test digits: one digit = 0.28 points).
    return list(range(1 if budget.seeds == 1 else budget.seeds + 1))


def _mean(values):
    return sum(values) / len(values)


def measure(ctx: RunContext) -> dict:
    steps = ctx.budget.steps(600)
    seeds = seeds_for(ctx.budget)
    ps = dropouts_for(ctx.budget)
    acc = {}
    mean_acc = {}
    for norm in ("none", "bn"):
        acc[norm] = {}
        for p in ps:
            runs = [ctx.train(model=MODEL, norm=norm, batch_size=BATCH, lr=LR, steps=steps,
                              seed=seed, model_kwargs={"width": WIDTH, "depth": DEPTH,
                                                       "dropout": p})
                    for seed in seeds]
            acc[norm][str(p)] = [r["final_test_acc"] if not r["diverged"] else 0.0
                                 for r in runs]
        mean_acc[norm] = {k: _mean(v) for k, v in acc[norm].items()}
    gain = {}
    best_p = {}
    for norm in ("none", "bn"):
        with_dropout = {k: v for k, v in mean_acc[norm].items() if float(k) > 0}
        best_p[norm] = max(with_dropout, key=with_dropout.get)
        gain[norm] = with_dropout[best_p[norm]] - mean_acc[norm]["0.0"]
    return {"data": ctx.data, "model": MODEL, "width": WIDTH, "depth": DEPTH, "batch": BATCH,
            "lr": LR, "steps": steps, "seeds": seeds, "dropouts": ps,
            "final_test_acc": acc, "mean_test_acc": mean_acc, "best_dropout": best_p,
            "dropout_gain": gain}


def judge(m: dict) -> tuple[str, str]:
    g_plain, g_bn = m["dropout_gain"]["none"], m["dropout_gain"]["bn"]
    bn_alone = m["mean_test_acc"]["bn"]["0.0"]
    plain_best = m["mean_test_acc"]["none"][m["best_dropout"]["none"]]
    plain_best = max(plain_best, m["mean_test_acc"]["none"]["0.0"])
    desc = (f"dropout gain (best p vs p=0, mean of {len(m['seeds'])} seeds): no norm "
            f"{g_plain:+.3f}, BN {g_bn:+.3f}; BN without dropout {bn_alone:.3f} vs best plain "
            f"net {plain_best:.3f}")
    if g_plain < MIN_PLAIN_GAIN:
        return "inconclusive", f"dropout does not help the plain net by {MIN_PLAIN_GAIN:g} " \
                               f"here, so there is no need for BN to reduce ({desc})."
    if g_bn <= BN_GAIN_FRACTION * g_plain and bn_alone >= plain_best - BN_MATCH_TOL:
        return "reproduced", f"BN without dropout matches the best plain net and gains at " \
                             f"most half as much from dropout ({desc})."
    return "not reproduced", f"dropout still helps BN by more than half its gain for the " \
                             f"plain net, or BN alone falls short of the plain net with " \
                             f"dropout ({desc})."


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    styles = {"none": ("tab:gray", "no normalization"), "bn": ("tab:blue", "BatchNorm")}
    ps = m["dropouts"]
    for norm, (color, label) in styles.items():
        means = [m["mean_test_acc"][norm][str(p)] for p in ps]
        ax.plot(ps, means, "o-", color=color, label=f"{label} (mean)")
        for p in ps:
            vals = m["final_test_acc"][norm][str(p)]
            ax.plot([p] * len(vals), vals, ".", color=color, alpha=0.5)
    ax.set_xlabel("dropout probability (after every hidden layer)")
    ax.set_ylabel(f"final test accuracy after {m['steps']} steps")
    ax.set_title(f"Dropout with and without BN, MLP {m['depth']}x{m['width']} on {m['data']}",
                 fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_plot(fig, out_dir, "bn_less_dropout.png")


CLAIM = Claim(
    number=4,
    id="bn_less_dropout",
    title="BN reduces the need for dropout",
    statement="Batch Normalization fulfills some of the same goals as Dropout; removing "
              "Dropout from BN-Inception allows the network to achieve higher validation "
              "accuracy (seed article 000: BN can 'remove the need for dropout').",
    source="Ioffe & Szegedy 2015, sections 3.4 and 4.2.1 ('Remove Dropout'); seed article 000",
    setup="MLP, 3 hidden layers of 256 units, on the study's dataset (digits by default, "
          "1,438 training images: small enough to overfit); dropout p in {0, 0.2, 0.5} ({0, 0.5} "
          "quick) after every hidden layer; batch 32, SGD momentum 0.9, lr 0.05, 600 steps "
          "at the default budget (x0.25 quick); the budget's seeds plus one (3 at the "
          "default budget, 1 quick), no norm vs BN.",
    criterion="Gain = (mean final test accuracy at the best p > 0) - (mean at p = 0), for "
              "each net. Inconclusive if the plain net's gain is < 0.01 (dropout does not "
              "help it: nothing to reduce). Reproduced if BN's gain is at most half the "
              "plain net's AND BN without dropout is within 0.005 of (or above) the best "
              "plain net (with or without dropout); not reproduced otherwise.",
    measure=measure,
    judge=judge,
    requires=("normlab.nn.BatchNorm",),
    plot=plot,
    takeaway="Here dropout hurt even the plain MLP, so the claim was not tested; BN alone "
             "gave the best accuracy, and adding dropout to it did not help.",
)
