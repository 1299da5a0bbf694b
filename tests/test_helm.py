"""Tests of the Helm chart in helm/anomaly-monitor with a real helm binary.

They lint the chart, render every scenario in the chart's ci/ folder, validate the
manifests with kubernetes-validate, run promtool on the rendered PrometheusRule and
check the rendered objects field by field. No cluster is involved: what a cluster
would do with the objects is out of reach here.

helm is taken from $HELM_BIN, then PATH, then .tools/bin (where
.ci/install-helm.sh puts it); without it every test here is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "helm" / "anomaly-monitor"
RULE_FILE = REPO_ROOT / "rules" / "anomaly-monitor.rules.yml"
RULE_TESTS = REPO_ROOT / "rules" / "tests"
CHART_RULE_FILE = CHART / "files" / "rules" / "anomaly-monitor.rules.yml"
DASHBOARDS = REPO_ROOT / "grafana"
CHART_DASHBOARDS = CHART / "files" / "dashboards"
SCENARIOS = sorted(path.name.removesuffix("-values.yaml") for path in (CHART / "ci").glob("*-values.yaml"))
RELEASE = "am"
NAMESPACE = "monitoring"
FULLNAME = f"{RELEASE}-anomaly-monitor"
# The oldest Kubernetes version the chart supports (kubeVersion in Chart.yaml) and the newest one
# kubernetes-validate 1.37 bundles schemas for.
KUBERNETES_VERSIONS = ["1.25.0", "1.37.0"]


def _find_helm() -> str | None:
    candidates = [os.environ.get("HELM_BIN"), shutil.which("helm"), str(REPO_ROOT / ".tools" / "bin" / "helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


HELM = _find_helm()
pytestmark = pytest.mark.skipif(
    HELM is None, reason="helm not found: set HELM_BIN, put helm on PATH or run .ci/install-helm.sh")


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory) -> dict[str, str]:
    """Environment that keeps helm's cache, config and plugins out of the user's home."""
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    for name in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[name] = str(home / name.lower())
    return env


def _run_helm(helm_env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, env=helm_env, timeout=120)


def _scenario_file(scenario: str) -> Path:
    return CHART / "ci" / f"{scenario}-values.yaml"


def _template_args(scenario: str | None, set_values: dict[str, str] | None, set_json: dict | None) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if scenario:
        args += ["--values", str(_scenario_file(scenario))]
    for key, value in (set_values or {}).items():
        args += ["--set", f"{key}={value}"]
    for key, value in (set_json or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


# Rendered output by helm arguments: many tests read the same few renders, and the chart
# does not change during a test run.
_renders: dict[tuple[str, ...], subprocess.CompletedProcess] = {}


def _template(helm_env, scenario, set_values, set_json) -> subprocess.CompletedProcess:
    args = tuple(_template_args(scenario, set_values, set_json))
    if args not in _renders:
        _renders[args] = _run_helm(helm_env, *args)
    return _renders[args]


def render_text(helm_env, scenario=None, set_values=None, set_json=None) -> str:
    result = _template(helm_env, scenario, set_values, set_json)
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return result.stdout


def render(helm_env, scenario=None, set_values=None, set_json=None) -> list[dict]:
    text = render_text(helm_env, scenario, set_values, set_json)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_error(helm_env, scenario=None, set_values=None, set_json=None) -> str:
    """Render values that must fail, and return helm's error output."""
    result = _template(helm_env, scenario, set_values, set_json)
    assert result.returncode != 0, f"helm template accepted the values; output:\n{result.stdout[:2000]}"
    return result.stderr


def find(manifests: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]


def only(manifests: list[dict], kind: str, name: str | None = None) -> dict:
    matches = find(manifests, kind, name)
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def workload(manifests: list[dict]) -> dict:
    workloads = [m for m in manifests if m["kind"] in ("Deployment", "StatefulSet")]
    assert len(workloads) == 1, f"expected one Deployment or StatefulSet, found {[w['kind'] for w in workloads]}"
    return workloads[0]


def container(manifests: list[dict]) -> dict:
    containers = workload(manifests)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(manifests: list[dict]) -> dict[str, dict]:
    return {item["name"]: item for item in container(manifests)["env"]}


def service_config(manifests: list[dict]) -> dict:
    config_map = only(manifests, "ConfigMap", FULLNAME)
    return yaml.safe_load(config_map["data"]["config.yaml"])


def mounts_of(manifests: list[dict]) -> dict[str, dict]:
    return {mount["name"]: mount for mount in container(manifests)["volumeMounts"]}


def volumes_of(manifests: list[dict]) -> dict[str, dict]:
    return {volume["name"]: volume for volume in workload(manifests)["spec"]["template"]["spec"]["volumes"]}


def rendered_rule_groups(manifests: list[dict]) -> list[dict]:
    return only(manifests, "PrometheusRule")["spec"]["groups"]


def rules_by_name(groups: list[dict]) -> dict[str, dict]:
    return {rule.get("alert") or rule["record"]: rule for group in groups for rule in group["rules"]}


# --- lint, render and schema validation of every scenario ---


def test_scenarios_cover_required_cases():
    assert set(SCENARIOS) >= {"defaults", "sharded", "monitors-and-rules", "persistence", "existing-secrets"}


def test_lint_strict_defaults(helm_env):
    result = _run_helm(helm_env, "lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict_scenario(helm_env, scenario):
    result = _run_helm(helm_env, "lint", "--strict", str(CHART), "--values", str(_scenario_file(scenario)))
    assert result.returncode == 0, result.stdout + result.stderr


def _kubernetes_validate() -> list[str]:
    beside_python = Path(sys.executable).parent / "kubernetes-validate"
    if beside_python.exists():
        return [str(beside_python)]
    on_path = shutil.which("kubernetes-validate")
    if on_path:
        return [on_path]
    pytest.fail("kubernetes-validate not found; pip install kubernetes-validate==1.37.0")


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_manifests_valid(helm_env, tmp_path, scenario, kubernetes_version):
    manifest_file = tmp_path / f"{scenario}.yaml"
    manifest_file.write_text(render_text(helm_env, scenario))

    # Options go before the file names: kubernetes-validate reads everything after the first file as files.
    command = _kubernetes_validate() + ["--strict", "--quiet", "-k", kubernetes_version, str(manifest_file)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout, result.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_inlines_no_secret(helm_env, scenario):
    manifests = render(helm_env, scenario)
    assert find(manifests, "Secret") == []


# --- values.schema.json ---


def assert_names_value(error: str, path: str) -> None:
    """Check that a schema error names the value: Helm 4 writes `/a/b`, Helm 3 writes `a.b`."""
    dotted = path.strip("/").replace("/", ".")
    assert path in error or dotted in error, f"the error does not name {path}:\n{error}"



def test_schema_rejects_wrong_type(helm_env):
    error = render_error(helm_env, set_values={"sharding.replicas": "three"})
    assert_names_value(error, "/sharding/replicas")
    assert "integer" in error


def test_schema_rejects_unknown_top_level_key(helm_env):
    error = render_error(helm_env, set_values={"replicaCount": "2"})
    assert "replicaCount" in error
    assert "not allowed" in error


def test_schema_rejects_unknown_index_source(helm_env):
    error = render_error(helm_env, set_values={"sharding.indexSource": "random"})
    assert_names_value(error, "/sharding/indexSource")


def test_schema_rejects_inline_credentials(helm_env):
    error = render_error(helm_env, set_values={"config.prometheus.bearer_token_file": "/token"})
    assert_names_value(error, "/config/prometheus")
    assert "bearer_token_file" in error


def test_schema_rejects_bad_duration(helm_env):
    error = render_error(helm_env, set_values={"config.prometheus.timeout": "thirty"})
    assert_names_value(error, "/config/prometheus/timeout")


# --- the workload: Deployment or StatefulSet, security, probes, resources ---


def test_defaults_run_one_replica_deployment(helm_env):
    manifests = render(helm_env)

    deployment = only(manifests, "Deployment", FULLNAME)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert find(manifests, "StatefulSet") == []
    assert find(manifests, "PodDisruptionBudget") == []
    assert "ANOMALY_MONITOR_SHARD_COUNT" not in env_of(manifests)
    assert service_config(manifests)["shard"] == {"count": 1, "index": 0}


def test_defaults_create_no_optional_objects(helm_env):
    kinds = {m["kind"] for m in render(helm_env)}
    assert kinds == {"ServiceAccount", "ConfigMap", "Service", "Deployment"}


def test_pod_security_context_non_root(helm_env):
    pod_spec = workload(render(helm_env))["spec"]["template"]["spec"]
    security = pod_spec["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod_spec["automountServiceAccountToken"] is False


def test_container_security_context_locked_down(helm_env):
    security = container(render(helm_env))["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_writable_tmp_on_read_only_root(helm_env):
    manifests = render(helm_env)
    assert mounts_of(manifests)["tmp"]["mountPath"] == "/tmp"
    assert "emptyDir" in volumes_of(manifests)["tmp"]


def test_probes_use_health_endpoints(helm_env):
    manifests = render(helm_env)
    probed = container(manifests)
    port_names = {port["name"] for port in probed["ports"]}

    assert probed["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probed["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probed["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert probed[probe]["httpGet"]["port"] in port_names


def test_container_port_matches_listen_address(helm_env):
    manifests = render(helm_env, set_values={"containerPort": "9100"})
    ports = {port["name"]: port["containerPort"] for port in container(manifests)["ports"]}
    assert ports == {"metrics": 9100}
    assert service_config(manifests)["listen"] == "0.0.0.0:9100"


def test_resources_request_memory_without_cpu_limit(helm_env):
    resources = container(render(helm_env))["resources"]
    assert resources["requests"] == {"cpu": "500m", "memory": "1Gi"}
    assert resources["limits"] == {"memory": "2Gi"}


def test_container_runs_service_with_config(helm_env):
    manifests = render(helm_env)
    config_path = env_of(manifests)["ANOMALY_MONITOR_CONFIG"]["value"]
    config_mount = mounts_of(manifests)["config"]

    assert container(manifests)["args"] == ["--log-level=info", "--log-format=json", "run"]
    assert Path(config_path).parent == Path(config_mount["mountPath"])
    assert Path(config_path).name == "config.yaml"
    assert volumes_of(manifests)["config"]["configMap"]["name"] == FULLNAME


def test_image_defaults_to_app_version(helm_env):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert container(render(helm_env))["image"] == f"deep-anomaly-monitor:{chart['appVersion']}"


def test_image_digest_pins_image(helm_env):
    digest = "sha256:" + "a" * 64
    manifests = render(helm_env, set_values={"image.registry": "registry.example", "image.digest": digest})
    assert container(manifests)["image"] == f"registry.example/deep-anomaly-monitor@{digest}"


def test_app_version_matches_package():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    package_version = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.MULTILINE).group(1)
    assert chart["appVersion"] == package_version


# --- the ConfigMap and its checksum ---


def _config_checksum(manifests: list[dict]) -> str:
    return workload(manifests)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def test_config_checksum_ignores_other_values(helm_env):
    before = _config_checksum(render(helm_env))
    after = _config_checksum(render(helm_env, set_values={"podAnnotations.team": "platform"}))
    assert before == after


def test_config_change_rolls_pods(helm_env):
    before = _config_checksum(render(helm_env))
    after = _config_checksum(render(helm_env, set_values={"config.prometheus.url": "http://thanos:9090"}))
    assert before != after


def test_config_carries_values(helm_env):
    config = service_config(render(helm_env, "existing-secrets"))
    assert config["prometheus"]["url"] == "https://mimir-query-frontend.mimir.svc:8080/prometheus"
    assert config["prometheus"]["headers"] == {"X-Scope-OrgID": "team-a"}
    assert config["storage"] == {"path": "/var/lib/anomaly-monitor"}
    assert [d["name"] for d in config["detectors"]] == ["node"]


# --- sharding ---


def test_sharded_statefulset_replicas(helm_env):
    manifests = render(helm_env, "sharded")
    statefulset = only(manifests, "StatefulSet", FULLNAME)
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    assert find(manifests, "Deployment") == []


def test_sharded_index_from_hostname(helm_env):
    manifests = render(helm_env, "sharded")
    env = env_of(manifests)
    assert env["ANOMALY_MONITOR_SHARD_COUNT"]["value"] == "3"
    # Without the env variable the service reads the ordinal from $HOSTNAME.
    assert "ANOMALY_MONITOR_SHARD_INDEX" not in env
    assert env["HOSTNAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert service_config(manifests)["shard"] == {"count": 3, "index": "auto"}


def test_sharded_index_from_pod_index_label(helm_env):
    manifests = render(helm_env, "persistence")
    env = env_of(manifests)
    field = env["ANOMALY_MONITOR_SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["ANOMALY_MONITOR_SHARD_COUNT"]["value"] == "2"
    assert "HOSTNAME" not in env


def test_sharded_headless_service(helm_env):
    manifests = render(helm_env, "sharded")
    headless = only(manifests, "Service", f"{FULLNAME}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert only(manifests, "StatefulSet")["spec"]["serviceName"] == headless["metadata"]["name"]


def test_sharded_pod_disruption_budget(helm_env):
    manifests = render(helm_env, "sharded")
    budget = only(manifests, "PodDisruptionBudget", FULLNAME)
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == only(manifests, "StatefulSet")["spec"]["selector"]


def test_single_shard_has_no_disruption_budget(helm_env):
    manifests = render(helm_env, set_values={"sharding.enabled": "true", "sharding.replicas": "1"})
    assert find(manifests, "PodDisruptionBudget") == []


def test_sharding_rejects_existing_claim(helm_env):
    error = render_error(helm_env, "persistence", set_values={"persistence.existingClaim": "models"})
    assert "every shard needs its own volume" in error


# --- persistence ---


def test_persistence_deployment_claim(helm_env):
    manifests = render(helm_env, "existing-secrets")
    claim = only(manifests, "PersistentVolumeClaim", FULLNAME)
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert volumes_of(manifests)["data"]["persistentVolumeClaim"]["claimName"] == FULLNAME
    assert mounts_of(manifests)["data"]["mountPath"] == service_config(manifests)["storage"]["path"]


def test_persistence_existing_claim(helm_env):
    manifests = render(helm_env, set_values={"persistence.enabled": "true", "persistence.existingClaim": "models"})
    assert find(manifests, "PersistentVolumeClaim") == []
    assert volumes_of(manifests)["data"]["persistentVolumeClaim"]["claimName"] == "models"


def test_persistence_sharded_claim_templates(helm_env):
    manifests = render(helm_env, "persistence")
    templates = only(manifests, "StatefulSet")["spec"]["volumeClaimTemplates"]

    assert find(manifests, "PersistentVolumeClaim") == []
    assert [t["metadata"]["name"] for t in templates] == ["data"]
    assert templates[0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert templates[0]["spec"]["storageClassName"] == "standard"
    assert "data" not in volumes_of(manifests)
    assert mounts_of(manifests)["data"]["mountPath"] == service_config(manifests)["storage"]["path"]


def test_persistence_mount_path_sets_storage_path(helm_env):
    manifests = render(helm_env, set_values={"persistence.mountPath": "/models"})
    assert mounts_of(manifests)["data"]["mountPath"] == "/models"
    assert service_config(manifests)["storage"] == {"path": "/models"}


def test_without_persistence_models_use_empty_dir(helm_env):
    manifests = render(helm_env)
    assert "emptyDir" in volumes_of(manifests)["data"]
    assert find(manifests, "PersistentVolumeClaim") == []


# --- credentials from existing Secrets ---


def test_basic_auth_password_from_env(helm_env):
    manifests = render(helm_env, "existing-secrets")
    basic_auth = service_config(manifests)["prometheus"]["basic_auth"]
    reference = env_of(manifests)[basic_auth["password_env"]]["valueFrom"]["secretKeyRef"]

    assert basic_auth == {"username": "anomaly-monitor", "password_env": "ANOMALY_MONITOR_BASIC_AUTH_PASSWORD"}
    assert reference == {"name": "anomaly-monitor-prometheus-auth", "key": "password"}
    assert "basic-auth" not in volumes_of(manifests)


def test_basic_auth_password_from_file(helm_env):
    manifests = render(helm_env, "existing-secrets", set_values={"auth.basicAuth.passwordFrom": "file"})
    password_file = Path(service_config(manifests)["prometheus"]["basic_auth"]["password_file"])
    volume = volumes_of(manifests)["basic-auth"]["secret"]

    assert password_file.parent == Path(mounts_of(manifests)["basic-auth"]["mountPath"])
    assert volume["secretName"] == "anomaly-monitor-prometheus-auth"
    assert volume["items"] == [{"key": "password", "path": password_file.name}]
    assert "ANOMALY_MONITOR_BASIC_AUTH_PASSWORD" not in env_of(manifests)


def test_ca_file_from_secret(helm_env):
    manifests = render(helm_env, "existing-secrets")
    ca_file = Path(service_config(manifests)["prometheus"]["ca_file"])
    volume = volumes_of(manifests)["ca"]["secret"]

    assert ca_file.parent == Path(mounts_of(manifests)["ca"]["mountPath"])
    assert volume["secretName"] == "internal-ca"
    assert volume["items"] == [{"key": "ca.crt", "path": ca_file.name}]


def test_ca_file_from_config_map(helm_env):
    manifests = render(helm_env, set_values={"auth.ca.existingConfigMap": "kube-root-ca.crt"})
    ca_file = Path(service_config(manifests)["prometheus"]["ca_file"])
    assert ca_file.parent == Path(mounts_of(manifests)["ca"]["mountPath"])
    assert volumes_of(manifests)["ca"]["configMap"]["name"] == "kube-root-ca.crt"


def test_bearer_token_file_mounted(helm_env):
    manifests = render(helm_env, set_values={"auth.bearerToken.existingSecret": "prometheus-token"})
    token_file = Path(service_config(manifests)["prometheus"]["bearer_token_file"])
    volume = volumes_of(manifests)["bearer-token"]["secret"]

    assert token_file.parent == Path(mounts_of(manifests)["bearer-token"]["mountPath"])
    assert mounts_of(manifests)["bearer-token"]["readOnly"] is True
    assert volume == {"secretName": "prometheus-token", "items": [{"key": "token", "path": "token"}]}
    assert "basic_auth" not in service_config(manifests)["prometheus"]


def test_bearer_token_and_basic_auth_exclusive(helm_env):
    error = render_error(helm_env, "existing-secrets", set_values={"auth.bearerToken.existingSecret": "token"})
    assert "not both" in error


def test_basic_auth_requires_username(helm_env):
    error = render_error(helm_env, set_values={"auth.basicAuth.existingSecret": "auth"})
    assert "auth.basicAuth.username is required" in error


# --- Service and ServiceMonitor ---


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_service_selects_pods(helm_env):
    manifests = render(helm_env)
    service = only(manifests, "Service", FULLNAME)
    pod_labels = workload(manifests)["spec"]["template"]["metadata"]["labels"]

    assert _labels_match(service["spec"]["selector"], pod_labels)
    assert service["spec"]["ports"][0]["name"] == "metrics"
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_service_monitor_honors_labels(helm_env):
    monitor = only(render(helm_env, "monitors-and-rules"), "ServiceMonitor", FULLNAME)
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "30s"


def test_service_monitor_operator_selector_label(helm_env):
    monitor = only(render(helm_env, "monitors-and-rules"), "ServiceMonitor", FULLNAME)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_service_monitor_selects_metrics_service(helm_env):
    manifests = render(helm_env, "monitors-and-rules", set_values={"sharding.enabled": "true"})
    selector = only(manifests, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    selected = [s["metadata"]["name"] for s in find(manifests, "Service") if _labels_match(selector, s["metadata"]["labels"])]

    assert len(find(manifests, "Service")) == 2
    assert selected == [FULLNAME]
    assert only(manifests, "ServiceMonitor")["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_service_monitor_job_matches_rules(helm_env):
    monitor = only(render(helm_env, "monitors-and-rules"), "ServiceMonitor")
    [endpoint] = monitor["spec"]["endpoints"]
    job_relabelings = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
    rule_jobs = set(re.findall(r'job="([^"]+)"', RULE_FILE.read_text()))

    assert rule_jobs, "the rule file selects no job; this check needs updating"
    assert job_relabelings == [{"action": "replace", "targetLabel": "job", "replacement": rule_jobs.pop()}]
    assert not rule_jobs, "the rule file selects more than one job"


def test_service_monitor_job_follows_knob(helm_env):
    manifests = render(helm_env, "monitors-and-rules", set_values={"prometheusRule.job": "monitoring/anomaly"})
    [endpoint] = only(manifests, "ServiceMonitor")["spec"]["endpoints"]
    rules = rules_by_name(rendered_rule_groups(manifests))

    assert endpoint["relabelings"][0]["replacement"] == "monitoring/anomaly"
    assert 'job="monitoring/anomaly"' in rules["AnomalyMonitorDown"]["expr"]


def test_service_monitor_keeps_user_relabelings(helm_env):
    extra = {"action": "labeldrop", "regex": "pod"}
    manifests = render(helm_env, "monitors-and-rules", set_json={"serviceMonitor.relabelings": [extra]})
    [endpoint] = only(manifests, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["relabelings"][1:] == [extra]


def test_service_monitor_off_by_default(helm_env):
    assert find(render(helm_env), "ServiceMonitor") == []


# --- PrometheusRule ---


def test_chart_rule_copy_matches_rules():
    assert CHART_RULE_FILE.read_bytes() == RULE_FILE.read_bytes(), (
        "helm/anomaly-monitor/files/rules/ differs from rules/; run helm/sync-chart-files.sh")


def test_rendered_rules_equal_rule_file(helm_env):
    manifests = render(helm_env, set_values={"prometheusRule.enabled": "true"})
    source_groups = yaml.safe_load(RULE_FILE.read_text())["groups"]
    assert rendered_rule_groups(manifests) == source_groups


def test_rendered_rules_keep_prometheus_templates(helm_env):
    manifests = render(helm_env, "monitors-and-rules")
    descriptions = [rule["annotations"]["description"] for rule in rules_by_name(rendered_rule_groups(manifests)).values()
                    if "alert" in rule]
    assert descriptions
    assert any("{{ $labels." in text for text in descriptions)
    assert any("{{ $value" in text for text in descriptions)


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found; install the Debian package prometheus")
    return promtool


def test_rendered_rules_pass_promtool_check(helm_env, tmp_path):
    promtool = _promtool()
    groups = rendered_rule_groups(render(helm_env, "monitors-and-rules"))
    rule_file = tmp_path / "rendered.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": groups}))

    result = subprocess.run([promtool, "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("test_file", sorted(p.name for p in RULE_TESTS.glob("*.yml")))
def test_rendered_rules_pass_rule_unit_tests(helm_env, tmp_path, test_file):
    """Run the unit tests of rules/tests against the rules as the chart renders them."""
    promtool = _promtool()
    groups = rendered_rule_groups(render(helm_env, set_values={"prometheusRule.enabled": "true"}))
    rule_file = tmp_path / "rendered.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": groups}))
    unit_tests = yaml.safe_load((RULE_TESTS / test_file).read_text())
    unit_tests["rule_files"] = [str(rule_file)]
    test_path = tmp_path / test_file
    test_path.write_text(yaml.safe_dump(unit_tests))

    result = subprocess.run([promtool, "test", "rules", str(test_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_labels_added_to_alerts(helm_env):
    rules = rules_by_name(rendered_rule_groups(render(helm_env, "monitors-and-rules")))
    alerts = [rule for rule in rules.values() if "alert" in rule]
    assert alerts
    for alert in alerts:
        assert alert["labels"]["team"] == "platform", alert["alert"]
        assert "severity" in alert["labels"], alert["alert"]


def test_rule_operator_selector_label(helm_env):
    rule = only(render(helm_env, "monitors-and-rules"), "PrometheusRule", FULLNAME)
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def _first_alert_with(predicate) -> dict:
    groups = yaml.safe_load(RULE_FILE.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            if "alert" in rule and predicate(rule):
                return rule
    pytest.fail("no alert in the rule file fits this test; it needs updating")


def _render_overridden(helm_env, name: str, override: dict) -> dict[str, dict]:
    manifests = render(helm_env, set_values={"prometheusRule.enabled": "true"},
                       set_json={"prometheusRule.overrides": {name: override}})
    return rules_by_name(rendered_rule_groups(manifests))


def test_override_for_duration(helm_env):
    alert = _first_alert_with(lambda rule: "for" in rule)
    rendered = _render_overridden(helm_env, alert["alert"], {"for": "42m"})[alert["alert"]]
    assert rendered["for"] == "42m"
    assert rendered["expr"] == alert["expr"]


def test_override_keep_firing_for(helm_env):
    alert = _first_alert_with(lambda rule: "keep_firing_for" in rule)
    rendered = _render_overridden(helm_env, alert["alert"], {"keepFiringFor": "1h"})[alert["alert"]]
    assert rendered["keep_firing_for"] == "1h"


TRAILING_NUMBER = re.compile(r"(==|!=|>=|<=|>|<)\s*[-+]?(\d+\.?\d*|\.\d+)\s*$")


def test_override_threshold(helm_env):
    alert = _first_alert_with(lambda rule: TRAILING_NUMBER.search(rule["expr"]))
    rendered = _render_overridden(helm_env, alert["alert"], {"threshold": 7.5})[alert["alert"]]
    operator = TRAILING_NUMBER.search(alert["expr"]).group(1)
    assert rendered["expr"] == TRAILING_NUMBER.sub(f"{operator} 7.5", alert["expr"])


def test_override_threshold_needs_trailing_number(helm_env):
    alert = _first_alert_with(lambda rule: not TRAILING_NUMBER.search(rule["expr"]))
    error = render_error(helm_env, set_values={"prometheusRule.enabled": "true"},
                         set_json={"prometheusRule.overrides": {alert["alert"]: {"threshold": 3}}})
    assert "does not end in a comparison with a number" in error


# Non-default values of every knob in docs/alerting.md, and where each must show up.
KNOB_VALUES = {
    "prometheusRule.anomalyFor": "15m",
    "prometheusRule.criticalFor": "30m",
    "prometheusRule.keepFiringFor": "20m",
    "prometheusRule.criticalFactor": "1.5",
    "prometheusRule.gapTolerance": "5m",
    "prometheusRule.job": "monitoring/anomaly-monitor",
    "prometheusRule.runbookBaseUrl": "https://runbooks.example.org/",
}


def _rules_with_knobs(helm_env) -> dict[str, dict]:
    manifests = render(helm_env, set_values={"prometheusRule.enabled": "true", **KNOB_VALUES})
    return rules_by_name(rendered_rule_groups(manifests))


def test_knobs_set_alert_fields(helm_env):
    rules = _rules_with_knobs(helm_env)
    assert rules["AnomalyMonitorEntityAnomalous"]["for"] == "15m"
    assert rules["AnomalyMonitorEntityHighlyAnomalous"]["for"] == "30m"
    assert rules["AnomalyMonitorEntityAnomalous"]["keep_firing_for"] == "20m"
    assert rules["AnomalyMonitorEntityHighlyAnomalous"]["keep_firing_for"] == "20m"


def test_knobs_replace_expression_text(helm_env):
    rules = _rules_with_knobs(helm_env)
    critical = rules["AnomalyMonitorEntityHighlyAnomalous"]
    assert "> 1.5 * last_over_time(anomaly_threshold[5m])" in critical["expr"]
    assert 'job="monitoring/anomaly-monitor"' in rules["AnomalyMonitorNotScraped"]["expr"]
    assert 'job="monitoring/anomaly-monitor"' in rules["AnomalyMonitorDown"]["expr"]


def test_knob_gap_tolerance_in_annotations(helm_env):
    rules = _rules_with_knobs(helm_env)
    for name in ("AnomalyMonitorEntityAnomalous", "AnomalyMonitorEntityHighlyAnomalous"):
        text = rules[name]["expr"] + "".join(rules[name]["annotations"].values())
        assert "[3m]" not in text, name
        assert "[5m]" in rules[name]["annotations"]["description"], name


def test_knob_runbook_base_url(helm_env):
    rules = _rules_with_knobs(helm_env)
    for name, rule in rules.items():
        if "alert" in rule:
            assert rule["annotations"]["runbook_url"] == f"https://runbooks.example.org/{name}.md"


def test_knobs_change_nothing_else(helm_env):
    source = rules_by_name(yaml.safe_load(RULE_FILE.read_text())["groups"])
    rules = _rules_with_knobs(helm_env)
    untouched = ["AnomalyMonitorTrainingStale", "AnomalyMonitorTrainingRejected", "AnomalyMonitorQueryErrors",
                 "AnomalyMonitorDetectorNoScores"]
    for name in untouched:
        expected = dict(source[name], annotations=dict(source[name]["annotations"]))
        expected["annotations"]["runbook_url"] = f"https://runbooks.example.org/{name}.md"
        assert rules[name] == expected, name


def test_knob_fails_when_rule_text_moved(helm_env, tmp_path):
    chart_copy = tmp_path / "anomaly-monitor"
    shutil.copytree(CHART, chart_copy)
    copied_rules = chart_copy / "files" / "rules" / "anomaly-monitor.rules.yml"
    copied_rules.write_text(copied_rules.read_text().replace("[3m]", "[4m]"))

    result = _run_helm(helm_env, "template", RELEASE, str(chart_copy), "--set", "prometheusRule.enabled=true",
                       "--set", "prometheusRule.gapTolerance=5m")

    assert result.returncode != 0
    assert 'prometheusRule.gapTolerance: the alert AnomalyMonitorEntityAnomalous no longer contains "[3m]"' in result.stderr


def test_knobs_keep_rules_valid(helm_env, tmp_path):
    rule_file = tmp_path / "knobs.rules.yml"
    groups = rendered_rule_groups(render(helm_env, set_values={"prometheusRule.enabled": "true", **KNOB_VALUES}))
    rule_file.write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run([_promtool(), "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_override_labels_and_disable(helm_env):
    alerts = [rule for group in yaml.safe_load(RULE_FILE.read_text())["groups"] for rule in group["rules"]
              if "alert" in rule]
    first, second = alerts[0]["alert"], alerts[1]["alert"]
    manifests = render(helm_env, set_values={"prometheusRule.enabled": "true"}, set_json={"prometheusRule.overrides": {
        first: {"labels": {"severity": "critical"}},
        second: {"enabled": False},
    }})
    rendered = rules_by_name(rendered_rule_groups(manifests))

    assert rendered[first]["labels"]["severity"] == "critical"
    assert second not in rendered
    assert len(rendered) == sum(len(g["rules"]) for g in yaml.safe_load(RULE_FILE.read_text())["groups"]) - 1


def test_override_unknown_rule_rejected(helm_env):
    error = render_error(helm_env, set_values={"prometheusRule.enabled": "true"},
                         set_json={"prometheusRule.overrides": {"NoSuchAlert": {"for": "5m"}}})
    assert "no rule of that name" in error


# --- Grafana dashboards ---


def _dashboard_sources() -> list[Path]:
    sources = sorted(DASHBOARDS.glob("*.json"))
    if not sources:
        pytest.fail("grafana/ holds no dashboard; the chart ships them, so this check needs one")
    return sources


def test_chart_dashboard_copies_match_grafana():
    sources = {path.name: path.read_bytes() for path in _dashboard_sources()}
    copies = {path.name: path.read_bytes() for path in CHART_DASHBOARDS.glob("*.json")}
    assert copies == sources, "helm/anomaly-monitor/files/dashboards/ differs from grafana/; run helm/sync-chart-files.sh"


def test_dashboard_config_maps_carry_sidecar_label(helm_env):
    manifests = render(helm_env, "monitors-and-rules")
    dashboards = [m for m in find(manifests, "ConfigMap") if "grafana_dashboard" in m["metadata"]["labels"]]

    assert len(dashboards) == len(_dashboard_sources())
    for config_map in dashboards:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "Anomalies"}


def test_dashboard_json_unchanged(helm_env):
    manifests = render(helm_env, "monitors-and-rules")
    rendered = {}
    for config_map in find(manifests, "ConfigMap"):
        if "grafana_dashboard" in config_map["metadata"]["labels"]:
            rendered.update(config_map["data"])
    sources = {path.name: path.read_text() for path in _dashboard_sources()}

    assert rendered.keys() == sources.keys()
    for name, text in sources.items():
        # A YAML block scalar ends in exactly one newline, whatever the file ends in.
        assert rendered[name].rstrip("\n") == text.rstrip("\n"), name
        assert json.loads(rendered[name]) == json.loads(text), name


def test_dashboard_label_configurable(helm_env):
    _dashboard_sources()
    manifests = render(helm_env, set_values={
        "dashboards.enabled": "true", "dashboards.label": "grafana_dashboard_anomaly", "dashboards.labelValue": "yes"})
    labelled = [m for m in find(manifests, "ConfigMap") if m["metadata"]["labels"].get("grafana_dashboard_anomaly") == "yes"]
    assert len(labelled) == len(_dashboard_sources())


# --- NetworkPolicy ---


def test_network_policy_admits_scrapes_and_dns(helm_env):
    manifests = render(helm_env, "sharded")
    policy = only(manifests, "NetworkPolicy", FULLNAME)
    [ingress] = policy["spec"]["ingress"]
    egress_ports = [port for rule in policy["spec"]["egress"] for port in rule["ports"]]

    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert {"port": 53, "protocol": "UDP"} in egress_ports
    assert {"port": 9090, "protocol": "TCP"} in egress_ports


def test_network_policy_off_by_default(helm_env):
    assert find(render(helm_env), "NetworkPolicy") == []


# --- the rendered config as the service reads it ---


def _stand_in_secret_files(config: dict, folder: Path) -> dict:
    """Point credential paths at local files, since the mounted Secrets exist only in a pod."""
    prometheus = config["prometheus"]
    for key in ("bearer_token_file", "ca_file"):
        if key in prometheus:
            prometheus[key] = str(_write(folder / key, "stand-in"))
    basic_auth = prometheus.get("basic_auth") or {}
    if "password_file" in basic_auth:
        basic_auth["password_file"] = str(_write(folder / "password", "stand-in"))
    return config


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _pod_environment(manifests: list[dict]) -> dict[str, str]:
    """Return the container's environment as the kubelet would set it for shard 1."""
    env = {}
    for item in container(manifests)["env"]:
        source = item.get("valueFrom", {})
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "apps.kubernetes.io/pod-index" in source.get("fieldRef", {}).get("fieldPath", ""):
            env[item["name"]] = "1"
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = f"{FULLNAME}-1"
        elif "secretKeyRef" in source:
            env[item["name"]] = "stand-in"
    return env


def _set_pod_environment(monkeypatch, manifests: list[dict]) -> None:
    for name in [name for name in os.environ if name.startswith("ANOMALY_MONITOR_")]:
        monkeypatch.delenv(name)
    for name, value in _pod_environment(manifests).items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_config_loads_in_service(helm_env, tmp_path, monkeypatch, scenario):
    """Load the rendered config with the service's own loader, in the environment of pod 1."""
    from monitor.config import load_config

    manifests = render(helm_env, scenario)
    config = _stand_in_secret_files(service_config(manifests), tmp_path)
    config_file = _write(tmp_path / "config.yaml", yaml.safe_dump(config))
    _set_pod_environment(monkeypatch, manifests)

    loaded = load_config(config_file)

    assert loaded.shard.count == workload(manifests)["spec"]["replicas"]
    assert [detector.name for detector in loaded.detectors] == [d["name"] for d in config["detectors"]]


@pytest.mark.parametrize("scenario", ["sharded", "persistence"])
def test_rendered_config_resolves_shard_index(helm_env, tmp_path, monkeypatch, scenario):
    """Resolve the shard index as the service does at start-up, for pod 1."""
    from monitor.config import load_config
    from monitor.sharding import resolve_index

    manifests = render(helm_env, scenario)
    config_file = _write(tmp_path / "config.yaml", yaml.safe_dump(service_config(manifests)))
    _set_pod_environment(monkeypatch, manifests)

    assert resolve_index(load_config(config_file).shard) == 1


# --- NOTES.txt ---


def _helm_major_version(helm_env) -> int:
    version = _run_helm(helm_env, "version", "--short").stdout
    return int(re.match(r"v(\d+)", version).group(1))


@pytest.mark.parametrize("scenario", ["defaults", "sharded"])
def test_notes_explain_first_checks(helm_env, scenario):
    if _helm_major_version(helm_env) < 4:
        pytest.skip("helm 3 contacts a cluster even for `install --dry-run=client`")
    result = _run_helm(helm_env, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                       "--values", str(_scenario_file(scenario)))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]

    assert f"port-forward svc/{FULLNAME} 9464" in notes
    assert "anomaly_detector_state" in notes
    assert "anomaly_monitor_query_errors_total" in notes
    if scenario == "sharded":
        assert 'count(anomaly_monitor_shard{count="3"}) == 3' in notes


# --- chart README ---


def test_chart_readme_lists_current_values():
    command = [sys.executable, str(REPO_ROOT / "helm" / "values_table.py"), "--check"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
