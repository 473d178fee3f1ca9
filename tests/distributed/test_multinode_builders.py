"""Trainer Jobs for several GPUs and nodes: rendered objects, checked field by field."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import kubernetes_validate
import pytest
from finetune_operator.api.finetunejob import FineTuneJobStatus
from finetune_operator.builders import distributed, names, owner_reference, trainer_job
from finetune_operator.builders.trainer import KUEUE_QUEUE_LABEL, TRAINER_CONTAINER
from finetune_operator.config import OperatorConfig
from finetune_operator.planners.finetunejob import Observed, plan
from specs import spec, spec_dict

CONFIG = OperatorConfig(trainer_image="registry.example/trainer:1.0")
OWNER = owner_reference("FineTuneJob", "bot", "uid-1")
K8S = "1.33.0"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def render(name: str = "bot", **resources: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    parsed = spec(**resources)
    job = trainer_job(name, "team-a", 3, parsed, OWNER, CONFIG, "hash123")
    service = distributed.apply(job, parsed, TRAINER_CONTAINER)
    return job, service


def trainer(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == TRAINER_CONTAINER)


def env(job: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in trainer(job)["env"]}


def option(job: dict[str, Any], name: str) -> str | None:
    for arg in trainer(job)["args"]:
        if arg.startswith(f"--{name}="):
            return str(arg.split("=", 1)[1])
    return None


# ---------------------------------------------------------------- table of specs

CASES = [
    # (id, resources, world size, indexed)
    ("one-gpu", {"gpus": 1}, 1, False),
    ("four-gpus-one-node", {"gpus": 4}, 4, False),
    ("two-nodes-of-eight", {"gpus": 8, "nodes": 2}, 16, True),
    ("four-nodes-queued", {"gpus": 2, "nodes": 4, "queueName": "team-a-gpus"}, 8, True),
    ("three-cpu-nodes", {"gpus": 0, "nodes": 3}, 3, True),
]


@pytest.mark.parametrize(
    ("resources", "world", "indexed"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rendered_objects_are_valid_and_shaped_for_the_world_size(
    resources: dict[str, Any], world: int, indexed: bool
) -> None:
    job, service = render(**resources)
    kubernetes_validate.validate(job, K8S, strict=True)
    parsed = spec(**resources)
    assert distributed.world_size(parsed) == world
    nodes = resources.get("nodes", 1)
    gpus = resources["gpus"]
    js = job["spec"]
    if gpus > 0:
        assert trainer(job)["resources"]["limits"]["nvidia.com/gpu"] == gpus  # per pod
    if world == 1:
        assert trainer(job)["args"] == ["train", "--config", "/etc/finetune/job.yaml"]
        assert service is None
        assert "completionMode" not in js
        return
    assert option(job, "nproc-per-node") == str(max(1, gpus))
    assert env(job)["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert int(env(job)["FINETUNE_DDP_TIMEOUT_SECONDS"]) > 0
    if not indexed:
        assert service is None
        assert (js["completions"], js["parallelism"]) == (1, 1)
        assert "completionMode" not in js and "subdomain" not in js["template"]["spec"]
        assert option(job, "nnodes") is None
        return

    assert service is not None
    kubernetes_validate.validate(service, K8S, strict=True)
    job_name = job["metadata"]["name"]
    svc_name = service["metadata"]["name"]
    # Indexed Job: one pod per node, all at once.
    assert js["completionMode"] == "Indexed"
    assert js["completions"] == js["parallelism"] == nodes
    # Fail fast: one failed index fails the Job; no index is retried alone.
    assert js["backoffLimitPerIndex"] == 0
    assert js["maxFailedIndexes"] == 0
    rules = js["podFailurePolicy"]["rules"]
    assert all(r["action"] != "Ignore" for r in rules)
    assert {
        "action": "FailJob",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    } in rules
    exit_rule = next(r for r in rules if "onExitCodes" in r)
    assert exit_rule["action"] == "FailJob" and exit_rule["onExitCodes"]["values"] == [2, 3]
    # Rendezvous: pod 0's DNS name under the headless Service, static port.
    pod_spec = js["template"]["spec"]
    assert pod_spec["subdomain"] == svc_name
    assert option(job, "nnodes") == str(nodes)
    assert option(job, "master-addr") == f"{job_name}-0.{svc_name}"
    assert option(job, "master-port") == "29500"
    assert option(job, "node-rank") is None  # comes from JOB_COMPLETION_INDEX
    assert env(job)["JOB_COMPLETION_INDEX"] == {
        "fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        }
    }
    assert trainer(job)["ports"] == [
        {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"}
    ]
    # Headless Service selecting exactly this run's pods, ready or not.
    ss = service["spec"]
    assert ss["clusterIP"] == "None"
    assert ss["publishNotReadyAddresses"] is True
    assert ss["ports"] == [
        {"name": "rendezvous", "port": 29500, "targetPort": 29500, "protocol": "TCP"}
    ]
    pod_labels = js["template"]["metadata"]["labels"]
    assert ss["selector"] == {
        names.LABEL_JOB: "bot",
        names.LABEL_GENERATION: "3",
    }
    assert all(pod_labels[k] == v for k, v in ss["selector"].items())
    assert service["metadata"]["ownerReferences"] == [OWNER]
    assert service["metadata"]["namespace"] == "team-a"
    # Kueue: the queue label is on the Job, which starts suspended; Kueue admits all pods.
    if resources.get("queueName"):
        assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == resources["queueName"]
        assert js["suspend"] is True
    # Every pod hostname <job>-<index> is a DNS label (the API server checks the last one).
    assert DNS_LABEL.match(f"{job_name}-{nodes - 1}") and len(f"{job_name}-{nodes - 1}") <= 63


def test_single_node_jobs_keep_their_retry_rules() -> None:
    one, _ = render(gpus=1)
    four, _ = render(gpus=4)
    assert four["spec"]["podFailurePolicy"] == one["spec"]["podFailurePolicy"]
    assert four["metadata"]["name"] == one["metadata"]["name"] == "bot-train-g3"


@pytest.mark.parametrize(
    "name",
    [
        "bot",
        "team.support.bot",  # dots: fine for a Job, not for a pod hostname
        "a" * 60,  # long: <job>-<index> would pass 63 characters
        "9lives",  # starts with a digit: fine for a Job, not for a Service
    ],
)
def test_names_of_multi_node_children_are_valid_dns_labels(name: str) -> None:
    job, service = render(name, gpus=8, nodes=12)
    assert service is not None
    job_name = job["metadata"]["name"]
    assert DNS_LABEL.match(f"{job_name}-11") and len(f"{job_name}-11") <= 63
    assert job_name.endswith("-train-g3")  # the planner reads the generation from it
    assert re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", service["metadata"]["name"])
    kubernetes_validate.validate(job, K8S, strict=True)
    kubernetes_validate.validate(service, K8S, strict=True)
    # Deterministic: a retried create meets the same objects.
    again, again_svc = render(name, gpus=8, nodes=12)
    assert again["metadata"]["name"] == job_name
    assert again_svc is not None and again_svc["metadata"]["name"] == service["metadata"]["name"]


def test_dotted_names_do_not_collide_with_dashed_ones() -> None:
    dotted, _ = render("a.b", gpus=1, nodes=2)
    dashed, _ = render("a-b", gpus=1, nodes=2)
    assert dotted["metadata"]["name"] != dashed["metadata"]["name"]


# ---------------------------------------------------------------- through the planner

NOW = datetime(2026, 1, 1, 1, 0, 10, tzinfo=UTC)


def observe(raw_spec: dict[str, Any], **kwargs: Any) -> Observed:
    base: dict[str, Any] = {
        "name": "bot",
        "namespace": "ns",
        "uid": "u1",
        "generation": 1,
        "status": FineTuneJobStatus(),
        "now": NOW,
    }
    base.update(kwargs)
    return Observed(spec=raw_spec, **base)


def test_planner_creates_configmap_service_then_indexed_job() -> None:
    p = plan(observe(spec_dict(gpus=4, nodes=2, queueName="gpus")), OperatorConfig())
    assert [a.kind for a in p.actions] == ["ConfigMap", "Service", "Job"]
    job = p.actions[2].body
    assert job is not None
    assert p.status.trainer_job == job["metadata"]["name"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert p.status.phase == "Queued"
    fits = next(c for c in p.status.conditions if c.type == "Fits")
    assert fits.status == "True", fits


def test_planner_creates_no_service_for_one_node() -> None:
    p = plan(observe(spec_dict(gpus=4)), OperatorConfig())
    assert [a.kind for a in p.actions] == ["ConfigMap", "Job"]


def indexed_pod(
    index: int, *, exit_code: int | None = None, finished: str = "", message: str = ""
) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {"startedAt": "2026-01-01T00:00:10Z"}}
    if exit_code is not None:
        state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": "Error" if exit_code else "Completed",
                "startedAt": "2026-01-01T00:00:10Z",
                "finishedAt": finished,
                "message": message,
            }
        }
    return {
        "metadata": {
            "name": f"bot-train-g1-{index}-x",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "status": {
            "phase": "Failed" if exit_code else "Running",
            "startTime": "2026-01-01T00:00:10Z",
            "containerStatuses": [{"name": TRAINER_CONTAINER, "state": state}],
        },
    }


def test_the_first_failed_rank_explains_a_multi_node_failure() -> None:
    raw = spec_dict(gpus=2, nodes=2)
    first = plan(observe(raw), OperatorConfig())
    job = next(a.body for a in first.actions if a.kind == "Job")
    cm = next(a.body for a in first.actions if a.kind == "ConfigMap")
    assert job is not None
    job = {
        **job,
        "status": {
            "failed": 2,
            "failedIndexes": "0,1",
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "MaxFailedIndexesExceeded"}
            ],
        },
    }
    oom = (
        '{"type":"result","ok":false,"reason":"OutOfMemory","message":"rank 3 failed: '
        'out of GPU memory at batch size 4"}'
    )
    killed = (
        '{"type":"result","ok":false,"reason":"TrainingFailed","message":"a training '
        'process was killed"}'
    )
    pods = (
        # Pod 0 was stopped by the Job controller after pod 1 failed.
        indexed_pod(0, exit_code=4, finished="2026-01-01T00:05:09Z", message=killed),
        indexed_pod(1, exit_code=4, finished="2026-01-01T00:05:00Z", message=oom),
    )
    p = plan(observe(raw, status=first.status, job=job, configmap=cm, pods=pods), OperatorConfig())
    failed = next(c for c in p.status.conditions if c.type == "Failed")
    assert failed.status == "True"
    assert failed.reason == "OutOfMemory"
    assert "rank 3" in failed.message
    # Two pods of one run are no restart; cost counts both pods' GPUs.
    assert p.status.restarts is None
    assert p.status.cost.gpu_seconds == pytest.approx(2 * (290 + 299))


def test_rank0_pod_is_chosen_for_progress() -> None:
    pods = [indexed_pod(1), indexed_pod(0)]
    assert [distributed.completion_index(p) for p in distributed.rank0_pods(pods)] == [0]
    plain = [{"metadata": {"name": "p"}}]
    assert distributed.rank0_pods(plain) == plain
