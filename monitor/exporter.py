"""Expose scores as Prometheus metrics from immutable snapshots, plus /healthz and /readyz.

A score cycle builds a new `DetectorView` and swaps it in with one reference assignment, so a
scrape reads a consistent picture and never waits for a query or the model.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

from monitor import __version__

logger = logging.getLogger(__name__)

STATES = ("warming_up", "serving", "failed")

# `_created` series double every counter's cardinality and no rule or dashboard here reads them.
disable_created_metrics()


@dataclass(frozen=True)
class EntityResult:
    labels: tuple[tuple[str, str], ...]  # the detector's entity labels with their values
    score: float
    threshold: float
    tail_probability: float
    contributions: tuple[tuple[str, float], ...] | None  # None when not exported for this entity

    @property
    def detected(self) -> bool:
        return self.score > self.threshold

    @property
    def entity(self) -> str:
        return "/".join(value for _, value in self.labels)


@dataclass(frozen=True)
class ModelInfo:
    trained_at: float
    training_duration: float
    windows_used: int
    windows_excluded: int
    condition_number: float


@dataclass(frozen=True)
class DetectorView:
    name: str
    state: str
    train_interval: float
    results: tuple[EntityResult, ...] = ()
    model: ModelInfo | None = None


class Metrics:
    """Counters and histograms that accumulate across cycles, registered next to the snapshot."""

    def __init__(self, registry: CollectorRegistry):
        self.windows_skipped = Counter(
            "anomaly_monitor_windows_skipped", "Windows not scored, by reason.", ["detector", "reason"], registry=registry)
        self.query_errors = Counter(
            "anomaly_monitor_query_errors", "Failed Prometheus queries, by reason.", ["detector", "reason"], registry=registry)
        self.training_runs = Counter(
            "anomaly_monitor_training_runs", "Training runs, by result.", ["detector", "result"], registry=registry)
        self.cycle_duration = Histogram(
            "anomaly_monitor_cycle_duration_seconds", "Duration of one scoring cycle, per phase.",
            ["detector", "phase"], registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.shard = Gauge("anomaly_monitor_shard", "The shard this replica serves.", ["index", "count"], registry=registry)
        self.build_info = Gauge("anomaly_monitor_build_info", "Build information.", ["version"], registry=registry)
        self.build_info.labels(__version__).set(1)


def _finite(value: float) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class SnapshotCollector:
    """A prometheus_client collector that renders the current detector views."""

    def __init__(self):
        self._views: dict[str, DetectorView] = {}
        self._lock = threading.Lock()

    def publish(self, view: DetectorView) -> None:
        with self._lock:
            views = dict(self._views)
            views[view.name] = view
            self._views = views

    def views(self) -> dict[str, DetectorView]:
        return self._views

    def collect(self):
        views = self._views
        yield from _entity_metrics(views)
        yield from _detector_metrics(views)

    def describe(self):
        return []


def _gauge(name: str, documentation: str) -> Metric:
    return Metric(name, documentation, "gauge")


def _entity_metrics(views: dict[str, DetectorView]):
    score = _gauge("anomaly_score", "Window score: mean Mahalanobis d² of reconstruction errors over the scored steps.")
    threshold = _gauge("anomaly_threshold", "Current score threshold for the entity.")
    detected = _gauge("anomaly_detected", "1 when the score exceeds the threshold, else 0.")
    tail = _gauge("anomaly_tail_probability", "Probability of a score at least this high under normal behaviour.")
    contribution = _gauge("anomaly_signal_contribution", "Share of the score per signal; sums to 1 per entity.")

    for view in views.values():
        for result in view.results:
            labels = {"detector": view.name, **dict(result.labels), "entity": result.entity}
            values = (result.score, result.threshold, result.tail_probability)
            if any(_finite(v) is None for v in values):
                continue
            score.add_sample("anomaly_score", labels, result.score)
            threshold.add_sample("anomaly_threshold", labels, result.threshold)
            detected.add_sample("anomaly_detected", labels, 1.0 if result.detected else 0.0)
            tail.add_sample("anomaly_tail_probability", labels, result.tail_probability)
            for signal, share in result.contributions or ():
                if _finite(share) is not None:
                    contribution.add_sample("anomaly_signal_contribution", {**labels, "signal": signal}, share)
    yield from (score, threshold, detected, tail, contribution)


def _detector_metrics(views: dict[str, DetectorView]):
    trained = _gauge("anomaly_model_trained_timestamp_seconds", "When the serving model was trained (Unix seconds).")
    duration = _gauge("anomaly_model_training_duration_seconds", "How long training the serving model took.")
    windows = _gauge("anomaly_model_training_windows", "Windows used and excluded when training the serving model.")
    condition = _gauge("anomaly_model_covariance_condition_number", "Condition number of the error covariance.")
    state = _gauge("anomaly_detector_state", "1 for the detector's current state.")
    interval = _gauge("anomaly_detector_train_interval_seconds", "Configured training interval.")

    for view in views.values():
        labels = {"detector": view.name}
        for name in STATES:
            state.add_sample("anomaly_detector_state", {**labels, "state": name}, 1.0 if view.state == name else 0.0)
        interval.add_sample("anomaly_detector_train_interval_seconds", labels, view.train_interval)
        model = view.model
        if model is None:
            continue
        trained.add_sample("anomaly_model_trained_timestamp_seconds", labels, model.trained_at)
        duration.add_sample("anomaly_model_training_duration_seconds", labels, model.training_duration)
        windows.add_sample("anomaly_model_training_windows", {**labels, "set": "used"}, model.windows_used)
        windows.add_sample("anomaly_model_training_windows", {**labels, "set": "excluded"}, model.windows_excluded)
        if _finite(model.condition_number) is not None:
            condition.add_sample("anomaly_model_covariance_condition_number", labels, model.condition_number)
    yield from (trained, duration, windows, condition, state, interval)


@dataclass
class Exposition:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    snapshot: SnapshotCollector = field(default_factory=SnapshotCollector)

    def __post_init__(self):
        self.registry.register(self.snapshot)
        self.metrics = Metrics(self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Handler(BaseHTTPRequestHandler):
    exposition: Exposition
    server_version = "anomaly-monitor"

    def do_GET(self):  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.exposition.render(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n")
        elif path == "/readyz":
            self._send(200, b"ready\n")
        elif path == "/":
            self._send(200, b"anomaly-monitor: see /metrics, /healthz, /readyz\n")
        else:
            self._send(404, f"not found: {path}; use /metrics, /healthz or /readyz\n".encode())

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def _reject_method(self):
        self._send(405, f"method {self.command} not allowed; use GET\n".encode(), extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _reject_method

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", extra=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - scrapes every few seconds would flood the log
        logger.debug("%s %s", self.address_string(), format % args)


class MetricsServer:
    """The HTTP endpoint, served from a daemon thread so it never blocks shutdown."""

    def __init__(self, exposition: Exposition, listen: str):
        host, _, port = listen.rpartition(":")
        handler = type("Handler", (_Handler,), {"exposition": exposition})
        self.httpd = ThreadingHTTPServer((host.strip("[]"), int(port)), handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    def start(self) -> None:
        self._thread.start()
        logger.info("serving /metrics, /healthz and /readyz on %s:%d", *self.address)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
