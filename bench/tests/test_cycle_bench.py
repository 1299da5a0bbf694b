"""Tests of the cycle benchmark's generator, probes and one tiny end-to-end run. Nothing here asserts a duration."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from bench import cycle, probes
from bench.synthetic import SIGNALS, Dataset, block_ranges, metric_name, values, write_openmetrics

DAY = 86400
MIDNIGHT = 1_764_806_400  # 2025-12-04T00:00:00Z


def _require(*binaries: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not on PATH; install them with: apt-get install prometheus")


def test_openmetrics_file_parses(tmp_path):
    dataset = Dataset(entities=3, start=MIDNIGHT, end=MIDNIGHT + 90)
    path = tmp_path / "data.om"
    write_openmetrics(path, dataset, dataset.start, dataset.end)
    text = path.read_text()

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert text.endswith("# EOF\n")
    assert sorted(families) == sorted(metric_name(s) for s in SIGNALS)
    assert all(f.type == "gauge" for f in families.values())
    assert len(families["bench_cpu"].samples) == 3 * 4


def test_openmetrics_values_match_generator(tmp_path):
    dataset = Dataset(entities=3, start=MIDNIGHT, end=MIDNIGHT + 90)
    path = tmp_path / "data.om"
    write_openmetrics(path, dataset, dataset.start, dataset.end)
    samples = next(f for f in text_string_to_metric_families(path.read_text()) if f.name == "bench_load").samples

    host = [s for s in samples if s.labels == {"instance": "host-0002"}]
    timestamps = np.arange(dataset.start, dataset.end + 1, dataset.step, dtype=np.float64)
    expected = values(dataset, SIGNALS.index("load"), np.arange(3), timestamps)[2]
    assert [s.timestamp.sec for s in host] == timestamps.astype(int).tolist()
    np.testing.assert_allclose([s.value for s in host], expected, rtol=0, atol=1e-14)


def test_values_stay_in_fixed_width_range():
    dataset = Dataset(entities=50, start=MIDNIGHT, end=MIDNIGHT + DAY - 30)
    timestamps = np.arange(dataset.start, dataset.end + 1, dataset.step, dtype=np.float64)
    generated = values(dataset, 0, np.arange(50), timestamps)
    assert generated.min() >= 1.0
    assert generated.max() < 10.0


def test_block_ranges_cover_grid_once():
    dataset = Dataset(entities=1, start=MIDNIGHT - 3 * 3600, end=MIDNIGHT + DAY + 600)
    ranges = block_ranges(dataset, DAY)
    covered = [t for first, last in ranges for t in range(first, last + 1, dataset.step)]

    assert covered == list(range(dataset.start, dataset.end + 1, dataset.step))
    assert all(first // DAY == last // DAY for first, last in ranges)
    assert len(ranges) == 3


def test_timers_count_nested_time_once(monkeypatch):
    ticks = iter(range(100))
    monkeypatch.setattr(probes.time, "perf_counter", lambda: float(next(ticks)))
    timers = probes.Timers()
    inner = timers.wrap("json", lambda: None)
    outer = timers.wrap("http", lambda: inner())

    outer()  # clock reads: outer 0, inner 1 and 2, outer 3

    assert timers.seconds["http"] == 2.0
    assert timers.seconds["json"] == 1.0
    assert timers.phases(total=5.0) == {"query": 2.0, "decode": 1.0, "other": 2.0}


def test_process_cpu_reads_own_process():
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert probes.process_cpu_seconds(os.getpid()) > 0


def test_peak_rss_reset_drops_old_peak():
    block = np.ones(64 * 2**20 // 8)
    del block
    before = probes.peak_rss_mib()
    probes.reset_peak_rss()
    assert probes.peak_rss_mib() < before


def test_plan_ends_before_midnight():
    dataset = cycle.plan_dataset(10, 6 * 3600, steady=10, now=MIDNIGHT + 5000)
    assert dataset.end == MIDNIGHT - 30
    assert dataset.steps == 720


def test_plan_rejects_short_history():
    with pytest.raises(ValueError, match="too short"):
        cycle.plan_dataset(10, 600, steady=10, now=MIDNIGHT)


@pytest.mark.integration
def test_bench_size_end_to_end(tmp_path):
    _require("promtool", "prometheus")
    result = cycle.bench_size(entities=5, history="3h", workdir=tmp_path, steady=2)
    by_name = {m["operation"]: m for m in result["measurements"]}

    assert result["check"] == {"series_per_signal": 5, "samples_per_signal": 5 * 360}
    assert list(by_name) == ["train_cold_history", "train_warm_history", "score_cold", "score_steady"]
    assert by_name["train_cold_history"]["accepted"]
    # One instant query lists the entities to sample, then one range query per signal.
    assert by_name["train_cold_history"]["calls"]["http"] == len(SIGNALS) + 1
    assert "http" not in by_name["train_warm_history"]["calls"]
    assert by_name["train_warm_history"]["history_segments"] == 3
    assert by_name["score_cold"]["entities_scored"] == 5
    assert by_name["score_steady"]["calls"]["http"] == len(SIGNALS)
    assert by_name["score_steady"]["runs"] == 2


@pytest.mark.integration
def test_bench_reuses_backfilled_tsdb(tmp_path):
    _require("promtool")
    planned = cycle.plan_dataset(4, 3 * 3600, steady=2, now=time.time())
    _, first = cycle.prepare_tsdb(planned, tmp_path)
    _, second = cycle.prepare_tsdb(planned, tmp_path)
    assert first["samples"] == planned.samples
    assert second is None


def test_markdown_table_has_row_per_measurement():
    measurement = {"operation": "score_cold", "seconds": 1.0, "phases": {"query": 0.5}, "service_cpu_seconds": 0.4,
                   "prometheus_cpu_seconds": 0.2, "other_cpu_seconds": 0.0, "peak_rss_mib": 300.0}
    table = cycle.markdown_table([{"entities": 1000, "history": "7d", "measurements": [measurement] * 2}])
    rows = table.strip().splitlines()
    assert len(rows) == 4
    assert rows[2].startswith("| 1,000, 7d | score_cold | 1.000 | 0.500 |")


def test_decode_alternative_matches_monitor():
    import orjson

    from bench.decode import response_body, unzip_pairs
    from monitor.source import _parse_result

    data = orjson.loads(response_body(series=3, points=5))["data"]
    expected = _parse_result(data)
    converted = unzip_pairs(data["result"])
    for series, (timestamps, values) in zip(expected, converted):
        np.testing.assert_array_equal(series.timestamps, timestamps)
        np.testing.assert_array_equal(series.values, values)
