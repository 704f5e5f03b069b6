"""Claim 6: internal covariate shift: does BN keep a deep layer's input distribution
steadier during training?"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from normlab.claims.base import Claim, RunContext

WIDTH, DEPTH = 64, 8
BATCH = 32
LR = 0.02
PROBE_SIZE = 256
CHECKPOINTS = 20  # intervals of training between measurements
TRAINS_ACC = 0.5  # both nets must train (final test accuracy >= 0.5) for a verdict
STEADIER = 2.0  # reproduced: BN's total drift at most half the plain net's, every seed


def _hidden_linears(model):
    import torch

    return [m for m in model.features if isinstance(m, torch.nn.Linear)]


def layer_io(model, x) -> tuple[list, list]:
    """For each hidden Linear of an MLP: its input (the previous block's output after
    norm and ReLU; the flattened data for the first) and its output (the pre-norm
    activation), on the batch ``x`` in train mode (a copy: BN uses the batch's own
    statistics and the model's running statistics are left alone)."""
    import torch

    net = copy.deepcopy(model).train()
    inputs, outputs = [], []

    def hook(_module, inp, out):
        inputs.append(inp[0].detach())
        outputs.append(out.detach())

    handles = [m.register_forward_hook(hook) for m in _hidden_linears(net)]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


def unit_stats(a) -> tuple[list[float], list[float]]:
    """Per-unit mean and standard deviation over the batch of an (N, units) tensor."""
    return a.mean(0).tolist(), a.std(0, unbiased=False).tolist()


def interval_drift(mu_a, sd_a, mu_b, sd_b) -> float:
    """How far the per-unit distribution moved between two checkpoints, in units of
    the activation scale: mean over units of |d mean| + |d std|, divided by the root
    mean square activation (sqrt(mean(mu^2 + sd^2))) averaged over the two."""
    def rms(mu, sd):
        return math.sqrt(sum(m * m + s * s for m, s in zip(mu, sd, strict=True)) / len(mu))

    moved = sum(abs(b - a) for a, b in zip(mu_a, mu_b, strict=True))
    moved += sum(abs(b - a) for a, b in zip(sd_a, sd_b, strict=True))
    scale = 0.5 * (rms(mu_a, sd_a) + rms(mu_b, sd_b))
    return (moved / len(mu_a)) / scale if scale > 0 else 0.0


def depth_profile(model, x) -> dict:
    """Mean and std (over samples and units) of every hidden layer's pre-norm activation
    and of its output after norm and ReLU (the next layer's input)."""
    inputs, outputs = layer_io(model, x)
    post = inputs[1:] + [_head_input(model, x)]
    return {"pre_mean": [float(o.mean()) for o in outputs],
            "pre_std": [float(o.std()) for o in outputs],
            "post_mean": [float(p.mean()) for p in post],
            "post_std": [float(p.std()) for p in post]}


def _head_input(model, x):
    import torch

    net = copy.deepcopy(model).train()
    with torch.no_grad():
        return net.features(x).flatten(1)


def gradient_shift(model, x, y, layer: int, lr: float) -> dict:
    """Santurkar et al.'s (2018) internal covariate shift of hidden Linear ``layer``:
    its loss gradient G before, and G' after, a gradient step of size ``lr`` on all
    the parameters of the layers before it; returns ||G - G'|| / ||G|| and cos(G, G')."""
    import torch

    net = copy.deepcopy(model).train()
    target = _hidden_linears(net)[layer]
    earlier = []
    for m in net.features:
        if m is target:
            break
        earlier += list(m.parameters())

    def grad_of_target():
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        return target.weight.grad.detach().clone()

    g = grad_of_target()
    with torch.no_grad():
        for p in earlier:
            if p.grad is not None:
                p -= lr * p.grad
    g2 = grad_of_target()
    gn = float(g.norm())
    rel = float((g - g2).norm()) / gn if gn > 0 else 0.0
    cos = float((g * g2).sum()) / (gn * float(g2.norm())) if gn > 0 and g2.norm() > 0 else 0.0
    return {"rel_l2": rel, "cos": cos}


def _measure_one(ds, norm: str, seed: int, steps: int) -> dict:
    import torch

    from normlab import models
    from normlab.train import train

    torch.manual_seed(seed)
    net = models.build("mlp", ds.in_shape, ds.num_classes, norm=norm, width=WIDTH,
                       depth=DEPTH)
    x, y = ds.x_train[:PROBE_SIZE], ds.y_train[:PROBE_SIZE]
    layer = DEPTH - 1  # the last hidden Linear: its input has gone through DEPTH-1 blocks
    every = max(1, steps // CHECKPOINTS)
    track = {"step": [], "mean": [], "std": [], "grad_rel_l2": [], "grad_cos": []}

    def record(step, model):
        inputs, _ = layer_io(model, x)
        mu, sd = unit_stats(inputs[layer])
        shift = gradient_shift(model, x, y, layer, LR)
        track["step"].append(step)
        track["mean"].append(mu)
        track["std"].append(sd)
        track["grad_rel_l2"].append(shift["rel_l2"])
        track["grad_cos"].append(shift["cos"])

    def callback(step, model, _info):
        if step % every == 0:
            record(step, model)
        return False

    profile_init = depth_profile(net, x)
    record(0, net)
    result = train(net, ds, steps=steps, batch_size=BATCH, lr=LR, seed=seed, progress=False,
                   callbacks=[callback])
    if track["step"][-1] != result.steps_done:
        record(result.steps_done, net)
    drifts = [interval_drift(track["mean"][i], track["std"][i], track["mean"][i + 1],
                             track["std"][i + 1]) for i in range(len(track["step"]) - 1)]
    half = len(drifts) // 2
    return _finite_or_none({
        "final_test_acc": result.final_test_acc, "diverged": result.diverged,
        "steps": track["step"], "drift": drifts, "total_drift": sum(drifts),
        "late_drift": sum(drifts[half:]),
        "end_to_end_drift": interval_drift(track["mean"][0], track["std"][0],
                                           track["mean"][-1], track["std"][-1]),
        "grad_shift_rel_l2": track["grad_rel_l2"], "grad_shift_cos": track["grad_cos"],
        "depth_init": profile_init, "depth_trained": depth_profile(net, x)})


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def measure(ctx: RunContext) -> dict:
    steps = ctx.budget.steps(400)
    seeds = list(range(ctx.budget.seeds))
    ds = ctx.dataset()
    results = {}
    for norm in ("none", "bn"):
        results[norm] = []
        for seed in seeds:
            key = (f"ics|data={ctx.data}|mlp|w={WIDTH}|d={DEPTH}|norm={norm}|lr={LR}"
                   f"|batch={BATCH}|steps={steps}|seed={seed}|ckpt={CHECKPOINTS}"
                   f"|probe={PROBE_SIZE}")
            results[norm].append(ctx.run(key, lambda n=norm, s=seed: _measure_one(
                ds, n, s, steps)))
    return {"data": ctx.data, "width": WIDTH, "depth": DEPTH, "lr": LR, "batch": BATCH,
            "steps": steps, "seeds": seeds, "probe_size": PROBE_SIZE, "layer": DEPTH - 1,
            "results": results}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def judge(m: dict) -> tuple[str, str]:
    rows, ratios = [], []
    for i, seed in enumerate(m["seeds"]):
        plain, bn = m["results"]["none"][i], m["results"]["bn"][i]
        for name, r in (("no-norm", plain), ("BN", bn)):
            if r["diverged"] or (r["final_test_acc"] or 0.0) < TRAINS_ACC:
                return "inconclusive", f"seed {seed}: the {name} net did not train " \
                                       f"(final test accuracy {r['final_test_acc']}), so " \
                                       f"its drift says nothing."
        d_plain, d_bn = plain["total_drift"], bn["total_drift"]
        ratios.append(d_plain / d_bn if d_bn > 0 else math.inf)
        g_plain = _mean(plain["grad_shift_rel_l2"][1:])
        g_bn = _mean(bn["grad_shift_rel_l2"][1:])
        rows.append(f"seed {seed}: drift no norm {d_plain:.3f}, BN {d_bn:.3f}; "
                    f"gradient shift (Santurkar) no norm {g_plain:.3g}, BN {g_bn:.3g}")
    desc = "; ".join(rows)
    if all(r >= STEADIER for r in ratios):
        return "reproduced", f"in Ioffe & Szegedy's distributional sense: the deep layer's " \
                             f"input moved at most 1/{STEADIER:g} as much with BN in every " \
                             f"seed ({desc})."
    if all(r <= 1.0 for r in ratios):
        return "not reproduced", f"the deep layer's input moved at least as much with BN in " \
                                 f"every seed ({desc})."
    return "inconclusive", f"BN's drift is lower somewhere but not {STEADIER:g}x lower in " \
                           f"every seed ({desc})."


def plot(m: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"none": "tab:gray", "bn": "tab:blue"}
    labels = {"none": "no norm", "bn": "BN"}
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.9))
    panels = [("post_std", "std of layer output (after norm+ReLU)"),
              ("post_mean", "mean of layer output (after norm+ReLU)"),
              ("pre_std", "std of pre-norm activation (W x)")]
    for ax, (q, title) in zip(axes, panels, strict=True):
        for norm in ("none", "bn"):
            for when, ls in (("depth_init", "--"), ("depth_trained", "-")):
                r = m["results"][norm][0]
                ys = r[when][q]
                ax.plot(range(1, len(ys) + 1), ys, ls, marker="o", ms=3, color=colors[norm],
                        label=f"{labels[norm]}, {'init' if when == 'depth_init' else 'trained'}")
        ax.set_xlabel("hidden layer")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if q != "post_mean":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Activation statistics through depth, MLP {m['depth']}x{m['width']} on "
                 f"{m['data']}, probe batch of {m['probe_size']} (seed {m['seeds'][0]}; "
                 f"trained = after {m['steps']} steps)", fontsize=10)
    fig.tight_layout()
    depth_name = "internal_covariate_shift_depth.png"
    fig.savefig(Path(out_dir) / depth_name, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.9))
    for norm in ("none", "bn"):
        for i, r in enumerate(m["results"][norm]):
            cum, total = [0.0], 0.0
            for d in r["drift"]:
                total += d
                cum.append(total)
            lab = labels[norm] if i == 0 else None
            axes[0].plot(r["steps"], cum, color=colors[norm], label=lab)
            axes[1].plot(r["steps"], r["grad_shift_rel_l2"], color=colors[norm], label=lab)
    axes[0].set_title(f"cumulative drift of layer {m['layer'] + 1}'s input distribution\n"
                      "(per-unit |d mean| + |d std|, over the activation scale)", fontsize=9)
    axes[1].set_title(f"gradient shift of layer {m['layer'] + 1} (Santurkar et al.)\n"
                      "||G - G'|| / ||G|| after a step of the layers below", fontsize=9)
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    drift_name = "internal_covariate_shift_drift.png"
    fig.savefig(Path(out_dir) / drift_name, dpi=110)
    plt.close(fig)
    return [depth_name, drift_name]


CLAIM = Claim(
    number=6,
    id="internal_covariate_shift",
    title="BN reduces internal covariate shift",
    statement="The distribution of each layer's inputs changes during training, as the "
              "parameters of the previous layers change (internal covariate shift); Batch "
              "Normalization reduces it by fixing the means and variances of layer inputs.",
    source="Ioffe & Szegedy 2015, sections 1-2 and Figure 1(b, c); seed articles 000-002. "
           "Santurkar et al. 2018 (section 2) argue BN does not reduce internal covariate "
           "shift in a gradient sense, and that this is not why it helps.",
    setup="MLP, 8 hidden layers of 64 units, on the study's dataset (digits by default), "
          "batch 32, SGD momentum 0.9, lr 0.02 for both nets, 400 steps at the default "
          "budget (x0.25 quick); seeds: the budget's. On a fixed probe batch (the first 256 "
          "training images, train mode), every 1/20 of training, the per-unit mean and "
          "std of the input of hidden layer 8 (the output of layer 7 after its norm and "
          "ReLU: what the layer's weights see). Also reported, not judged: Santurkar et "
          "al.'s gradient-based shift of that layer, and mean/std of every layer's "
          "pre-norm activation and output at init and after training.",
    criterion="Drift between checkpoints = mean over units of |change of mean| + |change of "
              "std|, divided by the layer input's RMS; total drift = sum over the 20 "
              "intervals. Inconclusive if either net does not train (final test accuracy "
              "< 0.5). Reproduced (in Ioffe & Szegedy's distributional sense) if BN's total "
              "drift is at most half the plain net's in every seed; not reproduced if it is "
              "no lower in every seed; inconclusive otherwise. A reproduction says the "
              "distribution moves less, not that this is why BN trains faster.",
    measure=measure,
    judge=judge,
    requires=("normlab.nn.BatchNorm",),
    plot=plot,
    takeaway="BN keeps a deep layer's input distribution far steadier (largely by "
             "construction); that alone does not show this is why BN helps.",
)
