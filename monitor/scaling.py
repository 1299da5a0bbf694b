"""Per-entity robust scaling: centre on the median, divide by a floored, IQR-based spread."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# IQR / 1.349 estimates the standard deviation of a normal distribution.
_IQR_TO_SIGMA = 1.349
# The spread is at least this share of the standard deviation. See _center_and_scale.
STD_SHARE_FLOOR = 0.3
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
    # A signal that sits still most of the time and moves in bursts (an error rate at zero, a
    # disk written now and then) has an IQR near 0. An ordinary burst would then be thousands
    # of units and outweigh every other signal, in scores and thresholds alike. A share of the
    # standard deviation measures it by the size of its bursts instead. For a bell-shaped
    # signal, the IQR-based spread is the larger and wins.
    spread = max((high - low) / _IQR_TO_SIGMA, STD_SHARE_FLOOR * float(np.std(data)))
    return float(median), max(float(spread), float(scale_floor(median)))


def scale_floor(center):
    """Return the smallest scale a signal at `center` gets (a float or an array, as given)."""
    return np.maximum(RELATIVE_SCALE_FLOOR * np.abs(center), ABSOLUTE_SCALE_FLOOR)


def floored_signals(scaler: Scaler) -> np.ndarray:
    """Return a mask of the signals whose scale is the floor, which means they did not move."""
    return scaler.scale <= scale_floor(scaler.center)


def observed_steps(values: np.ndarray) -> int:
    """Count the steps of an entity's array [time, signal] at which every signal was observed."""
    return int(np.all(~np.isnan(values), axis=-1).sum())
