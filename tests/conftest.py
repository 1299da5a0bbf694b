"""Session fixtures: one real Prometheus stack and one trained model, shared by the tests that need them."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import subprocess
import sys
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml

from monitor.localstack import LocalStack, MissingBinary, find_binary, free_port, scrape_job, wait_ready

# Seconds of real node metrics gathered before the session's model is trained.
GATHER_SECONDS = 110
# Three node-exporters give the node detector three entities, enough to split across shards.
NODE_EXPORTERS = 3

# Two quiet minutes are too little to learn the spread of a live machine's metrics: the few
# per cent of CPU that the restarted service and the polling tests add would rightly look
# anomalous. Rounding to half a machine keeps the pipeline whole while only a real burn moves
# the signals.
NODE_SIGNALS = {
    "cpu": 'round(1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[3s])), 0.5)',
    "cpu_user": 'round(avg by (instance) (rate(node_cpu_seconds_total{mode="user"}[3s])), 0.5)',
}


def require_binaries(*names: str) -> None:
    try:
        for name in names:
            find_binary(name)
    except MissingBinary as error:
        pytest.skip(str(error))


REPOSITORY = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items):
    # A stable sort keeps the collected order within each group.
    items.sort(key=lambda item: item.get_closest_marker("runs_last") is not None)


# The shipped rules wait minutes; the end-to-end copy keeps their logic at a 1 s scrape.
FAST_RULES = [
    (r"\[3m\]", "[15s]"),
    (r"for: 5m", "for: 5s"),
    (r"for: 10m", "for: 8s"),
    (r"keep_firing_for: 10m", "keep_firing_for: 5s"),
]


def fast_rules(target: Path) -> Path:
    text = (REPOSITORY / "rules" / "anomaly-monitor.rules.yml").read_text()
    for pattern, replacement in FAST_RULES:
        text = re.sub(pattern, replacement, text)
    target.write_text(text)
    return target


def fast_alertmanager_config(target: Path, webhook: str) -> Path:
    config = yaml.safe_load((REPOSITORY / "rules" / "alertmanager.yml").read_text())
    config["route"].update(group_wait="1s", group_interval="2s")
    for route in config["route"]["routes"]:
        route.update(group_wait="1s", group_interval="2s")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"{webhook}/{receiver['name']}"
    target.write_text(yaml.safe_dump(config))
    return target


class WebhookReceiver:
    """Records what Alertmanager posts: (path, body) pairs, path being the receiver's name."""

    def __init__(self):
        self.notifications: list[tuple[str, dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.notifications.append((self.path.strip("/"), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class NodeStack:
    stack: LocalStack
    node_target: str
    service_port: int
    prometheus_url: str
    started: float
    webhook: WebhookReceiver | None = field(default=None)
    # Every node-exporter is an entity of the node detector; node_target is the first.
    node_targets: list[str] = field(default_factory=list)

    def query(self, expression: str) -> list[dict]:
        response = requests.get(f"{self.prometheus_url}/api/v1/query", params={"query": expression}, timeout=10)
        response.raise_for_status()
        return response.json()["data"]["result"]


@pytest.fixture(scope="session")
def node_stack(tmp_path_factory) -> NodeStack:
    require_binaries("prometheus", "node-exporter", "alertmanager")
    work = tmp_path_factory.mktemp("stack")
    stack = LocalStack(work)
    webhook = WebhookReceiver()
    try:
        nodes = [stack.start_node_exporter(f"node-exporter-{i}") for i in range(NODE_EXPORTERS)]
        alertmanager = stack.start_alertmanager(fast_alertmanager_config(work / "alertmanager.yml", webhook.url))
        service_port = free_port()
        prometheus = stack.start_prometheus([
            scrape_job("node", nodes),
            scrape_job("anomaly-monitor", [f"127.0.0.1:{service_port}"], honor_labels=True),
        ], interval="1s", rule_files=[str(fast_rules(work / "rules.yml"))], alertmanagers=[alertmanager])
        yield NodeStack(stack, nodes[0], service_port, prometheus, time.time(), webhook, nodes)
    finally:
        stack.stop()
        webhook.stop()


def node_config(stack: NodeStack, storage: Path, train_every: str = "1h", port: int | None = None) -> dict:
    return {
        "prometheus": {"url": stack.prometheus_url, "timeout": "5s", "retries": 1, "retry_backoff": "200ms"},
        "listen": f"127.0.0.1:{port or stack.service_port}",
        "storage": {"path": str(storage)},
        "detectors": [{
            "name": "node",
            "entity_labels": ["instance"],
            "step": "1s",
            "window": 10,
            "signals": NODE_SIGNALS,
            "model": {"hidden_size": 16, "latent_size": 8},
            # Wider validation and held-out shares than the defaults, because 105 steps of 1 s
            # give only a few windows to each.
            "train": {"range": f"{GATHER_SECONDS - 5}s", "every": train_every, "min_windows": 20,
                      "epochs": 40, "patience": 5, "validation_fraction": 0.2, "holdout_fraction": 0.3},
            "score": {"every": "1s", "aggregate_steps": 5, "lag": "2s", "entity_ttl": "5m"},
            "threshold": {"method": "quantile", "false_alarm_rate": 0.01},
        }],
    }


class ServiceProcess:
    """`anomaly-monitor run` in a subprocess, as an operator would start it."""

    def __init__(self, config_file: Path, port: int, log: Path):
        self.config_file = config_file
        self.port = port
        self.log = log
        self.popen: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        handle = open(self.log, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "--config", str(self.config_file)],
            stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        handle.close()
        wait_ready(f"{self.url}/healthz", timeout=60, process=self.popen)

    def stop(self) -> int:
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else 0
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    def metrics(self) -> str:
        return requests.get(f"{self.url}/metrics", timeout=10).text


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _poll_like_tests(stack: NodeStack, stop: threading.Event) -> None:
    """Query Prometheus every second, as the tests later do, so that load is part of normal."""
    while not stop.wait(1.0):
        try:
            stack.query('anomaly_score{detector="node"} - anomaly_threshold{detector="node"}')
        except requests.RequestException:
            pass


@pytest.fixture(scope="session")
def node_service(node_stack, tmp_path_factory):
    """Start the service with a model that `anomaly-monitor train` fitted on gathered metrics.

    The service already runs while the metrics are gathered, so its own load is learnt as
    normal. A restart then loads the model.
    """
    folder = tmp_path_factory.mktemp("node-service")
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump(node_config(node_stack, folder / "storage")))
    service = ServiceProcess(config_file, node_stack.service_port, folder / "service.log")
    service.start()
    polling = threading.Event()
    poller = threading.Thread(target=_poll_like_tests, args=(node_stack, polling), daemon=True)
    poller.start()
    try:
        remaining = node_stack.started + GATHER_SECONDS - time.time()
        if remaining > 0:
            time.sleep(remaining)
        polling.set()
        result = run_cli("train", "--config", str(config_file))
        assert result.returncode == 0, f"train failed:\n{result.stdout}\n{result.stderr}"
        service.stop()
        service.start()
        yield service
    finally:
        service.stop()
