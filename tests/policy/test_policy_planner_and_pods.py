"""Where the policy acts: the planner refuses a job outside it before any child exists, and the
trainer pods it builds carry what the platform requires, with requests on every container."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import kubernetes_validate
import pytest
from finetune_operator.api.finetunejob import FineTuneJobSpec, FineTuneJobStatus
from finetune_operator.builders import distributed, owner_reference, trainer_job
from finetune_operator.builders.trainer import TRAINER_CONTAINER
from finetune_operator.config import OperatorConfig, load_config
from finetune_operator.planners.finetunejob import Observed, Plan, plan
from finetune_operator.policy import NamespaceUsage, Policy, load_policy
from support.ftj_samples import spec

NOW = datetime(2026, 1, 1, 1, 0, 10, tzinfo=UTC)
OWNER = owner_reference("FineTuneJob", "bot", "uid-1")
STRICT_ENV = {
    "FINETUNE_TRAINER_IMAGE": "registry.example/ml/trainer:1.0",
    "FINETUNE_POLICY_ALLOWED_IMAGES": "registry.example/ml/*",
    "FINETUNE_POLICY_MAX_GPUS_PER_NAMESPACE": "4",
    "FINETUNE_POLICY_REQUIRED_NODE_SELECTOR": '{"pool": "training"}',
    "FINETUNE_POLICY_REQUIRED_TOLERATIONS": (
        '[{"key": "pool", "operator": "Equal", "value": "training", "effect": "NoSchedule"}]'
    ),
    "FINETUNE_POLICY_DEFAULT_PRIORITY_CLASS": "training-low",
    "FINETUNE_POLICY_TRAINER_DEFAULT_CPU": "4",
    "FINETUNE_POLICY_TRAINER_DEFAULT_MEMORY": "32Gi",
    "FINETUNE_POLICY_INIT_CPU": "250m",
    "FINETUNE_POLICY_INIT_MEMORY": "512Mi",
    "FINETUNE_POLICY_INIT_MEMORY_LIMIT": "2Gi",
}
STRICT = load_config(STRICT_ENV)


def observe(body_spec: dict[str, Any], **kwargs: Any) -> Observed:
    fields: dict[str, Any] = {
        "name": "bot",
        "namespace": "team-a",
        "uid": "u1",
        "generation": 1,
        "status": FineTuneJobStatus(),
        "now": NOW,
    }
    fields.update(kwargs)
    return Observed(spec=body_spec, **fields)


def cond(p: Plan, type_: str) -> dict[str, Any]:
    return next(c for c in p.status.conditions if c.type == type_)


# ---------------------------------------------------------------- the planner


def test_a_job_outside_the_policy_is_refused_before_any_child() -> None:
    p = plan(observe(spec(image="docker.io/someone/trainer:latest")), STRICT)
    assert p.actions == []
    assert p.outcome == "permanent"  # no retry loop: only a spec or policy change helps
    validated = cond(p, "Validated")
    assert (validated.status, validated.reason) == ("False", "PolicyViolation")
    assert "operator.policy.allowedImages" in validated.message
    assert "spec.image" in validated.message
    assert (cond(p, "Failed").status, cond(p, "Failed").reason) == ("True", "PolicyViolation")
    assert p.status.phase == "Failed"
    assert [e.reason for e in p.events] == ["PolicyViolation"]
    assert p.status.trainer_job is None


def test_the_namespace_gpus_count_the_other_unfinished_runs() -> None:
    usage = NamespaceUsage({"other": 3})
    p = plan(observe(spec(resources={"gpus": 2}), namespace_usage=usage), STRICT)
    message = cond(p, "Validated").message
    assert "operator.policy.maxGpusPerNamespace" in message and "other 3" in message
    assert p.actions == []
    fits = plan(observe(spec(resources={"gpus": 1}), namespace_usage=usage), STRICT)
    assert [a.kind for a in fits.actions] == ["ConfigMap", "Job"]


def test_a_refused_job_is_checked_again_under_a_new_policy() -> None:
    """Nothing was created, so the next reconcile (the operator restarts with the new
    policy) plans a first run again: the refusal is not sticky."""
    refused = plan(observe(spec(image="docker.io/someone/trainer:latest")), STRICT)
    relaxed = dataclasses.replace(
        STRICT, policy=dataclasses.replace(STRICT.policy, allowed_images=())
    )
    p = plan(
        observe(spec(image="docker.io/someone/trainer:latest"), status=refused.status), relaxed
    )
    assert [a.kind for a in p.actions] == ["ConfigMap", "Job"]
    assert cond(p, "Validated").reason == "Valid"
    assert "Failed" not in {c.type for c in p.status.conditions}


def test_started_pods_carry_what_the_platform_requires() -> None:
    p = plan(observe(spec(resources={"gpus": 1, "nodeSelector": {"zone": "a"}})), STRICT)
    job = next(a.body for a in p.actions if a.kind == "Job")
    assert job is not None
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["pool"] == "training" and pod["nodeSelector"]["zone"] == "a"
    assert {"key": "pool", "operator": "Equal", "value": "training", "effect": "NoSchedule"} in (
        pod["tolerations"]
    )
    assert pod["priorityClassName"] == "training-low"
    trainer = next(c for c in pod["containers"] if c["name"] == TRAINER_CONTAINER)
    assert trainer["resources"]["requests"] == {"nvidia.com/gpu": 1, "cpu": "4", "memory": "32Gi"}
    assert trainer["image"] == "registry.example/ml/trainer:1.0"


def test_the_policy_does_not_change_the_runs_identity() -> None:
    """The spec hash that decides whether a run must restart is the tenant's spec alone."""
    plain = plan(observe(spec()), OperatorConfig())
    strict = plan(observe(spec()), STRICT)
    annotations = [
        next(a.body for a in q.actions if a.kind == "Job")["metadata"]["annotations"]  # type: ignore[index]
        for q in (plain, strict)
    ]
    assert annotations[0] == annotations[1]


# ---------------------------------------------------------------- every container has requests

SHAPES = {
    "gpu-pvc-inputs": {},
    "cpu-only": {"resources": {"gpus": 0}},
    "cpu-only-fetching": {
        "resources": {"gpus": 0},
        "baseModel": {"uri": "hf://org/model@main"},
        "dataset": {"train": {"uri": "s3://bucket/train.jsonl"}},
    },
    "gpu-fetching": {
        "baseModel": {"uri": "hf://org/model@main", "credentialsSecretRef": {"name": "hf"}},
        "dataset": {
            "train": {"uri": "hf://datasets/org/data"},
            "eval": {"uri": "s3://bucket/eval.jsonl"},
        },
    },
    "multi-gpu": {"resources": {"gpus": 4}},
    "multi-node": {"resources": {"gpus": 2, "nodes": 3}},
}


def build(overrides: dict[str, Any], config: OperatorConfig) -> dict[str, Any]:
    parsed = FineTuneJobSpec.model_validate(spec(**overrides))
    job = trainer_job("bot", "team-a", 1, parsed, OWNER, config, "h")
    distributed.apply(job, parsed, TRAINER_CONTAINER)
    return job


def containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    pod = job["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.mark.parametrize("config", [OperatorConfig(), STRICT], ids=["default-policy", "strict"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_container_has_cpu_and_memory_requests(shape: str, config: OperatorConfig) -> None:
    job = build(SHAPES[shape], config)
    kubernetes_validate.validate(job, "1.33.0", strict=True)
    for c in containers(job):
        requests = c.get("resources", {}).get("requests", {})
        assert requests.get("cpu") and requests.get("memory"), (
            shape,
            c["name"],
            c.get("resources"),
        )
    if "fetching" in shape:
        assert any(c["name"].startswith("fetch-") for c in containers(job))


def test_init_containers_take_the_platforms_requests_and_limits() -> None:
    job = build(SHAPES["gpu-fetching"], STRICT)
    fetches = [c for c in containers(job) if c["name"].startswith("fetch-")]
    assert len(fetches) == 3
    for c in fetches:
        assert c["resources"] == {
            "requests": {"cpu": "250m", "memory": "512Mi"},
            "limits": {"memory": "2Gi"},
        }


def test_a_jobs_own_memory_is_request_and_limit_a_default_only_a_request() -> None:
    own = build({"resources": {"gpus": 0, "cpu": "8", "memory": "64Gi"}}, STRICT)
    trainer = containers(own)[-1]["resources"]
    assert trainer == {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "64Gi"}}
    default = build({"resources": {"gpus": 0}}, STRICT)
    assert containers(default)[-1]["resources"] == {
        "requests": {"cpu": "4", "memory": "32Gi"},
        "limits": {},
    }


def test_the_built_in_defaults_are_requests() -> None:
    """Without any policy setting, a CPU job's pod is Burstable, not BestEffort."""
    assert Policy() == load_policy({})
    job = build({"resources": {"gpus": 0}}, OperatorConfig())
    assert containers(job)[-1]["resources"]["requests"] == {"cpu": "1", "memory": "4Gi"}
