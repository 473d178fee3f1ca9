"""The chart's platform policy values: rendered into the operator's environment, read back
into the same policy by the operator, bad values refused by the schema, every value documented."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.config import load_config
from finetune_operator.policy import Policy, TaintMatch
from support.chartlib import CHART_DIR, manifests, one, render

# Renders the chart with many sets of values (helm).
pytestmark = pytest.mark.slow

helm = pytest.importorskip("helm_python")

DOCS = Path(__file__).resolve().parents[2] / "docs" / "platform-teams.md"

EVERY_VALUE: dict[str, Any] = {
    "allowedImages": ["ghcr.io/finetune-dev/*", "registry.example/ml/trainer@sha256:*"],
    "maxGpusPerJob": 8,
    "maxGpusPerNamespace": 0,
    "allowedPriorityClasses": ["training-low", "training-high"],
    "defaultPriorityClass": "training-low",
    "requiredNodeSelector": {"pool": "training", "nvidia.com/gpu.present": "true"},
    "forbiddenNodeSelectorKeys": ["kubernetes.io/hostname", "node-role.kubernetes.io/*"],
    "requiredTolerations": [
        {"key": "pool", "operator": "Equal", "value": "training", "effect": "NoSchedule"}
    ],
    "forbiddenTolerations": [{"key": "dedicated", "value": "serving"}, {"key": "spot"}],
    "trainer": {"defaultCpu": "4", "defaultMemory": "32Gi", "maxCpu": "64", "maxMemory": "512Gi"},
    "initContainers": {"cpu": "250m", "memory": "512Mi", "cpuLimit": "2", "memoryLimit": "2Gi"},
    "allowFileUris": False,
}


def operator_policy(values: dict[str, Any]) -> Policy:
    """The policy the operator reads from the environment the chart renders."""
    deployment = one(manifests(values), "Deployment")
    env = {
        e["name"]: e["value"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if "value" in e
    }
    return load_config(env).policy


def test_chart_defaults_are_the_operators_defaults() -> None:
    assert operator_policy({}) == Policy()


def test_every_policy_value_reaches_the_operator() -> None:
    policy = operator_policy({"operator": {"policy": EVERY_VALUE}})
    assert all(getattr(policy, f.name) != getattr(Policy(), f.name) for f in fields(Policy))
    assert policy.allowed_images == tuple(EVERY_VALUE["allowedImages"])
    assert policy.max_gpus_per_job == 8 and policy.max_gpus_per_namespace == 0
    assert policy.allowed_priority_classes == ("training-low", "training-high")
    assert policy.default_priority_class == "training-low"
    assert policy.required_node_selector == EVERY_VALUE["requiredNodeSelector"]
    assert policy.forbidden_node_selector_keys == tuple(EVERY_VALUE["forbiddenNodeSelectorKeys"])
    assert [t.to_wire() for t in policy.required_tolerations] == EVERY_VALUE["requiredTolerations"]
    assert policy.forbidden_tolerations == (
        TaintMatch(key="dedicated", value="serving"),
        TaintMatch(key="spot"),
    )
    assert (policy.trainer_default_cpu, policy.trainer_default_memory) == ("4", "32Gi")
    assert (policy.trainer_max_cpu, policy.trainer_max_memory) == ("64", "512Gi")
    assert (policy.init_cpu, policy.init_memory) == ("250m", "512Mi")
    assert (policy.init_cpu_limit, policy.init_memory_limit) == ("2", "2Gi")
    assert policy.allow_file_uris is False


def test_null_maxima_mean_no_maximum() -> None:
    values = {"operator": {"policy": {"maxGpusPerJob": 2}}}
    assert operator_policy(values).max_gpus_per_job == 2
    assert operator_policy(values).max_gpus_per_namespace is None


BAD_POLICY = [
    ({"allowedImages": ["has space"]}, "allowedImages"),
    ({"allowedImages": "registry.example/*"}, "allowedImages"),
    ({"maxGpusPerJob": -1}, "maxGpusPerJob"),
    ({"maxGpusPerNamespace": "4"}, "maxGpusPerNamespace"),
    ({"allowedPriorityClasses": ["Not_A_Name"]}, "allowedPriorityClasses"),
    ({"defaultPriorityClass": "UPPER"}, "defaultPriorityClass"),
    ({"requiredNodeSelector": {"pool": 1}}, "requiredNodeSelector"),
    ({"requiredNodeSelector": {"bad key!": "x"}}, "bad key!"),
    ({"requiredTolerations": [{"key": "a", "operator": "Maybe"}]}, "operator"),
    ({"requiredTolerations": [{"key": "a", "tolerance": 1}]}, "requiredTolerations"),
    ({"forbiddenTolerations": [{"effect": "NoSchedule"}]}, "key"),
    ({"forbiddenTolerations": [{"key": "a", "effect": "Sometimes"}]}, "effect"),
    ({"trainer": {"defaultCpu": ""}}, "defaultCpu"),
    ({"trainer": {"maxMemory": "lots"}}, "maxMemory"),
    ({"trainer": {"maxGpus": 2}}, "trainer"),
    ({"initContainers": {"memory": "1 Gi"}}, "memory"),
    ({"allowFileUris": "no"}, "allowFileUris"),
    ({"allowHostPath": True}, "policy"),
]


@pytest.mark.parametrize(("policy", "where"), BAD_POLICY, ids=[str(p) for p, _ in BAD_POLICY])
def test_schema_refuses_bad_policy_values(policy: dict[str, Any], where: str) -> None:
    values = {"operator": {"policy": policy}}
    with helm.Chart.load(CHART_DIR) as chart, pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(chart.merge_values(values))
    assert where in str(caught.value)
    with pytest.raises(helm.HelmError):
        render(values)


def test_every_policy_value_is_documented_for_platform_teams() -> None:
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["operator"]["policy"]
    text = DOCS.read_text()
    keys = [
        f"{key}.{sub}" if isinstance(value, dict) and value else key
        for key, value in defaults.items()
        for sub in (value if isinstance(value, dict) and value else [None])
    ]
    for key in keys:
        assert f"`{key}`" in text, f"docs/platform-teams.md does not explain policy value {key}"
    assert set(defaults) == set(EVERY_VALUE)
