"""The `anomaly-monitor` command line, run as a subprocess the way an operator runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("ANOMALY_MONITOR_")}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True, text=True,
                          cwd=ROOT, env=environment, timeout=120)


def bad_config(tmp_path: Path) -> Path:
    content = config_dict(tmp_path)
    content["prometheus"]["url"] = "prometheus:9090"
    content["detectors"][0]["window"] = "ten"
    content["detectors"][0]["colour"] = "blue"
    return write_config(tmp_path, content, "bad.yaml")


def test_check_config_bad_file_exits_2(tmp_path: Path):
    result = run_cli("check-config", "--config", str(bad_config(tmp_path)))

    assert result.returncode == EXIT_CONFIG


def test_check_config_bad_file_no_traceback(tmp_path: Path):
    result = run_cli("check-config", "--config", str(bad_config(tmp_path)))

    assert "Traceback" not in result.stderr


def test_check_config_bad_file_lists_every_problem(tmp_path: Path):
    path = bad_config(tmp_path)
    result = run_cli("check-config", "--config", str(path))

    assert f"invalid config {path}:" in result.stderr
    assert "  - prometheus.url: expected an http:// or https:// URL" in result.stderr
    assert "  - detectors[0].window: " in result.stderr
    assert "  - detectors[0].colour: unknown key" in result.stderr


def test_check_config_valid_file(tmp_path: Path):
    result = run_cli("check-config", "--config", str(write_config(tmp_path, config_dict(tmp_path))))

    assert result.returncode == 0
    assert result.stdout == "config is valid: 1 detector(s): node\n"


def test_config_from_environment(tmp_path: Path):
    path = write_config(tmp_path, config_dict(tmp_path))
    result = run_cli("check-config", env={"ANOMALY_MONITOR_CONFIG": str(path)})

    assert result.returncode == 0


def test_no_config_exits_2():
    result = run_cli("check-config")

    assert result.returncode == EXIT_CONFIG
    assert "no config given" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_file_exits_2(tmp_path: Path):
    result = run_cli("check-config", "--config", str(tmp_path / "absent.yaml"))

    assert result.returncode == EXIT_CONFIG
    assert "cannot read the file" in result.stderr


def test_invalid_yaml_exits_2(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("detectors: [\n")
    result = run_cli("check-config", "--config", str(path))

    assert result.returncode == EXIT_CONFIG
    assert "invalid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_installed(tmp_path: Path):
    script = shutil.which("anomaly-monitor", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the anomaly-monitor console script is not installed in this environment (pip install -e .)")
    result = subprocess.run([script, "check-config", "--config", str(bad_config(tmp_path))],
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == EXIT_CONFIG
    assert "Traceback" not in result.stderr


def test_run_with_unresolvable_shard_exits_2(tmp_path: Path):
    content = config_dict(tmp_path)
    content["listen"] = "127.0.0.1:0"
    content["shard"] = {"count": 2, "index": "auto"}
    result = run_cli("run", "--config", str(write_config(tmp_path, content)), env={"HOSTNAME": "workstation"})

    assert result.returncode == EXIT_CONFIG
    assert "does not end in -<ordinal>" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_unknown_detector_exits_2(tmp_path: Path):
    path = write_config(tmp_path, config_dict(tmp_path))
    result = run_cli("train", "--config", str(path), "--detector", "pods")

    assert result.returncode == EXIT_CONFIG
    assert "unknown detector(s) ['pods']" in result.stderr


def test_json_log_format(tmp_path: Path):
    path = write_config(tmp_path, config_dict(tmp_path))
    result = run_cli("--log-format", "json", "train", "--config", str(path), "--detector", "pods")
    (line,) = result.stderr.splitlines()

    assert line.startswith('{"time": ')
    assert '"level": "error"' in line


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
def test_connect_ok(tmp_path: Path, prometheus_url: str):
    content = config_dict(tmp_path, prometheus_url, {"cpu": ENTITY_SERIES, "memory": TWO_ENTITIES})
    result = run_cli("check-config", "--connect", "--config", str(write_config(tmp_path, content)))

    assert result.returncode == 0
    assert "ok   node/cpu: 1 entities" in result.stdout
    assert "ok   node/memory: 2 entities" in result.stdout


@pytest.mark.integration
@pytest.mark.parametrize("query, complaint", [
    ("vector(1)", "lack the entity labels ['instance']"),
    ("absent_metric_for_test", "the query returned no series"),
    ("sum(", "returned HTTP 400"),
    (f'{ENTITY_SERIES} or label_replace(vector(2), "instance", "node-a", "job", "")',
     "several series per entity"),
])
def test_connect_reports_bad_signal(tmp_path: Path, prometheus_url: str, query: str, complaint: str):
    content = config_dict(tmp_path, prometheus_url, {"cpu": ENTITY_SERIES, "broken": query})
    result = run_cli("check-config", "--connect", "--config", str(write_config(tmp_path, content)))

    assert result.returncode == 1
    assert "ok   node/cpu" in result.stdout
    assert "FAIL node/broken: " in result.stdout
    assert complaint in result.stdout


@pytest.mark.integration
def test_connect_unreachable_prometheus(tmp_path: Path):
    from faults import refused_url

    content = config_dict(tmp_path, refused_url())
    result = run_cli("check-config", "--connect", "--config", str(write_config(tmp_path, content)))

    assert result.returncode == 1
    assert "cannot connect" in result.stdout
    assert "Traceback" not in result.stderr
