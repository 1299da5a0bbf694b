"""Time the decoding of one query_range response, JSON -> numpy, without Prometheus.

    python -m bench.decode --series 1000 --points 2880

Times orjson.loads of a synthetic matrix response, then monitor.source._parse_result on the
decoded JSON, and, for reference, a plain conversion that unzips each series' [[t, "v"], ...]
pairs before numpy parses them. The last two start from the same decoded JSON, so they compare
only the work after orjson.loads.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import orjson

from monitor.source import _parse_result


def response_body(series: int, points: int, seed: int = 0) -> bytes:
    """Return a matrix response like Prometheus's: 16-digit values as strings, one series per host."""
    rng = np.random.default_rng(seed)
    timestamps = (1_700_000_000 + 30 * np.arange(points)).tolist()
    result = []
    for index in range(series):
        samples = [repr(float(v)) for v in 1 + 9 * rng.random(points)]
        result.append({"metric": {"instance": f"host-{index:05d}"}, "values": [list(p) for p in zip(timestamps, samples)]})
    return orjson.dumps({"status": "success", "data": {"resultType": "matrix", "result": result}})


def unzip_pairs(result: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Convert each series by splitting timestamps from values before numpy parses the strings."""
    converted = []
    for item in result:
        timestamps, samples = zip(*item["values"])
        converted.append((np.array(timestamps, dtype=np.float64), np.array(samples).astype(np.float64)))
    return converted


def _best_of(repeats: int, function, *args) -> float:
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        function(*args)
        best = min(best, time.perf_counter() - began)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time JSON -> numpy decoding of one query_range response.")
    parser.add_argument("--series", type=int, default=1000, help="series in the response (default 1000)")
    parser.add_argument("--points", type=int, default=2880, help="points per series (default 2880, one day at 30 s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each step; the fastest is shown (default 3)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    body = response_body(args.series, args.points)
    data = orjson.loads(body)
    samples = args.series * args.points
    timings = {
        "orjson.loads": _best_of(args.repeats, orjson.loads, body),
        "monitor _parse_result": _best_of(args.repeats, _parse_result, data["data"]),
        "unzip, then np.array": _best_of(args.repeats, unzip_pairs, data["data"]["result"]),
    }
    print(f"{args.series} series x {args.points} points = {samples:,} samples, {len(body) / 2**20:.1f} MiB of JSON")
    for name, seconds in timings.items():
        print(f"{name:24s} {seconds:8.3f} s {seconds / samples * 1e9:8.0f} ns/sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
