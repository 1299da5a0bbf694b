"""A bounded local record of fetched steps, so that training reads disk instead of Prometheus.

Each segment file contains a run of grid steps for a set of entities:
    <detector>/history/seg-<first step>-<last step>.npz  with entities, signals, values [entity, time, signal]
Values are float32: metric values need no more precision for training, and it halves the disk.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import zipfile
from pathlib import Path

import numpy as np

from monitor.frames import EntityKey, Frame

logger = logging.getLogger(__name__)


class History:
    """Append-only segments of one detector, pruned to `retention` seconds."""

    def __init__(self, folder: Path, signals: list[str], step: float, retention: float, flush_steps: int = 120):
        self.folder = folder
        self.signals = signals
        self.step = step
        self.retention = retention
        self.flush_steps = flush_steps
        self._pending: list[Frame] = []

    def append(self, frame: Frame) -> None:
        """Buffer new steps; write a segment once `flush_steps` steps are buffered."""
        if frame.values.shape[1] == 0 or not frame.entities:
            return
        self._pending.append(frame)
        if sum(f.values.shape[1] for f in self._pending) >= self.flush_steps:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        merged = merge_frames(pending, self.step)
        try:
            self.write_segment(merged)
        except OSError as error:
            logger.error("cannot write history segment to %s: %s; training will backfill from Prometheus", self.folder, error)

    def write_segment(self, frame: Frame) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"seg-{int(frame.start)}-{int(frame.end)}.npz"
        temporary = self.folder / f".{uuid.uuid4().hex}.tmp.npz"
        np.savez(
            temporary,
            start=np.float64(frame.start),
            step=np.float64(frame.step),
            signals=np.array(self.signals, dtype=str),
            entities=np.array([json.dumps(list(e)) for e in frame.entities], dtype=str),
            values=frame.values.astype(np.float32),
        )
        os.replace(temporary, self.folder / name)
        self.prune(frame.end)

    def prune(self, now: float) -> None:
        for path in self._segments():
            _, _, last = _segment_range(path)
            if last < now - self.retention:
                path.unlink(missing_ok=True)

    def _segments(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob("seg-*.npz") if _segment_range(p)[0])

    def covered_start(self) -> float | None:
        """Return the first step held on disk, or None if there is no history."""
        ranges = [_segment_range(p) for p in self._segments()]
        starts = [first for valid, first, _ in ranges if valid]
        return min(starts) if starts else None

    def read(self, start: float, end: float, keep: set[EntityKey] | None = None) -> Frame:
        """Read the steps in [start, end] onto one grid; cells no segment covers are NaN."""
        self.flush()
        length = int(round((end - start) / self.step)) + 1
        parts = []
        for path in self._segments():
            _, first, last = _segment_range(path)
            if last < start or first > end:
                continue
            segment = self._load(path)
            if segment is not None:
                parts.append(segment)
        return place_frames(parts, start, self.step, length, keep)

    def _load(self, path: Path) -> Frame | None:
        try:
            with np.load(path, allow_pickle=False) as data:
                if list(data["signals"]) != self.signals or float(data["step"]) != self.step:
                    logger.warning("history segment %s was written for other signals or step; ignored", path.name)
                    return None
                entities = [tuple(json.loads(text)) for text in data["entities"]]
                return Frame(float(data["start"]), self.step, entities, data["values"].astype(np.float64))
        # A segment cut short (a full disk, a crash mid-write) raises BadZipFile or EOFError.
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            logger.warning("history segment %s is unreadable (%s); it is removed", path.name, error)
            path.unlink(missing_ok=True)
            return None


def _segment_range(path: Path) -> tuple[bool, float, float]:
    try:
        _, first, last = path.stem.split("-")
        return True, float(first), float(last)
    except ValueError:
        return False, 0.0, 0.0


def merge_frames(frames: list[Frame], step: float) -> Frame:
    start = min(f.start for f in frames)
    end = max(f.end for f in frames)
    return place_frames(frames, start, step, int(round((end - start) / step)) + 1)


def place_frames(frames: list[Frame], start: float, step: float, length: int,
                 keep: set[EntityKey] | None = None) -> Frame:
    """Copy frames onto one grid of `length` steps from `start`; later frames win on overlap."""
    entities = sorted({e for f in frames for e in f.entities if keep is None or e in keep})
    row = {e: i for i, e in enumerate(entities)}
    signals = frames[0].values.shape[2] if frames else 0
    values = np.full((len(entities), length, signals), np.nan)
    for frame in frames:
        offset = int(round((frame.start - start) / step))
        first = max(offset, 0)
        last = min(offset + frame.values.shape[1], length)
        if first >= last:
            continue
        for source_row, entity in enumerate(frame.entities):
            if entity in row:
                chunk = frame.values[source_row, first - offset:last - offset]
                target = values[row[entity], first:last]
                target[:] = np.where(np.isnan(chunk), target, chunk)
    return Frame(start, step, entities, values)
