"""The product and the baselines it is compared with, behind one fit-and-score interface.

Every method fits on a training frame laid out as the service's Trainer sees it: the steps
before the held-out part fit the model, and the held-out part (the last
`train.holdout_fraction` of the frame) calibrates the threshold. Every method scores the
window that ends at each step, and every baseline averages its step scores over the last
`score.aggregate_steps` steps as the product does, so that only the model differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import NearestNeighbors

from monitor.bundle import ModelBundle, config_fingerprint
from monitor.config import DetectorConfig
from monitor.frames import Frame, fill_short_gaps
from monitor.model import LSTMAutoencoder
from monitor.replay import score_range
from monitor.scoring import (ErrorStatistics, Threshold, block_count, block_statistics, fit_error_statistics, fit_threshold,
                             mahalanobis_terms, time_blocks)
from monitor.training import Trainer, TrainingError, _initialise, fit_scalers

logger = logging.getLogger(__name__)

# Points used to fit 1-NN and Isolation Forest; more only slows them without changing the ranking much.
MAX_FIT_POINTS = 10000
# PCA keeps the components that explain this share of the variance of the scaled training points.
PCA_VARIANCE = 0.9
# Windows reconstructed per batch when the baselines read the product network's errors.
BATCH = 4096


class FitError(Exception):
    """A method could not be fitted on the given frame."""


@dataclass(frozen=True)
class SplitPoints:
    validation_start: int
    holdout_start: int


def split_points(steps: int, detector: DetectorConfig) -> SplitPoints:
    """Return the step indices where the Trainer's validation and held-out parts begin."""
    holdout_start = int(steps * (1 - detector.train.holdout_fraction))
    validation_start = int(holdout_start - steps * detector.train.validation_fraction)
    return SplitPoints(validation_start, holdout_start)


@dataclass
class Fitted:
    """A fitted method: it scores frames and holds its threshold and held-out reference scores."""

    method: str
    threshold: Threshold
    scorer: object  # callable Frame -> scores [entity, time]
    bundle: ModelBundle | None = None
    # Callable Frame -> (scores, driver), both [entity, time]. The driver is the index of the
    # signal with the largest contribution, or -1 where there is no score. Only the product has one.
    explainer: object | None = None

    def score_and_explain(self, frame: Frame) -> tuple[np.ndarray, np.ndarray | None]:
        if self.explainer is None:
            return self.scorer(frame), None
        return self.explainer(frame)


def rolling_mean(step_scores: np.ndarray, steps: int) -> np.ndarray:
    """Mean of the last `steps` step scores at each step [entity, time]; NaN until `steps` are seen."""
    out = np.full(step_scores.shape, np.nan)
    if step_scores.shape[1] < steps:
        return out
    windows = sliding_window_view(step_scores, steps, axis=1)
    out[:, steps - 1:] = windows.mean(axis=2)
    return out


def _threshold(detector: DetectorConfig, reference: np.ndarray, mahalanobis: bool) -> Threshold:
    # χ² holds only for Mahalanobis distances, so the other scores fall back to the quantile.
    method = detector.threshold.method
    if method == "chi2" and not mahalanobis:
        method = "quantile"
    return fit_threshold(method, detector.threshold.false_alarm_rate, reference,
                         len(detector.signals), detector.score.aggregate_steps)


def _holdout(scores: np.ndarray, frame: Frame, detector: DetectorConfig) -> np.ndarray:
    split = split_points(frame.values.shape[1], detector)
    # Only windows that lie wholly inside the held-out part calibrate, as in the Trainer.
    first = split.holdout_start + detector.window - 1
    part = scores[:, first:]
    return part[np.isfinite(part)]


# ---- point-wise baselines --------------------------------------------------------------------


class PointModel:
    """Scale each step with the product's scalers, then score the scaled vector."""

    name = "point"
    seeded = False
    mahalanobis = False

    def __init__(self, detector: DetectorConfig):
        self.detector = detector

    def fit(self, frame: Frame, seed: int, previous: Fitted | None) -> Fitted:
        split = split_points(frame.values.shape[1], self.detector)
        scalers, pooled = fit_scalers(frame, self.detector)
        scaler_for = lambda entity: scalers.get(entity, pooled)  # noqa: E731
        scaled = self._scaled(frame, scaler_for)
        points = scaled[:, :split.holdout_start, :].reshape(-1, scaled.shape[-1])
        points = points[~np.isnan(points).any(axis=1)]
        if points.shape[0] < 2 * len(self.detector.signals):
            raise FitError(f"{self.name}: only {points.shape[0]} complete training steps")
        rng = np.random.default_rng(seed)
        self._fit_points(points, scaled, split, rng)

        def scorer(target: Frame) -> np.ndarray:
            target_scaled = self._scaled(target, scaler_for)
            return rolling_mean(self._step_scores(target_scaled), self.detector.score.aggregate_steps)

        reference = self._reference(scorer, frame)
        return Fitted(self.name, _threshold(self.detector, reference, self.mahalanobis), scorer)

    def _reference(self, scorer, frame: Frame) -> np.ndarray:
        return _holdout(scorer(frame), frame, self.detector)

    def _scaled(self, frame: Frame, scaler_for) -> np.ndarray:
        filled = fill_short_gaps(frame.values, self.detector.score.fill_gaps)
        scaled = np.empty_like(filled)
        for row, entity in enumerate(frame.entities):
            scaled[row] = scaler_for(entity).transform(filled[row])
        return scaled

    def _step_scores(self, scaled: np.ndarray) -> np.ndarray:
        """Score [entity, time] from scaled steps [entity, time, signal]; NaN where too much is missing."""
        missing = np.isnan(scaled).mean(axis=2)
        flat = np.nan_to_num(scaled, nan=0.0).reshape(-1, scaled.shape[-1])
        scores = self._score_points(flat).reshape(scaled.shape[:2])
        scores[missing > self.detector.score.max_missing_fraction] = np.nan
        return scores

    def _fit_points(self, points, scaled, split, rng) -> None:
        pass

    def _score_points(self, points: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class RandomScore(PointModel):
    """Uniform noise: the floor every method must clear."""

    name = "random"
    seeded = True

    def _fit_points(self, points, scaled, split, rng) -> None:
        self.rng = rng

    def _step_scores(self, scaled: np.ndarray) -> np.ndarray:
        return self.rng.random(scaled.shape[:2])


class InputNorm(PointModel):
    """Squared L2 norm of the scaled input: distance from the training median."""

    name = "input_l2"

    def _score_points(self, points):
        return np.sum(points**2, axis=1)


class PcaError(PointModel):
    """Squared norm of the PCA reconstruction error."""

    name = "pca_error"

    def _fit_points(self, points, scaled, split, rng) -> None:
        # sklearn divides by the total variance, which is 0 for a series that never moves
        # (NAB's art_flatline), and warns on every refit. The fit itself is still usable.
        with np.errstate(invalid="ignore", divide="ignore"):
            self.pca = PCA(n_components=PCA_VARIANCE, svd_solver="full").fit(points)

    def _residuals(self, points):
        return points - self.pca.inverse_transform(self.pca.transform(points))

    def _score_points(self, points):
        return np.sum(self._residuals(points) ** 2, axis=1)


class PcaMahalanobis(PcaError):
    """PCA residuals scored with the product's Mahalanobis statistics and threshold methods."""

    name = "pca_mahalanobis"
    mahalanobis = True

    def _fit_points(self, points, scaled, split, rng) -> None:
        super()._fit_points(points, scaled, split, rng)
        held_out = scaled[:, split.holdout_start:, :].reshape(-1, scaled.shape[-1])
        held_out = held_out[~np.isnan(held_out).any(axis=1)]
        if held_out.shape[0] < 2:
            raise FitError("pca_mahalanobis: no complete held-out steps for the error statistics")
        self.statistics = fit_error_statistics(self._residuals(held_out))
        self.blocks = self._block_statistics(scaled, split)

    def _block_statistics(self, scaled, split) -> list[tuple[int, int, ErrorStatistics]]:
        """Spans of the held-out part in time, each with the statistics its reference is scored against."""
        steps = np.arange(split.holdout_start, scaled.shape[1])
        labels = time_blocks(steps, block_count(steps.size))
        spans, errors = [], []
        for label in np.unique(labels):
            inside = steps[labels == label]
            points = scaled[:, inside[0]:inside[-1] + 1, :].reshape(-1, scaled.shape[-1])
            points = points[~np.isnan(points).any(axis=1)]
            spans.append((int(inside[0]), int(inside[-1]) + 1))
            errors.append(self._residuals(points) if points.shape[0] else points)
        statistics = block_statistics(errors, self.statistics)
        return [(first, stop, self.statistics if own is None else own) for (first, stop), own in zip(spans, statistics)]

    def _reference(self, scorer, frame: Frame) -> np.ndarray:
        """Score each held-out span against the other spans' statistics, as the product's Trainer does."""
        whole = self.statistics
        parts = []
        try:
            for first, stop, statistics in self.blocks:
                self.statistics = statistics
                part = scorer(frame)[:, first + self.detector.score.aggregate_steps - 1:stop]
                parts.append(part[np.isfinite(part)])
        finally:
            self.statistics = whole
        return np.concatenate(parts)

    def _score_points(self, points):
        return mahalanobis_terms(self._residuals(points), self.statistics).sum(axis=1)


class NearestNeighbour(PointModel):
    """Distance to the nearest training step."""

    name = "knn1"
    seeded = True

    def _fit_points(self, points, scaled, split, rng) -> None:
        if points.shape[0] > MAX_FIT_POINTS:
            points = points[rng.choice(points.shape[0], MAX_FIT_POINTS, replace=False)]
        self.index = NearestNeighbors(n_neighbors=1).fit(points)

    def _score_points(self, points):
        distances, _ = self.index.kneighbors(points)
        return distances[:, 0]


class IsolationForestScore(PointModel):
    name = "iforest"
    seeded = True

    def _fit_points(self, points, scaled, split, rng) -> None:
        self.forest = IsolationForest(n_estimators=100, max_samples=min(256, points.shape[0]),
                                      random_state=int(rng.integers(2**31 - 1))).fit(points)

    def _score_points(self, points):
        return -self.forest.score_samples(points)


# ---- the product and scores read from its network ---------------------------------------------


def with_seed(detector: DetectorConfig, seed: int) -> DetectorConfig:
    return detector.model_copy(update={"train": detector.train.model_copy(update={"seed": seed})})


class Product:
    """The service's own Trainer, Mahalanobis scoring and threshold, through score_range."""

    name = "product"
    seeded = True
    mahalanobis = True

    def __init__(self, detector: DetectorConfig):
        self.detector = detector

    def fit(self, frame: Frame, seed: int, previous: Fitted | None) -> Fitted:
        detector = with_seed(self.detector, seed)
        current = previous.bundle if previous is not None else None
        try:
            outcome = Trainer(detector).train(frame, current)
        except TrainingError as error:
            if previous is not None:
                logger.info("product: training failed, the serving model stays: %s", error)
                return previous
            raise FitError(f"product: {error}") from None
        if not outcome.accepted:
            if previous is not None:
                logger.info("product: new model rejected, the serving model stays: %s", outcome.reason)
                return previous
            raise FitError(f"product: first model rejected: {outcome.reason}")
        bundle = outcome.bundle

        def explainer(target: Frame) -> tuple[np.ndarray, np.ndarray]:
            scored = score_range(bundle, detector, target)
            finite = np.isfinite(scored.scores)
            driver = np.where(finite, np.argmax(np.nan_to_num(scored.contributions, nan=-1.0), axis=2), -1)
            return scored.scores, driver

        return Fitted(self.name, bundle.threshold, lambda target: explainer(target)[0], bundle, explainer)


def window_errors(bundle: ModelBundle, detector: DetectorConfig, frame: Frame):
    """Yield (row, end steps, errors [window, aggregate step, signal]) for every complete window.

    This mirrors score_range: the same gap filling, completeness rule and scaling, so the
    errors are the ones the product's own score is computed from.
    """
    window = detector.window
    keep = detector.score.aggregate_steps
    if frame.values.shape[1] < window:
        return
    times = sliding_window_view(frame.timestamps, window)
    for row, entity in enumerate(frame.entities):
        windows = sliding_window_view(frame.values[row], window, axis=0).transpose(0, 2, 1)
        for first in range(0, windows.shape[0], BATCH):
            part = fill_short_gaps(np.ascontiguousarray(windows[first:first + BATCH]), detector.score.fill_gaps)
            complete = np.isnan(part).mean(axis=(1, 2)) <= detector.score.max_missing_fraction
            if not complete.any():
                continue
            scaled = bundle.scale([entity] * int(complete.sum()), part[complete])
            errors = bundle.step_errors(scaled, times[first:first + BATCH][complete])
            yield row, first + window - 1 + np.flatnonzero(complete), errors[:, -keep:, :]


class ErrorScore:
    """A score computed from a network's reconstruction errors without the full covariance."""

    name = "error"
    seeded = True
    mahalanobis = False

    def __init__(self, detector: DetectorConfig):
        self.detector = detector

    def fit_from(self, bundle: ModelBundle, frame: Frame) -> Fitted:
        detector = self.detector
        split = split_points(frame.values.shape[1], detector)
        held_out = Frame(frame.start + split.holdout_start * frame.step, frame.step, frame.entities,
                         frame.values[:, split.holdout_start:])
        chunks = [errors for _, _, errors in window_errors(bundle, detector, held_out)]
        if not chunks:
            raise FitError(f"{self.name}: no complete held-out windows")
        collected = np.concatenate(chunks)
        flat = collected.reshape(-1, collected.shape[-1])
        self.mean = np.nanmean(flat, axis=0)
        self.variance = np.maximum(np.nanvar(flat, axis=0), 1e-12)

        def scorer(target: Frame) -> np.ndarray:
            scores = np.full(target.values.shape[:2], np.nan)
            for row, ends, errors in window_errors(bundle, detector, target):
                scores[row, ends] = self._reduce(errors)
            return scores

        reference = self._reduce(collected)
        return Fitted(self.name, _threshold(detector, reference, False), scorer, bundle)

    def _reduce(self, errors: np.ndarray) -> np.ndarray:
        """Window score from errors [window, step, signal]: mean over the steps of the squared norm."""
        return np.nanmean(np.nansum(errors**2, axis=2), axis=1)


class DiagonalGaussian(ErrorScore):
    """Per-signal standardised squared errors: Mahalanobis with the covariance's diagonal only."""

    name = "product_diag_gauss"

    def _reduce(self, errors):
        standard = (errors - self.mean) ** 2 / self.variance
        return np.nanmean(np.nansum(standard, axis=2), axis=1)


class ProductErrorNorm(ErrorScore):
    name = "product_error_norm"


class UntrainedNetwork(ErrorScore):
    """The product's network with its random initial weights: a reference for what training adds."""

    name = "lstm_untrained"

    def fit(self, frame: Frame, seed: int, previous: Fitted | None) -> Fitted:
        detector = self.detector
        scalers, pooled = fit_scalers(frame, detector)
        signals = len(detector.signals)
        network = LSTMAutoencoder(signals, signals, detector.model.hidden_size, detector.model.latent_size,
                                  detector.model.layers)
        _initialise(network, seed)
        bundle = ModelBundle(list(detector.signals), config_fingerprint(detector), network, scalers, pooled,
                             None, None, False, {})
        return self.fit_from(bundle, frame)


# Methods scored from the product's trained network; they are refitted whenever it is.
DERIVED = {"product_error_norm": ProductErrorNorm, "product_diag_gauss": DiagonalGaussian}
INDEPENDENT = {"random": RandomScore, "input_l2": InputNorm, "pca_error": PcaError,
               "pca_mahalanobis": PcaMahalanobis, "knn1": NearestNeighbour, "iforest": IsolationForestScore,
               "lstm_untrained": UntrainedNetwork, "product": Product}


def is_seeded(name: str) -> bool:
    if name in DERIVED:
        return True
    return bool(INDEPENDENT[name].seeded)

