"""FineTuneJobs, their trainer Jobs and trainer pods as the operator's watches last saw them
(decision 1650).

Three kopf indexes, fed by label-selected watches, hold what a reconcile used to ask the API
server for on every poll: the FineTuneJob itself, its trainer Job and the Job's pods. kopf
fills them from its initial listing before any handler runs and keeps them current from the
watch streams, so a reconcile triggered by a Job or Pod event, or by the poll of a running
job, reads its children from memory; only the trainer's log (progress) costs a request.

What is taken from memory must be provably what the server holds:

- a FineTuneJob is used only when the watch shows exactly the resourceVersion this operator
  last read or wrote for it (``resourceVersion`` is opaque: equality, never ordering); any
  other version means a write the operator has not reconciled yet, and it is read again;
- a trainer Job only when its controller owner reference names this FineTuneJob's uid (a
  leftover of a deleted job of the same name is never taken for this one's, decision 1621),
  and its pods only when theirs names that Job's uid;
- a trainer Job missing from memory is asked for (it may have been created a moment ago),
  so a lagging watch can never make a run look lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import kopf

from ..api.common import GROUP, VERSION
from ..api.finetunejob import PLURAL, parse_status
from ..builders import distributed, names
from ..builders.trainer import TRAINER_CONTAINER
from ..planners.finetunejob import is_settled

# Only children the operator made are indexed: the API server filters Jobs (kopf's
# settings.watching.label_selectors); pods are filtered here, since the one pod watch also
# serves the AdapterDeployment controller, whose serving pods carry no label of ours.
CHILD_LABELS = {names.LABEL_MANAGED_BY: names.MANAGER}
CHILD_SELECTOR = ",".join(f"{key}={value}" for key, value in CHILD_LABELS.items())
# kubectl's copy of the applied manifest: as large as the object and never read here.
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

Key = tuple[str, str]  # (namespace, FineTuneJob label value)
# kopf's live index of objects by Key (of FineTuneJobs: by (namespace, name)).
ObjectIndex = kopf.Index[Key, dict[str, Any]]


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """The object as the watch delivered it, without what no reconcile reads
    (managedFields, kubectl's last-applied copy): those are most of an object's size."""
    raw = dict(body)
    meta = {k: v for k, v in dict(raw.get("metadata") or {}).items() if k != "managedFields"}
    annotations = meta.get("annotations")
    if isinstance(annotations, Mapping) and LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    raw["metadata"] = meta
    return raw


def job_snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A trainer Job without its pod template: the planner reads the Job's own settings and
    status, never the template it was built from (the pods show what runs)."""
    raw = snapshot(body)
    raw["spec"] = {k: v for k, v in dict(raw.get("spec") or {}).items() if k != "template"}
    return raw


def pod_snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A trainer pod's metadata and status: the planner reads no pod spec but the node."""
    raw = snapshot(body)
    node = dict(raw.get("spec") or {}).get("nodeName")
    raw["spec"] = {"nodeName": node} if node else {}
    return raw


def owner_key(namespace: str | None, labels: Mapping[str, Any]) -> Key | None:
    job = labels.get(names.LABEL_JOB)
    return (str(namespace), str(job)) if job else None


# Marks the short form kept of a settled FineTuneJob (finished for its current spec).
SETTLED = "finetune.dev/settled"


def settled_stub(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """What is kept of a settled FineTuneJob: enough to know it is settled and which version
    that is, not its spec and results (finished jobs pile up; their memory should not)."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    if not is_settled(parse_status(status), int(meta.get("generation") or 1)):
        return None
    kept = ("name", "namespace", "uid", "resourceVersion", "generation", "deletionTimestamp")
    return {
        SETTLED: True,
        "metadata": {k: meta[k] for k in kept if k in meta},
        "status": {k: status[k] for k in ("phase", "observedGeneration") if k in status},
    }


@kopf.index(GROUP, VERSION, PLURAL)
def ftj_watched(
    name: str, namespace: str | None, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """(namespace, name) -> the FineTuneJob as last seen (a settled one in short)."""
    return {(str(namespace), name): settled_stub(body) or snapshot(body)}


@kopf.index("batch", "v1", "jobs", labels=CHILD_LABELS)
def ftj_trainer_jobs(
    namespace: str | None, labels: Mapping[str, Any], body: kopf.Body, **_: Any
) -> dict[Key, dict[str, Any]] | None:
    """(namespace, FineTuneJob label) -> its trainer Jobs as last seen."""
    key = owner_key(namespace, labels)
    return {key: job_snapshot(body)} if key else None


@kopf.index("", "v1", "pods", labels=CHILD_LABELS)
def ftj_trainer_pods(
    namespace: str | None, labels: Mapping[str, Any], body: kopf.Body, **_: Any
) -> dict[Key, dict[str, Any]] | None:
    """(namespace, FineTuneJob label) -> its trainer pods as last seen."""
    key = owner_key(namespace, labels)
    return {key: pod_snapshot(body)} if key else None


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid") or "")
    return None


def trainer_running(pod: Mapping[str, Any]) -> bool:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == TRAINER_CONTAINER:
            return "running" in (cs.get("state") or {})
    return False


def trainer_ended(pod: Mapping[str, Any]) -> bool:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == TRAINER_CONTAINER:
            return "terminated" in (cs.get("state") or {})
    return False


class WatchedObjects:
    """Reads of the three indexes, with the freshness rules of the module docstring."""

    def __init__(self) -> None:
        self.ftjs: ObjectIndex | None = None  # kopf's live indexes, handed over at startup
        self.jobs: ObjectIndex | None = None
        self.pods: ObjectIndex | None = None
        # (namespace, name) -> resourceVersion this operator last read or wrote.
        self.known_versions: dict[tuple[str, str], str] = {}

    def _values(self, index: ObjectIndex | None, key: Key) -> Iterable[dict[str, Any]]:
        if index is None:
            return ()
        store = index.get(key)
        return list(store) if store is not None else ()

    def remember(self, body: Mapping[str, Any] | None) -> None:
        """The FineTuneJob as read from or written to the server just now."""
        meta = (body or {}).get("metadata") or {}
        if meta.get("name") and meta.get("resourceVersion"):
            key = (str(meta.get("namespace")), str(meta["name"]))
            self.known_versions[key] = str(meta["resourceVersion"])

    def forget(self, namespace: str, name: str) -> None:
        self.known_versions.pop((namespace, name), None)

    def seen_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The FineTuneJob as last seen, whatever its version (for decisions that cost
        nothing when wrong, such as whether a poll is worth a request)."""
        return next(iter(self._values(self.ftjs, (namespace, name))), None)

    def fresh_ftj(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The FineTuneJob from the watch, when it is the version last read or written."""
        body = self.seen_ftj(namespace, name)
        known = self.known_versions.get((namespace, name))
        if body is None or known is None:
            return None
        return body if (body.get("metadata") or {}).get("resourceVersion") == known else None

    def job(
        self, namespace: str, owner: str, owner_uid: str, job_name: str
    ) -> dict[str, Any] | None:
        """The trainer Job ``job_name`` of the FineTuneJob with uid ``owner_uid``, if seen."""
        for job in self._values(self.jobs, (namespace, names.label_value(owner))):
            meta = job.get("metadata") or {}
            if meta.get("name") == job_name and controller_uid(job) == owner_uid:
                return job
        return None

    def job_pods(self, namespace: str, owner: str, job: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The pods the Job controller made for ``job`` (matched by the Job's uid)."""
        job_uid = str((job.get("metadata") or {}).get("uid") or "")
        return [
            pod
            for pod in self._values(self.pods, (namespace, names.label_value(owner)))
            if controller_uid(pod) == job_uid
        ]

    def owner_of_pod(self, pod: Mapping[str, Any]) -> str | None:
        """The FineTuneJob name of a trainer pod, through its Job's owner reference."""
        meta = pod.get("metadata") or {}
        key = owner_key(meta.get("namespace"), meta.get("labels") or {})
        job_uid = controller_uid(pod)
        if key is None or not job_uid:
            return None
        for job in self._values(self.jobs, key):
            if (job.get("metadata") or {}).get("uid") == job_uid:
                return ftj_owner_name(job)
        return None

    def trainer_is_running(self, namespace: str, name: str) -> bool:
        """Whether the current run's rank-0 trainer container runs (its log may move)."""
        body = self.seen_ftj(namespace, name)
        if body is None:
            return False
        job_name = (body.get("status") or {}).get("trainerJob")
        uid = str((body.get("metadata") or {}).get("uid") or "")
        job = self.job(namespace, name, uid, str(job_name)) if job_name else None
        if job is None:
            return False
        return any(
            trainer_running(p) for p in distributed.rank0_pods(self.job_pods(namespace, name, job))
        )


def ftj_owner_name(obj: Mapping[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "FineTuneJob" and ref.get("name"):
            return str(ref["name"])
    return None
