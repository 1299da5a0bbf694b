"""Mahalanobis scoring of reconstruction errors, thresholds and per-signal contributions.

Everything here is float64 numpy/scipy. Shapes: errors are [..., signal]; a window's scored
steps are [entity, step, signal].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats
from sklearn.covariance import ledoit_wolf

logger = logging.getLogger(__name__)

# Eigenvalues of Σ below this share of the largest are raised to it, which bounds the
# condition number by its inverse and keeps constant or collinear signals invertible.
EIGENVALUE_FLOOR = 1e-6
ABSOLUTE_EIGENVALUE_FLOOR = 1e-12
# The held-out part is cut into this many spans in time for the cross-fitted reference scores.
# More spans put more of the drift between periods into the reference, but fit each span's
# statistics on fewer windows. docs/configuration.md has the measurements.
CALIBRATION_BLOCKS = 4
# Each span needs this many held-out windows, because with fewer the other spans' Σ measures
# sampling noise rather than drift. A shorter held-out part, such as a few minutes of history,
# is cut into fewer spans, and with one span the reference is scored in sample.
MIN_WINDOWS_PER_BLOCK = 64


@dataclass(frozen=True)
class ErrorStatistics:
    mean: np.ndarray  # [signal]
    covariance: np.ndarray  # [signal, signal], after shrinkage and the eigenvalue floor
    precision: np.ndarray  # inverse of covariance
    condition_number: float
    shrinkage: float


def fit_error_statistics(errors: np.ndarray) -> ErrorStatistics:
    """Fit μ and Σ of error vectors [sample, signal] with Ledoit-Wolf shrinkage and a floor."""
    errors = errors[np.all(np.isfinite(errors), axis=1)]
    if errors.shape[0] < 2:
        raise ValueError(f"need at least 2 finite error vectors to fit the covariance, found {errors.shape[0]}")
    mean = errors.mean(axis=0)
    covariance, shrinkage = ledoit_wolf(errors - mean, assume_centered=True)

    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    floor = max(EIGENVALUE_FLOOR * max(eigenvalues.max(), 0.0), ABSOLUTE_EIGENVALUE_FLOOR)
    eigenvalues = np.maximum(eigenvalues, floor)
    covariance = (eigenvectors * eigenvalues) @ eigenvectors.T
    precision = (eigenvectors / eigenvalues) @ eigenvectors.T
    return ErrorStatistics(mean, covariance, precision, float(eigenvalues.max() / eigenvalues.min()), float(shrinkage))


def mahalanobis_terms(errors: np.ndarray, statistics: ErrorStatistics) -> np.ndarray:
    """Split d² = (e - μ)ᵀ Σ⁻¹ (e - μ) into per-signal terms (e - μ)ᵢ (Σ⁻¹ (e - μ))ᵢ.

    The terms sum to d² over the last axis. A NaN error (a missing cell) is taken as μ, so it
    adds nothing.
    """
    centered = np.nan_to_num(errors - statistics.mean, nan=0.0)
    return centered * (centered @ statistics.precision)


def window_scores(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score windows from their last steps' terms [entity, step, signal].

    Returns the window score (mean d² over the steps) [entity] and the per-signal contribution
    [entity, signal]: the mean terms clipped at 0 and renormalised to sum to 1.
    """
    mean_terms = terms.mean(axis=1)
    scores = mean_terms.sum(axis=1)
    positive = np.clip(mean_terms, 0.0, None)
    totals = positive.sum(axis=1, keepdims=True)
    signals = terms.shape[-1]
    contributions = np.divide(positive, totals, out=np.full_like(positive, 1.0 / signals), where=totals > 0)
    return np.maximum(scores, 0.0), contributions


def block_count(windows: int) -> int:
    """Return how many spans a held-out part of `windows` windows is cut into (at least 1)."""
    return max(1, min(CALIBRATION_BLOCKS, windows // MIN_WINDOWS_PER_BLOCK))


def time_blocks(times: np.ndarray, count: int) -> np.ndarray:
    """Label each time with one of `count` spans of equal length between the first and the last."""
    first, last = float(np.min(times)), float(np.max(times))
    if last <= first:
        return np.zeros(np.shape(times), dtype=int)
    return np.minimum(((times - first) / (last - first) * count).astype(int), count - 1)


def block_statistics(errors: list[np.ndarray], whole: ErrorStatistics) -> list[ErrorStatistics | None]:
    """Return, per block of error vectors [sample, signal], the statistics to score it against.

    Each block gets the μ of the other blocks, and the mean of the other blocks' Σ and the whole
    part's Σ. The other blocks' Σ alone misses a direction that only this block moves in: on
    half-still SMD signals it was nearly singular and set thresholds of up to 10⁸. Averaged with
    the whole part's Σ, which includes this block, a reference distance is at most twice what
    the whole part's Σ gives. None marks a block that is empty or whose others hold fewer than 2
    vectors; it is scored against `whole`.
    """
    blended = []
    for index, own in enumerate(errors):
        others = [block for position, block in enumerate(errors) if position != index]
        pooled = np.concatenate(others) if others else np.empty((0, whole.mean.size))
        if own.shape[0] == 0 or pooled.shape[0] < 2:
            blended.append(None)
            continue
        blended.append(_blend(fit_error_statistics(pooled), whole))
    return blended


def _blend(other: ErrorStatistics, whole: ErrorStatistics) -> ErrorStatistics:
    covariance = (other.covariance + whole.covariance) / 2
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    precision = (eigenvectors / eigenvalues) @ eigenvectors.T
    return replace(whole, mean=other.mean, covariance=covariance, precision=precision,
                   condition_number=float(eigenvalues.max() / eigenvalues.min()))


def cross_fitted_scores(tail: np.ndarray, blocks: np.ndarray, statistics: ErrorStatistics) -> np.ndarray:
    """Score held-out windows [window, step, signal], each block in time against the others.

    `blocks` labels each window's block (see time_blocks). Errors drift over days, in level and
    in spread. A reference scored against statistics that had seen every window misses that
    drift, so a threshold set from it alarms more often than its target.
    """
    scores = window_scores(mahalanobis_terms(tail, statistics))[0]
    labels = np.unique(blocks)
    errors = [_finite_rows(tail[blocks == label].reshape(-1, tail.shape[-1])) for label in labels]
    for label, shifted in zip(labels, block_statistics(errors, statistics)):
        if shifted is None:
            continue
        scored = blocks == label
        scores[scored] = window_scores(mahalanobis_terms(tail[scored], shifted))[0]
    return scores


def _finite_rows(errors: np.ndarray) -> np.ndarray:
    return errors[np.all(np.isfinite(errors), axis=1)]


def rolling_window_scores(step_scores: np.ndarray, aggregate_steps: int) -> np.ndarray:
    """Mean of d² over each run of `aggregate_steps` consecutive steps, along the last axis."""
    kernel = np.ones(aggregate_steps) / aggregate_steps
    return np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="valid"), -1, step_scores)


@dataclass(frozen=True)
class Threshold:
    """A score threshold and the model of normal scores that gives tail probabilities."""

    method: str
    false_alarm_rate: float
    value: float
    reference: np.ndarray  # sorted held-out normal window scores
    signals: int
    aggregate_steps: int
    tail_start: float = float("nan")
    tail_share: float = float("nan")
    gpd_shape: float = float("nan")
    gpd_scale: float = float("nan")

    def tail_probability(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        if self.method == "chi2":
            dof = self.signals * self.aggregate_steps
            return stats.chi2.sf(scores * self.aggregate_steps, dof)
        empirical = _empirical_tail(self.reference, scores)
        if self.method == "quantile" or not np.isfinite(self.tail_start):
            return empirical
        beyond = scores > self.tail_start
        tail = self.tail_share * stats.genpareto.sf(scores - self.tail_start, self.gpd_shape, scale=self.gpd_scale)
        return np.where(beyond, tail, empirical)


def _empirical_tail(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    # (count at or above + 1) / (n + 1): never 0, so a score beyond every reference is rare, not impossible.
    above = reference.size - np.searchsorted(reference, scores, side="left")
    return (above + 1.0) / (reference.size + 1.0)


def fit_threshold(method: str, false_alarm_rate: float, reference: np.ndarray, signals: int, aggregate_steps: int) -> Threshold:
    """Set the threshold so that a normal window exceeds it with probability `false_alarm_rate`."""
    reference = np.sort(reference[np.isfinite(reference)])
    if reference.size == 0:
        raise ValueError("no finite held-out window scores to calibrate the threshold on")
    base = dict(method=method, false_alarm_rate=false_alarm_rate, reference=reference,
                signals=signals, aggregate_steps=aggregate_steps)

    if method == "chi2":
        # Exact only for independent Gaussian errors: the mean of k steps' d² is then χ²(k·p)/k.
        value = stats.chi2.isf(false_alarm_rate, signals * aggregate_steps) / aggregate_steps
        return Threshold(value=float(value), **base)
    if method == "quantile":
        return Threshold(value=_empirical_quantile(reference, false_alarm_rate), **base)
    if method == "evt":
        return _fit_evt(reference, base)
    raise ValueError(f"unknown threshold method {method!r}; use chi2, quantile or evt")


def _empirical_quantile(reference: np.ndarray, false_alarm_rate: float) -> float:
    if reference.size * false_alarm_rate < 1:
        logger.warning(
            "quantile threshold: %d held-out scores cannot resolve a false-alarm rate of %g, so the "
            "threshold is their maximum; use threshold.method evt or a longer train.range",
            reference.size, false_alarm_rate)
    return float(np.quantile(reference, 1.0 - false_alarm_rate, method="higher"))


def _fit_evt(reference: np.ndarray, base: dict) -> Threshold:
    """Peaks over threshold: a generalised Pareto tail above the empirical 90 % or 95 % quantile."""
    rate = base["false_alarm_rate"]
    tail_share = 0.05 if reference.size >= 400 else 0.1
    tail_start = float(np.quantile(reference, 1.0 - tail_share))
    excess = reference[reference > tail_start] - tail_start
    if excess.size < 10 or np.ptp(excess) <= 0:
        logger.warning("evt threshold: only %d scores above the tail start; using the empirical quantile", excess.size)
        return Threshold(value=_empirical_quantile(reference, rate), **{**base, "method": "quantile"})

    share = excess.size / reference.size
    shape, _, scale = stats.genpareto.fit(excess, floc=0.0)
    if rate >= share:
        value = _empirical_quantile(reference, rate)
    else:
        value = tail_start + float(stats.genpareto.isf(rate / share, shape, scale=scale))
    return Threshold(value=float(value), tail_start=tail_start, tail_share=share,
                     gpd_shape=float(shape), gpd_scale=float(scale), **base)
