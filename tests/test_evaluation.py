"""The evaluation harness: protocols on synthetic data, and a reduced real run of the command."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from monitor.cli import main
from monitor.evaluation.datasets import DATA_DIR_ENV, Unit
from monitor.evaluation import report
from monitor.evaluation.metrics import evaluate_scores
from monitor.evaluation.protocols import run_deployed, run_static
from monitor.evaluation.runner import build_detector, entity_records
from monitor.frames import Frame

STEP = 60.0
TRAIN_STEPS = 2000
TEST_STEPS = 600
INCIDENT = slice(300, 330)  # test steps


def synthetic_unit() -> Unit:
    """Three correlated daily-cycle signals with noise; one 30-step incident breaks the correlation."""
    rng = np.random.default_rng(3)
    steps = TRAIN_STEPS + TEST_STEPS
    phase = 2 * np.pi * np.arange(steps) / 1440.0
    base = np.sin(phase)
    values = np.stack([base, 0.5 * base + 1.0, -base + 2.0], axis=-1) + 0.05 * rng.standard_normal((steps, 3))
    labels = np.zeros(TEST_STEPS, dtype=np.int8)
    labels[INCIDENT] = 1
    values[TRAIN_STEPS + INCIDENT.start:TRAIN_STEPS + INCIDENT.stop, 1] += 1.5
    frame = Frame(1_700_000_000.0, STEP, [("host-a",)], values[None])
    return Unit("synthetic", "host-a", ["cpu", "memory", "network"], frame, TRAIN_STEPS, labels[None])


QUICK = {"train.epochs": 2, "train.warm_start_epochs": 1, "train.max_windows": 256, "train.range": "1d",
         "train.every": "4h", "window": 20, "score.aggregate_steps": 5}


def test_static_product_finds_incident():
    unit = synthetic_unit()
    detector = build_detector(unit, QUICK)
    tracks = run_static(unit, detector, ["product", "random"], seed=0)

    product = evaluate_scores(unit.labels[0], tracks["product"].scores[0], tracks["product"].thresholds, STEP)
    noise = evaluate_scores(unit.labels[0], tracks["random"].scores[0], tracks["random"].thresholds, STEP)
    assert np.isfinite(tracks["product"].scores).all()
    assert product["events_caught"] == 1.0
    assert product["auc_roc"] > 0.9
    assert product["auc_pr"] > noise["auc_pr"] + 0.3


def test_deployed_refits_on_schedule():
    unit = synthetic_unit()
    detector = build_detector(unit, QUICK)
    tracks = run_deployed(unit, detector, ["product", "pca_mahalanobis", "product_diag_gauss"], seed=0)

    # One fit before the test part, then one every 4 h (240 steps) while test steps remain.
    expected_fits = 1 + (TEST_STEPS - 1) // 240
    for name, track in tracks.items():
        assert track.fits == expected_fits, name
        assert np.isfinite(track.scores).all(), name
        assert np.isfinite(track.thresholds).all(), name
    assert {"chi2@0.001", "quantile@0.01", "evt@0.001"} <= set(tracks["product"].alternatives)


def test_false_alarms_named_by_their_signal():
    unit = synthetic_unit()
    # An unlabelled burst on the network signal: whatever alarms there is a false alarm.
    unit.frame.values[0, TRAIN_STEPS + 450:TRAIN_STEPS + 460, 2] += 3.0
    detector = build_detector(unit, QUICK)
    tracks = run_static(unit, detector, ["product", "pca_mahalanobis"], seed=0)

    records = {r["method"]: r for r in entity_records(unit, tracks, "static", 0)}
    product = records["product"]
    assert product["false_alarm_signals"].startswith("network:")
    assert product["false_alarm_episodes"] >= 1
    assert product["normal_days"] == pytest.approx((TEST_STEPS - 30) * STEP / 86400)
    assert "false_alarm_signals" not in records["pca_mahalanobis"]


def test_summary_pools_false_alarm_episodes():
    common = {"protocol": "deployed", "dataset": "d", "method": "product", "seed": 0, "events": 1.0}
    common.update({column: 0.5 for column, _ in report.SUMMARY_COLUMNS if column not in report.POOLED_COLUMNS})
    records = [
        {**common, "unit": "a", "normal_steps": 1440.0, "normal_alarms": 12.0, "false_alarm_episodes": 2.0,
         "normal_days": 1.0},
        {**common, "unit": "b", "normal_steps": 2880.0, "normal_alarms": 0.0, "false_alarm_episodes": 1.0,
         "normal_days": 2.0},
    ]
    (row,) = report.summarise(records)
    # Pooled: 3 episodes over 3 days, not the mean of 2 and 0.5 per day.
    assert row["episodes_per_day"] == pytest.approx(1.0)
    assert row["pooled_far"] == pytest.approx(12 / 4320)


def test_static_seeds_differ_only_for_neural():
    unit = synthetic_unit()
    detector = build_detector(unit, QUICK)
    first = run_static(unit, detector, ["product", "pca_error"], seed=0)
    second = run_static(unit, detector, ["product", "pca_error"], seed=1)
    assert np.array_equal(first["pca_error"].scores, second["pca_error"].scores)
    assert not np.array_equal(first["product"].scores, second["product"].scores)


def test_missing_data_dir_names_option_and_env(monkeypatch, capsys):
    # main() installs its own log handler on stderr, so the message is read from there.
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    code = main(["evaluate", "--dataset", "asd"])
    error = capsys.readouterr().err
    assert code == 2
    assert "--data-dir" in error
    assert DATA_DIR_ENV in error


def test_unknown_method_rejected(tmp_path, capsys):
    code = main(["evaluate", "--data-dir", str(tmp_path), "--methods", "product,lstm_magic"])
    assert code == 2
    assert "lstm_magic" in capsys.readouterr().err


def _data_dir() -> Path:
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set: point it at the folder holding smd/, asd/, nezha/ and nab/")
    return Path(value)


def test_reduced_run_both_protocols(tmp_path):
    data_dir = _data_dir()
    out = tmp_path / "results"
    code = main(["evaluate", "--data-dir", str(data_dir), "--dataset", "asd", "--units", "omi-2",
                 "--seeds", "0", "--epochs", "1", "--warm-start-epochs", "1", "--max-windows", "256",
                 "--train-every", "5d", "--out", str(out)])
    assert code == 0

    with open(out / "per_unit.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    methods = {r["method"] for r in rows}
    assert "product" in methods
    assert "pca_mahalanobis" in methods
    assert len(methods) == 10
    assert {r["protocol"] for r in rows} == {"static", "deployed"}
    product = [r for r in rows if r["method"] == "product"]
    for row in product:
        assert 0.0 <= float(row["best_f1"]) <= 1.0
        assert 0.0 <= float(row["auc_pr"]) <= 1.0
    deployed = next(r for r in product if r["protocol"] == "deployed")
    assert int(deployed["fits"]) == 3  # 15 test days, a refit every 5 days

    description = json.loads((out / "config.json").read_text())
    assert description["seeds"]["static"] == [0]
    assert description["detectors"]["asd"]["train"]["epochs"] == 1
    summary = (out / "summary.md").read_text()
    assert "asd, static protocol" in summary
    assert "asd, deployed protocol" in summary
    assert (out / "thresholds.md").read_text().count("| product |") == 12
    # The run's log filters must not outlive it, or later warnings in this process vanish.
    assert logging.getLogger("monitor.training").filters == []
    for protocol in ("static", "deployed"):
        picture = out / "pictures" / f"asd-omi-2-{protocol}.png"
        assert picture.stat().st_size > 1000


def test_jobs_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["evaluate", "--data-dir", str(tmp_path), "--jobs", "0"])
    assert raised.value.code == 2
    assert "--jobs" in capsys.readouterr().err


def _per_unit_rows(out: Path) -> list[dict]:
    with open(out / "per_unit.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_parallel_units_same_records(tmp_path):
    data_dir = _data_dir()
    common = ["evaluate", "--data-dir", str(data_dir), "--dataset", "asd", "--units", "omi-2,omi-3",
              "--protocol", "static", "--methods", "product,pca_mahalanobis", "--seeds", "0",
              "--epochs", "1", "--max-windows", "256", "--torch-threads", "1"]

    assert main(common + ["--out", str(tmp_path / "serial")]) == 0
    assert main(common + ["--jobs", "2", "--out", str(tmp_path / "parallel")]) == 0

    serial = _per_unit_rows(tmp_path / "serial")
    parallel = _per_unit_rows(tmp_path / "parallel")
    assert [row["unit"] for row in parallel] == ["omi-2", "omi-2", "omi-3", "omi-3"]
    assert parallel == serial
    assert (tmp_path / "parallel" / "pictures" / "asd-omi-3-static.png").stat().st_size > 1000
