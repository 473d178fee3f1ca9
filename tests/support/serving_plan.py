"""What the AdapterDeployment planner observes, built by hand: a target Deployment, its pods
and an analysis window."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from finetune_operator.api.adapterdeployment import AdapterDeploymentSpec, AdapterDeploymentStatus
from finetune_operator.builders import serving as sb
from finetune_operator.planners import adapterdeployment as rules
from finetune_operator.planners.adapterdeployment_plan import (
    AnalysisWindow,
    Observed,
    PodInfo,
)

RUNTIME_ENV = [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "1"}]


def deployment(
    name: str = "llm",
    digest: str | None = None,
    *,
    generation: int = 1,
    observed: int | None = None,
    ready: int = 2,
    updated: int = 2,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    annotations = {sb.digest_annotation("support"): digest} if digest else {}
    return {
        "metadata": {"name": name, "generation": generation},
        "spec": {
            "replicas": 2,
            "template": {
                "metadata": {"annotations": annotations},
                "spec": {
                    "containers": [
                        {
                            "name": "vllm",
                            "command": ["vllm", "serve"],
                            "args": ["org/base", "--enable-lora"],
                            "env": RUNTIME_ENV,
                            "volumeMounts": [{"name": "a", "mountPath": "/adapters"}],
                        }
                    ],
                    "volumes": [{"name": "a", "persistentVolumeClaim": {"claimName": "adapters"}}],
                },
            },
        },
        "status": {
            "observedGeneration": generation if observed is None else observed,
            "replicas": updated,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "conditions": conditions or [],
        },
    }


def pods(digest: str | None, n: int = 2, prefix: str = "llm-abc") -> tuple[PodInfo, ...]:
    annotations = {sb.digest_annotation("support"): digest} if digest else {}
    return tuple(
        PodInfo(f"{prefix}-{i}", f"uid-{i}", True, f"http://10.0.0.{i}:8000", annotations)
        for i in range(n)
    )


def observed(
    s: AdapterDeploymentSpec, status: dict[str, Any] | None = None, **over: Any
) -> Observed:
    base = Observed(
        name="support",
        namespace="team",
        uid="uid",
        generation=over.pop("generation", 1),
        spec=s,
        status=AdapterDeploymentStatus.model_validate(status or {}),
        body={"metadata": {"name": "support", "namespace": "team", "uid": "uid"}},
        target=deployment(),
        pods=pods(None),
        fetch_image="trainer:1",
    )
    return replace(base, **over)


def healthy_window() -> AnalysisWindow:
    fast = {0.3: 10.0, float("inf"): 10.0}
    sample = rules.MetricsSample(requests=10, latency_buckets=fast, latency_count=10)
    return AnalysisWindow((sample,), (rules.SmokeResult(True, 50.0), rules.SmokeResult(True, 60.0)))
