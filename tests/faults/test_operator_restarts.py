"""The operator stopped at each step of a FineTuneJob's life and started again: no duplicate
children, no lost status, no finalizer left behind."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest
from finetune_local import Emulator
from finetune_operator import metrics
from finetune_operator.domain.times import parse_rfc3339
from finetune_operator.policy import Policy
from support.cluster import (
    FAST,
    NS,
    add_prerequisites,
    events,
    ftj_body,
    operator,
    start_pod,
    status,
    trainer_jobs,
    wait_job,
    wait_phase,
)
from support.ftj_samples import DATA_REPORT, channel, progress_line, result, spec
from support.k8s_fixtures import wait_for

JOB = "bot-train-g1"
CM = "bot-trainer-g1"


def _reconciles(trigger: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value(
            "finetune_job_reconcile_duration_seconds_count", {"namespace": NS, "trigger": trigger}
        )
        or 0.0
    )


def _phase(name: str, phase: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(
        "finetune_jobs", {"namespace": NS, "name": name, "phase": phase}
    )


def _last_success() -> float | None:
    return metrics.REGISTRY.get_sample_value(
        "finetune_job_last_success_timestamp_seconds", {"namespace": NS}
    )


def finish_training(emulator: Emulator, pod: str) -> None:
    emulator.terminate_container(
        NS, pod, exit_code=0, message=json.dumps(result()), container="trainer"
    )
    emulator.set_job_finished(NS, JOB, succeeded=True)


def assert_one_run(emulator: Emulator) -> None:
    assert [j["metadata"]["name"] for j in trainer_jobs(emulator)] == [JOB]
    assert [c["metadata"]["name"] for c in emulator.read_all("configmaps", NS)] == [CM]
    assert emulator.count("create", "jobs") <= 2  # a repeated create met the existing Job
    # Events follow the status write: wait for them, then count.
    wait_for(lambda: any(e["reason"] == "JobCreated" for e in events(emulator, "bot")))
    reasons = Counter(e["reason"] for e in events(emulator, "bot"))
    assert reasons["JobCreated"] == 1, reasons
    assert "ConfigMapCreated" not in reasons, reasons  # a detail, no event (decision 1201)


def test_stopped_after_preflight_before_any_child(emulator: Emulator) -> None:
    add_prerequisites(emulator)
    # The ConfigMap create fails: preflight ran, nothing was made yet.
    blocked = emulator.inject_fault("configmaps", 500, count=10_000, verbs=("create",))
    with operator(emulator):
        emulator.create(ftj_body("bot", spec()), keep_status=False)
        wait_for(lambda: blocked.served >= 1, what="a ConfigMap create attempt")
    assert trainer_jobs(emulator) == [] and emulator.read_all("configmaps", NS) == []
    blocked.remaining = 0
    with operator(emulator):
        wait_job(emulator, JOB)
        wait_phase(emulator, "bot", "Pending")
        assert_one_run(emulator)


def test_stopped_after_configmap_before_job(emulator: Emulator) -> None:
    add_prerequisites(emulator)
    blocked = emulator.inject_fault("jobs", 500, count=10_000, verbs=("create",))
    with operator(emulator):
        emulator.create(ftj_body("bot", spec()), keep_status=False)
        wait_for(lambda: emulator.read("configmaps", NS, CM), what="ConfigMap")
        wait_for(lambda: blocked.served >= 1, what="a Job create attempt")
    assert trainer_jobs(emulator) == []
    blocked.remaining = 0
    with operator(emulator):
        wait_job(emulator, JOB)
        st = wait_phase(emulator, "bot", "Pending")
        assert st["trainerJob"] == JOB
    assert [c["metadata"]["name"] for c in emulator.read_all("configmaps", NS)] == [CM]
    assert [j["metadata"]["name"] for j in trainer_jobs(emulator)] == [JOB]


def test_stopped_after_job_created_before_status_recorded(emulator: Emulator) -> None:
    """The riskiest window: the Job exists but status does not name it yet."""
    add_prerequisites(emulator)
    blocked = emulator.inject_fault(
        "finetunejobs", 500, count=10_000, subresource="status", verbs=("patch", "update")
    )
    with operator(emulator):
        emulator.create(ftj_body("bot", spec()), keep_status=False)
        wait_job(emulator, JOB)
        wait_for(lambda: blocked.served >= 1, what="a status write attempt")
    assert "trainerJob" not in status(emulator, "bot")
    blocked.remaining = 0
    with operator(emulator):
        st = wait_for(
            lambda: status(emulator, "bot") if status(emulator, "bot").get("trainerJob") else None,
            what="the existing Job adopted",
        )
        assert st["trainerJob"] == JOB
        job = trainer_jobs(emulator)[0]
        pod = start_pod(emulator, job)
        finish_training(emulator, pod)
        wait_phase(emulator, "bot", "Succeeded")
    assert [j["metadata"]["name"] for j in trainer_jobs(emulator)] == [JOB]
    assert [c["metadata"]["name"] for c in emulator.read_all("configmaps", NS)] == [CM]


def test_training_finishes_while_the_operator_is_down(emulator: Emulator) -> None:
    add_prerequisites(emulator)
    with operator(emulator):
        emulator.create(ftj_body("bot", spec()), keep_status=False)
        job = wait_job(emulator, JOB)
        pod = start_pod(emulator, job)
        emulator.set_pod_log(
            NS, pod, "\n".join([channel({"type": "data", "report": DATA_REPORT}),
                                progress_line(4, 10)]) + "\n",
        )  # fmt: skip
        wait_for(lambda: (status(emulator, "bot").get("progress") or {}).get("step") == 4)
    before = status(emulator, "bot")
    finish_training(emulator, pod)
    with operator(emulator):
        st = wait_phase(emulator, "bot", "Succeeded")
    assert st["adapter"]["digest"] == "sha256:" + "a" * 64
    assert st["startedAt"] == before["startedAt"] and st["data"] == before["data"]
    assert_one_run(emulator)
    assert Counter(e["reason"] for e in events(emulator, "bot"))["Succeeded"] >= 1


def test_restart_after_the_result_changes_nothing(emulator: Emulator) -> None:
    add_prerequisites(emulator)
    with operator(emulator):
        emulator.create(ftj_body("bot", spec()), keep_status=False)
        pod = start_pod(emulator, wait_job(emulator, JOB))
        finish_training(emulator, pod)
        wait_phase(emulator, "bot", "Succeeded")
        wait_for(lambda: any(e["reason"] == "Succeeded" for e in events(emulator, "bot")))
    before = status(emulator, "bot")
    events_before = len(events(emulator, "bot"))
    emulator.reset_counters()
    requests_before = len(list(emulator))
    resumed = _reconciles("resume")
    # A fresh process has neither series; the restarted operator sets both again from status.
    metrics.forget_ftj(NS, "bot")
    metrics.ftj_last_success.remove(NS)
    metrics._last_success.pop(NS)
    with operator(emulator):
        wait_for(lambda: _phase("bot", "Succeeded") == 1.0, what="the resumed job's phase series")
        wait_for(lambda: _last_success() is not None, what="the namespace's newest success")
    completed = parse_rfc3339(before["completedAt"])
    assert completed is not None and _last_success() == completed.timestamp()
    # A settled job (finished, spec unchanged) is neither read nor reconciled again, and no
    # child of it is read (decision 2080). (The AdapterDeployment controller's pod cache
    # lists all pods once, with no selector.)
    job_pod_reads = [
        r for r in list(emulator)[requests_before:]
        if r.url.path.endswith("/pods") and "labelSelector" in r.params
    ]  # fmt: skip
    assert emulator.count("get", "finetunejobs") == 0
    assert _reconciles("resume") == resumed
    # (kopf lists pods and trainer Jobs once each, to start its watches: no read of this job.)
    assert job_pod_reads == []
    assert emulator.count("list", "pods") == emulator.count("list", "jobs") == 1
    assert emulator.count("get", "jobs") == 0
    assert emulator.count("get", "configmaps") == 0 and emulator.count("get", "pods/log") == 0
    assert status(emulator, "bot") == before
    assert emulator.count("create", "jobs") == 0 and emulator.count("create", "configmaps") == 0
    assert emulator.noop_status_writes == 0
    assert [
        w for w in emulator.writes if w.subresource == "status" and w.plural == "finetunejobs"
    ] == []
    assert len(events(emulator, "bot")) == events_before


def test_restart_after_a_failed_run_changes_nothing(emulator: Emulator) -> None:
    """A failed verdict is as final as a success: not read, not reconciled, not counted
    again; its phase series comes back."""
    add_prerequisites(emulator)
    with operator(emulator):
        emulator.create(ftj_body("bot", spec()), keep_status=False)
        pod = start_pod(emulator, wait_job(emulator, JOB))
        emulator.terminate_container(
            NS, pod, exit_code=137, reason="OOMKilled", container="trainer"
        )
        emulator.set_job_finished(NS, JOB, succeeded=False)
        wait_phase(emulator, "bot", "Failed")
    before = status(emulator, "bot")
    emulator.reset_counters()
    resumed = _reconciles("resume")
    errors = metrics.REGISTRY.get_sample_value(
        "finetune_job_errors_total", {"namespace": NS, "reason": "OOMKilled"}
    )
    metrics.forget_ftj(NS, "bot")
    with operator(emulator):
        wait_for(lambda: _phase("bot", "Failed") == 1.0, what="the resumed job's phase series")
    assert emulator.count("get", "finetunejobs") == 0 and _reconciles("resume") == resumed
    assert status(emulator, "bot") == before and emulator.writes == []
    assert errors == metrics.REGISTRY.get_sample_value(
        "finetune_job_errors_total", {"namespace": NS, "reason": "OOMKilled"}
    )


def test_a_finished_job_left_alone_at_restart_still_follows_edits_and_deletion(
    emulator: Emulator,
) -> None:
    """Not reconciling a settled job when the operator starts loses nothing: its next spec
    edit starts a new run, and its deletion removes its children and the finalizer."""
    add_prerequisites(emulator)
    with operator(emulator):
        emulator.create(ftj_body("bot", spec()), keep_status=False)
        finish_training(emulator, start_pod(emulator, wait_job(emulator, JOB)))
        wait_phase(emulator, "bot", "Succeeded")
    with operator(emulator):
        emulator.merge_patch("finetunejobs", NS, "bot", {"spec": {"lora": {"r": 8}}})
        wait_job(emulator, "bot-train-g2")
        wait_for(lambda: status(emulator, "bot").get("trainerJob") == "bot-train-g2")
        emulator.request_delete("finetunejobs", NS, "bot")
        wait_for(lambda: emulator.read("finetunejobs", NS, "bot") is None, what="finalizer removed")
        wait_for(lambda: trainer_jobs(emulator) == [], what="trainer Jobs removed")


def test_a_finished_job_edited_while_the_operator_is_down_starts_its_new_run(
    emulator: Emulator,
) -> None:
    """A job edited while the operator was down is not left alone at restart: its verdict is
    for the old spec, and the restarted operator starts the run of the new generation."""
    add_prerequisites(emulator)
    with operator(emulator):
        emulator.create(ftj_body("bot", spec()), keep_status=False)
        finish_training(emulator, start_pod(emulator, wait_job(emulator, JOB)))
        wait_phase(emulator, "bot", "Succeeded")
    emulator.merge_patch("finetunejobs", NS, "bot", {"spec": {"lora": {"r": 8}}})
    with operator(emulator):
        wait_job(emulator, "bot-train-g2")
        wait_for(lambda: status(emulator, "bot").get("trainerJob") == "bot-train-g2")


def test_a_job_refused_before_its_run_is_checked_again_when_the_operator_restarts(
    emulator: Emulator,
) -> None:
    """A job that ended before any run started is not settled for good: the operator
    restarted under a new policy reconciles it, and the run starts (decision 2080)."""
    add_prerequisites(emulator)
    strict = dataclasses.replace(FAST, policy=Policy(max_gpus_per_job=0))
    with operator(emulator, strict):
        emulator.create(ftj_body("bot", spec()), keep_status=False)
        refused = wait_phase(emulator, "bot", "Failed")
    assert "trainerJob" not in refused and trainer_jobs(emulator) == []
    assert any(c["reason"] == "PolicyViolation" for c in refused["conditions"])
    with operator(emulator):
        wait_job(emulator, JOB)
        wait_phase(emulator, "bot", "Pending")
    assert_one_run(emulator)


@pytest.mark.parametrize("children_delete_fails", [False, True])
def test_deletion_while_the_operator_is_down_or_failing(
    emulator: Emulator, children_delete_fails: bool
) -> None:
    add_prerequisites(emulator)
    with operator(emulator):
        emulator.create(ftj_body("bot", spec()), keep_status=False)
        start_pod(emulator, wait_job(emulator, JOB))
        wait_phase(emulator, "bot", "Training")
        if children_delete_fails:
            blocked = emulator.inject_fault("jobs", 500, count=10_000, verbs=("delete",))
            emulator.request_delete("finetunejobs", NS, "bot")
            wait_for(lambda: blocked.served >= 1, what="a Job delete attempt")
    if not children_delete_fails:
        emulator.request_delete("finetunejobs", NS, "bot")
    # The finalizer holds the object (and its children) until the operator cleans up.
    held = emulator.read("finetunejobs", NS, "bot")
    assert held is not None and held["metadata"].get("deletionTimestamp")
    assert "finetune.dev/cleanup" in held["metadata"].get("finalizers", [])
    if children_delete_fails:
        blocked.remaining = 0
    with operator(emulator):
        wait_for(lambda: emulator.read("finetunejobs", NS, "bot") is None, what="finalizer removed")
        wait_for(lambda: emulator.read("jobs", NS, JOB) is None, what="Job removed")
    assert emulator.read_all("configmaps", NS) == []
    assert emulator.read("persistentvolumeclaims", NS, "adapters") is not None
