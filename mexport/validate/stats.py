"""Paired statistics for MCQ parity: one backend against the reference on the same questions.

Conventions (documented in the report too):

- Accuracy CI: Wilson score interval (stays inside [0, 1] and keeps its coverage on small sets, unlike the normal
  interval); the lm-eval stderr (sample std / sqrt(n)) is kept beside it for comparison with published tables.
- Delta-accuracy CI: Tango's asymptotic score interval for the difference of paired proportions (T. Tango, 1998,
  "Equivalence test and confidence interval for the difference in proportions for the paired-sample design",
  Statistics in Medicine 17:891-908), recommended for this design by Fagerland, Lydersen & Laake (2014, Statistical
  Methods in Medical Research 23:1-22). It inverts the score test of delta = p_cand - p_ref with the restricted
  maximum-likelihood variance, so it stays honest where the paired Wald interval collapses: with no discordant
  question it is ±z²/(n + z²) (±39 points on 6 questions, ±0.95 on 400), not [0, 0].
- Resolvable difference: that zero-flip half-width, the narrowest paired CI n questions can give. A margin below it
  cannot be shown on this sample whatever the candidate does (the verdict is then at best inconclusive).
- McNemar: exact two-sided binomial test of b (right->wrong) against b + c at 0.5; p = 1 when nothing flips.
- Choice distributions: softmax over the choices' log-likelihoods; KL(ref || cand), averaged over questions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mexport.numerics import log_softmax

CONFIDENCE = 0.95


def z_value(confidence: float = CONFIDENCE) -> float:
    """Two-sided normal quantile (1.959964 for 95%)."""
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) when there is nothing to estimate from."""
    if n <= 0:
        return (0.0, 1.0)
    z = z_value(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def sample_stderr(values: Sequence[float]) -> float:
    """lm-eval's stderr: sample standard deviation (ddof=1) over sqrt(n); 0 below two values."""
    n = len(values)
    if n < 2:
        return 0.0
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(n))


def _tango_statistic(gains: int, losses: int, n: int, delta: float) -> float:
    """Tango's score statistic for H0: p_cand - p_ref = delta (gains: wrong->right, losses: right->wrong).

    The variance uses the maximum-likelihood estimate of the losses' cell probability restricted to ``delta``
    (Tango 1998, eq. 4), the closed-form root of a quadratic.
    """
    excess = gains - losses - n * delta
    if excess == 0:
        return 0.0
    b = -gains - losses + (2 * n - gains + losses) * delta
    c = -losses * delta * (1 - delta)
    p_losses = (math.sqrt(max(0.0, b * b - 8 * n * c)) - b) / (4 * n)
    variance = n * (2 * p_losses + delta * (1 - delta))
    return math.copysign(math.inf, excess) if variance <= 0 else excess / math.sqrt(variance)


def tango_interval(
    right_to_wrong: int, wrong_to_right: int, n: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Tango's score CI for delta = p_cand - p_ref from the discordant counts of ``n`` paired questions.

    The bounds are where the score statistic equals ±z (it falls monotonically in delta); (-1, 1) when n = 0.
    """
    from scipy.optimize import brentq

    if n <= 0:
        return (-1.0, 1.0)
    if not 0 <= right_to_wrong + wrong_to_right <= n or min(right_to_wrong, wrong_to_right) < 0:
        raise ValueError(f"discordant counts {right_to_wrong}/{wrong_to_right} do not fit {n} questions")
    z = z_value(confidence)
    estimate = (wrong_to_right - right_to_wrong) / n
    edge = 1e-12

    def bound(target: float, lo: float, hi: float, at_edge: float) -> float:
        def f(delta: float) -> float:
            return _tango_statistic(wrong_to_right, right_to_wrong, n, delta) - target

        if lo >= hi or f(at_edge) * target < 0:  # the statistic never reaches ±z inside (-1, 1)
            return at_edge
        return float(brentq(f, lo, hi, xtol=1e-12))

    low = -1.0 if estimate <= -1 else bound(z, -1 + edge, estimate, -1 + edge)
    high = 1.0 if estimate >= 1 else bound(-z, estimate, 1 - edge, 1 - edge)
    return (max(-1.0, low), min(1.0, high))


def resolvable_difference(n: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of the paired CI on ``n`` questions when none flips: z²/(n + z²), the finest margin n can show.

    Tango's statistic with b = c = 0 is -sqrt(n·delta / (1 - delta)) for delta > 0; setting it to -z gives this.
    """
    if n <= 0:
        return 1.0
    z2 = z_value(confidence) ** 2
    return z2 / (n + z2)


def mcnemar_exact_p(right_to_wrong: int, wrong_to_right: int) -> float:
    """Exact McNemar p-value (two-sided binomial test of b vs b+c at 0.5); 1.0 with no discordant pairs."""
    discordant = right_to_wrong + wrong_to_right
    if discordant == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(right_to_wrong, discordant, 0.5, alternative="two-sided").pvalue)


def choice_kl(reference_logliks: Sequence[float], candidate_logliks: Sequence[float]) -> float:
    """KL(ref || cand) between the softmax distributions over one question's choices (nats)."""
    log_p = log_softmax(reference_logliks)
    log_q = log_softmax(candidate_logliks)
    return max(0.0, float(np.sum(np.exp(log_p) * (log_p - log_q))))


@dataclass(frozen=True)
class MetricComparison:
    """One metric (acc or acc_norm) of a candidate against the reference, all fractions in [0, 1]."""

    metric: str
    n: int
    reference_acc: float
    reference_ci: tuple[float, float]
    reference_stderr: float
    candidate_acc: float
    candidate_ci: tuple[float, float]
    candidate_stderr: float
    delta: float
    delta_ci: tuple[float, float]
    right_to_wrong: int
    wrong_to_right: int
    mcnemar_p: float
    agreement: float


def compare_metric(
    metric: str,
    reference_correct: Sequence[int],
    candidate_correct: Sequence[int],
    reference_pred: Sequence[int],
    candidate_pred: Sequence[int],
    confidence: float = CONFIDENCE,
) -> MetricComparison:
    """Paired comparison of per-question correctness and predictions (same questions, same order)."""
    n = len(reference_correct)
    if not (n == len(candidate_correct) == len(reference_pred) == len(candidate_pred)):
        raise ValueError("paired vectors differ in length")
    ref_right = sum(int(x) for x in reference_correct)
    cand_right = sum(int(x) for x in candidate_correct)
    b = sum(1 for r, c in zip(reference_correct, candidate_correct) if r and not c)
    c = sum(1 for r, c in zip(reference_correct, candidate_correct) if c and not r)
    low, high = tango_interval(b, c, n, confidence)
    agree = sum(1 for r, c in zip(reference_pred, candidate_pred) if r == c)
    return MetricComparison(
        metric=metric,
        n=n,
        reference_acc=ref_right / n if n else 0.0,
        reference_ci=wilson_interval(ref_right, n, confidence),
        reference_stderr=sample_stderr([float(x) for x in reference_correct]),
        candidate_acc=cand_right / n if n else 0.0,
        candidate_ci=wilson_interval(cand_right, n, confidence),
        candidate_stderr=sample_stderr([float(x) for x in candidate_correct]),
        delta=(c - b) / n if n else 0.0,
        delta_ci=(low, high),
        right_to_wrong=b,
        wrong_to_right=c,
        mcnemar_p=mcnemar_exact_p(b, c),
        agreement=agree / n if n else 0.0,
    )


def distribution_drift(
    reference_logliks: Sequence[Sequence[float]], candidate_logliks: Sequence[Sequence[float]]
) -> tuple[float, float]:
    """(mean KL(ref || cand) over questions, max |delta loglik| over every choice of every question)."""
    if len(reference_logliks) != len(candidate_logliks):
        raise ValueError("paired vectors differ in length")
    if not reference_logliks:
        return (0.0, 0.0)
    kls = [choice_kl(r, c) for r, c in zip(reference_logliks, candidate_logliks)]
    max_abs = max(
        float(np.max(np.abs(np.asarray(c, dtype=np.float64) - np.asarray(r, dtype=np.float64))))
        for r, c in zip(reference_logliks, candidate_logliks)
    )
    return (float(np.mean(kls)), max_abs)
