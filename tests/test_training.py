"""Training on small synthetic multi-entity data: acceptance, determinism, rejections, exclusions."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from fixtures_unit import START, STEP, detector_config, normal_values, synthetic_frame, train_bundle
from monitor.training import Trainer, TrainingError, candidate_windows, fit_scalers, split_by_time


@pytest.fixture(scope="module")
def serving_bundle():
    return train_bundle()


def test_normal_data_accepted():
    outcome = Trainer(detector_config()).train(synthetic_frame(), None)

    assert outcome.accepted is True
    assert outcome.reason == "accepted"
    assert outcome.windows_used > 0
    assert math.isfinite(outcome.bundle.threshold.value)
    assert math.isfinite(outcome.bundle.statistics.condition_number)


def test_metadata_recorded():
    frame = synthetic_frame()
    outcome = Trainer(detector_config()).train(frame, None)
    metadata = outcome.bundle.metadata

    assert metadata["data_start"] == frame.start
    assert metadata["data_end"] == frame.end
    assert metadata["entities"] == 3
    assert metadata["windows_used"] == outcome.windows_used
    assert metadata["warm_started"] is False
    assert metadata["still_signals"] == {}


def test_same_seed_same_model():
    first = Trainer(detector_config()).train(synthetic_frame(), None).bundle
    second = Trainer(detector_config()).train(synthetic_frame(), None).bundle
    first_state, second_state = first.network.state_dict(), second.network.state_dict()

    for name in first_state:
        assert torch.equal(first_state[name], second_state[name]), name
    assert first.threshold.value == second.threshold.value
    np.testing.assert_array_equal(first.statistics.covariance, second.statistics.covariance)


def test_other_seed_other_model():
    first = Trainer(detector_config()).train(synthetic_frame(), None).bundle
    other = Trainer(detector_config(train={"seed": 2})).train(synthetic_frame(), None).bundle
    weights = "encoder.weight_ih_l0"

    assert not torch.equal(first.network.state_dict()[weights], other.network.state_dict()[weights])


def test_condition_number_limit_rejects():
    detector = detector_config(train={"max_condition_number": 1.01})
    outcome = Trainer(detector).train(synthetic_frame(), None)

    assert outcome.accepted is False
    assert "condition number" in outcome.reason
    assert "train.max_condition_number" in outcome.reason
    assert outcome.bundle is not None


def test_no_flagged_windows_without_current_model():
    outcome = Trainer(detector_config()).train(synthetic_frame(), None)

    assert outcome.windows_excluded["flagged"] == 0


# Inside the training part with the default split, where flagged windows are dropped.
ANOMALY_START, ANOMALY_LENGTH = 120, 30


def anomalous_frame(first_step: int = ANOMALY_START, length: int = ANOMALY_LENGTH):
    values = normal_values()
    values[1, first_step:first_step + length, 0] += 5.0
    return synthetic_frame(values)


def test_flagged_windows_excluded(serving_bundle):
    detector = detector_config()
    outcome = Trainer(detector).train(anomalous_frame(), serving_bundle)
    # Every window whose scored steps (its last aggregate_steps) touch the anomalous steps.
    anomalous_windows = ANOMALY_LENGTH + detector.score.aggregate_steps - 1

    assert outcome.windows_excluded["flagged"] >= anomalous_windows


def test_flagged_windows_cover_the_anomaly(serving_bundle):
    detector = detector_config()
    frame = anomalous_frame()
    trainer = Trainer(detector)
    windows, _ = candidate_windows(frame, detector)
    normal_windows, _ = trainer._drop_flagged(frame, windows, serving_bundle)
    scored_first = normal_windows.starts + detector.window - detector.score.aggregate_steps
    scored_last = normal_windows.starts + detector.window - 1
    end = ANOMALY_START + ANOMALY_LENGTH
    touches = (normal_windows.rows == 1) & (scored_last >= ANOMALY_START) & (scored_first < end)

    assert not touches.any()


def test_warm_start_from_current_model(serving_bundle):
    outcome = Trainer(detector_config()).train(synthetic_frame(), serving_bundle)

    assert outcome.bundle.metadata["warm_started"] is True


def test_cold_start_when_fingerprint_differs(serving_bundle):
    detector = detector_config(window=16)
    outcome = Trainer(detector).train(synthetic_frame(), serving_bundle)

    assert outcome.bundle.metadata["warm_started"] is False


def test_too_few_windows_raises():
    frame = synthetic_frame(normal_values(steps=60))
    with pytest.raises(TrainingError) as caught:
        Trainer(detector_config()).train(frame, None)
    message = str(caught.value)

    assert message.startswith("too few normal windows:")
    assert "(need 16)" in message
    assert "train.min_windows" in message


def test_gappy_windows_excluded_and_counted():
    values = normal_values()
    values[0, 100:200, :] = np.nan
    outcome = Trainer(detector_config()).train(synthetic_frame(values), None)

    assert outcome.windows_excluded["gaps"] > 0
    assert outcome.accepted is True


def test_all_gaps_raises():
    values = np.full((3, 480, 3), np.nan)
    with pytest.raises(TrainingError) as caught:
        Trainer(detector_config()).train(synthetic_frame(values), None)

    assert "'gaps': 1407" in str(caught.value)


def test_excluded_time_range_counted():
    exclude = [{"start": START + 100 * STEP, "end": START + 110 * STEP, "reason": "maintenance"}]
    detector = detector_config(train={"exclude": exclude})
    frame = synthetic_frame()
    _, excluded = candidate_windows(frame, detector)
    # Windows of 12 steps overlapping steps 100..110, for each of the 3 entities.
    overlapping = (110 - 100 + detector.window) * 3

    assert excluded["excluded_range"] == overlapping


def test_split_by_time_is_disjoint():
    detector = detector_config()
    frame = synthetic_frame()
    windows, _ = candidate_windows(frame, detector)
    training, validation, holdout = split_by_time(frame, windows, detector)
    training_last = (training.starts + detector.window - 1).max()
    validation_last = (validation.starts + detector.window - 1).max()

    assert training_last < validation.starts.min()
    assert validation_last < holdout.starts.min()


def test_split_of_short_history_keeps_proportions():
    detector = detector_config()
    values = normal_values()
    # A range of 480 steps whose first 300 precede the history, as on a new Prometheus.
    values[:, :300, :] = np.nan
    frame = synthetic_frame(values)
    windows, _ = candidate_windows(frame, detector)
    training, validation, holdout = split_by_time(frame, windows, detector)
    observed = 480 - 300
    holdout_fraction = detector.train.holdout_fraction

    assert training.rows.size > 0
    assert validation.rows.size > 0
    assert holdout.starts.min() == 300 + int(observed * (1 - holdout_fraction))


def test_short_history_trains_first_model():
    values = normal_values()
    values[:, :300, :] = np.nan
    outcome = Trainer(detector_config()).train(synthetic_frame(values), None)

    assert outcome.accepted is True


def test_scalers_fitted_on_held_out_part():
    values = normal_values()
    held_out_start = int(values.shape[1] * (1 - detector_config().train.holdout_fraction))
    values[:, held_out_start:, 0] += 10.0
    frame = synthetic_frame(values)
    scalers, _ = fit_scalers(frame, detector_config())
    training_spread = float(np.std(values[0, :held_out_start, 0]))

    # A scaler of the training part alone would not know the held-out level, 10 higher.
    assert scalers[frame.entities[0]].scale[0] > 10 * training_spread


def test_still_signal_reported(caplog):
    values = normal_values()
    values[:2, :, 2] = 0.0  # network sits at 0 on two of the three entities

    with caplog.at_level(logging.WARNING, logger="monitor.training"):
        outcome = Trainer(detector_config()).train(synthetic_frame(values), None)

    assert outcome.bundle.metadata["still_signals"] == {"network": 2}
    assert "network (2 of 3 entities)" in caplog.text
