"""Read labelled data sets into the service's Frame layout.

A data set yields units. A unit is what one detector sees: one or more entities (machines or
pods), a training part and a labelled test part on one time grid. SMD and ASD carry no
timestamps, so their grid is synthesised at the data's step from a fixed origin. Nezha and NAB
keep their real times, rounded to the data's step.
"""

from __future__ import annotations

import calendar
import csv
import json
import lzma
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.frames import Frame

DATA_DIR_ENV = "ANOMALY_DATASETS_DIR"
DATASETS = ("smd", "asd", "nezha", "nab")
# Synthesised grids start here (2024-01-01T00:00:00Z) so that timestamps look like real ones.
SYNTHETIC_ORIGIN = 1_704_067_200.0

SMD_SIGNALS = (
    "cpu_r load_1 load_5 load_15 mem_shmem mem_u mem_u_e total_mem disk_q disk_r disk_rb disk_svc disk_u "
    "disk_w disk_wa disk_wb si so eth1_fi eth1_fo eth1_pi eth1_po tcp_tw tcp_use active_opens curr_estab "
    "in_errs in_segs listen_overflows out_rsts out_segs passive_opens retransegs tcp_timeouts udp_in_dg "
    "udp_out_dg udp_rcv_buf_errs udp_snd_buf_errs").split()
NEZHA_SIGNALS = (
    "cpu_usage cpu_usage_rate memory_usage memory_usage_rate syscall_read syscall_write network_receive_bytes "
    "network_transmit_bytes client_latency_p90 server_latency_p90 client_latency_p95 server_latency_p95 "
    "client_latency_p99 server_latency_p99 workload success_rate node_cpu_usage_rate node_memory_usage_rate "
    "node_network_receive_bytes").split()
# Nezha's faults last 3 minutes; the label covers the minutes that contain them.
NEZHA_FAULT_SECONDS = 180.0
# Train on the fault-free end of the earlier day, test on the faults of the later day.
NEZHA_SPLITS = {
    "online-boutique": ("2022-08-22", "2022-08-23"),
    "train-ticket": ("2023-01-29", "2023-01-30"),
}
# Faults stop in the first hours of each day; this much time after the last one starts the
# fault-free training part, and the test part ends this long after the last fault.
NEZHA_SETTLE_SECONDS = 1800.0
# NAB has no training split. Its own scorer ignores the first 15 % of each series (the
# "probationary period"), so that is the training part here and the rest is the test part.
NAB_PROBATION = 0.15


class DatasetError(Exception):
    """A data set folder, file or unit that is missing or unreadable."""


@dataclass
class Unit:
    """One detector's data: a frame over training and test, labels per entity and test step."""

    dataset: str
    name: str
    signals: list[str]
    frame: Frame
    test_start: int  # index on the frame's time axis of the first test step
    labels: np.ndarray  # [entity, test step] 0/1
    note: str = ""

    @property
    def step(self) -> float:
        return self.frame.step

    @property
    def test_steps(self) -> int:
        return self.frame.values.shape[1] - self.test_start


def resolve_data_dir(value: str | None) -> Path:
    """Return the data sets folder from the option or the environment; raise DatasetError if unusable."""
    text = value or os.environ.get(DATA_DIR_ENV)
    if not text:
        raise DatasetError(f"no data sets folder given: pass --data-dir DIR or set {DATA_DIR_ENV}")
    path = Path(text)
    if not path.is_dir():
        raise DatasetError(f"data sets folder {str(path)!r} (from --data-dir or {DATA_DIR_ENV}) is not a directory")
    return path


def list_units(root: Path, dataset: str) -> list[str]:
    """Return the names of the units of a data set that have values on disk."""
    if dataset == "smd":
        folder = root / "smd" / "ServerMachineDataset" / "train"
        return sorted(_stem(p) for p in _existing(folder).iterdir())
    if dataset == "asd":
        folder = root / "asd" / "processed"
        names = {p.name.split("_")[0] for p in _existing(folder).glob("omi-*_train.txt*")}
        return sorted(names, key=lambda n: int(n.split("-")[1]))
    if dataset == "nezha":
        return list(NEZHA_SPLITS)
    if dataset == "nab":
        return sorted(_nab_files(root))
    raise DatasetError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")


def load_unit(root: Path, dataset: str, name: str) -> Unit:
    loaders = {"smd": _load_smd, "asd": _load_asd, "nezha": _load_nezha, "nab": _load_nab}
    if dataset not in loaders:
        raise DatasetError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")
    known = list_units(root, dataset)
    if name not in known:
        raise DatasetError(f"{dataset} has no unit {name!r}; available: {', '.join(known)}")
    return loaders[dataset](root, name)


def _stem(path: Path) -> str:
    return path.name.split(".txt")[0]


def _existing(folder: Path) -> Path:
    if not folder.is_dir():
        raise DatasetError(f"folder {str(folder)!r} is missing; check the data sets folder")
    return folder


def _find(folder: Path, stem: str) -> Path:
    for suffix in (".txt.xz", ".txt"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    raise DatasetError(f"file {stem}.txt(.xz) not found in {folder}")


def _matrix(path: Path) -> np.ndarray:
    values = np.loadtxt(path, delimiter=",", ndmin=2)
    return values.astype(np.float64)


def _single_entity_unit(dataset: str, name: str, signals: list[str], step: float, train: np.ndarray,
                        test: np.ndarray, labels: np.ndarray) -> Unit:
    if train.shape[1] != test.shape[1] or test.shape[0] != labels.shape[0]:
        raise DatasetError(f"{dataset}/{name}: train {train.shape}, test {test.shape} and labels "
                           f"{labels.shape} do not fit together")
    values = np.concatenate([train, test])[None, :, :]
    frame = Frame(SYNTHETIC_ORIGIN, step, [(name,)], values)
    return Unit(dataset, name, signals, frame, train.shape[0], labels.astype(np.int8)[None, :])


def _load_smd(root: Path, name: str) -> Unit:
    base = root / "smd" / "ServerMachineDataset"
    train = _matrix(_find(base / "train", name))
    test = _matrix(_find(base / "test", name))
    labels = np.loadtxt(_find(base / "test_label", name)).astype(int)
    return _single_entity_unit("smd", name, SMD_SIGNALS[: train.shape[1]], 60.0, train, test, labels)


def _load_asd(root: Path, name: str) -> Unit:
    base = root / "asd" / "processed"
    train = _matrix(_find(base, f"{name}_train"))
    test = _matrix(_find(base, f"{name}_test"))
    labels = np.loadtxt(_find(base, f"{name}_test_label")).astype(int)
    signals = [f"m{i:02d}" for i in range(train.shape[1])]
    return _single_entity_unit("asd", name, signals, 300.0, train, test, labels)


# ---- Nezha -----------------------------------------------------------------------------------

_POD_SUFFIX = re.compile(r"-[0-9a-f]{6,10}-[0-9a-z]{5}$")


def _service_of(pod: str) -> str:
    """Strip the ReplicaSet hash and pod suffix, so a service keeps its name across days."""
    return _POD_SUFFIX.sub("", pod)


def _utc_seconds(text: str) -> float:
    # The Time column reads '2022-08-22 03:51:19.607158889 +0000 UTC m=+0.11'; the fault list
    # uses '2022-08-22 03:53:54'. Both are UTC. The numeric timestamps are not used because some
    # days carry a constant offset in them.
    moment = time.strptime(text[:19], "%Y-%m-%d %H:%M:%S")
    return float(calendar.timegm(moment))


def _read_pod(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    with lzma.open(path, "rt", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2 or len(rows[0]) != 3 + len(NEZHA_SIGNALS):
        raise DatasetError(f"{path}: expected a header and {3 + len(NEZHA_SIGNALS)} columns")
    body = rows[1:]
    times = np.array([_utc_seconds(r[0]) for r in body])
    values = np.array([[_number(v) for v in r[3:]] for r in body])
    return _service_of(body[0][2]), times, values


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return np.nan


def _nezha_day(root: Path, day: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[tuple[str, float]]]:
    folder = root / "nezha" / "rca_data" / day
    pods = {}
    for path in sorted(_existing(folder / "metric").glob("*_metric.csv*")):
        service, times, values = _read_pod(path)
        pods[service] = (times, values)
    fault_file = folder / f"{day}-fault_list.json"
    try:
        grouped = json.loads(fault_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DatasetError(f"{fault_file}: cannot read the fault list: {error}") from None
    faults = [(_service_of(f["inject_pod"]), _utc_seconds(f["inject_time"])) for hour in grouped.values() for f in hour]
    return pods, sorted(faults, key=lambda f: f[1])


def _place(times: np.ndarray, values: np.ndarray, start: float, step: float, length: int, out: np.ndarray) -> None:
    index = np.rint((times - start) / step).astype(int)
    inside = (index >= 0) & (index < length)
    out[index[inside]] = values[inside]


def _load_nezha(root: Path, name: str) -> Unit:
    train_day, test_day = NEZHA_SPLITS[name]
    step = 60.0
    train_pods, train_faults = _nezha_day(root, train_day)
    test_pods, test_faults = _nezha_day(root, test_day)
    services = sorted(set(train_pods) & set(test_pods))

    train_start = np.floor((train_faults[-1][1] + NEZHA_SETTLE_SECONDS) / step) * step
    train_end = max(t.max() for t, _ in train_pods.values())
    test_begin = min(t.min() for t, _ in test_pods.values())
    test_end = test_faults[-1][1] + NEZHA_SETTLE_SECONDS
    test_start = np.floor(test_begin / step) * step
    train_steps = int((np.floor(train_end / step) * step - train_start) / step) + 1
    # The test part begins right after the training part on the frame's grid, so that the gap
    # between the two days is not a wall of missing steps that no window could cross.
    test_steps = int((np.floor(test_end / step) * step - test_start) / step) + 1

    values = np.full((len(services), train_steps + test_steps, len(NEZHA_SIGNALS)), np.nan)
    labels = np.zeros((len(services), test_steps), dtype=np.int8)
    for row, service in enumerate(services):
        _place(*train_pods[service], train_start, step, train_steps, values[row, :train_steps])
        _place(*test_pods[service], test_start, step, test_steps, values[row, train_steps:])
    for service, moment in test_faults:
        if service in services:
            first = int(np.floor((moment - test_start) / step))
            last = int(np.floor((moment + NEZHA_FAULT_SECONDS - test_start) / step))
            labels[services.index(service), max(first, 0):last + 1] = 1

    frame = Frame(train_start, step, [(s,) for s in services], values)
    note = (f"trained on {train_day} after its last fault, tested on the faults of {test_day}; "
            f"the gap between the days is removed from the time grid")
    return Unit("nezha", name, list(NEZHA_SIGNALS), frame, train_steps, labels, note)


# ---- NAB -------------------------------------------------------------------------------------


def _nab_files(root: Path) -> dict[str, Path]:
    """Map each series' name (its file name without .csv) to its file, over every category folder."""
    files: dict[str, Path] = {}
    for path in sorted(_existing(root / "nab" / "data").glob("*/*.csv*")):
        name = path.name.split(".csv")[0]
        if name in files:
            raise DatasetError(f"nab: series {name!r} is in both {files[name].parent.name} and {path.parent.name}")
        files[name] = path
    return files


def _read_nab_series(path: Path) -> tuple[np.ndarray, np.ndarray]:
    opener = lzma.open if path.suffix == ".xz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        times = np.array([_utc_seconds(r[0]) for r in rows[1:]])
        values = np.array([_number(r[1]) for r in rows[1:]])
    except (OSError, ValueError, IndexError, lzma.LZMAError) as error:
        raise DatasetError(f"{path}: expected 'timestamp,value' rows: {error}") from None
    if times.size < 2:
        raise DatasetError(f"{path}: needs at least 2 rows, found {times.size}")
    return times, values


def _nab_windows(root: Path) -> dict[str, list]:
    path = root / "nab" / "labels" / "combined_windows.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DatasetError(f"{path}: cannot read the anomaly windows: {error}") from None


def _load_nab(root: Path, name: str) -> Unit:
    path = _nab_files(root)[name]
    times, values = _read_nab_series(path)
    # A few series skip or repeat a timestamp, so the step is the median interval between rows.
    step = float(np.median(np.diff(np.sort(times))))
    start = float(times.min())
    length = int(round((times.max() - start) / step)) + 1
    grid = np.full(length, np.nan)
    _place(times, values, start, step, length, grid)

    marked = np.zeros(length, dtype=np.int8)
    for first, last in _nab_windows(root).get(f"{path.parent.name}/{name}.csv", []):
        low = int(np.ceil((_utc_seconds(first) - start) / step))
        high = int(np.floor((_utc_seconds(last) - start) / step))
        marked[max(low, 0):max(high + 1, 0)] = 1

    test_start = int(length * NAB_PROBATION)
    frame = Frame(start, step, [(name,)], grid[None, :, None])
    note = f"{path.parent.name}; trained on the first {NAB_PROBATION:.0%} of the series, NAB's probationary period"
    return Unit("nab", name, ["value"], frame, test_start, marked[None, test_start:], note)
