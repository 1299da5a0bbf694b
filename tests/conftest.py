"""Session fixtures: one real Prometheus stack and one trained model, shared by the tests that need them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from monitor.localstack import LocalStack, MissingBinary, find_binary, free_port, scrape_job, wait_ready

# Seconds of real node metrics gathered before the session's model is trained.
GATHER_SECONDS = 110

NODE_SIGNALS = {
    "cpu": '1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[3s]))',
    "context_switches": "sum by (instance) (rate(node_context_switches_total[3s]))",
    "memory": "1 - node_memory_MemAvailable_bytes / node_memory_MemTotal_bytes",
    "processes_running": "node_procs_running",
}


def require_binaries(*names: str) -> None:
    try:
        for name in names:
            find_binary(name)
    except MissingBinary as error:
        pytest.skip(str(error))


@dataclass
class NodeStack:
    stack: LocalStack
    node_target: str
    service_port: int
    prometheus_url: str
    started: float

    def query(self, expression: str) -> list[dict]:
        response = requests.get(f"{self.prometheus_url}/api/v1/query", params={"query": expression}, timeout=10)
        response.raise_for_status()
        return response.json()["data"]["result"]


@pytest.fixture(scope="session")
def node_stack(tmp_path_factory) -> NodeStack:
    require_binaries("prometheus", "node-exporter")
    work = tmp_path_factory.mktemp("stack")
    stack = LocalStack(work)
    try:
        node = stack.start_node_exporter()
        service_port = free_port()
        prometheus = stack.start_prometheus([
            scrape_job("node", [node]),
            scrape_job("anomaly-monitor", [f"127.0.0.1:{service_port}"], honor_labels=True),
        ], interval="1s")
        yield NodeStack(stack, node, service_port, prometheus, time.time())
    finally:
        stack.stop()


def node_config(stack: NodeStack, storage: Path, train_every: str = "1h") -> dict:
    return {
        "prometheus": {"url": stack.prometheus_url, "timeout": "5s", "retries": 1, "retry_backoff": "200ms"},
        "listen": f"127.0.0.1:{stack.service_port}",
        "storage": {"path": str(storage)},
        "detectors": [{
            "name": "node",
            "entity_labels": ["instance"],
            "step": "1s",
            "window": 10,
            "signals": NODE_SIGNALS,
            "model": {"hidden_size": 16, "latent_size": 8},
            "train": {"range": f"{GATHER_SECONDS - 5}s", "every": train_every, "min_windows": 20,
                      "epochs": 40, "patience": 5},
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


@pytest.fixture(scope="session")
def node_service(node_stack, tmp_path_factory):
    """The service on the node stack, with a model that `anomaly-monitor train` fitted on gathered metrics.

    The service runs while the metrics are gathered, so its own load is part of what is learnt
    as normal; it is then restarted to load the model.
    """
    folder = tmp_path_factory.mktemp("node-service")
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump(node_config(node_stack, folder / "storage")))
    service = ServiceProcess(config_file, node_stack.service_port, folder / "service.log")
    service.start()
    try:
        remaining = node_stack.started + GATHER_SECONDS - time.time()
        if remaining > 0:
            time.sleep(remaining)
        result = run_cli("train", "--config", str(config_file))
        assert result.returncode == 0, f"train failed:\n{result.stdout}\n{result.stderr}"
        service.stop()
        service.start()
        yield service
    finally:
        service.stop()
