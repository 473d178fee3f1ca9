"""API errors on the operator's writes and cut watch streams: the operator converges to the
same end state, with one trainer Job, as without them."""

from __future__ import annotations

import json

import pytest
from finetune_local import Emulator
from finetune_operator.builders import names
from support.cluster import (
    NS,
    add_prerequisites,
    ftj_body,
    start_operator,
    start_pod,
    status,
    trainer_jobs,
    wait_job,
    wait_phase,
)
from support.ftj_samples import result, spec
from support.k8s_fixtures import wait_for

JOB = "bot-train-g1"

# (plural, subresource, verbs): every kind of write a FineTuneJob lifecycle makes.
WRITES = {
    "status": ("finetunejobs", "status", ("patch", "update")),
    "kopf-patch": ("finetunejobs", None, ("patch",)),
    "configmap": ("configmaps", None, ("create",)),
    "job": ("jobs", None, ("create",)),
    "event": ("events", None, ("create",)),
}


def run_to_success(emulator: Emulator) -> dict:
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    pod = start_pod(emulator, wait_job(emulator, JOB, timeout=30))
    emulator.terminate_container(
        NS, pod, exit_code=0, message=json.dumps(result()), container="trainer"
    )
    emulator.set_job_finished(NS, JOB, succeeded=True)
    return wait_phase(emulator, "bot", "Succeeded", timeout=30)


@pytest.mark.parametrize("code", [409, 422, 429, 500])
@pytest.mark.parametrize("write", sorted(WRITES))
def test_write_errors_converge(emulator: Emulator, operator_runner, write: str, code: int) -> None:
    plural, sub, verbs = WRITES[write]
    if code == 409 and verbs == ("create",):
        pytest.skip("a 409 on create means AlreadyExists; the object is then adopted by name")
    if code == 422 and write in ("configmap", "job"):
        pytest.skip(
            "a 422 on create means Invalid: a final refusal (controller/test_child_refusals)"
        )
    if write == "kopf-patch" and code in (409, 422):
        pytest.skip("kopf does not retry its own patch on 409/422: see the test below")
    add_prerequisites(emulator)
    fault = emulator.inject_fault(
        plural, code, count=2, subresource=sub, verbs=verbs, retry_after_seconds=1
    )
    start_operator(emulator, operator_runner)
    st = run_to_success(emulator)
    assert fault.served >= 1, "the fault was never met"
    assert st["trainerJob"] == JOB and st["adapter"]["digest"].startswith("sha256:")
    assert [j["metadata"]["name"] for j in trainer_jobs(emulator)] == [JOB]
    assert len(emulator.read_all("configmaps", NS)) == 1
    failed = [c for c in st["conditions"] if c["type"] == "Failed"]
    assert failed and failed[0]["status"] == "False"


def test_cut_watches_at_every_step_converge(emulator: Emulator, operator_runner) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.cut_watches()
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    job = wait_job(emulator, JOB, timeout=30)
    emulator.cut_watches()
    pod = start_pod(emulator, job)
    wait_phase(emulator, "bot", "Training", timeout=30)
    # The Job finishes while no watch stream is open: the relist (or the poll) must see it.
    emulator.cut_watches()
    emulator.terminate_container(
        NS, pod, exit_code=0, message=json.dumps(result()), container="trainer"
    )
    emulator.set_job_finished(NS, JOB, succeeded=True)
    wait_phase(emulator, "bot", "Succeeded", timeout=30)
    wait_for(lambda: emulator.open_watches >= 2, what="watches re-opened")
    assert [j["metadata"]["name"] for j in trainer_jobs(emulator)] == [JOB]
    assert status(emulator, "bot")["gatesSummary"] == "2/2 passed"


def test_persistent_status_conflicts_back_off_then_converge(
    emulator: Emulator, operator_runner
) -> None:
    """More conflicts than one reconcile retries: the handler backs off and tries again."""
    add_prerequisites(emulator)
    fault = emulator.inject_fault(
        "finetunejobs", 409, count=12, subresource="status", verbs=("patch", "update")
    )
    start_operator(emulator, operator_runner)
    st = run_to_success(emulator)
    assert fault.remaining == 0
    assert [j["metadata"]["name"] for j in trainer_jobs(emulator)] == [JOB]
    assert st["phase"] == "Succeeded"


def started_once_and_succeeds(emulator: Emulator) -> None:
    """A job kopf had left unhandled gets its one trainer Job, its status, and finishes."""
    job = wait_job(emulator, JOB, timeout=30)
    wait_for(lambda: status(emulator, "bot").get("trainerJob") == JOB, what="status names the Job")
    assert status(emulator, "bot")["observedGeneration"] == 1
    pod = start_pod(emulator, job)
    emulator.terminate_container(
        NS, pod, exit_code=0, message=json.dumps(result()), container="trainer"
    )
    emulator.set_job_finished(NS, JOB, succeeded=True)
    wait_phase(emulator, "bot", "Succeeded", timeout=30)
    assert [j["metadata"]["name"] for j in trainer_jobs(emulator)] == [JOB]
    assert len(emulator.read_all("configmaps", NS)) == 1


def test_a_lost_kopf_patch_heals_without_a_change(emulator: Emulator, operator_runner) -> None:
    """kopf gives up on a 409 answer to its own patch (the finalizer) and waits for the
    object's next change, which may never come; a real API server never answers 409 to such
    a patch. The unobserved-spec timer reconciles the job after its quiet period instead."""
    add_prerequisites(emulator)
    fault = emulator.inject_fault("finetunejobs", 409, count=1, subresource=None, verbs=("patch",))
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    wait_for(lambda: fault.served == 1, what="the kopf patch refused")
    assert trainer_jobs(emulator) == []  # nothing half-made while it waits
    started_once_and_succeeds(emulator)


def test_a_finalizer_race_lost_to_another_instance_does_not_strand_the_job(
    emulator: Emulator, operator_runner
) -> None:
    """Two operator instances add the finalizer to a new job at once (kopf peering's start-up
    window, or a second pod next to a partitioned one). The loser's JSON patch fails its
    resourceVersion test (422); its retry then finds the finalizer already there and patches
    nothing, and kopf waits for a further change before it runs the create handler. No such
    change comes: the unobserved-spec timer must start the job anyway, exactly once."""
    add_prerequisites(emulator)
    fault = emulator.inject_fault(
        "finetunejobs", 422, count=1, subresource=None, verbs=("patch",), name="bot",
        message="the JSON patch test failed: resourceVersion",
    )  # fmt: skip
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    wait_for(lambda: fault.served == 1, what="the finalizer patch refused")
    # What the other instance's winning patch left behind.
    emulator.merge_patch("finetunejobs", NS, "bot", {"metadata": {"finalizers": [names.FINALIZER]}})
    started_once_and_succeeds(emulator)
