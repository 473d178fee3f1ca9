"""FineTuneSchedule specs, observations and FineTuneJob states for the schedule tests."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from finetune_operator.domain.times import format_rfc3339
from finetune_operator.planners.finetuneschedule import (
    ANNOTATION_SCHEDULED_TIME,
    ANNOTATION_TRIGGER,
    LABEL_SCHEDULE,
    Observed,
    run_name,
)

from support.ftj_samples import spec as ftj_spec

NS = "default"
UID = "uid-sched"
CREATED = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)  # a Tuesday


def sched_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "schedule": "0 2 * * MON",
        "timeZone": "Europe/Berlin",
        "jobTemplate": {"metadata": {"labels": {"team": "ml"}}, "spec": ftj_spec()},
    }
    for key, value in overrides.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


BEAT = {
    "policy": "BeatChampion",
    "metrics": [{"metric": "rougeL", "minMargin": 0.02}, {"metric": "evalLoss"}],
}


def observed(
    now: datetime,
    spec: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    runs: tuple[dict[str, Any], ...] = (),
    generation: int = 1,
    probes: tuple[dict[str, Any], ...] = (),
    probe_pods: tuple[dict[str, Any], ...] = (),
    followers: tuple[dict[str, Any], ...] = (),
) -> Observed:
    return Observed(
        name="weekly",
        namespace=NS,
        uid=UID,
        generation=generation,
        created=CREATED,
        spec=spec if spec is not None else sched_spec(),
        status=status or {},
        runs=runs,
        now=now,
        probes=probes,
        probe_pods=probe_pods,
        followers=followers,
        trainer_image="ghcr.io/finetune-dev/trainer:test",
    )


def run(
    slot: datetime,
    outcome: str = "Running",
    *,
    metrics: dict[str, float] | None = None,
    digest: str = "sha256:" + "a" * 64,
    data_digest: str | None = "sha256:data1",
    reason: str = "GatesFailed",
    completed: str = "2026-12-07T05:00:00Z",
    deleting: bool = False,
    compared: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An owned FineTuneJob of one slot in the given state; ``compared`` ({digest, metrics or
    error, timingComparable?}): the run also evaluated that adapter (evaluation.compareWith)."""
    name = run_name("weekly", slot)
    status: dict[str, Any] = {}
    if outcome != "Running":
        ok = outcome == "Succeeded"
        status = {
            "phase": outcome,
            "conditions": [
                {
                    "type": "Succeeded",
                    "status": "True" if ok else "False",
                    "reason": "Succeeded" if ok else reason,
                },
                {
                    "type": "Failed",
                    "status": "False" if ok else "True",
                    "reason": "Succeeded" if ok else reason,
                },
            ],
            "completedAt": completed,
            "metrics": metrics or {"rougeL": 0.5, "evalLoss": 1.0},
            "gates": [{"metric": "rougeL", "value": 0.5, "passed": ok}],
        }
        if ok:
            status["adapter"] = {
                "uri": f"pvc://adapters/support-bot/{name}",
                "digest": digest,
                "rank": 64,
            }
        if data_digest:
            status["data"] = {"digest": data_digest}
        if compared and compared.get("metrics"):
            status["comparedMetrics"] = compared["metrics"]
            if "timingComparable" in compared:
                status["comparedTimingComparable"] = compared["timingComparable"]
        elif compared:
            status["comparedError"] = compared.get("error")
    spec: dict[str, Any] = {}
    if compared:
        uri = "pvc://adapters/support-bot/weekly-old/adapter"
        spec["evaluation"] = {"compareWith": {"uri": uri, "digest": compared["digest"]}}
    meta: dict[str, Any] = {
        "name": name,
        "namespace": NS,
        "labels": {LABEL_SCHEDULE: "weekly"},
        "annotations": {
            ANNOTATION_SCHEDULED_TIME: format_rfc3339(slot),
            ANNOTATION_TRIGGER: "Schedule",
        },
        "ownerReferences": [
            {"kind": "FineTuneSchedule", "name": "weekly", "uid": UID, "controller": True}
        ],
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-12-07T06:00:00Z"
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": meta,
            "spec": spec, "status": copy.deepcopy(status)}  # fmt: skip
