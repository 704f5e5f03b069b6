"""Design pieces shared by the batch-size and drop-in claims 7, 9, 10, 11 and 12.

- **A step budget per arm.** An arm at batch ``b`` trains ``max(min_steps,
  epochs * n_fit / b)`` steps (times the budget's step scale): the same epochs at every
  batch size where that is already many steps (small batches), and a step floor where
  it is not, so a large-batch reference is trained to convergence rather than cut off
  after a few dozen steps (issue 18: claims 7-10 gave batch 32/128 too few steps).
- **An arm** (:func:`run_arms`): its learning rate chosen on validation accuracy
  (:func:`normlab.claims.design.select_lr`, seeds 0-1) from a grid given at batch 32
  and scaled linearly with the batch (Goyal et al. 2017), extended while the best is
  at an edge; then every seed of the budget at the chosen rate, the runs of all arms in
  one ``ctx.map`` call so the study computes them in parallel.
- **Paired differences** (:func:`paired`): per seed, one arm's value minus another's.
- **The plot** (:func:`seed_dots`): one column per arm, one dot per seed, the mean.

Not a claim module (the leading underscore keeps :func:`normlab.claims.all_claims`
from loading it as one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from normlab.claims.design import accuracy_or_chance, select_lr, split
from normlab.claims.protocol import points

__all__ = ["MLP", "MLP_KWARGS", "MLP_EPOCHS", "MLP_MIN_STEPS", "LR_GRID", "REFERENCE_BATCH",
           "num_fit", "arm_steps", "run_arms", "paired", "seed_dots"]

#: The small MLP of the batch-size claims: 2 hidden layers of 64 units, each
#: Linear -> norm -> ReLU, so a norm sees (N, 64): one value per unit and sample, no
#: spatial positions pooled into the statistics.
MLP = "mlp"
MLP_KWARGS = {"width": 64, "depth": 2}
#: The MLP arms' step rule on digits (1,150 training samples a seed): 4 epochs at every
#: batch and at least 800 steps (22 epochs at batch 32). One rule for claims 7, 9 and 10,
#: so their LN and BN arms at the same batch are the same runs.
MLP_EPOCHS = 4.0
MLP_MIN_STEPS = 800
#: The learning-rate grid at batch 32 (SGD, momentum 0.9); scaled by batch / 32.
LR_GRID = (0.015, 0.05, 0.15)
REFERENCE_BATCH = 32


def num_fit(data: str) -> int:
    """Training samples of ``data`` after the validation split (seed 0's; every seed's
    split has the same size)."""
    return split(data, 0)[0].num_train


def arm_steps(ctx, batch: int, n_fit: int, epochs: float, min_steps: int) -> int:
    """Steps of an arm at ``batch``: ``max(min_steps, epochs * n_fit / batch)``, scaled
    by the budget (see the module docstring)."""
    return ctx.budget.steps(max(min_steps, round(epochs * n_fit / batch)))


def _maker(fn_kwargs: Mapping, steps: int, train_kwargs: Mapping
           ) -> Callable[[float, int], dict]:
    def make(lr: float, seed: int) -> dict:
        # one evaluation, at the end: intermediate ones cost time and decide nothing
        return {**fn_kwargs, "lr": lr, "steps": steps, "seed": seed,
                "train_kwargs": {"eval_every": steps, **train_kwargs}}
    return make


def run_arms(ctx, fn: Callable, arms: Mapping[str, Mapping], steps: Mapping[str, int],
             grid: Sequence[float] = LR_GRID, train_kwargs: Mapping | None = None) -> dict:
    """Choose each arm's rate on validation, then run every seed at it.

    Args:
        fn: the module-level run function (``design.train_run`` or one with the same
            arguments).
        arms: ``{name: kwargs of fn}`` without ``lr``, ``steps``, ``seed``,
            ``train_kwargs`` (those are set here); ``kwargs["batch_size"]`` scales the
            grid.
        steps: ``{name: steps}``.
        grid: the rates at batch :data:`REFERENCE_BATCH`.
        train_kwargs: extra arguments of :func:`normlab.train.train` for every run
            (e.g. ``{"schedule": "cosine"}``).

    Returns:
        ``{"lr": {name: select_lr's record}, "runs": {name: [result per seed]},
        "acc": {name: [test accuracy in points per seed]}}`` (a diverged run counts as
        chance).
    """
    seeds = ctx.seeds
    makers = {name: _maker(kw, steps[name], dict(train_kwargs or {}))
              for name, kw in arms.items()}
    grids = {name: [lr * kw["batch_size"] / REFERENCE_BATCH for lr in grid]
             for name, kw in arms.items()}
    # Every arm's first selection round in one call, so the study computes them in
    # parallel; select_lr then finds them stored and asks only for grid extensions.
    ctx.map(fn, [makers[name](float(f"{lr:.6g}"), s) for name in arms
                 for lr in grids[name] for s in seeds[:2]])
    chosen = {name: select_lr(ctx, fn, makers[name], grids[name], seeds[:2]) for name in arms}
    todo = [makers[name](chosen[name]["lr"], s) for name in arms for s in seeds]
    results = ctx.map(fn, todo)
    runs = {name: results[i * len(seeds):(i + 1) * len(seeds)] for i, name in enumerate(arms)}
    acc = {name: [points(accuracy_or_chance(r)) for r in rs] for name, rs in runs.items()}
    return {"lr": chosen, "runs": runs, "acc": acc}


def paired(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per seed, ``a - b`` (both lists in seed order)."""
    return [x - y for x, y in zip(a, b, strict=True)]


def seed_dots(ax, columns: Sequence[tuple[str, Sequence[float], str]],
              ylabel: str = "test accuracy (%), one dot per seed") -> None:
    """Draw one column per ``(label, values, color)``: a dot per seed (seeds joined
    across columns by a faint line, the pairing) and a bar at the mean."""
    n = len(columns[0][1])
    for s in range(n):
        ax.plot(range(len(columns)), [c[1][s] for c in columns], color="0.8", lw=0.8,
                zorder=1)
    for i, (_, vals, color) in enumerate(columns):
        ax.scatter([i] * len(vals), vals, color=color, alpha=0.7, zorder=2)
        mean = sum(vals) / len(vals)
        ax.plot([i - 0.2, i + 0.2], [mean, mean], color=color, lw=2.5, zorder=3)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([c[0] for c in columns])
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
