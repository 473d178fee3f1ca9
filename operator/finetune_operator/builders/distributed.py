"""Several GPUs and several nodes: reshape the trainer Job, and the rendezvous Service (pure).

One node with ``resources.gpus > 1``: the Job keeps its single pod; the trainer is told to
start one process per GPU (``--nproc-per-node``), torchrun does the rest inside the pod.

``resources.nodes > 1``: the Job becomes an Indexed Job with one pod per node
(``completions = parallelism = nodes``) and a headless Service gives every pod a DNS name,
``<job>-<index>.<service>``. Pod 0 hosts the rendezvous (torchrun's static master address
and port); each pod's node rank is its completion index, so global rank 0, whose log the
operator reads, always runs in pod 0. One failed pod fails the Job at once
(``backoffLimitPerIndex: 0``, ``maxFailedIndexes: 0``): the Job controller then stops the
other pods, so no survivor waits for a dead peer. See docs/distributed.md and
docs/decisions/0900-torchrun-indexed-job.md and 0901.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..api.finetunejob import FineTuneJobSpec
from .names import LABEL_GENERATION, LABEL_JOB, MAX_NAME

RENDEZVOUS_PORT = 29500
RENDEZVOUS_PORT_NAME = "rendezvous"
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# Seconds a rank waits in a collective for a peer before giving up (the trainer reads it).
DDP_TIMEOUT_SECONDS = 900
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def world_size(spec: FineTuneJobSpec) -> int:
    """Training processes of the run: one per GPU on every node (one per node on CPU)."""
    return max(1, spec.resources.gpus) * spec.resources.nodes


def is_distributed(spec: FineTuneJobSpec) -> bool:
    return spec.resources.gpus > 1 or spec.resources.nodes > 1


def _hash(value: str, length: int = 8) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:length]


def indexed_job_name(job_name: str, nodes: int) -> str:
    """A Job name whose pod hostnames ``<name>-<index>`` are valid DNS labels.

    The API server rejects an Indexed Job when ``<name>-<completions-1>`` is not a DNS label
    (63 characters, no dots). Names that already qualify are kept; others are shortened with
    a stable hash, keeping the ``-train-g<generation>`` ending the planner reads.
    """
    suffix = f"-{nodes - 1}"
    if len(job_name) + len(suffix) <= MAX_NAME and _DNS_LABEL.match(job_name):
        return job_name
    match = re.search(r"-train-g[0-9]+$", job_name)
    ending = match.group(0) if match else ""
    stem = job_name[: len(job_name) - len(ending)] if ending else job_name
    clean = re.sub(r"[^a-z0-9-]", "-", stem.lower()).strip("-") or "ftj"
    tag = _hash(job_name)
    keep = MAX_NAME - len(suffix) - len(ending) - len(tag) - 1
    prefix = clean[:keep].rstrip("-")
    return f"{prefix}-{tag}{ending}" if prefix else f"{tag}{ending}"


def rendezvous_service_name(job_name: str) -> str:
    """The headless Service's name: the Job's own when it is a valid Service name."""
    if len(job_name) <= MAX_NAME and _DNS_1035_LABEL.match(job_name):
        return job_name
    return f"rdzv-{_hash(job_name, 12)}"


def master_address(job_name: str, service_name: str) -> str:
    """DNS name of pod 0 (hostname ``<job>-0`` under the Service's subdomain)."""
    return f"{job_name}-0.{service_name}"


def rendezvous_service(job: Mapping[str, Any], service_name: str) -> dict[str, Any]:
    """Headless Service selecting the Job's pods, so each gets ``<host>.<service>`` in DNS."""
    meta = job["metadata"]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name,
            "namespace": meta["namespace"],
            "labels": dict(pod_labels),
            "annotations": dict(meta.get("annotations") or {}),
            "ownerReferences": list(meta.get("ownerReferences") or []),
        },
        "spec": {
            "clusterIP": "None",
            # Pods are never Ready (no probes) while they rendezvous: publish them anyway.
            "publishNotReadyAddresses": True,
            "selector": {k: pod_labels[k] for k in (LABEL_JOB, LABEL_GENERATION)},
            "ports": [
                {
                    "name": RENDEZVOUS_PORT_NAME,
                    "port": RENDEZVOUS_PORT,
                    "targetPort": RENDEZVOUS_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def launcher_args(spec: FineTuneJobSpec, master: str | None) -> list[str]:
    """Extra ``finetune-trainer train`` options; the node rank comes from the environment."""
    per_node = max(1, spec.resources.gpus)
    args = [f"--nproc-per-node={per_node}"]
    if spec.resources.nodes > 1:
        args += [
            f"--nnodes={spec.resources.nodes}",
            f"--master-addr={master}",
            f"--master-port={RENDEZVOUS_PORT}",
        ]
    return args


def _trainer_container(job: Mapping[str, Any], container_name: str) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == container_name)


def apply(job: dict[str, Any], spec: FineTuneJobSpec, container_name: str) -> dict[str, Any] | None:
    """Reshape the single-GPU trainer ``job`` in place for ``spec``'s GPUs and nodes.

    Returns the headless Service to create with it (multi-node), else None. A spec with one
    GPU on one node leaves the Job untouched.
    """
    if not is_distributed(spec):
        return None
    container = _trainer_container(job, container_name)
    env = container.setdefault("env", [])
    env.append({"name": "FINETUNE_DDP_TIMEOUT_SECONDS", "value": str(DDP_TIMEOUT_SECONDS)})
    # A collective that fails (dead peer, timeout) aborts the process instead of hanging.
    env.append({"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"})
    nodes = spec.resources.nodes
    if nodes == 1:
        container["args"] = [*container["args"], *launcher_args(spec, None)]
        return None

    meta = job["metadata"]
    meta["name"] = indexed_job_name(meta["name"], nodes)
    service_name = rendezvous_service_name(meta["name"])
    container["args"] = [
        *container["args"],
        *launcher_args(spec, master_address(meta["name"], service_name)),
    ]
    env.append(
        {
            "name": COMPLETION_INDEX_ENV,
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
            },
        }
    )
    container["ports"] = [
        {"name": RENDEZVOUS_PORT_NAME, "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}
    ]
    job_spec = job["spec"]
    job_spec["completionMode"] = "Indexed"
    job_spec["completions"] = nodes
    job_spec["parallelism"] = nodes
    # A rank cannot rejoin a running gang: the first failed pod fails the whole Job and the
    # Job controller stops the others.
    job_spec["backoffLimitPerIndex"] = 0
    job_spec["maxFailedIndexes"] = 0
    rules = job_spec.get("podFailurePolicy", {}).get("rules", [])
    # Evicting one pod breaks the gang too: fail at once rather than restart that index.
    job_spec["podFailurePolicy"] = {
        "rules": [r for r in rules if r.get("action") != "Ignore"]
        + [
            {
                "action": "FailJob",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            }
        ]
    }
    job_spec["template"]["spec"]["subdomain"] = service_name
    return rendezvous_service(job, service_name)


# ---------------------------------------------------------------- reading pods


def completion_index(pod: Mapping[str, Any]) -> int | None:
    meta = pod.get("metadata") or {}
    raw = (meta.get("labels") or {}).get(COMPLETION_INDEX_LABEL) or (
        meta.get("annotations") or {}
    ).get(COMPLETION_INDEX_ANNOTATION)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def rank0_pods(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods that run global rank 0: index 0 of an Indexed Job, or every pod otherwise."""
    indexed = [p for p in pods if completion_index(p) is not None]
    if not indexed:
        return list(pods)
    return [p for p in indexed if completion_index(p) == 0]


def _trainer_exit(pod: Mapping[str, Any], container_name: str) -> Mapping[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == container_name:
            terminated = (cs.get("state") or {}).get("terminated")
            return terminated if isinstance(terminated, Mapping) else None
    return None


def status_pod(pods: Sequence[Mapping[str, Any]], container_name: str) -> Mapping[str, Any] | None:
    """The pod whose state explains the run: the first pod whose trainer failed (the cause,
    not the peers the Job controller stopped afterwards), else the newest rank-0 pod."""
    failed = [
        (str(term.get("finishedAt") or ""), p)
        for p in pods
        if (term := _trainer_exit(p, container_name)) is not None and term.get("exitCode", 0) != 0
    ]
    if len({completion_index(p) for p in pods}) > 1 and failed:
        return min(failed, key=lambda item: item[0])[1]
    candidates = rank0_pods(pods) or list(pods)
    if not candidates:
        return None
    return max(
        candidates,
        key=lambda p: (
            str((p.get("metadata") or {}).get("creationTimestamp") or ""),
            str((p.get("metadata") or {}).get("name") or ""),
        ),
    )
