"""A trained detector model: network, scalers, error statistics and threshold, used together."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from monitor.config import DetectorConfig
from monitor.frames import EntityKey, fill_short_gaps
from monitor.model import LSTMAutoencoder, reconstruct
from monitor.scaling import Scaler
from monitor.scoring import ErrorStatistics, Threshold, mahalanobis_terms, window_scores

CALENDAR_FEATURES = 4


def config_fingerprint(detector: DetectorConfig) -> str:
    """Hash the settings a saved model depends on; a model trained under others is not loaded."""
    relevant = {
        "entity_labels": detector.entity_labels,
        # A list keeps the signal order, which fixes the network's input columns. json.dumps
        # sorts a dict, so a reordered config would load a model with shuffled inputs.
        "signals": list(detector.signals.items()),
        "step": detector.step,
        "window": detector.window,
        "model": detector.model.model_dump(),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def calendar_features(timestamps: np.ndarray) -> np.ndarray:
    """Time of day and day of week as sine and cosine, [time, 4], from Unix seconds (UTC)."""
    day = 2 * np.pi * (timestamps % 86400) / 86400
    # 1970-01-01 was a Thursday; the phase offset does not matter to the network.
    week = 2 * np.pi * (timestamps % 604800) / 604800
    return np.stack([np.sin(day), np.cos(day), np.sin(week), np.cos(week)], axis=-1)


@dataclass
class WindowScores:
    """Scores of the windows that ended at one step, for the entities in `entities`."""

    entities: list[EntityKey]
    scores: np.ndarray  # [entity]
    tail_probabilities: np.ndarray  # [entity]
    contributions: np.ndarray  # [entity, signal]
    threshold: float


@dataclass
class ModelBundle:
    signals: list[str]
    fingerprint: str
    network: LSTMAutoencoder
    scalers: dict[EntityKey, Scaler]
    pooled_scaler: Scaler
    statistics: ErrorStatistics
    threshold: Threshold
    calendar: bool
    metadata: dict = field(default_factory=dict)

    def scaler_for(self, entity: EntityKey) -> Scaler:
        return self.scalers.get(entity, self.pooled_scaler)

    def scale(self, entities: list[EntityKey], values: np.ndarray) -> np.ndarray:
        """Scale raw windows [entity, time, signal] with each entity's scaler."""
        scaled = np.empty_like(values, dtype=np.float64)
        for row, entity in enumerate(entities):
            scaled[row] = self.scaler_for(entity).transform(values[row])
        return scaled

    def model_inputs(self, scaled: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
        """Append calendar features (when configured) to scaled windows [window, time, signal]."""
        if not self.calendar:
            return scaled
        calendar = calendar_features(timestamps)
        if calendar.ndim == 2:
            calendar = np.broadcast_to(calendar, scaled.shape[:-1] + (CALENDAR_FEATURES,))
        return np.concatenate([scaled, calendar], axis=-1)

    def step_errors(self, scaled: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
        """Reconstruction errors x - x̂ per step [window, time, signal], float64; NaN where x is missing."""
        reconstruction = reconstruct(self.network, self.model_inputs(scaled, timestamps))
        return scaled - reconstruction

    def score_windows(self, entities: list[EntityKey], values: np.ndarray, timestamps: np.ndarray,
                      aggregate_steps: int, fill_gaps: int) -> WindowScores:
        """Score raw windows [entity, time, signal]; `timestamps` is [time], or [entity, time] per window."""
        filled = fill_short_gaps(values, fill_gaps)
        errors = self.step_errors(self.scale(entities, filled), timestamps)
        terms = mahalanobis_terms(errors[:, -aggregate_steps:, :], self.statistics)
        scores, contributions = window_scores(terms)
        return WindowScores(
            entities=entities,
            scores=scores,
            tail_probabilities=self.threshold.tail_probability(scores),
            contributions=contributions,
            threshold=self.threshold.value,
        )
