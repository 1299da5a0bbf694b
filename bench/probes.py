"""Timers, memory and CPU probes for the cycle benchmark, attached to monitor/ from outside.

The benchmark wraps a few monitor functions with timers in its own process. monitor/ itself is
not changed, and a process that does not import this module runs the unwrapped code.
"""

from __future__ import annotations

import functools
import os
import resource
import time
from collections import defaultdict

import monitor.bundle
import monitor.detector
import monitor.frames
import monitor.history
import monitor.model
import monitor.source
import monitor.training
from monitor.bundle import ModelBundle
from monitor.detector import DetectorRuntime
from monitor.exporter import Exposition
from monitor.history import History
from monitor.source import PrometheusSource
from monitor.training import Trainer

# Each timed function maps to one phase of the report. Times are exclusive: a timed function
# called inside another counts only in its own phase, so the phases add up to at most the total.
PHASES = {
    "http": "query",           # PrometheusSource._get_once without its _decode: request, wait, body read
    "json": "decode",          # orjson.loads of the response body
    "arrays": "decode",        # JSON sample lists -> numpy arrays
    "frame_build": "frame",    # series aligned onto the step grid, one frame per fetch
    "frame_place": "frame",    # frames merged onto one grid: the score buffer and history reads
    "history_read": "history",
    "history_write": "history",
    "scale": "scale",          # per-entity robust scaling of windows
    "scalers": "scale",        # fitting the per-entity scalers during training
    "forward": "model",        # LSTM-AE forward pass (scoring, calibration, flagged-window check)
    "fit": "model",            # the training loop
    "render": "export",        # rendering /metrics
}


class Timers:
    """Exclusive wall-clock time and call counts per timer name, for one thread."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.spans: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []

    def wrap(self, name: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            began = time.perf_counter()
            self._inner.append(0.0)
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - began
                inner = self._inner.pop()
                self.seconds[name] += elapsed - inner
                self.calls[name] += 1
                if self._inner:
                    self._inner[-1] += elapsed

        return timed

    def span(self, name: str, function):
        """Wrap a function whose inclusive time is reported on its own, outside the phases."""
        @functools.wraps(function)
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.spans[name] += time.perf_counter() - began

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.spans.clear()

    def phases(self, total: float) -> dict[str, float]:
        """Sum the timers into report phases; `other` is the total less every timed phase."""
        sums: dict[str, float] = defaultdict(float)
        for name, seconds in self.seconds.items():
            sums[PHASES[name]] += seconds
        sums["other"] = max(total - sum(sums.values()), 0.0)
        return dict(sums)


def instrument(timers: Timers) -> None:
    """Replace the monitor functions named in PHASES with timed wrappers, where their callers look them up."""
    PrometheusSource._get_once = timers.wrap("http", PrometheusSource._get_once)
    monitor.source._decode = timers.wrap("json", monitor.source._decode)
    monitor.source._parse_result = timers.wrap("arrays", monitor.source._parse_result)
    monitor.frames.build_frame = timers.wrap("frame_build", monitor.frames.build_frame)

    place = timers.wrap("frame_place", monitor.history.place_frames)
    monitor.history.place_frames = place
    monitor.detector.place_frames = place
    History.read = timers.wrap("history_read", History.read)
    History.write_segment = timers.wrap("history_write", History.write_segment)

    ModelBundle.scale = timers.wrap("scale", ModelBundle.scale)
    monitor.training.fit_scalers = timers.wrap("scalers", monitor.training.fit_scalers)
    forward = timers.wrap("forward", monitor.model.reconstruct)
    monitor.model.reconstruct = forward
    monitor.bundle.reconstruct = forward
    monitor.training.fit = timers.wrap("fit", monitor.training.fit)
    Exposition.render = timers.wrap("render", Exposition.render)

    # Inclusive spans of the training run, to see which step the phases above come from.
    DetectorRuntime._backfill = timers.span("backfill_from_prometheus", DetectorRuntime._backfill)
    DetectorRuntime.training_frame = timers.span("training_frame", DetectorRuntime.training_frame)
    Trainer._drop_flagged = timers.span("drop_flagged_windows", Trainer._drop_flagged)
    Trainer._calibrate = timers.span("calibrate", Trainer._calibrate)
    Trainer._check = timers.span("acceptance_check", Trainer._check)
    DetectorRuntime._score = timers.span("score_entities", DetectorRuntime._score)


def _status_kib(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not found in /proc/{pid}/status")


def rss_mib(pid: int | str = "self") -> float:
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int | str = "self") -> float:
    """Return the peak resident set size (VmHWM, what getrusage's ru_maxrss reports for the process)."""
    return _status_kib(pid, "VmHWM") / 1024


def reset_peak_rss(pid: int | str = "self") -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0 and later).
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_cpu_seconds() -> float:
    """Return the CPU seconds all processes have used since boot, summed over CPUs, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds of another process, from /proc/<pid>/stat (10 ms resolution)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        text = handle.read()
    # The command name may hold spaces, so count the fields after its closing bracket.
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
