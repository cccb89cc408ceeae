"""The Kubernetes manifests, checked offline (no cluster runs here): the core kinds against the API's own schemas
(kubernetes-validate, strict: no unknown field), the custom resources (PodMonitor, PrometheusRule, KServe's
InferenceService) for the fields their controllers read, the Prometheus Adapter's rule (its query checked by
promtool), and the pieces against each other and against the service itself."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.main import create_app
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"
PROMTOOL = shutil.which("promtool")


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def base() -> dict[str, dict[str, Any]]:
    """The kustomization's resources by kind."""
    kustomization = load(ROOT / "base" / "kustomization.yaml")
    documents = [load(ROOT / "base" / name) for name in kustomization["resources"]]
    return {document["kind"]: document for document in documents}


@pytest.mark.parametrize("kind", ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"])
def test_core_kinds_follow_the_api_schema_strictly(kind: str) -> None:
    kubernetes_validate.validate(base()[kind], KUBERNETES_VERSION, strict=True)


def test_the_pieces_select_the_deployments_pods() -> None:
    resources = base()
    deployment = resources["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert resources["Service"]["spec"]["selector"].items() <= pod_labels.items()
    for kind in ("PodDisruptionBudget", "PodMonitor"):
        assert resources[kind]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), kind
    target = resources["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_ports_probes_and_settings_are_the_services_own(tmp_path: Path) -> None:
    resources = base()
    container = resources["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {variable["name"]: variable["value"] for variable in container["env"] if "value" in variable}
    assert {variable["name"].lower() for variable in container["env"]} <= set(Settings.model_fields)
    secret = tmp_path / "api-keys"  # the Secret's file, as the kubelet would mount it
    secret.write_text("a-key-of-the-secret-0123456789\n")
    settings = Settings(**{name.lower(): value for name, value in env.items()} | {"api_keys_file": secret})
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": settings.port, "grpc": settings.grpc_port, "metrics": settings.metrics_port}
    assert {port["name"] for port in resources["Service"]["spec"]["ports"]} == set(ports)
    assert resources["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    paths = set(create_app(settings).openapi()["paths"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in paths, probe
        assert container[probe]["httpGet"]["port"] == "metrics"  # the ops server answers even when the app is busy
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_grace_s


def test_the_autoscaler_scales_on_a_metric_the_service_exports() -> None:
    metric = base()["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    names = {family.name for family in create_app(Settings()).state.service.metrics.registry.collect()}
    assert metric in names


def test_custom_resources_have_what_their_controllers_read() -> None:
    monitor = base()["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    service = load(ROOT / "kserve" / "inferenceservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    container = service["spec"]["predictor"]["containers"][0]
    env = {variable["name"]: variable["value"] for variable in container["env"] if "value" in variable}
    assert int(env["PORT"]) == container["ports"][0]["containerPort"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # The container itself is a core PodSpec container: validate it as one.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve"}, "spec": {"containers": [container]}}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def key_file(spec: dict[str, Any], container: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """API_KEYS_FILE's path, and the Secret volume mounted where it points."""
    path = next(v["value"] for v in container["env"] if v["name"] == "API_KEYS_FILE")
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    return path.removeprefix(mount["mountPath"] + "/"), volume["secret"]


def test_the_inference_keys_come_from_a_secret_and_model_control_stays_off() -> None:
    spec = base()["Deployment"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    name, secret = key_file(spec, container)
    assert secret == {"secretName": "onnx-ensemble-serving", "items": [{"key": "api-keys", "path": name}]}
    assert "optional" not in secret  # no pod starts without the keys
    variables = {variable["name"] for variable in container["env"]}
    assert "MODEL_CONTROL" not in variables and "API_KEY" not in variables  # model control: the default, none
    predictor = load(ROOT / "kserve" / "inferenceservice.yaml")["spec"]["predictor"]
    assert key_file(predictor, predictor["containers"][0]) == (name, secret)


def test_the_prometheus_rule_is_the_compose_stacks_recording_rules() -> None:
    rule = base()["PrometheusRule"]
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == load(REPO / "deploy" / "prometheus" / "rules.yml")["groups"]


ADAPTER = load(ROOT / "prometheus-adapter" / "values.yaml")["rules"]["custom"]


def test_the_adapter_exposes_the_autoscalers_metric() -> None:
    hpa_metric = base()["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    (rule,) = ADAPTER
    assert rule["name"]["as"] == hpa_metric
    assert rule["seriesQuery"].startswith(f"{hpa_metric}{{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


@pytest.mark.skipif(PROMTOOL is None, reason="no promtool (apt-get install prometheus)")
def test_the_adapters_query_is_valid_promql(tmp_path: Path) -> None:
    """The adapter's query as it renders it for the HPA (its Go template filled in), checked by promtool."""
    (rule,) = ADAPTER
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", rule["name"]["as"])
        .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"onnx-ensemble-serving-.*"')
        .replace("<<.GroupBy>>", "pod")
    )
    rules = tmp_path / "adapter.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [{"record": "q", "expr": query}]}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
