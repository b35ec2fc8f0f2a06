"""Helm chart `helm/onesignal-bridge`: rendered offline with the real Helm library, checked against
the Kubernetes schemas and against what the bridge itself serves and reads.

- Rendering: `helm_python` (helm-python-sdk: Helm v4's Go SDK through ctypes, no binary, no
  cluster, no network) for the default values and for every `ci/*-values.yaml`.
- Every manifest validates against the Kubernetes OpenAPI schemas (`kubernetes-validate`, strict,
  oldest and newest supported versions); the Prometheus Operator CRDs (ServiceMonitor,
  PrometheusRule) are checked here with a minimal structural schema instead.
- Probes, ports, arguments and the mounted configuration agree with `bridge.cli`,
  `bridge.observability.http.HealthServer` and `bridge.config.parse_config`.
- Alert rules and the Grafana dashboard use only metric names a live `/metrics` exports.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

helm = pytest.importorskip("helm_python")

from bridge import __version__  # noqa: E402
from bridge.cli import build_parser  # noqa: E402
from bridge.config import (  # noqa: E402
    Config,
    DeliveryConfig,
    KafkaSourceConfig,
    MappingConfig,
    OneSignalConfig,
    OutboxSourceConfig,
    PostgresSourceConfig,
    load_config,
    parse_config,
)
from bridge.observability import metrics as bridge_metrics  # noqa: E402
from bridge.observability.http import HealthServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "onesignal-bridge"
RELEASE, NAMESPACE = "osb", "bridge-test"
FULLNAME = f"{RELEASE}-onesignal-bridge"
CONFIG_PATH = "/etc/onesignal-bridge/config.yaml"
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
SECRET_ENV = {
    "ONESIGNAL_API_KEY", "ONESIGNAL_APP_ID", "DATABASE_URL", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD",
}

CASES = {
    "default": None,
    "kafka": CHART / "ci" / "kafka-values.yaml",
    "standby": CHART / "ci" / "standby-values.yaml",
    "monitoring": CHART / "ci" / "monitoring-values.yaml",
    "networkpolicy-narrow": CHART / "ci" / "networkpolicy-narrow-values.yaml",
    "setup-job": CHART / "ci" / "setup-job-values.yaml",
}

REQUIRED_ALERTS = {  # the issue's list: slot lag, source lag, error rate, dead letters growing, not ready
    "OneSignalBridgeSlotLagGrowing",
    "OneSignalBridgeSlotLagCritical",
    "OneSignalBridgeSourceLagHigh",
    "OneSignalBridgeApiErrorRateHigh",
    "OneSignalBridgeDeadLettersGrowing",
    "OneSignalBridgeNotReady",
    "OneSignalBridgeDown",
    "OneSignalBridgeApiKeyRejected",
    "OneSignalBridgeOneSignalUnavailable",
    "OneSignalBridgeDriftPersists",  # issue 18: continuous reconcile
}


# -- rendering -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as c:
        yield c


def _values(name: str) -> dict[str, Any] | None:
    path = CASES[name]
    return None if path is None else helm.values_from_yaml(path.read_text())


def _render(chart: Any, values: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for template, text in sorted(out.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append({**doc, "_template": template})
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def _strip(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "_template"}


@pytest.fixture(scope="module")
def rendered(chart: Any) -> dict[str, list[dict[str, Any]]]:
    return {name: _render(chart, _values(name)) for name in CASES}


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any], secret: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `container` gets: plain values, and each secretKeyRef read from `secret`
    (key -> value), or without one a stand-in naming the variable and the key."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            key = var["valueFrom"]["secretKeyRef"]["key"]
            env[var["name"]] = secret[key] if secret is not None else f"secret-{var['name'].lower()}-{key}"
    return env


def _bridge_config(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """The rendered config.yaml as YAML, and the environment the container would give it."""
    cm = _one(docs, "ConfigMap", FULLNAME)
    return yaml.safe_load(cm["data"]["config.yaml"]), _env(_container(docs))


def test_chart_metadata_matches_the_bridge() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "onesignal-bridge"
    assert meta["appVersion"] == __version__
    report = helm.lint(CHART, strict=True)
    assert not report["errors"], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("case", list(CASES))
def test_renders_with_the_expected_objects(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    docs = rendered[case]
    kinds = sorted(d["kind"] for d in docs)
    expected = {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
    assert expected <= set(kinds)
    assert "Secret" not in kinds, "credentials come from existingSecret, never from the chart"
    if case == "monitoring":
        assert {"ServiceMonitor", "PrometheusRule", "NetworkPolicy"} <= set(kinds)
        _one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    if case == "default":
        assert not {"ServiceMonitor", "PrometheusRule", "NetworkPolicy"} & set(kinds)
    assert ("Job" in kinds) == (case == "setup-job"), "the setup Job is off unless setupJob.enabled"
    for d in docs:
        if d["kind"] not in {"ServiceMonitor", "PrometheusRule"}:
            assert d["metadata"]["namespace"] == NAMESPACE
        assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


# -- Kubernetes schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_manifests_validate_against_kubernetes_schemas(rendered: dict[str, list[dict[str, Any]]],
                                                       case: str) -> None:
    checked = 0
    for doc in rendered[case]:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue  # not in the core schemas: test_crd_structure
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(_strip(doc), version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['_template']} ({doc['kind']}) invalid for Kubernetes {version}: "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}")
        checked += 1
    assert checked >= 5


def test_the_kubernetes_validator_rejects_a_broken_deployment(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    doc = _strip(_one(rendered["default"], "Deployment"))
    broken = json.loads(json.dumps(doc))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["prot"] = "metrics"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)


_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string", "minLength": 1},
        "labels": _STR_MAP,
        "annotations": _STR_MAP,
    },
}
CRD_SCHEMAS = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "jobLabel": {"type": "string"},
                    "namespaceSelector": {"type": "object", "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}}}},
                    "selector": {"type": "object", "required": ["matchLabels"],
                                 "properties": {"matchLabels": _STR_MAP}},
                    "endpoints": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["port"], "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]}, "interval": _DURATION,
                            "scrapeTimeout": _DURATION, "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"}}}},
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object", "required": ["groups"], "additionalProperties": False,
                "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                        "rules": {"type": "array", "minItems": 1, "items": {
                            "type": "object", "required": ["expr"], "additionalProperties": False,
                            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                            "properties": {
                                "alert": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
                                "record": {"type": "string"}, "expr": {"type": "string", "minLength": 1},
                                "for": _DURATION, "keep_firing_for": _DURATION,
                                "labels": _STR_MAP, "annotations": _STR_MAP}}}}}}},
            },
        },
    },
}


def _rule_docs(chart: Any) -> list[dict[str, Any]]:
    """PrometheusRules for every source kind (the source-specific rules differ)."""
    out = []
    for kind, extra in (("postgres", {}), ("outbox", {}),
                        ("kafka", {"bootstrap_servers": "k:9092", "topics": ["t"]})):
        values = {"prometheusRule": {"enabled": True}, "config": {"source": {"kind": kind, **extra}}}
        out.append(_one(_render(chart, values), "PrometheusRule"))
    return out


def _crds(chart: Any, rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    docs = [d for docs in rendered.values() for d in docs if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    return docs + _rule_docs(chart)


def test_crd_structure(chart: Any, rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = _crds(chart, rendered)
    assert {d["kind"] for d in docs} == {"ServiceMonitor", "PrometheusRule"}
    for doc in docs:
        jsonschema.validate(_strip(doc), CRD_SCHEMAS[doc["kind"]])
        if doc["kind"] == "ServiceMonitor":
            service = _one(rendered["monitoring"], "Service")
            assert doc["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
            ports = {p["name"] for p in service["spec"]["ports"]}
            assert ports >= {e["port"] for e in doc["spec"]["endpoints"]}
            assert [e["path"] for e in doc["spec"]["endpoints"]] == ["/metrics"]
        for group in doc["spec"].get("groups", []):
            for rule in group["rules"]:
                expr = rule["expr"]
                assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
                assert expr.count("[") == expr.count("]") and expr.count('"') % 2 == 0, expr
                assert rule["labels"]["severity"] in {"critical", "warning", "info"}
                assert rule["annotations"]["runbook_url"].endswith("#" + rule["alert"].lower())


# -- what the bridge serves and reads -------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_pod_security(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    pod = _one(rendered[case], "Deployment")["spec"]["template"]["spec"]
    container = _container(rendered[case])
    sc = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
    assert sc["runAsUser"] != 0 and pod["securityContext"]["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert pod["automountServiceAccountToken"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp"}


@pytest.mark.parametrize("case", list(CASES))
def test_probes_ports_and_args_match_the_bridge(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    docs = rendered[case]
    container = _container(docs)
    config, _ = _bridge_config(docs)
    app = HealthServer("127.0.0.1", 0, lambda: (True, "ok")).app()
    served = {r.resource.canonical for r in app.router.routes()}

    (port,) = container["ports"]
    assert port["name"] == "metrics" and port["containerPort"] == config["metrics"]["port"] == 9464
    assert config["metrics"]["host"] == "0.0.0.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] in served
    assert {"/healthz", "/readyz", "/metrics"} <= served
    service = _one(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    assert container["args"][:5] == ["run", "--config", CONFIG_PATH, "--log-format", "json"]
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.config, args.log_format) == ("run", CONFIG_PATH, "json")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    volumes = _one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == "config")
    assert mount["mountPath"] + "/" + volume["configMap"]["items"][0]["path"] == CONFIG_PATH
    assert volume["configMap"]["name"] == FULLNAME

    # Long enough to flush pending changes on SIGTERM.
    grace = _one(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.get("delivery", {}).get("shutdown_timeout_s", DeliveryConfig().shutdown_timeout_s)


@pytest.mark.parametrize("case", list(CASES))
def test_config_map_is_read_by_the_bridge(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    docs = rendered[case]
    data, env = _bridge_config(docs)
    text = _one(docs, "ConfigMap", FULLNAME)["data"]["config.yaml"]
    referenced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))
    assert referenced <= set(env), f"config reads {referenced - set(env)} that the container does not set"
    values = _values(case) or {}
    for name in referenced & SECRET_ENV:  # credentials: only from the existing Secret
        var = next(v for v in _container(docs)["env"] if v["name"] == name)
        assert var["valueFrom"]["secretKeyRef"]["name"] == (values.get("existingSecret") or FULLNAME)

    config = parse_config(data, where="configmap", env=env)
    assert isinstance(config, Config)
    assert config.onesignal.api_key.get_secret_value() == env["ONESIGNAL_API_KEY"]
    assert data["onesignal"]["api_key"] == "${ONESIGNAL_API_KEY}"
    assert config.metrics.port == 9464
    expected_kind = values.get("config", {}).get("source", {}).get("kind", "postgres")
    assert config.source.kind == expected_kind
    if expected_kind in ("postgres", "outbox"):
        assert data["source"]["dsn"] == "${DATABASE_URL}"
        assert config.source.dsn.get_secret_value() == env["DATABASE_URL"]  # type: ignore[union-attr]
    else:
        assert "DATABASE_URL" not in env
    if case == "kafka":
        assert isinstance(config.source, KafkaSourceConfig)
        assert config.source.consumer["sasl.password"] == env["KAFKA_SASL_PASSWORD"]
        assert data["source"]["consumer"]["sasl.password"] == "${KAFKA_SASL_PASSWORD}"
        assert _one(docs, "Deployment")["spec"]["replicas"] == 3
    if case == "standby":
        assert isinstance(config.source, PostgresSourceConfig) and config.source.standby is True
        assert _one(docs, "Deployment")["spec"]["replicas"] == 2
        # The surge pod waits as a (ready) hot standby and takes over when the old one lets go.
        assert _one(docs, "Deployment")["spec"]["strategy"] == {
            "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    # Nothing secret is written in clear: every credential is a ${VAR} reference.
    for value in env.values():
        if value.startswith("secret-"):
            assert value not in text


def _fields(model: type) -> set[str]:
    return set(model.model_fields)  # type: ignore[attr-defined]


def test_schema_knows_every_configuration_key() -> None:
    """values.schema.json accepts exactly the bridge's keys, minus secrets and `metrics` (chart-owned)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    cfg = schema["properties"]["config"]["properties"]
    assert set(cfg) == _fields(Config) - {"metrics"}
    assert set(cfg["onesignal"]["properties"]) == _fields(OneSignalConfig) - {"api_key"}
    assert set(cfg["delivery"]["properties"]) == _fields(DeliveryConfig)
    assert set(cfg["mappings"]["items"]["properties"]) == _fields(MappingConfig)
    by_kind = {}
    for branch in cfg["source"]["allOf"]:
        by_kind[branch["if"]["properties"]["kind"]["const"]] = set(branch["then"]["properties"])
    assert by_kind == {
        "postgres": _fields(PostgresSourceConfig) - {"dsn"},
        "outbox": _fields(OutboxSourceConfig) - {"dsn"},
        "kafka": _fields(KafkaSourceConfig),
    }


# -- the setup Job (setupJob) ----------------------------------------------------------------

SETUP_NAME = f"{FULLNAME}-setup"
HOOK_EVENTS = "pre-install,pre-upgrade"
HOOK_DELETE = "before-hook-creation,hook-succeeded"


def _setup_job(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The setup Job, its pod spec and its one container."""
    job = _one(docs, "Job", SETUP_NAME)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return job, pod, container


def _hook_weight(doc: dict[str, Any]) -> int:
    annotations = doc["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == HOOK_EVENTS, doc["metadata"]["name"]
    assert annotations["helm.sh/hook-delete-policy"] == HOOK_DELETE, doc["metadata"]["name"]
    return int(annotations["helm.sh/hook-weight"])


def test_setup_job_runs_setup_before_install_and_upgrade_with_the_owner_dsn(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["setup-job"]
    values = _values("setup-job") or {}
    job, pod, container = _setup_job(docs)
    deployment_pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    bridge = _container(docs)

    # A hook: made (after its ConfigMap and ServiceAccount) before the release's objects, on every
    # install and upgrade; replaced on the next run, removed once it succeeded.
    hook_cm = _one(docs, "ConfigMap", SETUP_NAME)
    hook_sa = _one(docs, "ServiceAccount", SETUP_NAME)
    assert _hook_weight(hook_cm) < _hook_weight(job) and _hook_weight(hook_sa) < _hook_weight(job)
    hooks = {d["metadata"]["name"] for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})}
    assert hooks == {SETUP_NAME}  # the release's own objects are no hooks

    # `onesignal-bridge setup --config <the file>`, once per attempt, within the deadline.
    assert container["args"] == ["setup", "--config", CONFIG_PATH]
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.config, args.print_sql) == ("setup", CONFIG_PATH, False)
    assert container["image"] == bridge["image"] and container["imagePullPolicy"] == bridge["imagePullPolicy"]
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == values["setupJob"]["backoffLimit"]
    assert job["spec"]["activeDeadlineSeconds"] == values["setupJob"]["activeDeadlineSeconds"]
    assert container["resources"] == values["setupJob"]["resources"] != bridge["resources"]

    # Runs like the bridge: same pod and container security, pull secrets and placement.
    for key in ("securityContext", "automountServiceAccountToken", "nodeSelector", "tolerations"):
        assert pod.get(key) == deployment_pod.get(key), key
    assert container["securityContext"] == bridge["securityContext"]
    assert pod["serviceAccountName"] == SETUP_NAME  # the release's ServiceAccount does not exist yet
    assert hook_sa["automountServiceAccountToken"] is False
    # Its pod is not one of the bridge's: the Service, PDB and NetworkPolicy selectors skip it.
    selector = _one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()

    # It mounts the hook ConfigMap, which holds exactly the Deployment's configuration file.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert mount["mountPath"] + "/" + volume["configMap"]["items"][0]["path"] == CONFIG_PATH
    assert volume["configMap"]["name"] == SETUP_NAME
    text = hook_cm["data"]["config.yaml"]
    assert text == _one(docs, "ConfigMap", FULLNAME)["data"]["config.yaml"]
    assert {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")} == {"/tmp"}

    # The same environment as the bridge, but DATABASE_URL from the owner's key.
    secret = {"ONESIGNAL_API_KEY": "os_v2_app_key", "ONESIGNAL_APP_ID": "3f1c2b8e-0000-4000-8000-000000000001",
              "DATABASE_URL": "postgresql://onesignal_bridge:pw@db/app",
              "OWNER_DATABASE_URL": "postgresql://app_owner:pw@db/app"}
    env = _env(container, secret)
    assert env == {**_env(bridge, secret), "DATABASE_URL": secret["OWNER_DATABASE_URL"]}
    assert {v["name"]: v["valueFrom"]["secretKeyRef"]["name"] for v in container["env"] if "valueFrom" in v} == {
        "ONESIGNAL_API_KEY": values["existingSecret"], "ONESIGNAL_APP_ID": values["existingSecret"],
        "DATABASE_URL": values["existingSecret"]}
    assert env["TZ"] == "UTC"  # extraEnv too
    assert container.get("envFrom") == bridge.get("envFrom")

    # ... which is what loading the file needs: setup reaches the owner's DSN.
    referenced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))
    assert referenced <= set(env), f"config reads {referenced - set(env)} that the Job does not set"
    config = parse_config(yaml.safe_load(text), where="setup configmap", env=env)
    assert isinstance(config.source, PostgresSourceConfig)
    assert config.source.dsn.get_secret_value() == secret["OWNER_DATABASE_URL"]


def test_setup_job_config_loads_from_the_mounted_file(chart: Any, tmp_path: Path) -> None:
    """outbox, DSN key left empty: the Job falls back to secretKeys.databaseUrl and, with an
    existing ServiceAccount, runs as that one; `load_config` reads the file as the bridge does."""
    docs = _render(chart, {"setupJob": {"enabled": True}, "serviceAccount": {"create": False, "name": "app"},
                           "secretKeys": {"databaseUrl": "BRIDGE_DSN"}, "imagePullSecrets": [{"name": "reg"}],
                           "config": {"source": {"kind": "outbox"}, "onesignal": {
                               "app_id": "3f1c2b8e-0000-4000-8000-000000000001"}}})
    job, pod, container = _setup_job(docs)
    assert [d["kind"] for d in docs if d["metadata"]["name"] == SETUP_NAME] == ["ConfigMap", "Job"]
    assert pod["serviceAccountName"] == "app" == _one(docs, "Deployment")["spec"]["template"]["spec"][
        "serviceAccountName"]
    assert pod["imagePullSecrets"] == [{"name": "reg"}]
    assert container["resources"] == _container(docs)["resources"]  # setupJob.resources empty
    secret = {"ONESIGNAL_API_KEY": "os_v2_app_key", "BRIDGE_DSN": "postgresql://bridge:pw@db/app"}
    env = _env(container, secret)
    assert set(env) == {"ONESIGNAL_API_KEY", "DATABASE_URL"}  # app_id is in the file
    path = tmp_path / "config.yaml"
    path.write_text(_one(docs, "ConfigMap", SETUP_NAME)["data"]["config.yaml"])
    config = load_config(path, env=env)
    assert isinstance(config.source, OutboxSourceConfig)
    assert config.source.dsn.get_secret_value() == secret["BRIDGE_DSN"]
    for doc in docs:
        if doc["metadata"]["name"] == SETUP_NAME:
            kubernetes_validate.validate(_strip(doc), KUBE_VERSIONS[-1], strict=True)


def test_setup_job_values_pass_helm_lint() -> None:
    report = helm.lint(CHART, _values("setup-job"), strict=True)
    assert not report["errors"], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    return policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("narrow", [False, True], ids=["broad", "narrow"])
def test_with_network_policies_the_setup_pod_may_reach_dns_and_the_database_only(chart: Any, narrow: bool) -> None:
    """In a namespace whose NetworkPolicies deny by default, the setup pod must still reach the
    database: the release's policy selects the bridge's pods only (and does not exist yet at a
    pre-install), so the pod gets a hook policy of its own, made before the Job: DNS and the
    source's port, to the same peers as the bridge's; no OneSignal, nothing connecting in."""
    values = {**(_values("networkpolicy-narrow") if narrow else {"networkPolicy": {"enabled": True}}),
              "setupJob": {"enabled": True}}
    docs = _render(chart, values)
    job, _, _ = _setup_job(docs)
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    bridge_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    setup_policy = _one(docs, "NetworkPolicy", SETUP_NAME)
    release_policy = _one(docs, "NetworkPolicy", FULLNAME)
    assert _selects(setup_policy, pod_labels) and not _selects(setup_policy, bridge_labels)
    assert not _selects(release_policy, pod_labels)
    assert _hook_weight(setup_policy) < _hook_weight(job)  # in place before the pod starts

    assert setup_policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert setup_policy["spec"].get("ingress", []) == []  # nothing may connect to it
    assert _ports(setup_policy, "egress") == {"53/UDP", "53/TCP", "5432/TCP"}  # no 443: setup never calls OneSignal
    for rule in setup_policy["spec"]["egress"]:  # the same peers the bridge may reach on those ports
        ports = _ports({"spec": {"egress": [rule]}}, "egress")
        (same,) = [r for r in release_policy["spec"]["egress"] if _ports({"spec": {"egress": [r]}}, "egress") == ports]
        assert rule.get("to") == same.get("to"), ports
    assert _openings(setup_policy) == (set() if narrow else DNS | {"egress 5432/TCP"})
    for doc in docs:
        if doc["kind"] == "NetworkPolicy":
            kubernetes_validate.validate(_strip(doc), KUBE_VERSIONS[-1], strict=True)
    report = helm.lint(CHART, values, strict=True)
    assert not report["errors"], report

    without = _render(chart, {**values, "networkPolicy": {"enabled": False}})
    assert [d for d in without if d["kind"] == "NetworkPolicy"] == []


def test_the_default_setup_deadline_ends_the_job_before_helm_stops_waiting_for_it() -> None:
    """Helm waits for a hook at most `--timeout` (5 minutes unless given): a stuck setup must fail
    as a Job, with its pod's log saying why, not leave helm timing out on a Job still running."""
    helm_default_timeout_s = 300
    values = yaml.safe_load((CHART / "values.yaml").read_text())["setupJob"]
    assert values["activeDeadlineSeconds"] < helm_default_timeout_s


def test_every_setup_job_value_is_described() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())["setupJob"]
    assert values["enabled"] is False
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["setupJob"]
    assert set(schema["properties"]) == set(values) and schema["additionalProperties"] is False
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert [k for k in values if f"`setupJob.{k}`" not in doc] == []


@pytest.mark.parametrize("case", list(CASES))
def test_setup_job_is_off_by_default(rendered: dict[str, list[dict[str, Any]]], case: str) -> None:
    names = {d["metadata"]["name"] for d in rendered[case]}
    assert (SETUP_NAME in names) == (case == "setup-job")


def test_the_setup_job_command_migrates_a_real_database(chart: Any, pg_db: Any, sim: Any, tmp_path: Path) -> None:
    """The rendered Job's command, for real: `setup --config <the hook ConfigMap's file>` with the
    Job's environment against a private Postgres as its owner; `check` then finds the schema current."""
    from bridgeproc import API_KEY, APP_ID, run_cli

    pg_db.execute("CREATE TABLE users (id bigint PRIMARY KEY, plan text, country text);")
    docs = _render(chart, {**(_values("setup-job") or {}), "config": {"onesignal": {"base_url": sim.base_url}}})
    _, _, container = _setup_job(docs)
    path = tmp_path / "config.yaml"
    path.write_text(_one(docs, "ConfigMap", SETUP_NAME)["data"]["config.yaml"])
    secret = {"ONESIGNAL_API_KEY": API_KEY, "ONESIGNAL_APP_ID": APP_ID, "OWNER_DATABASE_URL": pg_db.dsn,
              "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}  # the bridge's DSN: not used here
    env = _env(container, secret)

    before = run_cli("check", "--config", str(path), env=env)
    assert before.returncode == 1 and "onesignal_bridge schema" in before.stdout, before.stdout
    # The mount puts the file at CONFIG_PATH; here it is at `path`.
    done = run_cli(*[str(path) if arg == CONFIG_PATH else arg for arg in container["args"]], env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[ok  ] onesignal_bridge schema at version" in done.stdout
    after = run_cli("check", "--config", str(path), env=env)
    assert after.returncode == 0, after.stdout
    assert re.search(r"\[ok  \] onesignal_bridge schema is at version \d+ \(current\)", after.stdout), after.stdout
    assert API_KEY not in done.stdout + done.stderr + after.stdout + after.stderr


def test_outbox_and_scaled_kafka_render(chart: Any) -> None:
    docs = _render(chart, {"config": {"source": {"kind": "outbox", "poll_interval_ms": 500}}})
    data, env = _bridge_config(docs)
    assert isinstance(parse_config(data, env=env).source, OutboxSourceConfig)
    assert _one(docs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}  # one reader
    docs = _render(chart, {"config": {"source": {"kind": "postgres", "standby": False}}})
    assert _one(docs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}  # no lock: no overlap
    docs = _render(chart, {"replicaCount": 12, "config": {"source": {
        "kind": "kafka", "bootstrap_servers": "k:9092", "topic_pattern": "^db\\.public\\..*"}}})
    assert _one(docs, "Deployment")["spec"]["replicas"] == 12
    assert _one(docs, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"
    data, env = _bridge_config(docs)
    assert isinstance(parse_config(data, env=env).source, KafkaSourceConfig)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"replicaCount": 3}, "replicaCount"),  # one slot reader (+ one standby)
        ({"replicaCount": 2, "config": {"source": {"kind": "postgres", "standby": False}}}, "standby"),
        ({"replicaCount": 2, "config": {"source": {"kind": "outbox"}}}, "replicaCount"),
        ({"config": {"onesignal": {"api_key": "os_v2_app_clear"}}}, "api_key"),
        ({"config": {"source": {"kind": "postgres", "dsn": "postgresql://u:pw@db/app"}}}, "dsn"),
        ({"config": {"source": {"kind": "kafka", "bootstrap_servers": "k:9092", "topics": ["t"],
                                "consumer": {"sasl.password": "clear"}}}}, "consumer"),
        ({"config": {"source": {"kind": "kafka", "bootstrap_servers": "k:9092"}}}, "topic"),
        ({"config": {"source": {"kind": "kafka", "bootstrap_servers": "k:9092", "slot": "s",
                                "topics": ["t"]}}},
         "slot"),
        ({"config": {"metrics": {"port": 1234}}}, "metrics"),
        ({"config": {"mappings": []}}, "mappings"),
        ({"config": {"delivery": {"user_requests_per_second": 5}}}, "user_requests_per_second"),
        ({"extraEnv": [{"name": "ONESIGNAL_API_KEY", "value": "clear"}]}, "extraEnv"),
        ({"config": {"source": {"kind": "kafka", "bootstrap_servers": "k:9092", "topics": ["t"]}},
          "secretKeys": {"kafkaUsername": "u"}}, "kafkaPassword"),
        ({"terminationGracePeriodSeconds": 12}, "terminationGracePeriodSeconds"),
        ({"networkPolicy": {"enabled": True, "metricsFrom": [{}]}}, "/networkPolicy/metricsFrom/0"),
        ({"networkPolicy": {"enabled": True, "egress": {"sourceTo": [{"namespaceSelecter": {}}]}}},
         "namespaceSelecter"),
        ({"networkPolicy": {"enabled": True, "egress": {"dnsTo": [{"ipBlock": {"except": ["10.0.0.0/8"]}}]}}},
         "cidr"),
        ({"networkPolicy": {"enabled": True, "egress": {
            "onesignalTo": [{"ipBlock": {"cidr": "198.51.100.0/24"}}], "onesignalExcept": ["10.0.0.0/8"]}}},
         "onesignalExcept"),
        ({"setupJob": {"enabled": True},
          "config": {"source": {"kind": "kafka", "bootstrap_servers": "k:9092", "topics": ["t"]}}},
         "setupJob.enabled: source.kind kafka has nothing to create in a database"),
        ({"setupJob": {"enabled": True, "backofflimit": 1}}, "backofflimit"),
    ],
    ids=["postgres-3-replicas", "standby-off", "outbox-2-replicas", "api-key-in-values", "dsn-in-values",
         "sasl-password-in-values", "kafka-without-topics", "postgres-key-in-kafka", "metrics-in-config",
         "no-mappings", "user-rate-above-1", "secret-in-extra-env", "half-kafka-credentials", "short-grace",
         "empty-network-peer", "misspelt-network-peer", "ip-block-without-cidr", "onesignal-except-with-to",
         "setup-job-with-kafka", "misspelt-setup-job-key"],
)
def test_values_the_chart_refuses(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as exc:
        _render(chart, values)
    assert message in str(exc.value), str(exc.value)


# -- secrets under config.source.consumer ----------------------------------------------------

KAFKA_SOURCE = {"kind": "kafka", "bootstrap_servers": "k:9092", "topics": ["t"]}
CLEAR = "Cl34r-S3cr3t-V4lue"
# librdkafka properties (2.x CONFIGURATION.md) whose value is a credential, plus the Java names people
# copy over; each must never be written in values, only as a ${VAR} read from a Secret.
SECRET_CONSUMER_KEYS = [
    "sasl.password",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.client.credentials.client.secret",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.assertion.private.key.pem",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl_key",
    "ssl.keystore.password",
    "ssl.truststore.password",
    "sasl.jaas.config",
]
# Names, paths and public material: accepted as they are.
PLAIN_CONSUMER_KEYS = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "OAUTHBEARER",
    "sasl.username": "bridge",
    "sasl.oauthbearer.method": "oidc",
    "sasl.oauthbearer.client.id": "bridge",
    "sasl.oauthbearer.token.endpoint.url": "https://idp.example.com/token",
    "sasl.oauthbearer.assertion.private.key.file": "/etc/kafka/assertion.key",
    "sasl.kerberos.keytab": "/etc/krb5/bridge.keytab",
    "ssl.key.location": "/etc/kafka/tls/tls.key",
    "ssl.keystore.location": "/etc/kafka/keystore.p12",
    "ssl.certificate.pem": "-----BEGIN CERTIFICATE-----",
    "ssl.ca.pem": "-----BEGIN CERTIFICATE-----",
    "session.timeout.ms": 45000,
}


def _kafka_values(consumer: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"config": {"source": {**KAFKA_SOURCE, "consumer": consumer}}, **extra}


@pytest.mark.parametrize("key", SECRET_CONSUMER_KEYS)
@pytest.mark.parametrize("value", [CLEAR, f"${{VAR:-{CLEAR}}}", f"prefix-${{VAR}}-{CLEAR}", {"v": CLEAR}],
                         ids=["clear", "env-default", "mixed", "mapping"])
def test_schema_refuses_every_secret_consumer_key(chart: Any, key: str, value: Any) -> None:
    env = [{"name": "VAR", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
    with pytest.raises(helm.HelmError) as exc:
        _render(chart, _kafka_values({key: value}, extraEnv=env))
    message = str(exc.value)
    assert "values don't meet the specifications of the schema" in message, message  # the schema, not a template
    assert f"'/config/source/consumer/{key}'" in message, message  # names the key
    assert "extraEnv valueFrom.secretKeyRef" in message and "secretKeys.kafkaUsername/kafkaPassword" in message, message
    assert CLEAR not in message, "the refusal must not echo the secret"


def test_template_and_schema_share_the_secret_key_pattern() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    (kafka,) = [b["then"] for b in schema["properties"]["config"]["properties"]["source"]["allOf"]
                if b["if"]["properties"]["kind"]["const"] == "kafka"]
    (schema_pattern,) = kafka["properties"]["consumer"]["patternProperties"]
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    (tpl_pattern,) = re.findall(
        r'define "onesignal-bridge.consumerSecretKeyPattern" -}}\n(.*)\n\{\{- end', helpers)
    assert tpl_pattern == schema_pattern
    for key in SECRET_CONSUMER_KEYS:
        assert re.search(schema_pattern, key), key
    for key in PLAIN_CONSUMER_KEYS:
        assert not re.search(schema_pattern, key), key


def test_plain_consumer_keys_pass(chart: Any) -> None:
    docs = _render(chart, _kafka_values(dict(PLAIN_CONSUMER_KEYS)))
    data, env = _bridge_config(docs)
    config = parse_config(data, env=env)
    assert isinstance(config.source, KafkaSourceConfig)
    assert config.source.consumer == PLAIN_CONSUMER_KEYS


@pytest.mark.parametrize("key", ["sasl.oauthbearer.client.secret", "ssl.keystore.password", "ssl.key.pem"])
def test_secret_consumer_key_reads_a_kubernetes_secret(chart: Any, key: str) -> None:
    """The mechanism the refusal points to: extraEnv valueFrom.secretKeyRef, and ${VAR} in consumer."""
    env = [{"name": "KAFKA_CLIENT_SECRET", "valueFrom": {"secretKeyRef": {"name": "kafka-client", "key": "secret"}}}]
    docs = _render(chart, _kafka_values({key: "${KAFKA_CLIENT_SECRET}"}, extraEnv=env))
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(_strip(doc), KUBE_VERSIONS[-1], strict=True)
    data, container_env = _bridge_config(docs)
    assert data["source"]["consumer"][key] == "${KAFKA_CLIENT_SECRET}"
    config = parse_config(data, env=container_env)
    assert config.source.consumer[key] == container_env["KAFKA_CLIENT_SECRET"]  # type: ignore[union-attr]
    assert container_env["KAFKA_CLIENT_SECRET"].startswith("secret-")  # from secretKeyRef, not a literal
    # extraEnvFrom may carry it too (the chart cannot see the names inside).
    _render(chart, _kafka_values({key: "${KAFKA_CLIENT_SECRET}"}, extraEnvFrom=[{"secretRef": {"name": "kafka"}}]))


@pytest.mark.parametrize(
    "extra, message",
    [
        ({}, "nothing sets"),
        ({"extraEnv": [{"name": "KAFKA_CLIENT_SECRET", "value": "clear"}]}, "valueFrom.secretKeyRef"),
        ({"extraEnv": [{"name": "KAFKA_CLIENT_SECRET",
                        "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]}, "valueFrom.secretKeyRef"),
    ],
    ids=["unset", "literal-extra-env", "config-map"],
)
def test_secret_reference_must_come_from_a_secret(chart: Any, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as exc:
        _render(chart, _kafka_values({"ssl.keystore.password": "${KAFKA_CLIENT_SECRET}"}, **extra))
    assert "config.source.consumer.ssl.keystore.password" in str(exc.value), str(exc.value)
    assert message in str(exc.value), str(exc.value)
    assert "clear" not in str(exc.value)


# -- NetworkPolicy ----------------------------------------------------------------------------


def _broad_peer(peer: dict[str, Any]) -> bool:
    """A peer that admits (nearly) everything: a huge ipBlock, or every namespace."""
    if "ipBlock" in peer:
        return ipaddress.ip_network(peer["ipBlock"]["cidr"], strict=False).prefixlen < 8
    return peer.get("namespaceSelector") == {} and not peer.get("podSelector")


def _openings(policy: dict[str, Any]) -> set[str]:
    """Ports the policy leaves open to anyone (ingress) or to anywhere (egress)."""
    out = set()
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        for rule in policy["spec"].get(direction, []):
            peers = rule.get(peers_key)
            if not peers or any(_broad_peer(p) for p in peers):
                ports = rule.get("ports") or [{"port": "any"}]
                out |= {f"{direction} {p['port']}/{p.get('protocol', 'TCP')}" for p in ports}
    return out


def _ports(policy: dict[str, Any], direction: str) -> set[str]:
    return {f"{p['port']}/{p.get('protocol', 'TCP')}" for r in policy["spec"].get(direction, [])
            for p in r.get("ports", [])}


DNS = {"egress 53/UDP", "egress 53/TCP"}
BROAD_POSTGRES = {"ingress metrics/TCP", "egress 443/TCP", "egress 5432/TCP"} | DNS


def test_enabled_network_policy_is_broad_by_default_and_says_so(chart: Any) -> None:
    out = chart.render({"networkPolicy": {"enabled": True}}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = _render(chart, {"networkPolicy": {"enabled": True}})
    policy = _one(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert _openings(policy) == BROAD_POSTGRES
    (https,) = [r for r in policy["spec"]["egress"] if "443/TCP" in _ports({"spec": {"egress": [r]}}, "egress")]
    assert https["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0"}}]
    kafka = _one(_render(chart, {"networkPolicy": {"enabled": True}, "config": {"source": KAFKA_SOURCE}}),
                 "NetworkPolicy")
    assert _openings(kafka) == {"ingress metrics/TCP", "egress 443/TCP", "egress 9092/TCP", "egress 9093/TCP"} | DNS
    # Said where people look: install notes and values.yaml.
    notes = next(t for name, t in out.items() if name.endswith("NOTES.txt"))
    for value in ("networkPolicy.metricsFrom", "networkPolicy.egress.onesignalTo",
                  "networkPolicy.egress.sourceTo", "networkPolicy.egress.dnsTo"):
        assert value in notes, notes
    values_text = (CHART / "values.yaml").read_text()
    header = values_text[:values_text.index("\nnetworkPolicy:")].rsplit("\n\n", 1)[-1]
    for words in ("ANY pod", "0.0.0.0/0", "ANY destination", "ci/networkpolicy-narrow-values.yaml"):
        assert words in header, header
    values = yaml.safe_load(values_text)["networkPolicy"]
    assert values["metricsFrom"] == [] and values["egress"]["sourceTo"] == []  # what the comment describes


def test_narrow_example_closes_every_opening(chart: Any, rendered: dict[str, list[dict[str, Any]]]) -> None:
    policy = _one(rendered["networkpolicy-narrow"], "NetworkPolicy")
    assert _openings(policy) == set()
    # Still lets through what the bridge needs: DNS over UDP and TCP, HTTPS, the database, scrapes.
    assert _ports(policy, "egress") == {"53/UDP", "53/TCP", "443/TCP", "5432/TCP"}
    assert _ports(policy, "ingress") == {"metrics/TCP"}
    for rule in policy["spec"]["egress"]:
        for peer in rule["to"]:
            assert peer.get("ipBlock", {}).get("cidr") not in {"0.0.0.0/0", "::/0"}
    (dns,) = [r for r in policy["spec"]["egress"] if "53/UDP" in _ports({"spec": {"egress": [r]}}, "egress")]
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["from"][0].keys() == {"namespaceSelector", "podSelector"}  # both must match
    # The install notes list nothing as broad any more.
    out = chart.render(_values("networkpolicy-narrow"), name=RELEASE, namespace=NAMESPACE, is_install=True)
    notes = next(t for name, t in out.items() if name.endswith("NOTES.txt"))
    assert "NetworkPolicy is broad" not in notes, notes


@pytest.mark.parametrize(
    "narrowing, closed",
    [
        ({"metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
         {"ingress metrics/TCP"}),
        ({"egress": {"dnsTo": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]}},
         DNS),
        ({"egress": {"onesignalTo": [{"ipBlock": {"cidr": "198.51.100.0/24"}}]}}, {"egress 443/TCP"}),
        ({"egress": {"onesignalCidr": "198.51.100.0/24"}}, {"egress 443/TCP"}),
        ({"egress": {"sourceTo": [{"ipBlock": {"cidr": "10.20.0.10/32"}}]}}, {"egress 5432/TCP"}),
        ({"egress": {"sourceTo": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "db"}},
                                   "podSelector": {"matchLabels": {"cnpg.io/cluster": "app-db"}}}]}},
         {"egress 5432/TCP"}),
        # Private ranges excepted from 0.0.0.0/0: still the whole internet on 443.
        ({"egress": {"onesignalExcept": ["10.0.0.0/8"]}}, set()),
    ],
    ids=["metrics-from", "dns-to", "onesignal-to", "onesignal-cidr", "source-cidr", "source-pods",
         "onesignal-except"],
)
def test_each_narrowing_value_closes_its_opening(chart: Any, narrowing: dict[str, Any], closed: set[str]) -> None:
    docs = _render(chart, {"networkPolicy": {"enabled": True, **narrowing}})
    policy = _one(docs, "NetworkPolicy")
    kubernetes_validate.validate(_strip(policy), KUBE_VERSIONS[-1], strict=True)
    assert _openings(policy) == BROAD_POSTGRES - closed
    assert _ports(policy, "egress") == {"53/UDP", "53/TCP", "443/TCP", "5432/TCP"}  # nothing needed is lost


# -- metrics: alerts and dashboard against a live /metrics ---------------------------------

_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                    "unless", "offset", "inf", "nan"}
_TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "container", "le", "version"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (a lexer, not a parser: enough for our own rules)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group().lower() in _PROMQL_KEYWORDS:
            continue  # a function or a keyword
        names.add(m.group())
    return names


def promql_label_names(expr: str) -> set[str]:
    labels = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    for matchers in re.findall(r"\{([^{}]*)\}", re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return labels


def exported_metric_names(text: str) -> set[str]:
    """Sample names a scrape can contain, from the families' TYPE lines (histograms expand)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group())  # type: ignore[union-attr]
    return names


def known_label_names() -> set[str]:
    labels = set(_TARGET_LABELS)
    for obj in vars(bridge_metrics).values():
        labels |= set(getattr(obj, "_labelnames", ()))
    return labels


@pytest.fixture
async def live_metrics() -> Any:
    server = HealthServer("127.0.0.1", 0, lambda: (True, "ok"))
    port = await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        await server.stop()


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    return exprs


def test_promql_lexer() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, endpoint) '
            '(rate(a_bucket{job=~"$job",x="y{z}"}[$__rate_interval])))'
            ' / on (job) group_left b_total > 5 and absent(c == 1)')
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert promql_label_names(expr) == {"le", "endpoint", "job", "x"}


async def test_alerts_and_dashboard_use_only_exported_metrics(
        chart: Any, rendered: dict[str, list[dict[str, Any]]], live_metrics: httpx.AsyncClient) -> None:
    response = await live_metrics.get("/metrics")
    assert response.status_code == 200
    exported = exported_metric_names(response.text)
    assert "onesignal_bridge_api_request_duration_seconds_bucket" in exported

    rules = [r for doc in _rule_docs(chart) for g in doc["spec"]["groups"] for r in g["rules"]]
    alert_names = {r["alert"] for r in rules}
    assert REQUIRED_ALERTS <= alert_names
    assert {"OneSignalBridgeKafkaConsumerLagHigh", "OneSignalBridgeOutboxBacklogHigh"} <= alert_names

    dashboard_cm = _one(rendered["monitoring"], "ConfigMap", f"{FULLNAME}-dashboard")
    assert dashboard_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (dashboard_text,) = dashboard_cm["data"].values()
    dashboard = json.loads(dashboard_text)
    assert dashboard == json.loads((CHART / "dashboards" / "onesignal-bridge.json").read_text())
    exprs = _dashboard_exprs(dashboard)
    variable_queries = [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]

    used: dict[str, set[str]] = {}
    for expr in [r["expr"] for r in rules] + exprs:
        names = promql_metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        unknown_labels = promql_label_names(expr) - known_label_names()
        assert not unknown_labels, f"{expr!r} uses labels no bridge metric has: {unknown_labels}"
        for n in names:
            used.setdefault(n, set()).add(expr)
    for query in variable_queries:
        (metric,) = re.findall(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", query)
        used.setdefault(metric, set()).add(query)

    missing = {n: sorted(e)[0] for n, e in used.items() if n not in exported}
    assert not missing, f"metrics the bridge does not export: {missing}"

    dashboard_metrics = set().union(*(promql_metric_names(e) for e in exprs))
    for topic in ("onesignal_bridge_source_lag_seconds", "onesignal_bridge_replication_slot_lag_bytes",
                  "onesignal_bridge_changes_total", "onesignal_bridge_api_requests_total",
                  "onesignal_bridge_api_request_duration_seconds_bucket",
                  "onesignal_bridge_dead_letters_total",
                  "onesignal_bridge_end_to_end_latency_seconds_bucket",
                  "onesignal_bridge_drift_users", "onesignal_bridge_drift_checked_total",
                  "onesignal_bridge_drift_repaired_total"):
        assert topic in dashboard_metrics, f"dashboard lacks {topic}"
    assert any("by (status)" in e and "api_requests_total" in e for e in exprs), "no API status code panel"


async def test_probe_paths_answer_on_a_live_bridge(rendered: dict[str, list[dict[str, Any]]],
                                                   live_metrics: httpx.AsyncClient) -> None:
    container = _container(rendered["default"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        response = await live_metrics.get(container[probe]["httpGet"]["path"])
        assert response.status_code == 200, (probe, response.text)


# -- documentation and image ------------------------------------------------------------------


def test_runbook_covers_every_alert(chart: Any) -> None:
    runbook = (ROOT / "docs" / "operations.md").read_text()
    headings = {h.strip().lower() for h in re.findall(r"^#+\s+(.+)$", runbook, flags=re.M)}
    for doc in _rule_docs(chart):
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                assert rule["alert"].lower() in headings, f"docs/operations.md has no section {rule['alert']}"
    for topic in ("slot lag", "dead letters", "key", "outage", "failover"):
        assert topic in runbook.lower()


def _model_paths(model: type, prefix: str) -> set[str]:
    out = set()
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        path = f"{prefix}.{name}" if prefix else name
        out.add(path)
        ann = field.annotation
        if get_origin(ann) is list and get_args(ann) and hasattr(get_args(ann)[0], "model_fields"):
            out |= _model_paths(get_args(ann)[0], f"{path}[]")
        elif hasattr(ann, "model_fields"):
            out |= _model_paths(ann, path)
    return out


def test_configuration_doc_covers_every_key() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    paths = _model_paths(Config, "")
    for model in (PostgresSourceConfig, OutboxSourceConfig, KafkaSourceConfig):
        paths |= _model_paths(model, "source")
    missing = sorted(p for p in paths if f"`{p}`" not in doc)
    assert not missing, f"docs/configuration.md does not document {missing}"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for key in values:
        assert f"`{key}" in doc, f"docs/configuration.md does not describe the Helm value {key}"


def test_dockerfile_builds_the_image_the_chart_runs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert len(re.findall(r"^FROM ", dockerfile, flags=re.M)) >= 2, "multi-stage"
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, flags=re.M)
    (user,) = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.M)
    assert user.split(":")[0] == str(values["securityContext"]["runAsUser"])
    assert re.search(r'^ENTRYPOINT \["onesignal-bridge"\]', dockerfile, flags=re.M)
    assert values["image"]["repository"] in dockerfile
    assert str(values["metrics"]["port"]) in re.findall(r"^EXPOSE\s+(\d+)", dockerfile, flags=re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "tests"} <= {p.strip("/") for p in ignored}
