"""NAB series read from a hand-made folder in NAB's layout, and a run over them that skips a bad one."""

from __future__ import annotations

import calendar
import csv
import json
import lzma
import os
import time
from pathlib import Path

import numpy as np
import pytest

from monitor.cli import main
from monitor.evaluation.datasets import DATA_DIR_ENV, NAB_PROBATION, DatasetError, list_units, load_unit

STEP = 300.0
# Long enough that its first 15 % contains the windows a first model needs.
LENGTH = 3000
ORIGIN = "2015-03-01 00:00:00"


def _stamp(offset_steps: float) -> str:
    moment = calendar.timegm(time.strptime(ORIGIN, "%Y-%m-%d %H:%M:%S")) + offset_steps * STEP
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(moment))


def _write_series(path: Path, offsets, values) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "value"])
        writer.writerows([_stamp(o), f"{v:.4f}"] for o, v in zip(offsets, values))


def _write_windows(root: Path, windows: dict) -> None:
    labels = root / "nab" / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    (labels / "combined_windows.json").write_text(json.dumps(windows), encoding="utf-8")


def _daily_cycle(steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 50 + 20 * np.sin(2 * np.pi * np.arange(steps) / 288) + rng.normal(0, 1, steps)


@pytest.fixture
def nab_root(tmp_path) -> Path:
    """One compressed series with a missing row and a labelled window, one plain series without labels."""
    root = tmp_path / "datasets"
    offsets = [o for o in range(LENGTH) if o != 2100]  # one row missing
    cpu = _daily_cycle(LENGTH, 1)
    cpu[2400:2420] += 60  # the labelled anomaly
    _write_series(root / "nab" / "data" / "realAWSCloudwatch" / "cpu_a.csv.xz", offsets, cpu[offsets])
    _write_series(root / "nab" / "data" / "artificialNoAnomaly" / "quiet.csv", range(LENGTH), _daily_cycle(LENGTH, 2))
    # NAB's window bounds carry microseconds; this one covers steps 2390 to 2430 inclusive.
    _write_windows(root, {"realAWSCloudwatch/cpu_a.csv": [[_stamp(2390) + ".000000", _stamp(2430) + ".000000"]],
                          "realTweets/not_here.csv": [[_stamp(1), _stamp(2)]]})
    return root


def test_series_listed_by_name_over_every_folder(nab_root):
    assert list_units(nab_root, "nab") == ["cpu_a", "quiet"]


def test_series_on_its_grid_with_window_labels(nab_root):
    unit = load_unit(nab_root, "nab", "cpu_a")

    assert unit.step == STEP
    assert unit.signals == ["value"]
    assert unit.frame.values.shape == (1, LENGTH, 1)
    assert np.isnan(unit.frame.values[0, 2100, 0])
    assert np.isfinite(unit.frame.values[0, 2099, 0])
    assert unit.test_start == int(LENGTH * NAB_PROBATION)

    labelled = np.flatnonzero(unit.labels[0]) + unit.test_start
    assert labelled[0] == 2390
    assert labelled[-1] == 2430
    assert labelled.size == 41


def test_series_without_windows_has_no_labels(nab_root):
    unit = load_unit(nab_root, "nab", "quiet")
    assert unit.labels.sum() == 0
    assert unit.labels.shape == (1, LENGTH - unit.test_start)


def test_same_name_in_two_folders_rejected(nab_root):
    _write_series(nab_root / "nab" / "data" / "realKnownCause" / "quiet.csv", range(10), np.ones(10))
    with pytest.raises(DatasetError, match="quiet.*artificialNoAnomaly.*realKnownCause"):
        list_units(nab_root, "nab")


def test_malformed_row_names_the_file(nab_root):
    path = nab_root / "nab" / "data" / "realKnownCause" / "broken.csv"
    path.parent.mkdir()
    path.write_text("timestamp,value\nyesterday,4\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="broken.csv.*timestamp,value"):
        load_unit(nab_root, "nab", "broken")


QUICK_RUN = ["--protocol", "static", "--methods", "product,input_l2", "--seeds", "0", "--epochs", "1",
             "--max-windows", "256", "--torch-threads", "1"]


def test_run_skips_a_series_too_short_to_fit(nab_root, tmp_path):
    _write_series(nab_root / "nab" / "data" / "realKnownCause" / "short.csv", range(120), _daily_cycle(120, 3))
    out = tmp_path / "results"

    code = main(["evaluate", "--data-dir", str(nab_root), "--dataset", "nab", "--out", str(out)] + QUICK_RUN)

    assert code == 0
    with open(out / "per_unit.csv", encoding="utf-8") as handle:
        units = {row["unit"] for row in csv.DictReader(handle)}
    assert units == {"cpu_a", "quiet"}
    skipped = json.loads((out / "config.json").read_text())["skipped"]
    assert list(skipped) == ["nab/short"]
    assert "too few" in skipped["nab/short"]
    assert "Skipped nab/short" in (out / "summary.md").read_text()


def test_run_with_no_fittable_series_fails(tmp_path, capsys):
    root = tmp_path / "datasets"
    _write_series(root / "nab" / "data" / "realKnownCause" / "short.csv", range(120), _daily_cycle(120, 3))
    _write_windows(root, {})

    code = main(["evaluate", "--data-dir", str(root), "--dataset", "nab", "--out", str(tmp_path / "out")] + QUICK_RUN)

    assert code != 0
    assert "no unit could be evaluated" in capsys.readouterr().err


def test_real_series_both_protocols(tmp_path):
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set: point it at the folder holding nab/")
    out = tmp_path / "results"

    code = main(["evaluate", "--data-dir", value, "--dataset", "nab", "--units", "ec2_cpu_utilization_53ea38",
                 "--methods", "product,knn1", "--seeds", "0", "--epochs", "1", "--warm-start-epochs", "1",
                 "--max-windows", "256", "--train-every", "2d", "--torch-threads", "1", "--out", str(out)])

    assert code == 0
    with open(out / "per_unit.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["protocol"], r["method"]) for r in rows} == {
        ("static", "product"), ("static", "knn1"), ("deployed", "product"), ("deployed", "knn1")}
    for row in rows:
        assert float(row["events"]) == 2
        assert 0.0 <= float(row["best_f1"]) <= 1.0
