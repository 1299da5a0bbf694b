"""The local history: append, flush and read back, pruning, and unreadable segments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixtures_unit import SIGNALS, START, STEP, normal_values
from monitor.frames import Frame
from monitor.history import History

ENTITIES = [("node-a",), ("node-b",)]


def history(folder: Path, retention: float = 86400.0, flush_steps: int = 120) -> History:
    return History(folder, list(SIGNALS), STEP, retention, flush_steps=flush_steps)


def frame_at(first_step: int, steps: int, seed: int = 0) -> Frame:
    values = normal_values(steps=steps, seed=seed, entities=len(ENTITIES))
    return Frame(START + first_step * STEP, STEP, list(ENTITIES), values)


def segment_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("seg-*.npz"))


def test_round_trip(tmp_path: Path):
    store = history(tmp_path)
    parts = [frame_at(0, 10, seed=1), frame_at(10, 10, seed=2)]
    for part in parts:
        store.append(part)
    store.flush()
    read = store.read(START, START + 19 * STEP)
    expected = np.concatenate([p.values for p in parts], axis=1).astype(np.float32).astype(np.float64)

    assert read.entities == ENTITIES
    assert read.start == START
    np.testing.assert_array_equal(read.values, expected)


def test_read_flushes_pending_steps(tmp_path: Path):
    store = history(tmp_path)
    store.append(frame_at(0, 5))
    read = store.read(START, START + 4 * STEP)

    assert not np.isnan(read.values).any()


def test_append_writes_segment_after_flush_steps(tmp_path: Path):
    store = history(tmp_path, flush_steps=20)
    store.append(frame_at(0, 10))
    before = segment_names(tmp_path)
    store.append(frame_at(10, 10))

    assert before == []
    assert segment_names(tmp_path) == [f"seg-{int(START)}-{int(START + 19 * STEP)}.npz"]


def test_uncovered_steps_are_missing(tmp_path: Path):
    store = history(tmp_path)
    store.append(frame_at(10, 5))
    read = store.read(START, START + 19 * STEP)
    covered = ~np.isnan(read.values).all(axis=(0, 2))

    assert covered.tolist() == [False] * 10 + [True] * 5 + [False] * 5


def test_read_keeps_selected_entities(tmp_path: Path):
    store = history(tmp_path)
    store.append(frame_at(0, 5))
    read = store.read(START, START + 4 * STEP, keep={("node-b",)})

    assert read.entities == [("node-b",)]


def test_later_segment_wins_on_overlap(tmp_path: Path):
    store = history(tmp_path)
    store.write_segment(frame_at(0, 10, seed=1))
    newer = frame_at(5, 10, seed=2)
    store.write_segment(newer)
    read = store.read(START + 5 * STEP, START + 14 * STEP)

    np.testing.assert_array_equal(read.values, newer.values.astype(np.float32).astype(np.float64))


def test_prune_beyond_retention(tmp_path: Path):
    store = history(tmp_path, retention=3600.0)
    store.write_segment(frame_at(0, 10))
    store.write_segment(frame_at(30, 10))
    # The third segment ends at step 90, so the cut-off lies at step 30: after the first segment's
    # last step (9), before the second's (39).
    store.write_segment(frame_at(80, 11))

    assert segment_names(tmp_path) == [
        f"seg-{int(START + 30 * STEP)}-{int(START + 39 * STEP)}.npz",
        f"seg-{int(START + 80 * STEP)}-{int(START + 90 * STEP)}.npz",
    ]


def test_covered_start(tmp_path: Path):
    store = history(tmp_path)
    empty_start = store.covered_start()
    store.write_segment(frame_at(30, 10))
    store.write_segment(frame_at(10, 10))

    assert empty_start is None
    assert store.covered_start() == START + 10 * STEP


@pytest.mark.parametrize("content", [b"garbage, not an npz file", b"PK\x03\x04truncated zip"])
def test_unreadable_segment_removed(tmp_path: Path, content: bytes):
    store = history(tmp_path)
    good = frame_at(0, 5)
    store.write_segment(good)
    broken = tmp_path / f"seg-{int(START + 5 * STEP)}-{int(START + 9 * STEP)}.npz"
    broken.write_bytes(content)
    read = store.read(START, START + 9 * STEP)

    assert not broken.exists()
    np.testing.assert_array_equal(read.values[:, :5], good.values.astype(np.float32).astype(np.float64))
    assert np.isnan(read.values[:, 5:]).all()


def test_truncated_segment_removed(tmp_path: Path):
    store = history(tmp_path)
    store.write_segment(frame_at(0, 10))
    (segment,) = tmp_path.glob("seg-*.npz")
    segment.write_bytes(segment.read_bytes()[: segment.stat().st_size // 2])
    read = store.read(START, START + 9 * STEP)

    assert not segment.exists()
    assert read.entities == []


def test_segment_for_other_signals_ignored(tmp_path: Path):
    History(tmp_path, ["other"], STEP, 86400.0).write_segment(
        Frame(START, STEP, list(ENTITIES), np.ones((2, 5, 1))))
    read = history(tmp_path).read(START, START + 4 * STEP)

    assert read.entities == []
    assert len(segment_names(tmp_path)) == 1


def test_empty_frame_not_buffered(tmp_path: Path):
    store = history(tmp_path)
    store.append(Frame(START, STEP, [], np.empty((0, 5, 3))))
    store.flush()

    assert segment_names(tmp_path) == []
