"""The FineTuneJob lifecycle, from `kubectl apply` to a verdict, through the API only.

Runs against the embedded API by default and against a real cluster with
`make e2e-cluster` (clusterkit.py): nothing here reaches into the emulator, so what passes
here is what the operator does against any API server.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from clusterkit import Cluster, Environment, wait_until
from support.ftj_samples import result, spec

# The lifecycle suite: installed from the chart, a FineTuneJob from apply to its verdict.
pytestmark = pytest.mark.e2e

SECRET_VALUE = "aGZfc2VjcmV0X3ZhbHVl"  # base64 of hf_secret_value


def ftj_body(name: str, body_spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": body_spec,
    }


def add_prerequisites(cluster: Cluster, *, secret: bool = True) -> None:
    for claim in ("datasets", "adapters"):
        cluster.create(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }
        )
    if secret:
        add_secret(cluster)


def add_secret(cluster: Cluster) -> None:
    cluster.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "hf-token"},
            "data": {"HF_TOKEN": SECRET_VALUE},
        }
    )


def status(cluster: Cluster, name: str) -> dict[str, Any]:
    return dict((cluster.read("finetunejobs", name) or {}).get("status") or {})


def wait_condition(
    cluster: Cluster,
    env: Environment,
    name: str,
    type_: str,
    value: str,
    reason: str | None = None,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        for cond in status(cluster, name).get("conditions") or []:
            matches = cond.get("type") == type_ and cond.get("status") == value
            if matches and (reason is None or cond.get("reason") == reason):
                return dict(cond)
        return None

    return wait_until(check, env.timeout, what=f"{type_}={value} ({reason}) on {name}")


def wait_phase(cluster: Cluster, env: Environment, name: str, phase: str) -> dict[str, Any]:
    return wait_until(
        lambda: (st := status(cluster, name)).get("phase") == phase and st,
        env.timeout,
        what=f"phase {phase} of {name}",
    )


def wait_job(cluster: Cluster, env: Environment, name: str) -> dict[str, Any]:
    return wait_until(lambda: cluster.read("jobs", name), env.timeout, what=f"Job {name}")


def start_training(cluster: Cluster, env: Environment, name: str, body_spec: Any) -> str:
    cluster.create(ftj_body(name, body_spec))
    job = wait_job(cluster, env, f"{name}-train-g1")
    return cluster.trainer_pod(job)


def test_the_harness_installed_the_chart_objects(environment: Environment) -> None:
    installed = set(environment.installed)
    assert {
        "CustomResourceDefinition/finetunejobs.finetune.dev",
        "CustomResourceDefinition/adapterdeployments.finetune.dev",
    } <= installed
    kinds = {entry.split("/")[0] for entry in installed}
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= kinds
    assert "Deployment" not in kinds  # the operator under test runs in this process


def test_success_with_gates_passed(cluster: Cluster, environment: Environment, operator) -> None:
    add_prerequisites(cluster)
    pod = start_training(cluster, environment, "bot", spec())
    st = wait_phase(cluster, environment, "bot", "Training")
    assert st["trainerJob"] == "bot-train-g1" and st["estimate"]["fits"] is True

    cluster.terminate(pod, exit_code=0, message=json.dumps(result()))
    cluster.finish_job("bot-train-g1", succeeded=True)
    st = wait_phase(cluster, environment, "bot", "Succeeded")
    assert st["adapter"]["uri"] == "pvc://adapters/support-bot/adapter"
    assert st["adapter"]["digest"].startswith("sha256:")
    assert st["gatesSummary"] == "2/2 passed"
    assert st["cost"]["gpuSeconds"] >= 0
    wait_condition(cluster, environment, "bot", "GatesPassed", "True")
    reasons = wait_until(
        lambda: (r := {e["reason"] for e in cluster.events_about("bot")}) >= {"Succeeded"} and r,
        environment.timeout,
        what="the Succeeded event",
    )
    assert {"JobCreated", "Running", "Succeeded"} <= reasons
    # Secret values never leave the Secret.
    everything = json.dumps(
        [st, cluster.events_about("bot"), cluster.read_all("configmaps"), cluster.read_all("jobs")]
    )
    assert "hf_secret_value" not in everything and SECRET_VALUE not in everything


def test_gate_failure_names_the_gate(cluster: Cluster, environment: Environment, operator) -> None:
    add_prerequisites(cluster)
    pod = start_training(cluster, environment, "bot", spec())
    message = json.dumps(result(metrics={"rougeL": 0.21, "evalLoss": 1.1}))
    cluster.terminate(pod, exit_code=0, message=message)
    cluster.finish_job("bot-train-g1", succeeded=True)
    failed = wait_condition(cluster, environment, "bot", "Failed", "True", "GatesFailed")
    assert "rougeL" in failed["message"] and "0.21" in failed["message"]
    assert status(cluster, "bot")["gatesSummary"] == "1/2 passed"


def test_oom_killed_trainer_fails_with_advice(
    cluster: Cluster, environment: Environment, operator
) -> None:
    add_prerequisites(cluster)
    # No retries: a cluster's Job controller then fails the Job after this one pod.
    pod = start_training(cluster, environment, "bot", spec(backoffLimit=0))
    cluster.terminate(pod, exit_code=137, reason="OOMKilled")
    cluster.finish_job("bot-train-g1", succeeded=False)
    failed = wait_condition(cluster, environment, "bot", "Failed", "True", "OOMKilled")
    assert "raise resources.memory" in failed["message"]


def test_job_that_cannot_fit_creates_nothing_until_fixed(
    cluster: Cluster, environment: Environment, operator
) -> None:
    add_prerequisites(cluster)
    too_big = spec(
        method="lora",
        training={"maxSeqLength": 2048, "batchSize": 4, "gradientCheckpointing": False},
        resources={"gpus": 1, "gpuProduct": "NVIDIA-L4"},
    )
    cluster.create(ftj_body("big", too_big))
    fits = wait_condition(cluster, environment, "big", "Fits", "False", "InsufficientGPUMemory")
    assert "method: qlora" in fits["message"]
    assert cluster.read_all("jobs") == [] and cluster.read("configmaps", "big-trainer-g1") is None
    cluster.merge_patch(
        "finetunejobs",
        "big",
        {"spec": {"method": "qlora", "training": {"gradientCheckpointing": True, "batchSize": 1}}},
    )
    wait_job(cluster, environment, "big-train-g2")
    wait_condition(cluster, environment, "big", "Fits", "True")


def test_missing_secret_is_named_and_the_job_starts_once_it_exists(
    cluster: Cluster, environment: Environment, operator
) -> None:
    add_prerequisites(cluster, secret=False)
    cluster.create(ftj_body("bot", spec()))
    cond = wait_condition(cluster, environment, "bot", "Validated", "False", "ReferenceNotFound")
    assert "Secret 'hf-token'" in cond["message"]
    assert cluster.read_all("jobs") == []
    add_secret(cluster)
    wait_until(
        lambda: cluster.read("jobs", "bot-train-g1"), 2 * environment.timeout, what="the Job"
    )


def test_suspend_and_resume(cluster: Cluster, environment: Environment, operator) -> None:
    add_prerequisites(cluster)
    start_training(cluster, environment, "bot", spec())
    wait_phase(cluster, environment, "bot", "Training")
    cluster.merge_patch("finetunejobs", "bot", {"spec": {"suspend": True}})
    wait_until(
        lambda: (cluster.read("jobs", "bot-train-g1") or {})["spec"].get("suspend") is True,
        environment.timeout,
        what="the trainer Job suspended",
    )
    wait_phase(cluster, environment, "bot", "Suspended")

    cluster.merge_patch("finetunejobs", "bot", {"spec": {"suspend": False}})
    job = wait_until(
        lambda: (
            (j := cluster.read("jobs", "bot-train-g1") or {})["spec"].get("suspend") is False and j
        ),
        environment.timeout,
        what="the trainer Job resumed",
    )
    if cluster.job_controller:
        cluster.trainer_pod(job)  # a suspended Job's pods are deleted; resuming makes a new one
    wait_phase(cluster, environment, "bot", "Training")
    assert [j["metadata"]["name"] for j in cluster.read_all("jobs")] == ["bot-train-g1"]


def test_delete_mid_training_removes_children_not_user_data(
    cluster: Cluster, environment: Environment, operator
) -> None:
    add_prerequisites(cluster)
    start_training(cluster, environment, "bot", spec())
    wait_phase(cluster, environment, "bot", "Training")
    cluster.delete("finetunejobs", "bot")
    wait_until(
        lambda: cluster.read("finetunejobs", "bot") is None,
        environment.timeout,
        what="the FineTuneJob gone",
    )
    wait_until(
        lambda: cluster.read("jobs", "bot-train-g1") is None,
        environment.timeout,
        what="the trainer Job deleted",
    )
    assert cluster.read("configmaps", "bot-trainer-g1") is None
    assert cluster.read("persistentvolumeclaims", "adapters") is not None
