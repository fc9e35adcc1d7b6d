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
    paired_difference_interval,
    sample_stderr,
    single_flip_half_width,
    wilson_interval,
    z_value,
)
from mexport.validate.verdict import (
    FAIL,
    PASS,
    SKIPPED,
    check_policy,
    margin_for,
    parity_verdict,
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


def test_paired_interval_hand_values() -> None:
    # d = [1, 0, -1, 1, 0, 0, 0, 0, 0, 0]: mean 0.1, var(ddof=1) = (3 - 10 * 0.01) / 9
    cand = [1, 1, 0, 1, 0, 0, 1, 0, 1, 0]
    ref = [0, 1, 1, 0, 0, 0, 1, 0, 1, 0]
    mean, low, high = paired_difference_interval(cand, ref)
    half = 1.959964 * math.sqrt(2.9 / 9) / math.sqrt(10)
    assert mean == pytest.approx(0.1)
    assert (low, high) == pytest.approx((0.1 - half, 0.1 + half), abs=1e-6)
    assert (low, high) == pytest.approx((-0.2518, 0.4518), abs=1e-4)


def test_paired_interval_identical_collapses_and_single_flip_resolution() -> None:
    same = [1, 0, 1, 1] * 10
    assert paired_difference_interval(same, same) == (0.0, 0.0, 0.0)
    flipped = list(same)
    flipped[0] = 0  # one right->wrong among 40
    mean, _, high = paired_difference_interval(flipped, same)
    assert mean == pytest.approx(-1 / 40)
    assert high - mean == pytest.approx(single_flip_half_width(40))
    assert single_flip_half_width(40) == pytest.approx(z_value() / 40)
    assert paired_difference_interval([1], [0]) == (1.0, -1.0, 1.0)


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


def test_verdict_identical_passes() -> None:
    correct = [1, 0, 1, 1, 0] * 8
    verdict = parity_verdict([_metric(correct, correct)], margin_points=1.0, agreement_floor=0.9)
    assert verdict.status == PASS and verdict.reasons == ()


def test_verdict_all_flips_fails_with_both_reasons() -> None:
    verdict = parity_verdict([_metric([1] * 40, [0] * 40)], margin_points=1.0, agreement_floor=0.9)
    assert verdict.status == FAIL
    assert verdict.reasons == ("paired CI [-100.00, -100.00] pts leaves ±1", "agreement 0.00 < 0.90")


def test_verdict_single_flip_on_small_set_fails_on_ci_only() -> None:
    ref = [1] * 40
    cand = [0] + [1] * 39
    verdict = parity_verdict([_metric(ref, cand)], margin_points=1.0, agreement_floor=0.9)
    assert verdict.status == FAIL
    assert len(verdict.reasons) == 1 and verdict.reasons[0].startswith("paired CI [-7.40, +2.40]")
    # a margin wider than the set's resolution lets the same candidate pass
    assert parity_verdict([_metric(ref, cand)], margin_points=8.0, agreement_floor=0.9).status == PASS


def test_verdict_agreement_floor_catches_same_score_different_answers() -> None:
    # 4-choice questions all answered wrong by both, but with different wrong letters on 8 of 40: acc unchanged
    correct = [0] * 40
    ref_pred = [1] * 40
    cand_pred = [2] * 8 + [1] * 32
    metric = _metric(correct, correct, ref_pred, cand_pred)
    assert metric.delta_ci == (0.0, 0.0)
    verdict = parity_verdict([metric], margin_points=1.0, agreement_floor=0.9)
    assert verdict.status == FAIL and verdict.reasons == ("agreement 0.80 < 0.90",)
    assert parity_verdict([metric], margin_points=1.0, agreement_floor=0.8).status == PASS


def test_verdict_checks_acc_norm_too() -> None:
    good = _metric([1, 0] * 20, [1, 0] * 20)
    bad_norm = _metric([1] * 40, [0] * 40, name="acc_norm")
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
    correct = [1] * 30 + [0] * 10
    verdict = parity_verdict([_metric(correct, correct)], margin_points=1.0, agreement_floor=0.9, non_finite=2)
    assert verdict.status == "fail"
    assert verdict.reasons == ("2 question(s) with non-finite log-likelihoods (NaN/inf)",)
