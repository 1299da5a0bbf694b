"""One measurement of the cycle benchmark, run in its own process so its peak memory is its own.

    python -m bench.measure train --url URL --prometheus-pid PID --storage DIR --history 7d --now T
    python -m bench.measure score --url URL --prometheus-pid PID --storage DIR --history 7d --now T --steady 10

Prints one JSON object per measured operation on stdout. The orchestrator is bench/cycle.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import probes
from bench.synthetic import ENTITY_LABEL, signal_queries
from monitor.config import Config, parse_config, parse_duration
from monitor.detector import DetectorRuntime
from monitor.exporter import Exposition
from monitor.sharding import Shard

DETECTOR = "bench"


def build_config(url: str, storage: Path, history_seconds: float, timeout: str = "120s") -> Config:
    """Return the service config that the benchmark measures: the defaults, except the ones named here.

    train.range is the backfilled history, so training reads all of it. The query timeout is
    raised from 30 s because a cold training reads whole days of every entity in one query.
    """
    return parse_config({
        "prometheus": {"url": url, "timeout": timeout, "retries": 0},
        "storage": {"path": str(storage)},
        "torch_threads": 1,
        "detectors": [{
            "name": DETECTOR,
            "entity_labels": [ENTITY_LABEL],
            "step": "30s",
            "window": 30,
            "signals": signal_queries(),
            "train": {"range": history_seconds},
        }],
    }, source="bench")


@dataclass
class Probe:
    """The cost of one operation: wall time by phase, CPU time of the service and of Prometheus, peak memory."""

    prometheus_pid: int
    timers: probes.Timers
    result: dict = field(default_factory=dict)

    @contextmanager
    def measure(self, name: str):
        self.timers.reset()
        probes.reset_peak_rss()
        rss_before = probes.rss_mib()
        own_before = probes.own_cpu_seconds()
        prometheus_before = probes.process_cpu_seconds(self.prometheus_pid)
        machine_before = probes.machine_busy_cpu_seconds()
        began = time.perf_counter()
        self.result = {"operation": name}
        yield self.result
        total = time.perf_counter() - began
        own = probes.own_cpu_seconds() - own_before
        prometheus = probes.process_cpu_seconds(self.prometheus_pid) - prometheus_before
        machine = probes.machine_busy_cpu_seconds() - machine_before
        self.result.update({
            "seconds": total,
            "phases": self.timers.phases(total),
            "timers": dict(self.timers.seconds),
            "calls": dict(self.timers.calls),
            "spans": dict(self.timers.spans),
            "service_cpu_seconds": own,
            "prometheus_cpu_seconds": prometheus,
            # Other processes share the machine; their CPU in the same interval shows how far
            # the wall-clock times above were stretched by waiting for a core.
            "other_cpu_seconds": max(machine - own - prometheus, 0.0),
            "rss_before_mib": rss_before,
            "peak_rss_mib": probes.peak_rss_mib(),
        })


def _runtime(config: Config) -> DetectorRuntime:
    torch.set_num_threads(config.torch_threads)
    runtime = DetectorRuntime(config, config.detectors[0], Exposition(), Shard(0, 1))
    runtime.load()
    return runtime


def measure_training(probe: Probe, config: Config, now: float) -> list[dict]:
    runtime = _runtime(config)
    served_before = runtime.bundle is not None
    with probe.measure("train") as result:
        outcome = runtime.train(now)
    result.update({
        "model_before": served_before,
        "accepted": bool(outcome and outcome.accepted),
        "reason": outcome.reason if outcome else "not run",
        "windows_used": outcome.windows_used if outcome else 0,
        "windows_excluded": outcome.windows_excluded if outcome else {},
        "epochs": outcome.bundle.metadata.get("epochs") if outcome and outcome.bundle else None,
        "history_segments": len(list((runtime.folder / "history").glob("seg-*.npz"))),
    })
    return [result]


def _score_once(probe: Probe, runtime: DetectorRuntime, name: str, now: float) -> dict:
    with probe.measure(name) as result:
        runtime.score_cycle(now)
        body = runtime.exposition.render()
    result.update({"entities_scored": len(runtime.results), "metrics_bytes": len(body),
                   "buffer_entities": len(runtime.buffer.entities) if runtime.buffer else 0})
    return result


def measure_scoring(probe: Probe, config: Config, now: float, steady: int) -> list[dict]:
    """Score one cold cycle (a whole window read) at `now`, then `steady` cycles one step apart."""
    runtime = _runtime(config)
    if runtime.bundle is None:
        raise SystemExit(f"no trained model under {config.storage.path}; run the training measurement first")
    step = config.detectors[0].step
    results = [_score_once(probe, runtime, "score_cold", now)]
    steady_runs = [_score_once(probe, runtime, "score_steady", now + step * (k + 1)) for k in range(steady)]
    results.append(_median_run(steady_runs))
    return results


def _median_run(runs: list[dict]) -> dict:
    """Return the run with the median total time, with the spread of all runs added."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    median = dict(ordered[len(ordered) // 2])
    median["runs"] = len(runs)
    median["seconds_all"] = [round(r["seconds"], 4) for r in runs]
    median["seconds_median"] = statistics.median(r["seconds"] for r in runs)
    median["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return median


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure one training run or a series of score cycles.")
    parser.add_argument("kind", choices=["train", "score"])
    parser.add_argument("--url", required=True, help="Prometheus base URL")
    parser.add_argument("--prometheus-pid", type=int, required=True, help="process id of that Prometheus, for its CPU time")
    parser.add_argument("--storage", type=Path, required=True, help="the service's storage.path")
    parser.add_argument("--history", required=True, help="train.range, a Prometheus duration such as 7d")
    parser.add_argument("--now", type=float, required=True, help="the cycle's time, Unix seconds")
    parser.add_argument("--steady", type=int, default=10, help="score cycles after the cold one (default 10)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    config = build_config(args.url, args.storage, parse_duration(args.history))
    timers = probes.Timers()
    probes.instrument(timers)
    probe = Probe(args.prometheus_pid, timers)
    if args.kind == "train":
        results = measure_training(probe, config, args.now)
    else:
        results = measure_scoring(probe, config, args.now, args.steady)
    for result in results:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
