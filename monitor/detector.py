"""One detector at run time: its score cycle, its training run and the state between them."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from monitor.bundle import ModelBundle, WindowScores, config_fingerprint
from monitor.config import Config, DetectorConfig
from monitor.exporter import DetectorView, EntityResult, Exposition, ModelInfo
from monitor.frames import EntityKey, Frame, entity_key, fetch_frame, fill_short_gaps, grid_floor
from monitor.history import History, place_frames
from monitor.persistence import load_latest, reset, save_bundle
from monitor.sharding import Shard
from monitor.source import PrometheusSource, QueryError
from monitor.training import NotEnoughData, Trainer, TrainingError, TrainingOutcome

logger = logging.getLogger(__name__)


class DetectorRuntime:
    def __init__(self, config: Config, detector: DetectorConfig, exposition: Exposition, shard: Shard,
                 stop_event: threading.Event | None = None):
        self.config = config
        self.detector = detector
        self.exposition = exposition
        self.metrics = exposition.metrics
        self.shard = shard
        self.stop_event = stop_event or threading.Event()
        self.folder = Path(config.storage.path) / detector.name
        self.source = PrometheusSource(
            config.prometheus, on_error=lambda reason: self.metrics.query_errors.labels(detector.name, reason).inc())
        self.history = History(self.folder / "history", list(detector.signals), detector.step, detector.train.range)

        self.bundle: ModelBundle | None = None
        self.state = "warming_up"
        self.model_info: ModelInfo | None = None
        self.buffer: Frame | None = None
        self.first_seen: dict[EntityKey, float] = {}
        self.last_seen: dict[EntityKey, float] = {}
        self.results: tuple[EntityResult, ...] = ()
        self._history_lock = threading.Lock()
        self._training = threading.Lock()
        self._backfilled: set[tuple[float, float]] = set()
        # Series that exist from the start let increase() see the first rejection or failure.
        for result in ("accepted", "rejected", "failed"):
            self.metrics.training_runs.labels(detector.name, result)

    # ---- model ---------------------------------------------------------------

    def load(self) -> None:
        """Load the last good model, so scoring starts before any training."""
        bundle = load_latest(self.folder, config_fingerprint(self.detector))
        if bundle is not None:
            self._serve(bundle)
        self.publish()

    def _serve(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self.state = "serving"
        meta = bundle.metadata
        excluded = meta.get("windows_excluded", {})
        self.model_info = ModelInfo(
            trained_at=float(meta.get("trained_at", 0.0)),
            training_duration=float(meta.get("training_duration", 0.0)),
            windows_used=int(meta.get("windows_used", 0)),
            windows_excluded=int(sum(excluded.values())) if isinstance(excluded, dict) else 0,
            condition_number=bundle.statistics.condition_number,
        )

    def publish(self) -> None:
        self.exposition.snapshot.publish(DetectorView(
            name=self.detector.name, state=self.state, train_interval=self.detector.train.every,
            results=self.results if self.bundle is not None else (), model=self.model_info))

    # ---- scoring -------------------------------------------------------------

    @contextmanager
    def _phase(self, phase: str):
        began = time.monotonic()
        try:
            yield
        finally:
            self.metrics.cycle_duration.labels(self.detector.name, phase).observe(time.monotonic() - began)

    def score_cycle(self, now: float | None = None) -> None:
        """Fetch the steps added since the last cycle, score every entity's latest window, publish."""
        now = time.time() if now is None else now
        end = grid_floor(now - self.detector.score.lag, self.detector.step)
        with self._phase("query"):
            new = self._fetch_new(end)
        if new is None:
            return

        self._remember(new, now)
        with self._history_lock:
            self.history.append(new)
        self._update_buffer(new, end)
        if self.bundle is not None:
            with self._phase("score"):
                self.results = self._score()
        self.publish()

    def _fetch_new(self, end: float) -> Frame | None:
        step = self.detector.step
        window = self.detector.window
        if self.buffer is not None and end <= self.buffer.end:
            return None
        if self.buffer is None or end - self.buffer.end > window * step:
            start = end - (window - 1) * step  # start-up or a gap: read one whole window
        else:
            start = self.buffer.end + step
        frame = fetch_frame(self.source, self.detector, start, end, series_hint=max(len(self.last_seen), 1))
        return self._own(frame)

    def _own(self, frame: Frame) -> Frame:
        """Keep only this shard's entities."""
        if self.shard.count == 1:
            return frame
        return frame.select(self.shard.owns)

    def _remember(self, frame: Frame, now: float) -> None:
        observed = ~np.all(np.isnan(frame.values), axis=(1, 2))
        for entity, seen in zip(frame.entities, observed):
            if seen:
                self.last_seen[entity] = now
                self.first_seen.setdefault(entity, now)
        expired = [e for e, t in self.last_seen.items() if t < now - self.detector.score.entity_ttl]
        for entity in expired:
            del self.last_seen[entity]
            self.first_seen.pop(entity, None)
        if expired:
            logger.info("detector %s: dropped %d entities not seen for %ss", self.detector.name, len(expired),
                        int(self.detector.score.entity_ttl))

    def _update_buffer(self, new: Frame, end: float) -> None:
        window = self.detector.window
        start = end - (window - 1) * self.detector.step
        frames = [new] if self.buffer is None else [self.buffer, new]
        merged = place_frames(frames, start, self.detector.step, window)
        alive = [i for i, e in enumerate(merged.entities) if e in self.last_seen]
        self.buffer = Frame(start, self.detector.step, [merged.entities[i] for i in alive], merged.values[alive])

    def _score(self) -> tuple[EntityResult, ...]:
        detector = self.detector
        buffer = self.buffer
        filled = fill_short_gaps(buffer.values, detector.score.fill_gaps)
        missing = np.isnan(filled).mean(axis=(1, 2))
        complete = missing <= detector.score.max_missing_fraction
        self._count_skipped(buffer, complete)
        if not complete.any():
            return ()

        rows = np.flatnonzero(complete)
        entities = [buffer.entities[i] for i in rows]
        scored = self.bundle.score_windows(entities, buffer.values[rows], buffer.timestamps,
                                           detector.score.aggregate_steps, detector.score.fill_gaps)
        return self._results(scored)

    def _count_skipped(self, buffer: Frame, complete: np.ndarray) -> None:
        window_start = buffer.start
        for entity, ok in zip(buffer.entities, complete):
            if ok:
                continue
            new_entity = self.first_seen.get(entity, 0.0) > window_start
            reason = "new_entity" if new_entity else "gaps"
            self.metrics.windows_skipped.labels(self.detector.name, reason).inc()

    def _results(self, scored: WindowScores) -> tuple[EntityResult, ...]:
        order = np.argsort(-scored.scores, kind="stable")
        top = set(order[: self.detector.score.top_contributions].tolist())
        signals = list(self.detector.signals)
        results = []
        for i in order:
            labels = tuple(zip(self.detector.entity_labels, scored.entities[i]))
            score = float(scored.scores[i])
            share = None
            if i in top or score > scored.threshold:
                share = tuple(zip(signals, (float(v) for v in scored.contributions[i])))
            results.append(EntityResult(labels, score, float(scored.threshold),
                                        float(scored.tail_probabilities[i]), share))
        return tuple(results)

    # ---- training ------------------------------------------------------------

    def train(self, now: float | None = None, reset_first: bool = False) -> TrainingOutcome | None:
        """Train from local history (backfilled from Prometheus where it has gaps); serve if accepted."""
        if not self._training.acquire(blocking=False):
            logger.info("detector %s: a training run is already in progress; skipped", self.detector.name)
            return None
        try:
            return self._train(time.time() if now is None else now, reset_first)
        finally:
            self._training.release()

    def _train(self, now: float, reset_first: bool) -> TrainingOutcome | None:
        name = self.detector.name
        if reset_first:
            reset(self.folder)
            self.bundle, self.state, self.model_info = None, "warming_up", None
        logger.info("detector %s: training started", name)
        try:
            frame = self.training_frame(now)
            outcome = Trainer(self.detector, self.stop_event.is_set).train(frame, self.bundle)
        except NotEnoughData as error:
            logger.info("detector %s: not trained yet: %s", name, error)
            return TrainingOutcome(False, None, str(error))
        except (TrainingError, QueryError) as error:
            logger.warning("detector %s: training failed: %s", name, error)
            self.metrics.training_runs.labels(name, "failed").inc()
            if self.bundle is None:
                self.state = "failed"
                self.publish()
            return TrainingOutcome(False, None, str(error))
        return self._adopt(outcome)

    def _adopt(self, outcome: TrainingOutcome) -> TrainingOutcome:
        name = self.detector.name
        if outcome.reason == "stopped":
            logger.info("detector %s: training abandoned at shutdown; the serving model is unchanged", name)
            return outcome
        if not outcome.accepted:
            logger.warning("detector %s: new model rejected, the current one keeps serving: %s", name, outcome.reason)
            self.metrics.training_runs.labels(name, "rejected" if outcome.bundle else "failed").inc()
            return outcome

        outcome.bundle.metadata["training_duration"] = outcome.duration
        save_bundle(self.folder, outcome.bundle)
        self._serve(outcome.bundle)
        self.metrics.training_runs.labels(name, "accepted").inc()
        logger.info("detector %s: model accepted after %.1fs: %d windows used, excluded %s, threshold %.4g (%s), "
                    "condition number %.3g", name, outcome.duration, outcome.windows_used, outcome.windows_excluded,
                    outcome.bundle.threshold.value, outcome.bundle.threshold.method,
                    outcome.bundle.statistics.condition_number)
        self.publish()
        return outcome

    def training_frame(self, now: float) -> Frame:
        """Read `train.range` from history, first backfilling runs of missing steps from Prometheus."""
        step = self.detector.step
        end = grid_floor(now - self.detector.score.lag, step)
        start = grid_floor(end - self.detector.train.range, step) + step
        with self._history_lock:
            frame = self.history.read(start, end)
        gaps = self._uncovered(frame)
        if gaps:
            known = set(frame.entities) | set(self.last_seen) or self._current_entities()
            sample = self._training_sample(known)
            for gap_start, gap_end in gaps:
                self._backfill(gap_start, gap_end, sample, series_count=len(known))
            with self._history_lock:
                frame = self.history.read(start, end)
        keep = self._training_sample(frame.entities)
        if keep is None:
            return frame
        return frame.select(keep.__contains__)

    def _current_entities(self) -> set[EntityKey]:
        """List this shard's entities with one instant query, to size and sample a cold backfill."""
        query = next(iter(self.detector.signals.values()))
        keys = {entity_key(series.labels, self.detector.entity_labels) for series in self.source.query_instant(query)}
        return {key for key in keys if key is not None and self.shard.owns(key)}

    def _uncovered(self, frame: Frame) -> list[tuple[float, float]]:
        """Runs of at least one window of steps in which no entity has any value."""
        covered = frame.covered_steps()
        runs, begin = [], None
        for index, is_covered in enumerate(np.append(covered, True)):
            if not is_covered and begin is None:
                begin = index
            elif is_covered and begin is not None:
                if index - begin >= self.detector.window:
                    runs.append((frame.start + begin * frame.step, frame.start + (index - 1) * frame.step))
                begin = None
        return [r for r in runs if r not in self._backfilled]

    def _backfill(self, start: float, end: float, keep: set[EntityKey] | None, series_count: int) -> None:
        name = self.detector.name
        logger.info("detector %s: backfilling %d steps from Prometheus for %s entities", name,
                    int((end - start) / self.detector.step) + 1, len(keep) if keep is not None else "all")
        self._backfilled.add((start, end))
        day = 86400.0
        chunk_start = start
        while chunk_start <= end:
            chunk_end = min(end, chunk_start + day - self.detector.step)
            # TODO: Prometheus still returns every entity, and only the sample is kept after
            # decoding. PromQL has no generic way to pass an entity list into any query.
            frame = self._own(fetch_frame(self.source, self.detector, chunk_start, chunk_end, keep=keep,
                                          series_hint=max(series_count, 1)))
            if frame.entities:
                with self._history_lock:
                    self.history.write_segment(frame)
            chunk_start = chunk_end + self.detector.step

    def _training_sample(self, entities) -> set[EntityKey] | None:
        """Pick at most `train.max_entities` entities by a stable hash, so each run reads the same ones."""
        limit = self.detector.train.max_entities
        if len(entities) <= limit:
            return None
        ranked = sorted(entities, key=lambda e: hashlib.sha256("\x00".join(e).encode()).digest())
        return set(ranked[:limit])

    def close(self) -> None:
        with self._history_lock:
            self.history.flush()
        self.source.close()
