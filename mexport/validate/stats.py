"""Paired statistics for MCQ parity: one backend against the reference on the same questions.

Conventions (documented in the report too):

- Accuracy CI: Wilson score interval (stays inside [0, 1] and keeps its coverage on small sets, unlike the normal
  interval); the lm-eval stderr (sample std / sqrt(n)) is kept beside it for comparison with published tables.
- Delta-accuracy CI: paired Wald interval on the per-question differences d_i = correct_cand - correct_ref,
  mean ± z·sd/sqrt(n) with the sample sd (ddof=1). Pairing removes the between-question variance, so it is far
  tighter than comparing two independent accuracies. It collapses to [0, 0] when no question flips: read that as
  "no difference on these questions", not as a population guarantee (see :func:`single_flip_half_width`).
- McNemar: exact two-sided binomial test of b (right->wrong) against b + c at 0.5; p = 1 when nothing flips.
- Choice distributions: softmax over the choices' log-likelihoods; KL(ref || cand), averaged over questions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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


def paired_difference_interval(
    candidate_correct: Sequence[int], reference_correct: Sequence[int], confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """Mean of d_i = cand_i - ref_i and its paired Wald interval; the whole [-1, 1] below two questions."""
    if len(candidate_correct) != len(reference_correct):
        raise ValueError("paired vectors differ in length")
    d = np.asarray(candidate_correct, dtype=np.float64) - np.asarray(reference_correct, dtype=np.float64)
    if d.size == 0:
        return (0.0, -1.0, 1.0)
    mean = float(d.mean())
    if d.size < 2:
        return (mean, -1.0, 1.0)
    half = z_value(confidence) * sample_stderr(d.tolist())
    return (mean, max(-1.0, mean - half), min(1.0, mean + half))


def single_flip_half_width(n: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of the paired CI when exactly one of ``n`` questions flips (z/n).

    The resolution of a question set: when this exceeds the margin, the verdict can only pass with zero flips.
    """
    return z_value(confidence) / n if n > 0 else 1.0


def mcnemar_exact_p(right_to_wrong: int, wrong_to_right: int) -> float:
    """Exact McNemar p-value (two-sided binomial test of b vs b+c at 0.5); 1.0 with no discordant pairs."""
    discordant = right_to_wrong + wrong_to_right
    if discordant == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(right_to_wrong, discordant, 0.5, alternative="two-sided").pvalue)


def log_softmax(logliks: Sequence[float]) -> np.ndarray:
    values = np.asarray(logliks, dtype=np.float64)
    shifted = values - values.max()
    return shifted - math.log(float(np.exp(shifted).sum()))


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
    delta, low, high = paired_difference_interval(candidate_correct, reference_correct, confidence)
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
        delta=delta,
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
