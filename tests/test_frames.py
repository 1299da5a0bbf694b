"""Grid alignment, frame building and gap filling, and chunked range reads against a real Prometheus.

The Prometheus tests backfill known values with `promtool tsdb create-blocks-from openmetrics`
and start Prometheus (Debian package `prometheus`) on a free loopback port afterwards. The step
is 10 minutes, longer than Prometheus's 5 minute lookback, so a missing sample shows up as a
missing point instead of a repeat of the one before.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from dataclasses import dataclass

import numpy as np
import pytest

from monitor.config import DetectorConfig, PrometheusConfig
from monitor.frames import align, build_frame, fetch_frame, fill_short_gaps, grid_floor
from monitor.localstack import LocalStack, MissingBinary
from monitor.source import PrometheusSource, Series

STEP = 600.0
POINTS = 50


def detector(step: float = STEP) -> DetectorConfig:
    return DetectorConfig.model_validate({
        "name": "node",
        "entity_labels": ["instance"],
        "step": step,
        "window": 5,
        "signals": {"cpu": "cpu_test", "memory": "memory_test"},
        "train": {"range": "7d"},
        "score": {"every": step, "aggregate_steps": 2},
    })


def series(timestamps, values, **labels) -> Series:
    return Series(labels, np.asarray(timestamps, dtype=float), np.asarray(values, dtype=float))


# ---- align ---------------------------------------------------------------------------------------


def test_align_places_samples_on_grid():
    aligned = align(series([100.0, 110.0, 120.0], [1.0, 2.0, 3.0]), start=100.0, step=10.0, length=3)

    assert aligned.tolist() == [1.0, 2.0, 3.0]


def test_align_gap_is_missing():
    aligned = align(series([100.0, 130.0], [1.0, 4.0]), start=100.0, step=10.0, length=4)

    assert aligned[0] == 1.0
    assert np.isnan(aligned[1:3]).all()
    assert aligned[3] == 4.0


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
def test_align_non_finite_is_missing(special: float):
    aligned = align(series([100.0, 110.0, 120.0], [1.0, special, 3.0]), start=100.0, step=10.0, length=3)

    assert np.isnan(aligned[1])
    assert aligned[0] == 1.0
    assert aligned[2] == 3.0


def test_align_off_grid_is_missing():
    aligned = align(series([100.0, 114.0, 120.0], [1.0, 2.0, 3.0]), start=100.0, step=10.0, length=3)

    assert np.isnan(aligned[1])
    assert aligned[2] == 3.0


def test_align_tolerates_millisecond_rounding():
    aligned = align(series([100.0, 110.0004], [1.0, 2.0]), start=100.0, step=10.0, length=2)

    assert aligned.tolist() == [1.0, 2.0]


def test_align_ignores_samples_outside_grid():
    aligned = align(series([90.0, 100.0, 130.0], [9.0, 1.0, 4.0]), start=100.0, step=10.0, length=3)

    assert aligned[0] == 1.0
    assert np.isnan(aligned[1:]).all()


def test_align_empty_series():
    assert np.isnan(align(series([], []), start=0.0, step=1.0, length=4)).all()


def test_grid_floor():
    assert grid_floor(1_000_659.0, 60.0) == 1_000_620.0
    assert grid_floor(1_000_620.0, 60.0) == 1_000_620.0


# ---- build_frame -------------------------------------------------------------------------------


def test_build_frame_merges_signals_per_entity():
    per_signal = {
        "cpu": [series([0.0, 600.0], [1.0, 2.0], instance="b"), series([0.0], [5.0], instance="a")],
        "memory": [series([600.0], [7.0], instance="a")],
    }
    frame = build_frame(per_signal, detector(), start=0.0, length=2)

    assert frame.entities == [("a",), ("b",)]
    np.testing.assert_array_equal(frame.values[0], [[5.0, np.nan], [np.nan, 7.0]])
    np.testing.assert_array_equal(frame.values[1], [[1.0, np.nan], [2.0, np.nan]])


def test_build_frame_counts_series_without_entity_labels():
    per_signal = {"cpu": [series([0.0], [1.0], instance="a"), series([0.0], [2.0], job="x")]}
    frame = build_frame(per_signal, detector(), start=0.0, length=1)

    assert frame.entities == [("a",)]
    assert frame.dropped == {"missing_labels": 1}


def test_build_frame_counts_duplicate_series():
    per_signal = {"cpu": [series([0.0], [1.0], instance="a", pod="p1"), series([0.0], [2.0], instance="a", pod="p2")]}
    frame = build_frame(per_signal, detector(), start=0.0, length=1)

    assert frame.values[0, 0, 0] == 1.0
    assert frame.dropped == {"duplicate_series": 1}


def test_build_frame_keeps_only_selected_entities():
    per_signal = {"cpu": [series([0.0], [1.0], instance="a"), series([0.0], [2.0], instance="b")]}
    frame = build_frame(per_signal, detector(), start=0.0, length=1, keep={("b",)})

    assert frame.entities == [("b",)]


# ---- fill_short_gaps ---------------------------------------------------------------------------


def column(*values: float) -> np.ndarray:
    return np.array(values, dtype=float)[:, None]


def test_short_gap_filled_with_last_value():
    filled = fill_short_gaps(column(1, np.nan, np.nan, 4), max_steps=2)

    assert filled[:, 0].tolist() == [1.0, 1.0, 1.0, 4.0]


def test_long_gap_kept():
    filled = fill_short_gaps(column(1, np.nan, np.nan, np.nan, 5), max_steps=2)

    assert np.isnan(filled[1:4, 0]).all()


def test_leading_gap_kept():
    filled = fill_short_gaps(column(np.nan, 2, 3), max_steps=2)

    assert np.isnan(filled[0, 0])


def test_trailing_gap_counts_steps_so_far():
    short = fill_short_gaps(column(1, 2, np.nan), max_steps=1)
    long = fill_short_gaps(column(1, 2, np.nan, np.nan), max_steps=1)

    assert short[2, 0] == 2.0
    assert np.isnan(long[2:, 0]).all()


def test_gaps_filled_per_signal_and_entity():
    values = np.array([
        [[1.0, 10.0], [np.nan, 20.0], [3.0, np.nan]],
        [[np.nan, 5.0], [6.0, np.nan], [7.0, np.nan]],
    ])
    filled = fill_short_gaps(values, max_steps=1)

    np.testing.assert_array_equal(filled[0], [[1.0, 10.0], [1.0, 20.0], [3.0, 20.0]])
    np.testing.assert_array_equal(filled[1], [[np.nan, 5.0], [6.0, np.nan], [7.0, np.nan]])


def test_zero_max_steps_fills_nothing():
    values = column(1, np.nan, 3)

    assert np.isnan(fill_short_gaps(values, max_steps=0)[1, 0])


def test_fill_does_not_modify_input():
    values = column(1, np.nan, 3)
    fill_short_gaps(values, max_steps=1)

    assert np.isnan(values[1, 0])


# ---- against a real Prometheus -----------------------------------------------------------------


@dataclass
class Backfilled:
    url: str
    start: float  # first grid point


METRICS = {"cpu": "cpu_test", "memory": "memory_test"}
# Absent samples (None) and special values, by (metric, instance) and step.
SPECIAL_STEPS = {
    ("cpu_test", "node-a"): {10: None, 11: None, 20: "NaN", 21: "+Inf"},
    ("cpu_test", "node-b"): {22: "-Inf", 30: None, 31: None, 32: None, 33: None, 34: None},
    ("memory_test", "node-a"): {0: None},
}


def sample_text(metric: str, instance: str, step: int) -> str | None:
    """Return the value written for a step as OpenMetrics text, or None where no sample exists."""
    special = SPECIAL_STEPS.get((metric, instance), {})
    if step in special:
        return special[step]
    offset = {"node-a": 0.0, "node-b": 100.0}[instance]
    base = 1000.0 if metric == "memory_test" else 0.0
    return repr(base + offset + step + 0.25)


def openmetrics_text(start: float) -> str:
    lines = []
    for metric in METRICS.values():
        lines.append(f"# TYPE {metric} gauge")
        for instance in ("node-a", "node-b"):
            for step in range(POINTS):
                text = sample_text(metric, instance, step)
                if text is not None:
                    # OpenMetrics timestamps are in seconds. promtool takes a millisecond value as seconds, 1000 times too late.
                    lines.append(f'{metric}{{instance="{instance}"}} {text} {int(start + step * STEP)}')
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def expected_series(backfilled: Backfilled, signal: str, instance: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the timestamps and values that Prometheus holds: every step but the absent ones."""
    texts = [sample_text(METRICS[signal], instance, step) for step in range(POINTS)]
    steps = np.array([step for step, text in enumerate(texts) if text is not None], dtype=float)
    # float() reads Prometheus's NaN, +Inf and -Inf spellings.
    values = np.array([float(text) for text in texts if text is not None])
    return backfilled.start + STEP * steps, values


def expected_column(signal: str, instance: str) -> np.ndarray:
    """Return the values a frame must hold: NaN where a sample is absent, NaN or infinite."""
    texts = [sample_text(METRICS[signal], instance, step) for step in range(POINTS)]
    values = np.array([np.nan if text is None else float(text) for text in texts])
    return np.where(np.isfinite(values), values, np.nan)


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory) -> Backfilled:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found on PATH: install the Debian package `prometheus`")
    workdir = tmp_path_factory.mktemp("prometheus")
    # Ending two hours back keeps every sample well inside the 30 day retention that LocalStack sets.
    start = grid_floor(time.time() - 2 * 3600, STEP) - (POINTS - 1) * STEP
    (workdir / "history.om").write_text(openmetrics_text(start))
    subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(workdir / "history.om"),
                    str(workdir / "prometheus-data")], check=True, capture_output=True)

    stack = LocalStack(workdir)
    try:
        url = stack.start_prometheus(scrape_configs=[])
    except MissingBinary as error:
        pytest.skip(str(error))
    yield Backfilled(url, start)
    stack.stop()


class RecordingSource(PrometheusSource):
    """A PrometheusSource that records the parameters of every API request it sends."""

    def __init__(self, config: PrometheusConfig):
        super().__init__(config)
        self.sent: list[dict] = []

    def get(self, path: str, params: dict) -> dict:
        self.sent.append(dict(params))
        return super().get(path, params)


def chunk_points(params: dict) -> int:
    return int(round((float(params["end"]) - float(params["start"])) / float(params["step"]))) + 1


def by_instance(result: list[Series]) -> dict[str, Series]:
    return {s.labels["instance"]: s for s in result}


def read_chunked(backfilled: Backfilled, **limits) -> tuple[RecordingSource, dict[str, Series]]:
    source = RecordingSource(PrometheusConfig(url=backfilled.url, **limits))
    end = backfilled.start + (POINTS - 1) * STEP
    try:
        result = source.query_range("cpu_test", backfilled.start, end, STEP, series_hint=250)
    finally:
        source.close()
    return source, by_instance(result)


@pytest.mark.integration
def test_point_limit_splits_into_chunks(backfilled):
    source, _ = read_chunked(backfilled, max_points_per_query=7)
    sizes = [chunk_points(params) for params in source.sent]

    assert sizes == [7] * 7 + [1]


@pytest.mark.integration
@pytest.mark.parametrize("instance", ["node-a", "node-b"])
def test_chunk_seams_keep_every_step_once(backfilled, instance: str):
    _, result = read_chunked(backfilled, max_points_per_query=7)
    timestamps, values = expected_series(backfilled, "cpu", instance)

    np.testing.assert_array_equal(result[instance].timestamps, timestamps)
    np.testing.assert_array_equal(result[instance].values, values)


@pytest.mark.integration
def test_sample_limit_splits_into_smaller_chunks(backfilled):
    # 1000 samples for an expected 250 series leave 4 points per query, fewer than the point limit.
    source, _ = read_chunked(backfilled, max_points_per_query=7, max_samples_per_query=1000)
    sizes = [chunk_points(params) for params in source.sent]

    assert sizes == [4] * 12 + [2]


@pytest.mark.integration
@pytest.mark.parametrize("instance", ["node-a", "node-b"])
def test_sample_limit_seams_keep_every_step_once(backfilled, instance: str):
    _, result = read_chunked(backfilled, max_points_per_query=7, max_samples_per_query=1000)
    timestamps, values = expected_series(backfilled, "cpu", instance)

    np.testing.assert_array_equal(result[instance].timestamps, timestamps)
    np.testing.assert_array_equal(result[instance].values, values)


@pytest.mark.integration
def test_chunk_starts_on_grid(backfilled):
    source, _ = read_chunked(backfilled, max_points_per_query=7)
    offsets = [(float(params["start"]) - backfilled.start) / STEP for params in source.sent]

    assert offsets == [0.0, 7.0, 14.0, 21.0, 28.0, 35.0, 42.0, 49.0]


@pytest.mark.integration
@pytest.mark.parametrize("signal", ["cpu", "memory"])
@pytest.mark.parametrize("row, instance", [(0, "node-a"), (1, "node-b")])
def test_fetch_frame_matches_backfill(backfilled, signal: str, row: int, instance: str):
    source = PrometheusSource(PrometheusConfig(url=backfilled.url, max_points_per_query=7))
    # Start and end off the grid: fetch_frame reads the grid points inside the range.
    try:
        frame = fetch_frame(source, detector(), backfilled.start - 0.5 * STEP + STEP,
                            backfilled.start + (POINTS - 1) * STEP + 0.5 * STEP)
    finally:
        source.close()
    column_index = list(detector().signals).index(signal)

    assert frame.start == backfilled.start
    assert frame.entities == [("node-a",), ("node-b",)]
    np.testing.assert_array_equal(frame.values[row, :, column_index], expected_column(signal, instance))
