"""The real operator against the emulated API: a two-node FineTuneJob from apply to delete.

The test plays the Job controller (one pod per completion index) and the trainer (rank 0's
progress lines in pod 0's log, nothing in pod 1's), as the controller tests do.
"""

from __future__ import annotations

import json
from typing import Any

import kopf
from finetune_local import Emulator
from finetune_operator.api.trainer_config import PROGRESS_PREFIX
from finetune_operator.clients.kube import KubeClient
from finetune_operator.config import OperatorConfig
from specs import spec_dict
from support.k8s_fixtures import wait_for

NS = "default"
FAST = OperatorConfig(
    progress_poll_seconds=0.2,
    metrics_port=0,
    operator_namespace="finetune-system",
    status_write_retries=5,
    retry_seconds=0.5,
)
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def line(obj: dict[str, Any]) -> str:
    return PROGRESS_PREFIX + json.dumps(obj)


def status(em: Emulator) -> dict[str, Any]:
    return dict((em.read("finetunejobs", NS, "bot") or {}).get("status") or {})


def start_indexed_pod(em: Emulator, job: dict[str, Any], index: int) -> str:
    template = job["spec"]["template"]
    name = f"{job['metadata']['name']}-{index}-x"
    em.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NS,
                "labels": {**template["metadata"]["labels"], INDEX_LABEL: str(index)},
                "annotations": {INDEX_LABEL: str(index)},
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": job["metadata"]["name"],
                        "uid": job["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": {**template["spec"], "hostname": f"{job['metadata']['name']}-{index}"},
        },
        keep_status=False,
    )
    em.patch_status(
        "pods",
        NS,
        name,
        {
            "phase": "Running",
            "startTime": "2026-01-01T00:00:00Z",
            "containerStatuses": [
                {"name": "trainer", "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}
            ],
        },
    )
    return name


def test_two_node_job_runs_reports_rank0_progress_and_cleans_up(
    emulator: Emulator,
    operator_runner: Any,
) -> None:
    import finetune_operator.main  # noqa: F401  (registers the handlers)

    for claim in ("datasets", "adapters"):
        emulator.create(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": NS},
                "spec": {},
            }
        )
    memo = kopf.Memo(config=FAST, kube=KubeClient.from_url(str(emulator.url)))
    operator_runner(memo=memo, namespaces=[NS])
    emulator.create(
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "bot", "namespace": NS},
            "spec": spec_dict(gpus=4, nodes=2),
        },
        keep_status=False,
    )

    job = wait_for(lambda: emulator.read("jobs", NS, "bot-train-g1"), what="trainer Job")
    service = wait_for(lambda: emulator.read("services", NS, "bot-train-g1"), what="Service")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 2
    assert job["spec"]["template"]["spec"]["subdomain"] == "bot-train-g1"
    owner_uid = emulator.read("finetunejobs", NS, "bot")["metadata"]["uid"]
    assert service["metadata"]["ownerReferences"][0]["uid"] == owner_uid
    assert service["spec"]["clusterIP"] == "None"
    # The status is written right after the children are created: wait for it.
    st = wait_for(lambda: status(emulator).get("trainerJob"), what="status.trainerJob")
    assert st == "bot-train-g1"

    # Pod 1 is newer and silent (rank > 0); progress must come from pod 0.
    pod0 = start_indexed_pod(emulator, job, 0)
    pod1 = start_indexed_pod(emulator, job, 1)
    emulator.set_pod_log(NS, pod1, "worker log without protocol lines\n")
    progress = {
        "type": "progress",
        "step": 3,
        "totalSteps": 10,
        "epoch": 0.3,
        "loss": 1.2,
        "tokensPerSecond": 13000.0,
        "updatedAt": "2026-01-01T00:01:00Z",
    }
    emulator.set_pod_log(NS, pod0, line(progress) + "\n")
    st = wait_for(
        lambda: status(emulator) if (status(emulator).get("progress") or {}).get("step") else None,
        what="progress from pod 0",
    )
    assert st["progress"]["step"] == 3 and st["progress"]["tokensPerSecond"] == 13000.0
    assert st["phase"] == "Training"
    assert "restarts" not in st

    emulator.request_delete("finetunejobs", NS, "bot")
    wait_for(lambda: emulator.read("finetunejobs", NS, "bot") is None, what="FineTuneJob gone")
    wait_for(lambda: emulator.read("services", NS, "bot-train-g1") is None, what="Service deleted")
    assert emulator.read("jobs", NS, "bot-train-g1") is None
