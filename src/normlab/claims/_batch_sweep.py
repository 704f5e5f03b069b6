"""Helpers shared by the claims that compare normalizers across batch sizes
(claims 8, 9, 10 and 12): the same number of epochs at every batch size, the
learning rate scaled linearly with the batch, and summaries over seeds.

Not a claim module (the leading underscore keeps :func:`normlab.claims.all_claims`
from loading it as one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Batch size at which the base learning rates are given.
REFERENCE_BATCH = 32


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule (Goyal et al. 2017, used by Wu & He 2018): ``base_lr`` is
    the rate at batch :data:`REFERENCE_BATCH`, and the rate is proportional to the batch."""
    return base_lr * batch_size / REFERENCE_BATCH


def steps_for_epochs(epochs: float, num_train: int, batch_size: int, minimum: int = 10) -> int:
    """Optimizer steps that make ``epochs`` passes over ``num_train`` samples at
    ``batch_size`` (so every batch size sees the same number of samples)."""
    if epochs <= 0 or num_train < 1 or batch_size < 1:
        raise ValueError(f"steps_for_epochs: need epochs > 0, num_train >= 1, batch_size >= 1; "
                         f"got {epochs}, {num_train}, {batch_size}")
    return max(minimum, int(round(epochs * num_train / batch_size)))


def by_budget(ctx, quick, default, full=None):
    """``ctx.budget.pick(...)`` for the study's budgets; any other budget (a test's)
    gets the ``quick`` choice, the cheapest."""
    if ctx.budget.name in ("quick", "default", "full"):
        return ctx.budget.pick(quick=quick, default=default, full=full)
    return quick


def epochs_at(ctx, quick: float, default: float, full: float) -> float:
    """Epochs for the study's budgets ("quick", "default", "full"); any other budget (a
    test's) gets ``default`` scaled by its step scale.

    Epochs are set per budget rather than scaled: with the same epochs at every batch
    size, the largest batch takes the fewest steps, and it must still get enough of them
    to converge for the comparison to be about the batch size."""
    if ctx.budget.name in ("quick", "default", "full"):
        return float(ctx.budget.pick(quick=quick, default=default, full=full))
    return default * ctx.budget.step_scale


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def spread(values: Sequence[float]) -> float:
    """Max minus min (0 for a single value): the seed-to-seed range."""
    return max(values) - min(values) if values else 0.0


def summary(accs: Sequence[float | None]) -> dict:
    """``{"mean", "min", "max", "range", "seeds"}`` of final test accuracies (a run
    that ended without an accuracy counts as 0: it did not train)."""
    vals = [0.0 if a is None or not math.isfinite(a) else float(a) for a in accs]
    return {"mean": mean(vals), "min": min(vals), "max": max(vals), "range": spread(vals),
            "seeds": vals}


def points(x: float) -> str:
    """An accuracy in [0, 1] as a percentage with one decimal."""
    return f"{100 * x:.1f}%"


def pts(x: float) -> str:
    """A difference of accuracies as percentage points with one decimal."""
    return f"{100 * x:.1f} points"


def sampling_noise(accuracy: float, num_test: int) -> float:
    """Two standard errors of the difference of two test accuracies near ``accuracy``
    measured on ``num_test`` samples (binomial, errors taken as independent):
    ``2 * sqrt(2 p (1 - p) / n)``. A difference below this is within what the test set's
    finite size alone can produce (on 360 samples at 97%: 2.5 points), which a
    single-seed run has no seed-to-seed range to show."""
    if num_test < 1:
        raise ValueError(f"sampling_noise: num_test must be >= 1, got {num_test}")
    p = min(max(float(accuracy), 0.0), 1.0)
    return 2.0 * math.sqrt(2.0 * p * (1.0 - p) / num_test)
