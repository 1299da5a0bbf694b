"""Checks of the example Alertmanager configuration in rules/alertmanager.yml.

amtool validates the file and resolves routes. A real Alertmanager (Debian package
`prometheus-alertmanager`, 0.25 here) on a free loopback port then proves the
grouping and the inhibition, and delivers notifications to a webhook receiver on
loopback in place of the pager and ticket integrations.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / "rules" / "alertmanager.yml"

AMTOOL = shutil.which("amtool")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")

# Waiting for a process or a delivery gives up after this many seconds. It is a limit, not
# a check of speed.
WAIT_SECONDS = 30

needs_amtool = pytest.mark.skipif(
    AMTOOL is None, reason="amtool not found on PATH: install the Debian package `prometheus-alertmanager`"
)
needs_alertmanager = pytest.mark.skipif(
    ALERTMANAGER is None,
    reason="prometheus-alertmanager not found on PATH: install the Debian package `prometheus-alertmanager`",
)


# --- amtool ----------------------------------------------------------------------------


def run_amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


@needs_amtool
def test_amtool_check_config_passes():
    result = run_amtool("check-config", str(CONFIG_FILE))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


ROUTING_CASES = [
    pytest.param(
        "pager",
        {"alertname": "AnomalyMonitorEntityHighlyAnomalous", "severity": "critical", "detector": "node", "entity": "a"},
        id="critical-entity-pages",
    ),
    pytest.param(
        "ticket",
        {"alertname": "AnomalyMonitorEntityAnomalous", "severity": "warning", "detector": "node", "entity": "a"},
        id="warning-entity-tickets",
    ),
    pytest.param(
        "ticket",
        {"alertname": "AnomalyMonitorTrainingStale", "severity": "warning", "detector": "node"},
        id="warning-health-tickets",
    ),
    pytest.param(
        "ticket",
        {"alertname": "SomeoneElsesAlert", "severity": "critical"},
        id="foreign-critical-falls-to-default",
    ),
    pytest.param(
        "ticket",
        {"alertname": "AnomalyMonitorEntityAnomalous", "detector": "node", "entity": "a"},
        id="missing-severity-tickets",
    ),
]


def route_test_args(receiver: str, labels: dict[str, str]) -> list[str]:
    pairs = [f"{name}={value}" for name, value in labels.items()]
    return ["config", "routes", "test", f"--config.file={CONFIG_FILE}", f"--verify.receivers={receiver}", *pairs]


@needs_amtool
@pytest.mark.parametrize(("receiver", "labels"), ROUTING_CASES)
def test_route_resolves_receiver(receiver: str, labels: dict[str, str]):
    result = run_amtool(*route_test_args(receiver, labels))

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


@needs_amtool
def test_route_check_rejects_wrong_receiver():
    labels = {"alertname": "AnomalyMonitorEntityHighlyAnomalous", "severity": "critical", "entity": "a"}

    result = run_amtool(*route_test_args("ticket", labels))

    assert result.returncode != 0


def test_example_receivers_use_placeholder_hosts():
    receivers = yaml.safe_load(CONFIG_FILE.read_text(encoding="utf-8"))["receivers"]
    urls = [hook["url"] for receiver in receivers for hook in receiver.get("webhook_configs", [])]

    assert urls
    assert all(".example.invalid/" in url for url in urls), urls


# --- a real Alertmanager ---------------------------------------------------------------


@dataclass
class WebhookRecorder:
    """Notifications that Alertmanager posted, as (URL path, JSON body) pairs."""

    notifications: list[tuple[str, dict]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, path: str, body: dict) -> None:
        with self.lock:
            self.notifications.append((path, body))

    def received(self, path: str) -> list[dict]:
        with self.lock:
            return [body for recorded_path, body in self.notifications if recorded_path == path]


def webhook_handler(recorder: WebhookRecorder) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (name fixed by http.server)
            length = int(self.headers.get("Content-Length", "0"))
            recorder.record(self.path, json.loads(self.rfile.read(length)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # keep pytest output free of one access-log line per notification

    return Handler


@pytest.fixture
def webhook() -> Iterator[tuple[WebhookRecorder, str]]:
    recorder = WebhookRecorder()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), webhook_handler(recorder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield recorder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_config(webhook_url: str) -> dict:
    """Return the example config with receivers on the loopback webhook and short waits.

    Routes, grouping and inhibition stay as the example has them; only the receiver
    URLs (path = receiver name) and the group timers change.
    """
    config = yaml.safe_load(CONFIG_FILE.read_text(encoding="utf-8"))
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"{webhook_url}/{receiver['name']}"
    config["route"].update({"group_wait": "1s", "group_interval": "1s"})
    return config


def http_json(url: str, payload: object | None = None) -> object:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


def wait_until_ready(process: subprocess.Popen, url: str) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture
def alertmanager(tmp_path: Path, webhook: tuple[WebhookRecorder, str]) -> Iterator[str]:
    """Start Alertmanager with the loopback variant of the example and yield its base URL."""
    config = loopback_config(webhook[1])
    urls = [hook["url"] for receiver in config["receivers"] for hook in receiver["webhook_configs"]]
    assert all(url.startswith("http://127.0.0.1:") for url in urls), urls
    config_file = tmp_path / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")

    # A port taken between free_port() and the bind makes the process exit: try again.
    for _ in range(3):
        port = free_port()
        log = (tmp_path / f"alertmanager-{port}.log").open("w")
        process = subprocess.Popen(
            [
                ALERTMANAGER,
                f"--config.file={config_file}",
                f"--storage.path={tmp_path / f'data-{port}'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base_url = f"http://127.0.0.1:{port}"
        if wait_until_ready(process, f"{base_url}/-/ready"):
            break
        stop(process)
        log.close()
    else:
        pytest.fail(f"Alertmanager did not become ready; see the logs in {tmp_path}")

    yield base_url
    stop(process)
    log.close()


def alert(name: str, severity: str, **labels: str) -> dict:
    return {"labels": {"alertname": name, "severity": severity, **labels}, "annotations": {"summary": name}}


CRITICAL_A = alert("AnomalyMonitorEntityHighlyAnomalous", "critical", detector="node", entity="node-a:9100")
WARNING_A = alert("AnomalyMonitorEntityAnomalous", "warning", detector="node", entity="node-a:9100")
WARNING_B = alert("AnomalyMonitorEntityAnomalous", "warning", detector="node", entity="node-b:9100")
HEALTH_WARNING = alert("AnomalyMonitorTrainingStale", "warning", detector="node", instance="10.0.0.5:9464")


def alert_states(base_url: str) -> dict[tuple[str, str], dict]:
    """Map (alertname, entity) to the status Alertmanager reports for that alert."""
    alerts = http_json(f"{base_url}/api/v2/alerts")
    return {(item["labels"]["alertname"], item["labels"].get("entity", "")): item["status"] for item in alerts}


def wait_for(predicate, describe: str):
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"gave up after {WAIT_SECONDS}s waiting for {describe}")


def states_once_inhibited(base_url: str) -> dict[tuple[str, str], dict] | None:
    states = alert_states(base_url)
    warning = states.get(("AnomalyMonitorEntityAnomalous", "node-a:9100"), {})
    return states if warning.get("inhibitedBy") else None


def groups_once_complete(base_url: str, count: int) -> list[dict] | None:
    groups = http_json(f"{base_url}/api/v2/alerts/groups")
    return groups if len(groups) == count else None


@needs_alertmanager
def test_warning_inhibited_while_critical_fires(alertmanager: str):
    http_json(f"{alertmanager}/api/v2/alerts", [CRITICAL_A, WARNING_A, WARNING_B, HEALTH_WARNING])

    # The inhibitor learns about source alerts asynchronously, so poll for the outcome.
    states = wait_for(lambda: states_once_inhibited(alertmanager), "the warning of node-a:9100 to be inhibited")

    assert states[("AnomalyMonitorEntityAnomalous", "node-a:9100")]["state"] == "suppressed"
    assert states[("AnomalyMonitorEntityAnomalous", "node-b:9100")]["state"] == "active"
    assert states[("AnomalyMonitorEntityHighlyAnomalous", "node-a:9100")]["state"] == "active"
    assert states[("AnomalyMonitorTrainingStale", "")]["state"] == "active"


@needs_alertmanager
def test_alerts_grouped_by_detector_and_entity(alertmanager: str):
    http_json(f"{alertmanager}/api/v2/alerts", [CRITICAL_A, WARNING_A, WARNING_B, HEALTH_WARNING])

    groups = wait_for(lambda: groups_once_complete(alertmanager, 4), "four alert groups")
    by_receiver: dict[str, list[dict]] = {}
    for group in groups:
        by_receiver.setdefault(group["receiver"]["name"], []).append(group["labels"])

    assert by_receiver["pager"] == [{"detector": "node", "entity": "node-a:9100"}]
    assert sorted(by_receiver["ticket"], key=lambda labels: labels.get("entity", "")) == [
        {"detector": "node"},
        {"detector": "node", "entity": "node-a:9100"},
        {"detector": "node", "entity": "node-b:9100"},
    ]


def alert_names(notification: dict) -> list[tuple[str, str]]:
    return sorted((item["labels"]["alertname"], item["labels"].get("entity", "")) for item in notification["alerts"])


@needs_alertmanager
def test_pages_and_tickets_reach_their_receivers(alertmanager: str, webhook: tuple[WebhookRecorder, str]):
    recorder = webhook[0]
    http_json(f"{alertmanager}/api/v2/alerts", [CRITICAL_A, WARNING_B])

    pages = wait_for(lambda: recorder.received("/pager"), "a notification at the pager receiver")
    tickets = wait_for(lambda: recorder.received("/ticket"), "a notification at the ticket receiver")

    assert alert_names(pages[0]) == [("AnomalyMonitorEntityHighlyAnomalous", "node-a:9100")]
    assert pages[0]["groupLabels"] == {"detector": "node", "entity": "node-a:9100"}
    assert pages[0]["status"] == "firing"
    assert alert_names(tickets[0]) == [("AnomalyMonitorEntityAnomalous", "node-b:9100")]
    assert tickets[0]["groupLabels"] == {"detector": "node", "entity": "node-b:9100"}
