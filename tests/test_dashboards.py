"""Checks of the Grafana dashboards in grafana/.

- Each dashboard validates against Grafana's JSON Schemas, read from the folder that
  the environment variable GRAFANA_SCHEMA_DIR names (skipped when it is unset or
  the folder is missing).
- Each dashboard is provisionable as it is: a datasource variable, no `__inputs`,
  a stable uid, UTC, a unit on every panel.
- The committed JSON equals the output of grafana/generate.py and survives a round
  trip through grafana-foundation-sdk, which drops unknown keys.
- Every PromQL expression, with its dashboard variables substituted, is accepted by
  a real Prometheus started on a free loopback port. That Prometheus has no data,
  so this proves that the expressions parse, not that they return data.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = ROOT / "grafana"
DASHBOARD_FILES = sorted(DASHBOARD_DIR.glob("*.json"))
GENERATOR = DASHBOARD_DIR / "generate.py"
SCHEMA_DIR_VARIABLE = "GRAFANA_SCHEMA_DIR"

EXPECTED_UIDS = {
    "anomaly-overview.json": "anomaly-overview",
    "anomaly-entity.json": "anomaly-entity",
    "anomaly-monitor-health.json": "anomaly-monitor-health",
}
DATASOURCE_UID = "${datasource}"
GRID_WIDTH = 24

# Values for the dashboard variables when an expression is sent to Prometheus. Grafana
# fills the `__` ones itself, and `__field.labels.signal` exists only in data links.
DEFAULT_VARIABLES = {
    "datasource": "prometheus",
    "job": "anomaly-monitor",
    "detector": "node",
    "entity": "node-a:9100",
    "__rate_interval": "2m",
    "__interval": "30s",
    "__range": "6h",
    "__range_s": "21600",
    "__range_ms": "21600000",
    "__field.labels.signal": "cpu",
}

PROMETHEUS = shutil.which("prometheus")
# Waiting for Prometheus to start gives up after this many seconds. It is a limit, not a
# check of speed.
WAIT_SECONDS = 30


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def dashboard_id(path: Path) -> str:
    return path.stem


def test_all_dashboards_present():
    assert sorted(path.name for path in DASHBOARD_FILES) == sorted(EXPECTED_UIDS)


# --- extraction of PromQL --------------------------------------------------------------


@dataclass(frozen=True)
class DashboardQuery:
    """One PromQL expression of a dashboard, with its variables substituted.

    `kind` is how Grafana sends it: `range` or `instant` to the query API, or
    `series` for a `label_values(selector, label)` variable, which Grafana resolves
    with the series API.
    """

    dashboard: str
    source: str
    expr: str
    kind: str


_VARIABLE = re.compile(r"\$\{([A-Za-z0-9_.]+)(?::[A-Za-z]+)?\}|\$([A-Za-z0-9_]+)|\[\[([A-Za-z0-9_.]+)\]\]")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\)$", re.DOTALL)


def substitute_variables(text: str, values: Mapping[str, str]) -> str:
    """Replace `$name`, `${name}`, `${name:format}` and `[[name]]` with `values[name]`.

    Raises KeyError naming the variable when `values` has no entry for it, so a
    misspelt variable fails loudly instead of reaching Prometheus.
    """

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise KeyError(f"no value for dashboard variable {name!r} in {text!r}")
        return values[name]

    return _VARIABLE.sub(replace, text)


def explore_link_exprs(url: str) -> list[str]:
    """Return the expressions of a Grafana Explore link (`/explore?...&panes=<JSON>`)."""
    query = urllib.parse.urlparse(url).query
    panes = urllib.parse.parse_qs(query).get("panes", [])
    exprs = []
    for encoded in panes:
        for pane in json.loads(encoded).values():
            exprs += [item["expr"] for item in pane.get("queries", []) if "expr" in item]
    return exprs


def panel_queries(uid: str, panel: dict, values: Mapping[str, str]) -> list[DashboardQuery]:
    label = f"panel {panel.get('id')} {panel.get('title', '')!r}"
    queries = []
    for target in panel.get("targets", []):
        kind = "instant" if target.get("instant") and not target.get("range") else "range"
        expr = substitute_variables(target["expr"], values)
        queries.append(DashboardQuery(uid, f"{label} target {target.get('refId', '')}", expr, kind))
    for link in panel.get("fieldConfig", {}).get("defaults", {}).get("links", []):
        for expr in explore_link_exprs(link.get("url", "")):
            queries.append(DashboardQuery(uid, f"{label} link {link.get('title', '')!r}", substitute_variables(expr, values), "range"))
    return queries


def variable_queries(uid: str, dashboard: dict, values: Mapping[str, str]) -> list[DashboardQuery]:
    queries = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"] if isinstance(variable["query"], str) else variable["query"].get("query", "")
        match = _LABEL_VALUES.match(query.strip())
        if match is None:
            raise ValueError(f"{uid}: variable {variable['name']} uses an unsupported query form: {query!r}")
        selector = substitute_variables(match["selector"], values)
        queries.append(DashboardQuery(uid, f"variable {variable['name']}", selector, "series"))
    return queries


def annotation_queries(uid: str, dashboard: dict, values: Mapping[str, str]) -> list[DashboardQuery]:
    annotations = dashboard.get("annotations", {}).get("list", [])
    return [
        DashboardQuery(uid, f"annotation {item['name']!r}", substitute_variables(item["expr"], values), "range")
        for item in annotations
        if item.get("expr")
    ]


def all_panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside a collapsed row


def extract_queries(dashboard: dict, values: Mapping[str, str] = DEFAULT_VARIABLES) -> list[DashboardQuery]:
    """List every PromQL expression of a dashboard with its variables substituted.

    Covers panel targets, Explore links in data links, `label_values` variable
    queries and annotation queries. Raises KeyError for a variable missing from
    `values` and ValueError for a variable query form it cannot translate.
    """
    uid = dashboard["uid"]
    queries = variable_queries(uid, dashboard, values) + annotation_queries(uid, dashboard, values)
    for panel in all_panels(dashboard):
        queries += panel_queries(uid, panel, values)
    return queries


def all_queries() -> list[DashboardQuery]:
    return [query for path in DASHBOARD_FILES for query in extract_queries(load_dashboard(path))]


def test_extraction_substitutes_every_variable():
    leftovers = [query for query in all_queries() if "$" in query.expr or "[[" in query.expr]

    assert not leftovers


def test_extraction_covers_all_sources():
    queries = extract_queries(load_dashboard(DASHBOARD_DIR / "anomaly-entity.json"))
    sources = {query.source.split()[0] for query in queries}
    signal_links = [query for query in queries if " link " in query.source]

    assert sources == {"variable", "annotation", "panel"}
    assert signal_links
    assert all('signal="cpu"' in query.expr for query in signal_links)


def test_extraction_counts_every_target():
    for path in DASHBOARD_FILES:
        dashboard = load_dashboard(path)
        targets = sum(len(panel.get("targets", [])) for panel in all_panels(dashboard))
        extracted = [query for query in extract_queries(dashboard) if " target " in query.source]

        assert len(extracted) == targets, path.name


def test_substitution_forms():
    values = {"job": "j", "__rate_interval": "2m", "entity": "a/b"}
    text = 'rate(x{job=~"$job", e="${entity}", f="${entity:raw}", g="[[job]]"}[$__rate_interval]) $ "end$"'

    assert substitute_variables(text, values) == 'rate(x{job=~"j", e="a/b", f="a/b", g="j"}[2m]) $ "end$"'


def test_substitution_rejects_unknown_variable():
    with pytest.raises(KeyError, match="detectr"):
        substitute_variables('anomaly_score{detector="$detectr"}', DEFAULT_VARIABLES)


# --- provisioning ----------------------------------------------------------------------


@pytest.fixture(params=DASHBOARD_FILES, ids=dashboard_id)
def dashboard_file(request: pytest.FixtureRequest) -> Path:
    return request.param


def test_dashboard_provisionable_as_is(dashboard_file: Path):
    dashboard = load_dashboard(dashboard_file)

    assert "__inputs" not in dashboard
    assert "__requires" not in dashboard
    assert dashboard.get("id") is None
    assert dashboard["uid"] == EXPECTED_UIDS[dashboard_file.name]
    assert dashboard["timezone"] == "utc"


def test_dashboard_has_datasource_variable(dashboard_file: Path):
    variables = {item["name"]: item for item in load_dashboard(dashboard_file)["templating"]["list"]}

    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == DATASOURCE_UID, variable["name"]


def test_panels_read_from_datasource_variable(dashboard_file: Path):
    for panel in all_panels(load_dashboard(dashboard_file)):
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
            assert target["refId"], panel["title"]


def test_every_panel_has_unit(dashboard_file: Path):
    missing = [
        panel["title"]
        for panel in all_panels(load_dashboard(dashboard_file))
        if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    ]

    assert not missing


def test_panel_ids_and_titles_unique(dashboard_file: Path):
    panels = list(all_panels(load_dashboard(dashboard_file)))
    ids = [panel["id"] for panel in panels]
    titles = [panel["title"] for panel in panels]

    assert len(set(ids)) == len(ids)
    assert len(set(titles)) == len(titles)


def overlaps(first: dict, second: dict) -> bool:
    return (
        first["x"] < second["x"] + second["w"]
        and second["x"] < first["x"] + first["w"]
        and first["y"] < second["y"] + second["h"]
        and second["y"] < first["y"] + first["h"]
    )


def test_panels_fit_grid_without_overlap(dashboard_file: Path):
    panels = list(all_panels(load_dashboard(dashboard_file)))
    positions = [(panel["title"], panel["gridPos"]) for panel in panels]

    for title, position in positions:
        assert position["x"] + position["w"] <= GRID_WIDTH, title
    for index, (title, position) in enumerate(positions):
        for other_title, other in positions[index + 1 :]:
            assert not overlaps(position, other), f"{title!r} overlaps {other_title!r}"


def test_overview_stat_row():
    panels = load_dashboard(DASHBOARD_DIR / "anomaly-overview.json")["panels"]
    top_row = [panel for panel in panels if panel["gridPos"]["y"] == 0]

    assert [panel["type"] for panel in top_row] == ["stat"] * 4
    assert [panel["title"] for panel in top_row] == [
        "Monitor replicas up",
        "Detectors serving",
        "Anomalous entities",
        "Age of the last training",
    ]


# --- JSON Schema -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema_dir() -> Path:
    value = os.environ.get(SCHEMA_DIR_VARIABLE)
    if not value:
        pytest.skip(f"{SCHEMA_DIR_VARIABLE} is not set: point it at a folder with Grafana's JSON Schemas")
    folder = Path(value)
    if not (folder / "dashboard.jsonschema.json").is_file():
        pytest.skip(f"{SCHEMA_DIR_VARIABLE}={folder} has no dashboard.jsonschema.json")
    return folder


def load_schema(folder: Path, name: str) -> dict:
    path = folder / f"{name}.jsonschema.json"
    assert path.is_file(), f"no JSON Schema {path.name} in {folder}"
    return json.loads(path.read_text(encoding="utf-8"))


def definition_schema(schema: dict, name: str) -> dict:
    """Wrap one definition of a schema file so it validates on its own."""
    return {"$ref": f"#/definitions/{name}", "definitions": schema["definitions"]}


def schema_errors(schema: dict, instance: object, where: str) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{where}/{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(instance)]


def dashboard_schema_errors(dashboard: dict, folder: Path) -> list[str]:
    errors = schema_errors(load_schema(folder, "dashboard"), dashboard, "dashboard")
    query_schema = load_schema(folder, "prometheus")
    for panel in all_panels(dashboard):
        where = f"panel {panel.get('title')!r}"
        panel_schema = load_schema(folder, panel["type"])
        errors += schema_errors(definition_schema(panel_schema, "Options"), panel.get("options", {}), f"{where} options")
        custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom")
        if custom is not None:
            assert "FieldConfig" in panel_schema["definitions"], f"{where}: {panel['type']} takes no custom field config"
            errors += schema_errors(definition_schema(panel_schema, "FieldConfig"), custom, f"{where} custom")
        for target in panel.get("targets", []):
            errors += schema_errors(query_schema, target, f"{where} target {target.get('refId')}")
    return errors


def test_dashboard_matches_json_schema(dashboard_file: Path, schema_dir: Path):
    errors = dashboard_schema_errors(load_dashboard(dashboard_file), schema_dir)

    assert not errors, "\n".join(errors)


def test_json_schema_check_rejects_broken_dashboard(schema_dir: Path):
    broken = load_dashboard(DASHBOARD_DIR / "anomaly-overview.json")
    broken["refresh"] = 30
    broken["panels"][0]["options"]["graphMod"] = "none"
    broken["panels"][0]["targets"][0]["exprr"] = "up"

    errors = dashboard_schema_errors(broken, schema_dir)

    assert any("refresh" in error for error in errors)
    assert any("graphMod" in error for error in errors)
    assert any("exprr" in error for error in errors)


# --- generator and grafana-foundation-sdk ----------------------------------------------


@pytest.fixture(scope="module")
def generator():
    pytest.importorskip(
        "grafana_foundation_sdk",
        reason="grafana-foundation-sdk is not installed: pip install 'grafana-foundation-sdk==1769699379!11.6.0'",
    )
    spec = importlib.util.spec_from_file_location("dashboard_generator", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_json_matches_generator(generator, dashboard_file: Path):
    generated = generator.build_all()

    assert dashboard_file.name in generated, f"grafana/generate.py does not produce {dashboard_file.name}"
    expected = generator.render(generated[dashboard_file.name])
    assert dashboard_file.read_text(encoding="utf-8") == expected, "run `python grafana/generate.py` and commit"


def sdk_round_trip(dashboard: dict) -> dict:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    return json.loads(JSONEncoder(sort_keys=True).encode(Dashboard.from_json(copy.deepcopy(dashboard))))


def test_sdk_round_trip_keeps_every_key(generator, dashboard_file: Path):
    dashboard = load_dashboard(dashboard_file)

    assert sdk_round_trip(dashboard) == dashboard


def test_sdk_round_trip_drops_unknown_key(generator):
    dashboard = load_dashboard(DASHBOARD_DIR / "anomaly-overview.json")
    dashboard["panels"][0]["fieldConfig"]["defaults"]["unitt"] = "s"

    assert sdk_round_trip(dashboard) != dashboard


# --- a real Prometheus -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api_get(base_url: str, path: str, params: dict[str, str]) -> dict:
    """GET a Prometheus API path and return the JSON body, also for 4xx and 5xx responses."""
    url = f"{base_url}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


def wait_until_ready(process: subprocess.Popen, url: str) -> bool:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start an empty Prometheus on a free loopback port and yield its base URL."""
    if PROMETHEUS is None:
        pytest.skip("prometheus not found on PATH: install the Debian package `prometheus`")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n", encoding="utf-8")

    # A port taken between free_port() and the bind makes the process exit: try again.
    for _ in range(3):
        port = free_port()
        log = (workdir / f"prometheus-{port}.log").open("w")
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / f'data-{port}'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base_url = f"http://127.0.0.1:{port}"
        if wait_until_ready(process, f"{base_url}/-/ready"):
            break
        stop(process)
        log.close()
    else:
        pytest.fail(f"Prometheus did not become ready; see the logs in {workdir}")

    yield base_url
    stop(process)
    log.close()


def run_query(base_url: str, query: DashboardQuery) -> dict:
    now = time.time()
    if query.kind == "instant":
        return api_get(base_url, "/api/v1/query", {"query": query.expr, "time": f"{now:.3f}"})
    if query.kind == "series":
        params = {"match[]": query.expr, "start": f"{now - 3600:.3f}", "end": f"{now:.3f}"}
        return api_get(base_url, "/api/v1/series", params)
    params = {"query": query.expr, "start": f"{now - 3600:.3f}", "end": f"{now:.3f}", "step": "60"}
    return api_get(base_url, "/api/v1/query_range", params)


def query_id(query: DashboardQuery) -> str:
    return re.sub(r"[^A-Za-z0-9_.:/]+", "-", f"{query.dashboard}:{query.source}").strip("-")


@pytest.mark.parametrize("query", all_queries(), ids=query_id)
def test_prometheus_accepts_expression(prometheus: str, query: DashboardQuery):
    answer = run_query(prometheus, query)

    assert answer["status"] == "success", f"{query.expr}\n{answer.get('error')}"


def test_prometheus_rejects_broken_expression(prometheus: str):
    broken = DashboardQuery("none", "broken", 'sum(rate(anomaly_score{job="x"}[5m])', "instant")

    answer = run_query(prometheus, broken)

    assert answer["status"] == "error"
    assert answer["errorType"] == "bad_data"
