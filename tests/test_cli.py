"""The `anomaly-monitor` command line.

One bad config runs through the installed script in a new process, as an operator runs it. The
other cases call `main()` in this process, because every new process spends seconds importing torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from faults import refused_url
from monitor.cli import main
from monitor.commands import check_config
from monitor.config import load_config
from monitor.localstack import LocalStack, MissingBinary

ROOT = Path(__file__).resolve().parents[1]
EXIT_CONFIG = 2


def config_dict(tmp_path: Path, url: str = "http://127.0.0.1:9090", signals: dict | None = None) -> dict:
    return {
        "prometheus": {"url": url, "timeout": "5s", "retries": 0},
        "storage": {"path": str(tmp_path / "storage")},
        "detectors": [{
            "name": "node",
            "entity_labels": ["instance"],
            "step": "30s",
            "window": 10,
            "signals": signals or {"cpu": "sum by (instance) (rate(node_cpu_seconds_total[2m]))"},
            "train": {"range": "1d"},
            "score": {"aggregate_steps": 5},
        }],
    }


def write_config(tmp_path: Path, content: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content))
    return path


def run_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("ANOMALY_MONITOR_")}
    return subprocess.run([*args], capture_output=True, text=True, cwd=ROOT, env=environment, timeout=120)


@pytest.fixture(autouse=True)
def clean_cli_state(monkeypatch):
    """Clear the ANOMALY_MONITOR_ variables, and undo main()'s root logger set-up afterwards."""
    for key in [k for k in os.environ if k.startswith("ANOMALY_MONITOR_")]:
        monkeypatch.delenv(key)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """Run the command line in this process; return the exit code, stdout and stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def bad_config(tmp_path: Path) -> Path:
    content = config_dict(tmp_path)
    content["prometheus"]["url"] = "prometheus:9090"
    content["detectors"][0]["window"] = "ten"
    content["detectors"][0]["colour"] = "blue"
    return write_config(tmp_path, content, "bad.yaml")


def command_line() -> list[str]:
    """Return the installed `anomaly-monitor` script, or `python -m monitor` where it is not installed."""
    script = shutil.which("anomaly-monitor", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "monitor"]


@pytest.fixture(scope="module")
def bad_config_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Run `anomaly-monitor check-config` once on a bad file in a new process, as an operator would."""
    path = bad_config(tmp_path_factory.mktemp("bad"))
    return path, run_subprocess(*command_line(), "check-config", "--config", str(path))


def test_check_config_bad_file_exits_2(bad_config_run):
    _, result = bad_config_run

    assert result.returncode == EXIT_CONFIG


def test_check_config_bad_file_no_traceback(bad_config_run):
    _, result = bad_config_run

    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("problem", [
    "  - prometheus.url: expected an http:// or https:// URL",
    "  - detectors[0].window: ",
    "  - detectors[0].colour: unknown key",
])
def test_check_config_bad_file_lists_every_problem(bad_config_run, problem: str):
    path, result = bad_config_run

    assert f"invalid config {path}:" in result.stderr
    assert problem in result.stderr


def test_check_config_valid_file(tmp_path: Path, capsys):
    code, out, _ = run_main(capsys, "check-config", "--config", str(write_config(tmp_path, config_dict(tmp_path))))

    assert code == 0
    assert out == "config is valid: 1 detector(s): node\n"


def test_config_from_environment(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("ANOMALY_MONITOR_CONFIG", str(write_config(tmp_path, config_dict(tmp_path))))
    code, _, _ = run_main(capsys, "check-config")

    assert code == 0


def test_no_config_exits_2(capsys):
    code, _, err = run_main(capsys, "check-config")

    assert code == EXIT_CONFIG
    assert "no config given" in err


def test_missing_file_exits_2(tmp_path: Path, capsys):
    code, _, err = run_main(capsys, "check-config", "--config", str(tmp_path / "absent.yaml"))

    assert code == EXIT_CONFIG
    assert "cannot read the file" in err


def test_invalid_yaml_exits_2(tmp_path: Path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("detectors: [\n")
    code, _, err = run_main(capsys, "check-config", "--config", str(path))

    assert code == EXIT_CONFIG
    assert "invalid YAML" in err


def test_run_with_unresolvable_shard_exits_2(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("HOSTNAME", "workstation")
    content = config_dict(tmp_path)
    content["listen"] = "127.0.0.1:0"
    content["shard"] = {"count": 2, "index": "auto"}
    code, _, err = run_main(capsys, "run", "--config", str(write_config(tmp_path, content)))

    assert code == EXIT_CONFIG
    assert "does not end in -<ordinal>" in err


def test_train_unknown_detector_exits_2(tmp_path: Path, capsys):
    path = write_config(tmp_path, config_dict(tmp_path))
    code, _, err = run_main(capsys, "train", "--config", str(path), "--detector", "pods")

    assert code == EXIT_CONFIG
    assert "unknown detector(s) ['pods']" in err


def test_json_log_format(tmp_path: Path, capsys):
    path = write_config(tmp_path, config_dict(tmp_path))
    _, _, err = run_main(capsys, "--log-format", "json", "train", "--config", str(path), "--detector", "pods")
    (line,) = err.splitlines()

    assert json.loads(line)["level"] == "error"
    assert "unknown detector(s)" in json.loads(line)["message"]


# ---- check-config --connect against a real Prometheus ------------------------------------------


@pytest.fixture(scope="module")
def prometheus_url(tmp_path_factory) -> str:
    stack = LocalStack(tmp_path_factory.mktemp("prometheus"))
    try:
        url = stack.start_prometheus(scrape_configs=[])
    except MissingBinary as error:
        pytest.skip(str(error))
    yield url
    stack.stop()


# PromQL that needs no stored data, so the checks do not wait for a scrape.
ENTITY_SERIES = 'label_replace(vector(1), "instance", "node-a", "", "")'
TWO_ENTITIES = f'{ENTITY_SERIES} or label_replace(vector(2), "instance", "node-b", "", "")'


@pytest.mark.integration
def test_connect_ok(tmp_path: Path, prometheus_url: str, capsys):
    content = config_dict(tmp_path, prometheus_url, {"cpu": ENTITY_SERIES, "memory": TWO_ENTITIES})
    code, out, _ = run_main(capsys, "check-config", "--connect", "--config", str(write_config(tmp_path, content)))

    assert code == 0
    assert "ok   node/cpu: 1 entities" in out
    assert "ok   node/memory: 2 entities" in out


BROKEN_SIGNALS = {
    "unlabelled": ("vector(1)", "lack the entity labels ['instance']"),
    "absent": ("absent_metric_for_test", "the query returned no series"),
    "syntax": ("sum(", "returned HTTP 400"),
    # Two series for node-a that differ in a second label, so `or` keeps both.
    "duplicated": (f'{ENTITY_SERIES} or label_replace(label_replace(vector(2), "instance", "node-a", "", ""), '
                   '"job", "x", "", "")', "several series per entity"),
}


@pytest.fixture(scope="module")
def broken_connect_run(tmp_path_factory, prometheus_url: str) -> tuple[int, str]:
    folder = tmp_path_factory.mktemp("broken")
    signals = {"cpu": ENTITY_SERIES, **{name: query for name, (query, _) in BROKEN_SIGNALS.items()}}
    path = write_config(folder, config_dict(folder, prometheus_url, signals))
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = check_config(load_config(path), connect=True)
    return code, output.getvalue()


@pytest.mark.integration
def test_connect_bad_signals_exit_1(broken_connect_run):
    code, out = broken_connect_run

    assert code == 1
    assert "4 signal(s) failed" in out
    assert "ok   node/cpu" in out


@pytest.mark.integration
@pytest.mark.parametrize("signal", sorted(BROKEN_SIGNALS))
def test_connect_reports_bad_signal(broken_connect_run, signal: str):
    _, out = broken_connect_run
    (line,) = [line for line in out.splitlines() if line.startswith(f"FAIL node/{signal}: ")]

    assert BROKEN_SIGNALS[signal][1] in line


@pytest.mark.integration
def test_connect_unreachable_prometheus(tmp_path: Path, capsys):
    content = config_dict(tmp_path, refused_url())
    code, out, _ = run_main(capsys, "check-config", "--connect", "--config", str(write_config(tmp_path, content)))

    assert code == 1
    assert "cannot connect" in out
