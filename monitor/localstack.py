"""Start Prometheus, Alertmanager and node-exporter on loopback, for the demo and the tests."""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "sudo apt-get install -y --no-install-recommends "
    "prometheus prometheus-alertmanager prometheus-node-exporter"
)
class MissingBinary(RuntimeError):
    pass


def find_binary(name: str) -> str:
    """Locate a Debian-packaged binary; raise MissingBinary with the install command."""
    executable = {"alertmanager": "prometheus-alertmanager", "node-exporter": "prometheus-node-exporter"}.get(name, name)
    path = shutil.which(executable)
    if path is None:
        raise MissingBinary(f"{executable} not found on PATH; install it with: {INSTALL_HINT}")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {process.returncode}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} was not ready within {timeout:.0f}s")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


@dataclass
class LocalStack:
    """Processes started here, each on a free loopback port, all under one work folder."""

    workdir: Path
    processes: dict[str, Process] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def _spawn(self, name: str, command: list[str]) -> Process:
        log = self.workdir / f"{name}.log"
        handle = open(log, "ab")
        popen = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=self.workdir, start_new_session=True)
        handle.close()
        process = Process(name, popen, log)
        self.processes[name] = process
        return process

    def start_node_exporter(self, name: str = "node-exporter", extra_args: tuple[str, ...] = ()) -> str:
        port = free_port()
        self.ports[name] = port
        process = self._spawn(name, [
            find_binary("node-exporter"), f"--web.listen-address=127.0.0.1:{port}",
            "--no-collector.systemd", "--collector.disable-defaults",
            "--collector.cpu", "--collector.meminfo", "--collector.netdev", "--collector.loadavg",
            "--collector.diskstats", "--collector.filesystem", "--collector.stat", *extra_args])
        wait_ready(f"{self.url(name)}/metrics", process=process.popen)
        return f"127.0.0.1:{port}"

    def start_alertmanager(self, config_file: Path) -> str:
        port = free_port()
        self.ports["alertmanager"] = port
        data = self.workdir / "alertmanager"
        data.mkdir(exist_ok=True)
        process = self._spawn("alertmanager", [
            find_binary("alertmanager"), f"--config.file={config_file}", f"--storage.path={data}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="])
        wait_ready(f"{self.url('alertmanager')}/-/ready", process=process.popen)
        return f"127.0.0.1:{port}"

    def start_prometheus(self, scrape_configs: list[dict], interval: str = "1s", rule_files: list[str] = (),
                         alertmanagers: list[str] = ()) -> str:
        port = free_port()
        self.ports["prometheus"] = port
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": list(rule_files),
            "scrape_configs": scrape_configs,
        }
        if alertmanagers:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": list(alertmanagers)}]}]}
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        data = self.workdir / "prometheus-data"
        process = self._spawn("prometheus", [
            find_binary("prometheus"), f"--config.file={config_file}", f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=30d"])
        wait_ready(f"{self.url('prometheus')}/-/ready", process=process.popen)
        return self.url("prometheus")

    def restart_prometheus(self) -> None:
        old = self.processes["prometheus"]
        command = old.popen.args
        old.stop()
        process = self._spawn("prometheus", list(command))
        wait_ready(f"{self.url('prometheus')}/-/ready", process=process.popen)

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()
        self.processes.clear()


def scrape_job(name: str, targets: list[str], honor_labels: bool = False, interval: str | None = None) -> dict:
    job = {"job_name": name, "static_configs": [{"targets": targets}], "honor_labels": honor_labels}
    if interval:
        job["scrape_interval"] = interval
    return job

