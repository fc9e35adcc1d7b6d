"""Parity verdicts: does a candidate answer like the reference, within a margin, on the same questions?

PASS needs, for every reported metric (acc, and acc_norm where it differs), the paired 95% CI of delta-accuracy
inside ±margin points AND the share of identical predicted answers at or above the agreement floor. The CI says
the accuracy did not move by more than the margin; the agreement floor catches a candidate that answers
differently while keeping the same score (balanced flips, wrong->other-wrong changes).

Default floor 0.90: a paired CI of ±1 point on a full set (n≈4000) already needs fewer than about 10% discordant
questions (half-width ≈ 1.96·sqrt(f/n)), and published INT4/INT8 quantizations of 7-9B models change 2-10% of
answers; a floor of 0.90 passes those and fails a broken model long before accuracy reaches chance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mexport.errors import MexportError
from mexport.validate.stats import MetricComparison

PASS = "pass"
FAIL = "fail"
SKIPPED = "skipped"

DEFAULT_MARGIN_POINTS = 1.0
DEFAULT_AGREEMENT_FLOOR = 0.90
FAIL_ON_CHOICES = ("parity", "any", "never")
_TOLERANCE = 1e-12


@dataclass(frozen=True)
class Verdict:
    status: str
    reasons: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        return "; ".join(self.reasons)


def points(fraction: float) -> float:
    return 100.0 * fraction


def parity_verdict(
    metrics: Sequence[MetricComparison], margin_points: float, agreement_floor: float, non_finite: int = 0
) -> Verdict:
    """PASS when every metric's paired delta CI lies within ±margin and its agreement reaches the floor.

    ``non_finite`` counts candidate questions with a NaN/inf log-likelihood: argmax would silently pick the first
    choice for them, so any such question fails the candidate whatever its accuracy.
    """
    reasons: list[str] = []
    if non_finite:
        reasons.append(f"{non_finite} question(s) with non-finite log-likelihoods (NaN/inf)")
    margin = margin_points / 100.0
    for metric in metrics:
        prefix = "" if metric.metric == "acc" else f"{metric.metric} "
        low, high = metric.delta_ci
        if low < -margin - _TOLERANCE or high > margin + _TOLERANCE:
            reasons.append(f"{prefix}paired CI [{points(low):+.2f}, {points(high):+.2f}] pts leaves ±{margin_points:g}")
        if metric.agreement < agreement_floor - _TOLERANCE:
            reasons.append(f"{prefix}agreement {metric.agreement:.2f} < {agreement_floor:.2f}")
    return Verdict(FAIL, tuple(reasons)) if reasons else Verdict(PASS)


def skipped_verdict(reason: str) -> Verdict:
    return Verdict(SKIPPED, (reason,))


def margin_for(recipe: str | None, default_points: float, recipe_margins: Mapping[str, float] | None) -> float:
    """The margin (points) for a candidate: its recipe's own margin when given, else the default."""
    if recipe is not None and recipe_margins and recipe in recipe_margins:
        return float(recipe_margins[recipe])
    return float(default_points)


def check_policy(
    margin_points: float, agreement_floor: float, fail_on: str, recipe_margins: Mapping[str, float]
) -> None:
    """Reject nonsensical thresholds before any model is loaded."""
    if fail_on not in FAIL_ON_CHOICES:
        raise MexportError(f"--fail-on {fail_on!r}: expected one of {', '.join(FAIL_ON_CHOICES)}")
    for name, value in [("--margin", margin_points), *((f"--margin-for {k}", v) for k, v in recipe_margins.items())]:
        if not value > 0:
            raise MexportError(f"{name} {value:g}: the margin must be a positive number of accuracy points")
    if not 0.0 <= agreement_floor <= 1.0:
        raise MexportError(f"--agreement-floor {agreement_floor:g}: expected a share between 0 and 1")


def run_fails(statuses: Iterable[str], fail_on: str) -> bool:
    """Whether a run counts as failed: "parity" on any FAIL, "any" also on SKIPPED, "never" never."""
    failing = {"parity": {FAIL}, "any": {FAIL, SKIPPED}, "never": set()}[fail_on]
    return any(status in failing for status in statuses)
