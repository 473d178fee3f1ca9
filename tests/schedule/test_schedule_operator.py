"""The schedule controller running for real against the embedded API: one run per slot across
restarts and API errors, the run's result promoted, suspend and deletion."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from finetune_local import Emulator
from finetune_operator import metrics
from finetune_trainer.fingerprint import main as fingerprint_main
from support.cluster import NS, add_prerequisites, operator, start_operator
from support.k8s_fixtures import wait_for
from support.schedule_cluster import LAST, RUN, finish_run, runs, sched_status, schedule


def sample(metric: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(metric, {"namespace": NS, **labels})
    return float(value or 0.0)


# The API's schema checks (CRD openAPIV3Schema) apply to every write: the status the operator
# writes must fit it.
@pytest.mark.emulator(validate_schemas=True)
def test_one_run_for_the_slot_then_it_becomes_the_champion(
    emulator: Emulator, operator_runner: Any
) -> None:
    runs_before = sample("finetune_schedule_runs_total", trigger="Schedule", outcome="Succeeded")
    promoted_before = sample("finetune_schedule_promotion_decisions_total", decision="Promoted")
    add_prerequisites(emulator)
    sched = schedule(emulator)
    start_operator(emulator, operator_runner)
    wait_for(lambda: sched_status(emulator).get("active") == [RUN], timeout=20, what="run active")
    ftj = emulator.read("finetunejobs", NS, RUN)
    assert ftj is not None
    owner = ftj["metadata"]["ownerReferences"][0]
    assert owner["uid"] == sched["metadata"]["uid"] and owner["controller"] is True
    assert ftj["spec"]["output"]["uri"] == f"pvc://adapters/support-bot/{RUN}"
    assert sched_status(emulator)["lastScheduleTime"] == "2026-01-01T00:00:00Z"
    finish_run(emulator, {"rougeL": 0.7, "evalLoss": 0.8})
    st = wait_for(
        lambda: sched_status(emulator) if sched_status(emulator).get("champion") else None,
        timeout=30,
        what="champion",
    )
    assert st["champion"]["job"] == RUN
    assert st["champion"]["adapter"]["digest"] == "sha256:" + "a" * 64
    assert st["champion"]["metrics"] == {"rougeL": 0.7, "evalLoss": 0.8}
    assert st["runs"][0]["outcome"] == "Succeeded" and st["active"] == []
    assert st["lastOutcome"] == "Succeeded"
    assert runs(emulator) == [RUN]
    # Events and metrics follow the status write that shows the champion: wait for them.
    wait_for(
        lambda: (
            {"RunStarted", "ChampionPromoted"}
            <= {e.get("reason") for e in emulator.events_about(NS, "weekly")}
        ),
        what="the run and promotion events",
    )
    # Metrics: the run by outcome, the decision, and when the last success was.
    wait_for(
        lambda: (
            sample("finetune_schedule_runs_total", trigger="Schedule", outcome="Succeeded")
            == runs_before + 1
        ),
        what="the run counted",
    )
    assert sample("finetune_schedule_promotion_decisions_total", decision="Promoted") == (
        promoted_before + 1
    )
    assert sample("finetune_schedule_runs_total", trigger="DataChange", outcome="Failed") == 0.0
    completed = datetime.fromisoformat(st["lastSuccessfulTime"].replace("Z", "+00:00"))
    last = sample("finetune_schedule_last_success_timestamp_seconds", name="weekly")
    assert last == completed.timestamp()


def test_restarts_and_api_errors_never_make_a_second_run(
    emulator: Emulator, operator_runner: Any
) -> None:
    add_prerequisites(emulator)
    # The status write that records the run fails: the next attempt meets the run by name.
    fault = emulator.inject_fault(
        "finetuneschedules", 500, count=2, subresource="status", verbs=("patch",)
    )
    # And one create of the run fails before reaching the store.
    create_fault = emulator.inject_fault("finetunejobs", 500, count=1, verbs=("create",))
    schedule(emulator)
    with operator(emulator):
        wait_for(lambda: runs(emulator) == [RUN], timeout=20, what="the run")
        wait_for(lambda: sched_status(emulator).get("active") == [RUN], timeout=20, what="status")
    assert fault.served >= 1 and create_fault.served == 1
    # A fresh operator (restart) finds the run and makes no other.
    with operator(emulator):
        wait_for(
            lambda: sched_status(emulator).get("lastScheduleTime") == "2026-01-01T00:00:00Z",
            what="status",
        )
        emulator.cut_watches()
        wait_for(lambda: emulator.open_watches >= 2, what="watches re-opened")
        assert runs(emulator) == [RUN]
    assert runs(emulator) == [RUN]


def test_suspended_schedule_starts_nothing(emulator: Emulator, operator_runner: Any) -> None:
    add_prerequisites(emulator)
    schedule(emulator, suspend=True)
    start_operator(emulator, operator_runner)

    def suspended() -> bool:
        conds = sched_status(emulator).get("conditions") or []
        return any(c["type"] == "Suspended" and c["status"] == "True" for c in conds)

    wait_for(suspended, timeout=20, what="Suspended=True")
    assert runs(emulator) == []
    # Resumed: the missed time runs once.
    emulator.merge_patch("finetuneschedules", NS, "weekly", {"spec": {"suspend": False}})
    wait_for(lambda: runs(emulator) == [RUN], timeout=20, what="the run after resume")


def test_deleting_the_schedule_deletes_its_runs(emulator: Emulator, operator_runner: Any) -> None:
    add_prerequisites(emulator)
    schedule(emulator)
    start_operator(emulator, operator_runner)
    wait_for(lambda: runs(emulator) == [RUN], timeout=20, what="the run")
    emulator.request_delete("finetuneschedules", NS, "weekly")
    wait_for(lambda: runs(emulator) == [], timeout=20, what="runs deleted")
    wait_for(
        lambda: emulator.read("finetuneschedules", NS, "weekly") is None,
        timeout=20,
        what="schedule gone",
    )


@pytest.mark.emulator(validate_schemas=True)
def test_a_data_probe_result_starts_a_data_change_run(
    emulator: Emulator, operator_runner: Any, tmp_path: Path
) -> None:
    """The operator starts the probe Job; the probe (run here for real on a folder standing in
    for the claim) reports a fingerprint; the operator starts a DataChange run with it."""
    add_prerequisites(emulator)
    trigger = {"onSchedule": False, "onDataChange": {"checkIntervalSeconds": 3600}}
    schedule(emulator, trigger=trigger)
    start_operator(emulator, operator_runner)
    probe = wait_for(
        lambda: next(iter(emulator.read_all("jobs", NS)), None), timeout=20, what="probe Job"
    )
    name = probe["metadata"]["name"]
    assert name.startswith("weekly-probe-")
    # The kubelet's part: the pod runs the fingerprint command on the mounted claim.
    data = tmp_path / "datasets" / "support" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    log = tmp_path / "termination-log"
    args = probe["spec"]["template"]["spec"]["containers"][0]["args"]
    assert (
        fingerprint_main([*args[:2], "--pvc-root", str(tmp_path), "--termination-log", str(log)])
        == 0
    )
    pod = f"{name}-p"
    template = probe["spec"]["template"]
    emulator.create(
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": pod, "namespace": NS, "labels": template["metadata"]["labels"]},
         "spec": template["spec"]},
        keep_status=False,
    )  # fmt: skip
    emulator.terminate_container(NS, pod, exit_code=0, message=log.read_text())
    emulator.set_job_finished(NS, name, succeeded=True)
    ftj = wait_for(
        lambda: next(iter(emulator.read_all("finetunejobs", NS)), None), timeout=20, what="the run"
    )
    annotations = ftj["metadata"]["annotations"]
    assert annotations["finetune.dev/trigger"] == "DataChange"
    st = wait_for(lambda: sched_status(emulator).get("dataCheck"), what="dataCheck")
    assert annotations["finetune.dev/source-digest"] == st["sourceDigest"]
    wait_for(lambda: emulator.read("jobs", NS, name) is None, what="the probe removed")
    assert len(emulator.read_all("finetunejobs", NS)) == 1


def test_the_clock_reconciles_when_the_schedule_is_due_without_any_event(
    emulator: Emulator, operator_runner: Any
) -> None:
    """Between its times a schedule costs no request; when its time comes, the clock alone
    reconciles it (here the due time is brought forward instead of waiting a year)."""
    add_prerequisites(emulator)
    sched = schedule(emulator)
    emulator.patch_status(
        "finetuneschedules", NS, "weekly", {"lastScheduleTime": "2026-01-01T00:00:00Z"}
    )
    run = start_operator(emulator, operator_runner)
    wait_for(lambda: sched_status(emulator).get("observedGeneration") == 1, what="reconciled")
    state = run.memo.ftsched_state
    due = wait_for(lambda: state.due.get((NS, "weekly")), what="a due time")
    assert due - time.monotonic() > 600  # the next time is far away: the clock sleeps
    # The last run's record goes missing from status (a status-only change: no handler runs).
    emulator.patch_status("finetuneschedules", NS, "weekly", {"lastScheduleTime": LAST})
    time.sleep(1.5)
    assert runs(emulator) == []
    state.due[(NS, "weekly")] = time.monotonic()
    wait_for(lambda: runs(emulator) == [RUN], timeout=10, what="the clock's reconcile")
    assert sched["metadata"]["uid"]


CHAMPION = {
    "job": "weekly-29000000",
    "adapter": {"uri": "pvc://adapters/support-bot/weekly-29000000/adapter",
                "digest": "sha256:" + "c" * 64, "rank": 64},
    "metrics": {"rougeL": 0.80, "evalLoss": 0.5},
    "since": "2025-06-01T05:00:00Z",
}  # fmt: skip


@pytest.mark.emulator(validate_schemas=True)
def test_a_beat_champion_run_evaluates_the_champion_on_its_own_eval_rows(
    emulator: Emulator, operator_runner: Any
) -> None:
    """The run the schedule creates names the champion's adapter in evaluation.compareWith
    (accepted by the FineTuneJob CRD's schema); its result's comparedMetrics decide."""
    add_prerequisites(emulator)
    promotion = {"policy": "BeatChampion", "metrics": [{"metric": "rougeL", "minMargin": 0.02}]}
    schedule(emulator, status={"champion": CHAMPION}, promotion=promotion)
    start_operator(emulator, operator_runner)
    ftj = wait_for(lambda: emulator.read("finetunejobs", NS, RUN), timeout=20, what="the run")
    assert ftj["spec"]["evaluation"]["compareWith"] == {
        "uri": CHAMPION["adapter"]["uri"],
        "digest": CHAMPION["adapter"]["digest"],
    }
    # The champion recorded 0.80 on its own eval rows; on this run's rows it scores 0.50.
    finish_run(emulator, {"rougeL": 0.6, "evalLoss": 0.9},
               comparedMetrics={"rougeL": 0.5, "evalLoss": 1.2})  # fmt: skip
    st = wait_for(
        lambda: (
            sched_status(emulator)
            if (sched_status(emulator).get("champion") or {}).get("job") == RUN
            else None
        ),
        timeout=30,
        what="the challenger promoted",
    )
    comparison = st["runs"][0]["comparison"]
    assert comparison["reason"] == "BeatChampion" and comparison["sameEvalRows"] is True
    assert comparison["metrics"][0] | {"improvement": None} == {
        "metric": "rougeL", "minMargin": 0.02, "passed": True, "challenger": 0.6,
        "champion": 0.5, "improvement": None,
    }  # fmt: skip
    ran = emulator.read("finetunejobs", NS, RUN)
    assert ran is not None
    assert ran["status"]["comparedMetrics"] == {"rougeL": 0.5, "evalLoss": 1.2}
