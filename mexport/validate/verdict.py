"""Parity verdicts: does a candidate answer like the reference, within a margin, on the same questions?

Per metric (acc, and acc_norm where it differs) the paired 95% CI of delta-accuracy (Tango's score interval) is
compared with the band [-margin, +margin]:

- PASS: the CI lies inside the band (equivalence shown), and the agreement floor below is met;
- FAIL: the CI lies entirely outside the band (a difference larger than the margin shown), or the share of
  identical predicted answers is below the agreement floor, or a log-likelihood is NaN/inf;
- INCONCLUSIVE: the CI crosses a band edge: these questions cannot tell. With no flipped question the CI is
  ±z²/(n + z²) (:func:`mexport.validate.stats.resolvable_difference`), so a margin below that is never PASS. No
  question compared at all (each declined by one side, e.g. longer than an engine's context) is INCONCLUSIVE too.

A run that compared no question at all (every candidate skipped, or every comparison empty) has shown nothing: it
is never PASSED (exit 4 under every ``--fail-on`` but ``never``).

The agreement floor catches a candidate that answers differently while keeping the same score (balanced flips,
wrong->other-wrong changes).

Default floor 0.90: a paired CI of ±1 point on a full set (n≈4000) already needs fewer than about 10% discordant
questions (half-width ≈ 1.96·sqrt(f/n)), and published INT4/INT8 quantizations of 7-9B models change 2-10% of
answers; a floor of 0.90 passes those and fails a broken model long before accuracy reaches chance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mexport.errors import EXIT_CHECK_FAILED, EXIT_INCONCLUSIVE, EXIT_OK, MexportError
from mexport.optimize.quantize.recipes import RECIPES
from mexport.validate.stats import MetricComparison, resolvable_difference

PASS = "pass"
FAIL = "fail"
INCONCLUSIVE = "inconclusive"
SKIPPED = "skipped"

DEFAULT_MARGIN_POINTS = 1.0
MAX_MARGIN_POINTS = 100.0
DEFAULT_AGREEMENT_FLOOR = 0.90
# fail_on policy -> the verdicts that fail the run
FAILING_STATUSES = {
    "parity": frozenset({FAIL}),
    "inconclusive": frozenset({FAIL, INCONCLUSIVE}),
    "any": frozenset({FAIL, INCONCLUSIVE, SKIPPED}),
    "never": frozenset(),
}
FAIL_ON_CHOICES = tuple(FAILING_STATUSES)
DEFAULT_FAIL_ON = "inconclusive"
FAIL_ON_HELP = (
    "When the run fails: parity (a FAIL verdict), inconclusive (also a sample too small to resolve the margin; "
    "the default), any (also a skipped backend) or never. Exit 1 on failed parity, 4 when only inconclusive."
)
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


def shown_apart(value: float, limit: float, digits: int = 2) -> tuple[str, str]:
    """``value`` and ``limit`` with the fewest decimals (at least ``digits``) that tell them apart, so a message
    such as "agreement 0.895 < 0.9" shows the comparison that was made (never "0.90 < 0.90")."""
    for places in range(digits, 13):
        shown = f"{value:.{places}f}", f"{limit:.{places}f}"
        if shown[0] != shown[1]:
            return shown
    return f"{value:.12g}", f"{limit:.12g}"


def parity_verdict(
    metrics: Sequence[MetricComparison], margin_points: float, agreement_floor: float, non_finite: int = 0
) -> Verdict:
    """PASS, FAIL or INCONCLUSIVE for one candidate on one task (see the module docstring for the rule).

    ``non_finite`` counts candidate questions with a NaN/inf log-likelihood: argmax would silently pick the first
    choice for them, so any such question fails the candidate whatever its accuracy.
    """
    failures: list[str] = []
    unresolved: list[str] = []
    if non_finite:
        failures.append(f"{non_finite} question(s) with non-finite log-likelihoods (NaN/inf)")
    margin = margin_points / 100.0
    for metric in metrics:
        prefix = "" if metric.metric == "acc" else f"{metric.metric} "
        if metric.n == 0:
            unresolved.append(f"{prefix}no question compared")
            continue
        low, high = metric.delta_ci
        ci = f"{prefix}paired CI [{points(low):+.2f}, {points(high):+.2f}] pts"
        if high < -margin - _TOLERANCE or low > margin + _TOLERANCE:
            edge = abs(points(high if high < 0 else low))
            shown, limit = shown_apart(edge, margin_points)
            # the CI as shown rounds onto the margin: say which end was compared, with the digits that show it
            nearest = f" (nearest end {shown} > {limit})" if f"{edge:.2f}" == f"{margin_points:.2f}" else ""
            failures.append(f"{ci} lies outside ±{margin_points:g}{nearest}")
        elif low < -margin - _TOLERANCE or high > margin + _TOLERANCE:
            resolvable = points(resolvable_difference(metric.n))
            unresolved.append(
                f"{ci} crosses ±{margin_points:g} ({metric.n} questions resolve ±{resolvable:.2f} at best)"
            )
        if metric.agreement < agreement_floor - _TOLERANCE:
            shown, floor = shown_apart(metric.agreement, agreement_floor)
            failures.append(f"{prefix}agreement {shown} < {floor}")
    if not metrics:
        unresolved.append("no question compared")
    if failures:
        return Verdict(FAIL, tuple(failures + unresolved))
    return Verdict(INCONCLUSIVE, tuple(unresolved)) if unresolved else Verdict(PASS)


def skipped_verdict(reason: str) -> Verdict:
    return Verdict(SKIPPED, (reason,))


def margin_for(recipe: str | None, default_points: float, recipe_margins: Mapping[str, float] | None) -> float:
    """The margin (points) for a candidate: its recipe's own margin when given, else the default."""
    if recipe is not None and recipe_margins and recipe in recipe_margins:
        return float(recipe_margins[recipe])
    return float(default_points)


def check_margin(value: float, name: str = "--margin") -> None:
    """A margin is a finite number of accuracy points in (0, 100): 0 passes nothing, 100 or more passes anything."""
    if not (math.isfinite(value) and 0 < value < MAX_MARGIN_POINTS):
        raise MexportError(
            f"{name} {value:g}: the margin must be a finite number of accuracy points above 0 and below "
            f"{MAX_MARGIN_POINTS:g}",
            hint="e.g. 1 (points of accuracy the candidate may lose or gain)",
        )


def check_recipe_margins(margins: Mapping[str, float], name: str = "--margin-for") -> None:
    """Each per-recipe margin names a quantization recipe (a typo would leave that recipe at the default margin)
    and is itself a valid margin."""
    for recipe, value in margins.items():
        if recipe not in RECIPES:
            raise MexportError(
                f"{name} {recipe}={value:g}: no quantization recipe {recipe!r}",
                hint=f"valid recipes: {', '.join(RECIPES)}",
            )
        check_margin(value, f"{name} {recipe}")


def check_agreement_floor(value: float, name: str = "--agreement-floor") -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise MexportError(f"{name} {value:g}: expected a share between 0 and 1", hint="e.g. 0.9")


def check_fail_on(value: str, name: str = "--fail-on") -> None:
    if value not in FAIL_ON_CHOICES:
        raise MexportError(f"{name} {value!r}: expected one of {', '.join(FAIL_ON_CHOICES)}")


def check_policy(
    margin_points: float, agreement_floor: float, fail_on: str, recipe_margins: Mapping[str, float]
) -> None:
    """Reject nonsensical thresholds before any model is loaded (the pipeline's config runs the same checks)."""
    check_fail_on(fail_on)
    check_margin(margin_points)
    check_recipe_margins(recipe_margins)
    check_agreement_floor(agreement_floor)


def run_exit_code(statuses: Iterable[str], fail_on: str, compared: bool = True) -> int:
    """Exit code of a run: 1 when a FAIL (or, under "any", a SKIPPED) fails it, 4 when only INCONCLUSIVE does, else
    0. ``compared`` False (no question compared by any candidate) is 4 under every policy but "never"."""
    failing = set(statuses) & FAILING_STATUSES[fail_on]
    if failing - {INCONCLUSIVE}:
        return EXIT_CHECK_FAILED
    if failing or (not compared and fail_on != "never"):
        return EXIT_INCONCLUSIVE
    return EXIT_OK


def run_fails(statuses: Iterable[str], fail_on: str, compared: bool = True) -> bool:
    """Whether a run counts as failed under ``fail_on`` (see :func:`run_exit_code`)."""
    return run_exit_code(statuses, fail_on, compared) != EXIT_OK
