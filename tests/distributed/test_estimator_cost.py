"""Memory estimate and cost accounting with several GPUs and nodes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from finetune_operator.api.finetunejob import FineTuneJobStatus
from finetune_operator.builders.trainer import TRAINER_CONTAINER
from finetune_operator.config import OperatorConfig
from finetune_operator.domain import estimator as est
from finetune_operator.planners.finetunejob import Observed, PriceTable, check_fit, plan
from specs import spec, spec_dict

LLAMA_8B = est.MODEL_FAMILIES["llama-3-8b"]


@pytest.mark.parametrize(
    ("resources", "world"),
    [
        ({"gpus": 1}, 1),
        ({"gpus": 4}, 4),
        ({"gpus": 8, "nodes": 2}, 16),
        ({"gpus": 1, "nodes": 3}, 3),
    ],
)
def test_setup_counts_every_process_of_the_run(resources: dict[str, Any], world: int) -> None:
    assert est.TrainingSetup.from_spec(spec(**resources)).gpus == world


def test_per_gpu_memory_under_ddp_is_the_single_gpu_estimate_plus_gradient_buckets() -> None:
    one = est.estimate_memory(LLAMA_8B, est.TrainingSetup.from_spec(spec(gpus=1)))
    for resources in ({"gpus": 2}, {"gpus": 8, "nodes": 4}):
        many = est.estimate_memory(LLAMA_8B, est.TrainingSetup.from_spec(spec(**resources)))
        # Same micro-batch per GPU: weights, activations and logits are those of one GPU.
        for part in ("weights", "activations", "logits", "quantConstants"):
            assert many.breakdown[part] == one.breakdown[part]
        buckets = one.adapter_parameters * est.COEFFICIENTS.ddp_bucket_bytes / est.GIB
        assert many.peak_gib - one.peak_gib == pytest.approx(buckets, abs=0.05)
        assert many.peak_gib < one.peak_gib * 1.1  # per GPU, not summed over GPUs
    # The world size does not matter beyond "more than one": buckets are per GPU.
    two = est.estimate_memory(LLAMA_8B, replace(one.setup, gpus=2))
    sixteen = est.estimate_memory(LLAMA_8B, replace(one.setup, gpus=16))
    assert two.peak_gib == sixteen.peak_gib


def test_fit_check_is_per_gpu_for_multi_node_jobs() -> None:
    fit = check_fit(spec(gpus=8, nodes=2), {}, OperatorConfig())
    assert fit.status == "True", fit.message
    assert "per GPU" in fit.message
    assert fit.estimate is not None and fit.estimate.peak_gi_b < 80


NOW = datetime(2026, 1, 1, 1, 0, 0, tzinfo=UTC)


def _pod(name: str, index: int | None, start: str, end: str | None) -> dict[str, Any]:
    state: dict[str, Any] = (
        {"terminated": {"exitCode": 0, "finishedAt": end, "startedAt": start}}
        if end
        else {"running": {"startedAt": start}}
    )
    labels = {} if index is None else {"batch.kubernetes.io/job-completion-index": str(index)}
    return {
        "metadata": {"name": name, "creationTimestamp": start, "labels": labels},
        "status": {
            "phase": "Succeeded" if end else "Running",
            "startTime": start,
            "containerStatuses": [{"name": TRAINER_CONTAINER, "state": state}],
        },
    }


@pytest.mark.parametrize(
    ("resources", "pods", "gpu_seconds"),
    [
        # One pod, 4 GPUs, 600 s.
        ({"gpus": 4}, [("p", None, "2026-01-01T00:40:00Z", "2026-01-01T00:50:00Z")], 4 * 600),
        # Two nodes of 8 GPUs, one pod each; pod 1 ended 60 s earlier (rank 0 evaluates).
        (
            {"gpus": 8, "nodes": 2},
            [
                ("p0", 0, "2026-01-01T00:40:00Z", "2026-01-01T00:50:00Z"),
                ("p1", 1, "2026-01-01T00:40:00Z", "2026-01-01T00:49:00Z"),
            ],
            8 * (600 + 540),
        ),
        # Still running: counted up to now.
        ({"gpus": 2, "nodes": 2}, [("p0", 0, "2026-01-01T00:59:00Z", None)], 2 * 60),
    ],
)
def test_cost_is_pod_seconds_times_gpus_of_every_node(
    resources: dict[str, Any], pods: list[tuple[str, int | None, str, str | None]], gpu_seconds: int
) -> None:
    raw = spec_dict(**resources)
    obs: dict[str, Any] = {
        "name": "bot",
        "namespace": "ns",
        "uid": "u",
        "generation": 1,
        "now": NOW,
    }
    first = plan(Observed(spec=raw, status=FineTuneJobStatus(), **obs), OperatorConfig())
    job = next(a.body for a in first.actions if a.kind == "Job")
    cm = next(a.body for a in first.actions if a.kind == "ConfigMap")
    prices = PriceTable.from_configmap_data({"NVIDIA-H100-80GB-HBM3": "3.6"})
    tracked = plan(
        Observed(
            spec=raw,
            status=first.status,
            job=job,
            configmap=cm,
            pods=tuple(_pod(*p) for p in pods),
            prices=prices,
            **obs,
        ),
        OperatorConfig(),
    )
    cost = tracked.status.cost
    assert cost.gpu_seconds == pytest.approx(gpu_seconds)
    assert cost.estimated_cost == pytest.approx(gpu_seconds / 3600 * 3.6, abs=1e-3)
