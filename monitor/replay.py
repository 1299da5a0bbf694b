"""Score every window of a stored range, as the service would have scored it step by step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from monitor.bundle import ModelBundle
from monitor.config import DetectorConfig
from monitor.frames import Frame, fill_short_gaps


@dataclass
class RangeScores:
    """Scores of the window ending at each step; NaN where no full window ends there or it had gaps."""

    timestamps: np.ndarray  # [time]
    scores: np.ndarray  # [entity, time]
    tail_probabilities: np.ndarray  # [entity, time]
    contributions: np.ndarray  # [entity, time, signal]
    threshold: float


def score_range(bundle: ModelBundle, detector: DetectorConfig, frame: Frame, batch: int = 4096) -> RangeScores:
    entities, steps, signals = frame.values.shape
    window = detector.window
    scores = np.full((entities, steps), np.nan)
    tails = np.full((entities, steps), np.nan)
    contributions = np.full((entities, steps, signals), np.nan)
    if steps >= window:
        for row, entity in enumerate(frame.entities):
            _score_entity(bundle, detector, frame, row, entity, batch, scores, tails, contributions)
    return RangeScores(frame.timestamps, scores, tails, contributions, bundle.threshold.value)


def _score_entity(bundle, detector, frame, row, entity, batch, scores, tails, contributions) -> None:
    window = detector.window
    values = frame.values[row]
    # [start, signal, time] -> [start, time, signal]
    windows = sliding_window_view(values, window, axis=0).transpose(0, 2, 1)
    times = sliding_window_view(frame.timestamps, window)
    for first in range(0, windows.shape[0], batch):
        part = np.ascontiguousarray(windows[first:first + batch])
        filled = fill_short_gaps(part, detector.score.fill_gaps)
        complete = np.isnan(filled).mean(axis=(1, 2)) <= detector.score.max_missing_fraction
        if not complete.any():
            continue
        ends = first + window - 1 + np.flatnonzero(complete)
        scored = bundle.score_windows([entity] * int(complete.sum()), part[complete],
                                      times[first:first + batch][complete],
                                      detector.score.aggregate_steps, detector.score.fill_gaps)
        scores[row, ends] = scored.scores
        tails[row, ends] = scored.tail_probabilities
        contributions[row, ends] = scored.contributions
