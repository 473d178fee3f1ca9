"""A child the API server refuses (quota, admission webhook, LimitRange, invalid field): the job
ends with a verdict that quotes the server and fits the cause, what it created goes, and the
operator does not try again until the spec changes."""

from __future__ import annotations

import time
from typing import Any

import pytest
from finetune_local import Emulator
from finetune_operator.api.common import Condition
from finetune_operator.api.finetunejob import FineTuneJobStatus
from finetune_operator.config import OperatorConfig
from finetune_operator.planners.finetunejob import (
    Observed,
    Refusal,
    child_refused,
    classify_refusal,
    plan,
)
from support.cluster import (
    NS,
    add_prerequisites,
    events,
    ftj_body,
    start_operator,
    status,
    trainer_jobs,
    wait_condition,
    wait_job,
)
from support.ftj_samples import spec
from support.k8s_fixtures import wait_for

JOB = "bot-train-g1"
QUOTA = 'jobs "bot-train-g1" is forbidden: exceeded quota: gpu-quota, requested: count/jobs.batch=1'
WEBHOOK = (
    'admission webhook "validate.policy.example.com" denied the request: '
    "image registry.example.com/trainer is not allowed"
)
INVALID = (
    'Job.batch "bot-train-g1" is invalid: spec.template.spec.nodeSelector: Invalid value: '
    '"NVIDIA H100": a valid label must consist of alphanumeric characters'
)
LIMIT_RANGE = 'jobs "bot-train-g1" is forbidden: maximum memory usage per Container is 64Gi'
RBAC = (
    'jobs.batch is forbidden: User "system:serviceaccount:finetune-system:op" cannot create '
    'resource "jobs" in API group "batch" in the namespace "default"'
)


# ---------------------------------------------------------------- the verdict (pure)


def _started() -> tuple[Observed, Any]:
    obs = Observed(
        name="bot", namespace=NS, uid="u1", generation=1, spec=spec(), status=FineTuneJobStatus()
    )
    return obs, plan(obs, OperatorConfig())


def _condition(status_: FineTuneJobStatus, type_: str) -> Condition:
    return next(c for c in status_.conditions if c.type == type_)


@pytest.mark.parametrize(
    ("code", "message", "reason", "says", "never_says"),
    [
        (403, QUOTA, "QuotaExceeded", "ResourceQuota", "webhook"),
        (403, WEBHOOK, "AdmissionDenied", "admission webhook or policy", "ResourceQuota"),
        (400, WEBHOOK, "AdmissionDenied", "admission webhook or policy", "ResourceQuota"),
        (422, INVALID, "ChildInvalid", "resources.nodeSelector", "ResourceQuota"),
        (403, LIMIT_RANGE, "ChildForbidden", "LimitRange", "ResourceQuota"),
    ],
)
def test_a_refused_trainer_job_is_a_final_verdict_with_advice_for_its_cause(
    code: int, message: str, reason: str, says: str, never_says: str
) -> None:
    obs, started = _started()
    p = child_refused(obs, started, Refusal("Job", JOB, code, "Forbidden", message))
    failed = _condition(p.status, "Failed")
    assert (failed.status, failed.reason) == ("True", reason)
    assert message in failed.message and says in failed.message
    assert never_says not in failed.message
    assert p.status.phase == "Failed" and p.status.trainer_job is None
    # What the run created before the refusal goes with it; the refused Job was never made.
    assert [(a.verb, a.kind, a.name) for a in p.actions] == [
        ("delete", "ConfigMap", "bot-trainer-g1")
    ]
    assert [e.reason for e in p.events] == [reason]
    assert p.outcome == "ok"  # the verdict is in status: nothing for kopf to retry


def test_a_refused_job_is_not_tried_again_until_the_spec_changes() -> None:
    obs, started = _started()
    refused = child_refused(obs, started, Refusal("Job", JOB, 403, "Forbidden", QUOTA))
    again = plan(
        Observed(name="bot", namespace=NS, uid="u1", generation=1, spec=spec(),
                 status=refused.status),
        OperatorConfig(),
    )  # fmt: skip
    assert again.actions == [] and again.status == refused.status and again.events == []
    edited = plan(
        Observed(name="bot", namespace=NS, uid="u1", generation=2,
                 spec=spec(resources={"gpus": 1, "gpuProduct": "NVIDIA-H100-80GB-HBM3",
                                      "memory": "32Gi"}),
                 status=refused.status),
        OperatorConfig(),
    )  # fmt: skip
    assert [(a.verb, a.kind) for a in edited.actions] == [
        ("create", "ConfigMap"),
        ("create", "Job"),
    ]
    assert _condition(edited.status, "Training").reason == "Pending"
    assert not any(c.type == "Failed" for c in edited.status.conditions)


def test_the_servers_message_is_quoted_but_bounded() -> None:
    obs, started = _started()
    huge = "admission webhook denied the request: " + "x" * 100_000
    p = child_refused(obs, started, Refusal("Job", JOB, 403, "Forbidden", huge))
    message = _condition(p.status, "Failed").message
    assert len(message) < 1600
    assert "x" * 900 in message and "x" * 1001 not in message


def test_only_an_rbac_refusal_of_the_operator_is_retried() -> None:
    obs, started = _started()
    p = child_refused(obs, started, Refusal("Job", JOB, 403, "Forbidden", RBAC))
    training = _condition(p.status, "Training")
    assert training.reason == "JobRejected" and "RBAC" in training.message
    assert not any(c.type == "Failed" for c in p.status.conditions)
    assert p.outcome == "retry" and p.status.phase == "Pending"
    assert classify_refusal(Refusal("Job", JOB, 403, "Forbidden", QUOTA))[2] is True


# ---------------------------------------------------------------- against the API


def _refuse_jobs(emulator: Emulator, code: int, message: str, count: int = 100) -> Any:
    return emulator.inject_fault(
        "jobs", code, count=count, subresource=None, verbs=("create",), message=message
    )


@pytest.mark.parametrize(
    ("code", "message", "reason"),
    [
        (403, QUOTA, "QuotaExceeded"),
        (403, WEBHOOK, "AdmissionDenied"),
        (422, INVALID, "ChildInvalid"),
    ],
)
def test_a_refused_job_fails_once_cleans_up_and_does_not_loop(
    emulator: Emulator, operator_runner: Any, code: int, message: str, reason: str
) -> None:
    add_prerequisites(emulator)
    fault = _refuse_jobs(emulator, code, message)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    failed = wait_condition(emulator, "bot", "Failed", "True", reason)
    assert message in failed["message"]
    wait_for(lambda: emulator.read_all("configmaps", NS) == [], what="ConfigMap removed")
    time.sleep(2.0)  # several retry intervals of the test configuration (0.5 s)
    assert fault.served == 1, "the refused create was tried again"
    assert trainer_jobs(emulator) == [] and emulator.read_all("configmaps", NS) == []
    assert status(emulator, "bot")["phase"] == "Failed"
    warnings = [e["reason"] for e in events(emulator, "bot") if e["type"] == "Warning"]
    assert warnings == [reason]


def test_a_spec_change_after_a_refusal_starts_a_new_run(
    emulator: Emulator, operator_runner: Any
) -> None:
    add_prerequisites(emulator)
    _refuse_jobs(emulator, 403, QUOTA, count=1)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    wait_condition(emulator, "bot", "Failed", "True", "QuotaExceeded")
    emulator.merge_patch("finetunejobs", NS, "bot", {"spec": {"training": {"batchSize": 2}}})
    wait_job(emulator, "bot-train-g2")
    wait_condition(emulator, "bot", "Training", "False", "Pending")
    assert [cm["metadata"]["name"] for cm in emulator.read_all("configmaps", NS)] == [
        "bot-trainer-g2"
    ]


def test_an_rbac_refusal_is_retried_until_the_operator_may_create(
    emulator: Emulator, operator_runner: Any
) -> None:
    add_prerequisites(emulator)
    fault = _refuse_jobs(emulator, 403, RBAC, count=2)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    wait_job(emulator, JOB, timeout=20)
    wait_for(lambda: status(emulator, "bot").get("trainerJob") == JOB, what="run recorded")
    assert fault.remaining == 0
    assert not any(
        c["type"] == "Failed" and c["status"] == "True"
        for c in status(emulator, "bot")["conditions"]
    )
