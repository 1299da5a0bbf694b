"""An SMD machine backfilled into a real Prometheus scores the same through `backtest` as from the file.

A slice of machine-1-6 is written as OpenMetrics, turned into TSDB blocks with
`promtool tsdb create-blocks-from openmetrics`, and served by a Prometheus on a loopback port.
A small model trained on the start of the slice is saved as the service saves it. Then
`anomaly-monitor backtest` reads the rest of the slice through the normal query path. Its CSV
must match score_range on the same steps read straight from the file.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from monitor.cli import main
from monitor.config import DetectorConfig
from monitor.evaluation.datasets import DATA_DIR_ENV, load_unit
from monitor.frames import Frame, grid_floor
from monitor.localstack import LocalStack, MissingBinary
from monitor.persistence import load_latest, save_bundle
from monitor.bundle import config_fingerprint
from monitor.replay import score_range
from monitor.training import Trainer

MACHINE = "machine-1-6"
STEP = 60.0
TRAIN_STEPS = 400
SCORED_STEPS = 200
WINDOW = 10


def _data_dir() -> Path:
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        pytest.skip(f"{DATA_DIR_ENV} is not set: point it at the folder holding smd/")
    return Path(value)


def _openmetrics(signals: list[str], values: np.ndarray, start: float) -> str:
    """One gauge family per signal; OpenMetrics timestamps are in seconds and the text ends with # EOF."""
    lines = []
    for column, signal in enumerate(signals):
        lines.append(f"# TYPE smd_{signal} gauge")
        for index, value in enumerate(values[:, column]):
            lines.append(f'smd_{signal}{{instance="{MACHINE}"}} {float(value)!r} {start + index * STEP:.0f}')
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _detector(signals: list[str]) -> DetectorConfig:
    return DetectorConfig(
        name="smd", entity_labels=["instance"], step=STEP, window=WINDOW,
        signals={s: f"smd_{s}" for s in signals},
        model={"hidden_size": 8, "latent_size": 4},
        train={"range": "1d", "epochs": 2, "max_windows": 256, "min_windows": 16},
        score={"every": "1m", "aggregate_steps": 5},
    )


def test_reordered_signals_change_fingerprint():
    # The network's input columns follow the config's signal order, so a saved model must not
    # load under a config that lists the same signals in another order.
    detector = _detector(["cpu_r", "load_1", "mem_u"])
    reordered = detector.model_copy(update={"signals": dict(reversed(list(detector.signals.items())))})
    assert config_fingerprint(detector) != config_fingerprint(reordered)


@pytest.mark.integration
def test_backtest_matches_file_scores(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found on PATH: install the Debian package `prometheus`")
    unit = load_unit(_data_dir(), "smd", MACHINE)
    # A slice of the test part, where incidents give the scores some range.
    first = unit.test_start
    values = unit.frame.values[0, first:first + TRAIN_STEPS + SCORED_STEPS]
    signals = unit.signals

    # Recent timestamps keep the blocks inside Prometheus' retention; two hours back keeps
    # them out of the head block.
    start = grid_floor(time.time() - 2 * 3600, STEP) - (values.shape[0] - 1) * STEP
    (tmp_path / "smd.om").write_text(_openmetrics(signals, values, start))
    subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(tmp_path / "smd.om"),
                    str(tmp_path / "prometheus-data")], check=True, capture_output=True)

    detector = _detector(signals)
    training = Frame(start, STEP, [(MACHINE,)], values[None, :TRAIN_STEPS])
    outcome = Trainer(detector).train(training, None)
    assert outcome.accepted, outcome.reason
    storage = tmp_path / "storage"
    save_bundle(storage / detector.name, outcome.bundle)

    stack = LocalStack(tmp_path)
    try:
        url = stack.start_prometheus(scrape_configs=[])
    except MissingBinary as error:
        pytest.skip(str(error))
    try:
        config = {"prometheus": {"url": url}, "storage": {"path": str(storage)},
                  "detectors": [detector.model_dump(mode="json")]}
        (tmp_path / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        scored_start = start + TRAIN_STEPS * STEP
        scored_end = start + (values.shape[0] - 1) * STEP
        code = main(["backtest", "--config", str(tmp_path / "config.yml"), "--from", f"{scored_start:.0f}",
                     "--to", f"{scored_end:.0f}", "--out", str(tmp_path / "backtest")])
    finally:
        stack.stop()
    assert code == 0

    with open(tmp_path / "backtest" / "smd.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    through_prometheus = {float(r["timestamp"]): float(r["score"]) for r in rows}
    assert len(through_prometheus) == SCORED_STEPS

    # The same saved model, scoring the same steps read from the file, with one window before them.
    bundle = load_latest(storage / detector.name, config_fingerprint(detector))
    lead = TRAIN_STEPS - (WINDOW - 1)
    from_file = Frame(start + lead * STEP, STEP, [(MACHINE,)], values[None, lead:])
    expected = score_range(bundle, detector, from_file)
    for index in range(WINDOW - 1, from_file.values.shape[1]):
        moment = float(expected.timestamps[index])
        # The CSV keeps 6 significant digits.
        assert through_prometheus[moment] == pytest.approx(expected.scores[0, index], rel=1e-5, abs=1e-9), moment
    assert np.ptp(list(through_prometheus.values())) > 0
