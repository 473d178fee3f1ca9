"""The trainer's output is tenant input (spec.image picks the trainer): progress lines, the
data report and the result are read with the models both sides share, bounded in size and
depth; anything malformed ends the run with TrainerOutputInvalid naming the field."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import kopf
import pytest
from finetune_local import Emulator
from finetune_operator.api.finetunejob import FineTuneJobStatus, status_wire
from finetune_operator.api.trainer_output import MAX_DEPTH, TrainerOutputError
from finetune_operator.clients.kube import KubeClient
from finetune_operator.handlers.finetunejob import reconcile
from finetune_operator.planners.progress import parse_lines, parse_result
from support.cluster import (
    FAST,
    NS,
    add_prerequisites,
    ftj_body,
    start_operator,
    start_pod,
    status,
    wait_condition,
    wait_job,
)
from support.ftj_planning import cond, started, track, with_conditions
from support.ftj_samples import DATA_REPORT, channel, pod, progress_line, result, spec
from support.k8s_fixtures import wait_for

DEEP = "[" * 5000 + "]" * 5000


def running_pod(**kwargs: Any) -> dict[str, Any]:
    return pod("bot-train-g1-a", trainer_state={"running": {}}, **kwargs)


def finished_pod(message: str) -> dict[str, Any]:
    return pod(
        "bot-train-g1-a",
        phase="Succeeded",
        trainer_state={"terminated": {"exitCode": 0, "message": message,
                                      "finishedAt": "2026-01-01T00:30:00Z"}},
    )  # fmt: skip


# ---------------------------------------------------------------- the planner, as a spec


@pytest.mark.parametrize(
    ("log", "names"),
    [
        (channel({"type": "progress", "step": 1, "loss": json.loads("[" * 8 + "]" * 8)}) + "\n"
         + "@@finetune {\"type\": \"progress\", \"loss\": " + DEEP + "}", "nested deeper"),
        (channel({"type": "progress", "step": "12", "totalSteps": 100}), "field step"),
        (channel({"type": "progress", "step": 10**30}), "field step"),
        (channel({"type": "progress", "step": True}), "field step"),
        (channel({"type": "progress", "loss": "low"}), "field loss"),
        (channel({"type": "data", "report": {**DATA_REPORT, "rowsKept": "950"}}),
         "field report.rowsKept"),
        (channel({"type": "data", "report": {**DATA_REPORT, "dropped": {"tooLong": "10"}}}),
         "field report.dropped.tooLong"),
        ("@@finetune " + json.dumps({"type": "progress", "updatedAt": "x" * 100_000}),
         "longer than"),
    ],
)  # fmt: skip
def test_a_malformed_progress_channel_ends_the_run_naming_the_field(log: str, names: str) -> None:
    first, job, cm = started()
    p = track(first, job, cm, pods=(running_pod(),), log_tail=log)
    failed = cond(p, "Failed")
    assert (failed.status, failed.reason) == ("True", "TrainerOutputInvalid")
    assert names in failed.message and "spec.image" in failed.message
    assert len(failed.message) < 1500
    # Its progress means nothing: the run is stopped rather than left holding its GPUs.
    assert [(a.verb, a.kind, a.name) for a in p.actions] == [("delete", "Job", "bot-train-g1")]
    assert p.status.phase == "Failed" and p.status.progress is None
    FineTuneJobStatus.model_validate(status_wire(p.status))


@pytest.mark.parametrize(
    ("message", "names"),
    [
        ('{"ok": true, "metrics": ' + DEEP + "}", "nested deeper"),
        (json.dumps(result(metrics={"rougeL": "0.9"})), "field metrics.rougeL"),
        (json.dumps(result(ok=False, reason="out of memory!", message="x")), "field reason"),
        (json.dumps({**result(), "adapter": {"uri": "/out", "digest": "md5:0"}}),
         "field adapter.digest"),
        (json.dumps({**result(), "ok": "yes"}), "field ok"),
    ],
)  # fmt: skip
def test_a_malformed_result_is_a_verdict_not_a_crash(message: str, names: str) -> None:
    first, job, cm = started()
    p = track(first, with_conditions(job, "Complete"), cm, pods=(finished_pod(message),))
    failed = cond(p, "Failed")
    assert failed.reason == "TrainerOutputInvalid" and names in failed.message
    assert "termination message" in failed.message
    assert p.actions == []  # the Job had finished: nothing to stop
    FineTuneJobStatus.model_validate(status_wire(p.status))


def test_the_data_report_tolerates_counters_it_does_not_know() -> None:
    report = {**DATA_REPORT, "dropped": {"duplicate": 40, "otherFormat": 25, "bom": 1},
              "droppedShare": 0.07, "byFormat": {"chat": {"rows": 15}}, "piiByKind": {"email": 3}}  # fmt: skip
    first, job, cm = started()
    p = track(
        first, job, cm, pods=(running_pod(),), log_tail=channel({"type": "data", "report": report})
    )
    assert p.status.data.dropped == {"duplicate": 40, "otherFormat": 25, "bom": 1}
    assert "droppedShare" not in status_wire(p.status)["data"]
    assert "byFormat" not in status_wire(p.status)["data"]
    assert cond(p, "Training").reason == "Running"


def test_lines_that_only_mention_the_mark_or_are_of_a_newer_kind_are_ignored() -> None:
    log = "\n".join(["INFO the @@finetune channel is on", channel({"type": "checkpoint", "x": [1]}),
                     progress_line(5, 10)])  # fmt: skip
    (line,) = parse_lines(log)
    assert line.step == 5
    assert parse_result("Traceback (most recent call last): [[[[[[[[[[", None) is None


def test_depth_and_size_are_checked_before_parsing() -> None:
    with pytest.raises(TrainerOutputError, match="nested deeper"):
        parse_lines("@@finetune " + "{" * 10_000)
    within = {"type": "progress", "step": 1}
    for _ in range(MAX_DEPTH - 1):
        within = {"type": "progress", "step": 1, "extra": within}
    assert parse_lines(channel(within))[0].step == 1


# ---------------------------------------------------------------- round trip


def test_round_trip_what_the_trainer_writes_the_operator_records(tmp_path: Path) -> None:
    """The trainer's own writers (progress reporter, data line, result with its termination
    message) produce exactly what the operator's reader turns into a valid status."""
    from finetune_trainer.progress import ProgressReporter, emit, report_result

    out = io.StringIO()
    reporter = ProgressReporter(interval_seconds=0, clock=lambda: 100.0)
    reporter.begin(0, 0)
    reporter.observe_logs({"loss": float("nan"), "learning_rate": 2e-4, "eval_loss": 1.25})
    emit({"type": "data", "report": {**DATA_REPORT, "piiByKind": {"email": 2}}}, out)
    emit(reporter.build(10, 10, 1.0, 5000, 3.5), out)
    termination = tmp_path / "termination-log"
    with contextlib.redirect_stdout(out):
        report_result(
            {k: v for k, v in result(metrics={"rougeL": 0.42, "evalLoss": 1.1,
                                              "bleu": float("inf")}).items() if k != "type"},
            str(termination),
        )  # fmt: skip
    log_tail = out.getvalue()

    first, job, cm = started()
    running = track(first, job, cm, pods=(running_pod(),), log_tail=log_tail)
    assert running.status.progress.step == 10 and running.status.progress.loss is None
    assert running.status.progress.eval_loss == 1.25
    assert running.status.data.pii_masked == DATA_REPORT["piiMasked"]
    done = track(first, with_conditions(job, "Complete"), cm, status=running.status,
                 pods=(finished_pod(termination.read_text()),), log_tail=log_tail)  # fmt: skip
    assert done.status.phase == "Succeeded", done.status.conditions
    assert done.status.metrics == {"rougeL": 0.42, "evalLoss": 1.1}  # inf left out
    assert done.status.adapter.uri == "pvc://adapters/support-bot/adapter"
    FineTuneJobStatus.model_validate(status_wire(done.status))
    typed = parse_result(termination.read_text(), None)
    assert typed is not None and typed.adapter is not None and typed.adapter.rank == 64


def test_the_trainer_refuses_to_write_what_the_operator_would_refuse() -> None:
    from finetune_trainer.progress import emit

    with pytest.raises(TrainerOutputError, match="step"):
        emit({"type": "progress", "step": -1}, io.StringIO())


# ---------------------------------------------------------------- against the API


@pytest.mark.emulator(validate_schemas=True)
@pytest.mark.parametrize(
    "line",
    [
        "@@finetune {\"type\": \"progress\", \"step\": " + DEEP + "}",
        channel({"type": "progress", "step": 3, "totalSteps": 10, "loss": "nan-ish"}),
        channel({"type": "data", "report": {**DATA_REPORT, "rowsRead": -5}}),
    ],
)  # fmt: skip
def test_hostile_trainer_output_fails_the_job_once(
    emulator: Emulator, operator_runner: Any, line: str
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    pod_name = start_pod(emulator, wait_job(emulator, "bot-train-g1"))
    emulator.set_pod_log(NS, pod_name, progress_line(2, 10) + "\n" + line + "\n")
    failed = wait_condition(emulator, "bot", "Failed", "True", "TrainerOutputInvalid")
    assert "spec.image" in failed["message"]
    wait_for(lambda: emulator.read("jobs", NS, "bot-train-g1") is None, what="the run stopped")
    writes = len([w for w in emulator.writes if w.subresource == "status"])
    time.sleep(1.0)  # several poll intervals
    assert len([w for w in emulator.writes if w.subresource == "status"]) == writes
    assert status(emulator, "bot")["phase"] == "Failed"


def test_a_status_the_server_finds_invalid_is_written_once_not_retried_as_a_conflict(
    emulator: Emulator,
) -> None:
    add_prerequisites(emulator)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    fault = emulator.inject_fault(
        "finetunejobs", 422, count=100, subresource="status", verbs=("patch",),
        message='FineTuneJob.finetune.dev "bot" is invalid: status.progress.step: Invalid value',
    )  # fmt: skip
    kube = KubeClient.from_url(str(emulator.url))

    async def once() -> None:
        try:
            with pytest.raises(kopf.TemporaryError):
                await reconcile(kube, FAST, NS, "bot", trigger="test")
        finally:
            await kube.close()

    asyncio.run(once())
    assert fault.served == 1
