"""The real operator against the embedded API with a platform policy: a job outside it ends
with PolicyViolation, nothing is created and nothing is retried; the namespace's GPUs are
counted across jobs applied together and freed when a run finishes."""

from __future__ import annotations

import dataclasses
import time

from finetune_local import Emulator
from finetune_operator.policy import load_policy
from support.cluster import (
    FAST,
    NS,
    add_prerequisites,
    events,
    ftj_body,
    operator,
    start_operator,
    status,
    trainer_jobs,
    wait_condition,
    wait_job,
    wait_phase,
)
from support.ftj_samples import spec
from support.k8s_fixtures import wait_for

POLICY = load_policy(
    {
        "FINETUNE_POLICY_ALLOWED_IMAGES": "ghcr.io/finetune-dev/*",
        "FINETUNE_POLICY_MAX_GPUS_PER_NAMESPACE": "4",
        "FINETUNE_POLICY_FORBIDDEN_TOLERATIONS": '[{"key": "dedicated", "value": "serving"}]',
    }
)
CONFIG = dataclasses.replace(FAST, policy=POLICY)


def quiet_version(emulator: Emulator, name: str, quiet: float = 0.5) -> str:
    """The object's resourceVersion once it has not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + 10
    version = emulator.read("finetunejobs", NS, name)["metadata"]["resourceVersion"]
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = emulator.read("finetunejobs", NS, name)["metadata"]["resourceVersion"]
        if now == version:
            return str(version)
        version = now
    raise AssertionError(f"{name} kept changing")


def test_a_job_outside_the_policy_gets_policy_violation_and_no_children(
    emulator: Emulator, operator_runner
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner, CONFIG)
    bad = spec(
        image="docker.io/someone/miner:latest",
        resources={"tolerations": [{"operator": "Exists"}]},
    )
    emulator.create(ftj_body("bad", bad), keep_status=False)
    emulator.create(ftj_body("good", spec()), keep_status=False)
    cond = wait_condition(emulator, "bad", "Validated", "False", "PolicyViolation")
    assert "spec.image" in cond["message"] and "operator.policy.allowedImages" in cond["message"]
    assert "spec.resources.tolerations[0]" in cond["message"]
    assert "operator.policy.forbiddenTolerations" in cond["message"]
    wait_condition(emulator, "bad", "Failed", "True", "PolicyViolation")
    wait_for(lambda: any(e["reason"] == "PolicyViolation" for e in events(emulator, "bad")))
    wait_job(emulator, "good-train-g1")

    # Terminal: once kopf has recorded the outcome, no retry loop writes it again while
    # nothing changes (the operator retries temporary errors every 0.5 s here).
    version = quiet_version(emulator, "bad")
    time.sleep(2.0)
    assert emulator.read("finetunejobs", NS, "bad")["metadata"]["resourceVersion"] == version
    assert [j["metadata"]["name"] for j in trainer_jobs(emulator)] == ["good-train-g1"]
    assert [c["metadata"]["name"] for c in emulator.read_all("configmaps", NS)] == [
        "good-trainer-g1"
    ]

    # Changing the spec to fit the policy starts it.
    fixed = {"spec": {"image": None, "resources": {"tolerations": []}}}
    emulator.merge_patch("finetunejobs", NS, "bad", fixed)
    wait_job(emulator, "bad-train-g2")
    wait_condition(emulator, "bad", "Validated", "True", "Valid")


def test_namespace_gpus_are_counted_across_jobs_applied_together(
    emulator: Emulator, operator_runner
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner, CONFIG)
    names = ["a", "b", "c"]
    for name in names:  # 3 x 2 GPUs at once against a namespace maximum of 4
        emulator.create(ftj_body(name, spec(resources={"gpus": 2})), keep_status=False)

    def verdicts() -> dict[str, str] | None:
        found: dict[str, str] = {}
        for name in names:
            cond = next(
                (
                    c
                    for c in status(emulator, name).get("conditions") or []
                    if c["type"] == "Validated"
                ),
                None,
            )
            if cond is None:
                return None
            found[name] = cond["reason"]
        return found

    settled = wait_for(verdicts, what="a verdict for every job")
    time.sleep(1.0)  # no late second start
    assert sorted(settled.values()) == ["PolicyViolation", "Valid", "Valid"], settled
    assert len(trainer_jobs(emulator)) == 2
    refused = next(n for n, reason in settled.items() if reason == "PolicyViolation")
    message = wait_condition(emulator, refused, "Validated", "False", "PolicyViolation")["message"]
    assert "hold 4 GPUs" in message and "more than the 4 a namespace may use" in message

    # A CPU job is not held back by the GPU maximum.
    emulator.create(ftj_body("cpu", spec(resources={"gpus": 0})), keep_status=False)
    wait_job(emulator, "cpu-train-g1")

    # One run finishes: its GPUs are free, and the refused job starts once its spec changes.
    running = sorted(n for n in names if n != refused)
    emulator.set_job_finished(NS, f"{running[0]}-train-g1", succeeded=False)
    wait_phase(emulator, running[0], "Failed")
    emulator.merge_patch("finetunejobs", NS, refused, {"spec": {"backoffLimit": 2}})
    wait_job(emulator, f"{refused}-train-g2")


def test_a_new_policy_rechecks_refused_jobs_when_the_operator_restarts(
    emulator: Emulator,
) -> None:
    """The chart puts the policy into the operator's environment: a new policy is a new
    operator pod, which checks every job that has not started again."""
    add_prerequisites(emulator)
    with operator(emulator, CONFIG):
        emulator.create(ftj_body("big", spec(resources={"gpus": 8})), keep_status=False)
        wait_condition(emulator, "big", "Failed", "True", "PolicyViolation")
    assert trainer_jobs(emulator) == []
    relaxed = dataclasses.replace(
        CONFIG, policy=dataclasses.replace(POLICY, max_gpus_per_namespace=8)
    )
    with operator(emulator, relaxed):
        wait_job(emulator, "big-train-g1")
        wait_condition(emulator, "big", "Validated", "True", "Valid")
    assert "Failed" not in {c["type"] for c in status(emulator, "big")["conditions"]}
