"""helm/alora-serve: rendered and linted with Helm 4 as a library (helm-python-sdk) for the default
values, the GPU + external Redis example, the external Redis Cluster example and a bundled-Redis / PVC
variant; every rendered manifest is validated with kubernetes-validate (the ServiceMonitor, a CRD,
against a vendored schema)."""

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.version import Version

from alora_core.kvcache import redis_url
from service.settings import Settings
from tests.ops.conftest import ROOT, require, scrape
from tests.ops.test_containers import check_settings_env

CHART = ROOT / "helm" / "alora-serve"
MIN_KUBE = Version("1.27.0")  # Chart.yaml: kubeVersion >=1.27.0-0
SERVICE_MONITOR_SCHEMA = Path(__file__).parent / "schemas" / "servicemonitor-monitoring-v1.json"
BUNDLED_PVC: dict[str, Any] = {
    "redis": {"mode": "bundled"},
    "model": {
        "source": "pvc",
        "path": "models/base",
        "adaptersDir": "intrinsics",
        "adapters": {"certainty": "extra/certainty_alora"},
        "pvc": {"claimName": "alora-models"},
    },
    "ingress": {"enabled": True, "className": "traefik", "annotations": {"example.com/sticky": "header"}},
    "config": {"max_request_bytes": 1048576, "max_num_seqs": 32},
    "autoscaling": {"enabled": True},
}


def values_file(name: str) -> dict[str, Any]:
    values: dict[str, Any] = require("yaml").safe_load((CHART / name).read_text())
    return values


VALUES = {
    "default": None,
    "gpu-redis": "values-gpu-redis.yaml",
    "redis-cluster": "values-redis-cluster.yaml",
    "bundled-pvc": BUNDLED_PVC,
}


def load_values(case: str) -> dict[str, Any] | None:
    spec = VALUES[case]
    return values_file(spec) if isinstance(spec, str) else spec


def render(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every manifest the chart renders for `values` (release alora in namespace serving)."""
    helm = require("helm_python")
    yaml = require("yaml")
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        rendered = chart.render(values, name="alora", namespace="serving", is_install=True)
    return [
        doc
        for name, text in sorted(rendered.items())
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def server_deployment(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [
        d for d in by_kind(manifests, "Deployment") if not d["metadata"]["name"].endswith("-redis")
    ]
    return deployment


def server_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = server_deployment(manifests)["spec"]["template"]["spec"]["containers"][0]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from secret>") for e in container["env"]}


@pytest.fixture(scope="module", params=sorted(VALUES))
def case(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    yield request.param, render(load_values(request.param))


def test_chart_lints_clean(case: tuple[str, list[dict[str, Any]]]) -> None:
    helm = require("helm_python")
    name, _ = case
    report = helm.lint(CHART, load_values(name), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_every_manifest_validates(case: tuple[str, list[dict[str, Any]]]) -> None:
    kubernetes_validate = require("kubernetes_validate")
    jsonschema = require("jsonschema")
    # the oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest with schemas
    supported = [v for v in kubernetes_validate.utils.all_versions() if Version(v) >= MIN_KUBE]
    versions = (supported[0], supported[-1])
    _, manifests = case
    for manifest in manifests:
        if manifest["kind"] == "ServiceMonitor":  # a CRD: kubernetes-validate has no schema for it
            jsonschema.validate(manifest, json.loads(SERVICE_MONITOR_SCHEMA.read_text()))
            continue
        for version in versions:
            kubernetes_validate.validate(manifest, version, strict=True)


def test_service_settings_are_real_and_valid(
    case: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, manifests = case
    container = server_container(manifests)
    env = env_of(container)
    check_settings_env(env, monkeypatch)
    assert env["ALORA_HOST"] == "0.0.0.0"
    port = int(env["ALORA_PORT"])
    assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    (service,) = [s for s in by_kind(manifests, "Service") if not s["metadata"]["name"].endswith("-redis")]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_probes_and_security(case: tuple[str, list[dict[str, Any]]]) -> None:
    _, manifests = case
    container = server_container(manifests)
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    for deployment in by_kind(manifests, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    grace = server_deployment(manifests)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(env_of(container)["ALORA_DRAIN_TIMEOUT_S"])


def test_selectors_keep_the_server_and_redis_apart(case: tuple[str, list[dict[str, Any]]]) -> None:
    _, manifests = case
    deployments = by_kind(manifests, "Deployment")
    for deployment in deployments:
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        others = [d for d in deployments if d is not deployment]
        for other in others:  # no Deployment's selector matches another's pods
            assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()


def test_default_values_serve_the_demo_on_cpu() -> None:
    manifests = render(None)
    container = server_container(manifests)
    assert container["image"] == f"alora-serve:{version()}-cpu"
    env = env_of(container)
    assert "ALORA_MODEL" not in env and "ALORA_REDIS_URL" not in env and "ALORA_API_KEYS_FILE" not in env
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    kinds = {m["kind"] for m in manifests}
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap"}


def test_cpu_replicas_are_guaranteed_and_run_as_many_threads_as_their_cpu_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Default values: requests = limits in whole CPUs (Guaranteed QoS), the forward threads = the CPU
    limit (rounded up); config.cpu_threads wins over it; a GPU replica leaves the count to the server."""
    container = server_container(render(None))
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]
    assert str(resources["limits"]["cpu"]).isdigit()
    env = env_of(container)
    assert env["ALORA_CPU_THREADS"] == str(resources["limits"]["cpu"])
    assert "ALORA_CPU_BIND" not in env  # pinning only where cores are exclusive: opt in
    fractional = {"resources": {"limits": {"cpu": "2500m"}, "requests": {"cpu": "2500m"}}}
    assert env_of(server_container(render(fractional)))["ALORA_CPU_THREADS"] == "3"
    chosen = server_container(render({"config": {"cpu_threads": 5, "cpu_bind": "auto"}}))
    assert [e["name"] for e in chosen["env"]].count("ALORA_CPU_THREADS") == 1
    assert env_of(chosen)["ALORA_CPU_THREADS"] == "5" and env_of(chosen)["ALORA_CPU_BIND"] == "auto"
    check_settings_env(env_of(chosen), monkeypatch)
    gpu = env_of(server_container(render(values_file("values-gpu-redis.yaml"))))
    assert "ALORA_CPU_THREADS" not in gpu


def test_gpu_external_redis_values() -> None:
    manifests = render(values_file("values-gpu-redis.yaml"))
    container = server_container(manifests)
    assert container["image"] == f"alora-serve:{version()}-cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    names = [e["name"] for e in container["env"]]
    env = {e["name"]: e for e in container["env"]}
    # the password comes from the Secret, and is defined before the URL that refers to it
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "alora-redis", "key": "password"}
    assert (
        env["ALORA_REDIS_URL"]["value"] == "rediss://:$(REDIS_PASSWORD)@redis.cache.svc.cluster.local:6380/0"
    )
    assert names.index("REDIS_PASSWORD") < names.index("ALORA_REDIS_URL")
    assert env["ALORA_MODEL"]["value"] == "/models/granite-3.3-8b-instruct"
    assert env["ALORA_DEVICE"]["value"] == "cuda"
    pod = server_deployment(manifests)["spec"]["template"]["spec"]
    keys = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert keys["secret"]["secretName"] == "alora-api-keys"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert env["ALORA_API_KEYS_FILE"]["value"] == f"{mount['mountPath']}/{keys['secret']['items'][0]['path']}"
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "alora-models", "readOnly": True}

    (ingress,) = by_kind(manifests, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_conversation_id"
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    (monitor,) = by_kind(manifests, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert len(by_kind(manifests, "HorizontalPodAutoscaler")) == 1
    assert "replicas" not in server_deployment(manifests)["spec"]  # the HPA owns it


def test_external_redis_cluster_values() -> None:
    manifests = render(values_file("values-redis-cluster.yaml"))
    env = {e["name"]: e for e in server_container(manifests)["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "redis-cluster",
        "key": "redis-password",
    }
    url = env["ALORA_REDIS_URL"]["value"]
    assert url.startswith("redis+cluster://:$(REDIS_PASSWORD)@redis-cluster-0.")
    target = redis_url.parse(url)  # what the service makes of it
    assert target.kind == "cluster" and len(target.addresses) == 3
    assert target.options == {"password": "$(REDIS_PASSWORD)"}
    (hpa,) = by_kind(manifests, "HorizontalPodAutoscaler")  # scaling out is what the cluster is for
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    (pdb,) = by_kind(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "replicas" not in server_deployment(manifests)["spec"]


@pytest.mark.parametrize(
    ("url", "rendered"),
    [
        ("redis+sentinel://s1:26379,s2:26379/mymaster/0", "redis+sentinel://:$(REDIS_PASSWORD)@s1:26379,s2"),
        ("rediss+cluster://n1:6379,n2:6379", "rediss+cluster://:$(REDIS_PASSWORD)@n1:6379,n2:6379"),
        ("rediss://redis:6380/1", "rediss://:$(REDIS_PASSWORD)@redis:6380/1"),
    ],
)
def test_external_sentinel_and_cluster_urls(url: str, rendered: str) -> None:
    values = {"redis": {"mode": "external", "external": {"url": url, "passwordSecret": {"name": "r"}}}}
    env = env_of(server_container(render(values)))
    assert env["ALORA_REDIS_URL"].startswith(rendered)
    redis_url.parse(env["ALORA_REDIS_URL"])


def test_bundled_redis_is_private_to_the_release() -> None:
    manifests = render(BUNDLED_PVC)
    env = env_of(server_container(manifests))
    assert env["ALORA_REDIS_URL"] == "redis://alora-alora-serve-redis:6379/0"
    assert env["ALORA_ADAPTER"] == "certainty=/models/extra/certainty_alora"
    assert env["ALORA_ADAPTERS_DIR"] == "/models/intrinsics"
    assert env["ALORA_MAX_REQUEST_BYTES"] == "1048576"  # not 1.048576e+06
    (redis_service,) = [s for s in by_kind(manifests, "Service") if s["metadata"]["name"].endswith("-redis")]
    assert redis_service["metadata"]["name"] == "alora-alora-serve-redis"
    (policy,) = by_kind(manifests, "NetworkPolicy")
    server_labels = server_deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= server_labels.items()
    (ingress,) = by_kind(manifests, "Ingress")
    assert "nginx.ingress.kubernetes.io/upstream-hash-by" not in ingress["metadata"]["annotations"]


def test_dashboards_ship_as_sidecar_configmaps() -> None:
    manifests = render(None)
    configmaps = by_kind(manifests, "ConfigMap")
    shipped = {}
    for cm in configmaps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        shipped.update(cm["data"])
    deployed = {
        p.name: p.read_text().rstrip("\n") for p in (ROOT / "deploy/grafana/dashboards").glob("*.json")
    }
    assert shipped == deployed


def test_autoscaler_scales_on_an_exported_metric(ops_client: httpx.Client) -> None:
    (hpa,) = by_kind(render(values_file("values-gpu-redis.yaml")), "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in scrape(ops_client).samples


@pytest.mark.parametrize(
    "values",
    [
        {"unknown": 1},
        {"config": {"port": 9000}},  # set by the chart itself
        {"config": {"Max-Model-Len": 1}},
        {"model": {"source": "pvc", "path": "m"}},  # no claim
        {"model": {"source": "image"}},  # no path
        {"redis": {"mode": "external"}},  # no URL
        {
            "redis": {"mode": "external", "external": {"url": "redis://:secret@host:6379/0"}}
        },  # password in values
        {"redis": {"mode": "external", "external": {"url": "redis+cluster://:secret@h:6379"}}},
        {"redis": {"mode": "external", "external": {"url": "redis+cluster://h:6379/3"}}},  # db 0 only
        {"redis": {"mode": "external", "external": {"url": "redis+sentinel://h:26379"}}},  # no master set
        {"redis": {"mode": "external", "external": {"url": "mongodb://h:27017"}}},
        {"gpu": {"enabled": "yes"}},
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    helm = require("helm_python")
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_config_keys_of_the_examples_are_service_settings() -> None:
    fields = set(Settings.model_fields)
    for name in ("values.yaml", "values-gpu-redis.yaml", "values-redis-cluster.yaml"):
        config = values_file(name).get("config", {})
        assert set(config) <= fields, name


def version() -> str:
    chart = require("yaml").safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={MIN_KUBE}-0"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == project
    return str(project)
