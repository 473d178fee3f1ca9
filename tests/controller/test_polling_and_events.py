"""How often the operator looks at a FineTuneJob and what it tells users: running jobs are
polled at the configured interval, finished jobs are not polled at all, and a lifecycle makes
events only for milestones and warnings."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

from finetune_local import Emulator
from finetune_operator import metrics
from finetune_operator.api.finetunejob import FineTuneJobStatus
from finetune_operator.handlers.finetunejob import poll_interval
from finetune_operator.planners.finetunejob import (
    COST_REFRESH_SECONDS,
    is_settled,
    plan,
    transition_events,
)
from support.cluster import (
    FAST,
    NS,
    add_prerequisites,
    events,
    ftj_body,
    start_operator,
    start_pod,
    trainer_jobs,
    wait_job,
    wait_phase,
)
from support.ftj_planning import CONFIG, NOW, observe, started, track, with_conditions
from support.ftj_samples import pod, result, spec
from support.k8s_fixtures import wait_for

JOB = "bot-train-g1"


def _reconciles(trigger: str) -> float:
    sample = metrics.REGISTRY.get_sample_value(
        "finetune_job_reconcile_duration_seconds_count", {"namespace": NS, "trigger": trigger}
    )
    return sample or 0.0


def _reads_of_children(emulator: Emulator) -> int:
    return sum(
        emulator.count(verb, res)
        for verb, res in (("get", "jobs"), ("list", "pods"), ("get", "pods/log"))
    )


# ---------------------------------------------------------------- polling, for real


def test_running_job_is_polled_at_the_configured_interval(
    emulator: Emulator, operator_runner: Any
) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    start_pod(emulator, wait_job(emulator, JOB))
    wait_phase(emulator, "bot", "Training")
    before = _reconciles("poll")
    # FAST polls every 0.2 s: in 2 s about 10 polls (fewer on a loaded machine, never 0).
    wait_for(lambda: _reconciles("poll") >= before + 3, timeout=5, what="three polls")
    assert FAST.progress_poll_seconds == 0.2


def test_polls_of_many_running_jobs_share_a_budget(
    emulator: Emulator, operator_runner: Any
) -> None:
    """Three running jobs with a budget of 2 polls/s: each is polled every 1.5 s, not every
    0.2 s (without the budget: about 15 polls a second in all)."""
    add_prerequisites(emulator)
    config = replace(FAST, progress_polls_per_second=2.0)
    start_operator(emulator, operator_runner, config)
    for name in ("a", "b", "c"):
        emulator.create(ftj_body(name, spec()), keep_status=False)
    for name in ("a", "b", "c"):
        start_pod(emulator, wait_job(emulator, f"{name}-train-g1"))
        wait_phase(emulator, name, "Training")
    assert poll_interval(config, 3) == 1.5 and poll_interval(FAST, 3) == 0.2
    time.sleep(1.0)  # the pollers have all started and slept once
    before = _reconciles("poll")
    time.sleep(3.0)
    polls = _reconciles("poll") - before
    # 3 jobs x 3 s / 1.5 s = 6 (a poll may straddle the window's edges); 45 without a budget.
    assert 1 <= polls <= 9, polls


def _run_to_success(emulator: Emulator, operator_runner: Any) -> None:
    """One FineTuneJob through a real operator: training, then Succeeded and its event."""
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    pod_name = start_pod(emulator, wait_job(emulator, JOB))
    wait_phase(emulator, "bot", "Training")
    emulator.terminate_container(
        NS, pod_name, exit_code=0, message=json.dumps(result()), container="trainer"
    )
    emulator.set_job_finished(NS, JOB, succeeded=True)
    wait_phase(emulator, "bot", "Succeeded")
    wait_for(lambda: any(e["reason"] == "Succeeded" for e in events(emulator, "bot")))


def test_finished_job_is_never_polled(emulator: Emulator, operator_runner: Any) -> None:
    _run_to_success(emulator, operator_runner)
    # Let a poll that was already under way end, then watch for ten poll intervals.
    time.sleep(0.5)
    polls, reads, writes = _reconciles("poll"), _reads_of_children(emulator), len(emulator.writes)
    time.sleep(10 * FAST.progress_poll_seconds)
    assert _reconciles("poll") == polls
    assert _reads_of_children(emulator) == reads
    assert len(emulator.writes) == writes
    assert emulator.noop_status_writes == 0


def test_lifecycle_events_are_milestones_within_budget(
    emulator: Emulator, operator_runner: Any
) -> None:
    _run_to_success(emulator, operator_runner)
    reasons = [e["reason"] for e in events(emulator, "bot")]
    assert sorted(reasons) == ["JobCreated", "Running", "Succeeded"], reasons
    operator_writes = sum(
        emulator.count(verb) for verb in ("create", "patch", "update", "delete")
    ) - emulator.count("create", "finetunejobs")  # the test's own create
    # ConfigMap, Job, kopf's two patches, status writes (Pending, Training, Succeeded), events.
    assert operator_writes <= 10, operator_writes
    assert emulator.noop_status_writes == 0


# ---------------------------------------------------------------- the pure rules


def test_happy_path_transitions_make_milestone_events_only() -> None:
    first, job, cm = started()
    assert (
        transition_events(FineTuneJobStatus(), first.status) == []
    )  # JobCreated comes from the create itself
    running = track(first, job, cm, pods=(pod("p", trainer_state={"running": {}}),))
    assert [(e.type, e.reason) for e in running.events] == [("Normal", "Running")]
    done = with_conditions(job, "Complete")
    finished = track(
        first,
        done,
        cm,
        status=running.status,
        pods=(
            pod(
                "p",
                phase="Succeeded",
                trainer_state={"terminated": {"exitCode": 0, "message": json.dumps(result())}},
            ),
        ),
    )
    assert finished.status.phase == "Succeeded"
    assert [(e.type, e.reason) for e in finished.events] == [("Normal", "Succeeded")]


def test_one_warning_when_several_conditions_share_its_reason() -> None:
    first, job, cm = started()
    done = with_conditions(job, "Complete")
    failing = result(metrics={"evalLoss": 9.0, "rougeL": 0.01})
    p = track(
        first,
        done,
        cm,
        pods=(
            pod(
                "p",
                phase="Succeeded",
                trainer_state={"terminated": {"exitCode": 0, "message": json.dumps(failing)}},
            ),
        ),
    )
    assert p.status.phase == "Failed"
    gates = [e for e in p.events if e.reason == "GatesFailed"]
    assert len(gates) == 1 and gates[0].type == "Warning"
    assert gates[0].message.startswith("Failed=True")


def test_settled_only_when_finished_for_the_current_spec() -> None:
    first, job, cm = started()
    assert not is_settled(first.status, 1)  # running
    done = with_conditions(job, "Complete")
    finished = track(
        first,
        done,
        cm,
        pods=(
            pod(
                "p",
                phase="Succeeded",
                trainer_state={"terminated": {"exitCode": 0, "message": json.dumps(result())}},
            ),
        ),
    )
    assert is_settled(finished.status, 1)
    assert not is_settled(finished.status, 2)  # the spec changed since
    deferred = finished.status.model_copy(deep=True)
    for c in deferred.conditions:
        if c.type == "Validated":
            c.reason = "SpecChangeDeferred"
    assert not is_settled(deferred, 1)  # a change waits for this run: it starts a new one


def test_running_cost_is_refreshed_every_few_minutes_not_every_poll() -> None:
    first, job, cm = started()
    running_pod = pod("p", started="2026-01-01T01:00:00Z", trainer_state={"running": {}})
    p1 = track(first, job, cm, pods=(running_pod,))
    assert p1.status.cost.gpu_seconds == 10.0  # NOW is 10 s after the start
    # A poll a minute later keeps the recorded cost: no status write for it alone.
    later = NOW + timedelta(seconds=60)
    p2 = plan(
        observe(job=job, configmap=cm, pods=(running_pod,), status=p1.status, now=later), CONFIG
    )
    assert p2.status.cost == p1.status.cost
    # Past the refresh period it is rewritten.
    much_later = NOW + timedelta(seconds=COST_REFRESH_SECONDS)
    p3 = plan(
        observe(job=job, configmap=cm, pods=(running_pod,), status=p1.status, now=much_later),
        CONFIG,
    )
    assert p3.status.cost.gpu_seconds == 10.0 + COST_REFRESH_SECONDS


def test_per_job_locks_exist_only_while_a_reconcile_is_in_flight() -> None:
    import asyncio

    from finetune_operator.handlers.finetunejob import RunState

    async def scenario() -> tuple[int, int, list[str]]:
        state = RunState()
        order: list[str] = []
        gate = asyncio.Event()

        async def work(tag: str) -> None:
            async with state.serialised("ns", "bot"):
                order.append(f"{tag}-in")
                await gate.wait()
                order.append(f"{tag}-out")

        first = asyncio.create_task(work("a"))
        second = asyncio.create_task(work("b"))
        await asyncio.sleep(0)
        in_flight = state.tracked_objects
        gate.set()
        await asyncio.gather(first, second)
        for i in range(1000):  # many jobs reconciled once each
            async with state.serialised("ns", f"job-{i}"):
                pass
        return in_flight, state.tracked_objects, order

    in_flight, after, order = asyncio.run(scenario())
    assert in_flight == 1
    assert after == 0  # nothing kept per job once its reconciles are done
    assert order == ["a-in", "a-out", "b-in", "b-out"]  # serialised, never interleaved


def test_job_start_asks_only_what_it_does_not_know(
    emulator: Emulator, operator_runner: Any
) -> None:
    """References seen a moment ago are not asked for again, and the trainer Job the
    operator just created does not trigger a reconcile of its own (decision 1205)."""
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    job_events = _reconciles("job-event")
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    wait_job(emulator, JOB)
    reference_reads = emulator.count("get", "persistentvolumeclaims") + emulator.count(
        "get", "secrets"
    )
    assert reference_reads >= 2  # the claims were checked for the first job

    emulator.create(ftj_body("bot2", spec()), keep_status=False)
    second = wait_job(emulator, "bot2-train-g1")
    wait_phase(emulator, "bot2", "Pending")
    time.sleep(0.5)  # the Jobs' ADDED events have arrived by now
    assert (
        emulator.count("get", "persistentvolumeclaims") + emulator.count("get", "secrets")
        == reference_reads
    )
    assert _reconciles("job-event") == job_events

    # A change of the Job (here: it failed) still reconciles at once.
    emulator.set_job_finished(NS, second["metadata"]["name"], succeeded=False)
    wait_for(lambda: _reconciles("job-event") > job_events, timeout=5, what="a Job event")


def test_missing_reference_is_asked_for_again(emulator: Emulator, operator_runner: Any) -> None:
    add_prerequisites(emulator, pvcs=("datasets",))
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    wait_phase(emulator, "bot", "Pending")
    assert not trainer_jobs(emulator)
    add_prerequisites(emulator, pvcs=("adapters",), secrets=())
    wait_job(emulator, JOB)
