"""Run the protocols over data sets and units, collect metrics, and write the results folder."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from monitor import __version__
from monitor.config import DetectorConfig
from monitor.evaluation import report
from monitor.evaluation.datasets import Unit, list_units, load_unit
from monitor.evaluation.methods import FitError, is_seeded
from monitor.evaluation.metrics import evaluate_scores
from monitor.evaluation.protocols import Track, run_deployed, run_static

logger = logging.getLogger(__name__)

PROTOCOLS = {"static": run_static, "deployed": run_deployed}


@dataclass
class Plan:
    """The data sets, units, protocols, methods, seeds and overrides of one evaluation run."""

    data_dir: Path
    out: Path
    datasets: list[str]
    units: list[str]
    max_units: int | None
    protocols: list[str]
    methods: list[str]
    seeds: list[int]
    deployed_seeds: int
    overrides: dict = field(default_factory=dict)
    jobs: int = 1
    torch_threads: int | None = None


def build_detector(unit: Unit, overrides: dict) -> DetectorConfig:
    """Build the service's default detector for a unit's signals and step, with the run's overrides."""
    # The service scores once per step here, as the replay does.
    raw: dict = {"name": unit.dataset, "entity_labels": ["instance"], "step": unit.step,
                 "signals": {name: name for name in unit.signals}, "score": {"every": unit.step}}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.rpartition(".")
        target = raw.setdefault(section, {}) if section else raw
        target[key] = value
    return DetectorConfig.model_validate(raw)


def selected_units(plan: Plan, dataset: str) -> list[str]:
    names = list_units(plan.data_dir, dataset)
    if plan.units:
        chosen = [n for n in names if n in plan.units]
    else:
        chosen = names
    return chosen[: plan.max_units] if plan.max_units else chosen


def entity_records(unit: Unit, tracks: dict[str, Track], protocol: str, seed: int) -> list[dict]:
    """Compute one metric record per entity and method; a multi-entity unit's entities count separately."""
    records = []
    for row, entity in enumerate(unit.frame.entities):
        name = unit.name if len(unit.frame.entities) == 1 else f"{unit.name}/{'/'.join(entity)}"
        labels = unit.labels[row]
        for method, track in tracks.items():
            scores = track.scores[row]
            record = {"protocol": protocol, "dataset": unit.dataset, "unit": name, "method": method,
                      "seed": seed, "fits": track.fits}
            record.update(evaluate_scores(labels, scores, track.thresholds, unit.step))
            scored = np.isfinite(scores) & (labels == 0)
            for key, thresholds in track.alternatives.items():
                record[f"alarms@{key}"] = float(np.sum(scores[scored] > thresholds[scored]))
            if track.drivers is not None:
                false_alarms = scored & (scores > track.thresholds)
                record["false_alarm_signals"] = top_drivers(track.drivers[row][false_alarms], unit.signals)
            records.append(record)
    return records


def top_drivers(drivers: np.ndarray, signals: list[str], count: int = 3) -> str:
    """Name the signals that most often drove false alarms, as 'name:steps' joined by spaces."""
    indices, steps = np.unique(drivers[drivers >= 0], return_counts=True)
    order = np.argsort(-steps, kind="stable")[:count]
    return " ".join(f"{signals[indices[i]]}:{steps[i]}" for i in order)


class _OncePerMessage(logging.Filter):
    """Let each distinct log message template through once; refits repeat the same warnings."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.msg in self.seen:
            return record.levelno >= logging.ERROR
        self.seen.add(record.msg)
        return True


NOISY_LOGGERS = ("monitor.scoring", "monitor.training", "monitor.evaluation.methods")


def run(plan: Plan) -> int:
    # The filters go when the run ends, so that a caller in the same process (a test, a
    # notebook) gets these loggers' warnings again.
    filters = [(logging.getLogger(name), _OncePerMessage()) for name in NOISY_LOGGERS]
    for noisy_logger, once in filters:
        noisy_logger.addFilter(once)
    try:
        return _run(plan)
    finally:
        for noisy_logger, once in filters:
            noisy_logger.removeFilter(once)


def _run(plan: Plan) -> int:
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "pictures").mkdir(exist_ok=True)
    detectors: dict[str, dict] = {}
    records: list[dict] = []
    skipped: dict[str, str] = {}
    began = time.monotonic()
    for dataset in plan.datasets:
        names = selected_units(plan, dataset)
        logger.info("%s: %d units: %s", dataset, len(names), ", ".join(names))
        for unit_records, detector, reason in _unit_results(plan, dataset, names):
            detectors[dataset] = detector
            records += unit_records
            skipped.update(reason)
            _write(plan, records, detectors, skipped)
    if not records:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise FitError(f"no unit could be evaluated: {reasons}")
    if skipped:
        logger.warning("%d units skipped, listed under 'skipped' in config.json: %s", len(skipped), ", ".join(skipped))
    logger.info("evaluation finished in %.0fs; results in %s", time.monotonic() - began, plan.out)
    return 0


def _unit_results(plan: Plan, dataset: str, names: list[str]):
    """Yield (records, detector) per unit, in unit order, from `plan.jobs` processes."""
    tasks = [(plan, dataset, name, index, len(names)) for index, name in enumerate(names, 1)]
    if plan.jobs <= 1 or len(names) <= 1:
        yield from (_evaluate_unit(*task) for task in tasks)
        return

    # Forked workers inherit the logging set-up. Units are independent and every seed is
    # explicit, so the records equal those of a run in one process.
    with ProcessPoolExecutor(max_workers=plan.jobs, mp_context=get_context("fork")) as pool:
        futures = [pool.submit(_evaluate_unit, *task) for task in tasks]
        for future in futures:
            yield future.result()


def _evaluate_unit(plan: Plan, dataset: str, name: str, index: int, total: int) -> tuple[list[dict], dict, dict]:
    """Return the unit's records, its detector settings, and {unit: reason} when it was skipped."""
    if plan.torch_threads:
        import torch

        torch.set_num_threads(plan.torch_threads)
    unit = load_unit(plan.data_dir, dataset, name)
    detector = build_detector(unit, plan.overrides)
    logger.info("%s %d/%d %s: %d entities, %d training and %d test steps, %.2f%% labelled%s",
                dataset, index, total, name, len(unit.frame.entities), unit.test_start,
                unit.test_steps, 100 * unit.labels.mean(), f"; {unit.note}" if unit.note else "")
    settings = detector.model_dump(mode="json")
    # One series too short or too gappy to fit on must not end a run over dozens of others.
    try:
        return _run_unit(plan, unit, detector), settings, {}
    except FitError as error:
        logger.warning("%s %s: skipped, a method could not be fitted: %s", dataset, name, error)
        return [], settings, {f"{dataset}/{name}": str(error)}


def _run_unit(plan: Plan, unit: Unit, detector: DetectorConfig) -> list[dict]:
    records = []
    for protocol in plan.protocols:
        seeds = plan.seeds if protocol == "static" else plan.seeds[: plan.deployed_seeds]
        for position, seed in enumerate(seeds):
            methods = plan.methods if position == 0 else [m for m in plan.methods if is_seeded(m)]
            began = time.monotonic()
            tracks = PROTOCOLS[protocol](unit, detector, methods, seed)
            records += entity_records(unit, tracks, protocol, seed)
            logger.info("  %s seed %d: %d methods in %.0fs; product best-F1 %s", protocol, seed, len(methods),
                        time.monotonic() - began, _product_best_f1(records, unit, protocol, seed))
            if position == 0 and "product" in tracks:
                _picture(plan, unit, protocol, tracks["product"])
    return records


def _product_best_f1(records: list[dict], unit: Unit, protocol: str, seed: int) -> str:
    values = [r["best_f1"] for r in records if r["method"] == "product" and r["seed"] == seed
              and r["protocol"] == protocol and r["dataset"] == unit.dataset and r["unit"].startswith(unit.name)]
    finite = [v for v in values if np.isfinite(v)]
    return f"{np.mean(finite):.3f}" if finite else "n/a"


def _picture(plan: Plan, unit: Unit, protocol: str, track: Track) -> None:
    path = plan.out / "pictures" / f"{unit.dataset}-{unit.name}-{protocol}.png"
    entities = ["/".join(e) for e in unit.frame.entities]
    title = f"{unit.dataset} {unit.name}, {protocol} protocol: product score and threshold"
    report.plot_unit(path, title, entities, track.scores, track.thresholds, unit.labels, unit.step)


def _write(plan: Plan, records: list[dict], detectors: dict, skipped: dict[str, str]) -> None:
    """Rewrite every table after each unit, so an interrupted run still leaves results."""
    summary = report.summarise(records)
    target = next(iter(detectors.values()))["threshold"]["false_alarm_rate"] if detectors else 0.001
    thresholds = report.threshold_rows(records, target)
    report.write_records(plan.out / "per_unit.csv", records)
    (plan.out / "per_unit.md").write_text(report.records_markdown(records), encoding="utf-8")
    report.write_csv(plan.out / "summary.csv", summary)
    skipped_lines = "".join(f"\nSkipped {name}: {reason}\n" for name, reason in skipped.items())
    (plan.out / "summary.md").write_text(report.summary_markdown(summary) + skipped_lines, encoding="utf-8")
    report.write_csv(plan.out / "thresholds.csv", thresholds)
    (plan.out / "thresholds.md").write_text(report.thresholds_markdown(thresholds), encoding="utf-8")
    description = {**_run_description(plan, detectors), "skipped": skipped}
    (plan.out / "config.json").write_text(json.dumps(description, indent=2), encoding="utf-8")


def _run_description(plan: Plan, detectors: dict) -> dict:
    import sklearn
    import torch

    return {
        "version": __version__,
        "datasets": plan.datasets,
        "units": {d: selected_units(plan, d) for d in plan.datasets},
        "protocols": plan.protocols,
        "methods": plan.methods,
        "seeds": {"static": plan.seeds, "deployed": plan.seeds[: plan.deployed_seeds]},
        "overrides": plan.overrides,
        "detectors": detectors,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "libraries": {"numpy": np.__version__, "torch": torch.__version__, "scikit-learn": sklearn.__version__},
    }
