"""Detection metrics on small hand-made cases whose answers are known by counting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monitor.evaluation import metrics

# Two incidents: steps 2-4 and 8-9, in 12 steps.
LABELS = np.array([0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0])


def test_segments_inclusive_bounds():
    assert metrics.segments(LABELS) == [(2, 4), (8, 9)]
    assert metrics.segments(np.array([1, 1, 0, 1])) == [(0, 1), (3, 3)]
    assert metrics.segments(np.zeros(5)) == []


def test_perfect_score_every_metric_at_one():
    scores = LABELS.astype(float)
    result = metrics.evaluate_scores(LABELS, scores, threshold=0.5, step=60.0)
    for name in ("precision", "recall", "f1", "best_f1", "auc_pr", "auc_roc", "range_f1", "events_caught",
                 "f1_pa_best"):
        assert result[name] == pytest.approx(1.0), name
    assert result["false_alarm_rate"] == 0.0
    assert result["mean_delay_s"] == 0.0
    assert result["events"] == 2


def test_known_precision_and_recall():
    # Alarms at 3, 4 (hits) and 6 (false): precision 2/3, recall 2/5.
    alarms = np.zeros(12, dtype=bool)
    alarms[[3, 4, 6]] = True
    point = metrics.point_scores(LABELS, alarms)
    assert point.precision == pytest.approx(2 / 3)
    assert point.recall == pytest.approx(2 / 5)
    assert point.f1 == pytest.approx(2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5))
    assert metrics.false_alarm_rate(LABELS, alarms) == pytest.approx(1 / 7)


def test_event_delay_counts_steps_to_first_alarm():
    alarms = np.zeros(12, dtype=bool)
    alarms[[4, 9]] = True  # 2 steps into the first incident, 1 step into the second
    events = metrics.event_scores(LABELS, alarms)
    assert events.incidents == 2
    assert events.caught == 2
    assert events.delays == [2, 1]
    result = metrics.evaluate_scores(LABELS, alarms.astype(float), threshold=0.5, step=60.0)
    assert result["mean_delay_s"] == pytest.approx(90.0)


def test_episodes_skip_incident_runs():
    alarms = np.zeros(12, dtype=bool)
    alarms[[0, 1]] = True  # one false episode of two steps
    alarms[[4, 5, 6]] = True  # starts inside the first incident, so it is no false page
    alarms[11] = True  # a second false episode
    assert metrics.false_alarm_episodes(LABELS, alarms) == 2
    result = metrics.evaluate_scores(LABELS, alarms.astype(float), threshold=0.5, step=3600.0)
    assert result["false_alarm_episodes"] == 2
    assert result["normal_days"] == pytest.approx(7 / 24)


def test_missed_incident_lowers_caught_share():
    alarms = np.zeros(12, dtype=bool)
    alarms[2] = True
    events = metrics.event_scores(LABELS, alarms)
    assert events.caught_share == pytest.approx(0.5)
    assert events.mean_delay == 0.0


def test_range_scores_overlap_shares():
    # Covers 1 of 3 steps of the first incident and 2 of 2 of the second; the predicted ranges
    # [4, 6] is one third inside and [8, 9] fully inside.
    alarms = np.zeros(12, dtype=bool)
    alarms[[4, 5, 6, 8, 9]] = True
    ranged = metrics.range_scores(LABELS, alarms)
    assert ranged.recall == pytest.approx((1 / 3 + 1) / 2)
    assert ranged.precision == pytest.approx((1 / 3 + 1) / 2)


def test_point_adjust_fills_detected_incident():
    alarms = np.zeros(12, dtype=bool)
    alarms[3] = True
    adjusted = metrics.point_adjust(LABELS, alarms)
    assert adjusted[2:5].all()
    assert not adjusted[8:10].any()


def test_random_score_near_base_rate():
    rng = np.random.default_rng(7)
    labels = np.zeros(20000, dtype=int)
    for start in range(500, 20000, 1000):
        labels[start:start + 50] = 1
    scores = rng.random(labels.size)
    assert metrics.auc_roc(labels, scores) == pytest.approx(0.5, abs=0.03)
    assert metrics.auc_pr(labels, scores) == pytest.approx(labels.mean(), abs=0.01)
    # Point adjustment lets noise look strong on long incidents: the reason it is only a side column.
    assert metrics.best_adjusted_f1(labels, scores) > 0.5
    assert metrics.best_f1(labels, scores) < 0.15


def test_missing_scores_left_out():
    scores = LABELS.astype(float)
    scores[[0, 1]] = np.nan
    result = metrics.evaluate_scores(LABELS, scores, threshold=0.5, step=60.0)
    assert result["normal_steps"] == 5
    assert result["f1"] == pytest.approx(1.0)


def test_threshold_per_step():
    scores = np.array([0.2, 0.2, 0.6, 0.6, 0.6, 0.2, 0.2, 0.2, 0.6, 0.6, 0.2, 0.2])
    thresholds = np.where(np.arange(12) < 6, 0.5, 0.7)  # the second model's threshold misses incident 2
    result = metrics.evaluate_scores(LABELS, scores, thresholds, step=60.0)
    assert result["recall"] == pytest.approx(3 / 5)
    assert result["events_caught"] == pytest.approx(0.5)


def test_no_incidents_gives_nan_not_error():
    labels = np.zeros(10, dtype=int)
    result = metrics.evaluate_scores(labels, np.linspace(0, 1, 10), threshold=0.95, step=1.0)
    assert math.isnan(result["best_f1"])
    assert math.isnan(result["auc_roc"])
    assert result["false_alarm_rate"] == pytest.approx(0.1)
