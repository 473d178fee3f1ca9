"""The Helm chart: renders offline with default and non-default values, every object passes
strict Kubernetes schema validation, the values schema rejects bad input, CRDs never drift."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from support.chartlib import (
    CHART_DIR,
    CRDS_DIR,
    NAMESPACE,
    RELEASE,
    by_kind,
    load_script,
    manifests,
    one,
    render,
    repo_crds,
)

# Renders the chart with many sets of values (helm).
pytestmark = pytest.mark.slow

kubernetes_validate = pytest.importorskip("kubernetes_validate")
helm = pytest.importorskip("helm_python")

# Oldest supported (Chart.yaml kubeVersion) and newest schema the validator ships.
KUBE_VERSIONS = ["1.29", "1.37"]

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "dashboards": {"enabled": True, "namespace": "monitoring"},
        "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
    },
    "pdb": {"podDisruptionBudget": {"enabled": True, "maxUnavailable": 0}},
    "everything-on": {
        "watchNamespaces": ["team-a"],
        "image": {"digest": "sha256:" + "ab" * 32},
        "operator": {
            "trainer": {
                "image": {
                    "repository": "registry.example/trainer",
                    "digest": "sha256:" + "cd" * 32,
                }
            },
            "verbose": True,
            "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
            "gpuPrices": {
                "currency": "EUR",
                "default": 1.5,
                "products": {"NVIDIA-H100-80GB-HBM3": 4.25},
            },
            "gpuMemoryOverrides": {"NVIDIA-B200": 179},
        },
        "metrics": {"serviceMonitor": {"enabled": True}},
        "dashboards": {"enabled": True},
        "prometheusRule": {
            "enabled": True,
            "scrapeJob": "finetune-operator",
            "jobFailures": {"count": 5, "window": "6h"},
            "noRecentSuccess": {"hours": 0, "namespaces": "team-a"},
        },
        "argocd": {"healthChecks": {"enabled": True}},
        "podDisruptionBudget": {"enabled": True},
        "crds": {"annotations": {"argocd.argoproj.io/sync-wave": "-1"}},
        "imagePullSecrets": [{"name": "regcred"}],
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "priorityClassName": "system-cluster-critical",
    },
    "policy": {
        "operator": {
            "policy": {
                "allowedImages": ["ghcr.io/finetune-dev/*"],
                "maxGpusPerJob": 8,
                "maxGpusPerNamespace": 16,
                "allowedPriorityClasses": ["training"],
                "defaultPriorityClass": "training",
                "requiredNodeSelector": {"pool": "training"},
                "forbiddenNodeSelectorKeys": ["kubernetes.io/hostname"],
                "requiredTolerations": [{"key": "pool", "operator": "Exists"}],
                "forbiddenTolerations": [{"key": "dedicated", "value": "serving"}],
                "trainer": {"defaultCpu": "2", "defaultMemory": "16Gi", "maxMemory": "256Gi"},
                "initContainers": {"memoryLimit": "2Gi"},
                "allowFileUris": False,
            }
        }
    },
    "no-metrics-no-crds-no-aggregation": {
        "metrics": {"enabled": False},
        "crds": {"install": False},
        "rbac": {"aggregateToDefaultRoles": False},
    },
}

# Kinds from other projects' CRDs: the validator has no schema for them; checked by hand below.
FOREIGN_KINDS = {"ServiceMonitor", "PrometheusRule"}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, manifests(VALUE_SETS[request.param])


def test_lint_is_clean_for_every_value_set() -> None:
    for name, values in VALUE_SETS.items():
        report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE)
        errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not errors, f"{name}: {errors}"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_passes_strict_validation(
    rendered: tuple[str, list[dict[str, Any]]], kube_version: str
) -> None:
    name, objects = rendered
    assert objects, name
    for obj in objects:
        if obj["kind"] in FOREIGN_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {error.message}")


def test_strict_validation_catches_a_typo() -> None:
    """The validator really is strict: a misspelt field in a rendered object fails."""
    deployment = copy.deepcopy(one(manifests(), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


def test_namespaced_objects_land_in_the_release_namespace(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    name, objects = rendered
    for obj in objects:
        if obj["kind"] in {"Deployment", "ServiceAccount", "Service", "ServiceMonitor"}:
            assert obj["metadata"]["namespace"] == NAMESPACE, (name, obj["kind"])


# ---------------------------------------------------------------- values schema

BAD_VALUES = [
    ({"unknownKey": True}, "additional properties"),
    ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
    ({"watchNamespaces": ["a", "a"]}, "watchNamespaces"),
    ({"operator": {"verbose": "yes"}}, "verbose"),
    ({"operator": {"logLevel": "DEBUG"}}, "logLevel"),
    ({"operator": {"gpuPrices": {"default": -1}}}, "default"),
    ({"operator": {"gpuPrices": {"currency": "dollars"}}}, "currency"),
    ({"operator": {"gpuPrices": {"products": {"H100": "cheap"}}}}, "H100"),
    ({"operator": {"memoryHeadroom": 0.95}}, "memoryHeadroom"),
    ({"operator": {"progressPollSeconds": 0}}, "progressPollSeconds"),
    ({"operator": {"progressPollsPerSecond": 0}}, "progressPollsPerSecond"),
    ({"operator": {"unobservedReconcileSeconds": 0}}, "unobservedReconcileSeconds"),
    ({"operator": {"gpuMemoryOverrides": {"X": 0}}}, "gpuMemoryOverrides"),
    ({"operator": {"trainer": {"runAsUser": 0}}}, "runAsUser"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"image": {"digest": "latest"}}, "digest"),
    ({"image": {"tag": "has space"}}, "tag"),
    ({"metrics": {"port": 80}}, "port"),
    ({"metrics": {"port": 70000}}, "port"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "interval"),
    ({"healthPort": "8081"}, "healthPort"),
    ({"podDisruptionBudget": {"maxUnavailable": 2}}, "maxUnavailable"),
    ({"crds": {"install": "yes"}}, "install"),
    ({"resources": {"requests": {"gpu": 1}}}, "resources"),
    ({"resources": {"limits": {"memory": "lots"}}}, "memory"),
    ({"serviceAccount": {"name": "Not_A_Name"}}, "name"),
    ({"rbac": {"create": True, "extra": 1}}, "rbac"),
    ({"operator": {"extraEnv": [{"value": "no name"}]}}, "extraEnv"),
]


@pytest.mark.parametrize(("values", "where"), BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_schema_rejects_bad_values(values: dict[str, Any], where: str) -> None:
    with helm.Chart.load(CHART_DIR) as chart, pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(chart.merge_values(values))
    assert where in str(caught.value)
    # Rendering (what `helm install` does) refuses them too.
    with pytest.raises(helm.HelmError):
        render(values)


def test_schema_accepts_every_value_set() -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        for values in VALUE_SETS.values():
            chart.validate_schema(chart.merge_values(values))


def test_schema_closes_every_object() -> None:
    """Every object in the schema either lists its keys strictly or is a free-form map on purpose."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    free_form = {"tolerations.items", "affinity", "operator.extraEnv.items"}

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" and "properties" in node and path not in free_form:
            assert node.get("additionalProperties") is False, f"{path or '<root>'} is not closed"
            for key, child in node["properties"].items():
                walk(child, f"{path}.{key}" if path else key)
        if node.get("type") == "array" and isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}.items")

    walk(schema, "")
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert set(defaults) == set(schema["properties"]), "values.yaml and the schema disagree"


# ---------------------------------------------------------------- CRDs


def test_chart_crd_copies_are_byte_identical_to_the_generated_crds() -> None:
    generated = sorted(p.name for p in CRDS_DIR.glob("*.yaml"))
    copies = sorted(p.name for p in (CHART_DIR / "files" / "crds").glob("*.yaml"))
    assert (
        generated
        == copies
        == [
            "adapterdeployments.yaml",
            "finetunejobs.yaml",
            "finetuneschedules.yaml",
        ]
    )
    for name in generated:
        assert (CHART_DIR / "files" / "crds" / name).read_bytes() == (
            CRDS_DIR / name
        ).read_bytes(), (
            f"charts/finetune-operator/files/crds/{name} drifted: run python scripts/render_deploy.py"
        )


def test_rendered_crds_equal_the_generated_ones_plus_labels() -> None:
    objects = manifests()
    rendered = {c["metadata"]["name"]: c for c in by_kind(objects, "CustomResourceDefinition")}
    assert set(rendered) == set(repo_crds())
    for name, generated in repo_crds().items():
        crd = copy.deepcopy(rendered[name])
        annotations = crd["metadata"].pop("annotations")
        labels = crd["metadata"].pop("labels")
        assert annotations["helm.sh/resource-policy"] == "keep"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        expected = copy.deepcopy(generated)
        expected["metadata"].pop("annotations", None)
        expected["metadata"].pop("labels", None)
        assert crd == expected, f"{name}: the rendered CRD differs from crds/"


def test_crd_toggles() -> None:
    assert not by_kind(manifests({"crds": {"install": False}}), "CustomResourceDefinition")
    unkept = by_kind(manifests({"crds": {"keep": False}}), "CustomResourceDefinition")
    assert len(unkept) == 3
    assert all("helm.sh/resource-policy" not in c["metadata"]["annotations"] for c in unkept)
    waved = by_kind(
        manifests({"crds": {"annotations": {"argocd.argoproj.io/sync-wave": "-1"}}}),
        "CustomResourceDefinition",
    )
    assert all(c["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "-1" for c in waved)


# ---------------------------------------------------------------- the operator Deployment


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_deployment_runs_one_hardened_instance() -> None:
    objects = manifests()
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(objects)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container(objects)["resources"]["limits"]["memory"]


def test_liveness_probe_hits_the_kopf_liveness_endpoint() -> None:
    c = container(manifests({"healthPort": 8555}))
    liveness = [a for a in c["args"] if a.startswith("--liveness=")]
    assert liveness == ["--liveness=http://0.0.0.0:8555/healthz"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["health"] == 8555
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def env_of(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from>") for e in container(objects)["env"]}


def test_watch_scope_follows_values() -> None:
    assert env_of(manifests())["FINETUNE_WATCH_NAMESPACES"] == ""
    namespaced = env_of(manifests(VALUE_SETS["namespaced"]))
    assert namespaced["FINETUNE_WATCH_NAMESPACES"] == "team-a,team-b"


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_operator_accepts_the_environment_the_chart_sets(values: str) -> None:
    """Every FINETUNE_* variable the chart sets is one the operator reads, with a usable value."""
    from finetune_operator.config import describe as describe_config
    from finetune_operator.config import load_config

    env = env_of(manifests(VALUE_SETS[values]))
    chart_vars = {k: v for k, v in env.items() if k.startswith("FINETUNE_") and v != "<from>"}
    known = {item["env"] for item in describe_config()} | serving_env_vars()
    assert set(chart_vars) <= known, f"the operator never reads {set(chart_vars) - known}"
    config = load_config(chart_vars)
    assert ",".join(config.watch_namespaces) == chart_vars["FINETUNE_WATCH_NAMESPACES"]
    assert config.price_table_configmap == f"{RELEASE}-finetune-operator-gpu-prices"


def serving_env_vars() -> set[str]:
    """Environment variables the AdapterDeployment controller reads (serving_config.py)."""
    import re
    from pathlib import Path

    import finetune_operator

    source = Path(finetune_operator.__file__).parent / "serving_config.py"
    if not source.exists():
        return set()
    return set(re.findall(r'"(FINETUNE_[A-Z0-9_]+)"', source.read_text()))


def test_gpu_price_table_is_rendered_and_named_to_the_operator() -> None:
    objects = manifests(VALUE_SETS["everything-on"])
    name = env_of(objects)["FINETUNE_PRICE_TABLE_CONFIGMAP"]
    prices = one(objects, "ConfigMap", name)
    assert prices["metadata"]["namespace"] == NAMESPACE
    assert prices["data"] == {
        "currency": "EUR",
        "default": "1.5",
        "NVIDIA-H100-80GB-HBM3": "4.25",
    }
    assert json.loads(env_of(objects)["FINETUNE_GPU_MEMORY_OVERRIDES"]) == {"NVIDIA-B200": 179}


def test_images_use_digest_when_given() -> None:
    objects = manifests(VALUE_SETS["everything-on"])
    c = container(objects)
    assert c["image"] == "ghcr.io/finetune-dev/finetune-operator@sha256:" + "ab" * 32
    env = env_of(objects)
    assert env["FINETUNE_TRAINER_IMAGE"] == "registry.example/trainer@sha256:" + "cd" * 32
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    default = container(manifests())
    assert default["image"].endswith(
        ":" + yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["appVersion"]
    )


def test_metrics_service_and_servicemonitor_select_the_operator() -> None:
    objects = manifests(VALUE_SETS["monitoring"])
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service")
    assert all(pod_labels[k] == v for k, v in service["spec"]["selector"].items())
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert all(
        service["metadata"]["labels"][k] == v
        for k, v in monitor["spec"]["selector"]["matchLabels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert not by_kind(manifests({"metrics": {"enabled": False}}), "Service")


def test_pdb_selects_the_operator_pod() -> None:
    objects = manifests(VALUE_SETS["pdb"])
    pdb = one(objects, "PodDisruptionBudget")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["maxUnavailable"] == 0
    assert all(pod_labels[k] == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
    assert not by_kind(manifests(), "PodDisruptionBudget")


def test_argocd_health_configmap_ships_the_tested_scripts() -> None:
    objects = manifests({"argocd": {"healthChecks": {"enabled": True}}})
    data = one(objects, "ConfigMap", f"{RELEASE}-finetune-operator-argocd-health")["data"]
    health = CHART_DIR / "files" / "health"
    assert (
        data["resource.customizations.health.finetune.dev_FineTuneJob"]
        == (health / "finetunejob.lua").read_text()
    )
    assert (
        data["resource.customizations.health.finetune.dev_AdapterDeployment"]
        == (health / "adapterdeployment.lua").read_text()
    )


def test_dashboard_configmap_is_the_generated_dashboard() -> None:
    dashboard = load_script("build_dashboard")
    shipped = (CHART_DIR / "files" / "dashboards" / "finetune-operator.json").read_text()
    assert shipped == dashboard.render(), "run python scripts/build_dashboard.py"
    objects = manifests(VALUE_SETS["monitoring"])
    cm = one(objects, "ConfigMap", f"{RELEASE}-finetune-operator-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["finetune-operator.json"]) == json.loads(shipped)


def test_notes_name_the_watch_scope() -> None:
    assert "every namespace" in render()[f"{CHART_DIR.name}/templates/NOTES.txt"]
    notes = render(VALUE_SETS["namespaced"])[f"{CHART_DIR.name}/templates/NOTES.txt"]
    assert "team-a, team-b" in notes


# ---------------------------------------------------------------- plain-manifest install


def test_deploy_manifest_is_up_to_date() -> None:
    script = load_script("render_deploy")
    assert script.out_of_date() == [], "run python scripts/render_deploy.py"


def test_deploy_manifest_objects_are_valid() -> None:
    text = (CHART_DIR.parents[1] / "deploy" / "finetune-operator.yaml").read_text()
    objects = [d for d in yaml.safe_load_all(text) if d]
    kinds = [o["kind"] for o in objects]
    assert kinds[0] == "Namespace"
    assert "CustomResourceDefinition" not in kinds, "CRDs are applied from crds/"
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= set(kinds)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)


def test_vllm_image_patterns_reach_the_operator() -> None:
    from finetune_operator.config import OperatorConfig, load_config

    default = env_of(manifests())["FINETUNE_VLLM_IMAGE_PATTERNS"]
    assert load_config({"FINETUNE_VLLM_IMAGE_PATTERNS": default}).vllm_image_patterns == (
        OperatorConfig().vllm_image_patterns
    )
    own = ["registry.example.com/serving/vllm*", "vllm/vllm-openai*"]
    values = {"operator": {"serving": {"vllmImagePatterns": own}}}
    rendered = env_of(manifests(values))["FINETUNE_VLLM_IMAGE_PATTERNS"]
    assert load_config({"FINETUNE_VLLM_IMAGE_PATTERNS": rendered}).vllm_image_patterns == tuple(own)
