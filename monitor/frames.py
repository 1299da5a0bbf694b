"""Turn per-signal series into per-entity arrays on one time grid."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from monitor.config import DetectorConfig
from monitor.source import PrometheusSource, Series

logger = logging.getLogger(__name__)

EntityKey = tuple[str, ...]


@dataclass
class Frame:
    """Values of one detector on the grid `start + k * step`.

    `values` has shape [entity, time, signal]; a cell that Prometheus did not return, or returned
    as NaN or ±Inf, is NaN, never zero.
    """

    start: float
    step: float
    entities: list[EntityKey]
    values: np.ndarray
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def timestamps(self) -> np.ndarray:
        return self.start + self.step * np.arange(self.values.shape[1])

    @property
    def end(self) -> float:
        return self.start + self.step * (self.values.shape[1] - 1)

    def covered_steps(self) -> np.ndarray:
        """Return a mask [time] of the steps at which any entity has any value."""
        if self.values.shape[0] == 0:
            return np.zeros(self.values.shape[1], dtype=bool)
        return ~np.all(np.isnan(self.values), axis=(0, 2))

    def entity_index(self) -> dict[EntityKey, int]:
        return {key: i for i, key in enumerate(self.entities)}

    def select(self, include) -> Frame:
        """Return a frame with only the entities for which `include(entity)` is true, in their order."""
        rows = [i for i, entity in enumerate(self.entities) if include(entity)]
        return Frame(self.start, self.step, [self.entities[i] for i in rows], self.values[rows], self.dropped)


def grid_floor(moment: float, step: float) -> float:
    """Return the last grid point at or before `moment`; grid points are multiples of `step`."""
    return np.floor(moment / step + 1e-9) * step


def _grid_positions(timestamps: np.ndarray, start: float, step: float, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Return each sample's grid index and whether it lies on a grid point (to a millisecond's rounding)."""
    position = (timestamps - start) / step
    index = np.rint(position).astype(np.int64)
    on_grid = (index >= 0) & (index < length) & (np.abs(position - index) * step < 1e-3 + 1e-6 * step)
    return index, on_grid


def align(series: Series, start: float, step: float, length: int) -> np.ndarray:
    """Place samples onto the grid; missing steps and non-finite values become NaN."""
    out = np.full(length, np.nan)
    index, on_grid = _grid_positions(series.timestamps, start, step, length)
    values = series.values[on_grid]
    out[index[on_grid]] = np.where(np.isfinite(values), values, np.nan)
    return out


def entity_key(labels: dict[str, str], entity_labels: list[str]) -> EntityKey | None:
    try:
        return tuple(labels[name] for name in entity_labels)
    except KeyError:
        return None


def build_frame(
    per_signal: dict[str, list[Series]],
    detector: DetectorConfig,
    start: float,
    length: int,
    keep: set[EntityKey] | None = None,
) -> Frame:
    """Merge the series of every signal into one frame; entities outside `keep` are left out."""
    signals = list(detector.signals)
    dropped: dict[str, int] = {}
    accepted = [_accept_series(per_signal.get(name, []), detector, keep, dropped) for name in signals]
    _log_dropped(detector, dropped)

    entities = sorted({key for column in accepted for key in column})
    row_of = {key: row for row, key in enumerate(entities)}
    values = np.full((len(entities), length, len(signals)), np.nan)
    for column, chosen in enumerate(accepted):
        _scatter(values, column, chosen, row_of, start, detector.step)
    return Frame(start, detector.step, entities, values, dropped)


def _accept_series(series_list: list[Series], detector: DetectorConfig, keep: set[EntityKey] | None,
                   dropped: dict[str, int]) -> dict[EntityKey, Series]:
    """Return one series per entity for a signal, counting those without the labels or repeated."""
    chosen: dict[EntityKey, Series] = {}
    for series in series_list:
        key = entity_key(series.labels, detector.entity_labels)
        if key is None:
            dropped["missing_labels"] = dropped.get("missing_labels", 0) + 1
        elif keep is not None and key not in keep:
            continue
        elif key in chosen:
            dropped["duplicate_series"] = dropped.get("duplicate_series", 0) + 1
        else:
            chosen[key] = series
    return chosen


def _scatter(values: np.ndarray, column: int, chosen: dict[EntityKey, Series], row_of: dict[EntityKey, int],
             start: float, step: float) -> None:
    """Place every chosen series of one signal onto the grid in one vectorised pass, as `align` does."""
    if not chosen:
        return
    parts = list(chosen.items())
    lengths = np.array([series.timestamps.size for _, series in parts])
    rows = np.repeat(np.array([row_of[key] for key, _ in parts]), lengths)
    timestamps = np.concatenate([series.timestamps for _, series in parts])
    samples = np.concatenate([series.values for _, series in parts])

    index, on_grid = _grid_positions(timestamps, start, step, values.shape[1])
    samples = samples[on_grid]
    values[rows[on_grid], index[on_grid], column] = np.where(np.isfinite(samples), samples, np.nan)


def _log_dropped(detector: DetectorConfig, dropped: dict[str, int]) -> None:
    if dropped.get("missing_labels"):
        logger.warning(
            "detector %s: %d series lack the entity labels %s and were ignored; "
            "keep those labels in every signal's query (sum by (%s) (...))",
            detector.name, dropped["missing_labels"], detector.entity_labels, ", ".join(detector.entity_labels))
    if dropped.get("duplicate_series"):
        logger.warning(
            "detector %s: %d extra series for an entity and signal were ignored; "
            "aggregate each signal to one series per entity with sum by (%s) (...)",
            detector.name, dropped["duplicate_series"], ", ".join(detector.entity_labels))


def fetch_frame(
    source: PrometheusSource,
    detector: DetectorConfig,
    start: float,
    end: float,
    keep: set[EntityKey] | None = None,
    series_hint: int = 1,
) -> Frame:
    """Read every signal of a detector over the grid points in [start, end]."""
    start = grid_floor(start, detector.step)
    end = grid_floor(end, detector.step)
    length = int(round((end - start) / detector.step)) + 1
    per_signal = {
        name: source.query_range(query, start, end, detector.step, series_hint=series_hint)
        for name, query in detector.signals.items()
    }
    return build_frame(per_signal, detector, start, length, keep)


def fill_short_gaps(values: np.ndarray, max_steps: int) -> np.ndarray:
    """Carry the last observation forward over gaps of at most `max_steps` missing steps.

    Works along axis -2 (time) of an array [..., time, signal]. Longer gaps, and gaps before the
    first observation, stay NaN. A gap still open at the end counts the steps missing so far.
    """
    if max_steps <= 0 or values.size == 0:
        return values
    length = values.shape[-2]
    observed = ~np.isnan(values)
    steps = np.arange(length).reshape((length, 1))

    last_seen = np.where(observed, steps, -1)
    last_seen = np.maximum.accumulate(last_seen, axis=-2)
    next_seen = np.where(observed, steps, length)
    next_seen = np.flip(np.minimum.accumulate(np.flip(next_seen, axis=-2), axis=-2), axis=-2)

    gap_length = next_seen - last_seen - 1
    fill = ~observed & (last_seen >= 0) & (gap_length <= max_steps)
    source = np.take_along_axis(values, np.clip(last_seen, 0, None), axis=-2)
    return np.where(fill, source, values)
