"""Config validation: every kind of error, all errors at once, secrets and the shard overrides."""

from __future__ import annotations

import base64
import copy
from pathlib import Path

import pytest
import yaml

from faults import ScriptedServer
from monitor.config import ConfigError, format_duration, load_config, parse_config, parse_duration
from monitor.source import PrometheusSource, QueryError


@pytest.fixture(autouse=True)
def no_shard_environment(monkeypatch):
    # The shard variables would override the configs below; tests that need them set them again.
    monkeypatch.delenv("ANOMALY_MONITOR_SHARD_INDEX", raising=False)
    monkeypatch.delenv("ANOMALY_MONITOR_SHARD_COUNT", raising=False)


def valid_raw() -> dict:
    return {
        "prometheus": {"url": "http://127.0.0.1:9090"},
        "storage": {"path": "/tmp/anomaly-monitor-test"},
        "detectors": [{
            "name": "node",
            "entity_labels": ["instance"],
            "step": "30s",
            "window": 10,
            "signals": {"cpu": "sum by (instance) (rate(node_cpu_seconds_total[2m]))"},
            "train": {"range": "1d", "every": "6h"},
            "score": {"every": "1m", "aggregate_steps": 5},
        }],
    }


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "test.yaml")
    return caught.value.problems


def single_problem(raw: dict) -> str:
    problems = problems_of(raw)
    assert len(problems) == 1, problems
    return problems[0]


def test_valid_config_parses():
    config = parse_config(valid_raw())

    assert config.detectors[0].step == 30.0
    assert config.detectors[0].train.range == 86400.0
    assert config.prometheus.accept_encoding == "identity"
    assert config.prometheus.tls_verify is True


def test_unknown_key():
    raw = valid_raw()
    raw["prometheus"]["urll"] = "http://x:9090"

    assert single_problem(raw) == "prometheus.urll: unknown key; remove it or check its spelling"


def test_unknown_top_level_key():
    raw = valid_raw()
    raw["detector"] = []

    assert single_problem(raw) == "detector: unknown key; remove it or check its spelling"


def test_wrong_type():
    raw = valid_raw()
    raw["detectors"][0]["window"] = "thirty"
    problem = single_problem(raw)

    assert problem.startswith("detectors[0].window: ")
    assert "valid integer" in problem
    assert "'thirty'" in problem


def test_wrong_type_mapping():
    raw = valid_raw()
    raw["detectors"][0]["signals"] = ["cpu"]

    assert single_problem(raw).startswith("detectors[0].signals: ")


@pytest.mark.parametrize("value", ["30 seconds", "5x", "", "0s", "-5m", "1h30"])
def test_bad_duration(value: str):
    raw = valid_raw()
    raw["detectors"][0]["step"] = value
    problem = single_problem(raw)

    assert problem.startswith("detectors[0].step: expected a positive duration")
    assert repr(value) in problem


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("7d", 604800.0), ("1w", 604800.0), ("250ms", 0.25), (45, 45.0),
])
def test_parse_duration(text, seconds: float):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("seconds, text", [(30.0, "30s"), (5400.0, "1h30m"), (86400.0, "1d"), (0.25, "250ms")])
def test_format_duration(seconds: float, text: str):
    assert format_duration(seconds) == text


def test_boolean_is_not_a_duration():
    with pytest.raises(ValueError):
        parse_duration(True)


@pytest.mark.parametrize("value, seconds", [("0s", 0.0), (0, 0.0), ("30s", 30.0)])
def test_score_lag_may_be_zero(value, seconds: float):
    raw = valid_raw()
    raw["detectors"][0]["score"]["lag"] = value

    assert parse_config(raw).detectors[0].score.lag == seconds


def test_negative_score_lag_rejected():
    raw = valid_raw()
    raw["detectors"][0]["score"]["lag"] = "-5s"

    assert single_problem(raw).startswith("detectors[0].score.lag: ")


def test_dumped_config_validates_again():
    config = parse_config(valid_raw())

    assert parse_config(config.model_dump(mode="json")) == config


def test_missing_required_key():
    raw = valid_raw()
    del raw["detectors"][0]["name"]

    assert single_problem(raw) == "detectors[0].name: required key is missing"


def test_missing_detectors():
    raw = valid_raw()
    del raw["detectors"]

    assert single_problem(raw) == "detectors: required key is missing"


@pytest.mark.parametrize("label", ["bad-label", "0instance", "__name__", ""])
def test_invalid_label_name(label: str):
    raw = valid_raw()
    raw["detectors"][0]["entity_labels"] = [label]
    problem = single_problem(raw)

    assert problem.startswith("detectors[0].entity_labels: ")
    assert "not a valid Prometheus label name" in problem


@pytest.mark.parametrize("label", ["detector", "entity", "signal", "le"])
def test_reserved_label_name(label: str):
    raw = valid_raw()
    raw["detectors"][0]["entity_labels"] = ["instance", label]
    problem = single_problem(raw)

    assert problem.startswith("detectors[0].entity_labels: ")
    assert "reserved" in problem


def test_duplicate_detector():
    raw = valid_raw()
    raw["detectors"].append(copy.deepcopy(raw["detectors"][0]))
    problem = single_problem(raw)

    assert "detector names must be unique" in problem
    assert "'node'" in problem


@pytest.mark.parametrize("index", [2, -1])
def test_shard_index_out_of_range(index: int):
    raw = valid_raw()
    raw["shard"] = {"count": 2, "index": index}
    problem = single_problem(raw)

    assert problem.startswith("shard: ")
    assert f"shard.index {index} must lie in [0, 1]" in problem


def test_shard_index_auto_accepted():
    raw = valid_raw()
    raw["shard"] = {"count": 3, "index": "auto"}

    assert parse_config(raw).shard.index == "auto"


@pytest.mark.parametrize("url", ["prometheus:9090", "ftp://prometheus:9090", "http://", "http:// spaced"])
def test_bad_url(url: str):
    raw = valid_raw()
    raw["prometheus"]["url"] = url
    problem = single_problem(raw)

    assert problem.startswith("prometheus.url: expected an http:// or https:// URL")


def test_url_trailing_slash_removed():
    raw = valid_raw()
    raw["prometheus"]["url"] = "http://127.0.0.1:9090/prefix/"

    assert parse_config(raw).prometheus.url == "http://127.0.0.1:9090/prefix"


def test_missing_token_file(tmp_path: Path):
    raw = valid_raw()
    missing = tmp_path / "absent-token"
    raw["prometheus"]["bearer_token_file"] = str(missing)
    problem = single_problem(raw)

    assert problem.startswith("prometheus.bearer_token_file: ")
    assert str(missing) in problem
    assert "missing or not readable" in problem


def test_missing_ca_file(tmp_path: Path):
    raw = valid_raw()
    raw["prometheus"]["ca_file"] = str(tmp_path / "absent-ca.pem")

    assert single_problem(raw).startswith("prometheus.ca_file: ")


def test_two_token_sources(tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("secret")
    raw = valid_raw()
    raw["prometheus"].update(bearer_token_file=str(token), bearer_token_env="TOKEN")

    assert "at most one of bearer_token_file or bearer_token_env" in single_problem(raw)


def test_basic_auth_needs_one_password_source():
    raw = valid_raw()
    raw["prometheus"]["basic_auth"] = {"username": "reader"}
    problem = single_problem(raw)

    assert problem.startswith("prometheus.basic_auth: ")
    assert "exactly one of password_file or password_env" in problem


def test_aggregate_steps_above_window():
    raw = valid_raw()
    raw["detectors"][0]["score"]["aggregate_steps"] = 11

    assert single_problem(raw) == "detectors[0]: score.aggregate_steps (11) must not exceed window (10)"


def test_train_range_too_short():
    raw = valid_raw()
    raw["detectors"][0]["train"]["range"] = "10m"

    assert single_problem(raw) == "detectors[0]: train.range (10m) must cover at least 4 windows (20m)"


def test_score_every_below_step():
    raw = valid_raw()
    raw["detectors"][0]["score"]["every"] = "10s"

    assert "score.every (10s) must be at least step (30s)" in single_problem(raw)


def test_all_problems_listed_at_once():
    raw = valid_raw()
    raw["prometheus"]["url"] = "prometheus:9090"
    raw["prometheus"]["retriess"] = 3
    raw["shard"] = {"count": 2, "index": 5}
    raw["detectors"][0]["step"] = "soon"
    second = copy.deepcopy(raw["detectors"][0])
    second["name"] = "pods"
    second["step"] = "30s"
    del second["signals"]
    raw["detectors"].append(second)
    problems = problems_of(raw)
    locations = sorted(problem.split(":", 1)[0] for problem in problems)

    assert locations == ["detectors[0].step", "detectors[1].signals", "prometheus.retriess", "prometheus.url", "shard"]


def test_error_message_names_source_and_every_problem():
    raw = valid_raw()
    raw["prometheus"]["url"] = "nope"
    raw["torch_threads"] = 0
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "bad.yaml")
    text = str(caught.value)

    assert text.startswith("invalid config bad.yaml:")
    assert "\n  - prometheus.url: " in text
    assert "\n  - torch_threads: " in text


def test_top_level_not_a_mapping():
    assert single_problem(["detectors"]) == "(top level): expected a mapping of keys, found list"


def test_load_config_invalid_yaml(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("detectors: [\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.problems[0].startswith("invalid YAML: ")


def test_load_config_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")

    assert caught.value.problems == ["cannot read the file: No such file or directory"]


def test_load_config_from_yaml(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(valid_raw()))

    assert load_config(path).detector("node").window == 10


# ---- secrets, checked on the wire ------------------------------------------------------------


def source_for(raw_prometheus: dict) -> PrometheusSource:
    raw = valid_raw()
    raw["prometheus"] = raw_prometheus
    return PrometheusSource(parse_config(raw).prometheus)


def authorization_sent(raw_prometheus: dict, server: ScriptedServer) -> str | None:
    source = source_for(raw_prometheus)
    try:
        source.query_instant("up")
    finally:
        source.close()
    return server.requests[-1].headers.get("Authorization")


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def test_bearer_token_from_file(tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("file-token\n")
    with ScriptedServer() as server:
        sent = authorization_sent({"url": server.url, "bearer_token_file": str(token)}, server)

    assert sent == "Bearer file-token"


def test_bearer_token_from_env(monkeypatch):
    monkeypatch.setenv("TEST_PROMETHEUS_TOKEN", "env-token")
    with ScriptedServer() as server:
        sent = authorization_sent({"url": server.url, "bearer_token_env": "TEST_PROMETHEUS_TOKEN"}, server)

    assert sent == "Bearer env-token"


def test_basic_auth_password_from_env(monkeypatch):
    monkeypatch.setenv("TEST_PROMETHEUS_PASSWORD", "env-password")
    with ScriptedServer() as server:
        auth = {"username": "reader", "password_env": "TEST_PROMETHEUS_PASSWORD"}
        sent = authorization_sent({"url": server.url, "basic_auth": auth}, server)

    assert sent == basic("reader", "env-password")


def test_basic_auth_password_from_file(tmp_path: Path):
    password = tmp_path / "password"
    password.write_text("file-password\n")
    with ScriptedServer() as server:
        auth = {"username": "reader", "password_file": str(password)}
        sent = authorization_sent({"url": server.url, "basic_auth": auth}, server)

    assert sent == basic("reader", "file-password")


def test_unset_secret_env_fails_without_request(monkeypatch):
    monkeypatch.delenv("TEST_PROMETHEUS_TOKEN", raising=False)
    with ScriptedServer() as server:
        source = source_for({"url": server.url, "bearer_token_env": "TEST_PROMETHEUS_TOKEN", "retries": 0})
        with pytest.raises(QueryError) as caught:
            source.query_instant("up")
        source.close()

    assert caught.value.reason == "config"
    assert "TEST_PROMETHEUS_TOKEN" in str(caught.value)
    assert server.requests == []


def test_secret_not_in_config_dump(tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("do-not-show")
    raw = valid_raw()
    raw["prometheus"]["bearer_token_file"] = str(token)

    assert "do-not-show" not in repr(parse_config(raw))


# ---- shard overrides from the environment ----------------------------------------------------


def test_shard_index_from_env(monkeypatch):
    monkeypatch.setenv("ANOMALY_MONITOR_SHARD_INDEX", "1")
    raw = valid_raw()
    raw["shard"] = {"count": 2, "index": 0}

    assert parse_config(raw).shard.index == 1


def test_shard_count_and_index_from_env(monkeypatch):
    monkeypatch.setenv("ANOMALY_MONITOR_SHARD_COUNT", "4")
    monkeypatch.setenv("ANOMALY_MONITOR_SHARD_INDEX", "3")
    shard = parse_config(valid_raw()).shard

    assert shard.count == 4
    assert shard.index == 3


def test_shard_index_auto_from_env(monkeypatch):
    monkeypatch.setenv("ANOMALY_MONITOR_SHARD_INDEX", "auto")
    raw = valid_raw()
    raw["shard"] = {"count": 3}

    assert parse_config(raw).shard.index == "auto"


def test_shard_index_from_env_out_of_range(monkeypatch):
    monkeypatch.setenv("ANOMALY_MONITOR_SHARD_INDEX", "2")
    raw = valid_raw()
    raw["shard"] = {"count": 2}

    assert "shard.index 2 must lie in [0, 1]" in single_problem(raw)
