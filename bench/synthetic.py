"""Synthetic node metrics for the cycle benchmark, written as OpenMetrics and backfilled with promtool.

Each entity (`instance="host-0001"`) has eight raw gauges, `bench_<signal>`, one sample per step.
The detector's PromQL reads them directly, so a query costs what reading stored series costs.

Text is built with numpy into fixed-width lines, one block range per file, and streamed to disk:
a day of 10,000 entities is about 16 GB of text, so no file is ever held in memory. promtool
re-reads its whole input once per block range it covers, so each file covers exactly one range.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SIGNALS = ("cpu", "memory", "load", "net_rx", "net_tx", "disk_read", "disk_write", "fs_used")
METRIC_PREFIX = "bench_"
ENTITY_LABEL = "instance"

# Values lie in [1, 10) and are written with 15 decimals, so each has one integer digit and a
# fixed width. 16 significant digits make Prometheus's JSON as long as it is for real rate() output.
_DECIMALS = 15
_VALUE_WIDTH = 2 + _DECIMALS
_TIMESTAMP_WIDTH = 10  # Unix seconds from 2001 to 2286
_LINES_PER_WRITE = 500_000


@dataclass(frozen=True)
class Dataset:
    """`entities` hosts with one sample per `step` seconds at the grid points in [start, end]."""

    entities: int
    start: int
    end: int
    step: int = 30
    seed: int = 0

    @property
    def steps(self) -> int:
        return (self.end - self.start) // self.step + 1

    @property
    def samples(self) -> int:
        return self.entities * self.steps * len(SIGNALS)

    def entity_names(self) -> list[str]:
        width = max(4, len(str(self.entities - 1)))
        return [f"host-{i:0{width}d}" for i in range(self.entities)]


def metric_name(signal: str) -> str:
    return f"{METRIC_PREFIX}{signal}"


def signal_queries() -> dict[str, str]:
    """Return the detector's signals: each raw gauge, one series per entity."""
    return {signal: metric_name(signal) for signal in SIGNALS}


def values(dataset: Dataset, signal_index: int, entity_rows: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Return values [entity, time] in [1, 10): a daily cycle with a per-entity phase, plus noise.

    The noise generator is seeded by the signal and the first timestamp, so a file's content does
    not depend on how the range was split into writes.
    """
    phase = (entity_rows[:, None] * 0.61803 + signal_index * 0.7) % (2 * np.pi)
    daily = np.sin(2 * np.pi * timestamps[None, :] / 86400.0 + phase)
    rng = np.random.default_rng([dataset.seed, signal_index, int(timestamps[0]), int(entity_rows[0])])
    noise = rng.standard_normal((entity_rows.size, timestamps.size))
    level = 4.0 + (entity_rows[:, None] % 7) * 0.3
    return np.clip(level + 1.5 * daily + 0.4 * noise, 1.0, 9.999)


def _digits(numbers: np.ndarray, width: int) -> np.ndarray:
    """Return ASCII digits [n, width] of non-negative integers, zero-padded on the left."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((numbers[:, None] // powers[None, :]) % 10 + ord("0")).astype(np.uint8)


def _prefixes(names: list[str], metric: str) -> np.ndarray:
    """Return `metric{instance="name"} ` for each name as rows of one fixed-width byte array."""
    encoded = [f'{metric}{{{ENTITY_LABEL}="{name}"}} '.encode() for name in names]
    width = len(encoded[0])
    if any(len(e) != width for e in encoded):
        raise ValueError("entity names must have one length, so every line has the same width")
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).reshape(len(encoded), width)


def render_lines(prefixes: np.ndarray, samples: np.ndarray, timestamps: np.ndarray) -> bytes:
    """Render samples [entity, time] as OpenMetrics lines, entity by entity, each in time order."""
    entities, steps = samples.shape
    prefix_width = prefixes.shape[1]
    line_width = prefix_width + _VALUE_WIDTH + 1 + _TIMESTAMP_WIDTH + 1
    lines = np.empty((entities, steps, line_width), dtype=np.uint8)
    lines[:, :, :prefix_width] = prefixes[:, None, :]

    scaled = np.rint(samples * 10**_DECIMALS).astype(np.int64).reshape(-1)
    digits = _digits(scaled, 1 + _DECIMALS).reshape(entities, steps, 1 + _DECIMALS)
    column = prefix_width
    lines[:, :, column] = digits[:, :, 0]
    lines[:, :, column + 1] = ord(".")
    lines[:, :, column + 2:column + _VALUE_WIDTH] = digits[:, :, 1:]
    column += _VALUE_WIDTH
    lines[:, :, column] = ord(" ")
    lines[:, :, column + 1:column + 1 + _TIMESTAMP_WIDTH] = _digits(timestamps.astype(np.int64), _TIMESTAMP_WIDTH)[None]
    lines[:, :, -1] = ord("\n")
    return lines.tobytes()


def write_openmetrics(path: Path, dataset: Dataset, first: int, last: int) -> int:
    """Write the samples at grid points in [first, last] to `path`; return the bytes written."""
    timestamps = np.arange(first, last + 1, dataset.step, dtype=np.int64)
    names = dataset.entity_names()
    entities_per_write = max(1, _LINES_PER_WRITE // max(timestamps.size, 1))
    written = 0
    with open(path, "wb") as handle:
        for signal_index, signal in enumerate(SIGNALS):
            metric = metric_name(signal)
            prefixes = _prefixes(names, metric)
            written += handle.write(f"# TYPE {metric} gauge\n".encode())
            for begin in range(0, dataset.entities, entities_per_write):
                rows = np.arange(begin, min(begin + entities_per_write, dataset.entities))
                block = values(dataset, signal_index, rows, timestamps.astype(np.float64))
                written += handle.write(render_lines(prefixes[rows], block, timestamps))
        written += handle.write(b"# EOF\n")
    return written


def block_ranges(dataset: Dataset, block_seconds: int) -> list[tuple[int, int]]:
    """Split the grid into runs that each lie inside one aligned block range of promtool."""
    ranges = []
    first = dataset.start
    while first <= dataset.end:
        block_end = (first // block_seconds + 1) * block_seconds
        last = min(dataset.end, block_end - dataset.step)
        last -= (last - dataset.start) % dataset.step
        ranges.append((first, last))
        first = last + dataset.step
    return ranges


def run_promtool(path: Path, tsdb: Path, block_seconds: int) -> None:
    # --max-block-duration is hidden in promtool 2.42's help, but accepted; without it promtool
    # cuts 2 h blocks and re-reads the file once for each of them.
    command = ["promtool", "tsdb", "create-blocks-from", "openmetrics", "--quiet",
               f"--max-block-duration={block_seconds}s", str(path), str(tsdb)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"promtool failed on {path} with exit code {result.returncode}: {result.stderr.strip()[-2000:]}")


def backfill(dataset: Dataset, tsdb: Path, scratch: Path, block_seconds: int = 86400) -> dict:
    """Write one OpenMetrics file per block range and turn each into a TSDB block with promtool.

    The next file is written while promtool reads the previous one, and each file is deleted once
    its block exists, so the scratch folder holds at most two files.
    """
    if shutil.which("promtool") is None:
        raise RuntimeError("promtool not found on PATH; install it with: apt-get install prometheus")
    tsdb.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    ranges = block_ranges(dataset, block_seconds)
    began = time.monotonic()
    totals = {"files": len(ranges), "bytes": 0, "write_seconds": 0.0, "promtool_seconds": 0.0}

    def convert(path: Path) -> float:
        started = time.monotonic()
        run_promtool(path, tsdb, block_seconds)
        path.unlink()
        return time.monotonic() - started

    with ThreadPoolExecutor(max_workers=1) as promtool_worker:
        pending = None
        for index, (first, last) in enumerate(ranges):
            path = scratch / f"range-{index:03d}-{first}.om"
            started = time.monotonic()
            totals["bytes"] += write_openmetrics(path, dataset, first, last)
            totals["write_seconds"] += time.monotonic() - started
            if pending is not None:
                totals["promtool_seconds"] += pending.result()
            logger.info("range %d of %d written (%s to %s)", index + 1, len(ranges), first, last)
            pending = promtool_worker.submit(convert, path)
        if pending is not None:
            totals["promtool_seconds"] += pending.result()
    totals["seconds"] = time.monotonic() - began
    totals["samples"] = dataset.samples
    return totals


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Backfill synthetic bench_* gauges into a Prometheus TSDB folder.")
    parser.add_argument("--entities", type=int, required=True, help="number of hosts")
    parser.add_argument("--start", type=int, required=True, help="first sample time, Unix seconds, a multiple of --step")
    parser.add_argument("--end", type=int, required=True, help="last sample time, Unix seconds")
    parser.add_argument("--step", type=int, default=30, help="seconds between samples (default 30)")
    parser.add_argument("--block-hours", type=int, default=24, help="hours per TSDB block and per OpenMetrics file (default 24)")
    parser.add_argument("--tsdb", type=Path, required=True, help="Prometheus --storage.tsdb.path to fill")
    parser.add_argument("--scratch", type=Path, required=True, help="folder for the temporary OpenMetrics files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    dataset = Dataset(args.entities, args.start, args.end, args.step)
    totals = backfill(dataset, args.tsdb, args.scratch, args.block_hours * 3600)
    logger.info("backfilled %d samples in %.1fs: %s", dataset.samples, totals["seconds"], totals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
