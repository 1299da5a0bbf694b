"""Per-entity robust scaling: centre on the median, divide by a floored IQR-based scale."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# IQR / 1.349 estimates the standard deviation of a normal distribution.
_IQR_TO_SIGMA = 1.349
# Floors keep a constant signal finite: relative to its level, and absolute for a signal at zero.
RELATIVE_SCALE_FLOOR = 1e-3
ABSOLUTE_SCALE_FLOOR = 1e-6


@dataclass(frozen=True)
class Scaler:
    center: np.ndarray  # [signal]
    scale: np.ndarray  # [signal], always > 0

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - self.center) / self.scale


def fit_scaler(values: np.ndarray) -> Scaler:
    """Fit on an array [..., signal] that may hold NaN; an all-NaN signal gets centre 0, scale 1."""
    flat = values.reshape(-1, values.shape[-1])
    observed = ~np.isnan(flat)
    signals = flat.shape[1]
    center = np.zeros(signals)
    scale = np.ones(signals)
    for column in range(signals):
        data = flat[observed[:, column], column]
        if data.size == 0:
            continue
        center[column], scale[column] = _center_and_scale(data)
    return Scaler(center, scale)


def _center_and_scale(data: np.ndarray) -> tuple[float, float]:
    low, median, high = np.percentile(data, [25, 50, 75])
    spread = (high - low) / _IQR_TO_SIGMA
    if spread <= 0:
        # A signal that is constant most of the time (an error rate at zero) still varies now and
        # then. Its standard deviation keeps those blips from looking infinitely rare.
        spread = float(np.std(data))
    floor = max(RELATIVE_SCALE_FLOOR * abs(median), ABSOLUTE_SCALE_FLOOR)
    return float(median), max(float(spread), floor)


def observed_steps(values: np.ndarray) -> int:
    """Count the steps of an entity's array [time, signal] at which every signal was observed."""
    return int(np.all(~np.isnan(values), axis=-1).sum())
