"""A trainer pod evicted mid-training, and two operator replicas at once."""

from __future__ import annotations

import json
from collections import Counter

import kopf
import pytest
from finetune_local import Emulator
from finetune_operator.clients.kube import KubeClient
from support.cluster import (
    FAST,
    NS,
    add_prerequisites,
    condition,
    events,
    ftj_body,
    start_operator,
    start_pod,
    status,
    trainer_jobs,
    wait_job,
    wait_phase,
)
from support.ftj_samples import channel, progress_line, result, spec
from support.k8s_fixtures import wait_for

JOB = "bot-train-g1"


def evict(emulator: Emulator, pod: str) -> None:
    """What the eviction API and the kubelet leave behind: DisruptionTarget, then Failed."""
    emulator.patch_status(
        "pods", NS, pod,
        {"conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
             "message": "Eviction API: evicting"},
        ]},
    )  # fmt: skip
    emulator.terminate_container(NS, pod, exit_code=143, reason="Error", container="trainer")


def test_evicted_trainer_resumes_without_a_failure(emulator: Emulator, operator_runner) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    job = wait_job(emulator, JOB)
    # The Job tolerates evictions: they do not count against backoffLimit.
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    first = start_pod(emulator, job, "a")
    emulator.set_pod_log(NS, first, progress_line(4, 10) + "\n")
    wait_for(lambda: (status(emulator, "bot").get("progress") or {}).get("step") == 4)

    evict(emulator, first)
    second = start_pod(emulator, job, "b")  # the Job controller replaces the pod
    emulator.set_pod_log(NS, second, progress_line(6, 10) + "\n")  # resumed from checkpoint
    st = wait_for(
        lambda: status(emulator, "bot")
        if (status(emulator, "bot").get("progress") or {}).get("step") == 6 else None,
        what=lambda: f"progress from the new pod: {status(emulator, 'bot')}",
    )  # fmt: skip
    assert st["restarts"] == 1
    assert st["phase"] == "Training"
    failed = condition(emulator, "bot", "Failed")
    assert failed is None or failed["status"] != "True"

    emulator.terminate_container(
        NS, second, exit_code=0, message=json.dumps(result()), container="trainer"
    )
    emulator.set_job_finished(NS, JOB, succeeded=True)
    st = wait_phase(emulator, "bot", "Succeeded")
    assert st["restarts"] == 1
    assert [j["metadata"]["name"] for j in trainer_jobs(emulator)] == [JOB]
    assert not any(e["type"] == "Warning" for e in events(emulator, "bot")), events(emulator, "bot")


def _replica(emulator: Emulator, operator_runner, *, peering: str | None, priority: int = 0):
    import finetune_operator.main  # noqa: F401

    memo = kopf.Memo(config=FAST, kube=KubeClient.from_url(str(emulator.url)))
    return operator_runner(memo=memo, namespaces=[NS], peering=peering, priority=priority)


def _kopf_peering(emulator: Emulator) -> None:
    emulator.create(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
         "metadata": {"name": "finetune", "namespace": NS}, "status": {}}
    )  # fmt: skip


@pytest.mark.parametrize("peering", [True, False], ids=["kopf-peering", "standalone-pair"])
def test_two_replicas_make_one_job(emulator: Emulator, operator_runner, peering: bool) -> None:
    """With peering only the higher-priority replica acts; even two standalone replicas (the
    chart runs one, see decision 0701) race to a single Job: children have fixed names and a
    create that meets an existing child adopts it."""
    add_prerequisites(emulator)
    if peering:
        _kopf_peering(emulator)
    name = "finetune" if peering else None
    _replica(emulator, operator_runner, peering=name, priority=100)
    _replica(emulator, operator_runner, peering=name, priority=10)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    # Both replicas may act for a moment at start-up, before the low-priority one has seen
    # its peer; when it wins the finalizer race and pauses, the unobserved-spec timer starts
    # the job (decision 1207).
    job = wait_job(emulator, JOB, timeout=30)
    pod = start_pod(emulator, job)
    emulator.set_pod_log(NS, pod, channel({"type": "progress", "step": 1, "totalSteps": 2}) + "\n")
    emulator.terminate_container(
        NS, pod, exit_code=0, message=json.dumps(result()), container="trainer"
    )
    emulator.set_job_finished(NS, JOB, succeeded=True)
    wait_phase(emulator, "bot", "Succeeded", timeout=30)
    wait_for(lambda: any(e["reason"] == "Succeeded" for e in events(emulator, "bot")))
    assert [j["metadata"]["name"] for j in trainer_jobs(emulator)] == [JOB]
    assert len(emulator.read_all("configmaps", NS)) == 1
    reasons = Counter(e["reason"] for e in events(emulator, "bot"))
    if peering:
        # Only one replica acted: every event once.
        assert reasons["JobCreated"] == 1 and reasons["Succeeded"] == 1, reasons
        assert all(n <= 2 for n in reasons.values()), reasons
