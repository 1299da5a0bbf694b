"""`anomaly-monitor demo` as a new user runs it: its own Prometheus, node-exporter and workload.

The demo burns CPU on the machine that the shared test node-exporters also watch, so it runs
after every other test (see the `runs_last` marker in conftest.py). The check of its
node-exporter's flags is quick and runs in the usual order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import require_binaries
from monitor.demo import DEMO_SIGNALS, NODE_EXPORTER_ARGS
from monitor.localstack import LocalStack

ROOT = Path(__file__).resolve().parents[1]
# Two 90 s learning phases, 25 s of wait, up to 90 s of baseline, 45 s of anomaly and up to
# 120 s of recovery.
DEMO_TIMEOUT_SECONDS = 600


@pytest.mark.runs_last
def test_demo_cpu_burn_detected_and_recovered(tmp_path):
    require_binaries("prometheus", "node-exporter")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("ANOMALY_MONITOR_")}

    finished = subprocess.run(
        [sys.executable, "-m", "monitor", "demo", "--workdir", str(tmp_path), "--anomaly", "cpu"],
        capture_output=True, text=True, cwd=ROOT, env=environment, timeout=DEMO_TIMEOUT_SECONDS)

    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    assert "Baseline normal: yes; Detected: yes; recovered: yes" in finished.stdout
    assert "http://127.0.0.1:" in finished.stdout


def test_demo_node_exporter_reports_loopback(tmp_path):
    require_binaries("node-exporter")
    stack = LocalStack(tmp_path)
    try:
        node = stack.start_node_exporter(extra_args=NODE_EXPORTER_ARGS)
        exposition = requests.get(f"http://{node}/metrics", timeout=5).text
    finally:
        stack.stop()

    assert 'device="lo"' in DEMO_SIGNALS["loopback_traffic"]
    assert 'node_network_receive_bytes_total{device="lo"}' in exposition
