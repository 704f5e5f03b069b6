"""Helpers shared by claims 1-6 (Ioffe & Szegedy's Batch Normalization paper).

Not a claim module (the leading underscore keeps :func:`normlab.claims.all_claims`
from loading it as one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from normlab.claims.design import select_lr

__all__ = ["ARMS", "tuned_runs", "differences", "seed_dots"]

#: The two arms of every claim of the paper: (norm, label, colour).
ARMS = (("none", "no normalization", "tab:gray"), ("bn", "BatchNorm", "tab:blue"))


def tuned_runs(ctx, fn: Callable, make: Callable[[float, int], Mapping],
               grid: Sequence[float], score: Callable[[Mapping], float] | None = None
               ) -> tuple[dict, list[dict]]:
    """One arm at its own learning rate: the rate chosen on validation by
    :func:`normlab.claims.design.select_lr` over the first two seeds (``score`` as
    there), then ``fn(**make(lr, seed))`` for every seed of the budget in one
    ``ctx.map`` call (the selection seeds' runs are reused).

    Returns ``(selection, runs)``: ``select_lr``'s record and one result per seed."""
    sel = select_lr(ctx, fn, make, grid, ctx.seeds[:2], score=score)
    runs = ctx.map(fn, [make(sel["lr"], s) for s in ctx.seeds])
    return sel, runs


def differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a[i] - b[i]`` for every seed ``i`` (the paired per-seed effect)."""
    return [float(x) - float(y) for x, y in zip(a, b, strict=True)]


def seed_dots(ax, x: float, values: Sequence[float], color: str, label: str | None = None,
              width: float = 0.12) -> None:
    """One dot per seed at ``x`` and a bar at their mean (the plots' seed spread)."""
    vals = [float(v) for v in values]
    ax.scatter([x] * len(vals), vals, color=color, alpha=0.7, s=18, label=label, zorder=3)
    if vals:
        mean = sum(vals) / len(vals)
        ax.plot([x - width, x + width], [mean, mean], color=color, lw=2, zorder=3)
