"""Turn per-unit metric records into CSV and Markdown tables, and draw score pictures."""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from monitor.evaluation.names import METHODS

logger = logging.getLogger(__name__)

KEY_COLUMNS = ("protocol", "dataset", "unit", "method", "seed", "fits")
# Columns of the mean tables, in order, with their Markdown headers.
SUMMARY_COLUMNS = (
    ("best_f1", "best-F1 (oracle)"), ("auc_pr", "AUC-PR"), ("auc_roc", "AUC-ROC"), ("f1", "F1"),
    ("precision", "P"), ("recall", "R"), ("range_f1", "range F1"), ("events_caught", "incidents caught"),
    ("mean_delay_s", "delay (s)"), ("pooled_far", "false-alarm rate"),
    ("episodes_per_day", "false-alarm episodes per day"), ("f1_pa_best", "F1-PA (oracle)"),
)
# Pooled over the units of a data set rather than averaged (see _seed_means).
POOLED_COLUMNS = ("pooled_far", "episodes_per_day")


def write_records(path: Path, records: list[dict]) -> None:
    """Write one row per protocol, data set, unit, method and seed with every metric."""
    columns = list(KEY_COLUMNS)
    for record in records:
        columns.extend(k for k in record if k not in columns)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for record in records:
            writer.writerow({k: _cell(record.get(k)) for k in columns})


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _ordered_methods(names) -> list[str]:
    return sorted(set(names), key=lambda n: METHODS.index(n) if n in METHODS else len(METHODS))


def summarise(records: list[dict]) -> list[dict]:
    """Mean over units per seed, then mean and standard deviation over seeds.

    The false-alarm rate is pooled: alarms on every normal step of the data set divided by the
    number of those steps, which is how the service's target is stated.
    """
    groups: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        groups[(record["protocol"], record["dataset"], record["method"])][record["seed"]].append(record)

    rows = []
    for (protocol, dataset, method), by_seed in groups.items():
        per_seed = [_seed_means(units) for units in by_seed.values()]
        first_seed = next(iter(by_seed.values()))
        row = {"protocol": protocol, "dataset": dataset, "method": method, "seeds": len(per_seed),
               "units": len(first_seed), "units_with_incidents": sum(u["events"] > 0 for u in first_seed)}
        for column, _ in SUMMARY_COLUMNS:
            values = np.array([s[column] for s in per_seed], dtype=float)
            finite = values[np.isfinite(values)]
            row[column] = float(finite.mean()) if finite.size else math.nan
            row[f"{column}_std"] = float(finite.std()) if finite.size > 1 else math.nan
        rows.append(row)
    order = {m: i for i, m in enumerate(_ordered_methods(r["method"] for r in rows))}
    return sorted(rows, key=lambda r: (r["protocol"], r["dataset"], order[r["method"]]))


def _seed_means(units: list[dict]) -> dict[str, float]:
    means = {}
    for column, _ in SUMMARY_COLUMNS:
        if column in POOLED_COLUMNS:
            continue
        values = np.array([u.get(column, math.nan) for u in units], dtype=float)
        means[column] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    normal = sum(u["normal_steps"] for u in units)
    means["pooled_far"] = sum(u["normal_alarms"] for u in units) / normal if normal else math.nan
    # Per entity and day of normal test time, so that a data set of many short units compares
    # with one of a few long ones.
    days = sum(u.get("normal_days", 0.0) for u in units)
    means["episodes_per_day"] = sum(u.get("false_alarm_episodes", 0.0) for u in units) / days if days else math.nan
    return means


def threshold_rows(records: list[dict], target: float) -> list[dict]:
    """Observed pooled false-alarm rate of every threshold method and target, mean over seeds."""
    groups: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if any(k.startswith("alarms@") for k in record):
            groups[(record["protocol"], record["dataset"], record["method"])][record["seed"]].append(record)
    rows = []
    for (protocol, dataset, method), by_seed in sorted(groups.items()):
        names = sorted({k.removeprefix("alarms@") for units in by_seed.values() for u in units for k in u
                        if k.startswith("alarms@")})
        for name in names:
            rates = []
            for units in by_seed.values():
                normal = sum(u["normal_steps"] for u in units)
                rates.append(sum(u[f"alarms@{name}"] for u in units) / normal if normal else math.nan)
            threshold_method, rate = name.split("@")
            rows.append({"protocol": protocol, "dataset": dataset, "method": method,
                         "threshold": threshold_method, "target": float(rate),
                         "observed": float(np.nanmean(rates)),
                         "ratio": float(np.nanmean(rates)) / float(rate),
                         "default": float(rate) == target})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("", encoding="utf-8")
        return
    columns = list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})


def _format(value: float, spread: float = math.nan, rate: bool = False) -> str:
    if not math.isfinite(value):
        return "n/a"
    if rate:
        text = f"{value:.2%}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    else:
        text = f"{value:.3f}"
    if math.isfinite(spread) and spread > 0:
        text += f" ± {spread:.2%}" if rate else f" ± {spread:.3f}"
    return text


def summary_markdown(rows: list[dict]) -> str:
    lines = []
    for (protocol, dataset) in sorted({(r["protocol"], r["dataset"]) for r in rows}):
        part = [r for r in rows if r["protocol"] == protocol and r["dataset"] == dataset]
        counts = f"{part[0]['units']} units"
        if part[0]["units_with_incidents"] != part[0]["units"]:
            counts += f", means over the {part[0]['units_with_incidents']} with incidents"
        lines += [f"### {dataset}, {protocol} protocol ({counts})", "",
                  "| method | seeds | " + " | ".join(h for _, h in SUMMARY_COLUMNS) + " |",
                  "| --- | --- |" + " --- |" * len(SUMMARY_COLUMNS)]
        for row in part:
            cells = [_format(row[c], row[f"{c}_std"], rate=(c == "pooled_far")) for c, _ in SUMMARY_COLUMNS]
            lines.append(f"| {row['method']} | {row['seeds']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell_text(column: str, value) -> str:
    if isinstance(value, str):
        return value or "none"
    if column == "false_alarm_episodes" and math.isfinite(value):
        return f"{value:.0f}"
    return _format(value, rate=(column == "false_alarm_rate"))


def records_markdown(records: list[dict]) -> str:
    columns = ("best_f1", "auc_pr", "auc_roc", "f1", "range_f1", "events_caught", "false_alarm_rate",
               "false_alarm_episodes", "false_alarm_signals")
    lines = ["| protocol | data set | unit | method | seed | " + " | ".join(columns) + " |",
             "| --- | --- | --- | --- | --- |" + " --- |" * len(columns)]
    for r in records:
        cells = [_cell_text(c, r.get(c, math.nan)) for c in columns]
        lines.append(f"| {r['protocol']} | {r['dataset']} | {r['unit']} | {r['method']} | {r['seed']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def thresholds_markdown(rows: list[dict]) -> str:
    lines = ["| protocol | data set | scores | threshold | target | observed on normal steps | observed / target |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['protocol']} | {r['dataset']} | {r['method']} | {r['threshold']} | {r['target']:g} | "
                     f"{r['observed']:.4%} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_unit(path: Path, title: str, entities: list[str], scores: np.ndarray, thresholds: np.ndarray,
              labels: np.ndarray, step: float) -> bool:
    """Draw the product's score against its threshold with incidents shaded; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed, so no pictures; pip install 'deep-anomaly-monitor[plot]'")
        return False
    from monitor.evaluation.metrics import segments

    rows = [i for i in range(len(entities)) if labels[i].any()][:6] or [0]
    figure, axes = plt.subplots(len(rows), 1, figsize=(12, 2.6 * len(rows) + 0.6), squeeze=False, sharex=True)
    hours = np.arange(scores.shape[1]) * step / 3600.0
    for axis, row in zip(axes[:, 0], rows):
        for first, last in segments(labels[row]):
            axis.axvspan(hours[first], hours[last] + step / 3600.0, color="orange", alpha=0.35, linewidth=0)
        axis.plot(hours, scores[row], color="tab:blue", linewidth=0.6, label="score")
        axis.plot(hours, thresholds, color="red", linewidth=0.8, linestyle="--", label="threshold")
        axis.set_yscale("symlog", linthresh=1.0)
        axis.set_ylabel(entities[row] if len(rows) > 1 else "window score", fontsize="small")
    axes[0, 0].set_title(title + " (shaded: labelled incidents)")
    axes[0, 0].legend(fontsize="small", loc="upper right")
    axes[-1, 0].set_xlabel("hours since the start of the test part")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True
