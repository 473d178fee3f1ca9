"""The real operator (kopf) against the emulated API: a FineTuneJob from apply to a gated adapter."""

from __future__ import annotations

import json

from cluster import (
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
from finetune_operator.local import Emulator
from ftj_samples import DATA_REPORT, channel, progress_line, result, spec
from k8s_fixtures import wait_for


def test_success_with_gates_passed(emulator: Emulator, operator_runner) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)

    job = wait_job(emulator, "bot-train-g1")
    st = wait_phase(emulator, "bot", "Pending")
    assert st["trainerJob"] == "bot-train-g1"
    assert st["estimate"]["fits"] is True
    cm = emulator.read("configmaps", NS, "bot-trainer-g1")
    assert cm is not None and "hf_secret_value" not in json.dumps(cm)

    pod = start_pod(emulator, job)
    emulator.set_pod_log(NS, pod, "\n".join([channel({"type": "data", "report": DATA_REPORT}), progress_line(5, 10)]) + "\n")
    st = wait_for(lambda: status(emulator, "bot") if (status(emulator, "bot").get("progress") or {}).get("step") == 5 else None, what="progress")
    assert st["phase"] == "Training"
    assert st["progress"]["percent"] == 50
    assert st["data"]["rowsKept"] == 950

    emulator.terminate_container(NS, pod, exit_code=0, message=json.dumps(result()), container="trainer")
    emulator.set_job_finished(NS, "bot-train-g1", succeeded=True)
    st = wait_phase(emulator, "bot", "Succeeded")
    assert st["adapter"]["uri"] == "pvc://adapters/support-bot/adapter"
    assert st["adapter"]["digest"].startswith("sha256:")
    assert st["gatesSummary"] == "2/2 passed"
    assert st["cost"]["gpuSeconds"] >= 0
    wait_condition(emulator, "bot", "GatesPassed", "True")
    wait_for(
        lambda: {"JobCreated", "ConfigMapCreated", "Succeeded"} <= {e["reason"] for e in events(emulator, "bot")},
        what="events",
    )
    assert len(trainer_jobs(emulator)) == 1
