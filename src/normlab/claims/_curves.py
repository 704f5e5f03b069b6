"""Training with validation and test curves, and areas under them: the shared run
pieces of claims 18, 20 and 21 (learning speed of GHN, BN-LSTM and input-BN LSTM).

A claim about how *fast* a network learns is judged here on the area under its
accuracy (or loss) curve, the mean of the values at evaluations spaced evenly over the
run, rather than on the first step that crosses a target or on a curve's maximum:
the area moves smoothly with the whole curve, while a first passage or a maximum
jumps with one noisy evaluation.

A run that diverges has no curve past its divergence; every planned evaluation it
missed counts as chance accuracy (and the training loss as the loss of a uniform
guess, ``log(num_classes)``), so a diverged arm counts as having learned nothing,
never as missing (as :func:`normlab.claims.design.accuracy_or_chance`).

Not a claim module (the leading underscore keeps :func:`normlab.claims.all_claims`
from loading it as one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["planned_steps", "run_variants", "train_with_curves", "area", "train_loss_area",
           "val_area", "final_val", "plot_curves", "unit_interval"]


def planned_steps(steps: int, eval_every: int) -> list[int]:
    """The steps after which a run of ``steps`` steps is evaluated: every
    ``eval_every`` steps and after the last one."""
    if steps < 1 or eval_every < 1:
        raise ValueError(f"planned_steps: steps and eval_every must be >= 1, got {steps} "
                         f"and {eval_every}")
    return sorted(set(range(eval_every, steps, eval_every)) | {steps})


def train_with_curves(model, fit, val, *, steps: int, batch_size: int, lr: float, seed: int,
                      eval_every: int, optimizer: str = "adam",
                      clip_grad_norm: float | None = None) -> dict:
    """Train ``model`` on ``fit`` (a :class:`normlab.data.Dataset`) with
    :func:`normlab.train.train` and evaluate it on ``val = (x, y)`` and on the test set
    of ``fit`` after every step of :func:`planned_steps` (eval mode, running statistics),
    on the study's device (:func:`normlab.claims.design.current_device`).

    Returns a JSON-safe dict: ``curves`` (``step``, ``val_acc``, ``val_loss``,
    ``test_acc``, ``test_loss``, and ``train_loss``: the mean training-batch loss since
    the previous evaluation), ``planned`` (the planned evaluation steps),
    ``train_loss_mean`` (the mean of every step's batch loss: the area under the
    training-loss curve, None if the run diverged), ``diverged``, ``steps_done``,
    ``num_classes``, ``final_test_acc``, ``final_test_loss`` and ``final_val_acc``
    (None if the run diverged).
    """
    from normlab.claims.design import current_device
    from normlab.train import evaluate, train

    device = current_device()
    x_val, y_val = val
    planned = planned_steps(steps, eval_every)
    curves = {k: [] for k in ("step", "val_acc", "val_loss", "test_acc", "test_loss",
                              "train_loss")}
    window: list[float] = []

    def record(step: int, net) -> None:
        val_loss, val_acc = evaluate(net, x_val, y_val, device=device)
        test_loss, test_acc = evaluate(net, fit.x_test, fit.y_test, device=device)
        for key, value in (("step", step), ("val_acc", val_acc), ("val_loss", val_loss),
                           ("test_acc", test_acc), ("test_loss", test_loss),
                           ("train_loss", sum(window) / len(window))):
            curves[key].append(value)
        window.clear()

    def callback(step: int, net, info: Mapping) -> bool:
        window.append(info["loss"])
        if step < steps and step % eval_every == 0:
            record(step, net)
        return False

    result = train(model, fit.x_train, fit.y_train, steps=steps, batch_size=batch_size,
                   lr=lr, optimizer=optimizer, clip_grad_norm=clip_grad_norm, seed=seed,
                   progress=False, callbacks=[callback], device=device)
    if not result.diverged:
        record(result.steps_done, model)
    losses = result.curve["loss"]
    finite = not result.diverged and all(v is not None and math.isfinite(v) for v in losses)
    last = {k: (curves[k][-1] if finite and curves[k] else None)
            for k in ("test_acc", "test_loss", "val_acc")}
    return {"curves": curves, "planned": planned, "diverged": bool(result.diverged),
            "steps_done": result.steps_done, "num_classes": int(fit.num_classes),
            "train_loss_mean": sum(losses) / len(losses) if finite and losses else None,
            "final_test_acc": last["test_acc"], "final_test_loss": last["test_loss"],
            "final_val_acc": last["val_acc"]}


def area(result: Mapping, key: str = "test_acc") -> float:
    """The mean of the accuracy curve ``key`` (``"test_acc"`` or ``"val_acc"``) over the
    run's planned evaluations: the area under the curve divided by its length. A
    planned evaluation that did not happen (the run diverged) counts as chance."""
    chance = 1.0 / float(result["num_classes"])
    done = dict(zip(result["curves"]["step"], result["curves"][key], strict=True))
    values = [done.get(step) for step in result["planned"]]
    values = [v if v is not None and math.isfinite(v) else chance for v in values]
    return sum(values) / len(values)


def val_area(result: Mapping) -> float:
    """:func:`area` of the validation accuracy: the score that chooses a learning rate
    for a claim about learning speed (:func:`normlab.claims.design.select_lr`)."""
    return area(result, "val_acc")


def final_val(result: Mapping) -> float:
    """The final validation accuracy (chance for a diverged run): the score that
    chooses a learning rate where the claim is about the trained network."""
    from normlab.claims.design import accuracy_or_chance

    return accuracy_or_chance(result, "final_val_acc")


def train_loss_area(result: Mapping) -> float:
    """The mean training-batch loss over the whole run (the area under the training
    curve per step); a diverged run counts as a uniform guess, ``log(num_classes)``,
    for every step."""
    value = result.get("train_loss_mean")
    if value is None or not math.isfinite(value):
        return math.log(float(result["num_classes"]))
    return float(value)


def unit_interval(fit, val):
    """``(fit', val')``: inputs mapped to [0, 1] with the fit split's minimum and
    maximum (test and validation inputs clamped), for networks that read inputs as
    fuzzy truth values (GHN); the standardisation of :mod:`normlab.data` is one affine
    map per channel, so this recovers the pixel intensities' scale."""
    import dataclasses

    lo, hi = fit.x_train.min(), fit.x_train.max()
    scale = float(hi - lo) or 1.0

    def to01(x):
        return ((x - lo) / scale).clamp(0.0, 1.0)

    new_fit = dataclasses.replace(fit, x_train=to01(fit.x_train), x_test=to01(fit.x_test))
    return new_fit, (to01(val[0]), val[1])


def plot_curves(ax, runs: Mapping[str, Sequence[Mapping]], key: str,
                colors: Mapping[str, str], labels: Mapping[str, str], scale: float = 100.0,
                x_scale: float = 1.0) -> None:
    """Draw every seed's curve ``key`` of every arm (thin lines) and the arm's mean over
    seeds (thick line) on ``ax``; ``runs[arm]`` is the list of the arm's runs (results
    of :func:`train_with_curves`), one a seed."""
    for arm, arm_runs in runs.items():
        for run in arm_runs:
            c = run["curves"]
            ax.plot([s / x_scale for s in c["step"]], [scale * v for v in c[key]],
                    color=colors[arm], lw=0.7, alpha=0.45)
        full = [r for r in arm_runs if len(r["curves"]["step"]) == len(r["planned"])]
        if full:
            steps = full[0]["curves"]["step"]
            mean = [scale * sum(r["curves"][key][i] for r in full) / len(full)
                    for i in range(len(steps))]
            ax.plot([s / x_scale for s in steps], mean, color=colors[arm], lw=2.2,
                    label=f"{labels[arm]} (mean of {len(full)} seeds)")


def run_variants(ctx, fn, make, variants: Sequence[str], grid: Sequence[float],
                 quick_lr: float, score) -> tuple[dict, dict]:
    """Each variant's learning rate and its runs over every seed (claims 20 and 21).

    ``make(variant)`` returns the ``(lr, seed) -> kwargs`` maker of ``fn``'s runs. A
    variant's rate is chosen by :func:`normlab.claims.design.select_lr` on the first two
    seeds with ``score``; the quick budget (a smoke test) skips the choice and uses
    ``quick_lr``. Returns ``(chosen, runs)``: per variant, the selection record and the
    list of run results in seed order (every variant's final runs in one map call).
    """
    from normlab.claims.design import select_lr

    seeds = ctx.seeds
    chosen = {}
    for v in variants:
        g = ctx.budget.pick(quick=None, default=grid)
        chosen[v] = ({"lr": quick_lr, "grid": [quick_lr], "scores": {}, "bracketed": False}
                     if g is None else select_lr(ctx, fn, make(v), g, seeds[:2], score=score))
    done = ctx.map(fn, [make(v)(chosen[v]["lr"], s) for v in variants for s in seeds])
    n = len(seeds)
    return chosen, {v: done[i * n:(i + 1) * n] for i, v in enumerate(variants)}
