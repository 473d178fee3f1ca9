"""The real operator (kopf) against the emulated API: a FineTuneJob from apply to a gated adapter."""

from __future__ import annotations

import json
import time
from datetime import datetime

from finetune_local import Emulator
from finetune_operator import metrics
from support.cluster import (
    NS,
    add_prerequisites,
    events,
    ftj_body,
    start_operator,
    start_pod,
    status,
    trainer_jobs,
    wait_condition,
    wait_job,
    wait_phase,
)
from support.ftj_samples import DATA_REPORT, channel, progress_line, result, spec
from support.k8s_fixtures import wait_for


def _sample(name: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_success_with_gates_passed(emulator: Emulator, operator_runner) -> None:
    passes_before = _sample(
        "finetune_job_gate_results_total", {"namespace": NS, "metric": "rougeL", "result": "pass"}
    )
    add_prerequisites(emulator)
    emulator.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "finetune-gpu-prices", "namespace": "finetune-system"},
            "data": {"currency": "EUR", "NVIDIA-H100-80GB-HBM3": "3.60"},
        }
    )
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)

    job = wait_job(emulator, "bot-train-g1")
    st = wait_phase(emulator, "bot", "Pending")
    assert st["trainerJob"] == "bot-train-g1"
    assert st["estimate"]["fits"] is True
    cm = emulator.read("configmaps", NS, "bot-trainer-g1")
    assert cm is not None and "hf_secret_value" not in json.dumps(cm)

    pod = start_pod(emulator, job)
    emulator.set_pod_log(
        NS,
        pod,
        "\n".join([channel({"type": "data", "report": DATA_REPORT}), progress_line(5, 10)]) + "\n",
    )
    st = wait_for(
        lambda: (
            status(emulator, "bot")
            if (status(emulator, "bot").get("progress") or {}).get("step") == 5
            else None
        ),
        what="progress",
    )
    assert st["phase"] == "Training"
    assert st["progress"]["percent"] == 50
    assert st["data"]["rowsKept"] == 950

    emulator.terminate_container(
        NS, pod, exit_code=0, message=json.dumps(result()), container="trainer"
    )
    emulator.set_job_finished(NS, "bot-train-g1", succeeded=True)
    st = wait_phase(emulator, "bot", "Succeeded")
    assert st["adapter"]["uri"] == "pvc://adapters/support-bot/adapter"
    assert st["adapter"]["digest"].startswith("sha256:")
    assert st["gatesSummary"] == "2/2 passed"
    # The pod ran from its start time until the container finished; priced per GPU-hour.
    assert st["cost"]["gpuSeconds"] > 0
    assert st["cost"]["currency"] == "EUR" and st["cost"]["pricePerGpuHour"] == 3.6
    assert st["cost"]["estimatedCost"] == round(st["cost"]["gpuSeconds"] / 3600 * 3.6, 4)
    wait_condition(emulator, "bot", "GatesPassed", "True")
    # Events mark what a user waits for: the Job, training started, the verdict (decision
    # 1201); every other step is a condition only.
    wait_for(lambda: "Succeeded" in {e["reason"] for e in events(emulator, "bot")}, what="events")
    assert sorted(e["reason"] for e in events(emulator, "bot")) == [
        "JobCreated",
        "Running",
        "Succeeded",
    ]
    assert all(e["type"] == "Normal" for e in events(emulator, "bot"))
    assert len(trainer_jobs(emulator)) == 1
    # Secret values never leave the Secret: not in status, events, ConfigMaps or Jobs.
    everything = json.dumps(
        [st, events(emulator, "bot"), emulator.read_all("configmaps", NS), trainer_jobs(emulator)]
    )
    assert "hf_secret_value" not in everything and "aGZfc2VjcmV0X3ZhbHVl" not in everything
    wait_for(
        lambda: (
            _sample("finetune_jobs", {"namespace": NS, "name": "bot", "phase": "Succeeded"}) == 1
        ),
        what="phase gauge",
    )
    rouge_passes = _sample(
        "finetune_job_gate_results_total", {"namespace": NS, "metric": "rougeL", "result": "pass"}
    )
    assert rouge_passes == passes_before + 1
    # The "no fresh adapter" alert reads the newest success per namespace, from status.
    completed = datetime.fromisoformat(st["completedAt"].replace("Z", "+00:00")).timestamp()
    last_success = _sample("finetune_job_last_success_timestamp_seconds", {"namespace": NS})
    assert last_success >= completed


def _run_to_pod(
    emulator: Emulator, name: str = "bot", body_spec: dict | None = None
) -> tuple[dict, str]:
    emulator.create(ftj_body(name, body_spec or spec()), keep_status=False)
    job = wait_job(emulator, f"{name}-train-g1")
    pod = start_pod(emulator, job)
    return job, pod


def test_gate_failure_names_the_gate_and_keeps_the_adapter(
    emulator: Emulator, operator_runner
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    _job, pod = _run_to_pod(emulator)
    emulator.terminate_container(
        NS,
        pod,
        exit_code=0,
        message=json.dumps(result(metrics={"rougeL": 0.21, "evalLoss": 1.1})),
        container="trainer",
    )
    emulator.set_job_finished(NS, "bot-train-g1", succeeded=True)
    failed = wait_condition(emulator, "bot", "Failed", "True", "GatesFailed")
    assert "rougeL" in failed["message"] and "0.21" in failed["message"]
    st = status(emulator, "bot")
    assert st["phase"] == "Failed"
    assert st["gatesSummary"] == "1/2 passed"
    assert [g["passed"] for g in st["gates"]] == [False, True]
    assert st["adapter"]["digest"].startswith("sha256:")  # recorded for inspection, not deleted
    gates = wait_condition(emulator, "bot", "GatesPassed", "False", "GatesFailed")
    assert "rougeL" in gates["message"]


def test_oom_killed_trainer_says_what_to_change(emulator: Emulator, operator_runner) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    _job, pod = _run_to_pod(emulator)
    emulator.terminate_container(NS, pod, exit_code=137, reason="OOMKilled", container="trainer")
    emulator.set_job_finished(NS, "bot-train-g1", succeeded=False)
    failed = wait_condition(emulator, "bot", "Failed", "True", "OOMKilled")
    # Host memory of a GPU job goes to loading the model and the data: the batch, the method
    # and checkpointing (this job already uses qlora and checkpointing) are no advice here.
    assert "raise resources.memory" in failed["message"]
    for advice in ("batchSize", "qlora", "gradientCheckpointing"):
        assert advice not in failed["message"]
    wait_for(
        lambda: any(
            e["type"] == "Warning" and e["reason"] == "OOMKilled" for e in events(emulator, "bot")
        ),
        what="warning event",
    )


def test_preflight_rejects_a_job_that_cannot_fit_and_creates_nothing(
    emulator: Emulator, operator_runner
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    too_big = spec(
        method="lora",
        training={"maxSeqLength": 2048, "batchSize": 4, "gradientCheckpointing": False},
        resources={"gpus": 1, "gpuProduct": "NVIDIA-L4"},
    )
    emulator.create(ftj_body("big", too_big), keep_status=False)
    fits = wait_condition(emulator, "big", "Fits", "False", "InsufficientGPUMemory")
    assert "predicted peak" in fits["message"] and "19.8 GiB usable on NVIDIA-L4" in fits["message"]
    assert "method: qlora" in fits["message"]
    assert "training.gradientCheckpointing: true" in fits["message"]
    assert status(emulator, "big")["phase"] == "Failed"
    assert status(emulator, "big")["estimate"]["fits"] is False
    assert trainer_jobs(emulator) == []
    assert emulator.read_all("configmaps", NS) == []

    # Applying the suggested change starts the run.
    emulator.merge_patch(
        "finetunejobs",
        NS,
        "big",
        {"spec": {"method": "qlora", "training": {"gradientCheckpointing": True, "batchSize": 1}}},
    )
    wait_job(emulator, "big-train-g2")
    wait_condition(emulator, "big", "Fits", "True")
    assert status(emulator, "big")["phase"] == "Pending"


def test_invalid_spec_is_rejected_with_the_field_and_no_children(
    emulator: Emulator, operator_runner
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    bad = spec(method="lora", quantization={"type": "nf4"})
    emulator.create(ftj_body("bad", bad), keep_status=False)
    cond = wait_condition(emulator, "bad", "Validated", "False", "InvalidSpec")
    assert "quantization" in cond["message"]
    assert trainer_jobs(emulator) == []


def test_missing_secret_is_named_and_the_job_starts_once_it_exists(
    emulator: Emulator, operator_runner
) -> None:
    add_prerequisites(emulator, secrets=())
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    cond = wait_condition(emulator, "bot", "Validated", "False", "ReferenceNotFound")
    assert "Secret 'hf-token'" in cond["message"]
    assert trainer_jobs(emulator) == []
    add_prerequisites(emulator, pvcs=())
    wait_job(emulator, "bot-train-g1", timeout=40)  # the temporary error retries


def test_suspend_and_resume(emulator: Emulator, operator_runner) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    _job, _pod = _run_to_pod(emulator)
    wait_phase(emulator, "bot", "Training")
    emulator.merge_patch("finetunejobs", NS, "bot", {"spec": {"suspend": True}})
    wait_for(
        lambda: (emulator.read("jobs", NS, "bot-train-g1") or {})["spec"].get("suspend") is True,
        what="job suspended",
    )
    wait_phase(emulator, "bot", "Suspended")
    wait_condition(emulator, "bot", "Admitted", "False", "Suspended")

    emulator.merge_patch("finetunejobs", NS, "bot", {"spec": {"suspend": False}})
    wait_for(
        lambda: (emulator.read("jobs", NS, "bot-train-g1") or {})["spec"].get("suspend") is False,
        what="job resumed",
    )
    wait_phase(emulator, "bot", "Training")
    # Toggling suspend changes the generation but never starts a second Job.
    assert [j["metadata"]["name"] for j in trainer_jobs(emulator)] == ["bot-train-g1"]


def test_delete_mid_training_removes_children_not_user_data(
    emulator: Emulator, operator_runner
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    job, _pod = _run_to_pod(emulator)
    wait_phase(emulator, "bot", "Training")
    owner_uid = emulator.read("finetunejobs", NS, "bot")["metadata"]["uid"]
    assert job["metadata"]["ownerReferences"][0]["uid"] == owner_uid
    emulator.request_delete("finetunejobs", NS, "bot")
    wait_for(lambda: emulator.read("finetunejobs", NS, "bot") is None, what="FineTuneJob gone")
    wait_for(lambda: emulator.read("jobs", NS, "bot-train-g1") is None, what="trainer Job deleted")
    assert emulator.read("configmaps", NS, "bot-trainer-g1") is None
    # The volumes holding data and adapters are the user's.
    assert emulator.read("persistentvolumeclaims", NS, "adapters") is not None
    assert emulator.read("persistentvolumeclaims", NS, "datasets") is not None


def test_operator_restart_mid_training_creates_nothing_new_and_keeps_status(
    emulator: Emulator,
) -> None:
    from support.cluster import operator

    add_prerequisites(emulator)
    with operator(emulator):
        _job, pod = _run_to_pod(emulator)
        emulator.set_pod_log(
            NS,
            pod,
            "\n".join([channel({"type": "data", "report": DATA_REPORT}), progress_line(3, 10)])
            + "\n",
        )
        wait_for(
            lambda: (status(emulator, "bot").get("progress") or {}).get("step") == 3,
            what="progress 3",
        )
    before = status(emulator, "bot")
    creates_before = emulator.count("create", "jobs")
    # The log scrolled while the operator was down: the data line is gone from the tail.
    emulator.set_pod_log(NS, pod, progress_line(7, 10) + "\n")
    with operator(emulator):
        wait_for(
            lambda: (status(emulator, "bot").get("progress") or {}).get("step") == 7,
            what="progress 7",
        )
        after = status(emulator, "bot")
    assert emulator.count("create", "jobs") == creates_before
    assert [j["metadata"]["name"] for j in trainer_jobs(emulator)] == ["bot-train-g1"]
    assert after["data"] == before["data"]
    assert after["startedAt"] == before["startedAt"]
    assert after["trainerJob"] == "bot-train-g1"


def test_status_write_conflicts_are_retried(emulator: Emulator, operator_runner) -> None:
    add_prerequisites(emulator)
    conflict = emulator.inject_fault(
        "finetunejobs", 409, count=2, subresource="status", verbs=("patch",), message="conflict"
    )
    invalid = emulator.inject_fault(
        "finetunejobs", 422, count=1, subresource="status", verbs=("patch",), message="test failed"
    )
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    wait_phase(emulator, "bot", "Pending")
    assert status(emulator, "bot")["trainerJob"] == "bot-train-g1"
    assert conflict.remaining == 0 and invalid.remaining == 0  # all three failures were met
    assert len(trainer_jobs(emulator)) == 1  # the re-planned create met the existing Job


def _job_event_reconciles() -> float:
    sample = metrics.REGISTRY.get_sample_value(
        "finetune_job_reconcile_duration_seconds_count", {"namespace": NS, "trigger": "job-event"}
    )
    return sample or 0.0


def test_status_write_is_skipped_when_nothing_changed(emulator: Emulator, operator_runner) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    _job, pod = _run_to_pod(emulator)
    emulator.terminate_container(
        NS, pod, exit_code=0, message=json.dumps(result()), container="trainer"
    )
    emulator.set_job_finished(NS, "bot-train-g1", succeeded=True)
    wait_phase(emulator, "bot", "Succeeded")
    # Stir the operator with Job events and timer ticks; the status must not be rewritten.
    time.sleep(0.5)
    emulator.reset_counters()
    reconciles = _job_event_reconciles()
    for i in range(3):
        emulator.merge_patch(
            "jobs", NS, "bot-train-g1", {"metadata": {"annotations": {"poke": str(i)}}}
        )
    time.sleep(2.5)
    assert _job_event_reconciles() >= reconciles + 3  # it did reconcile ...
    assert emulator.count("get", "finetunejobs") == 0  # (from the watch: settled, no read)
    status_writes = [
        w for w in emulator.writes if w.plural == "finetunejobs" and w.subresource == "status"
    ]
    assert status_writes == []  # ... and wrote nothing


def test_secret_check_forbidden_by_rbac_does_not_block(emulator: Emulator, operator_runner) -> None:
    add_prerequisites(emulator, secrets=())
    emulator.inject_fault(
        "secrets", 403, count=100, subresource=None, verbs=("get",), message="forbidden"
    )
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    wait_job(emulator, "bot-train-g1")  # the kubelet will report a missing Secret if it is


def test_api_errors_are_counted_and_retried(emulator: Emulator, operator_runner) -> None:
    before = _sample("finetune_job_errors_total", {"namespace": NS, "reason": "Api500"})
    add_prerequisites(emulator)
    emulator.inject_fault(
        "jobs", 500, count=1, subresource=None, verbs=("create",), message="etcd timeout"
    )
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    wait_job(emulator, "bot-train-g1", timeout=20)
    assert _sample("finetune_job_errors_total", {"namespace": NS, "reason": "Api500"}) == before + 1
    assert len(trainer_jobs(emulator)) == 1
