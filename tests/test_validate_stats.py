"""Parity statistics and verdict logic against hand-computed values."""

from __future__ import annotations

import math

import pytest

from mexport.errors import MexportError
from mexport.validate.stats import (
    choice_kl,
    compare_metric,
    distribution_drift,
    mcnemar_exact_p,
    resolvable_difference,
    sample_stderr,
    tango_interval,
    wilson_interval,
    z_value,
)
from mexport.validate.verdict import (
    FAIL,
    INCONCLUSIVE,
    PASS,
    SKIPPED,
    check_policy,
    margin_for,
    parity_verdict,
    run_exit_code,
    run_fails,
)


def test_mcnemar_exact_known_table() -> None:
    # two-sided binomial: 2 * P(X <= 1 | n=10, p=0.5) = 2 * 11 / 1024
    assert mcnemar_exact_p(1, 9) == pytest.approx(22 / 1024, abs=1e-12)
    assert mcnemar_exact_p(1, 9) == pytest.approx(0.02148, abs=1e-5)
    assert mcnemar_exact_p(9, 1) == pytest.approx(mcnemar_exact_p(1, 9))
    assert mcnemar_exact_p(5, 5) == pytest.approx(1.0)
    assert mcnemar_exact_p(0, 0) == 1.0


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_sample_stderr_matches_lm_eval_convention() -> None:
    values = [1.0, 0.0, 1.0, 1.0]
    mean = 0.75
    expected = math.sqrt(sum((v - mean) ** 2 for v in values) / 3) / 2
    assert sample_stderr(values) == pytest.approx(expected)


def test_tango_interval_reproduces_published_example() -> None:
    # Cavo et al. (2012), complete response before/after consolidation: [[59, 6], [16, 80]], n = 161. Fagerland,
    # Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017), ch. 8: Tango score CI -0.1240 to -0.0054
    # for p1+ - p+1 = (n12 - n21) / n; in our terms n12 are the gains (wrong->right), n21 the losses.
    low, high = tango_interval(right_to_wrong=16, wrong_to_right=6, n=161)
    assert (low, high) == pytest.approx((-0.1240, -0.0054), abs=5e-5)
    # mirror image: swapping gains and losses mirrors the interval
    assert tango_interval(6, 16, 161) == pytest.approx((0.0054, 0.1240), abs=5e-5)


def test_zero_flips_on_six_questions_is_wide_not_zero() -> None:
    same = [1, 0, 1, 1, 0, 1]
    comparison = compare_metric("acc", same, same, same, same)
    mean, (low, high) = comparison.delta, comparison.delta_ci
    z2 = z_value() ** 2
    assert mean == 0.0
    assert (low, high) == pytest.approx((-z2 / (6 + z2), z2 / (6 + z2)), abs=1e-9)
    assert high == pytest.approx(0.3903, abs=1e-4)
    assert resolvable_difference(6) == pytest.approx(high)
    # the resolvable difference shrinks like 1/n: ±1 point needs about 380 questions with no flip
    assert resolvable_difference(380) > 0.01 > resolvable_difference(381)


def test_tango_interval_edges() -> None:
    empty = compare_metric("acc", [], [], [], [])
    assert (empty.delta, empty.delta_ci) == (0.0, (-1.0, 1.0))
    low, high = tango_interval(6, 0, 6)  # every question lost
    assert low == -1.0 and -1.0 < high < 0.0
    low, high = tango_interval(0, 1, 40)  # one gain in 40: the interval covers 0 and is skewed upwards
    assert low < 0.0 < 1 / 40 < high and high > -low
    with pytest.raises(ValueError, match="do not fit"):
        tango_interval(30, 20, 40)


def _wald_interval(losses: int, gains: int, n: int) -> tuple[float, float]:
    """The paired Wald interval this module used before (mean ± z·sd/sqrt(n), ddof=1): [0, 0] with no flip."""
    d = [-1.0] * losses + [1.0] * gains + [0.0] * (n - losses - gains)
    mean = sum(d) / n
    half = z_value() * math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) / math.sqrt(n)
    return (mean - half, mean + half)


def _exact_coverage(interval, n: int, p_loss: float, p_gain: float) -> float:
    """P(CI covers the true difference) summed exactly over the trinomial of (losses, gains, ties)."""
    from scipy.stats import multinomial

    truth = p_gain - p_loss
    coverage = 0.0
    for losses in range(n + 1):
        for gains in range(n + 1 - losses):
            low, high = interval(losses, gains, n)
            if low - 1e-12 <= truth <= high + 1e-12:
                coverage += multinomial.pmf(
                    [losses, gains, n - losses - gains], n, [p_loss, p_gain, 1 - p_loss - p_gain]
                )
    return coverage


@pytest.mark.parametrize(("p_loss", "p_gain"), [(0.02, 0.02), (0.05, 0.0), (0.1, 0.05)])
def test_tango_coverage_near_nominal_on_small_samples(p_loss: float, p_gain: float) -> None:
    # a candidate that rarely flips answers, scored on 30 questions: the score interval keeps about 95% coverage
    assert _exact_coverage(tango_interval, 30, p_loss, p_gain) >= 0.93


def test_wald_interval_undercovers_a_rare_one_sided_loss() -> None:
    # 5% of answers lost, none gained, 30 questions: no flip at all 21% of the time, and Wald then says [0, 0]
    assert _exact_coverage(_wald_interval, 30, 0.05, 0.0) < 0.80
    assert _exact_coverage(tango_interval, 30, 0.05, 0.0) >= 0.93


def test_choice_kl() -> None:
    assert choice_kl([-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]) == 0.0
    # shifting all log-likelihoods by a constant leaves the choice distribution unchanged
    assert choice_kl([-1.0, -2.0, -3.0], [-6.0, -7.0, -8.0]) == pytest.approx(0.0, abs=1e-12)
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert choice_kl([math.log(0.5), math.log(0.5)], [math.log(0.25), math.log(0.75)]) == pytest.approx(expected)


def test_distribution_drift() -> None:
    ref = [[-1.0, -2.0], [-0.5, -3.0]]
    mean_kl, max_abs = distribution_drift(ref, ref)
    assert (mean_kl, max_abs) == (0.0, 0.0)
    cand = [[-1.0, -2.25], [-0.5, -3.0]]
    mean_kl, max_abs = distribution_drift(ref, cand)
    assert max_abs == pytest.approx(0.25)
    assert mean_kl == pytest.approx(choice_kl(ref[0], cand[0]) / 2)


def _metric(ref_correct, cand_correct, ref_pred=None, cand_pred=None, name="acc"):
    ref_pred = ref_pred if ref_pred is not None else [0 if c else 1 for c in ref_correct]
    cand_pred = cand_pred if cand_pred is not None else [0 if c else 1 for c in cand_correct]
    return compare_metric(name, ref_correct, cand_correct, ref_pred, cand_pred)


def test_compare_metric_counts_flips() -> None:
    ref = [1, 1, 1, 0, 0, 1, 0, 1]
    cand = [1, 0, 1, 1, 1, 1, 0, 1]
    metric = _metric(ref, cand)
    assert (metric.right_to_wrong, metric.wrong_to_right) == (1, 2)
    assert metric.reference_acc == pytest.approx(5 / 8) and metric.candidate_acc == pytest.approx(6 / 8)
    assert metric.delta == pytest.approx(1 / 8)
    assert metric.mcnemar_p == pytest.approx(1.0)
    assert metric.agreement == pytest.approx(5 / 8)


def test_verdict_identical_on_a_large_set_passes() -> None:
    correct = [1, 0, 1, 1, 0] * 80  # 400 questions, no flip: CI ±0.95 pts, inside ±1
    verdict = parity_verdict([_metric(correct, correct)], margin_points=1.0, agreement_floor=0.9)
    assert verdict.status == PASS and verdict.reasons == ()


def test_verdict_zero_flips_on_a_small_set_is_inconclusive_not_pass() -> None:
    correct = [1, 0, 1, 1, 0, 1]
    verdict = parity_verdict([_metric(correct, correct)], margin_points=1.0, agreement_floor=0.9)
    assert verdict.status == INCONCLUSIVE
    assert verdict.reasons == ("paired CI [-39.03, +39.03] pts crosses ±1 (6 questions resolve ±39.03 at best)",)


def test_verdict_all_flips_fails_with_both_reasons() -> None:
    verdict = parity_verdict([_metric([1] * 40, [0] * 40)], margin_points=1.0, agreement_floor=0.9)
    assert verdict.status == FAIL
    assert verdict.reasons == ("paired CI [-100.00, -82.48] pts lies outside ±1", "agreement 0.00 < 0.90")


def test_verdict_fails_only_when_the_ci_excludes_the_margin() -> None:
    ref = [1] * 200
    lost_20 = [0] * 20 + [1] * 180  # 10 points lost: CI about [-15, -6]
    verdict = parity_verdict([_metric(ref, lost_20)], margin_points=5.0, agreement_floor=0.8)
    assert verdict.status == FAIL and "lies outside ±5" in verdict.reasons[0]
    lost_8 = [0] * 8 + [1] * 192  # 4 points lost: CI crosses -5
    assert parity_verdict([_metric(ref, lost_8)], margin_points=5.0, agreement_floor=0.8).status == INCONCLUSIVE
    lost_1 = [0] + [1] * 199  # CI [-2.8, +1.4]: inside ±5
    assert parity_verdict([_metric(ref, lost_1)], margin_points=5.0, agreement_floor=0.8).status == PASS


def test_verdict_agreement_floor_catches_same_score_different_answers() -> None:
    # 4-choice questions all answered wrong by both, but with different wrong letters on 8 of 40: acc unchanged
    correct = [0] * 40
    ref_pred = [1] * 40
    cand_pred = [2] * 8 + [1] * 32
    metric = _metric(correct, correct, ref_pred, cand_pred)
    assert metric.delta == 0.0
    verdict = parity_verdict([metric], margin_points=10.0, agreement_floor=0.9)
    assert verdict.status == FAIL and verdict.reasons == ("agreement 0.80 < 0.90",)
    assert parity_verdict([metric], margin_points=10.0, agreement_floor=0.8).status == PASS


def test_verdict_checks_acc_norm_too() -> None:
    good = _metric([1, 0] * 200, [1, 0] * 200)
    bad_norm = _metric([1] * 400, [0] * 400, name="acc_norm")
    verdict = parity_verdict([good, bad_norm], margin_points=1.0, agreement_floor=0.9)
    assert verdict.status == FAIL
    assert all(reason.startswith("acc_norm ") for reason in verdict.reasons)


def test_margin_for_recipe() -> None:
    margins = {"int4-wo": 2.0}
    assert margin_for("int4-wo", 1.0, margins) == 2.0
    assert margin_for("fp8", 1.0, margins) == 1.0
    assert margin_for(None, 1.5, margins) == 1.5


def test_fail_on_policy() -> None:
    assert run_fails([PASS, SKIPPED], "parity") is False
    assert run_fails([PASS, SKIPPED], "any") is True
    assert run_fails([PASS, FAIL], "parity") is True
    assert run_fails([FAIL, SKIPPED], "never") is False
    assert run_fails([PASS, INCONCLUSIVE], "parity") is False
    assert run_fails([PASS, INCONCLUSIVE], "inconclusive") is True


@pytest.mark.parametrize(
    ("statuses", "fail_on", "code"),
    [
        ([PASS, PASS], "inconclusive", 0),
        ([PASS, INCONCLUSIVE], "inconclusive", 4),
        ([PASS, INCONCLUSIVE], "any", 4),
        ([PASS, INCONCLUSIVE], "parity", 0),
        ([FAIL, INCONCLUSIVE], "inconclusive", 1),  # a fail outranks an inconclusive
        ([FAIL, INCONCLUSIVE], "never", 0),
        ([SKIPPED, INCONCLUSIVE], "any", 1),
        ([SKIPPED], "inconclusive", 0),
    ],
)
def test_run_exit_code(statuses: list[str], fail_on: str, code: int) -> None:
    assert run_exit_code(statuses, fail_on) == code


@pytest.mark.parametrize(
    ("margin", "floor", "fail_on", "recipe_margins", "message"),
    [
        (0.0, 0.9, "parity", {}, "--margin 0"),
        (1.0, 1.5, "parity", {}, "--agreement-floor 1.5"),
        (1.0, 0.9, "sometimes", {}, "--fail-on 'sometimes'"),
        (1.0, 0.9, "parity", {"int4-wo": -1.0}, "--margin-for int4-wo -1"),
    ],
)
def test_check_policy_rejects_nonsense(margin, floor, fail_on, recipe_margins, message) -> None:
    with pytest.raises(MexportError, match=message):
        check_policy(margin, floor, fail_on, recipe_margins)


def test_verdict_fails_a_candidate_with_non_finite_logliks_even_at_equal_accuracy() -> None:
    correct = [1] * 300 + [0] * 100
    verdict = parity_verdict([_metric(correct, correct)], margin_points=1.0, agreement_floor=0.9, non_finite=2)
    assert verdict.status == "fail"
    assert verdict.reasons == ("2 question(s) with non-finite log-likelihoods (NaN/inf)",)


def test_one_log_softmax_for_scoring_quantize_report_and_stats() -> None:
    import numpy as np

    from mexport import numerics
    from mexport.optimize.quantize import report
    from mexport.validate import scoring, stats

    assert scoring.log_softmax is report.log_softmax is stats.log_softmax is numerics.log_softmax
    rows = np.array([[1000.0, 1000.0], [0.0, math.log(3.0)]], dtype=np.float32)  # would overflow without the shift
    expected = [[math.log(0.5), math.log(0.5)], [math.log(0.25), math.log(0.75)]]
    assert numerics.log_softmax(rows) == pytest.approx(np.array(expected), abs=1e-6)
    assert numerics.log_softmax(rows).dtype == np.float64
