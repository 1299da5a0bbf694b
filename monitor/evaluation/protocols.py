"""The two evaluation protocols: static (fit once on the training part) and as deployed.

As deployed, the test part is replayed in time order through the service's schedule: every
`train.every` each method is refitted on the last `train.range` of data, and the steps until
the next refit are scored by the model fitted last. The product's Trainer receives the serving
bundle, so it warm-starts and drops the windows that bundle flags, as the service does. A
baseline is refitted on the same range with the steps its own serving model flagged masked out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from monitor.config import DetectorConfig
from monitor.evaluation.datasets import Unit
from monitor.evaluation.methods import DERIVED, INDEPENDENT, FitError, Fitted
from monitor.frames import Frame
from monitor.scoring import fit_threshold

logger = logging.getLogger(__name__)

THRESHOLD_METHODS = ("chi2", "quantile", "evt")
# The extra false-alarm target at which the observed rate is also reported.
SECOND_TARGET = 0.01


@dataclass
class Track:
    """One method's test scores and the threshold that was active at each test step."""

    scores: np.ndarray  # [entity, test step]
    thresholds: np.ndarray  # [test step]
    alternatives: dict[str, np.ndarray] = field(default_factory=dict)  # name -> thresholds [test step]
    fits: int = 0
    drivers: np.ndarray | None = None  # [entity, test step] index of the top signal, or -1


def slice_frame(frame: Frame, first: int, stop: int) -> Frame:
    first = max(first, 0)
    return Frame(frame.start + first * frame.step, frame.step, frame.entities, frame.values[:, first:stop])


def alternative_names(detector: DetectorConfig) -> list[tuple[str, str, float]]:
    rates = sorted({detector.threshold.false_alarm_rate, SECOND_TARGET})
    return [(f"{method}@{rate:g}", method, rate) for method in THRESHOLD_METHODS for rate in rates]


def _alternatives(fitted: Fitted, detector: DetectorConfig) -> dict[str, float]:
    """Thresholds of every method and target from the same held-out scores, for Mahalanobis scores."""
    out = {}
    reference = fitted.threshold.reference
    for name, method, rate in alternative_names(detector):
        out[name] = fit_threshold(method, rate, reference, len(detector.signals),
                                  detector.score.aggregate_steps).value
    return out


class Session:
    """Fits and scores a set of methods on one unit with one seed."""

    def __init__(self, unit: Unit, detector: DetectorConfig, methods: list[str], seed: int):
        self.unit = unit
        self.detector = detector
        self.methods = methods
        self.seed = seed
        self.fitted: dict[str, Fitted] = {}
        steps = unit.test_steps
        entities = len(unit.frame.entities)
        self.tracks = {name: Track(np.full((entities, steps), np.nan), np.full(steps, np.nan))
                       for name in methods}
        total = unit.frame.values.shape[1]
        self.alarms = {name: np.zeros((entities, total), dtype=bool) for name in methods}

    def fit(self, first: int, stop: int, mask_own_alarms: bool) -> None:
        """Fit every method on frame steps [first, stop), passing each its serving model."""
        frame = slice_frame(self.unit.frame, first, stop)
        order = [n for n in self.methods if n not in DERIVED]
        if any(n in DERIVED for n in self.methods) and "product" not in order:
            order.insert(0, "product")
        for name in order:
            began = time.monotonic()
            source = self._masked(frame, name, first) if mask_own_alarms and name != "product" else frame
            method = INDEPENDENT[name](self.detector)
            self._keep(name, lambda: method.fit(source, self.seed, self.fitted.get(name)))
            logger.debug("%s fitted in %.1fs", name, time.monotonic() - began)
        # Scores read from the product's network calibrate on the unmasked range: masking by the
        # product's alarms can leave no complete held-out window after a long incident.
        for name in (n for n in self.methods if n in DERIVED):
            method = DERIVED[name](self.detector)
            self._keep(name, lambda: method.fit_from(self.fitted["product"].bundle, frame))

    def _keep(self, name: str, fit) -> None:
        """Store a new fit; on failure keep the serving model, or raise when there is none."""
        try:
            self.fitted[name] = fit()
        except (FitError, ValueError) as error:
            if name not in self.fitted:
                raise
            logger.warning("%s: %s: refit failed, the serving model stays: %s", self.unit.name, name, error)
            return
        if name in self.tracks:
            self.tracks[name].fits += 1

    def _masked(self, frame: Frame, name: str, first: int) -> Frame:
        flagged = self.alarms.get(name)
        if flagged is None:
            return frame
        part = flagged[:, max(first, 0):max(first, 0) + frame.values.shape[1]]
        if not part.any():
            return frame
        values = frame.values.copy()
        values[part] = np.nan
        return Frame(frame.start, frame.step, frame.entities, values)

    def score(self, first: int, stop: int) -> None:
        """Score frame steps [first, stop) with the fitted models; read one window before `first`."""
        lead = self.detector.window - 1
        frame = slice_frame(self.unit.frame, first - lead, stop)
        offset = first - max(first - lead, 0)
        columns = slice(first - self.unit.test_start, stop - self.unit.test_start)
        for name in self.methods:
            fitted = self.fitted[name]
            scores, drivers = fitted.score_and_explain(frame)
            scores = scores[:, offset:]
            track = self.tracks[name]
            track.scores[:, columns] = scores
            if drivers is not None:
                if track.drivers is None:
                    track.drivers = np.full(track.scores.shape, -1, dtype=np.int32)
                track.drivers[:, columns] = drivers[:, offset:]
            track.thresholds[columns] = fitted.threshold.value
            if name in ("product", "pca_mahalanobis"):
                for key, value in _alternatives(fitted, self.detector).items():
                    track.alternatives.setdefault(key, np.full(self.unit.test_steps, np.nan))[columns] = value
            self.alarms[name][:, first:stop] = np.nan_to_num(scores, nan=-np.inf) > fitted.threshold.value


def run_static(unit: Unit, detector: DetectorConfig, methods: list[str], seed: int) -> dict[str, Track]:
    """Fit on the whole training part once; score the whole test part."""
    session = Session(unit, detector, methods, seed)
    session.fit(0, unit.test_start, mask_own_alarms=False)
    session.score(unit.test_start, unit.frame.values.shape[1])
    return session.tracks


def run_deployed(unit: Unit, detector: DetectorConfig, methods: list[str], seed: int) -> dict[str, Track]:
    """Replay the test part through the service's training schedule."""
    session = Session(unit, detector, methods, seed)
    range_steps = max(int(detector.train.range // unit.step), 1)
    every_steps = max(int(detector.train.every // unit.step), 1)
    total = unit.frame.values.shape[1]

    now = unit.test_start
    session.fit(now - range_steps, now, mask_own_alarms=False)
    while now < total:
        stop = min(now + every_steps, total)
        session.score(now, stop)
        now = stop
        if now < total:
            session.fit(now - range_steps, now, mask_own_alarms=True)
    return session.tracks
