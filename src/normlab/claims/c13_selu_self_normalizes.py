"""Claim 13: SELU networks self-normalize: activation mean and variance converge to (0, 1)
through depth; ReLU networks' do not."""

from __future__ import annotations

import math
from pathlib import Path

from normlab.claims.base import BUDGETS, Claim, RunContext, save_plot

WIDTH = 256
BATCH = 512
INPUT_STDS = (0.5, 1.0, 2.0)
#: (name, activation, init) of the random networks compared.
NETS = (("selu_lecun", "selu", "lecun"), ("relu_lecun", "relu", "lecun"),
        ("relu_he", "relu", "he"))
LABELS = {"selu_lecun": "SELU, LeCun init", "relu_lecun": "ReLU, LeCun init",
          "relu_he": "ReLU, He init"}
#: SELU's final layers must be this close to (0, 1) ...
SELU_MAX_DIST = 0.1
#: ... and every ReLU net's at least this far.
RELU_MIN_DIST = 0.3
#: Not reproduced when SELU ends farther than this, or a ReLU net closer than SELU_MAX_DIST.
SELU_FAIL_DIST = 0.2


def _depth(ctx: RunContext) -> int:
    if ctx.budget.name in BUDGETS:
        return ctx.budget.pick(quick=32, default=64, full=128)
    return max(8, int(round(64 * ctx.budget.step_scale)))  # a custom (test) budget


def _seeds(ctx: RunContext) -> list[int]:
    if ctx.budget.name in BUDGETS:
        return list(range(ctx.budget.pick(quick=2, default=3, full=5)))
    return list(range(ctx.budget.seeds))


def activation_stats(activation: str, init: str, depth: int, width: int, batch: int,
                     input_std: float, seed: int) -> dict:
    """Mean and variance (over the batch and the units) of the activations after each of
    ``depth`` random layers ``x -> act(W x + b)``, W ~ N(0, 1/n) (LeCun) or N(0, 2/n)
    (He), b = 0, for input x ~ N(0, input_std^2)."""
    import torch

    from normlab.init import lecun_normal_
    from normlab.nn import SELU

    gen = torch.Generator().manual_seed(seed)
    x = input_std * torch.randn(batch, width, generator=gen, dtype=torch.float64)
    act = SELU() if activation == "selu" else torch.nn.ReLU()
    means, variances = [], []
    with torch.no_grad():
        for _ in range(depth):
            w = torch.empty(width, width, dtype=torch.float64)
            if init == "lecun":
                lecun_normal_(w, generator=gen)
            else:
                w.normal_(0.0, math.sqrt(2.0 / width), generator=gen)
            x = act(x @ w.T)
            means.append(float(x.mean()))
            variances.append(float(x.var(unbiased=False)))
    return {"mean": means, "var": variances}


def _distance(mean: float, var: float) -> float:
    return math.hypot(mean, var - 1.0)


def measure(ctx: RunContext) -> dict:
    depth, seeds = _depth(ctx), _seeds(ctx)
    tail = max(1, depth // 4)
    nets: dict[str, dict] = {}
    for name, activation, init in NETS:
        per_std = {}
        for std in INPUT_STDS:
            dists, curves = [], None
            for s in seeds:
                key = (f"act-stats|{activation}|{init}|depth={depth}|width={WIDTH}|"
                       f"batch={BATCH}|std={std}|seed={s}")
                st = ctx.run(key, lambda a=activation, i=init, sd=std, sed=s: activation_stats(
                    a, i, depth, WIDTH, BATCH, sd, sed))
                last = list(zip(st["mean"][-tail:], st["var"][-tail:], strict=True))
                dists.append(sum(_distance(m, v) for m, v in last) / len(last))
                curves = curves or st
            per_std[str(std)] = {"final_distance": dists, "curve_seed0": curves}
        all_d = [d for v in per_std.values() for d in v["final_distance"]]
        nets[name] = {"by_input_std": per_std, "max_final_distance": max(all_d),
                      "min_final_distance": min(all_d)}
    return {"depth": depth, "width": WIDTH, "batch": BATCH, "seeds": len(seeds),
            "input_stds": list(INPUT_STDS), "tail_layers": tail, "nets": nets}


def judge(m: dict) -> tuple[str, str]:
    selu = m["nets"]["selu_lecun"]["max_final_distance"]
    relu = {k: v["min_final_distance"] for k, v in m["nets"].items() if k != "selu_lecun"}
    closest = min(relu, key=lambda k: relu[k])
    facts = (f"Over the last {m['tail_layers']} of {m['depth']} layers, SELU's (mean, var) is "
             f"at most {selu:.3f} from (0, 1) (limit {SELU_MAX_DIST}) for input std "
             f"{m['input_stds']}; the closest ReLU net ({LABELS[closest]}) is at least "
             f"{relu[closest]:.3f} away (needed >= {RELU_MIN_DIST}).")
    if selu > SELU_FAIL_DIST or relu[closest] < SELU_MAX_DIST:
        return "not reproduced", facts
    if selu <= SELU_MAX_DIST and relu[closest] >= RELU_MIN_DIST:
        return "reproduced", facts
    return "inconclusive", facts


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"selu_lecun": "tab:red", "relu_lecun": "tab:gray", "relu_he": "tab:blue"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    layers = list(range(1, m["depth"] + 1))
    for name, net in m["nets"].items():
        for std, entry in net["by_input_std"].items():
            main = float(std) == 1.0
            curve = entry["curve_seed0"]
            kw = {"color": colors.get(name, "k"), "lw": 1.8 if main else 0.8,
                  "alpha": 1.0 if main else 0.45,
                  "label": LABELS.get(name, name) if main else None}
            axes[0].plot(layers, curve["mean"], **kw)
            axes[1].plot(layers, [max(v, 1e-30) for v in curve["var"]], **kw)
    axes[0].axhline(0, color="k", lw=0.6, ls="--")
    axes[1].axhline(1, color="k", lw=0.6, ls="--")
    axes[0].set_ylabel("mean of activations")
    axes[1].set_ylabel("variance of activations (log)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(title="thick: input std 1; thin: 0.5, 2")
    fig.suptitle(f"Activation statistics through depth: random MLP, width {m['width']}, "
                 f"batch {m['batch']} (target (0, 1) dashed)")
    return save_plot(fig, out_dir, "selu_self_normalizes_stats.png")


CLAIM = Claim(
    number=13,
    id="selu_self_normalizes",
    title="SELU self-normalizes: activations converge to mean 0, variance 1",
    statement=("With SELU activations and weights with sum 0 and squared sum 1 (LeCun "
               "normal), the mapping of a layer's activation mean and variance has a stable, "
               "attracting fixed point at (0, 1): activations propagated through many layers "
               "converge towards zero mean and unit variance (Theorem 1), and the variance "
               "is bounded from above and below (Theorems 2, 3). ReLU networks have no such "
               "fixed point."),
    source=("Klambauer, Unterthiner, Mayr & Hochreiter, Self-Normalizing Neural Networks, "
            "NeurIPS 2017, section 3, Theorems 1-3."),
    setup=(f"Random MLPs of width {WIDTH}, depth 64 (quick: 32), zero biases, input x ~ N(0, "
           f"s^2) with s in {list(INPUT_STDS)}, a batch of {BATCH}, float64: SELU with LeCun "
           "init vs ReLU with the same init and ReLU with He init (the fair ReLU baseline); "
           "mean and variance of each layer's activations over batch and units; 3 seeds (quick "
           "2). No training."),
    criterion=(f"Distance of a layer from (0, 1) = sqrt(mean^2 + (var - 1)^2), averaged over "
               f"the last quarter of the layers. Reproduced if SELU's distance is at most "
               f"{SELU_MAX_DIST} for every input scale and seed, and both ReLU nets' is at least "
               f"{RELU_MIN_DIST} for every input scale and seed. Not reproduced if SELU's "
               f"exceeds {SELU_FAIL_DIST} somewhere or a ReLU net gets within {SELU_MAX_DIST}. "
               "Inconclusive otherwise."),
    measure=measure,
    judge=judge,
    requires=("normlab.nn.SELU", "normlab.init.lecun_normal_"),
    plot=plot,
    takeaway=("SELU keeps a deep MLP's activations at (0, 1) without any normalization layer, "
              "but only with LeCun-normal init and standardized inputs."),
)
