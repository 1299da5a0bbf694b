"""Small detectors, synthetic frames and a trained bundle shared by the unit tests.

The models are deliberately tiny (hidden size 8, 3 epochs) so that a training run takes well
under a second on one CPU thread.
"""

from __future__ import annotations

import numpy as np
import torch

from monitor.bundle import ModelBundle
from monitor.config import DetectorConfig
from monitor.frames import Frame
from monitor.training import Trainer

# The service runs torch on one thread by default (torch_threads: 1), and so do the tests. On a
# busy 2-core machine, two threads made these small trainings about ten times slower.
torch.set_num_threads(1)

SIGNALS = ("cpu", "memory", "network")
ENTITIES = [("node-a",), ("node-b",), ("node-c",)]
# A fixed, step-aligned start keeps the frames identical from run to run.
START = 1_700_000_040.0
STEP = 60.0


def detector_config(**overrides) -> DetectorConfig:
    """Return a small, valid detector; keyword arguments replace top-level sections of it."""
    raw = {
        "name": "node",
        "entity_labels": ["instance"],
        "step": "60s",
        "window": 12,
        "signals": {name: f"sum by (instance) ({name}_metric)" for name in SIGNALS},
        "model": {"hidden_size": 8, "latent_size": 4},
        "train": {"range": "8h", "epochs": 3, "min_windows": 16, "seed": 1},
        "score": {"every": "60s", "aggregate_steps": 4, "top_contributions": 20},
        "threshold": {"method": "quantile", "false_alarm_rate": 0.01},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return DetectorConfig.model_validate(raw)


def normal_values(steps: int = 480, seed: int = 0, entities: int = len(ENTITIES)) -> np.ndarray:
    """Return [entity, time, signal] values of correlated, noisy periodic signals."""
    rng = np.random.default_rng(seed)
    time_axis = np.arange(steps)
    values = np.empty((entities, steps, len(SIGNALS)))
    for row in range(entities):
        cycle = np.sin(2 * np.pi * time_axis / 60 + row)
        values[row, :, 0] = 0.5 + 0.2 * cycle + 0.02 * rng.standard_normal(steps)
        values[row, :, 1] = 0.3 + 0.1 * cycle + 0.02 * rng.standard_normal(steps)
        values[row, :, 2] = 1000.0 + 20.0 * rng.standard_normal(steps)
    return values


def synthetic_frame(values: np.ndarray | None = None) -> Frame:
    values = normal_values() if values is None else values
    entities = [(f"node-{chr(ord('a') + row)}",) for row in range(values.shape[0])]
    return Frame(START, STEP, entities, values)


def train_bundle(detector: DetectorConfig | None = None, frame: Frame | None = None) -> ModelBundle:
    """Train a model on normal synthetic data and return it; fail if it was not accepted."""
    detector = detector or detector_config()
    outcome = Trainer(detector).train(frame or synthetic_frame(), None)
    if not outcome.accepted:
        raise AssertionError(f"the synthetic model was rejected: {outcome.reason}")
    return outcome.bundle
