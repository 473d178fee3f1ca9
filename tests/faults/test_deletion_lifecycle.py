"""Deletion is not failure, and a new job never inherits an old one's children.

The embedded API removes an object's dependents when the object goes (like the garbage
collector with background propagation); it does not delete a namespace's content by itself,
so the tests below do what the namespace controller does, in the order that hurts most.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from finetune_local import Emulator
from finetune_operator.builders import names
from support.cluster import (
    NS,
    add_prerequisites,
    events,
    ftj_body,
    start_operator,
    start_pod,
    status,
    trainer_jobs,
    wait_job,
    wait_phase,
)
from support.ftj_samples import spec
from support.k8s_fixtures import wait_for


def _failed(emulator: Emulator, name: str) -> dict[str, Any] | None:
    for cond in status(emulator, name).get("conditions") or []:
        if cond["type"] == "Failed" and cond["status"] == "True":
            return dict(cond)
    return None


def _terminate_namespace(emulator: Emulator) -> None:
    """What `kubectl delete namespace` starts: the namespace is Terminating, then its content
    is deleted kind by kind — here trainer Jobs, pods and ConfigMaps before FineTuneJobs."""
    emulator.merge_patch("namespaces", None, NS, {"metadata": {"finalizers": ["kubernetes"]}})
    emulator.request_delete("namespaces", None, NS)
    emulator.patch_status("namespaces", None, NS, {"phase": "Terminating"})
    for plural in ("jobs", "pods", "configmaps", "persistentvolumeclaims", "secrets"):
        for obj in emulator.read_all(plural, NS):
            emulator.request_delete(plural, NS, obj["metadata"]["name"])


def test_deleting_the_namespace_fails_no_job_and_warns_about_nothing(
    emulator: Emulator, operator_runner: Any
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    jobs = [f"bot{i}" for i in range(6)]
    for name in jobs:
        emulator.create(ftj_body(name, spec()), keep_status=False)
    for name in jobs[:3]:  # half of them training, half waiting for a pod
        start_pod(emulator, wait_job(emulator, f"{name}-train-g1"))
    for name in jobs:
        wait_for(lambda n=name: status(emulator, n).get("trainerJob"), what=f"{name} started")
    wait_phase(emulator, jobs[0], "Training")

    _terminate_namespace(emulator)
    time.sleep(2.5)  # Job events and several poll intervals (0.2 s) go by
    assert {n: _failed(emulator, n) for n in jobs} == dict.fromkeys(jobs)
    assert [e for n in jobs for e in events(emulator, n) if e["type"] == "Warning"] == []

    for name in jobs:  # the namespace controller reaches the FineTuneJobs last
        emulator.request_delete("finetunejobs", NS, name)
    wait_for(lambda: emulator.read_all("finetunejobs", NS) == [], what="FineTuneJobs gone")


def test_deleting_a_training_job_is_not_reported_as_a_failure(
    emulator: Emulator, operator_runner: Any
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    start_pod(emulator, wait_job(emulator, "bot-train-g1"))
    wait_phase(emulator, "bot", "Training")
    # Its owner (an Argo CD application, a parent object) deletes it in the foreground: the
    # FineTuneJob has a deletionTimestamp while its Job goes first.
    emulator.request_delete("finetunejobs", NS, "bot", propagation="Foreground")
    wait_for(lambda: emulator.read("finetunejobs", NS, "bot") is None, what="deleted")
    assert trainer_jobs(emulator) == []
    assert [e["reason"] for e in events(emulator, "bot") if e["type"] == "Warning"] == []


def _stale_child(emulator: Emulator, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """A child of a deleted FineTuneJob of the same name that the garbage collector has not
    reached yet (its owner's uid no longer exists)."""
    owner = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "name": "bot",
        "uid": str(uuid.uuid4()),
        "controller": True,
        "blockOwnerDeletion": True,
    }
    labels = {names.LABEL_MANAGED_BY: names.MANAGER, names.LABEL_JOB: "bot"}
    meta = {"name": body["name"], "namespace": NS, "labels": labels, "ownerReferences": [owner]}
    return emulator.create({"apiVersion": body["apiVersion"], "kind": kind, "metadata": meta,
                            **body.get("extra", {})})  # fmt: skip


def test_children_of_a_deleted_same_name_job_are_replaced_not_adopted(
    emulator: Emulator, operator_runner: Any
) -> None:
    add_prerequisites(emulator)
    old_cm = _stale_child(
        emulator, "ConfigMap",
        {"apiVersion": "v1", "name": "bot-trainer-g1", "extra": {"data": {"job.yaml": "old"}}},
    )  # fmt: skip
    template = {"metadata": {"labels": {}}, "spec": {"containers": [{"name": "trainer", "image": "old"}],
                "restartPolicy": "Never"}}  # fmt: skip
    old_job = _stale_child(
        emulator, "Job",
        {"apiVersion": "batch/v1", "name": "bot-train-g1", "extra": {"spec": {"template": template}}},
    )  # fmt: skip
    start_operator(emulator, operator_runner)
    new = emulator.create(ftj_body("bot", spec()), keep_status=False)
    uid = new["metadata"]["uid"]

    def owned_by_new(plural: str, name: str) -> dict[str, Any] | None:
        obj = emulator.read(plural, NS, name)
        refs = (obj or {}).get("metadata", {}).get("ownerReferences") or []
        return obj if refs and refs[0]["uid"] == uid else None

    job = wait_for(lambda: owned_by_new("jobs", "bot-train-g1"), what="a fresh trainer Job")
    cm = wait_for(lambda: owned_by_new("configmaps", "bot-trainer-g1"), what="a fresh ConfigMap")
    assert job["metadata"]["uid"] != old_job["metadata"]["uid"]
    assert cm["metadata"]["uid"] != old_cm["metadata"]["uid"]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] != "old"
    wait_for(lambda: status(emulator, "bot").get("trainerJob") == "bot-train-g1", what="recorded")
    assert len(trainer_jobs(emulator)) == 1


def test_a_same_name_object_not_made_by_the_operator_is_left_alone(
    emulator: Emulator, operator_runner: Any
) -> None:
    add_prerequisites(emulator)
    mine = emulator.create({"apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": "bot-trainer-g1", "namespace": NS},
                            "data": {"team": "notes"}})  # fmt: skip
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    failed = wait_for(lambda: _failed(emulator, "bot"), what="a verdict")
    assert failed["reason"] == "ChildNameTaken" and "bot-trainer-g1" in failed["message"]
    kept = emulator.read("configmaps", NS, "bot-trainer-g1")
    assert kept is not None and kept["metadata"]["uid"] == mine["metadata"]["uid"]
    assert trainer_jobs(emulator) == []


def test_fast_create_and_delete_leaves_no_children_behind(
    emulator: Emulator, operator_runner: Any
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    for round_ in range(3):
        names_ = [f"churn{round_}-{i}" for i in range(8)]
        for i, name in enumerate(names_):
            emulator.create(ftj_body(name, spec()), keep_status=False)
            if i % 2:
                emulator.request_delete("finetunejobs", NS, name)  # before the operator acts
        time.sleep(0.05 * round_)
        for name in names_:
            if emulator.read("finetunejobs", NS, name) is not None:
                emulator.request_delete("finetunejobs", NS, name)
        # A Job event while the deletion goes on makes one more reconcile race it.
        for job in trainer_jobs(emulator):
            emulator.merge_patch(
                "jobs", NS, job["metadata"]["name"], {"metadata": {"annotations": {"poke": "1"}}}
            )
    wait_for(lambda: emulator.read_all("finetunejobs", NS) == [], timeout=30, what="all deleted")
    time.sleep(1.0)  # anything still in flight lands
    leftovers = [
        f"{o['kind']}/{o['metadata']['name']}"
        for plural in ("jobs", "configmaps", "services")
        for o in emulator.read_all(plural, NS)
    ]
    assert leftovers == []
