"""Score a past range read from Prometheus with the saved model; write CSV, a summary and a plot."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from monitor.bundle import config_fingerprint
from monitor.config import Config, DetectorConfig
from monitor.frames import fetch_frame, grid_floor
from monitor.persistence import load_latest
from monitor.replay import RangeScores, score_range
from monitor.sharding import Shard, resolve_index
from monitor.source import PrometheusSource, QueryError
from monitor.timeutil import isoformat, parse_time

logger = logging.getLogger(__name__)


def run_backtest(config: Config, start_text: str, end_text: str, out: str, only: list[str] | None) -> int:
    try:
        start, end = parse_time(start_text), parse_time(end_text)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    if end <= start:
        logger.error("--to (%s) must be after --from (%s)", isoformat(end), isoformat(start))
        return 2

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    shard = Shard(resolve_index(config.shard), config.shard.count)
    summaries = {}
    for detector in config.detectors:
        if only and detector.name not in only:
            continue
        summary = backtest_detector(config, detector, shard, start, end, folder)
        if summary is None:
            return 1
        summaries[detector.name] = summary

    (folder / "summary.json").write_text(json.dumps(summaries, indent=2))
    _write_markdown(folder / "summary.md", summaries, start, end)
    logger.info("backtest written to %s", folder)
    return 0


def backtest_detector(config: Config, detector: DetectorConfig, shard: Shard, start: float, end: float,
                      folder: Path) -> dict | None:
    bundle = load_latest(Path(config.storage.path) / detector.name, config_fingerprint(detector))
    if bundle is None:
        logger.error("detector %s has no saved model in %s; run `anomaly-monitor train` first",
                     detector.name, config.storage.path)
        return None

    # Read one window before the range, so the first step of the range gets a full window.
    read_start = grid_floor(start, detector.step) - (detector.window - 1) * detector.step
    source = PrometheusSource(config.prometheus)
    try:
        frame = fetch_frame(source, detector, read_start, end)
    except QueryError as error:
        logger.error("detector %s: cannot read the range from Prometheus: %s", detector.name, error)
        return None
    finally:
        source.close()

    owned = [i for i, e in enumerate(frame.entities) if shard.owns(e)]
    frame.entities = [frame.entities[i] for i in owned]
    frame.values = frame.values[owned]
    logger.info("detector %s: scoring %d entities over %d steps", detector.name, len(frame.entities), frame.values.shape[1])
    scores = score_range(bundle, detector, frame)
    first = detector.window - 1
    _write_csv(folder / f"{detector.name}.csv", detector, frame.entities, scores, first)
    _plot(folder / f"{detector.name}.png", detector, frame.entities, scores, first)
    return _summary(detector, frame.entities, scores, first)


def _write_csv(path: Path, detector: DetectorConfig, entities, scores: RangeScores, first: int) -> None:
    signals = list(detector.signals)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", "time", *detector.entity_labels, "score", "threshold", "detected",
                         "tail_probability", "top_signal"])
        for t in range(first, scores.timestamps.size):
            for row, entity in enumerate(entities):
                score = scores.scores[row, t]
                if not np.isfinite(score):
                    continue
                top = signals[int(np.argmax(scores.contributions[row, t]))]
                writer.writerow([f"{scores.timestamps[t]:.0f}", isoformat(scores.timestamps[t]), *entity,
                                 f"{score:.6g}", f"{scores.threshold:.6g}", int(score > scores.threshold),
                                 f"{scores.tail_probabilities[row, t]:.6g}", top])


def _summary(detector: DetectorConfig, entities, scores: RangeScores, first: int) -> dict:
    part = scores.scores[:, first:]
    scored = np.isfinite(part)
    detected = scored & (np.nan_to_num(part, nan=-np.inf) > scores.threshold)
    per_entity = {
        "/".join(e): {"windows": int(scored[i].sum()), "detected": int(detected[i].sum()),
                      "max_score": float(np.nanmax(part[i])) if scored[i].any() else None}
        for i, e in enumerate(entities)
    }
    return {
        "threshold": scores.threshold,
        "entities": len(entities),
        "windows_scored": int(scored.sum()),
        "windows_detected": int(detected.sum()),
        "detected_share": float(detected.sum() / max(scored.sum(), 1)),
        "per_entity": per_entity,
    }


def _write_markdown(path: Path, summaries: dict, start: float, end: float) -> None:
    lines = [f"# Backtest {isoformat(start)} to {isoformat(end)}", "",
             "| detector | entities | windows scored | windows over threshold | share | threshold |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['entities']} | {s['windows_scored']} | {s['windows_detected']} | "
                     f"{s['detected_share']:.4f} | {s['threshold']:.4g} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _plot(path: Path, detector: DetectorConfig, entities, scores: RangeScores, first: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed, so no plot; pip install 'deep-anomaly-monitor[plot]'")
        return
    figure, axis = plt.subplots(figsize=(11, 4))
    times = scores.timestamps[first:]
    for row, entity in enumerate(entities[:10]):
        axis.plot(times, scores.scores[row, first:], linewidth=0.8, label="/".join(entity))
    axis.axhline(scores.threshold, color="red", linestyle="--", label="threshold")
    axis.set_yscale("symlog")
    axis.set_xlabel("Unix time (s)")
    axis.set_ylabel("window score")
    axis.set_title(f"detector {detector.name}")
    axis.legend(fontsize="small", loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
