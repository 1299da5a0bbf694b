"""The long-running service: detectors on an APScheduler schedule behind the metrics endpoint."""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import datetime, timedelta, timezone

import torch
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from monitor.config import Config
from monitor.detector import DetectorRuntime
from monitor.exporter import Exposition, MetricsServer
from monitor.sharding import Shard, resolve_index
from monitor.source import QueryError

logger = logging.getLogger(__name__)


class Service:
    def __init__(self, config: Config):
        self.config = config
        torch.set_num_threads(config.torch_threads)
        self.stop_event = threading.Event()
        self.exposition = Exposition()
        self.shard = Shard(resolve_index(config.shard), config.shard.count)
        self.exposition.metrics.shard.labels(str(self.shard.index), str(self.shard.count)).set(1)
        self.detectors = [DetectorRuntime(config, d, self.exposition, self.shard, self.stop_event)
                          for d in config.detectors]
        self.server = MetricsServer(self.exposition, config.listen)
        # Score jobs and train jobs get separate pools, so a long training never delays a score cycle.
        self.scheduler = BackgroundScheduler(
            timezone="UTC",
            executors={"score": ThreadPoolExecutor(max(2, len(self.detectors))),
                       "train": ThreadPoolExecutor(1)},
        )

    def start(self) -> None:
        self.server.start()
        for runtime in self.detectors:
            runtime.load()
        now = datetime.now(timezone.utc)
        for runtime in self.detectors:
            self._schedule(runtime, now)
        self.scheduler.start()
        logger.info("service started: %d detectors, shard %d of %d", len(self.detectors), self.shard.index, self.shard.count)

    def _schedule(self, runtime: DetectorRuntime, now: datetime) -> None:
        detector = runtime.detector
        score_every = detector.score.every
        train_every = detector.train.every
        self.scheduler.add_job(
            self._guarded(runtime, "score", runtime.score_cycle), "interval", seconds=score_every,
            id=f"score-{detector.name}", executor="score", max_instances=1, coalesce=True,
            misfire_grace_time=max(1, int(score_every)), next_run_time=now)
        # Without a model, train at once; with one, the first retraining waits a full interval.
        first_train = now if runtime.bundle is None else now + timedelta(seconds=train_every)
        self.scheduler.add_job(
            self._guarded(runtime, "train", runtime.train), "interval", seconds=train_every,
            id=f"train-{detector.name}", executor="train", max_instances=1, coalesce=True,
            misfire_grace_time=max(1, int(train_every)), next_run_time=first_train)
        # A detector without a model retries sooner than train.every, so a cold start does not
        # wait hours for its first model.
        retry = detector.train.warmup_retry
        self.scheduler.add_job(
            self._guarded(runtime, "train", lambda: runtime.bundle is None and runtime.train()), "interval",
            seconds=retry, id=f"warmup-{detector.name}", executor="train", max_instances=1, coalesce=True,
            misfire_grace_time=max(1, int(retry)), next_run_time=now + timedelta(seconds=retry))

    def _guarded(self, runtime: DetectorRuntime, kind: str, job):
        name = runtime.detector.name

        def run():
            if self.stop_event.is_set():
                return
            try:
                job()
            except QueryError as error:
                logger.warning("detector %s: %s job could not read Prometheus (%s): %s; retrying at the next interval",
                               name, kind, error.reason, error)
                if kind == "train":
                    runtime.metrics.training_runs.labels(name, "failed").inc()
            except Exception:  # noqa: BLE001 - the loop boundary: log, count and keep serving
                logger.exception("detector %s: %s job failed; it runs again at the next interval", name, kind)
                if kind == "train":
                    runtime.metrics.training_runs.labels(name, "failed").inc()

        return run

    def stop(self) -> None:
        logger.info("stopping: waiting for running scoring and training jobs")
        self.stop_event.set()
        self.scheduler.shutdown(wait=True)
        for runtime in self.detectors:
            runtime.close()
        self.server.stop()
        logger.info("stopped")

    def run_forever(self) -> None:
        done = threading.Event()

        def on_signal(number, _frame):
            logger.info("received %s", signal.Signals(number).name)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not done.wait(1.0):
            pass
        self.stop()
