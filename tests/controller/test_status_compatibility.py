"""Status written by earlier versions of the operator: read into the typed status without
failing, and planned exactly as before (a running job picked up after an upgrade goes on)."""

from __future__ import annotations

import copy
from typing import Any

from finetune_operator.api.finetunejob import parse_status, status_wire
from finetune_operator.api.status_patch import status_patch
from finetune_operator.planners.finetunejob import PriceTable
from support.ftj_planning import cond, started, track
from support.ftj_samples import DATA_REPORT, channel, pod, progress_line

# What the previous version (status built as dicts) wrote for a job training at step 4 of 10.
PREVIOUS_VERSION_RUNNING: dict[str, Any] = {
    "conditions": [
        {
            "type": "Validated",
            "status": "True",
            "reason": "Valid",
            "message": "spec is valid",
            "lastTransitionTime": "2026-01-01T01:00:10Z",
            "observedGeneration": 1,
        },
        {
            "type": "Fits",
            "status": "True",
            "reason": "Fits",
            "message": "predicted peak 17.5 GiB per GPU of 71.6 GiB usable on NVIDIA-H100-80GB-HBM3 (batchSize 4, gradientCheckpointing True; shape from known family llama-3-8b)",
            "lastTransitionTime": "2026-01-01T01:00:10Z",
            "observedGeneration": 1,
        },
        {
            "type": "Admitted",
            "status": "True",
            "reason": "NoQueue",
            "message": "no queueName: the Job starts at once",
            "lastTransitionTime": "2026-01-01T01:00:10Z",
            "observedGeneration": 1,
        },
        {
            "type": "Training",
            "status": "True",
            "reason": "Running",
            "message": "trainer pod is running (step 4/10)",
            "lastTransitionTime": "2026-01-01T01:00:10Z",
            "observedGeneration": 1,
        },
    ],
    "estimate": {
        "peakGiB": 17.47,
        "gpuMemoryGiB": 79.6,
        "fits": True,
        "batchSize": 4,
        "gradientCheckpointing": True,
        "parameters": 8030261248,
        "breakdown": {
            "weights": 7.17,
            "quantConstants": 0.1,
            "adapterGradsOptimizer": 1.56,
            "activations": 6.81,
            "logits": 1.16,
            "overhead": 0.67,
        },
    },
    "trainerJob": "bot-train-g1",
    "phase": "Training",
    "observedGeneration": 1,
    "progress": {
        "step": 4,
        "totalSteps": 10,
        "epoch": 0.4,
        "loss": 1.5,
        "tokensPerSecond": 6800.0,
        "etaSeconds": 12,
        "gpuMemoryGiB": 10.1,
        "updatedAt": "2026-01-01T00:04:00Z",
        "percent": 40,
    },
    "data": {
        "rowsRead": 1000,
        "rowsKept": 950,
        "trainRows": 855,
        "evalRows": 95,
        "duplicates": 40,
        "duplicateRate": 0.04,
        "piiMasked": 12,
        "dropped": {"duplicate": 40, "tooLong": 10},
        "digest": "sha256:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd",
    },
    "cost": {"gpuSeconds": 3600.0, "pricePerGpuHour": 4.0, "estimatedCost": 4.0, "currency": "USD"},
    "startedAt": "2026-01-01T00:00:10Z",
}

RUNNING_POD = pod("bot-train-g1-a", started="2026-01-01T00:00:10Z", trainer_state={"running": {}})
LOG = "\n".join([channel({"type": "data", "report": DATA_REPORT}), progress_line(4, 10)])
PRICES = PriceTable.from_configmap_data({"NVIDIA-H100-80GB-HBM3": "4.0"})


def test_a_status_of_the_previous_version_reads_back_unchanged() -> None:
    assert status_wire(parse_status(PREVIOUS_VERSION_RUNNING)) == PREVIOUS_VERSION_RUNNING


def test_a_running_job_of_the_previous_version_plans_as_before() -> None:
    """After an upgrade the same observation gives the same status: nothing to write, no
    event, no action."""
    first, job, cm = started()
    p = track(first, job, cm, status=parse_status(PREVIOUS_VERSION_RUNNING),
              pods=(RUNNING_POD,), log_tail=LOG, prices=PRICES)  # fmt: skip
    assert status_patch(PREVIOUS_VERSION_RUNNING, status_wire(p.status)) == {}
    assert p.actions == [] and p.events == []


def test_a_status_with_only_the_trainer_job_goes_on_tracking_that_run() -> None:
    first, job, cm = started()
    p = track(first, job, cm, status=parse_status({"trainerJob": "bot-train-g1"}),
              pods=(RUNNING_POD,), log_tail=LOG)  # fmt: skip
    assert not any(a.verb == "create" for a in p.actions)
    assert p.status.phase == "Training" and p.status.trainer_job == "bot-train-g1"
    assert cond(p, "Training").reason == "Running" and p.status.progress is not None


def test_fields_this_version_cannot_read_are_left_out_and_the_run_goes_on() -> None:
    stored = copy.deepcopy(PREVIOUS_VERSION_RUNNING)
    stored["phase"] = "Exploding"  # a phase of some other version
    stored["progress"] = {"step": "many"}
    stored["conditions"].append({"type": "Odd"})  # no status
    stored["newerField"] = {"anything": 1}  # from a newer version
    stored["kopf"] = {"progress": {}}  # kopf's own
    status = parse_status(stored)
    assert status.phase is None and status.progress is None
    assert [c.type for c in status.conditions] == ["Validated", "Fits", "Admitted", "Training"]
    assert status.trainer_job == "bot-train-g1" and status.cost is not None

    first, job, cm = started()
    p = track(first, job, cm, status=status, pods=(RUNNING_POD,), log_tail=LOG, prices=PRICES)
    assert p.actions == [] and p.status.phase == "Training"
    patch = status_patch(status_wire(status), status_wire(p.status))
    assert set(patch) == {"phase", "progress"}  # rewritten; the rest is left as stored


def test_a_status_of_the_wrong_shape_reads_as_empty() -> None:
    for stored in (None, {}, {"conditions": "none", "restarts": "two"}):
        assert status_wire(parse_status(stored)) == {}
