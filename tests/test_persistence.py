"""Saving and loading model bundles: round trip, corrupt files, mismatches and pickled objects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_unit import detector_config, normal_values, synthetic_frame, train_bundle
from monitor.persistence import KEEP_VERSIONS, ModelFileError, load_latest, load_version, reset, save_bundle

FINGERPRINT_MISMATCH = "0" * 16


@pytest.fixture(scope="module")
def bundle():
    return train_bundle()


def unpickled_marker(path: str) -> None:
    """Create a file; called only if torch unpickles the object below, which it must not."""
    Path(path).touch()


class PickledCall:
    """An object whose unpickling calls `unpickled_marker`, as a malicious weights file would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return unpickled_marker, (str(self.marker),)


def scores_of(bundle) -> np.ndarray:
    detector = detector_config()
    frame = synthetic_frame(normal_values(steps=detector.window, seed=7))
    scored = bundle.score_windows(frame.entities, frame.values, frame.timestamps,
                                  detector.score.aggregate_steps, detector.score.fill_gaps)
    return scored.scores


def rejected_versions(folder: Path) -> list[str]:
    rejected = folder / "rejected"
    return sorted(p.name for p in rejected.iterdir()) if rejected.is_dir() else []


def save_two(folder: Path, bundle) -> tuple[Path, Path]:
    good = save_bundle(folder, bundle)
    newer = save_bundle(folder, bundle)
    return good, newer


def test_round_trip_gives_identical_scores(tmp_path: Path, bundle):
    save_bundle(tmp_path, bundle)
    loaded = load_latest(tmp_path, bundle.fingerprint)

    np.testing.assert_array_equal(scores_of(loaded), scores_of(bundle))
    assert loaded.threshold.value == bundle.threshold.value
    assert loaded.threshold.method == bundle.threshold.method
    assert loaded.signals == bundle.signals
    assert set(loaded.scalers) == set(bundle.scalers)


def test_round_trip_keeps_metadata(tmp_path: Path, bundle):
    save_bundle(tmp_path, bundle)
    loaded = load_latest(tmp_path, bundle.fingerprint)

    assert loaded.metadata["windows_used"] == bundle.metadata["windows_used"]
    assert loaded.metadata["trained_at"] == bundle.metadata["trained_at"]


def test_current_points_at_latest_save(tmp_path: Path, bundle):
    _, newer = save_two(tmp_path, bundle)

    assert (tmp_path / "CURRENT").read_text().strip() == newer.name


def test_no_models_loads_nothing(tmp_path: Path):
    assert load_latest(tmp_path, FINGERPRINT_MISMATCH) is None


def test_corrupt_weights_set_aside(tmp_path: Path, bundle):
    good, newer = save_two(tmp_path, bundle)
    (newer / "weights.pt").write_bytes(b"not a torch file")
    loaded = load_latest(tmp_path, bundle.fingerprint)

    assert loaded is not None
    assert not newer.exists()
    assert good.exists()
    assert [name.rsplit("-", 1)[0] for name in rejected_versions(tmp_path)] == [newer.name]
    np.testing.assert_array_equal(scores_of(loaded), scores_of(bundle))


def test_truncated_npz_set_aside(tmp_path: Path, bundle):
    good, newer = save_two(tmp_path, bundle)
    arrays = newer / "arrays.npz"
    arrays.write_bytes(arrays.read_bytes()[: arrays.stat().st_size // 2])
    loaded = load_latest(tmp_path, bundle.fingerprint)

    assert loaded is not None
    assert not newer.exists()
    assert good.exists()
    assert len(rejected_versions(tmp_path)) == 1


def test_rejected_folder_states_reason(tmp_path: Path, bundle):
    _, newer = save_two(tmp_path, bundle)
    (newer / "weights.pt").write_bytes(b"not a torch file")
    load_latest(tmp_path, bundle.fingerprint)
    (rejected,) = (tmp_path / "rejected").iterdir()
    reason = (rejected / "REJECTED").read_text()

    assert "corrupt model files" in reason


def test_bad_metadata_set_aside(tmp_path: Path, bundle):
    good, newer = save_two(tmp_path, bundle)
    (newer / "metadata.json").write_text("{truncated")
    loaded = load_latest(tmp_path, bundle.fingerprint)

    assert loaded is not None
    assert not newer.exists()


def test_fingerprint_mismatch_set_aside(tmp_path: Path, bundle):
    version = save_bundle(tmp_path, bundle)
    loaded = load_latest(tmp_path, FINGERPRINT_MISMATCH)
    (rejected,) = (tmp_path / "rejected").iterdir()

    assert loaded is None
    assert not version.exists()
    assert "trained for other detector settings" in (rejected / "REJECTED").read_text()


def test_fingerprint_mismatch_raises(tmp_path: Path, bundle):
    version = save_bundle(tmp_path, bundle)
    with pytest.raises(ModelFileError) as caught:
        load_version(version, FINGERPRINT_MISMATCH)

    assert bundle.fingerprint in str(caught.value)


def test_pickled_object_in_weights_rejected(tmp_path: Path, bundle):
    marker = tmp_path / "unpickled"
    good, newer = save_two(tmp_path, bundle)
    state = dict(bundle.network.state_dict())
    state["payload"] = PickledCall(marker)
    torch.save(state, newer / "weights.pt")
    loaded = load_latest(tmp_path, bundle.fingerprint)

    assert not marker.exists()
    assert not newer.exists()
    assert loaded is not None
    assert good.exists()


def test_pickled_object_error_names_file(tmp_path: Path, bundle):
    version = save_bundle(tmp_path, bundle)
    torch.save({"payload": PickledCall(tmp_path / "unpickled")}, version / "weights.pt")
    with pytest.raises(ModelFileError) as caught:
        load_version(version, bundle.fingerprint)

    assert str(version) in str(caught.value)
    assert not (tmp_path / "unpickled").exists()


def test_non_finite_statistics_rejected(tmp_path: Path, bundle):
    version = save_bundle(tmp_path, bundle)
    with np.load(version / "arrays.npz") as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["error_precision"] = np.full_like(arrays["error_precision"], np.nan)
    np.savez(version / "arrays.npz", **arrays)

    with pytest.raises(ModelFileError, match="NaN or Inf"):
        load_version(version, bundle.fingerprint)


def test_unknown_format_version_rejected(tmp_path: Path, bundle):
    version = save_bundle(tmp_path, bundle)
    metadata = json.loads((version / "metadata.json").read_text())
    metadata["format_version"] = 99
    (version / "metadata.json").write_text(json.dumps(metadata))

    with pytest.raises(ModelFileError, match="unsupported format_version 99"):
        load_version(version, bundle.fingerprint)


def test_old_versions_pruned(tmp_path: Path, bundle):
    # Saves follow each other within a second here, so this also checks that names sort by save time.
    saved = [save_bundle(tmp_path, bundle).name for _ in range(KEEP_VERSIONS + 3)]
    versions = sorted(p.name for p in (tmp_path / "models").iterdir() if p.is_dir())

    assert versions == saved[-KEEP_VERSIONS:]


def test_no_temporary_files_left(tmp_path: Path, bundle):
    save_bundle(tmp_path, bundle)
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]

    assert leftovers == []


def test_reset_removes_models_and_history(tmp_path: Path, bundle):
    save_bundle(tmp_path, bundle)
    (tmp_path / "history").mkdir()
    reset(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == []
