"""What a FineTuneSchedule does, on a fake clock: the planner given what was observed.

The schedule in these tests runs every Monday at 02:00 Berlin time (01:00 UTC in winter); it
was created on Tuesday 1 December 2026.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator.planners.finetuneschedule import Plan, plan, run_name
from support.schedule_samples import BEAT, UID, observed, run, sched_spec

MON_7 = datetime(2026, 12, 7, 1, 0, tzinfo=UTC)
MON_14 = MON_7 + timedelta(days=7)
MON_21 = MON_14 + timedelta(days=7)
MON_28 = MON_21 + timedelta(days=7)


def cond(p: Plan, type_: str) -> dict[str, Any]:
    return next(c for c in p.status["conditions"] if c["type"] == type_)


def creates(p: Plan) -> list[str]:
    return [a.name for a in p.actions if a.verb == "create"]


def deletes(p: Plan) -> list[str]:
    return [a.name for a in p.actions if a.verb == "delete"]


def after(p: Plan) -> dict[str, Any]:
    """The status a next observation sees once this plan's status was written."""
    return p.status


# ---------------------------------------------------------------- the clock


def test_a_new_schedule_waits_for_its_first_time_and_sleeps_until_then() -> None:
    now = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    p = plan(observed(now))
    assert p.actions == []
    assert p.status["nextScheduleTime"] == "2026-12-07T01:00:00Z"
    assert "lastScheduleTime" not in p.status
    assert cond(p, "Ready")["status"] == "True"
    assert cond(p, "Suspended")["status"] == "False"
    # Far away: looked at again within the hour at most, never polled faster.
    assert p.wake_after == 3600.0


def test_the_wake_up_is_the_next_due_time_when_it_is_near() -> None:
    p = plan(observed(MON_7 - timedelta(seconds=90)))
    assert p.wake_after == 90.0


def test_at_its_time_one_run_starts_named_after_the_slot_and_owned_by_the_schedule() -> None:
    p = plan(observed(MON_7 + timedelta(seconds=3)))
    name = run_name("weekly", MON_7)
    assert name == f"weekly-{int(MON_7.timestamp()) // 60}"
    assert creates(p) == [name]
    body = p.actions[0].body
    assert body is not None
    meta = body["metadata"]
    assert meta["ownerReferences"] == [
        {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneSchedule", "name": "weekly",
         "uid": UID, "controller": True, "blockOwnerDeletion": True}
    ]  # fmt: skip
    assert meta["labels"]["team"] == "ml" and meta["labels"]["finetune.dev/schedule"] == "weekly"
    assert meta["annotations"]["finetune.dev/scheduled-time"] == "2026-12-07T01:00:00Z"
    # Each run writes its adapter to a folder of its own: the champion is never overwritten.
    assert body["spec"]["output"]["uri"] == f"pvc://adapters/support-bot/{name}"
    assert p.status["lastScheduleTime"] == "2026-12-07T01:00:00Z"
    assert p.status["active"] == [name]
    assert p.status["runs"][0] == {
        "name": name, "scheduledTime": "2026-12-07T01:00:00Z", "trigger": "Schedule",
        "outcome": "Running",
    }  # fmt: skip
    assert p.status["nextScheduleTime"] == "2026-12-14T01:00:00Z"


def test_a_replayed_observation_never_makes_a_second_run_for_the_slot() -> None:
    now = MON_7 + timedelta(seconds=3)
    first = plan(observed(now))
    # The status write was lost (operator restart, API error): the run exists, status does not.
    again = plan(observed(now + timedelta(minutes=5), runs=(run(MON_7),)))
    assert creates(first) == [run_name("weekly", MON_7)]
    assert creates(again) == []
    assert again.status["lastScheduleTime"] == "2026-12-07T01:00:00Z"
    assert again.status["active"] == [run_name("weekly", MON_7)]
    # And with the status written, nothing happens until the next Monday either.
    later = plan(observed(now + timedelta(days=3), status=after(first), runs=(run(MON_7),)))
    assert later.actions == []


def test_missed_times_after_downtime_make_one_catch_up_run_for_the_latest() -> None:
    # The operator was down over three Mondays: one run, for the most recent.
    status = {"lastScheduleTime": "2026-12-07T01:00:00Z"}
    now = MON_28 + timedelta(hours=2)
    p = plan(observed(now, status=status, runs=(run(MON_7, "Succeeded"),)))
    assert creates(p) == [run_name("weekly", MON_28)]


def test_a_time_missed_by_more_than_the_starting_deadline_is_skipped() -> None:
    spec = sched_spec(startingDeadlineSeconds=3600)
    p = plan(observed(MON_7 + timedelta(hours=2), spec=spec))
    assert p.actions == []
    ready = cond(p, "Ready")
    assert ready["status"] == "True" and ready["reason"] == "MissedSchedule"
    assert "startingDeadlineSeconds (3600)" in ready["message"]
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "MissedSchedule")]
    # Within the deadline it still runs.
    assert creates(plan(observed(MON_7 + timedelta(minutes=59), spec=spec)))


def test_without_a_starting_deadline_a_late_time_still_runs_once() -> None:
    p = plan(observed(MON_7 + timedelta(days=6), spec=sched_spec()))
    assert creates(p) == [run_name("weekly", MON_7)]


def test_a_missed_time_is_run_once_even_when_observed_again() -> None:
    now = MON_7 + timedelta(days=2)
    first = plan(observed(now))
    second = plan(observed(now + timedelta(minutes=1), status=after(first), runs=(run(MON_7),)))
    assert len(creates(first)) == 1 and creates(second) == []


def test_spring_forward_runs_a_skipped_wall_clock_time_once_after_the_gap() -> None:
    spec = sched_spec(schedule="30 2 * * *")
    before = datetime(2026, 3, 28, 12, tzinfo=UTC)
    status = {"lastScheduleTime": "2026-03-28T01:30:00Z"}
    gap_end = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST
    assert plan(observed(before, spec=spec, status=status)).status["nextScheduleTime"] == (
        "2026-03-29T01:00:00Z"
    )
    p = plan(observed(gap_end + timedelta(seconds=1), spec=spec, status=status))
    assert creates(p) == [run_name("weekly", gap_end)]


# ---------------------------------------------------------------- concurrency


def test_forbid_waits_for_the_active_run_then_starts_within_the_deadline() -> None:
    spec = sched_spec(startingDeadlineSeconds=7200)
    status = {"lastScheduleTime": "2026-11-30T01:00:00Z"}
    still_running = run(MON_7 - timedelta(days=7))
    p = plan(
        observed(MON_7 + timedelta(minutes=1), spec=spec, status=status, runs=(still_running,))
    )
    assert p.actions == []
    assert cond(p, "Ready")["reason"] == "WaitingForActiveRun"
    done = run(MON_7 - timedelta(days=7), "Succeeded")
    p = plan(observed(MON_7 + timedelta(minutes=30), spec=spec, status=after(p), runs=(done,)))
    assert creates(p) == [run_name("weekly", MON_7)]


def test_replace_deletes_the_active_run_and_starts_the_new_one() -> None:
    spec = sched_spec(concurrencyPolicy="Replace")
    old = MON_7 - timedelta(days=7)
    status = {"lastScheduleTime": "2026-11-30T01:00:00Z"}
    p = plan(observed(MON_7 + timedelta(minutes=1), spec=spec, status=status, runs=(run(old),)))
    assert deletes(p) == [run_name("weekly", old)]
    assert creates(p) == [run_name("weekly", MON_7)]
    replaced = next(r for r in p.status["runs"] if r["name"] == run_name("weekly", old))
    assert replaced["outcome"] == "Failed" and replaced["reason"] == "Replaced"
    # The replaced run, still being deleted, keeps its record.
    p2 = plan(observed(MON_7 + timedelta(minutes=2), spec=spec, status=after(p),
                       runs=(run(old, deleting=True), run(MON_7))))  # fmt: skip
    assert p2.actions == [] and p2.status["active"] == [run_name("weekly", MON_7)]
    assert next(r for r in p2.status["runs"] if r["name"] == run_name("weekly", old))["reason"] == (
        "Replaced"
    )


def test_a_running_run_deleted_by_someone_counts_as_failed() -> None:
    first = plan(observed(MON_7 + timedelta(seconds=1)))
    p = plan(observed(MON_7 + timedelta(hours=1), status=after(first), runs=()))
    record = p.status["runs"][0]
    assert record["outcome"] == "Failed" and record["reason"] == "RunDeleted"
    assert p.status["active"] == []
    assert cond(p, "LastRunFailed")["status"] == "True"


# ---------------------------------------------------------------- suspend


def test_suspend_starts_nothing_and_the_latest_missed_time_runs_on_resume() -> None:
    spec = sched_spec(suspend=True)
    p = plan(observed(MON_7 + timedelta(minutes=1), spec=spec))
    assert p.actions == []
    assert cond(p, "Suspended")["status"] == "True"
    assert "nextScheduleTime" not in p.status and p.wake_after is None
    resumed = plan(observed(MON_14 + timedelta(hours=1), spec=sched_spec(), status=after(p)))
    assert creates(resumed) == [run_name("weekly", MON_14)]
    assert cond(resumed, "Suspended")["status"] == "False"


# ---------------------------------------------------------------- promotion


def finished(outcome: str, spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None,
             slot: datetime = MON_7, **kwargs: Any) -> Plan:  # fmt: skip
    base = status or {"lastScheduleTime": "2026-12-07T01:00:00Z"}
    runs = (run(slot, outcome, **kwargs),)
    return plan(observed(MON_7 + timedelta(hours=5), spec=spec, status=base, runs=runs))


def test_gates_passed_makes_the_succeeded_run_the_champion() -> None:
    p = finished("Succeeded", metrics={"rougeL": 0.61, "evalLoss": 0.9})
    name = run_name("weekly", MON_7)
    assert p.status["champion"] == {
        "job": name,
        "adapter": {"uri": f"pvc://adapters/support-bot/{name}", "digest": "sha256:" + "a" * 64,
                    "rank": 64},
        "metrics": {"rougeL": 0.61, "evalLoss": 0.9},
        "dataDigest": "sha256:data1",
        "since": "2026-12-07T05:00:00Z",
    }  # fmt: skip
    record = p.status["runs"][0]
    assert record["comparison"]["decision"] == "Promoted"
    assert record["gates"] == [{"metric": "rougeL", "value": 0.5, "passed": True}]
    assert cond(p, "PromotionBlocked")["status"] == "False"
    assert cond(p, "LastRunFailed")["status"] == "False"
    assert p.status["lastSuccessfulTime"] == "2026-12-07T05:00:00Z"
    assert p.status["lastOutcome"] == "Succeeded"
    assert [e.reason for e in p.events] == ["ChampionPromoted"]


def test_a_failed_run_keeps_the_champion_and_says_why() -> None:
    champion = {"job": "weekly-old", "adapter": {"uri": "pvc://a/old", "digest": "sha256:old"},
                "since": "2026-11-30T05:00:00Z"}  # fmt: skip
    status = {"lastScheduleTime": "2026-12-07T01:00:00Z", "champion": champion}
    p = finished("Failed", status=status, reason="GatesFailed")
    assert p.status["champion"] == champion
    failed = cond(p, "LastRunFailed")
    assert failed["status"] == "True" and failed["reason"] == "GatesFailed"
    blocked = cond(p, "PromotionBlocked")
    assert blocked["status"] == "True" and blocked["reason"] == "RunFailed"


def champion_with(metrics: dict[str, float], data: str = "sha256:data1") -> dict[str, Any]:
    return {"job": "weekly-old", "adapter": {"uri": "pvc://a/old", "digest": "sha256:old"},
            "metrics": metrics, "dataDigest": data, "since": "2026-11-30T05:00:00Z"}  # fmt: skip


def test_beat_champion_promotes_a_challenger_better_by_the_margin_on_every_metric() -> None:
    status = {"lastScheduleTime": "2026-12-07T01:00:00Z",
              "champion": champion_with({"rougeL": 0.60, "evalLoss": 1.00})}  # fmt: skip
    p = finished("Succeeded", spec=sched_spec(promotion=BEAT), status=status,
                 metrics={"rougeL": 0.63, "evalLoss": 0.95})  # fmt: skip
    comparison = p.status["runs"][0]["comparison"]
    assert comparison["decision"] == "Promoted" and comparison["reason"] == "BeatChampion"
    assert comparison["championJob"] == "weekly-old" and comparison["sameData"] is True
    # Both numbers are recorded; evalLoss is better when lower.
    assert comparison["metrics"] == [
        {"metric": "rougeL", "minMargin": 0.02, "passed": True, "challenger": 0.63,
         "champion": 0.60, "improvement": 0.03},
        {"metric": "evalLoss", "minMargin": 0.0, "passed": True, "challenger": 0.95,
         "champion": 1.0, "improvement": 0.05},
    ]  # fmt: skip
    assert p.status["champion"]["job"] == run_name("weekly", MON_7)


def test_beat_champion_keeps_the_champion_when_the_margin_is_not_met() -> None:
    champion = champion_with({"rougeL": 0.60, "evalLoss": 1.00}, data="sha256:older")
    status = {"lastScheduleTime": "2026-12-07T01:00:00Z", "champion": champion}
    p = finished("Succeeded", spec=sched_spec(promotion=BEAT), status=status,
                 metrics={"rougeL": 0.61, "evalLoss": 0.95})  # fmt: skip
    comparison = p.status["runs"][0]["comparison"]
    assert comparison["decision"] == "Kept" and comparison["reason"] == "ChampionNotBeaten"
    assert comparison["sameData"] is False
    assert "rougeL improved by 0.01, needs 0.02" in comparison["message"]
    assert p.status["champion"] == champion
    blocked = cond(p, "PromotionBlocked")
    assert blocked["status"] == "True" and blocked["reason"] == "ChampionNotBeaten"


def test_beat_champion_cannot_compare_a_metric_the_champion_lacks() -> None:
    status = {
        "lastScheduleTime": "2026-12-07T01:00:00Z",
        "champion": champion_with({"rougeL": 0.5}),
    }
    p = finished("Succeeded", spec=sched_spec(promotion=BEAT), status=status,
                 metrics={"rougeL": 0.9, "evalLoss": 0.5})  # fmt: skip
    assert p.status["runs"][0]["comparison"]["reason"] == "MetricMissing"
    assert "evalLoss (champion)" in cond(p, "PromotionBlocked")["message"]


def test_beat_champion_the_first_successful_run_becomes_the_champion() -> None:
    p = finished("Succeeded", spec=sched_spec(promotion=BEAT))
    assert p.status["runs"][0]["comparison"]["reason"] == "FirstChampion"
    assert p.status["champion"]["job"] == run_name("weekly", MON_7)


def test_a_decision_is_made_once_and_kept() -> None:
    p = finished("Succeeded")
    again = plan(observed(MON_7 + timedelta(hours=6), status=after(p),
                          runs=(run(MON_7, "Succeeded"),)))  # fmt: skip
    assert again.status == p.status and again.events == []


# ---------------------------------------------------------------- history


def test_history_limits_delete_the_oldest_finished_runs_but_never_the_champion() -> None:
    slots = [MON_7 + timedelta(days=7 * i) for i in range(5)]
    runs = (
        *tuple(run(s, "Succeeded", digest=f"sha256:{i}") for i, s in enumerate(slots)),
        run(slots[-1] + timedelta(days=7), "Failed"),
        run(slots[-1] + timedelta(days=14), "Failed"),
    )
    champion = {"job": run_name("weekly", slots[0]), "since": "2026-12-07T05:00:00Z",
                "adapter": {"uri": "pvc://a/0", "digest": "sha256:0"}}  # fmt: skip
    status = {"lastScheduleTime": "2027-01-18T01:00:00Z", "champion": champion}
    spec = sched_spec(successfulRunsHistoryLimit=2, failedRunsHistoryLimit=1)
    p = plan(observed(datetime(2027, 1, 18, 6, tzinfo=UTC), spec=spec, status=status, runs=runs))
    # Only runs 0..4 are new to status: GatesPassed promotes each in turn, so run 4 is champion.
    assert p.status["champion"]["job"] == run_name("weekly", slots[4])
    assert sorted(deletes(p)) == sorted(
        [run_name("weekly", slots[i]) for i in (0, 1, 2)]
        + [run_name("weekly", slots[-1] + timedelta(days=7))]
    )


def test_the_champions_run_is_kept_beyond_the_limit() -> None:
    p = finished("Succeeded")
    spec = sched_spec(successfulRunsHistoryLimit=0)
    again = plan(observed(MON_7 + timedelta(hours=6), spec=spec, status=after(p),
                          runs=(run(MON_7, "Succeeded"),)))  # fmt: skip
    assert deletes(again) == []


# ---------------------------------------------------------------- bad input


def test_an_invalid_schedule_is_refused_with_what_to_change_and_starts_nothing() -> None:
    p = plan(observed(MON_7, spec=sched_spec(schedule="0 25 * * *")))
    assert p.actions == [] and p.outcome == "permanent"
    ready = cond(p, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "hour: 25 is out of range 0-23" in ready["message"]


def test_an_unknown_time_zone_is_refused() -> None:
    p = plan(observed(MON_7, spec=sched_spec(timeZone="Europe/Atlantis")))
    assert cond(p, "Ready")["reason"] == "InvalidSpec"
    assert "IANA time zone" in cond(p, "Ready")["message"]


def test_edited_run_annotations_never_reach_status_malformed() -> None:
    hostile = run(MON_7, "Succeeded")
    hostile["metadata"]["annotations"].update(
        {
            "finetune.dev/trigger": "Whatever" * 50,
            "finetune.dev/scheduled-time": "not a time",
            "finetune.dev/source-digest": "sha256:" + "x" * 500,
        }
    )
    hostile["metadata"]["creationTimestamp"] = "2026-12-07T01:00:02Z"
    hostile["status"]["metrics"] = {"rougeL": float("inf"), "evalLoss": 0.9}
    p = plan(observed(MON_7 + timedelta(hours=5), runs=(hostile,)))
    record = p.status["runs"][0]
    assert record["trigger"] == "Schedule"
    assert record["scheduledTime"] == "2026-12-07T01:00:02Z"
    assert "sourceDigest" not in record
    assert record["metrics"] == {"evalLoss": 0.9}


def test_a_run_already_being_deleted_is_not_deleted_again() -> None:
    old = run(MON_7 - timedelta(days=7), "Failed", deleting=True)
    newer = run(MON_7, "Failed")
    status = {"lastScheduleTime": "2026-12-07T01:00:00Z"}
    p = plan(observed(MON_7 + timedelta(hours=5), status=status, runs=(old, newer)))
    assert deletes(p) == []


# ---------------------------------------------------------------- serving rejected the champion


def follower(name: str, history: list[dict[str, Any]], degraded: str = "") -> dict[str, Any]:
    status: dict[str, Any] = {"history": history}
    if degraded:
        status["conditions"] = [
            {"type": "Degraded", "status": "True", "reason": "RolledBack", "message": degraded}
        ]
    return {"metadata": {"name": name},
            "spec": {"source": {"fineTuneScheduleRef": {"name": "weekly"}}}, "status": status}  # fmt: skip


def test_a_champion_rolled_back_by_a_follower_is_marked_and_reported() -> None:
    champion = champion_with({"rougeL": 0.9, "evalLoss": 0.1})
    status = {"lastScheduleTime": "2026-12-07T01:00:00Z", "champion": champion}
    serving = follower(
        "support",
        [{"revision": 3, "digest": "sha256:old", "outcome": "RolledBack"}],
        degraded="canary error rate 0.2 > 0.05",
    )
    p = plan(observed(MON_7 + timedelta(hours=1), status=status, runs=(run(MON_7),),
                      followers=(serving,)))  # fmt: skip
    assert p.status["champion"]["rolledBack"] == {
        "adapterDeployment": "support",
        "reason": "RolledBack",
    }
    rolled = cond(p, "PromotionRolledBack")
    assert rolled["status"] == "True" and rolled["reason"] == "RolledBack"
    assert "support" in rolled["message"] and "canary error rate 0.2" in rolled["message"]
    # The next successful run replaces it even though it does not beat its metrics.
    after_run = plan(observed(MON_7 + timedelta(hours=5), spec=sched_spec(promotion=BEAT),
                              status=p.status, runs=(run(MON_7, "Succeeded"),),
                              followers=(serving,)))  # fmt: skip
    comparison = after_run.status["runs"][0]["comparison"]
    assert comparison["decision"] == "Promoted" and comparison["reason"] == "ChampionRolledBack"
    assert after_run.status["champion"]["job"] == run_name("weekly", MON_7)
    assert "rolledBack" not in after_run.status["champion"]
    assert cond(after_run, "PromotionRolledBack")["status"] == "False"


def test_a_rollback_of_another_adapter_does_not_mark_the_champion() -> None:
    status = {"champion": champion_with({"rougeL": 0.5})}
    serving = follower("support", [{"revision": 1, "digest": "sha256:other", "outcome": "RolledBack"},
                                   {"revision": 2, "digest": "sha256:old", "outcome": "Available"}])  # fmt: skip
    p = plan(observed(datetime(2026, 12, 3, tzinfo=UTC), status=status, followers=(serving,)))
    assert "rolledBack" not in p.status["champion"]
    assert cond(p, "PromotionRolledBack")["reason"] == "NotRolledBack"


def test_old_runs_that_fell_off_a_full_history_are_not_decided_again() -> None:
    """With a large history limit more FineTuneJobs exist than status.runs lists: the oldest
    ones, decided long ago, must not be promoted (or counted) again."""
    slots = [MON_7 + timedelta(days=7 * i) for i in range(25)]
    runs = tuple(run(s, "Succeeded", digest=f"sha256:{i:02d}") for i, s in enumerate(slots))
    spec = sched_spec(successfulRunsHistoryLimit=100)
    first = plan(observed(slots[-1] + timedelta(hours=5), spec=spec, runs=runs,
                          status={"lastScheduleTime": rfc(slots[-1])}))  # fmt: skip
    assert len(first.status["runs"]) == 20
    assert first.status["champion"]["job"] == run_name("weekly", slots[-1])
    again = plan(observed(slots[-1] + timedelta(hours=6), spec=spec, runs=runs,
                          status=first.status))  # fmt: skip
    assert again.status["champion"]["job"] == run_name("weekly", slots[-1])
    assert again.status["runs"] == first.status["runs"]
    assert again.finished == [] and again.events == []


def rfc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- same eval rows

CHAMPION_DIGEST = "sha256:" + "c" * 64
CHAMPION_URI = "pvc://adapters/support-bot/weekly-old/adapter"


def measured_champion(recorded: dict[str, float]) -> dict[str, Any]:
    """A champion whose own run recorded ``recorded`` (on that run's eval rows)."""
    return {"job": "weekly-old", "adapter": {"uri": CHAMPION_URI, "digest": CHAMPION_DIGEST},
            "metrics": recorded, "dataDigest": "sha256:data0",
            "since": "2026-11-30T05:00:00Z"}  # fmt: skip


def beat(recorded: dict[str, float], mine: dict[str, float], compared: dict[str, Any]) -> Plan:
    status = {"lastScheduleTime": "2026-12-07T01:00:00Z", "champion": measured_champion(recorded)}
    return finished("Succeeded", spec=sched_spec(promotion=BEAT), status=status, metrics=mine,
                    compared=compared)  # fmt: skip


def test_beat_champion_reads_the_champion_measured_on_the_challengers_eval_rows() -> None:
    """The champion's own run scored 0.70 on its (easier) eval rows; on the new rows it scores
    0.55, which the challenger's 0.60 beats: promoted on values measured alike."""
    same_rows = {"digest": CHAMPION_DIGEST, "metrics": {"rougeL": 0.55, "evalLoss": 1.10}}
    p = beat({"rougeL": 0.70, "evalLoss": 0.80}, {"rougeL": 0.60, "evalLoss": 1.00}, same_rows)
    record = p.status["runs"][0]
    comparison = record["comparison"]
    assert comparison["decision"] == "Promoted" and comparison["reason"] == "BeatChampion"
    assert comparison["sameEvalRows"] is True and "fallbackReason" not in comparison
    assert comparison["metrics"] == [
        {"metric": "rougeL", "minMargin": 0.02, "passed": True, "challenger": 0.60,
         "champion": 0.55, "improvement": 0.05},
        {"metric": "evalLoss", "minMargin": 0.0, "passed": True, "challenger": 1.0,
         "champion": 1.1, "improvement": 0.1},
    ]  # fmt: skip
    assert "both measured on this run's eval rows" in comparison["message"]
    assert record["compared"] == same_rows
    # The new champion's metrics are its own (the next run compares with its adapter anyway).
    assert p.status["champion"]["metrics"] == {"rougeL": 0.60, "evalLoss": 1.00}


def test_beat_champion_keeps_a_champion_that_is_as_good_on_the_same_rows() -> None:
    """The recorded 0.50 would have let the challenger through; on the same rows the champion
    scores 0.62 and the challenger's 0.63 misses the 0.02 margin."""
    same_rows = {"digest": CHAMPION_DIGEST, "metrics": {"rougeL": 0.62, "evalLoss": 0.90}}
    p = beat({"rougeL": 0.50, "evalLoss": 1.50}, {"rougeL": 0.63, "evalLoss": 0.85}, same_rows)
    comparison = p.status["runs"][0]["comparison"]
    assert comparison["decision"] == "Kept" and comparison["reason"] == "ChampionNotBeaten"
    assert comparison["sameEvalRows"] is True
    assert [m["champion"] for m in comparison["metrics"]] == [0.62, 0.90]
    assert "rougeL improved by 0.01, needs 0.02" in comparison["message"]
    assert p.status["champion"]["job"] == "weekly-old"


def test_beat_champion_falls_back_to_recorded_metrics_and_says_why() -> None:
    failed = {"digest": CHAMPION_DIGEST, "error": "fetch of s3://b/old failed: no objects found"}
    p = beat({"rougeL": 0.50, "evalLoss": 1.50}, {"rougeL": 0.60, "evalLoss": 1.00}, failed)
    comparison = p.status["runs"][0]["comparison"]
    assert comparison["decision"] == "Promoted" and comparison["sameEvalRows"] is False
    assert [m["champion"] for m in comparison["metrics"]] == [0.50, 1.50]
    assert (
        "could not evaluate the champion: fetch of s3://b/old failed"
        in (comparison["fallbackReason"])
    )
    assert "champion values from its own run" in comparison["message"]


def test_values_measured_for_another_adapter_are_not_taken_for_the_champions() -> None:
    other = {"digest": "sha256:" + "d" * 64, "metrics": {"rougeL": 0.10, "evalLoss": 9.0}}
    p = beat({"rougeL": 0.70, "evalLoss": 0.80}, {"rougeL": 0.60, "evalLoss": 1.00}, other)
    comparison = p.status["runs"][0]["comparison"]
    assert comparison["decision"] == "Kept" and comparison["sameEvalRows"] is False
    assert "not the champion's adapter" in comparison["fallbackReason"]


def test_a_run_without_compare_with_falls_back_as_an_older_trainer_would() -> None:
    status = {"lastScheduleTime": "2026-12-07T01:00:00Z",
              "champion": measured_champion({"rougeL": 0.5, "evalLoss": 1.0})}  # fmt: skip
    p = finished("Succeeded", spec=sched_spec(promotion=BEAT), status=status,
                 metrics={"rougeL": 0.6, "evalLoss": 0.9})  # fmt: skip
    comparison = p.status["runs"][0]["comparison"]
    assert comparison["sameEvalRows"] is False
    assert "no evaluation.compareWith" in comparison["fallbackReason"]


# ---------------------------------------------------------------- timing metrics (decision 2020)

LATENCY = {"policy": "BeatChampion", "metrics": [
    {"metric": "evalLoss", "minMargin": 0.0}, {"metric": "latencyP95Ms", "minMargin": 10.0}]}  # fmt: skip


def beat_on_latency(compared: dict[str, Any], recorded_p95: float = 900.0) -> dict[str, Any]:
    """The challenger's p95 is 400 ms against the champion's 500 ms on the same rows (or the
    champion's own run recorded ``recorded_p95``); its loss is better either way."""
    status = {
        "lastScheduleTime": "2026-12-07T01:00:00Z",
        "champion": measured_champion({"evalLoss": 1.2, "latencyP95Ms": recorded_p95}),
    }
    p = finished("Succeeded", spec=sched_spec(promotion=LATENCY), status=status,
                 metrics={"evalLoss": 1.0, "latencyP95Ms": 400.0}, compared=compared)  # fmt: skip
    return dict(p.status["runs"][0]["comparison"]) | {"champion": p.status["champion"]["job"]}


def test_timing_measured_alike_in_the_challengers_run_decides() -> None:
    """The trainer timed both adapters in one process, each after its own warm-up: latency
    counts like any other metric, both ways."""
    alike = {"digest": CHAMPION_DIGEST, "timingComparable": True,
             "metrics": {"evalLoss": 1.1, "latencyP95Ms": 500.0}}  # fmt: skip
    comparison = beat_on_latency(alike)
    assert comparison["decision"] == "Promoted" and comparison["reason"] == "BeatChampion"
    latency = comparison["metrics"][1]
    assert latency == {"metric": "latencyP95Ms", "minMargin": 10.0, "passed": True,
                       "challenger": 400.0, "champion": 500.0, "improvement": 100.0,
                       "timingComparable": True}  # fmt: skip
    assert "timingComparable" not in comparison["metrics"][0]  # a quality metric
    # The champion is faster on the same rows: it stays, on latency.
    faster = alike | {"metrics": {"evalLoss": 1.1, "latencyP95Ms": 395.0}}
    kept = beat_on_latency(faster)
    assert kept["decision"] == "Kept" and kept["reason"] == "ChampionNotBeaten"
    assert "latencyP95Ms improved by -5, needs 10" in kept["message"]
    assert kept["champion"] == "weekly-old"


def test_timing_recorded_by_the_champions_own_run_never_promotes() -> None:
    """The champion could not be evaluated: its recorded 900 ms came from another run (another
    machine, GPU or load). Quality still falls back; latency refuses to decide."""
    failed = {"digest": CHAMPION_DIGEST, "error": "fetch of s3://b/old failed: no objects found"}
    comparison = beat_on_latency(failed)
    assert comparison["decision"] == "Kept" and comparison["reason"] == "TimingNotComparable"
    assert comparison["champion"] == "weekly-old"
    assert comparison["sameEvalRows"] is False and "fetch of s3://b/old" in comparison[
        "fallbackReason"]  # fmt: skip
    latency = comparison["metrics"][1]
    assert latency["timingComparable"] is False and latency["passed"] is False
    assert (latency["challenger"], latency["champion"]) == (400.0, 900.0)
    assert "improvement" not in latency  # not judged
    assert comparison["metrics"][0]["passed"] is True  # evalLoss still compared
    message = comparison["message"]
    assert "latencyP95Ms cannot decide" in message and "recorded by its own run" in message
    assert "remove them from promotion.metrics" in message


def test_timing_from_a_trainer_that_does_not_vouch_for_it_never_promotes() -> None:
    """Values measured in the run, but the trainer did not report they were measured alike (an
    image from before the warm-up per adapter): the compared adapter ran warm, second."""
    for flag in ({}, {"timingComparable": False}):
        unvouched = {"digest": CHAMPION_DIGEST, **flag,
                     "metrics": {"evalLoss": 1.1, "latencyP95Ms": 31.0}}  # fmt: skip
        comparison = beat_on_latency(unvouched)
        assert comparison["decision"] == "Kept" and comparison["reason"] == "TimingNotComparable"
        assert comparison["sameEvalRows"] is True
        assert comparison["metrics"][1]["timingComparable"] is False
        assert "comparedTimingComparable is not true" in comparison["message"]
        # Also the other way: a faster-looking challenger is not promoted on it either.
        quicker = unvouched | {"metrics": {"evalLoss": 1.1, "latencyP95Ms": 900.0}}
        assert beat_on_latency(quicker)["reason"] == "TimingNotComparable"


def test_quality_metrics_fall_back_as_before_when_no_timing_metric_is_listed() -> None:
    failed = {"digest": CHAMPION_DIGEST, "error": "no objects found"}
    status = {
        "lastScheduleTime": "2026-12-07T01:00:00Z",
        "champion": measured_champion({"evalLoss": 1.2, "latencyP95Ms": 900.0}),
    }
    p = finished("Succeeded", spec=sched_spec(promotion={"policy": "BeatChampion",
                 "metrics": [{"metric": "evalLoss"}]}), status=status,
                 metrics={"evalLoss": 1.0, "latencyP95Ms": 400.0}, compared=failed)  # fmt: skip
    comparison = p.status["runs"][0]["comparison"]
    assert comparison["decision"] == "Promoted" and "timingComparable" not in str(comparison)


def started_run(promotion: dict[str, Any] | None, champion: dict[str, Any] | None,
                output_secret: bool = False) -> dict[str, Any]:  # fmt: skip
    """The FineTuneJob spec of the run the schedule starts at its next time."""
    spec = sched_spec(promotion=promotion)
    if output_secret:
        spec["jobTemplate"]["spec"]["output"]["credentialsSecretRef"] = {"name": "s3-creds"}
    status: dict[str, Any] = {"lastScheduleTime": "2026-11-30T01:00:00Z"}
    if champion:
        status["champion"] = champion
    p = plan(observed(MON_7 + timedelta(minutes=1), spec=spec, status=status))
    (body,) = [a.body for a in p.actions if a.verb == "create"]
    assert body is not None
    return dict(body["spec"])


def test_a_new_run_evaluates_the_champions_adapter_with_beat_champion() -> None:
    ftj = started_run(BEAT, measured_champion({"rougeL": 0.5}), output_secret=True)
    assert ftj["evaluation"]["compareWith"] == {
        "uri": CHAMPION_URI,
        "digest": CHAMPION_DIGEST,
        "credentialsSecretRef": {"name": "s3-creds"},
    }


def test_no_compare_with_without_beat_champion_a_champion_or_a_valid_one() -> None:
    assert "compareWith" not in started_run(None, measured_champion({})).get("evaluation", {})
    assert "compareWith" not in started_run(BEAT, None).get("evaluation", {})
    rejected = measured_champion({}) | {"rolledBack": {"adapterDeployment": "a", "reason": "R"}}
    assert "compareWith" not in started_run(BEAT, rejected).get("evaluation", {})
    # A champion written into status by hand with a URI a FineTuneJob refuses.
    forged = measured_champion({}) | {"adapter": {"uri": "pvc://a/../b", "digest": CHAMPION_DIGEST}}
    assert "compareWith" not in started_run(BEAT, forged).get("evaluation", {})
