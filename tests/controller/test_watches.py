"""Trainer Jobs and pods are tracked through watches, not polls (decision 1650): the real
operator against the embedded API, counting the requests the API server receives."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import pytest
from finetune_local import Emulator
from finetune_operator import metrics
from finetune_operator.handlers.trainer_watch import job_snapshot, pod_snapshot
from support.cluster import (
    FAST,
    NS,
    add_prerequisites,
    condition,
    ftj_body,
    start_operator,
    start_pod,
    status,
    wait_condition,
    wait_job,
    wait_phase,
)
from support.ftj_planning import started, track, with_conditions
from support.ftj_samples import pod, progress_line, result, spec
from support.k8s_fixtures import wait_for

JOB = "bot-train-g1"
# Polls of running jobs are due every 0.2 s here (FAST): ten intervals and more.
IDLE_SECONDS = 3.0


def requests_but_watches(emulator: Emulator) -> dict[tuple[str, str], int]:
    """Requests the operator sent, by (verb, resource), leaving out its watch streams."""
    return {key: n for key, n in emulator.request_counts.items() if key[0] != "watch" and n}


def reconciles_after(trigger: str) -> float:
    sample = metrics.REGISTRY.get_sample_value(
        "finetune_job_reconcile_duration_seconds_count", {"namespace": NS, "trigger": trigger}
    )
    return sample or 0.0


def unschedulable(emulator: Emulator, pod_name: str) -> None:
    """The scheduler finds no node for the pod."""
    emulator.patch_status(
        "pods",
        NS,
        pod_name,
        {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                }
            ],
        },
    )


def test_a_pending_job_costs_no_request_while_nothing_changes(
    emulator: Emulator, operator_runner: Any
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    pod_name = start_pod(emulator, wait_job(emulator, JOB), running=False)
    unschedulable(emulator, pod_name)
    # The scheduler's verdict reaches status through the pod's watch event (no poll).
    wait_condition(emulator, "bot", "Training", "False", reason="Unschedulable")
    time.sleep(0.5)  # the status write's own watch event has come back
    emulator.reset_counters()
    time.sleep(IDLE_SECONDS)
    assert requests_but_watches(emulator) == {}
    assert status(emulator, "bot")["phase"] == "Pending"


def test_a_running_job_costs_only_its_log_read_and_its_progress_arrives(
    emulator: Emulator, operator_runner: Any
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    pod_name = start_pod(emulator, wait_job(emulator, JOB))
    wait_phase(emulator, "bot", "Training")
    emulator.set_pod_log(NS, pod_name, progress_line(10, 100) + "\n")
    wait_for(
        lambda: (status(emulator, "bot").get("progress") or {}).get("step") == 10,
        timeout=10,
        what="progress of step 10",
    )
    time.sleep(0.5)
    emulator.reset_counters()
    time.sleep(IDLE_SECONDS)
    counts = requests_but_watches(emulator)
    assert set(counts) == {("get", "pods/log")}, counts  # no GET of the job, Job or pods
    assert counts[("get", "pods/log")] >= 3  # polled all along (every 0.2 s here)
    # New progress still arrives, written once.
    emulator.reset_counters()
    emulator.append_pod_log(NS, pod_name, progress_line(20, 100) + "\n")
    wait_for(
        lambda: (status(emulator, "bot").get("progress") or {}).get("step") == 20,
        timeout=10,
        what="progress of step 20",
    )
    time.sleep(0.5)
    assert emulator.count("patch", "finetunejobs/status") == 1
    assert emulator.count("get", "finetunejobs") == 0


def test_a_finished_trainer_job_is_seen_through_its_watch_without_polls(
    emulator: Emulator, operator_runner: Any
) -> None:
    """Polls an hour apart: the verdict can only come from the Job's and pod's events."""
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner, replace(FAST, progress_poll_seconds=3600.0))
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    pod_name = start_pod(emulator, wait_job(emulator, JOB))
    wait_phase(emulator, "bot", "Training")  # from the pod's event: no poll has run
    time.sleep(0.5)
    emulator.reset_counters()
    emulator.terminate_container(
        NS, pod_name, exit_code=0, message=json.dumps(result()), container="trainer"
    )
    emulator.set_job_finished(NS, JOB, succeeded=True)
    wait_phase(emulator, "bot", "Succeeded", timeout=10)
    # The FineTuneJob and its Job came from the watches; the pods are listed once, when the
    # Job shows it finished (their last change may travel behind the Job's).
    assert emulator.count("get", "finetunejobs") == 0
    assert emulator.count("get", "jobs") == 0
    assert emulator.count("list", "pods") == 1
    # Between the trainer's exit and the Job's completion nothing is written: the pod's
    # event waits for the Job's (no "Restarting" moment).
    assert emulator.count("patch", "finetunejobs/status") == 1


def test_a_finished_job_costs_no_request(emulator: Emulator, operator_runner: Any) -> None:
    add_prerequisites(emulator)
    run = start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    pod_name = start_pod(emulator, wait_job(emulator, JOB))
    wait_phase(emulator, "bot", "Training")
    emulator.terminate_container(
        NS, pod_name, exit_code=0, message=json.dumps(result()), container="trainer"
    )
    emulator.set_job_finished(NS, JOB, succeeded=True)
    wait_phase(emulator, "bot", "Succeeded")
    time.sleep(0.5)
    emulator.reset_counters()
    # The Job controller and the kubelet still touch a finished Job and pod now and then:
    # each change is a watch event, and the reconcile it starts finds the job settled.
    reconciles = reconciles_after("job-event")
    emulator.merge_patch("pods", NS, pod_name, {"metadata": {"labels": {"touched": "1"}}})
    emulator.merge_patch("jobs", NS, JOB, {"metadata": {"annotations": {"touched": "1"}}})
    wait_for(lambda: reconciles_after("job-event") > reconciles, timeout=5, what="a Job event")
    time.sleep(IDLE_SECONDS)
    assert requests_but_watches(emulator) == {}  # (the test's patches bypass HTTP)
    # Finished jobs pile up: the operator keeps only a short form of each in memory.
    kept = run.memo.ftj_state.watched.seen_ftj(NS, "bot")
    assert (
        kept is not None
        and "spec" not in kept
        and set(kept["status"])
        <= {
            "phase",
            "observedGeneration",
        }
    )
    assert condition(emulator, "bot", "Succeeded")["status"] == "True"  # type: ignore[index]


def test_a_recreated_job_never_takes_the_old_runs_children_from_the_watch(
    emulator: Emulator, operator_runner: Any
) -> None:
    """Delete a job and re-create it at once: the watch still holds the old trainer Job of
    the same name; the new job's status never reflects it (it is owned by the old uid)."""
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    old_job = wait_job(emulator, JOB)
    pod_name = start_pod(emulator, old_job)
    wait_phase(emulator, "bot", "Training")
    emulator.set_job_finished(NS, JOB, succeeded=True)  # the old run completes as it goes
    emulator.request_delete("finetunejobs", NS, "bot")
    wait_for(lambda: emulator.read("finetunejobs", NS, "bot") is None, what="old job gone")
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    new_job = wait_for(
        lambda: (
            (job := emulator.read("jobs", NS, JOB))
            and job["metadata"]["uid"] != old_job["metadata"]["uid"]
            and job
        ),
        what="a fresh trainer Job",
    )
    assert pod_name  # the old pod is gone with its Job
    start_pod(emulator, new_job, suffix="b", running=False)
    wait_phase(emulator, "bot", "Pending")
    time.sleep(1.0)
    assert status(emulator, "bot")["phase"] == "Pending"  # not Succeeded from the old Job


def test_a_trainer_pod_lost_in_a_watch_gap_is_asked_for(
    emulator: Emulator, operator_runner: Any
) -> None:
    """The watch never says the pod went (its deletion fell into a gap): the poll finds no
    log for it, asks the server, and the job's status stops claiming a running trainer."""
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    pod_name = start_pod(emulator, wait_job(emulator, JOB))
    wait_condition(emulator, "bot", "Training", "True", reason="Running")
    time.sleep(0.5)
    emulator.reset_counters()
    assert emulator.remove_unseen("pods", NS, pod_name)
    wait_for(lambda: emulator.count("list", "pods") >= 1, timeout=5, what="a listing of pods")
    wait_for(
        lambda: (condition(emulator, "bot", "Training") or {}).get("reason") != "Running",
        timeout=5,
        what="the Training condition to drop the lost trainer",
    )


def test_the_api_server_sends_only_the_operators_own_jobs_and_every_pod(
    emulator: Emulator, operator_runner: Any
) -> None:
    """The Job selector goes to the server (not filtered after the fact): a cluster's other Jobs
    never travel to the operator. Pods are not selected there: kopf keeps one watch per
    resource and the AdapterDeployment controller needs serving pods, which carry no label of
    ours; the trainer-pod index filters on the label instead."""
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    wait_job(emulator, JOB)
    selectors: dict[str, set[str]] = {"jobs": set(), "pods": set()}
    for request in list(emulator):
        resource = request.url.path.rsplit("/", 1)[-1]
        if resource in selectors and request.method.value == "GET":
            selectors[resource].add(str(request.params.get("labelSelector")))
    assert selectors["jobs"] == {"app.kubernetes.io/managed-by=finetune-operator"}
    assert "None" in selectors["pods"]  # kopf's watch of every pod


# ---------------------------------------------------------------- what the indexes keep


def _as_server_has_it(job: dict[str, Any], pod_body: dict[str, Any]) -> dict[str, Any]:
    """A pod as the Job controller makes it: the template's spec, placed on a node."""
    spec_ = {**job["spec"]["template"]["spec"], "nodeName": "gpu-node-1"}
    return {**pod_body, "spec": spec_, "metadata": {**pod_body["metadata"], "managedFields": []}}


@pytest.mark.parametrize(
    "job_conditions, pod_phase, trainer_state, pod_conditions",
    [
        ((), "Running", {"running": {}}, None),
        ((), "Pending", None, [{"type": "PodScheduled", "status": "False",
                                "reason": "Unschedulable", "message": "0/3 nodes"}]),
        ((), "Pending", {"waiting": {"reason": "ImagePullBackOff", "message": "back-off"}}, None),
        (("Failed",), "Failed", {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}, None),
        (("Complete",), "Succeeded",
         {"terminated": {"exitCode": 0, "message": json.dumps(result())}}, None),
    ],
)  # fmt: skip
def test_a_plan_from_the_indexes_equals_one_from_the_server(
    job_conditions: tuple[str, ...],
    pod_phase: str,
    trainer_state: dict[str, Any] | None,
    pod_conditions: list[dict[str, Any]] | None,
) -> None:
    """The indexes keep Jobs without their pod template and pods without their spec: the
    planner must decide exactly as it does on the full objects the server returns."""
    first, job, cm = started()
    job = with_conditions(job, *job_conditions) if job_conditions else job
    sample = pod("p", phase=pod_phase, trainer_state=trainer_state, conditions=pod_conditions)
    full_pod = _as_server_has_it(job, sample)
    from_server = track(first, job, cm, pods=(full_pod,), log_tail=progress_line(3, 10))
    from_index = track(
        first,
        job_snapshot(job),
        cm,
        pods=(pod_snapshot(full_pod),),
        log_tail=progress_line(3, 10),
    )
    assert from_index == from_server
    assert "template" not in job_snapshot(job)["spec"]
    assert pod_snapshot(full_pod)["spec"] == {"nodeName": "gpu-node-1"}
    assert "managedFields" not in pod_snapshot(full_pod)["metadata"]
