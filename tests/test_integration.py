"""End to end on real components: node-exporter -> Prometheus -> service -> Prometheus.

The tests share one stack and one trained model, and run in file order: the burn, then a
restart, then a Prometheus outage.
"""

from __future__ import annotations

import multiprocessing
import re
import time

import pytest
import requests

pytestmark = pytest.mark.integration


def _spin(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def burn_cpu(seconds: float, workers: int = 2) -> list[multiprocessing.Process]:
    processes = [multiprocessing.Process(target=_spin, args=(seconds,)) for _ in range(workers)]
    for process in processes:
        process.start()
    return processes


def margin(stack, instance: str) -> float | None:
    """Score minus threshold for the entity, as Prometheus scraped them; None if absent."""
    selector = f'{{detector="node",instance="{instance}"}}'
    result = stack.query(f"anomaly_score{selector} - anomaly_threshold{selector}")
    return float(result[0]["value"][1]) if result else None


def wait_for(condition, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    return None


class MarginLog:
    """Poll score minus threshold and keep every value, so a failure shows the trace."""

    def __init__(self, stack, instance: str):
        self.stack = stack
        self.instance = instance
        self.values: list[float | None] = []

    def read(self) -> float | None:
        value = margin(self.stack, self.instance)
        self.values.append(None if value is None else round(value, 2))
        return value

    def below(self) -> bool:
        """True once the score no longer exceeds the threshold (anomaly_detected would be 0)."""
        value = self.read()
        return value is not None and value <= 0

    def above(self) -> bool:
        value = self.read()
        return value is not None and value > 0


def metric_value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_cpu_burn_crosses_threshold_and_recovers(node_stack, node_service):
    log = MarginLog(node_stack, node_stack.node_target)
    assert wait_for(log.below, timeout=90), f"the score never settled below its threshold: {log.values}"

    workers = burn_cpu(30)
    peak = wait_for(log.above, timeout=40)
    for worker in workers:
        worker.join()
    assert peak, f"anomaly_score never exceeded anomaly_threshold in Prometheus during the burn: {log.values}"

    recovered = wait_for(log.below, timeout=120)
    assert recovered, f"anomaly_score did not return below anomaly_threshold after the burn: {log.values}"


def pages(webhook, status: str, since: int) -> list[dict]:
    return [
        alert
        for receiver, body in webhook.notifications[since:]
        if receiver == "pager"
        for alert in body["alerts"]
        if alert["status"] == status and alert["labels"]["alertname"] == "AnomalyMonitorEntityHighlyAnomalous"
    ]


def test_anomaly_pages_and_resolves(node_stack, node_service):
    log = MarginLog(node_stack, node_stack.node_target)
    assert wait_for(log.below, timeout=120), f"the score never settled below its threshold: {log.values}"
    webhook = node_stack.webhook
    quiet = wait_for(lambda: not node_stack.query('ALERTS{alertname=~"AnomalyMonitorEntity.*"}'), timeout=120)
    assert quiet, "entity alerts from an earlier test never resolved"
    since = len(webhook.notifications)

    workers = burn_cpu(30)
    fired = wait_for(lambda: pages(webhook, "firing", since), timeout=60)
    for worker in workers:
        worker.join()
    assert fired, f"no page reached the receiver; notifications: {webhook.notifications[since:]}"

    # Every node-exporter runs on this machine, so the burn makes each entity anomalous.
    description = fired[0]["annotations"]["description"]
    entity = fired[0]["labels"]["entity"]
    assert entity in node_stack.node_targets
    assert f"Entity {entity} " in description
    assert re.search(r"Top signal: (cpu|cpu_user) \(", description), description
    assert fired[0]["labels"]["severity"] == "critical"

    resolved = wait_for(lambda: pages(webhook, "resolved", since), timeout=180)
    assert resolved, f"no resolved notification after the anomaly ended: {log.values}"


def test_cpu_burn_names_cpu_signal(node_stack, node_service):
    workers = burn_cpu(20)
    top = wait_for(lambda: node_stack.query(
        'topk(1, anomaly_signal_contribution{detector="node"}) and on(instance) (anomaly_detected == 1)'), timeout=30)
    for worker in workers:
        worker.join()
    assert top, "no contribution series while the entity was over its threshold"
    assert top[0]["metric"]["signal"] in {"cpu", "cpu_user"}


def test_restart_serves_saved_model(node_stack, node_service):
    before = metric_value(node_service.metrics(), "anomaly_model_trained_timestamp_seconds", detector="node")
    assert before is not None

    assert node_service.stop() == 0
    node_service.start()
    scored = wait_for(lambda: metric_value(node_service.metrics(), "anomaly_score", detector="node") is not None,
                      timeout=30)
    after = metric_value(node_service.metrics(), "anomaly_model_trained_timestamp_seconds", detector="node")
    assert scored, "no anomaly_score after the restart"
    assert after == before, "the restarted service did not serve the saved model"
    assert "loaded model" in node_service.log.read_text()


def score_cycles(service) -> float:
    return metric_value(service.metrics(), "anomaly_monitor_cycle_duration_seconds_count",
                        detector="node", phase="score") or 0.0


def test_prometheus_outage_is_survived(node_stack, node_service):
    node_stack.stack.processes["prometheus"].stop()
    try:
        errors = wait_for(lambda: metric_value(node_service.metrics(), "anomaly_monitor_query_errors_total",
                                               detector="node", reason="connection"), timeout=30)
        assert errors, "query errors were not counted while Prometheus was down"
        assert metric_value(node_service.metrics(), "anomaly_detector_state", detector="node", state="serving") == 1
        assert metric_value(node_service.metrics(), "anomaly_score", detector="node") is not None
        during = score_cycles(node_service)
        time.sleep(3)
        assert score_cycles(node_service) == during, "score cycles ran while Prometheus was down"
    finally:
        node_stack.stack.restart_prometheus()

    assert wait_for(lambda: score_cycles(node_service) > during, timeout=60), "scoring did not resume"
    fresh = wait_for(lambda: node_stack.query('time() - timestamp(anomaly_score{detector="node"}) < 5'), timeout=60)
    assert fresh, "scores did not reach Prometheus again after the outage"


def run_dashboard_query(stack, query) -> list:
    if query.kind == "series":
        response = requests.get(f"{stack.prometheus_url}/api/v1/series", params={"match[]": query.expr}, timeout=10)
        return response.json()["data"]
    end = time.time()
    response = requests.get(f"{stack.prometheus_url}/api/v1/query_range", timeout=10, params={
        "query": query.expr, "start": end - 600, "end": end, "step": 5})
    body = response.json()
    assert body["status"] == "success", f"{query.dashboard} {query.source}: {body}"
    return body["data"]["result"]


def test_dashboard_queries_return_data(node_stack, node_service):
    from test_dashboards import DASHBOARD_FILES, DEFAULT_VARIABLES, extract_queries, load_dashboard

    values = {**DEFAULT_VARIABLES, "entity": node_stack.node_target, "__rate_interval": "30s", "__range": "10m",
              "__range_s": "600", "__range_ms": "600000"}
    empty = []
    for path in DASHBOARD_FILES:
        for query in extract_queries(load_dashboard(path), values):
            if not run_dashboard_query(node_stack, query):
                empty.append(f"{query.dashboard} {query.source}: {query.expr}")
    assert not empty, "queries that returned no data:\n" + "\n".join(empty)


def test_backtest_scores_recent_range(node_stack, node_service, tmp_path):
    from conftest import run_cli

    result = run_cli("backtest", "--config", str(node_service.config_file), "--from", "now-3m", "--to", "now",
                     "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr

    rows = (tmp_path / "node.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:3] == ["timestamp", "time", "instance"]
    assert len(rows) > 100, "fewer scored windows than 3 minutes at a 1 s step should give"
    assert any(row.split(",")[header.index("detected")] == "1" for row in rows[1:]), "the burns left no detection"
    summary = (tmp_path / "summary.md").read_text()
    assert "| node |" in summary
