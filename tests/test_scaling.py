"""Robust per-entity scaling, including constant and all-missing signals."""

from __future__ import annotations

import numpy as np

from monitor.scaling import ABSOLUTE_SCALE_FLOOR, RELATIVE_SCALE_FLOOR, STD_SHARE_FLOOR, fit_scaler, observed_steps


def test_normal_signal_median_and_iqr():
    rng = np.random.default_rng(0)
    values = rng.normal(loc=10.0, scale=2.0, size=(20000, 1))
    scaler = fit_scaler(values)

    assert abs(scaler.center[0] - 10.0) < 0.1
    assert abs(scaler.scale[0] - 2.0) < 0.1


def test_constant_signal_finite_positive_scale():
    values = np.column_stack([np.linspace(0, 1, 100), np.full(100, 250.0)])
    scaler = fit_scaler(values)
    scaled = scaler.transform(values)

    assert scaler.scale[1] > 0
    assert scaler.scale[1] == RELATIVE_SCALE_FLOOR * 250.0
    assert np.isfinite(scaled).all()
    assert np.all(scaled[:, 1] == 0.0)


def test_constant_zero_signal_uses_absolute_floor():
    scaler = fit_scaler(np.zeros((50, 1)))

    assert scaler.center[0] == 0.0
    assert scaler.scale[0] == ABSOLUTE_SCALE_FLOOR


def test_constant_signal_that_moves_is_large_after_scaling():
    scaler = fit_scaler(np.full((100, 1), 4.0))

    assert scaler.transform(np.array([[5.0]]))[0, 0] > 100


def test_mostly_constant_signal_uses_standard_deviation():
    values = np.zeros((100, 1))
    values[::20] = 1.0
    scaler = fit_scaler(values)

    assert scaler.center[0] == 0.0
    assert scaler.scale[0] == STD_SHARE_FLOOR * np.std(values)


def test_bursty_signal_scaled_by_bursts():
    rng = np.random.default_rng(1)
    values = rng.normal(0.0, 1e-4, size=(2000, 1))
    values[::50] += 1.0
    scaler = fit_scaler(values)
    burst = scaler.transform(np.array([[1.0]]))[0, 0]

    # The IQR alone would make an ordinary burst about 10,000 units.
    assert scaler.scale[0] == STD_SHARE_FLOOR * np.std(values)
    assert 1.0 < burst < 30.0


def test_all_nan_signal_gets_identity():
    values = np.column_stack([np.arange(10.0), np.full(10, np.nan)])
    scaler = fit_scaler(values)

    assert scaler.center[1] == 0.0
    assert scaler.scale[1] == 1.0


def test_missing_cells_stay_missing():
    values = np.column_stack([np.arange(10.0), np.full(10, np.nan)])
    scaled = fit_scaler(values).transform(values)

    assert np.isnan(scaled[:, 1]).all()
    assert np.isfinite(scaled[:, 0]).all()


def test_nan_ignored_when_fitting():
    values = np.array([[1.0], [2.0], [np.nan], [3.0], [np.nan]])

    assert fit_scaler(values).center[0] == 2.0


def test_fit_over_entities_and_time():
    values = np.stack([np.full((10, 2), 1.0), np.full((10, 2), 3.0)])
    scaler = fit_scaler(values)

    assert scaler.center.shape == (2,)
    assert scaler.center.tolist() == [2.0, 2.0]


def test_observed_steps_counts_complete_steps():
    values = np.ones((5, 2))
    values[1, 0] = np.nan
    values[3, 1] = np.nan

    assert observed_steps(values) == 3
