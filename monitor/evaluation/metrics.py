"""Detection metrics over one unit's test steps: point-wise, range-based, event-wise.

Inputs are 1-D arrays over test steps: `labels` 0/1, `scores` (higher is more anomalous) and
`alarms` (boolean, the service's decision at its own threshold). Steps whose score is NaN (no
complete window ended there) are left out by `evaluate_scores` before any metric sees them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

# Thresholds tried for the point-adjusted best F1: quantiles of the score, enough to find the
# optimum within a fraction of a point on tens of thousands of steps.
ADJUSTED_THRESHOLDS = 200


@dataclass(frozen=True)
class PointCounts:
    precision: float
    recall: float
    f1: float


def f1_from(precision: float, recall: float) -> float:
    if precision + recall <= 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def point_scores(labels: np.ndarray, alarms: np.ndarray) -> PointCounts:
    """Point-wise precision, recall and F1 of boolean alarms; precision is 0 when nothing alarms."""
    labels = labels.astype(bool)
    alarms = alarms.astype(bool)
    hits = int(np.sum(labels & alarms))
    precision = hits / alarms.sum() if alarms.any() else 0.0
    recall = hits / labels.sum() if labels.any() else 0.0
    return PointCounts(float(precision), float(recall), f1_from(precision, recall))


def best_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """The highest point-wise F1 over all thresholds, chosen with the test labels (an oracle)."""
    if not labels.any():
        return math.nan
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=(precision + recall) > 0)
    return float(f1.max())


def auc_pr(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, the step-wise area under the precision-recall curve."""
    return float(average_precision_score(labels, scores)) if labels.any() else math.nan


def auc_roc(labels: np.ndarray, scores: np.ndarray) -> float:
    if labels.all() or not labels.any():
        return math.nan
    return float(roc_auc_score(labels, scores))


def segments(labels: np.ndarray) -> list[tuple[int, int]]:
    """Return the labelled incidents as inclusive (first, last) step index pairs."""
    padded = np.concatenate([[0], labels.astype(np.int8), [0]])
    changes = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b) - 1) for a, b in zip(changes[::2], changes[1::2])]


def range_scores(labels: np.ndarray, alarms: np.ndarray) -> PointCounts:
    """Range-based precision and recall with overlap reward only and a flat position bias.

    This is the setting of Tatbul et al. (NeurIPS 2018) with alpha = 0 and cardinality factor 1:
    each real range contributes the share of its steps covered by alarms to recall, and each
    predicted range contributes the share of its steps inside real ranges to precision.
    """
    real = segments(labels)
    predicted = segments(alarms)
    labels = labels.astype(bool)
    alarms = alarms.astype(bool)
    recall = np.mean([alarms[a:b + 1].mean() for a, b in real]) if real else 0.0
    precision = np.mean([labels[a:b + 1].mean() for a, b in predicted]) if predicted else 0.0
    return PointCounts(float(precision), float(recall), f1_from(float(precision), float(recall)))


@dataclass(frozen=True)
class EventScores:
    incidents: int
    caught: int
    delays: list[int]  # steps from each caught incident's first step to its first alarm

    @property
    def caught_share(self) -> float:
        return self.caught / self.incidents if self.incidents else math.nan

    @property
    def mean_delay(self) -> float:
        return float(np.mean(self.delays)) if self.delays else math.nan


def event_scores(labels: np.ndarray, alarms: np.ndarray) -> EventScores:
    """Count incidents with at least one alarm inside them and the delay to that first alarm."""
    alarms = alarms.astype(bool)
    delays = []
    incidents = segments(labels)
    for first, last in incidents:
        inside = np.flatnonzero(alarms[first:last + 1])
        if inside.size:
            delays.append(int(inside[0]))
    return EventScores(len(incidents), len(delays), delays)


def false_alarm_rate(labels: np.ndarray, alarms: np.ndarray) -> float:
    """Share of normal steps that alarm; compare it with the configured false-alarm rate."""
    normal = ~labels.astype(bool)
    return float(alarms[normal].mean()) if normal.any() else math.nan


def false_alarm_episodes(labels: np.ndarray, alarms: np.ndarray) -> int:
    """Count runs of consecutive alarms that touch no labelled incident.

    Each run stands for one page: 200 alarming steps after a level shift are one episode, as
    are the 10 steps that one spike keeps in the window score. Steps without a score are
    dropped before this runs, so alarms on both sides of such a gap count as one run.
    """
    labels = labels.astype(bool)
    return sum(1 for first, last in segments(alarms) if not labels[first:last + 1].any())


def point_adjust(labels: np.ndarray, alarms: np.ndarray) -> np.ndarray:
    """Mark a whole incident as detected when any of its steps alarms (the inflated protocol)."""
    adjusted = alarms.astype(bool).copy()
    for first, last in segments(labels):
        if adjusted[first:last + 1].any():
            adjusted[first:last + 1] = True
    return adjusted


def best_adjusted_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """The highest point-adjusted F1 over score quantiles; report it only beside a random score's."""
    if not labels.any():
        return math.nan
    thresholds = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, ADJUSTED_THRESHOLDS, endpoint=False)))
    return max(point_scores(labels, point_adjust(labels, scores > t)).f1 for t in thresholds)


METRIC_COLUMNS = (
    "precision", "recall", "f1", "best_f1", "auc_pr", "auc_roc", "range_f1", "events", "events_caught",
    "mean_delay_s", "false_alarm_rate", "f1_pa_best", "normal_steps", "normal_alarms", "false_alarm_episodes",
    "normal_days",
)


def evaluate_scores(labels: np.ndarray, scores: np.ndarray, threshold, step: float) -> dict[str, float]:
    """Compute every reported metric for one unit and one method; steps without a score are dropped.

    `threshold` is one value or, as deployed, the threshold active at each step; `step` is in
    seconds and converts the alarm delay.
    """
    scored = np.isfinite(scores)
    threshold = np.broadcast_to(np.asarray(threshold, dtype=float), scores.shape)[scored]
    labels = labels[scored].astype(np.int8)
    scores = scores[scored]
    alarms = scores > threshold

    point = point_scores(labels, alarms)
    ranged = range_scores(labels, alarms)
    events = event_scores(labels, alarms)
    return {
        "precision": point.precision,
        "recall": point.recall,
        "f1": point.f1,
        "best_f1": best_f1(labels, scores),
        "auc_pr": auc_pr(labels, scores),
        "auc_roc": auc_roc(labels, scores),
        "range_f1": ranged.f1,
        "events": float(events.incidents),
        "events_caught": events.caught_share,
        "mean_delay_s": events.mean_delay * step,
        "false_alarm_rate": false_alarm_rate(labels, alarms),
        "f1_pa_best": best_adjusted_f1(labels, scores),
        # Counts, so that false-alarm rates can be pooled over every normal step of a data set.
        "normal_steps": float(np.sum(labels == 0)),
        "normal_alarms": float(np.sum(alarms & (labels == 0))),
        "false_alarm_episodes": float(false_alarm_episodes(labels, alarms)),
        "normal_days": float(np.sum(labels == 0)) * step / 86400.0,
    }
