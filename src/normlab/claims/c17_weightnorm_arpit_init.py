"""Claim 17: weight normalization with the Arpit et al. init trains deep networks where
standard init fails; warm-up narrows the WN-BN gap."""

from __future__ import annotations

from pathlib import Path

from normlab.claims._arms import arm_run, dot_plot
from normlab.claims.base import Claim, RunContext, save_plot
from normlab.claims.design import accuracy_or_chance, select_lr
from normlab.claims.protocol import Effect, points

DATA = "digits"
DEPTH = 24  # hidden layers
WIDTH = 32
BATCH = 64
#: Around the old sweep's choices (WN-Arpit's best at 0.003, BN's at 0.03); select_lr
#: extends it while an arm's best sits at an edge.
LR_GRID = (0.003, 0.01, 0.03)
MOMENTUM = 0.9
STEPS = 300
WARMUP_FRACTION = 0.1  # Arpit et al.'s quadratic warm-up over the first 10% of the steps
#: "fail to even start training": Arpit's init must beat the standard one by this much.
INIT_MARGIN = 20.0
#: arm -> (normlab.claims._arms arm, warm-up, label)
ARMS = {"wn_standard": ("wn_standard", False, "WN, standard init"),
        "wn_arpit": ("wn_arpit", False, "WN, Arpit init"),
        "wn_arpit_warmup": ("wn_arpit", True, "WN, Arpit init + warm-up"),
        "bn": ("relu_bn", False, "BatchNorm (He init)")}
COLORS = {"WN, standard init": "tab:gray", "WN, Arpit init": "tab:orange",
          "WN, Arpit init + warm-up": "tab:red", "BatchNorm (He init)": "tab:blue"}


def _depth(ctx: RunContext) -> int:
    return ctx.budget.pick(quick=DEPTH // 2, default=DEPTH)


def _make(ctx: RunContext, name: str):
    steps, depth = ctx.budget.steps(STEPS), _depth(ctx)
    arm, warm, _ = ARMS[name]

    def make(lr: float, seed: int) -> dict:
        return {"arm": arm, "data": DATA, "width": WIDTH, "depth": depth, "batch_size": BATCH,
                "lr": lr, "steps": steps, "seed": seed, "momentum": MOMENTUM,
                "warmup_steps": int(steps * WARMUP_FRACTION) if warm else 0,
                "eval_every": steps}
    return make


def measure(ctx: RunContext) -> dict:
    seeds = ctx.seeds
    acc, chosen, diverged = {}, {}, {}
    for name in ARMS:
        make = _make(ctx, name)
        sel = select_lr(ctx, arm_run, make, LR_GRID, seeds[:2])
        runs = ctx.map(arm_run, [make(sel["lr"], s) for s in seeds])
        chosen[name] = sel
        acc[name] = [points(accuracy_or_chance(r)) for r in runs]
        diverged[name] = [bool(r["diverged"]) for r in runs]

    def diff(a: str, b: str) -> list[float]:
        return [x - y for x, y in zip(acc[a], acc[b], strict=True)]

    return {"effects": {"init_gain": diff("wn_arpit", "wn_standard"),
                        "bn_gap": diff("bn", "wn_arpit"),
                        "warmup_gain": diff("wn_arpit_warmup", "wn_arpit")},
            "acc": acc, "lr": chosen, "diverged": diverged, "seeds": seeds,
            "steps": ctx.budget.steps(STEPS), "depth": _depth(ctx)}


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    groups = {f"{ARMS[n][2]}\nlr {m['lr'][n]['lr']:g}": m["acc"][n] for n in ARMS}
    colors = dict(zip(groups, COLORS.values(), strict=True))
    dot_plot(ax, groups, colors, "final test accuracy (%), one dot per seed")
    ax.axhline(10, color="k", ls=":", lw=0.8)
    ax.set_title(f"{m['depth']}-layer ReLU MLP (width {WIDTH}) on {DATA}, {m['steps']} steps, "
                 f"batch {BATCH}; each arm at its rate chosen on validation; dotted: chance",
                 fontsize=8)
    return save_plot(fig, out_dir, "weightnorm_arpit_init_accuracy.png")


CLAIM = Claim(
    number=17,
    id="weightnorm_arpit_init",
    title="WN with Arpit et al.'s init trains deep nets; warm-up narrows the WN-BN gap",
    statement="With the proposed initialization (orthogonal v, g = sqrt(2 fan_in / fan_out)) "
              "weight-normalized networks train at depths where other initializations 'fail "
              "to even start training', and a learning-rate warm-up narrows the gap between "
              "weight normalization and batch normalization.",
    source="Arpit, Campos & Bengio, 'How to Initialize your Network? Robust Initialization "
           "for WeightNorm & ResNets', NeurIPS 2019 (sections 3-5; 2,500+ runs over depth, lr "
           "and seed; warm-up experiments)",
    setup=f"ReLU MLP of {DEPTH} hidden layers x {WIDTH} units on {DATA}, plain Linear "
          "classifier; four arms: weight-normalized (normlab.nn.weight_norm) with torch's "
          "default Linear init (g = ||v||, the standard init); WN with "
          "normlab.init.arpit_init_; the same plus normlab.init.arpit_warmup (quadratic "
          f"warm-up over the first {WARMUP_FRACTION:.0%} of the steps, by the train loop's "
          "scheduler); normlab.models.mlp with BatchNorm. SGD momentum "
          f"{MOMENTUM}, constant rate after warm-up, batch {BATCH}, {STEPS} steps (quick: a "
          f"quarter, depth {DEPTH // 2}). Each arm's rate is chosen on validation "
          "accuracy (seeds 0-1) from "
          f"{list(LR_GRID)}, extended while the best is at an edge. Each seed draws its "
          "split, batch order and initial weights, shared where the shapes allow; a "
          "diverged run counts as chance accuracy. The warm-up half is tested as what "
          "transfers from the paper's CIFAR ResNets to an MLP: whether warm-up raises WN's "
          "accuracy where WN trails BN.",
    measure=measure,
    effects=(
        Effect("init_gain", "WN with Arpit init minus WN with standard init, test accuracy",
               "points", "greater", threshold=INIT_MARGIN),
        Effect("bn_gap", "BN minus WN (Arpit init, no warm-up) test accuracy", "points",
               "greater", threshold=0.0, role="premise", previous_noise=22.8),
        Effect("warmup_gain", "WN (Arpit init) with minus without warm-up, test accuracy",
               "points", "greater", threshold=0.0, previous_noise=22.8),
    ),
    lessons={
        "reproduced": "Arpit et al.'s init let the deep weight-normalized net train far "
                      "beyond the standard init, and warm-up raised WN's accuracy where it "
                      "trailed BN.",
        "not reproduced": "One half did not hold at this scale: the init's advantage fell "
                          "short of the declared margin, or warm-up did not help WN where "
                          "it trailed BN.",
        "inconclusive": "The seeds cannot yet decide the init half or the warm-up half with "
                        "the confidence the protocol asks for.",
        "not testable at this scale": "WN with Arpit's init did not trail BN in this MLP, so "
                                      "there was no gap for warm-up to narrow (the paper's "
                                      "gap is a CIFAR-ResNet phenomenon); the init half's "
                                      "numbers are in the effects.",
    },
    setup_change=("Before: depth 40, each arm at the rate from (0.003, 0.01, 0.03) with the "
                  "lowest final training loss (BN's best at the top of the grid, WN-Arpit's "
                  "at the bottom), 2 seeds on one split, and at 400 steps no arm had "
                  "converged (BN near a third of the accuracy it reaches shallower). Now: "
                  "depth 24 and 300 steps (the CPU budget of the 5-seed paired design; a "
                  "first default run at 400 steps cost 77 CPU-seconds against the 70 "
                  "allowed, so the steps were cut for cost, whatever its verdict), each "
                  "arm's rate chosen on validation accuracy with the grid extended at an "
                  "edge, and the warm-up half restated as what can transfer to an MLP: a "
                  "WN-BN gap as the premise, warm-up's gain for WN as the effect."),
    criterion_change=("A: Arpit never diverges and beats standard by >= 20 points on means; "
                      "B: BN - WN > noise and warm-up gain > noise (noise = max(1 point, "
                      "largest seed range)); reproduced if A and B, not reproduced if "
                      "neither, else inconclusive",
                      "Arpit - standard: interval above 20 points; premise BN - WN(Arpit): "
                      "interval above 0 (else not testable at this scale); warm-up gain: "
                      "interval above 0"),
    scale_note=("The paper's warm-up result comes from CIFAR ResNets trained 200 epochs, "
                "where WN trails BN at high rates; a 24-layer MLP on 8x8 digits for a few "
                "hundred steps may show no WN-BN gap to narrow. The init half is closer to "
                "the paper's plain-net experiments, at smaller depth than their deepest."),
    requires=("normlab.nn.weight_norm", "normlab.init.arpit_init_", "normlab.init.arpit_warmup"),
    plot=plot,
)
