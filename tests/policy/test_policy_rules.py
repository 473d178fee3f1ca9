"""The platform policy, rule by rule: a spec that breaks the rule is refused with the rule and
the field named, a spec that keeps it is accepted; settings are read from the environment."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any

import pytest
from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.builders.trainer import GPU_PRODUCT_LABEL
from finetune_operator.config import ConfigError, load_config
from finetune_operator.policy import GPU_PRODUCT_LABEL as POLICY_GPU_LABEL
from finetune_operator.policy import (
    NamespaceUsage,
    Policy,
    TaintMatch,
    apply_defaults,
    check,
    load_policy,
    quantity,
    refusal_message,
    tolerates,
)
from support.ftj_samples import spec

DEFAULT_IMAGE = "registry.example/ml/trainer:1.0"


def parsed(**overrides: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(spec(**overrides))


def policy(**env: str) -> Policy:
    """A policy as the operator reads it: from FINETUNE_POLICY_* variables."""
    return load_policy({f"FINETUNE_POLICY_{k.upper()}": v for k, v in env.items()})


@dataclass(frozen=True)
class Case:
    rule: str  # the chart value the refusal must name
    policy: Policy
    bad: dict[str, Any]  # spec overrides that break the rule
    good: dict[str, Any]  # spec overrides that keep it
    field: str  # the spec field the refusal must name
    advice: str  # part of what the message tells the user to do
    usage: NamespaceUsage = field(default_factory=NamespaceUsage)


TOLERATE_ALL: dict[str, Any] = {"operator": "Exists"}
CASES = {
    "image-pattern": Case(
        "allowedImages",
        policy(allowed_images='["registry.example/ml/*"]'),
        {"image": "docker.io/evil/miner:latest"},
        {"image": "registry.example/ml/trainer:2.0"},
        "spec.image",
        "use an image that matches one",
    ),
    "image-digest-pattern": Case(
        "allowedImages",
        policy(allowed_images="registry.example/ml/trainer@sha256:*"),
        {"image": "registry.example/ml/trainer:latest"},
        {"image": "registry.example/ml/trainer@sha256:" + "a" * 64},
        "spec.image",
        "registry.example/ml/trainer@sha256:*",
    ),
    "image-pattern-is-anchored": Case(
        "allowedImages",
        policy(allowed_images="registry.example/*"),
        {"image": "registry.example.evil.io/trainer:1"},
        {"image": "registry.example/trainer:1"},
        "spec.image",
        "matches none",
    ),
    "file-uri-base-model": Case(
        "allowFileUris",
        policy(allow_file_uris="false"),
        {"baseModel": {"uri": "file:///models/llama"}},
        {"baseModel": {"uri": "pvc://models/llama"}},
        "spec.baseModel.uri",
        "use pvc://, s3:// or hf://",
    ),
    "file-uri-dataset": Case(
        "allowFileUris",
        policy(allow_file_uris="false"),
        {"dataset": {"train": {"uri": "file:///data/train.jsonl"}}},
        {"dataset": {"train": {"uri": "s3://bucket/train.jsonl"}}},
        "spec.dataset.train.uri",
        "file:// URIs are not allowed",
    ),
    "file-uri-eval": Case(
        "allowFileUris",
        policy(allow_file_uris="false"),
        {"dataset": {"train": {"uri": "pvc://d/t.jsonl"}, "eval": {"uri": "file:///e.jsonl"}}},
        {"dataset": {"train": {"uri": "pvc://d/t.jsonl"}, "eval": {"uri": "pvc://d/e.jsonl"}}},
        "spec.dataset.eval.uri",
        "file:// URIs are not allowed",
    ),
    "file-uri-output": Case(
        "allowFileUris",
        policy(allow_file_uris="false"),
        {"output": {"uri": "file:///tmp/out"}},
        {"output": {"uri": "s3://bucket/out"}},
        "spec.output.uri",
        "use pvc:// or s3://",
    ),
    "gpus-per-job": Case(
        "maxGpusPerJob",
        policy(max_gpus_per_job="4"),
        {"resources": {"gpus": 8}},
        {"resources": {"gpus": 4}},
        "spec.resources.gpus",
        "lower resources.gpus or resources.nodes",
    ),
    "gpus-per-job-counts-nodes": Case(
        "maxGpusPerJob",
        policy(max_gpus_per_job="4"),
        {"resources": {"gpus": 2, "nodes": 3}},
        {"resources": {"gpus": 2, "nodes": 2}},
        "spec.resources.gpus",
        "asks for 6 GPUs",
    ),
    "gpus-per-job-zero-means-cpu-only": Case(
        "maxGpusPerJob",
        policy(max_gpus_per_job="0"),
        {"resources": {"gpus": 1}},
        {"resources": {"gpus": 0}},
        "spec.resources.gpus",
        "more than the 0 a job may use",
    ),
    "gpus-per-namespace": Case(
        "maxGpusPerNamespace",
        policy(max_gpus_per_namespace="8"),
        {"resources": {"gpus": 4}},
        {"resources": {"gpus": 2}},
        "spec.resources.gpus",
        "hold 6 GPUs (alpha 4, beta 2)",
        NamespaceUsage({"beta": 2, "alpha": 4}),
    ),
    "priority-class": Case(
        "allowedPriorityClasses",
        policy(allowed_priority_classes="training-low,training-high"),
        {"resources": {"priorityClassName": "system-node-critical"}},
        {"resources": {"priorityClassName": "training-high"}},
        "spec.resources.priorityClassName",
        "use one of training-low, training-high",
    ),
    "required-node-selector-conflict": Case(
        "requiredNodeSelector",
        policy(required_node_selector='{"pool": "training"}'),
        {"resources": {"nodeSelector": {"pool": "serving"}}},
        {"resources": {"nodeSelector": {"pool": "training", "zone": "a"}}},
        "spec.resources.nodeSelector[pool]",
        "set it to 'training'",
    ),
    "required-node-selector-gpu-product": Case(
        "requiredNodeSelector",
        policy(required_node_selector=f'{{"{GPU_PRODUCT_LABEL}": "NVIDIA-L4"}}'),
        {"resources": {"gpuProduct": "NVIDIA-H100-80GB-HBM3"}},
        {"resources": {"gpuProduct": "NVIDIA-L4"}},
        "spec.resources.gpuProduct",
        "nvidia.com/gpu.product=NVIDIA-L4",
    ),
    "forbidden-node-selector-key": Case(
        "forbiddenNodeSelectorKeys",
        policy(forbidden_node_selector_keys='["kubernetes.io/hostname", "node-role.*"]'),
        {"resources": {"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}}},
        {"resources": {"nodeSelector": {"topology.kubernetes.io/zone": "a"}}},
        "spec.resources.nodeSelector[node-role.kubernetes.io/control-plane]",
        "remove it",
    ),
    "forbidden-node-selector-key-in-affinity": Case(
        "forbiddenNodeSelectorKeys",
        policy(forbidden_node_selector_keys="kubernetes.io/hostname"),
        {
            "resources": {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {
                                            "key": "kubernetes.io/hostname",
                                            "operator": "In",
                                            "values": ["gpu-node-7"],
                                        }
                                    ]
                                }
                            ]
                        }
                    }
                }
            }
        },
        {
            "resources": {
                "affinity": {
                    "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "weight": 1,
                                "preference": {
                                    "matchExpressions": [
                                        {
                                            "key": "topology.kubernetes.io/zone",
                                            "operator": "In",
                                            "values": ["a"],
                                        }
                                    ]
                                },
                            }
                        ]
                    }
                }
            }
        },
        "spec.resources.affinity.nodeAffinity",
        "kubernetes.io/hostname",
    ),
    "forbidden-gpu-product-selection": Case(
        "forbiddenNodeSelectorKeys",
        policy(forbidden_node_selector_keys="nvidia.com/*"),
        {"resources": {"gpuProduct": "NVIDIA-H100-80GB-HBM3"}},
        {"resources": {"gpuProduct": None, "gpuMemoryGiB": 80}},
        "spec.resources.gpuProduct",
        "selecting nodes by nvidia.com/gpu.product",
    ),
    "forbidden-toleration": Case(
        "forbiddenTolerations",
        policy(forbidden_tolerations='[{"key": "dedicated", "value": "serving"}]'),
        {"resources": {"tolerations": [{"key": "dedicated", "operator": "Exists"}]}},
        {"resources": {"tolerations": [{"key": "dedicated", "value": "training"}]}},
        "spec.resources.tolerations[0]",
        "dedicated=serving",
    ),
    "forbidden-toleration-tolerate-everything": Case(
        "forbiddenTolerations",
        policy(forbidden_tolerations='[{"key": "node-role.kubernetes.io/control-plane"}]'),
        {"resources": {"tolerations": [{"key": "spot", "operator": "Exists"}, TOLERATE_ALL]}},
        {"resources": {"tolerations": [{"key": "spot", "operator": "Exists"}]}},
        "spec.resources.tolerations[1]",
        "remove it",
    ),
    "trainer-max-cpu": Case(
        "trainer.maxCpu",
        policy(trainer_max_cpu="16"),
        {"resources": {"cpu": "16500m"}},
        {"resources": {"cpu": "16"}},
        "spec.resources.cpu",
        "request at most 16",
    ),
    "trainer-max-memory": Case(
        "trainer.maxMemory",
        policy(trainer_max_memory="128Gi"),
        {"resources": {"memory": "200G"}},
        {"resources": {"memory": "128Gi"}},
        "spec.resources.memory",
        "request at most 128Gi",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_a_spec_outside_the_rule_is_refused_with_the_rule_named(case: Case) -> None:
    found = check(parsed(**case.bad), case.usage, case.policy, DEFAULT_IMAGE)
    assert [v.rule for v in found] == [f"operator.policy.{case.rule}"], found
    assert found[0].field == case.field
    assert case.advice in found[0].message, found[0].message
    message = refusal_message(parsed(**case.bad), case.usage, case.policy, DEFAULT_IMAGE)
    assert f"operator.policy.{case.rule}" in message and case.field in message


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_a_spec_inside_the_rule_is_accepted(case: Case) -> None:
    assert check(parsed(**case.good), case.usage, case.policy, DEFAULT_IMAGE) == []
    assert refusal_message(parsed(**case.good), case.usage, case.policy, DEFAULT_IMAGE) == ""


def test_the_default_policy_accepts_every_sample_spec() -> None:
    for case in CASES.values():
        assert check(parsed(**case.bad), NamespaceUsage({"x": 99}), Policy(), DEFAULT_IMAGE) == []


def test_a_job_without_an_image_is_checked_with_the_default_image() -> None:
    strict = policy(allowed_images="registry.example/approved/*")
    (found,) = check(parsed(), NamespaceUsage(), strict, DEFAULT_IMAGE)
    assert DEFAULT_IMAGE in found.message and "set spec.image" in found.message


def test_every_violation_is_reported_at_once() -> None:
    strict = policy(max_gpus_per_job="1", allow_file_uris="false", trainer_max_memory="4Gi")
    bad = parsed(resources={"gpus": 2, "memory": "8Gi"}, output={"uri": "file:///out"})
    rules = {v.rule.rsplit(".", 1)[-1] for v in check(bad, NamespaceUsage(), strict, "x")}
    assert rules == {"maxGpusPerJob", "allowFileUris", "maxMemory"}


def test_cpu_jobs_do_not_count_against_the_namespace_gpus() -> None:
    full = policy(max_gpus_per_namespace="4")
    usage = NamespaceUsage({"a": 4})
    assert check(parsed(resources={"gpus": 0}), usage, full, DEFAULT_IMAGE) == []
    assert check(parsed(resources={"gpus": 1}), usage, full, DEFAULT_IMAGE)


@pytest.mark.parametrize(
    ("toleration", "taint", "expected"),
    [
        ({"key": "a", "operator": "Exists"}, {"key": "a"}, True),
        ({"key": "a", "value": "x"}, {"key": "a", "value": "x"}, True),
        ({"key": "a", "value": "x"}, {"key": "a", "value": "y"}, False),
        ({"key": "a", "value": "x"}, {"key": "a"}, True),  # some value of key a
        ({"key": "b", "operator": "Exists"}, {"key": "a"}, False),
        ({"operator": "Exists"}, {"key": "a"}, True),  # tolerates every taint
        ({"key": "a", "operator": "Exists", "effect": "NoExecute"}, {"key": "a"}, True),
        (
            {"key": "a", "operator": "Exists", "effect": "NoExecute"},
            {"key": "a", "effect": "NoSchedule"},
            False,
        ),
        ({"key": "a", "operator": "Exists"}, {"key": "a", "effect": "NoSchedule"}, True),
    ],
)
def test_toleration_matching_follows_core_v1(
    toleration: dict[str, Any], taint: dict[str, Any], expected: bool
) -> None:
    tol = FineTuneJobSpec.model_validate(
        spec(resources={"tolerations": [toleration]})
    ).resources.tolerations[0]
    assert tolerates(tol, TaintMatch.model_validate(taint)) is expected


def test_apply_defaults_adds_what_the_platform_requires() -> None:
    platform = policy(
        required_node_selector='{"pool": "training"}',
        required_tolerations='[{"key": "training", "operator": "Exists", "effect": "NoSchedule"}]',
        default_priority_class="training-low",
    )
    applied = apply_defaults(parsed(resources={"nodeSelector": {"zone": "a"}}), platform)
    assert applied.resources.node_selector == {"zone": "a", "pool": "training"}
    assert [t.to_wire() for t in applied.resources.tolerations] == [
        {"key": "training", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert applied.resources.priority_class_name == "training-low"
    own = apply_defaults(parsed(resources={"priorityClassName": "training-high"}), platform)
    assert own.resources.priority_class_name == "training-high"
    twice = apply_defaults(applied, platform)
    assert len(twice.resources.tolerations) == 1


def test_the_gpu_product_label_is_the_builders() -> None:
    assert POLICY_GPU_LABEL == GPU_PRODUCT_LABEL


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", Decimal("0.5")),
        ("2", Decimal(2)),
        ("1.5", Decimal("1.5")),
        ("16Gi", Decimal(16 * 1024**3)),
        ("200G", Decimal(200 * 1000**3)),
        ("1e3", Decimal(1000)),
        ("128974848", Decimal(128974848)),
    ],
)
def test_quantities_are_read_as_kubernetes_reads_them(text: str, value: Decimal) -> None:
    assert quantity(text) == value


# ---------------------------------------------------------------- reading the settings


def test_every_setting_is_read_from_its_variable() -> None:
    env = {
        "FINETUNE_POLICY_ALLOWED_IMAGES": '["registry.example/*"]',
        "FINETUNE_POLICY_MAX_GPUS_PER_JOB": "8",
        "FINETUNE_POLICY_MAX_GPUS_PER_NAMESPACE": "16",
        "FINETUNE_POLICY_ALLOWED_PRIORITY_CLASSES": '["low", "high"]',
        "FINETUNE_POLICY_DEFAULT_PRIORITY_CLASS": "low",
        "FINETUNE_POLICY_REQUIRED_NODE_SELECTOR": '{"pool": "training"}',
        "FINETUNE_POLICY_FORBIDDEN_NODE_SELECTOR_KEYS": '["kubernetes.io/hostname"]',
        "FINETUNE_POLICY_REQUIRED_TOLERATIONS": '[{"key": "t", "operator": "Exists"}]',
        "FINETUNE_POLICY_FORBIDDEN_TOLERATIONS": '[{"key": "f", "effect": "NoSchedule"}]',
        "FINETUNE_POLICY_TRAINER_DEFAULT_CPU": "2",
        "FINETUNE_POLICY_TRAINER_DEFAULT_MEMORY": "8Gi",
        "FINETUNE_POLICY_TRAINER_MAX_CPU": "32",
        "FINETUNE_POLICY_TRAINER_MAX_MEMORY": "256Gi",
        "FINETUNE_POLICY_INIT_CPU": "250m",
        "FINETUNE_POLICY_INIT_MEMORY": "512Mi",
        "FINETUNE_POLICY_INIT_CPU_LIMIT": "1",
        "FINETUNE_POLICY_INIT_MEMORY_LIMIT": "1Gi",
        "FINETUNE_POLICY_ALLOW_FILE_URIS": "false",
    }
    read = load_policy(env)
    assert {f.metadata["env"] for f in fields(Policy)} == set(env)
    assert all(getattr(read, f.name) != getattr(Policy(), f.name) for f in fields(Policy))
    assert read.allowed_images == ("registry.example/*",)
    assert read.max_gpus_per_namespace == 16
    assert read.required_tolerations[0].key == "t"
    assert read.forbidden_tolerations == (TaintMatch(key="f", effect="NoSchedule"),)
    assert read.allow_file_uris is False
    # Empty values mean "no maximum" for the GPU counts.
    assert load_policy({"FINETUNE_POLICY_MAX_GPUS_PER_JOB": ""}).max_gpus_per_job is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"FINETUNE_POLICY_MAX_GPUS_PER_JOB": "many"}, "FINETUNE_POLICY_MAX_GPUS_PER_JOB"),
        (
            {"FINETUNE_POLICY_MAX_GPUS_PER_NAMESPACE": "-1"},
            "FINETUNE_POLICY_MAX_GPUS_PER_NAMESPACE",
        ),
        ({"FINETUNE_POLICY_TRAINER_MAX_MEMORY": "lots"}, "FINETUNE_POLICY_TRAINER_MAX_MEMORY"),
        ({"FINETUNE_POLICY_ALLOW_FILE_URIS": "yes"}, "FINETUNE_POLICY_ALLOW_FILE_URIS"),
        (
            {"FINETUNE_POLICY_REQUIRED_NODE_SELECTOR": "[]"},
            "FINETUNE_POLICY_REQUIRED_NODE_SELECTOR",
        ),
        (
            {"FINETUNE_POLICY_FORBIDDEN_TOLERATIONS": '[{"effect": "NoSchedule"}]'},
            "FINETUNE_POLICY_FORBIDDEN_TOLERATIONS",
        ),
        (
            {"FINETUNE_POLICY_REQUIRED_TOLERATIONS": '[{"key": "a", "operator": "Maybe"}]'},
            "FINETUNE_POLICY_REQUIRED_TOLERATIONS",
        ),
        ({"FINETUNE_POLICY_TRAINER_DEFAULT_MEMORY": ""}, "FINETUNE_POLICY_TRAINER_DEFAULT_MEMORY"),
        (
            {
                "FINETUNE_POLICY_TRAINER_DEFAULT_CPU": "8",
                "FINETUNE_POLICY_TRAINER_MAX_CPU": "4",
            },
            "FINETUNE_POLICY_TRAINER_MAX_CPU",
        ),
        (
            {
                "FINETUNE_POLICY_ALLOWED_PRIORITY_CLASSES": "low",
                "FINETUNE_POLICY_DEFAULT_PRIORITY_CLASS": "high",
            },
            "FINETUNE_POLICY_DEFAULT_PRIORITY_CLASS",
        ),
        (
            {"FINETUNE_POLICY_ALLOWED_IMAGES": "registry.example/*"},  # the default image is not
            "FINETUNE_TRAINER_IMAGE",
        ),
    ],
)
def test_bad_settings_stop_the_operator_naming_the_variable(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(env)


def test_the_default_image_may_be_one_the_policy_allows() -> None:
    config = load_config(
        {
            "FINETUNE_TRAINER_IMAGE": "registry.example/trainer:1",
            "FINETUNE_POLICY_ALLOWED_IMAGES": "registry.example/*",
        }
    )
    assert config.policy.allowed_images == ("registry.example/*",)
