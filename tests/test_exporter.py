"""The /metrics exposition, which entities get contributions, and the HTTP endpoints."""

from __future__ import annotations

import contextlib
import math
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from fixtures_unit import detector_config, normal_values, synthetic_frame, train_bundle
from monitor import __version__
from monitor.bundle import WindowScores
from monitor.config import Config
from monitor.detector import DetectorRuntime
from monitor.exporter import DetectorView, EntityResult, Exposition, MetricsServer, ModelInfo
from monitor.frames import Frame
from monitor.sharding import Shard


def node(name: str) -> tuple[tuple[str, str], ...]:
    return (("instance", name),)


KNOWN_VIEW = DetectorView(
    name="node",
    state="serving",
    train_interval=21600.0,
    results=(
        EntityResult(node("node-a:9100"), 12.5, 10.0, 0.0005, (("cpu", 0.75), ("memory", 0.25))),
        EntityResult(node("node-b:9100"), 2.0, 10.0, 0.5, None),
    ),
    model=ModelInfo(trained_at=1700000000.0, training_duration=3.5, windows_used=900, windows_excluded=12,
                    condition_number=123.25),
)

KNOWN_TEXT = f"""\
# HELP anomaly_score Window score: mean Mahalanobis d² of reconstruction errors over the scored steps.
# TYPE anomaly_score gauge
anomaly_score{{detector="node",entity="node-a:9100",instance="node-a:9100"}} 12.5
anomaly_score{{detector="node",entity="node-b:9100",instance="node-b:9100"}} 2.0
# HELP anomaly_threshold Current score threshold for the entity.
# TYPE anomaly_threshold gauge
anomaly_threshold{{detector="node",entity="node-a:9100",instance="node-a:9100"}} 10.0
anomaly_threshold{{detector="node",entity="node-b:9100",instance="node-b:9100"}} 10.0
# HELP anomaly_detected 1 when the score exceeds the threshold, else 0.
# TYPE anomaly_detected gauge
anomaly_detected{{detector="node",entity="node-a:9100",instance="node-a:9100"}} 1.0
anomaly_detected{{detector="node",entity="node-b:9100",instance="node-b:9100"}} 0.0
# HELP anomaly_tail_probability Probability of a score at least this high under normal behaviour.
# TYPE anomaly_tail_probability gauge
anomaly_tail_probability{{detector="node",entity="node-a:9100",instance="node-a:9100"}} 0.0005
anomaly_tail_probability{{detector="node",entity="node-b:9100",instance="node-b:9100"}} 0.5
# HELP anomaly_signal_contribution Share of the score per signal; sums to 1 per entity.
# TYPE anomaly_signal_contribution gauge
anomaly_signal_contribution{{detector="node",entity="node-a:9100",instance="node-a:9100",signal="cpu"}} 0.75
anomaly_signal_contribution{{detector="node",entity="node-a:9100",instance="node-a:9100",signal="memory"}} 0.25
# HELP anomaly_model_trained_timestamp_seconds When the serving model was trained (Unix seconds).
# TYPE anomaly_model_trained_timestamp_seconds gauge
anomaly_model_trained_timestamp_seconds{{detector="node"}} 1.7e+09
# HELP anomaly_model_training_duration_seconds How long training the serving model took.
# TYPE anomaly_model_training_duration_seconds gauge
anomaly_model_training_duration_seconds{{detector="node"}} 3.5
# HELP anomaly_model_training_windows Windows used and excluded when training the serving model.
# TYPE anomaly_model_training_windows gauge
anomaly_model_training_windows{{detector="node",set="used"}} 900.0
anomaly_model_training_windows{{detector="node",set="excluded"}} 12.0
# HELP anomaly_model_covariance_condition_number Condition number of the error covariance.
# TYPE anomaly_model_covariance_condition_number gauge
anomaly_model_covariance_condition_number{{detector="node"}} 123.25
# HELP anomaly_detector_state 1 for the detector's current state.
# TYPE anomaly_detector_state gauge
anomaly_detector_state{{detector="node",state="warming_up"}} 0.0
anomaly_detector_state{{detector="node",state="serving"}} 1.0
anomaly_detector_state{{detector="node",state="failed"}} 0.0
# HELP anomaly_detector_train_interval_seconds Configured training interval.
# TYPE anomaly_detector_train_interval_seconds gauge
anomaly_detector_train_interval_seconds{{detector="node"}} 21600.0
# HELP anomaly_monitor_windows_skipped_total Windows not scored, by reason.
# TYPE anomaly_monitor_windows_skipped_total counter
# HELP anomaly_monitor_query_errors_total Failed Prometheus queries, by reason.
# TYPE anomaly_monitor_query_errors_total counter
# HELP anomaly_monitor_training_runs_total Training runs, by result.
# TYPE anomaly_monitor_training_runs_total counter
# HELP anomaly_monitor_cycle_duration_seconds Duration of one scoring cycle, per phase.
# TYPE anomaly_monitor_cycle_duration_seconds histogram
# HELP anomaly_monitor_shard The shard this replica serves.
# TYPE anomaly_monitor_shard gauge
# HELP anomaly_monitor_build_info Build information.
# TYPE anomaly_monitor_build_info gauge
anomaly_monitor_build_info{{version="{__version__}"}} 1.0
"""


def samples(exposition: Exposition, name: str) -> list:
    text = exposition.render().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_known_snapshot_exact_text():
    exposition = Exposition()
    exposition.snapshot.publish(KNOWN_VIEW)

    assert exposition.render().decode() == KNOWN_TEXT


def test_warming_up_detector_exports_state_only():
    exposition = Exposition()
    exposition.snapshot.publish(DetectorView(name="pods", state="warming_up", train_interval=3600.0))
    states = {s.labels["state"]: s.value for s in samples(exposition, "anomaly_detector_state")}

    assert states == {"warming_up": 1.0, "serving": 0.0, "failed": 0.0}
    assert samples(exposition, "anomaly_score") == []
    assert samples(exposition, "anomaly_model_trained_timestamp_seconds") == []


@pytest.mark.parametrize("field", ["score", "threshold", "tail_probability"])
def test_nan_result_left_out(field: str):
    values = {"score": 3.0, "threshold": 10.0, "tail_probability": 0.2, field: math.nan}
    view = DetectorView("node", "serving", 3600.0, results=(
        EntityResult(node("nan"), contributions=(("cpu", 1.0),), **values),
        EntityResult(node("fine"), 1.0, 10.0, 0.5, (("cpu", 1.0),)),
    ))
    exposition = Exposition()
    exposition.snapshot.publish(view)
    text = exposition.render().decode()

    assert 'instance="nan"' not in text
    assert 'instance="fine"' in text


def test_no_nan_anywhere():
    view = DetectorView("node", "serving", 3600.0, results=(
        EntityResult(node("a"), math.nan, 10.0, 0.5, (("cpu", math.nan),)),
        EntityResult(node("b"), 11.0, 10.0, 0.01, (("cpu", math.nan), ("memory", 1.0))),
        EntityResult(node("c"), 1.0, math.inf, 0.9, None),
    ), model=ModelInfo(1.0, 1.0, 1, 0, math.nan))
    exposition = Exposition()
    exposition.snapshot.publish(view)
    text = exposition.render().decode()
    values = [s.value for family in text_string_to_metric_families(text) for s in family.samples]

    assert all(math.isfinite(v) for v in values)
    assert 'signal="memory"' in text
    assert 'signal="cpu"' not in text


def test_counters_without_created_series():
    exposition = Exposition()
    exposition.metrics.query_errors.labels("node", "timeout").inc()
    text = exposition.render().decode()

    assert 'anomaly_monitor_query_errors_total{detector="node",reason="timeout"} 1.0' in text
    assert "_created" not in text


def test_publish_replaces_only_that_detector():
    exposition = Exposition()
    exposition.snapshot.publish(KNOWN_VIEW)
    exposition.snapshot.publish(DetectorView("pods", "warming_up", 3600.0))
    exposition.snapshot.publish(DetectorView("node", "failed", 21600.0))

    assert sorted(exposition.snapshot.views()) == ["node", "pods"]
    assert exposition.snapshot.views()["node"].state == "failed"


# ---- which entities get contributions --------------------------------------------------------


def runtime_for(tmp_path, top_contributions: int) -> DetectorRuntime:
    detector = detector_config(score={"top_contributions": top_contributions})
    config = Config.model_validate({"storage": {"path": str(tmp_path)}, "detectors": [detector.model_dump()]})
    return DetectorRuntime(config, config.detectors[0], Exposition(), Shard(0, 1))


def scored_four() -> WindowScores:
    """Scores of four entities against threshold 10: only node-c (12) is over it."""
    return WindowScores(
        entities=[("node-a",), ("node-b",), ("node-c",), ("node-d",)],
        scores=np.array([9.0, 1.0, 12.0, 0.5]),
        tail_probabilities=np.array([0.02, 0.6, 0.001, 0.8]),
        contributions=np.full((4, 3), 1.0 / 3.0),
        threshold=10.0,
    )


def with_contributions(results) -> list[str]:
    return sorted(r.entity for r in results if r.contributions is not None)


def test_contributions_for_top_entities(tmp_path):
    runtime = runtime_for(tmp_path, top_contributions=2)
    results = runtime._results(scored_four())
    runtime.close()

    assert with_contributions(results) == ["node-a", "node-c"]


def test_contributions_for_detected_beyond_top(tmp_path):
    runtime = runtime_for(tmp_path, top_contributions=0)
    results = runtime._results(scored_four())
    runtime.close()

    assert with_contributions(results) == ["node-c"]


def test_results_keep_every_entity(tmp_path):
    runtime = runtime_for(tmp_path, top_contributions=0)
    results = runtime._results(scored_four())
    runtime.close()

    assert [r.entity for r in results] == ["node-c", "node-a", "node-b", "node-d"]
    assert [r.detected for r in results] == [True, False, False, False]


@pytest.fixture(scope="module")
def bundle():
    return train_bundle()


def test_score_cycle_exports_bounded_contributions(tmp_path, bundle):
    runtime = runtime_for(tmp_path, top_contributions=1)
    window = detector_config().window
    values = normal_values(steps=window, seed=11)
    values[2, -4:, 1] += 3.0  # node-c's memory jumps in the scored steps
    runtime.buffer = Frame(synthetic_frame().start, 60.0, [("node-a",), ("node-b",), ("node-c",)], values)
    runtime.bundle = bundle
    runtime.state = "serving"
    runtime.results = runtime._score()
    runtime.publish()
    runtime.close()
    shares = samples(runtime.exposition, "anomaly_signal_contribution")

    assert {s.labels["entity"] for s in shares} == {"node-c"}
    assert max(shares, key=lambda s: s.value).labels["signal"] == "memory"
    assert sum(s.value for s in shares) == pytest.approx(1.0)
    assert len(samples(runtime.exposition, "anomaly_score")) == 3


# ---- HTTP endpoints ----------------------------------------------------------------------------


@contextlib.contextmanager
def serving(view: DetectorView):
    exposition = Exposition()
    exposition.snapshot.publish(view)
    metrics_server = MetricsServer(exposition, "127.0.0.1:0")
    metrics_server.start()
    try:
        yield metrics_server
    finally:
        metrics_server.stop()


@pytest.fixture(scope="module")
def server():
    """One server for the tests that only read; stopping it waits for its 0.5 s poll."""
    with serving(KNOWN_VIEW) as metrics_server:
        yield metrics_server


def fetch(server: MetricsServer, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    host, port = server.address
    request = urllib.request.Request(f"http://{host}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_metrics_endpoint(server):
    status, headers, body = fetch(server, "/metrics")

    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert body.decode() == KNOWN_TEXT


@pytest.mark.parametrize("path, text", [("/healthz", b"ok\n"), ("/readyz", b"ready\n")])
def test_health_endpoints(server, path: str, text: bytes):
    status, _, body = fetch(server, path)

    assert status == 200
    assert body == text


def test_unknown_path_404(server):
    status, _, body = fetch(server, "/metricz")

    assert status == 404
    assert b"/metricz" in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_405(server, method: str):
    status, headers, _ = fetch(server, "/metrics", method=method)

    assert status == 405
    assert headers["Allow"] == "GET, HEAD"


def test_head_has_no_body(server):
    status, headers, body = fetch(server, "/metrics", method="HEAD")

    assert status == 200
    assert body == b""
    assert int(headers["Content-Length"]) == len(KNOWN_TEXT.encode())


def test_scrape_during_publish_sees_whole_views():
    # Publishing swaps whole views; every scrape must see one view or the other, never a mix.
    other = DetectorView("node", "failed", 21600.0)
    stop = threading.Event()
    with serving(KNOWN_VIEW) as server:
        snapshot = server.httpd.RequestHandlerClass.exposition.snapshot

        def flip():
            while not stop.is_set():
                snapshot.publish(other)
                snapshot.publish(KNOWN_VIEW)

        flipper = threading.Thread(target=flip, daemon=True)
        flipper.start()
        bodies = [fetch(server, "/metrics")[2].decode() for _ in range(20)]
        stop.set()
        flipper.join()
    score_lines = [body.count("\nanomaly_score{") for body in bodies]
    serving_states = ['state="serving"} 1.0' in body for body in bodies]

    assert all(count == (2 if is_serving else 0) for count, is_serving in zip(score_lines, serving_states))
