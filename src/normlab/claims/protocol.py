"""The lab's one statistical protocol: effects declared before the run, intervals
from the data, one verdict rule for every claim.

A claim declares its :class:`Effect` s (what is measured, in which unit, and which
side of which threshold the paper's statement puts it) before any run. Its
``measure`` returns, for each effect, one value per seed: the difference between
two arms that share the seed's data split, initialisation and batch order (a paired
design), so the seed-to-seed spread of the values holds both the training noise and
the test set's sampling noise (every seed draws its own train/validation/test split).

The interval of an effect is the 95 % confidence interval of the mean of its per-seed
values, Student's t over seeds (``scipy.stats.ttest_1samp(...).confidence_interval``).
With fewer than two seeds there is no variance estimate, so no interval and the
verdict is "inconclusive".

The verdict rule, the same for every claim (:func:`effect_verdict`):

- ``greater``: "reproduced" if the whole interval lies above ``threshold``; "not
  reproduced" if it lies below ``threshold`` (or below ``fail_below`` where the claim
  states a smaller effect it would call negligible); "inconclusive" otherwise.
- ``less``: the mirror image.
- ``equivalent`` (an "X matches Y" claim): "reproduced" if the whole interval lies
  inside ``(-margin, +margin)``; "not reproduced" if it lies entirely outside it;
  "inconclusive" otherwise. Superiority and equivalence are tested alike: a claim is
  never reproduced on a point estimate.

A claim's verdict combines its effects (:func:`claim_verdict`): "not testable at this
scale" when a premise effect (``role="premise"``: e.g. "dropout helps the plain net")
is not reproduced; "not reproduced" when any claim effect is not reproduced;
"reproduced" when all are; "inconclusive" otherwise. A budget that is not decisive
(the quick budget, a smoke test with shortened setups) caps every verdict at
"inconclusive".

Reasons and takeaways are generated from the numbers (:func:`describe`,
:func:`takeaway`): no measured number or direction is written into a claim's prose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "CONFIDENCE",
    "Effect",
    "Interval",
    "interval",
    "effect_verdict",
    "claim_verdict",
    "evaluate",
    "describe",
    "takeaway",
    "points",
    "judge",
]

#: The confidence level of every interval in the lab.
CONFIDENCE = 0.95

#: The claim verdicts, from the protocol's point of view.
REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
NOT_TESTABLE = "not testable at this scale"

_TESTS = ("greater", "less", "equivalent")
_ROLES = ("claim", "premise")


@dataclass(frozen=True)
class Effect:
    """One measured quantity of a claim and the side of a threshold the claim puts it on.

    Attributes:
        key: the key of its per-seed values in the measurement (``measured["effects"]``).
        name: what it is, in words, e.g. ``"GN minus BN test accuracy at batch 2"``.
        unit: its unit, e.g. ``"points"`` (accuracy points), ``"nats"``, ``"x"``.
        test: ``"greater"`` (the claim says the effect exceeds ``threshold``),
            ``"less"`` (below ``threshold``) or ``"equivalent"`` (inside
            ``(-margin, margin)``).
        threshold: the bound of a ``greater``/``less`` test.
        margin: the half-width of an ``equivalent`` test's band.
        fail_below: for ``greater`` (``fail_above`` for ``less``): where the claim would
            call the effect absent; default the threshold itself.
        role: ``"claim"`` (decides the verdict) or ``"premise"`` (must hold for the claim
            to be testable at all, e.g. "dropout helps the plain net").
        previous_noise: the noise figure the old protocol used for this comparison, in
            the same unit (shown next to the new interval's half-width).
    """

    key: str
    name: str
    unit: str
    test: str
    threshold: float = 0.0
    margin: float | None = None
    fail_below: float | None = None
    fail_above: float | None = None
    role: str = "claim"
    previous_noise: float | None = None

    def __post_init__(self):
        if self.test not in _TESTS:
            raise ValueError(f"Effect {self.key!r}: test must be one of {_TESTS}, "
                             f"got {self.test!r}")
        if self.role not in _ROLES:
            raise ValueError(f"Effect {self.key!r}: role must be one of {_ROLES}, "
                             f"got {self.role!r}")
        if self.test == "equivalent" and not (self.margin is not None and self.margin > 0):
            raise ValueError(f"Effect {self.key!r}: an equivalence test needs margin > 0, "
                             f"got {self.margin!r}")
        if self.test == "greater" and self.fail_below is not None \
                and self.fail_below > self.threshold:
            raise ValueError(f"Effect {self.key!r}: fail_below ({self.fail_below}) must not "
                             f"exceed threshold ({self.threshold})")
        if self.test == "less" and self.fail_above is not None \
                and self.fail_above < self.threshold:
            raise ValueError(f"Effect {self.key!r}: fail_above ({self.fail_above}) must not "
                             f"be below threshold ({self.threshold})")

    def rule(self) -> str:
        """The effect's side of its threshold, in words (for criteria and reports)."""
        if self.test == "equivalent":
            return f"within ±{_num(self.margin)} {self.unit}"
        side = ">" if self.test == "greater" else "<"
        text = f"{side} {_num(self.threshold)} {self.unit}"
        fail = self.fail_below if self.test == "greater" else self.fail_above
        if fail is not None and fail != self.threshold:
            text += f" (absent if {'<' if self.test == 'greater' else '>'} {_num(fail)})"
        return text


@dataclass(frozen=True)
class Interval:
    """The estimate of an effect and its confidence interval (None without one)."""

    estimate: float | None
    low: float | None
    high: float | None
    n: int
    confidence: float = CONFIDENCE
    method: str = "paired t interval over seeds (scipy.stats.ttest_1samp)"

    @property
    def half_width(self) -> float | None:
        if self.low is None or self.high is None:
            return None
        return (self.high - self.low) / 2


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` (one per seed) and its t confidence interval.

    Non-finite values (a run that diverged and produced no number) are an error for the
    caller to resolve: a claim maps a diverged run to a defined value (e.g. chance
    accuracy) before it reaches the protocol, so nothing is silently dropped.
    """
    vals = [float(v) for v in values]
    if any(not math.isfinite(v) for v in vals):
        raise ValueError(f"protocol.interval: non-finite value among {vals}; map diverged "
                         "runs to a defined value first")
    n = len(vals)
    if n == 0:
        return Interval(None, None, None, 0, confidence)
    mean = sum(vals) / n
    if n < 2:
        return Interval(mean, None, None, n, confidence)
    if max(vals) == min(vals):  # zero spread: the interval is the point (scipy gives NaN)
        return Interval(mean, mean, mean, n, confidence)
    from scipy import stats

    ci = stats.ttest_1samp(vals, 0.0).confidence_interval(confidence_level=confidence)
    return Interval(mean, float(ci.low), float(ci.high), n, confidence)


def effect_verdict(effect: Effect, iv: Interval) -> str:
    """The verdict of one effect under the rule in the module docstring."""
    if iv.low is None or iv.high is None:
        return INCONCLUSIVE
    lo, hi = iv.low, iv.high
    if effect.test == "greater":
        fail = effect.threshold if effect.fail_below is None else effect.fail_below
        if lo > effect.threshold:
            return REPRODUCED
        if hi < fail:
            return NOT_REPRODUCED
        return INCONCLUSIVE
    if effect.test == "less":
        fail = effect.threshold if effect.fail_above is None else effect.fail_above
        if hi < effect.threshold:
            return REPRODUCED
        if lo > fail:
            return NOT_REPRODUCED
        return INCONCLUSIVE
    m = effect.margin
    if -m < lo and hi < m:
        return REPRODUCED
    if lo >= m or hi <= -m:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def claim_verdict(effect_verdicts: Mapping[str, str], roles: Mapping[str, str],
                  decisive: bool = True) -> str:
    """Combine per-effect verdicts into the claim's (see the module docstring)."""
    premises = [v for k, v in effect_verdicts.items() if roles[k] == "premise"]
    claims = [v for k, v in effect_verdicts.items() if roles[k] == "claim"]
    if not claims:
        raise ValueError("protocol.claim_verdict: a claim needs at least one claim effect")
    if any(v == NOT_REPRODUCED for v in premises):
        verdict = NOT_TESTABLE
    elif any(v != REPRODUCED for v in premises):
        verdict = INCONCLUSIVE
    elif any(v == NOT_REPRODUCED for v in claims):
        verdict = NOT_REPRODUCED
    elif all(v == REPRODUCED for v in claims):
        verdict = REPRODUCED
    else:
        verdict = INCONCLUSIVE
    if not decisive and verdict in (REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE):
        return INCONCLUSIVE
    return verdict


def evaluate(effects: Sequence[Effect], values: Mapping[str, Sequence[float]],
             decisive: bool = True) -> tuple[str, list[dict]]:
    """Intervals and verdicts of ``effects`` from their per-seed ``values``.

    Returns the claim's verdict and one JSON-safe dict per effect (the record format
    the report reads: key, name, unit, role, test, threshold, margin, values, n,
    estimate, low, high, half_width, confidence, method, verdict, previous_noise).
    """
    rows, verdicts, roles = [], {}, {}
    for eff in effects:
        if eff.key not in values:
            raise KeyError(f"protocol.evaluate: the measurement has no values for effect "
                           f"{eff.key!r} (has {sorted(values)})")
        vals = [float(v) for v in values[eff.key]]
        iv = interval(vals)
        verdict = effect_verdict(eff, iv)
        verdicts[eff.key], roles[eff.key] = verdict, eff.role
        rows.append({"key": eff.key, "name": eff.name, "unit": eff.unit, "role": eff.role,
                     "test": eff.test, "threshold": eff.threshold, "margin": eff.margin,
                     "fail_below": eff.fail_below, "fail_above": eff.fail_above,
                     "rule": eff.rule(), "values": vals, "n": iv.n, "estimate": iv.estimate,
                     "low": iv.low, "high": iv.high, "half_width": iv.half_width,
                     "confidence": iv.confidence, "method": iv.method, "verdict": verdict,
                     "previous_noise": eff.previous_noise})
    return claim_verdict(verdicts, roles, decisive), rows


def _num(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    text = f"{x:.{digits}f}"
    return "0" if text.strip("-0.") == "" else text.rstrip("0").rstrip(".")


def describe(row: Mapping) -> str:
    """One sentence with an effect's numbers: estimate, interval, rule, verdict."""
    if row["low"] is None:
        est = "no value" if row["estimate"] is None else f"{_num(row['estimate'])} {row['unit']}"
        return (f"{row['name']}: {est} from {row['n']} seed(s), no interval (fewer than two "
                f"seeds) against {row['rule']}: {row['verdict']}.")
    return (f"{row['name']}: {_num(row['estimate'])} {row['unit']}, "
            f"{round(100 * row['confidence'])}% CI [{_num(row['low'])}, {_num(row['high'])}] "
            f"over {row['n']} seeds, against {row['rule']}: {row['verdict']}.")


def takeaway(verdict: str, rows: Sequence[Mapping], lessons: Mapping[str, str]) -> str:
    """The takeaway shown in the report: the claim's lesson for this verdict (prose with
    no measured number in it) followed by the measured effects."""
    lesson = lessons.get(verdict) or lessons.get("default", "")
    measured = " ".join(describe(r) for r in rows if r["role"] == "claim")
    return f"{lesson} Measured: {measured}".strip() if lesson else f"Measured: {measured}"


def points(fraction: float) -> float:
    """An accuracy or a difference of accuracies in [0, 1] as percentage points."""
    return 100.0 * float(fraction)


def judge(claim, measured: Mapping, decisive: bool = True) -> dict:
    """The record fields the protocol gives a claim's measurement: ``verdict``,
    ``effects`` (rows of :func:`evaluate`), ``reason`` and ``takeaway`` (generated),
    ``decisive``."""
    values = measured.get("effects") if isinstance(measured, Mapping) else None
    if not isinstance(values, Mapping):
        raise ValueError(f"claim {claim.id}: measure() must return a dict with an 'effects' "
                         "entry mapping each effect's key to its per-seed values")
    verdict, rows = evaluate(claim.effects, values, decisive)
    reason = " ".join(describe(r) for r in rows)
    if not decisive:
        reason = ("Quick budget (a smoke test with shortened setups): it decides nothing; "
                  "the default budget does. " + reason)
    return {"verdict": verdict, "effects": rows, "reason": reason,
            "takeaway": takeaway(verdict, rows, claim.lessons), "decisive": decisive}
