"""The data probe of a FineTuneSchedule: a short Job that fingerprints the training data.

The operator never mounts or reads tenant data itself (decision 1802). For a schedule with
``trigger.onDataChange`` it starts this Job in the tenant's namespace, with the tenant's own
claims (read-only) and credentials Secrets; each container prints the fingerprint of one data
source (``python -m finetune_trainer.fingerprint``) in its termination message, which the
operator reads from the pod status it already watches.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ..domain.uris import StorageUri
from .names import LABEL_MANAGED_BY, MANAGER
from .trainer import PVC_ROOT

LABEL_PROBE = "finetune.dev/data-probe"
PROBE_CONTAINER_PREFIX = "fingerprint-"
PROBE_DEADLINE_SECONDS = 600
PROBE_TTL_SECONDS = 3600
# A probe container's result is small JSON; anything else is quoted this far in a message.
MESSAGE_LIMIT = 300


def data_sources(ftj_spec: Mapping[str, Any]) -> list[tuple[str, str, str | None]]:
    """(role, uri, credentials Secret) of the training data sources of a FineTuneJob spec."""
    dataset = ftj_spec.get("dataset") or {}
    sources = []
    for role in ("train", "eval"):
        source = dataset.get(role) or {}
        if source.get("uri"):
            secret = (source.get("credentialsSecretRef") or {}).get("name")
            sources.append((role, str(source["uri"]), secret))
    return sources


TERMINATION_LOG = "/dev/termination-log"


def _claim(uri: str) -> str | None:
    parsed = StorageUri.parse(uri)
    return parsed.claim if parsed.scheme == "pvc" else None


def probe_job(
    name: str,
    namespace: str,
    schedule_label: str,
    owner: dict[str, Any],
    ftj_spec: Mapping[str, Any],
    image: str,
    pull_policy: str,
) -> dict[str, Any]:
    """The probe Job for the schedule's data sources (no service account token, read-only)."""
    labels = {LABEL_MANAGED_BY: MANAGER, "finetune.dev/schedule": schedule_label, LABEL_PROBE: name}
    claims = sorted({c for _, uri, _ in data_sources(ftj_spec) if (c := _claim(uri))})
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    for i, claim in enumerate(claims):
        volumes.append(
            {"name": f"data-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": f"data-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
    containers = []
    for role, uri, secret in data_sources(ftj_spec):
        container: dict[str, Any] = {
            "name": PROBE_CONTAINER_PREFIX + role,
            "image": image,
            "imagePullPolicy": pull_policy,
            "command": ["python", "-m", "finetune_trainer.fingerprint"],
            # The result path named explicitly, as the kubelet reads it: a runner that maps
            # container paths to local ones (the local executor) then finds it too.
            "args": ["--uri", uri, "--pvc-root", PVC_ROOT, "--termination-log", TERMINATION_LOG],
            "terminationMessagePath": TERMINATION_LOG,
            "env": [{"name": "HOME", "value": "/tmp"}],
            "volumeMounts": mounts,
            "terminationMessagePolicy": "File",
            "resources": {
                "requests": {"cpu": "50m", "memory": "128Mi"},
                "limits": {"memory": "512Mi"},
            },
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "runAsNonRoot": True,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        }
        if secret:
            container["envFrom"] = [{"secretRef": {"name": secret}}]  # values stay in the Secret
        containers.append(container)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": PROBE_DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": PROBE_TTL_SECONDS,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "containers": containers,
                    "volumes": volumes,
                },
            },
        },
    }


def probe_result(job: Mapping[str, Any], pods: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """What a probe found: ``{"digest": ...}`` or ``{"error": ...}``; None while it runs.

    The digest combines every source's fingerprint (train and eval); any container failing
    makes the whole probe fail with its message.
    """
    job_failed = any(
        c.get("type") == "Failed" and c.get("status") == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )
    for pod in pods:
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        done = [s for s in statuses if "terminated" in (s.get("state") or {})]
        if not statuses or len(done) < len(statuses):
            continue
        parts: list[str] = []
        for status in sorted(done, key=lambda s: str(s.get("name"))):
            term = status["state"]["terminated"]
            message = str(term.get("message") or "")
            try:
                found = json.loads(message)
            except ValueError:
                found = {}
            if not isinstance(found, dict):
                found = {}
            if term.get("exitCode") != 0 or not str(found.get("digest") or "").startswith(
                "sha256:"
            ):
                why = found.get("error") or message or term.get("reason") or "no result"
                return {"error": f"{status.get('name')}: {str(why)[:MESSAGE_LIMIT]}"}
            parts.append(f"{status.get('name')}={found['digest']}")
        combined = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        return {"digest": "sha256:" + combined}
    if job_failed:
        return {"error": "the probe pod did not finish (deadline, image pull or scheduling): "
                "kubectl describe job " + str((job.get("metadata") or {}).get("name"))}  # fmt: skip
    return None
