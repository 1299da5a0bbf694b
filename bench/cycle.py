"""Benchmark one scoring cycle and one training run against a backfilled Prometheus.

    python -m bench.cycle --size 1000:7d --size 10000:6h --workdir /tmp/bench-cycle --out bench/out

For each size (entities:history), it backfills synthetic bench_* gauges with promtool (or reuses
a TSDB it backfilled before), starts Prometheus on a free loopback port and measures, each in a
fresh process (bench/measure.py):
  1. training with an empty local history (backfill from Prometheus),
  2. training with a warm local history, cut into the segments that score cycles write,
  3. a cold score cycle (a whole window read) and steady cycles one step apart.
Results go to <out>/results.json and <out>/results.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import requests
import torch
import yaml

import monitor
from bench import probes
from bench.measure import DETECTOR
from bench.synthetic import Dataset, backfill, metric_name
from monitor.config import format_duration, parse_duration
from monitor.frames import Frame
from monitor.history import History
from monitor.localstack import find_binary, free_port, wait_ready

logger = logging.getLogger("bench.cycle")

REPOSITORY = Path(__file__).resolve().parent.parent
STEP = 30
# Score cycles write a history segment every 120 steps (History.flush_steps).
SEGMENT_STEPS = 120


def plan_dataset(entities: int, history: float, steady: int, now: float) -> Dataset:
    """Place the data so it ends one step before the last UTC midnight, so each day is one aligned block.

    Raises ValueError when the history cannot hold one window (30 steps) and the steady cycles.
    """
    midnight = int(now // 86400) * 86400
    start = midnight - int(history)
    if (midnight - start) // STEP < 30 + steady + 10:
        raise ValueError(f"history {format_duration(history)} is too short for a window and {steady} steady cycles")
    return Dataset(entities, start, midnight - STEP, STEP)


def prepare_tsdb(dataset: Dataset, folder: Path) -> tuple[Dataset, dict | None]:
    """Backfill a TSDB for the dataset, or reuse one whose marker names the same entities and history."""
    marker = folder / "dataset.json"
    tsdb = folder / "tsdb"
    if marker.exists():
        saved = Dataset(**json.loads(marker.read_text()))
        if saved.entities == dataset.entities and saved.end - saved.start == dataset.end - dataset.start:
            logger.info("reusing the TSDB in %s (%d samples)", tsdb, saved.samples)
            return saved, None
    shutil.rmtree(folder, ignore_errors=True)
    logger.info("backfilling %d entities, %s of history: %d samples", dataset.entities,
                format_duration(dataset.end - dataset.start + STEP), dataset.samples)
    totals = backfill(dataset, tsdb, folder / "scratch")
    shutil.rmtree(folder / "scratch", ignore_errors=True)
    marker.write_text(json.dumps(asdict(dataset)))
    totals["tsdb_mib"] = sum(p.stat().st_size for p in tsdb.rglob("*") if p.is_file()) / 2**20
    return dataset, totals


class PrometheusProcess:
    """Prometheus serving a backfilled TSDB on a free loopback port, with no scrape targets."""

    def __init__(self, tsdb: Path, folder: Path):
        self.port = free_port()
        config = folder / "prometheus.yml"
        config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1m"}, "scrape_configs": []}))
        self.log = open(folder / "prometheus.log", "ab")
        # min = max = 2h turns compaction off, so merging the backfilled blocks never runs during a
        # measurement and takes Prometheus's CPU.
        self.popen = subprocess.Popen([
            find_binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tsdb}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=30d",
            "--storage.tsdb.min-block-duration=2h", "--storage.tsdb.max-block-duration=2h",
        ], stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_ready(f"{self.url}/-/ready", timeout=120, process=self.popen)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def query(self, expression: str, at: float) -> float:
        response = requests.get(f"{self.url}/api/v1/query", params={"query": expression, "time": at}, timeout=600)
        response.raise_for_status()
        result = response.json()["data"]["result"]
        return float(result[0]["value"][1]) if result else float("nan")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()


def check_backfill(prometheus: PrometheusProcess, dataset: Dataset) -> dict:
    """Count the stored series and samples of one signal; raise if the backfill is incomplete."""
    metric = metric_name("cpu")
    span = format_duration(dataset.end - dataset.start + STEP)
    series = prometheus.query(f"count({metric})", dataset.end)
    samples = prometheus.query(f"sum(count_over_time({metric}[{span}]))", dataset.end)
    expected = dataset.entities * dataset.steps
    if series != dataset.entities or samples != expected:
        raise RuntimeError(f"backfill incomplete: {metric} has {series:g} series and {samples:g} samples, "
                           f"expected {dataset.entities} and {expected}; see {prometheus.log.name}")
    return {"series_per_signal": int(series), "samples_per_signal": int(samples)}


def idle_cpu(pid: int, seconds: float = 5.0) -> float:
    """Return the CPU seconds per second Prometheus spends with no query running."""
    before = probes.process_cpu_seconds(pid)
    time.sleep(seconds)
    return (probes.process_cpu_seconds(pid) - before) / seconds


def resegment_history(storage: Path, steps: int = SEGMENT_STEPS) -> int:
    """Cut the day-long segments of a backfill into the shorter ones that score cycles write.

    Returns the number of segments written. The warm training then reads the file layout that a
    service's history has after days of score cycles.
    """
    folder = storage / DETECTOR / "history"
    fresh = folder.with_name("history.resegmented")
    shutil.rmtree(fresh, ignore_errors=True)
    written = 0
    for path in sorted(folder.glob("seg-*.npz")):
        with np.load(path, allow_pickle=False) as data:
            signals = [str(s) for s in data["signals"]]
            entities = [tuple(json.loads(e)) for e in data["entities"]]
            start, step, values = float(data["start"]), float(data["step"]), data["values"]
        writer = History(fresh, signals, step, retention=float("inf"))
        for first in range(0, values.shape[1], steps):
            part = values[:, first:first + steps]
            writer.write_segment(Frame(start + first * step, step, entities, part))
            written += 1
    shutil.rmtree(folder)
    fresh.rename(folder)
    return written


def run_measurement(kind: str, prometheus: PrometheusProcess, storage: Path, history: str, now: float,
                    steady: int, log: Path) -> list[dict]:
    command = [sys.executable, "-m", "bench.measure", kind, "--url", prometheus.url,
               "--prometheus-pid", str(prometheus.pid), "--storage", str(storage), "--history", history,
               "--now", f"{now:.0f}", "--steady", str(steady)]
    logger.info("measuring %s: %s", kind, " ".join(command[1:]))
    with open(log, "ab") as errors:
        completed = subprocess.run(command, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=errors, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"measurement {kind} failed with exit code {completed.returncode}; see {log}")
    return [json.loads(line) for line in completed.stdout.decode().splitlines() if line.strip()]


def bench_size(entities: int, history: str, workdir: Path, steady: int) -> dict:
    """Backfill (or reuse) one size, then run the three measurements against it."""
    history_seconds = parse_duration(history)
    folder = workdir / f"{entities}-{history}"
    folder.mkdir(parents=True, exist_ok=True)
    dataset, backfill_totals = prepare_tsdb(plan_dataset(entities, history_seconds, steady, time.time()), folder)
    storage = folder / "storage"
    shutil.rmtree(storage, ignore_errors=True)
    log = folder / "measure.log"

    prometheus = PrometheusProcess(folder / "tsdb", folder)
    try:
        check = check_backfill(prometheus, dataset)
        idle = idle_cpu(prometheus.pid)
        train_now = dataset.end
        score_now = dataset.end - (steady + 5) * STEP
        cold = run_measurement("train", prometheus, storage, history, train_now, steady, log)
        segments = resegment_history(storage)
        warm = run_measurement("train", prometheus, storage, history, train_now, steady, log)
        scores = run_measurement("score", prometheus, storage, history, score_now, steady, log)
    finally:
        prometheus.stop()

    cold[0]["operation"] = "train_cold_history"
    warm[0]["operation"] = "train_warm_history"
    warm[0]["history_segments"] = segments
    return {
        "entities": entities, "history": history, "dataset": asdict(dataset), "samples": dataset.samples,
        "backfill": backfill_totals, "check": check, "prometheus_idle_cpu_per_second": idle,
        "measurements": cold + warm + scores,
    }


def monitor_fingerprint() -> dict:
    """Return where the measured monitor package was loaded from and a SHA-256 of its sources."""
    package = Path(monitor.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return {"path": str(package), "sources_sha256": digest.hexdigest()}


def machine() -> dict:
    memory_kib = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "unknown")
    prometheus_version = subprocess.run([find_binary("prometheus"), "--version"], capture_output=True, text=True)
    return {
        "cpus": os.cpu_count(), "cpu_model": cpu, "memory_gib": round(memory_kib / 2**20, 1),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "prometheus": (prometheus_version.stdout or prometheus_version.stderr).splitlines()[0],
    }


_COLUMNS = ("query", "decode", "frame", "history", "scale", "model", "export", "other")


def markdown_table(results: list[dict]) -> str:
    """Format every measurement as one row; phase columns are wall-clock seconds."""
    header = ("| entities, history | operation | total s | " + " | ".join(_COLUMNS)
              + " | service CPU s | Prometheus CPU s | other processes' CPU s | service peak RSS MiB |")
    lines = [header, "|" + " --- |" * (len(_COLUMNS) + 7)]
    for size in results:
        for m in size["measurements"]:
            phases = " | ".join(f"{m['phases'].get(c, 0.0):.3f}" for c in _COLUMNS)
            lines.append(f"| {size['entities']:,}, {size['history']} | {m['operation']} | {m['seconds']:.3f} | {phases} | "
                         f"{m['service_cpu_seconds']:.2f} | {m['prometheus_cpu_seconds']:.2f} | {m['other_cpu_seconds']:.2f} | "
                         f"{m['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def _size(text: str) -> tuple[int, str]:
    entities, _, history = text.partition(":")
    try:
        parse_duration(history)
        return int(entities), history
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ENTITIES:HISTORY such as 1000:7d, found {text!r}") from None


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure a scoring cycle and a training run against a backfilled Prometheus.")
    parser.add_argument("--size", type=_size, action="append", required=True,
                        help="ENTITIES:HISTORY, such as 1000:7d; repeat for several sizes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-cycle"),
                        help="folder for TSDBs, service storage and logs; a TSDB there is reused (default /tmp/bench-cycle)")
    parser.add_argument("--out", type=Path, default=REPOSITORY / "bench" / "out", help="folder for results.json and results.md")
    parser.add_argument("--steady", type=int, default=10, help="steady score cycles after the cold one (default 10)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    results = []
    for entities, history in args.size:
        results.append(bench_size(entities, history, args.workdir, args.steady))
        report = {"machine": machine(), "monitor": monitor_fingerprint(), "command": " ".join(["python -m bench.cycle"] + (argv or sys.argv[1:])),
                  "wall_seconds": time.monotonic() - began, "sizes": results}
        (args.out / "results.json").write_text(json.dumps(report, indent=2))
        (args.out / "results.md").write_text(markdown_table(results))
    logger.info("done in %.0fs; results in %s", time.monotonic() - began, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
