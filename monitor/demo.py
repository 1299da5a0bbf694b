"""`anomaly-monitor demo`: the whole loop on loopback, with an anomaly injected on purpose.

Prometheus scrapes node-exporter and the service every second. The service learns in two phases,
then a workload misbehaves, and the score is read back from Prometheus.

A few minutes of history is little to learn from, so the signals are ones that are stationary
at that scale. Memory enters as its rate of growth: the used share itself creeps up as
Prometheus and the service fill their buffers, and a model that saw one flat minute of it
would call every later minute an anomaly.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from monitor.config import parse_config
from monitor.localstack import LocalStack, MissingBinary, free_port, scrape_job

logger = logging.getLogger(__name__)

DEMO_SIGNALS = {
    "cpu": '1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[3s]))',
    "memory_growth": "-deriv(node_memory_MemAvailable_bytes[5s])",
    # Loopback sends what it receives, so a second signal for transmitted bytes would copy
    # this one. A copy leaves the error covariance a direction with almost no variance, and
    # any later difference in how the two are reconstructed then dominates the score.
    "loopback_traffic": 'sum by (instance) (rate(node_network_receive_bytes_total{device="lo"}[3s]))',
    "context_switches": "sum by (instance) (rate(node_context_switches_total[3s]))",
}

# The demo's traffic, its network anomaly included, stays on loopback, which Debian's
# node-exporter leaves out by default. An idle external interface reads 0 throughout learning,
# and then a single stray packet scores in the millions.
NODE_EXPORTER_ARGS = ("--collector.netdev.device-exclude=^$",)

# The maximum time a burst stays in the score: 5 s of the widest signal query, a window of
# 10 steps, 5 aggregated steps and 2 s of lag, at 1 s a step, plus a few seconds of margin.
TRAINING_ECHO_SECONDS = 25
# How often the demo reads the score from Prometheus, while it learns and afterwards.
READ_INTERVAL_SECONDS = 2
# A model of three minutes has seen little of a machine's variation, so the first baseline
# readings can sit above the threshold.
BASELINE_SECONDS = 90


def demo_config(prometheus: str, port: int, storage: Path, learn: float) -> dict:
    return {
        "prometheus": {"url": prometheus, "timeout": "5s", "retries": 1},
        "listen": f"127.0.0.1:{port}",
        "storage": {"path": str(storage)},
        "detectors": [{
            "name": "node",
            "entity_labels": ["instance"],
            "step": "1s",
            "window": 10,
            "signals": DEMO_SIGNALS,
            "model": {"hidden_size": 16, "latent_size": 8},
            # The range covers both learning phases. Its held-out part, the last 40 %, then falls
            # in the second phase, while the service scores, so the threshold allows for that
            # load. With the second phase alone, a busy machine's baseline read twice the
            # threshold for all of its 90 s. About 60 held-out windows resolve a 5 % false-alarm
            # rate.
            "train": {"range": f"{int(2 * learn)}s", "every": "1h", "min_windows": 20, "epochs": 40,
                      "patience": 5, "validation_fraction": 0.2},
            "score": {"every": "1s", "aggregate_steps": 5, "lag": "2s"},
            "threshold": {"method": "quantile", "false_alarm_rate": 0.05},
        }],
    }


# ---- the workload ------------------------------------------------------------

def _spin(stop: multiprocessing.Event) -> None:
    while not stop.is_set():
        pass


def _grow_memory(stop: multiprocessing.Event, megabytes_per_second: int = 80) -> None:
    allocations = []
    while not stop.is_set():
        allocations.append(bytearray(megabytes_per_second * 1024 * 1024))
        time.sleep(1)


def _drain(receiver: socket.socket, stop: multiprocessing.Event) -> None:
    while not stop.is_set():
        if not receiver.recv(1 << 20):
            return


def _flood_loopback(stop: multiprocessing.Event) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        sender = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()
        threading.Thread(target=_drain, args=(receiver, stop), daemon=True).start()
        chunk = b"x" * (1 << 20)
        while not stop.is_set():
            sender.sendall(chunk)
        sender.close()
        receiver.close()


ANOMALIES = {"cpu": (_spin, 2), "memory": (_grow_memory, 1), "network": (_flood_loopback, 1)}


class Anomaly:
    """Child processes that misbehave until stopped."""

    def __init__(self, kind: str):
        target, workers = ANOMALIES[kind]
        self.stop_event = multiprocessing.Event()
        self.processes = [multiprocessing.Process(target=target, args=(self.stop_event,), daemon=True)
                          for _ in range(workers)]

    def start(self) -> None:
        for process in self.processes:
            process.start()

    def stop(self) -> None:
        self.stop_event.set()
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()


# ---- reading the outcome back from Prometheus ----------------------------------

def read_margin(prometheus: str, instance: str) -> tuple[float, float] | None:
    selector = f'{{detector="node",instance="{instance}"}}'
    try:
        score = requests.get(f"{prometheus}/api/v1/query", params={"query": f"anomaly_score{selector}"}, timeout=5).json()
        threshold = requests.get(f"{prometheus}/api/v1/query", params={"query": f"anomaly_threshold{selector}"}, timeout=5).json()
        return float(score["data"]["result"][0]["value"][1]), float(threshold["data"]["result"][0]["value"][1])
    except (requests.RequestException, KeyError, IndexError, ValueError):
        return None


def _report(phase: str, reading: tuple[float, float] | None) -> bool | None:
    """Print one reading; return whether the score is above the threshold, or None without one."""
    if reading is None:
        print(f"  {phase:<10} no score in Prometheus yet")
        return None
    score, threshold = reading
    above = score > threshold
    # The general format keeps a score of 10¹⁶, as a flood of loopback traffic gives, readable.
    print(f"  {phase:<10} score {score:12.4g}   threshold {threshold:10.4g}   {'ANOMALY' if above else 'normal'}")
    return above


def _watch(prometheus: str, instance: str, phase: str, seconds: float, until=None) -> bool:
    """Print readings for `seconds` and return whether one was above, or with `until`, whether one met it."""
    deadline = time.monotonic() + seconds
    seen = False
    while time.monotonic() < deadline:
        reading = read_margin(prometheus, instance)
        above = _report(phase, reading)
        seen = seen or bool(above)
        if until is not None and reading is not None and until(*reading):
            return True
        time.sleep(READ_INTERVAL_SECONDS)
    # With a condition, running out of time means it was never met.
    return seen if until is None else False


def _below(score: float, threshold: float) -> bool:
    return score <= threshold


def _poll_quietly(prometheus: str, instance: str, seconds: float) -> None:
    """Read the score for `seconds` as `_watch` does, without printing."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        read_margin(prometheus, instance)
        time.sleep(READ_INTERVAL_SECONDS)


# ---- the demo ------------------------------------------------------------------

def run_demo(args) -> int:
    # The demo narrates as it goes; line buffering keeps that true when output goes to a file.
    sys.stdout.reconfigure(line_buffering=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="anomaly-monitor-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(workdir)
    # SIGTERM would end the process without the cleanup below and leave Prometheus and
    # node-exporter running. Raised as an interrupt, it stops them as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args, workdir, stack)
    except MissingBinary as error:
        logger.error("%s", error)
        return 1
    finally:
        stack.stop()


def _interrupt(_number, _frame) -> None:
    raise KeyboardInterrupt


def _run(args, workdir: Path, stack: LocalStack) -> int:
    from monitor.service import Service

    node = stack.start_node_exporter(extra_args=NODE_EXPORTER_ARGS)
    port = free_port()
    prometheus = stack.start_prometheus(
        [scrape_job("node", [node]), scrape_job("anomaly-monitor", [f"127.0.0.1:{port}"], honor_labels=True)],
        interval="1s")
    config = parse_config(demo_config(prometheus, port, workdir / "storage", args.learn))
    service = Service(config)
    service.start()
    _print_urls(prometheus, port, node, workdir)
    try:
        return _scenario(args, service, prometheus, node)
    finally:
        service.stop()


def _print_urls(prometheus: str, port: int, node: str, workdir: Path) -> None:
    print(f"Prometheus:     {prometheus}/graph   (try: anomaly_score, anomaly_threshold, anomaly_signal_contribution)")
    print(f"Service:        http://127.0.0.1:{port}/metrics")
    print(f"node-exporter:  http://{node}/metrics")
    print(f"Logs and data:  {workdir}")


def _scenario(args, service, prometheus: str, node: str) -> int:
    threshold = _learn(args, service, prometheus, node)
    if threshold is None:
        return 1

    # Training itself spends CPU and memory that the new model never saw, so the scores right
    # after it can read in the thousands. The wait also covers the scrape or two in which
    # Prometheus still returns the first model's threshold.
    print(f"Waiting {TRAINING_ECHO_SECONDS}s for the load of training to leave the scored windows ...")
    _poll_quietly(prometheus, node, TRAINING_ECHO_SECONDS)
    print("Waiting for a normal baseline:")
    settled = _watch(prometheus, node, "baseline", BASELINE_SECONDS, until=_below)
    if not settled:
        print("The score did not settle below the threshold; the detection below proves little. "
              "Rerun on a quieter machine, or with a longer --learn.")

    print(f"\nInjecting a {args.anomaly} anomaly for {args.anomaly_duration:.0f}s:")
    anomaly = Anomaly(args.anomaly)
    anomaly.start()
    try:
        detected = _watch(prometheus, node, "anomaly", args.anomaly_duration)
    finally:
        anomaly.stop()

    print("\nAnomaly stopped; waiting for the score to fall back:")
    recovered = _watch(prometheus, node, "recovery", 120, until=_below)
    print(f"\nBaseline normal: {_yes(settled)}; Detected: {_yes(detected)}; recovered: {_yes(recovered)}")
    if args.keep_running:
        print("Still running; press Ctrl-C to stop.")
        _wait_forever()
    return 0 if settled and detected and recovered else 1


def _yes(passed: bool) -> str:
    return "yes" if passed else "NO"


def _learn(args, service, prometheus: str, node: str) -> float | None:
    """Learn in two phases and return the threshold of the model that then serves, or None."""
    # From the baseline on, the demo reads the score from Prometheus every few seconds. The
    # loopback signal measures that traffic too, so the demo reads at the same pace while the
    # service learns, and the model takes the reads as normal.
    print(f"\nLearning normal behaviour for {args.learn:.0f}s ...")
    _poll_quietly(prometheus, node, args.learn)
    if _train(service, reset_first=False) is None:
        return None

    # Scoring adds its own load every second (a query, a forward pass, a scrape). A model of the
    # quiet minutes alone would flag that load for good, so the second phase starts from scratch.
    print(f"Learning again for {args.learn:.0f}s while the service scores, so that its own load counts as normal ...")
    _poll_quietly(prometheus, node, args.learn)
    return _train(service, reset_first=True)


def _train(service, reset_first: bool) -> float | None:
    outcome = service.detectors[0].train(reset_first=reset_first)
    if outcome is None or not outcome.accepted:
        print(f"training was not accepted: {outcome.reason if outcome else 'busy'}")
        return None
    threshold = outcome.bundle.threshold.value
    print(f"Model trained on {outcome.windows_used} windows; threshold {threshold:.2f}\n")
    return threshold


def _wait_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
