"""Checks of the alerting rules in rules/ with promtool, plus their conventions and knobs.

promtool comes from the Debian package `prometheus` (2.42 here). The rule unit tests
themselves live in rules/tests/*.yml. This module runs them, so that a failure shows
up in the pytest run, and runs them on mutated copies of the rules to prove that
they can fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES_DIR = ROOT / "rules"
RULES_FILE = RULES_DIR / "anomaly-monitor.rules.yml"
RULE_TEST_FILES = sorted((RULES_DIR / "tests").glob("*.yml"))
RUNBOOK_DIR = ROOT / "docs" / "runbooks"
ALERTING_DOC = ROOT / "docs" / "alerting.md"

RUNBOOK_BASE_URL = "https://github.com/deep-anomaly-monitor/deep-anomaly-monitor/blob/main/docs/runbooks/"
ALERT_PREFIX = "AnomalyMonitor"
SEVERITIES = {"warning", "critical"}
ENTITY_ALERTS = ("AnomalyMonitorEntityAnomalous", "AnomalyMonitorEntityHighlyAnomalous")
HEALTHY_TEST_NAME = "healthy monitor raises no alert"

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found on PATH: install the Debian package `prometheus`"
)


# --- helpers ---------------------------------------------------------------------------


def run_promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    """Return stdout and stderr together: promtool prints test failures to stderr."""
    return result.stdout + result.stderr


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_alerts(path: Path = RULES_FILE) -> dict[str, dict]:
    rules = [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]
    return {rule["alert"]: rule for rule in rules if "alert" in rule}


_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_seconds(text: str) -> float:
    """Parse a Prometheus duration such as `1h30m` into seconds."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"invalid Prometheus duration {text!r}")
    return sum(int(number) * _DURATION_SECONDS[unit] for number, unit in parts)


def alert_expectations(test_file: Path) -> list[tuple[str, str, float, bool]]:
    """List (test name, alert name, eval time in seconds, fires) for every alert_rule_test."""
    expectations = []
    for case in load_yaml(test_file)["tests"]:
        for check in case.get("alert_rule_test", []):
            fires = bool(check.get("exp_alerts"))
            expectations.append((case.get("name", ""), check["alertname"], duration_seconds(check["eval_time"]), fires))
    return expectations


def evaluation_interval(test_file: Path) -> float:
    return duration_seconds(load_yaml(test_file).get("evaluation_interval", "1m"))


def copy_rules_tree(destination: Path) -> Path:
    """Copy rules/ to `destination` so a test can mutate the rule file safely."""
    copy = destination / "rules"
    shutil.copytree(RULES_DIR, copy)
    return copy


def replace_text(text: str, old: str, new: str) -> str:
    assert text.count(old) >= 1, f"{old!r} not found in the rule file"
    return text.replace(old, new)


# --- promtool --------------------------------------------------------------------------


def test_promtool_check_rules_passes():
    result = run_promtool("check", "rules", RULES_FILE)

    assert result.returncode == 0, output(result)
    assert f"SUCCESS: {len(load_alerts())} rules found" in result.stdout


def test_rule_test_files_exist():
    assert RULE_TEST_FILES, "no promtool test files in rules/tests/"


@pytest.mark.parametrize("test_file", RULE_TEST_FILES, ids=lambda path: path.name)
def test_promtool_unit_tests_pass(test_file: Path):
    result = run_promtool("test", "rules", test_file.name, cwd=test_file.parent)

    assert result.returncode == 0, output(result)


# --- the unit tests can fail -------------------------------------------------------------


def run_mutated_unit_tests(tmp_path: Path, old: str, new: str, test_file: str) -> subprocess.CompletedProcess[str]:
    rules_copy = copy_rules_tree(tmp_path)
    rules_file = rules_copy / RULES_FILE.name
    rules_file.write_text(replace_text(rules_file.read_text(encoding="utf-8"), old, new), encoding="utf-8")
    return run_promtool("test", "rules", test_file, cwd=rules_copy / "tests")


def test_unit_tests_catch_missing_gap_tolerance(tmp_path: Path):
    result = run_mutated_unit_tests(
        tmp_path,
        "expr: max_over_time(anomaly_score[3m]) > last_over_time(anomaly_threshold[3m])",
        "expr: anomaly_score > anomaly_threshold",
        "anomalies.test.yml",
    )

    assert result.returncode != 0
    assert "two missed scrapes keep the alert pending" in output(result)


def test_unit_tests_catch_missing_keep_firing_for(tmp_path: Path):
    result = run_mutated_unit_tests(tmp_path, "        keep_firing_for: 10m\n", "", "anomalies.test.yml")

    assert result.returncode != 0
    assert "hovering score does not flap" in output(result)


def test_unit_tests_catch_early_for_edge(tmp_path: Path):
    result = run_mutated_unit_tests(tmp_path, "for: 15m\n", "for: 14m\n", "health.test.yml")

    assert result.returncode != 0
    assert "training stale fires at its for edge" in output(result)
    assert "query errors fire at their for edge" in output(result)


def test_unit_tests_catch_changed_description(tmp_path: Path):
    result = run_mutated_unit_tests(tmp_path, "Top signal:", "Main signal:", "anomalies.test.yml")

    assert result.returncode != 0
    assert "warning fires at its for edge" in output(result)


# --- coverage of the unit tests ----------------------------------------------------------


@pytest.mark.parametrize("alert_name", sorted(load_alerts()))
def test_alert_tested_at_its_for_edge(alert_name: str):
    """Each alert fires at some evaluation and is checked silent one evaluation earlier."""
    edges = []
    for test_file in RULE_TEST_FILES:
        step = evaluation_interval(test_file)
        checks = [item for item in alert_expectations(test_file) if item[1] == alert_name]
        firing = {(name, time) for name, _, time, fires in checks if fires}
        silent = {(name, time) for name, _, time, fires in checks if not fires}
        edges += [(name, time) for name, time in firing if (name, time - step) in silent]

    assert edges, f"no rule test checks {alert_name} both at its for edge and one evaluation before"


@pytest.mark.parametrize("alert_name", sorted(load_alerts()))
def test_alert_checked_on_healthy_series(alert_name: str):
    checks = [
        item
        for test_file in RULE_TEST_FILES
        for item in alert_expectations(test_file)
        if item[0] == HEALTHY_TEST_NAME and item[1] == alert_name
    ]

    assert checks, f"the test {HEALTHY_TEST_NAME!r} does not check {alert_name}"
    assert not any(fires for _, _, _, fires in checks)


# --- conventions -----------------------------------------------------------------------


@pytest.mark.parametrize("alert_name", sorted(load_alerts()))
def test_alert_name_is_prefixed_camel_case(alert_name: str):
    assert alert_name.startswith(ALERT_PREFIX)
    assert re.fullmatch(r"(?:[A-Z][a-z0-9]+)+", alert_name), alert_name


@pytest.mark.parametrize("alert_name", sorted(load_alerts()))
def test_alert_labels_and_annotations(alert_name: str):
    rule = load_alerts()[alert_name]
    annotations = rule["annotations"]

    assert rule["labels"]["severity"] in SEVERITIES
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert "{{" not in annotations["summary"], "summary must be static so notifications group"
    assert "{{" in annotations["description"]
    assert annotations["runbook_url"] == f"{RUNBOOK_BASE_URL}{alert_name}.md"


@pytest.mark.parametrize("alert_name", sorted(load_alerts()))
def test_alert_has_runbook(alert_name: str):
    runbook = RUNBOOK_DIR / f"{alert_name}.md"

    assert runbook.is_file(), f"missing runbook {runbook}"
    assert runbook.read_text(encoding="utf-8").startswith(f"# {alert_name}\n")


@pytest.mark.parametrize("alert_name", ENTITY_ALERTS)
def test_entity_alert_description_contents(alert_name: str):
    description = load_alerts()[alert_name]["annotations"]["description"]

    assert "$labels.entity" in description
    assert "$value" in description
    assert "anomaly_threshold" in description
    assert "topk(1, " in description
    assert "anomaly_signal_contribution" in description


def test_every_alert_has_for_field():
    missing = [name for name, rule in load_alerts().items() if "for" not in rule]

    assert not missing, f"alerts without a for: field, which the chart overrides by name: {missing}"


# --- knobs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Knob:
    """One tunable value of the rule file, as the Helm chart overrides it.

    `field` names the rule field that the knob sets (`for`, `keep_firing_for`), or is
    `text` for a literal that the chart replaces in the `expr` and annotations of
    `alerts`. For a text knob, `template` shows where the value sits, with `{}` in
    its place.
    """

    name: str
    alerts: tuple[str, ...]
    field: str
    default: str
    template: str = "{}"
    override: str = ""

    def text(self, value: str) -> str:
        return self.template.format(value)


KNOBS = (
    Knob("anomalyFor", ("AnomalyMonitorEntityAnomalous",), "for", "5m", override="15m"),
    Knob("criticalFor", ("AnomalyMonitorEntityHighlyAnomalous",), "for", "10m", override="30m"),
    Knob("keepFiringFor", ENTITY_ALERTS, "keep_firing_for", "10m", override="20m"),
    Knob(
        "criticalFactor",
        ("AnomalyMonitorEntityHighlyAnomalous",),
        "text",
        "2",
        template="> {} * last_over_time(anomaly_threshold",
        override="1.5",
    ),
    Knob("gapTolerance", ENTITY_ALERTS, "text", "3m", template="[{}]", override="5m"),
    Knob("runbookBaseUrl", tuple(load_alerts()), "text", RUNBOOK_BASE_URL, override="https://runbooks.example.org/"),
    Knob(
        "job",
        ("AnomalyMonitorDown", "AnomalyMonitorNotScraped"),
        "text",
        "anomaly-monitor",
        template='job="{}"',
        override="monitoring/anomaly-monitor",
    ),
)


def rule_text(rule: dict) -> str:
    return rule["expr"] + "\n" + "\n".join(rule["annotations"].values())


@pytest.mark.parametrize("knob", KNOBS, ids=lambda knob: knob.name)
def test_knob_default_in_rule_file(knob: Knob):
    alerts = load_alerts()
    for alert_name in knob.alerts:
        rule = alerts[alert_name]
        if knob.field == "text":
            assert knob.text(knob.default) in rule_text(rule), f"{knob.name} not found in {alert_name}"
        else:
            assert rule[knob.field] == knob.default, f"{alert_name}.{knob.field}"


@pytest.mark.parametrize("knob", [knob for knob in KNOBS if knob.field == "text"], ids=lambda knob: knob.name)
def test_text_knob_used_only_by_its_alerts(knob: Knob):
    """A chart that replaces the literal must not change an alert the knob does not name."""
    others = [name for name, rule in load_alerts().items() if name not in knob.alerts]

    assert not [name for name in others if knob.text(knob.default) in rule_text(load_alerts()[name])]


def apply_knob(alerts: dict[str, dict], knob: Knob, value: str) -> None:
    """Override one knob as docs/alerting.md describes it for the Helm chart."""
    for alert_name in knob.alerts:
        rule = alerts[alert_name]
        if knob.field != "text":
            rule[knob.field] = value
            continue
        old, new = knob.text(knob.default), knob.text(value)
        rule["expr"] = rule["expr"].replace(old, new)
        rule["annotations"] = {key: text.replace(old, new) for key, text in rule["annotations"].items()}


def test_overridden_knobs_keep_rules_valid(tmp_path: Path):
    document = load_yaml(RULES_FILE)
    alerts = {rule["alert"]: rule for group in document["groups"] for rule in group["rules"]}
    for knob in KNOBS:
        apply_knob(alerts, knob, knob.override)
    overridden = tmp_path / "overridden.rules.yml"
    overridden.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")

    result = run_promtool("check", "rules", overridden)

    assert result.returncode == 0, output(result)
    reloaded = load_alerts(overridden)
    assert reloaded["AnomalyMonitorEntityAnomalous"]["for"] == "15m"
    assert "> 1.5 * last_over_time(anomaly_threshold[5m])" in reloaded["AnomalyMonitorEntityHighlyAnomalous"]["expr"]
    assert 'job="monitoring/anomaly-monitor"' in reloaded["AnomalyMonitorNotScraped"]["expr"]
    assert "[3m]" not in rule_text(reloaded["AnomalyMonitorEntityAnomalous"])
    assert "{{ $labels.entity }}" in reloaded["AnomalyMonitorEntityAnomalous"]["annotations"]["description"]
    assert reloaded["AnomalyMonitorDown"]["annotations"]["runbook_url"] == "https://runbooks.example.org/AnomalyMonitorDown.md"


@pytest.mark.parametrize("knob", KNOBS, ids=lambda knob: knob.name)
def test_knob_documented(knob: Knob):
    rows = [line for line in ALERTING_DOC.read_text(encoding="utf-8").splitlines() if f"`{knob.name}`" in line]

    assert rows, f"docs/alerting.md does not list the knob {knob.name}"
    assert any(f"`{knob.default}`" in row for row in rows), f"docs/alerting.md lists no default for {knob.name}"
