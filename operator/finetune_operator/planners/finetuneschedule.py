"""Decide a FineTuneSchedule's status and the runs to start or remove from what was observed.

Pure: the handler observes (the schedule, the FineTuneJobs it owns, the clock), calls
:func:`plan`, carries out the returned actions and writes the returned status. The same
observation always gives the same plan, and a run's name is a function of its slot, so a
repeated plan (after an operator restart or a failed write) meets the run it already made
instead of making a second one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from ..api.common import API_VERSION, owner_reference, set_condition
from ..api.finetunejob import CompareWith
from ..api.finetuneschedule import KIND, RUN_RECORDS_MAX, FineTuneScheduleSpec
from ..api.metrics_catalog import METRICS, TIMING_METRICS
from ..builders import names
from ..builders.data_probe import LABEL_PROBE, probe_job, probe_result
from ..domain import cron
from ..domain.times import format_rfc3339, parse_rfc3339
from .events import Event

# Labels and annotations on each run.
LABEL_SCHEDULE = "finetune.dev/schedule"
ANNOTATION_SCHEDULED_TIME = "finetune.dev/scheduled-time"
ANNOTATION_TRIGGER = "finetune.dev/trigger"
ANNOTATION_SOURCE_DIGEST = "finetune.dev/source-digest"
# While a data probe runs, the schedule is looked at again this often (a Job event comes first).
PROBE_WAIT_SECONDS = 10.0

# Condition types, in the order they appear in status.
READY = "Ready"
SUSPENDED = "Suspended"
LAST_RUN_FAILED = "LastRunFailed"
PROMOTION_BLOCKED = "PromotionBlocked"
PROMOTION_ROLLED_BACK = "PromotionRolledBack"
CONDITION_TYPES = (READY, SUSPENDED, LAST_RUN_FAILED, PROMOTION_BLOCKED, PROMOTION_ROLLED_BACK)
# Outcomes of an AdapterDeployment revision (status.history[].outcome) that reject an adapter.
REJECTED_OUTCOMES = ("RolledBack", "CanaryAborted", "Failed")

# Reasons that make a Warning event when they appear.
WARNING_REASONS = frozenset({"InvalidSpec", "MissedSchedule", "RunDeleted", "DataCheckFailed"})
# Longest sleep between two looks at a schedule whose next time is far away: a clock jump or
# a lost watch event is caught up within this time.
MAX_WAKE_SECONDS = 3600.0
FINISHED = ("Succeeded", "Failed")
RUN_TRIGGERS = ("Schedule", "DataChange")
DIGEST = re.compile(r"sha256:[0-9a-f]{1,64}")


# ---------------------------------------------------------------- inputs and outputs


@dataclass(frozen=True)
class Observed:
    """Everything the planner needs, gathered by the handler."""

    name: str
    namespace: str
    uid: str
    generation: int
    created: datetime
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    # The FineTuneJobs this schedule owns (controller ownerReference with its uid).
    runs: tuple[Mapping[str, Any], ...] = ()
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    # With trigger.onDataChange: the schedule's probe Jobs and their pods, and the image and
    # pull policy the probe runs with (the trainer's).
    # AdapterDeployments that follow this schedule (spec.source.fineTuneScheduleRef).
    followers: tuple[Mapping[str, Any], ...] = ()
    probes: tuple[Mapping[str, Any], ...] = ()
    probe_pods: tuple[Mapping[str, Any], ...] = ()
    trainer_image: str = ""
    pull_policy: str = "IfNotPresent"


@dataclass(frozen=True)
class RunAction:
    """One write to the Kubernetes API: create or delete a run (FineTuneJob)."""

    verb: Literal["create", "delete"]
    name: str
    body: dict[str, Any] | None = None
    kind: Literal["FineTuneJob", "Job"] = "FineTuneJob"


@dataclass
class Plan:
    status: dict[str, Any]
    actions: list[RunAction] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # "permanent": nothing changes until the spec does.
    outcome: Literal["ok", "permanent"] = "ok"
    message: str = ""
    # Seconds until the schedule must be looked at again (its next time), None: no time due.
    wake_after: float | None = None
    # Runs that finished in this plan, and the promotion decisions made (for metrics).
    finished: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- small helpers


def run_name(schedule: str, slot: datetime) -> str:
    """The run of one slot: ``<schedule>-<slot in Unix minutes>`` (shortened when too long)."""
    return names.child_name(schedule, str(int(slot.timestamp()) // 60))


def _condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def run_outcome(ftj: Mapping[str, Any]) -> tuple[str, str | None]:
    """(Running | Succeeded | Failed, failure reason) of a FineTuneJob from its status."""
    status = ftj.get("status") or {}
    succeeded = _condition(status, "Succeeded")
    failed = _condition(status, "Failed")
    if succeeded and succeeded.get("status") == "True":
        return "Succeeded", None
    if failed and failed.get("status") == "True":
        return "Failed", str(failed.get("reason") or "Failed")
    return "Running", None


def _finite_metrics(raw: object) -> dict[str, float] | None:
    if not isinstance(raw, Mapping):
        return None
    out = {
        str(k)[:64]: float(v)
        for k, v in raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    return out or None


def _adapter_ref(status: Mapping[str, Any]) -> dict[str, Any] | None:
    adapter = status.get("adapter") or {}
    if not adapter.get("uri") or not adapter.get("digest"):
        return None
    ref = {"uri": adapter["uri"], "digest": adapter["digest"]}
    if adapter.get("baseModel"):
        ref["baseModel"] = adapter["baseModel"]
    if adapter.get("rank"):
        ref["rank"] = adapter["rank"]
    return ref


def _compared(ftj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The adapter the run also evaluated on its eval rows (evaluation.compareWith), with the
    metrics it measured or why there are none."""
    compare = (((ftj.get("spec") or {}).get("evaluation") or {}).get("compareWith")) or {}
    digest = str(compare.get("digest") or "")
    if not DIGEST.fullmatch(digest):
        return None
    status = ftj.get("status") or {}
    out: dict[str, Any] = {"digest": digest}
    metrics = _finite_metrics(status.get("comparedMetrics"))
    if metrics:
        out["metrics"] = metrics
        if status.get("comparedTimingComparable") is True:
            out["timingComparable"] = True
    else:
        error = status.get("comparedError")
        out["error"] = str(error)[:1024] if error else "the run's status has no comparedMetrics"
    return out


def observe_run(ftj: Mapping[str, Any]) -> dict[str, Any]:
    """The run record of one owned FineTuneJob, as status.runs lists it."""
    meta = ftj.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    status = ftj.get("status") or {}
    outcome, reason = run_outcome(ftj)
    if outcome == "Running" and meta.get("deletionTimestamp"):
        outcome, reason = "Failed", "RunDeleted"
    # Annotations of a run can be edited by anyone who may edit the run: only well-formed
    # values reach status (a malformed one would make the whole status write invalid).
    slot = parse_rfc3339(annotations.get(ANNOTATION_SCHEDULED_TIME)) or parse_rfc3339(
        meta.get("creationTimestamp")
    )
    trigger = annotations.get(ANNOTATION_TRIGGER)
    record: dict[str, Any] = {
        "name": meta.get("name"),
        "scheduledTime": format_rfc3339(slot) if slot else "",
        "trigger": trigger if trigger in RUN_TRIGGERS else "Schedule",
        "outcome": outcome,
    }
    if reason:
        record["reason"] = reason
    digest = (status.get("data") or {}).get("digest")
    if digest:
        record["dataDigest"] = digest
    source = str(annotations.get(ANNOTATION_SOURCE_DIGEST) or "")
    if DIGEST.fullmatch(source):
        record["sourceDigest"] = source
    if outcome in FINISHED:
        record["completedAt"] = status.get("completedAt") or None
        gates = [
            {
                k: v
                for k, v in (
                    ("metric", g.get("metric")),
                    ("value", g.get("value")),
                    ("passed", bool(g.get("passed"))),
                )
                if v is not None
            }
            for g in status.get("gates") or []
            if g.get("metric")
        ]
        record["gates"] = gates or None
        record["metrics"] = _finite_metrics(status.get("metrics"))
        record["compared"] = _compared(ftj)
        if outcome == "Succeeded":
            record["adapter"] = _adapter_ref(status)
    return {k: v for k, v in record.items() if v is not None}


# ---------------------------------------------------------------- promotion


def _improvement(metric: str, challenger: float, champion: float) -> float:
    better = METRICS[metric].better if metric in METRICS else "higher"
    return challenger - champion if better == "higher" else champion - challenger


def decide_promotion(
    promotion: Mapping[str, Any], record: Mapping[str, Any], champion: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The promotion decision about one finished run (status.runs[].comparison)."""
    policy = str(promotion.get("policy") or "GatesPassed")
    out: dict[str, Any] = {"policy": policy}
    if champion:
        out["championJob"] = champion.get("job")
    if record.get("outcome") != "Succeeded":
        reason = str(record.get("reason") or "RunFailed")
        return out | {
            "decision": "NotEligible",
            "reason": "RunFailed",
            "message": f"the run failed ({reason}); the champion stays",
        }
    adapter = record.get("adapter")
    if not adapter:
        return out | {
            "decision": "NotEligible",
            "reason": "NoAdapter",
            "message": "the run succeeded but its status names no adapter (uri and digest)",
        }
    if champion and (champion.get("adapter") or {}).get("digest") == adapter.get("digest"):
        return out | {
            "decision": "Kept",
            "reason": "SameAdapter",
            "message": "the run produced the champion's adapter again (same digest)",
        }
    if policy == "GatesPassed":
        return out | {
            "decision": "Promoted",
            "reason": "GatesPassed",
            "message": "the run's quality gates passed",
        }
    if not champion:
        return out | {
            "decision": "Promoted",
            "reason": "FirstChampion",
            "message": "no champion yet: the first successful run becomes the champion",
        }
    if champion.get("rolledBack"):
        return out | {
            "decision": "Promoted",
            "reason": "ChampionRolledBack",
            "message": "the champion was rolled back in serving: it cannot block a run whose "
            "gates passed",
        }
    return out | _compare_with_champion(promotion, record, champion)


def _compare_with_champion(
    promotion: Mapping[str, Any], record: Mapping[str, Any], champion: Mapping[str, Any]
) -> dict[str, Any]:
    mine = record.get("metrics") or {}
    theirs, fallback = champion_values(record, champion)
    timing_problem = timing_not_comparable(record, fallback)
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    not_comparable: list[str] = []
    short: list[str] = []
    for wanted in promotion.get("metrics") or []:
        metric, margin = str(wanted.get("metric")), float(wanted.get("minMargin") or 0.0)
        row: dict[str, Any] = {"metric": metric, "minMargin": margin, "passed": False}
        value, best = mine.get(metric), theirs.get(metric)
        if value is not None:
            row["challenger"] = value
        if best is not None:
            row["champion"] = best
        if metric in TIMING_METRICS:
            row["timingComparable"] = timing_problem is None
        if value is None or best is None:
            missing.append(f"{metric} ({'challenger' if value is None else 'champion'})")
        elif metric in TIMING_METRICS and timing_problem is not None:
            not_comparable.append(metric)
        else:
            gain = _improvement(metric, float(value), float(best))
            row["improvement"] = round(gain, 6)
            row["passed"] = gain >= margin
            if not row["passed"]:
                short.append(f"{metric} improved by {gain:.4g}, needs {margin:.4g}")
        rows.append(row)
    result: dict[str, Any] = {"metrics": rows, "sameEvalRows": fallback is None}
    if fallback is not None:
        result["fallbackReason"] = fallback[:1024]
    a, b = record.get("dataDigest"), champion.get("dataDigest")
    if a and b:
        result["sameData"] = a == b
    basis = (
        " (both measured on this run's eval rows)"
        if fallback is None
        else " (champion values from its own run: " + fallback + ")"
    )
    if missing:
        return result | {
            "decision": "Kept",
            "reason": "MetricMissing",
            "message": ("cannot compare, no value for " + ", ".join(missing)
                        + ": list only metrics the evaluation reports" + basis)[:1024],
        }  # fmt: skip
    if not_comparable:
        return result | {
            "decision": "Kept",
            "reason": "TimingNotComparable",
            "message": timing_message(not_comparable, str(timing_problem), short)[:1024],
        }
    if short:
        return result | {
            "decision": "Kept",
            "reason": "ChampionNotBeaten",
            "message": ("the champion stays: " + "; ".join(short) + basis)[:1024],
        }
    return result | {
        "decision": "Promoted",
        "reason": "BeatChampion",
        "message": ("the run beat the champion on every metric by its margin" + basis)[:1024],
    }


def champion_values(
    record: Mapping[str, Any], champion: Mapping[str, Any]
) -> tuple[Mapping[str, Any], str | None]:
    """The champion's metrics to compare with, and None when they were measured in the
    challenger's own run on the same eval rows, else why the champion's recorded metrics (from
    its own run, on its own eval rows) are used instead."""
    compared = record.get("compared") or {}
    digest = (champion.get("adapter") or {}).get("digest")
    recorded = champion.get("metrics") or {}
    if not compared:
        return recorded, "the run did not evaluate the champion (no evaluation.compareWith)"
    if compared.get("digest") != digest:
        return recorded, (
            f"the run evaluated {compared.get('digest')}, not the champion's adapter {digest}"
        )
    if not compared.get("metrics"):
        return recorded, f"the run could not evaluate the champion: {compared.get('error')}"
    return compared["metrics"], None


def timing_not_comparable(record: Mapping[str, Any], fallback: str | None) -> str | None:
    """Why the champion's timing values cannot be set against the run's, and what to change;
    None when the run timed both adapters under the same conditions (decision 2020)."""
    if fallback is not None:
        return (
            "the champion's value was recorded by its own run (another run: its machine, GPU "
            "and load, its eval rows) and timing compares only within one run: let the run "
            "evaluate the champion (see fallbackReason)"
        )
    if (record.get("compared") or {}).get("timingComparable") is not True:
        return (
            "the run's trainer did not report that it timed both adapters under the same "
            "conditions (the run's status.comparedTimingComparable is not true): use a trainer "
            "image that reports it"
        )
    return None


def timing_message(metrics: list[str], problem: str, short: list[str]) -> str:
    """Why timing metrics kept the champion, and what to change."""
    text = (
        f"the champion stays: {', '.join(metrics)} cannot decide, {problem}, or remove them "
        "from promotion.metrics and hold latency with qualityGates or the AdapterDeployment "
        "canary"
    )
    if short:
        text += "; also " + "; ".join(short)
    return text


def champion_from(record: Mapping[str, Any], since: str) -> dict[str, Any]:
    champion: dict[str, Any] = {
        "job": record["name"],
        "adapter": dict(record["adapter"]),
        "since": since,
    }
    if record.get("metrics"):
        champion["metrics"] = dict(record["metrics"])
    if record.get("dataDigest"):
        champion["dataDigest"] = record["dataDigest"]
    return champion


# ---------------------------------------------------------------- the run to create


def run_body(
    obs: Observed,
    spec: Mapping[str, Any],
    slot: datetime,
    trigger: str,
    source_digest: str | None = None,
    champion: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The FineTuneJob of one slot, owned by the schedule, writing to a folder of its own.

    With promotion BeatChampion and a champion, the run also evaluates the champion's adapter
    on its eval rows (evaluation.compareWith), so the rule compares values measured alike."""
    name = run_name(obs.name, slot)
    template = spec.get("jobTemplate") or {}
    meta_t = template.get("metadata") or {}
    ftj_spec = json.loads(json.dumps(template.get("spec") or {}))
    output = ftj_spec.get("output") or {}
    if output.get("uri"):
        output["uri"] = f"{str(output['uri']).rstrip('/')}/{name}"
    compare = compare_with(spec, champion)
    if compare is not None:
        ftj_spec.setdefault("evaluation", {})["compareWith"] = compare
    labels = {
        **(meta_t.get("labels") or {}),
        names.LABEL_MANAGED_BY: names.MANAGER,
        LABEL_SCHEDULE: names.label_value(obs.name),
    }
    annotations = {
        **(meta_t.get("annotations") or {}),
        ANNOTATION_SCHEDULED_TIME: format_rfc3339(slot),
        ANNOTATION_TRIGGER: trigger,
    }
    if source_digest:
        annotations[ANNOTATION_SOURCE_DIGEST] = source_digest
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {
            "name": name,
            "namespace": obs.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(KIND, obs.name, obs.uid)],
        },
        "spec": ftj_spec,
    }


def compare_with(
    spec: Mapping[str, Any], champion: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """evaluation.compareWith for a new run: the champion's adapter, fetched with the output's
    credentials (where the schedule's runs write). None without BeatChampion, without a
    champion, for a champion serving rejected (it is replaced whatever the metrics), or when
    the champion's URI or digest would not pass the FineTuneJob's checks (anyone allowed to
    write the schedule's status could put anything there)."""
    if ((spec.get("promotion") or {}).get("policy")) != "BeatChampion" or not champion:
        return None
    if champion.get("rolledBack"):
        return None
    adapter = champion.get("adapter") or {}
    output = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("output") or {}
    body: dict[str, Any] = {"uri": adapter.get("uri"), "digest": adapter.get("digest")}
    if output.get("credentialsSecretRef"):
        body["credentialsSecretRef"] = dict(output["credentialsSecretRef"])
    try:
        CompareWith.model_validate(body)
    except ValidationError:
        return None
    return body


# ---------------------------------------------------------------- the plan


class _Status:
    def __init__(self, current: Mapping[str, Any], generation: int, now: datetime) -> None:
        self.data: dict[str, Any] = json.loads(json.dumps(dict(current)))
        self.data["conditions"] = list(self.data.get("conditions") or [])
        self.generation = generation
        self.now = format_rfc3339(now)

    def cond(self, type_: str, status: Literal["True", "False"], reason: str, message: str) -> None:
        self.data["conditions"] = set_condition(
            self.data["conditions"], type_, status, reason, message[:4096],
            generation=self.generation, now=self.now,
        )  # fmt: skip

    def finish(self) -> dict[str, Any]:
        self.data["observedGeneration"] = self.generation
        order = {t: i for i, t in enumerate(CONDITION_TYPES)}
        self.data["conditions"].sort(key=lambda c: order.get(c.get("type"), len(order)))
        return {k: v for k, v in self.data.items() if v is not None}


def _merge_records(obs: Observed, seen: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """status.runs updated from the observed runs; a record whose FineTuneJob is gone keeps
    what it last said (a running one that vanished is a failed run)."""
    records: dict[str, dict[str, Any]] = {}
    for old in obs.status.get("runs") or []:
        if old.get("name"):
            records[str(old["name"])] = dict(old)
    for name, fresh in seen.items():
        old = records.get(name, {})
        if old.get("outcome") in FINISHED and fresh.get("reason") == "RunDeleted":
            continue  # being deleted after it finished (pruned, replaced): its record stands
        if "comparison" in old:
            fresh["comparison"] = old["comparison"]
        records[name] = fresh
    for name, record in records.items():
        if name not in seen and record.get("outcome") == "Running":
            record.update(
                outcome="Failed", reason="RunDeleted", completedAt=format_rfc3339(obs.now)
            )
    return sorted(records.values(), key=lambda r: (str(r.get("scheduledTime")), r["name"]))


def _fallen_off(status: Mapping[str, Any], records: list[dict[str, Any]]) -> set[str]:
    """Runs whose records fell off a full status.runs (their FineTuneJobs are still kept by a
    large history limit): decided and counted long ago, they are not decided again."""
    old = status.get("runs") or []
    if len(old) < RUN_RECORDS_MAX:
        return set()
    names = {str(r.get("name")) for r in old}
    oldest = min(str(r.get("scheduledTime")) for r in old)
    return {
        r["name"] for r in records
        if r["name"] not in names and str(r.get("scheduledTime")) < oldest
    }  # fmt: skip


def _decide_finished(
    spec: Mapping[str, Any], records: list[dict[str, Any]], champion: dict[str, Any] | None,
    now: datetime, fallen: set[str],
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:  # fmt: skip
    """Promotion decisions for finished runs that have none yet, oldest first."""
    decided: list[dict[str, Any]] = []
    promotion = spec.get("promotion") or {}
    for record in records:
        if record.get("outcome") not in FINISHED or "comparison" in record:
            continue
        if record["name"] in fallen:
            continue
        comparison = decide_promotion(promotion, record, champion)
        record["comparison"] = comparison
        if comparison["decision"] == "Promoted":
            champion = champion_from(record, str(record.get("completedAt") or format_rfc3339(now)))
        decided.append(record)
    return champion, decided


def _prune(
    spec: Mapping[str, Any], records: list[dict[str, Any]], seen: Mapping[str, Any],
    champion: Mapping[str, Any] | None, deleting: set[str],
) -> list[RunAction]:  # fmt: skip
    """Delete finished runs beyond the history limits, oldest first; never the champion's."""
    limits = {
        "Succeeded": int(spec.get("successfulRunsHistoryLimit", 3)),
        "Failed": int(spec.get("failedRunsHistoryLimit", 1)),
    }
    keep = (champion or {}).get("job")
    actions: list[RunAction] = []
    for outcome, limit in limits.items():
        finished = [
            r for r in reversed(records)
            if r["outcome"] == outcome and r["name"] in seen and r["name"] not in deleting
        ]  # fmt: skip
        for record in finished[limit:]:
            if record["name"] != keep:
                actions.append(RunAction("delete", record["name"]))
    return actions


def _due_slot(
    obs: Observed, sched: cron.Cron, tz: ZoneInfo, last: datetime
) -> tuple[datetime | None, datetime | None]:
    """(the most recent slot not yet run, the next slot after now)."""
    latest = cron.last_at_or_before(sched, tz, obs.now)
    upcoming = cron.next_after(sched, tz, obs.now)
    if latest is None or latest <= last:
        return None, upcoming
    return latest, upcoming


def plan(obs: Observed) -> Plan:
    """The desired status and the actions that get there."""
    st = _Status(obs.status, obs.generation, obs.now)
    try:
        spec_model = FineTuneScheduleSpec.model_validate(obs.spec)
    except ValidationError as exc:
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()
        )
        st.cond(READY, "False", "InvalidSpec", f"fix the spec: {message}")
        return Plan(
            st.finish(),
            events=[Event("Warning", "InvalidSpec", message[:1024])],
            outcome="permanent",
            message=message,
        )
    spec = spec_model.to_wire()
    seen = {str(r["metadata"]["name"]): observe_run(r) for r in obs.runs}
    records = _merge_records(obs, seen)
    before = {str(r.get("name")): r for r in obs.status.get("runs") or []}
    fallen = _fallen_off(obs.status, records)
    champion = _mark_rolled_back(obs.status.get("champion"), obs.followers)
    champion, decided = _decide_finished(spec, records, champion, obs.now, fallen)
    deleting = {
        str(r["metadata"]["name"])
        for r in obs.runs
        if (r.get("metadata") or {}).get("deletionTimestamp")
    }
    actions = _prune(spec, records, seen, champion, deleting)
    events: list[Event] = []
    finished = [r for r in records if r["outcome"] in FINISHED and r["name"] not in fallen
                and (before.get(r["name"]) or {}).get("outcome") not in FINISHED]  # fmt: skip
    for record in decided:
        comparison = record["comparison"]
        if comparison["decision"] == "Promoted":
            events.append(Event("Normal", "ChampionPromoted",
                                f"{record['name']} is the champion: {comparison['message']}"))  # fmt: skip

    active = [r["name"] for r in records if r["outcome"] == "Running" and r["name"] in seen]
    if spec_model.suspend:
        st.cond(SUSPENDED, "True", "Suspended", "spec.suspend is true: no new runs start")
    else:
        st.cond(SUSPENDED, "False", "Active", "new runs start when they are due")
    step = _Step(obs, spec_model, st, records, seen, active, actions, events, champion)
    upcoming = _scheduled_run(step)
    probe_wake = _data_change_run(step)
    _set_run_conditions(st, records)
    _set_rolled_back_condition(st, champion, obs.followers)
    newest_first = list(reversed(records))
    st.data["runs"] = _bounded([r for r in newest_first if r["name"] not in fallen], champion)
    st.data["active"] = step.active
    st.data["champion"] = champion
    st.data["nextScheduleTime"] = None if upcoming is None else format_rfc3339(upcoming)
    done = [r for r in newest_first if r["outcome"] in FINISHED]
    st.data["lastOutcome"] = done[0]["outcome"] if done else None
    ok = [r for r in done if r["outcome"] == "Succeeded" and r.get("completedAt")]
    st.data["lastSuccessfulTime"] = max((str(r["completedAt"]) for r in ok), default=None) or (
        obs.status.get("lastSuccessfulTime")
    )
    waits = [MAX_WAKE_SECONDS]
    if upcoming is not None:
        waits.append(max(1.0, (upcoming - obs.now).total_seconds()))
    if probe_wake is not None:
        waits.append(probe_wake)
    return Plan(
        st.finish(),
        actions=actions,
        events=events,
        wake_after=None if spec_model.suspend else min(waits),
        finished=finished,
    )


@dataclass
class _Step:
    """What the two triggers (schedule, data change) read and add to."""

    obs: Observed
    spec: FineTuneScheduleSpec
    st: _Status
    records: list[dict[str, Any]]
    seen: Mapping[str, Any]
    active: list[str]
    actions: list[RunAction]
    events: list[Event]
    champion: Mapping[str, Any] | None = None
    started: str | None = None

    def start(self, slot: datetime, trigger: str, source_digest: str | None) -> str:
        name = run_name(self.obs.name, slot)
        body = run_body(self.obs, self.obs.spec, slot, trigger, source_digest, self.champion)
        self.actions.append(RunAction("create", name, body))
        record = {"name": name, "scheduledTime": format_rfc3339(slot), "trigger": trigger,
                  "outcome": "Running"}  # fmt: skip
        if source_digest:
            record["sourceDigest"] = source_digest
        self.records.append(record)
        self.active.append(name)
        self.started = name
        self.events.append(
            Event("Normal", "RunStarted", f"started {name} ({trigger}) for {format_rfc3339(slot)}")
        )
        return name


def _scheduled_run(step: _Step) -> datetime | None:
    """Start the run of the latest scheduled time not run yet, CronJob-like; returns the next
    scheduled time (None: suspended, or the schedule does not start runs)."""
    obs, spec, st = step.obs, step.spec, step.st
    sched = cron.parse(spec.schedule)
    tz = cron.zone(spec.time_zone)
    last = parse_rfc3339(obs.status.get("lastScheduleTime")) or obs.created
    slot, upcoming = _due_slot(obs, sched, tz, last)
    reason, message = "Scheduled", "runs start at the scheduled times"
    if not spec.trigger.on_schedule:
        reason, message = "WaitingForDataChange", "runs start when the training data changes"
        slot = upcoming = None
    if spec.suspend:
        slot = upcoming = None
    if slot is not None:
        name = run_name(obs.name, slot)
        deadline = spec.starting_deadline_seconds
        late = (obs.now - slot).total_seconds()
        if name in step.seen:
            st.data["lastScheduleTime"] = format_rfc3339(slot)  # made before a lost status write
        elif deadline is not None and late > deadline:
            reason = "MissedSchedule"
            message = (
                f"the run of {format_rfc3339(slot)} was missed by {int(late)}s, more than "
                f"startingDeadlineSeconds ({deadline}); the next run is at the next scheduled time"
            )
        elif step.active and spec.concurrency_policy == "Forbid":
            reason = "WaitingForActiveRun"
            message = (
                f"the run of {format_rfc3339(slot)} waits for {', '.join(step.active)} to finish "
                "(concurrencyPolicy Forbid)"
            )
        else:
            _replace_active(step)
            check = obs.status.get("dataCheck") or {}
            step.start(slot, "Schedule", check.get("sourceDigest"))
            st.data["lastScheduleTime"] = format_rfc3339(slot)
    st.cond(READY, "True", reason, message)
    if reason == "MissedSchedule" and not _same_reason(obs.status, READY, reason):
        step.events.append(Event("Warning", "MissedSchedule", message))
    return upcoming


def _replace_active(step: _Step) -> None:
    """concurrencyPolicy Replace: delete the active runs before the new one starts."""
    for name in step.active:
        step.actions.append(RunAction("delete", name))
        step.events.append(Event("Normal", "RunReplaced", f"deleted {name} for a new run"))
        for r in step.records:
            if r["name"] == name:
                r.update(
                    outcome="Failed", reason="Replaced", completedAt=format_rfc3339(step.obs.now)
                )
    step.active.clear()


def _data_change_run(step: _Step) -> float | None:
    """trigger.onDataChange: probe the data once per check interval and start a run when its
    fingerprint differs from the last run's; returns seconds until the next look."""
    obs, spec, st = step.obs, step.spec, step.st
    trigger = spec.trigger.on_data_change
    probes = {str(j["metadata"]["name"]): j for j in obs.probes}
    if trigger is None or spec.suspend:
        step.actions += [RunAction("delete", n, kind="Job") for n in sorted(probes)]
        if trigger is None:
            st.data["dataCheck"] = None
        return None
    interval = trigger.check_interval_seconds
    epoch = int(obs.now.timestamp())
    slot = datetime.fromtimestamp(epoch - epoch % interval, UTC)
    probe_name = names.child_name(obs.name, f"probe-{int(slot.timestamp()) // 60}")
    step.actions += [RunAction("delete", n, kind="Job") for n in sorted(probes) if n != probe_name]
    check = dict(obs.status.get("dataCheck") or {})
    wake = float(interval - epoch % interval)
    if check.get("slot") != format_rfc3339(slot):
        job = probes.get(probe_name)
        if job is None:
            # Always the operator's own trainer image: a template's image override is the
            # tenant's choice for training, and may predate the fingerprint command.
            owner = owner_reference(KIND, obs.name, obs.uid)
            body = probe_job(probe_name, obs.namespace, names.label_value(obs.name),
                             owner, obs.spec.get("jobTemplate", {}).get("spec") or {},
                             obs.trainer_image, obs.pull_policy)  # fmt: skip
            step.actions.append(RunAction("create", probe_name, body, kind="Job"))
            return PROBE_WAIT_SECONDS
        pods = [p for p in obs.probe_pods
                if ((p.get("metadata") or {}).get("labels") or {}).get(LABEL_PROBE) == probe_name]  # fmt: skip
        found = probe_result(job, pods)
        if found is None:
            return PROBE_WAIT_SECONDS
        check = {"slot": format_rfc3339(slot), "checkedAt": format_rfc3339(obs.now), **found}
        if "sourceDigest" not in found and "digest" in found:
            check["sourceDigest"] = check.pop("digest")
        if check.get("error"):
            step.events.append(Event("Warning", "DataCheckFailed", str(check["error"])))
        step.actions.append(RunAction("delete", probe_name, kind="Job"))
    st.data["dataCheck"] = check or None
    digest = check.get("sourceDigest")
    if digest and step.started is None and not step.active:
        _start_if_changed(step, slot, str(digest), trigger.min_interval_seconds)
    return wake


def _start_if_changed(step: _Step, slot: datetime, digest: str, min_interval: int) -> None:
    runs = sorted(step.records, key=lambda r: str(r.get("scheduledTime")))
    known = [r for r in runs if r.get("sourceDigest")]
    if known and known[-1]["sourceDigest"] == digest:
        return
    last_start = parse_rfc3339(runs[-1].get("scheduledTime")) if runs else None
    if last_start is not None and (step.obs.now - last_start).total_seconds() < min_interval:
        return
    if run_name(step.obs.name, slot) in step.seen:
        return  # this check's run exists (made before a lost status write)
    step.start(slot, "DataChange", digest)


def rejected_by(
    champion: Mapping[str, Any] | None, followers: tuple[Mapping[str, Any], ...]
) -> dict[str, Any] | None:
    """The first follower (by name) that rolled back or aborted the champion's adapter."""
    digest = ((champion or {}).get("adapter") or {}).get("digest")
    if not digest:
        return None
    for ad in sorted(followers, key=lambda a: str((a.get("metadata") or {}).get("name"))):
        status = ad.get("status") or {}
        for rev in reversed(status.get("history") or []):
            if rev.get("digest") == digest and rev.get("outcome") in REJECTED_OUTCOMES:
                degraded = _condition(status, "Degraded") or {}
                return {
                    "adapterDeployment": str((ad.get("metadata") or {}).get("name"))[:253],
                    "reason": str(rev["outcome"]),
                    "message": str(degraded.get("message") or "")[:512],
                }
    return None


def _mark_rolled_back(
    champion: Mapping[str, Any] | None, followers: tuple[Mapping[str, Any], ...]
) -> dict[str, Any] | None:
    """The champion, marked once an AdapterDeployment following the schedule rejected it.

    The mark stays: the adapter is not offered again, and the next successful run replaces it.
    """
    if not champion:
        return None
    out = dict(champion)
    if not out.get("rolledBack"):
        found = rejected_by(champion, followers)
        if found:
            out["rolledBack"] = {k: v for k, v in found.items() if k != "message"}
    return out


def _set_rolled_back_condition(
    st: _Status, champion: Mapping[str, Any] | None, followers: tuple[Mapping[str, Any], ...]
) -> None:
    mark = (champion or {}).get("rolledBack")
    if mark:
        found = rejected_by(champion, followers) or {}
        detail = f": {found['message']}" if found.get("message") else ""
        st.cond(PROMOTION_ROLLED_BACK, "True", str(mark.get("reason") or "RolledBack"),
                f"AdapterDeployment {mark.get('adapterDeployment')} rejected the champion "
                f"{(champion or {}).get('job')} ({mark.get('reason')}){detail}; it is not offered "
                "again, the next successful run replaces it")  # fmt: skip
    else:
        st.cond(PROMOTION_ROLLED_BACK, "False", "NotRolledBack",
                f"{len(followers)} AdapterDeployment(s) follow this schedule; none rejected "
                "the champion")  # fmt: skip


def _same_reason(status: Mapping[str, Any], type_: str, reason: str) -> bool:
    cond = _condition(status, type_)
    return cond is not None and cond.get("reason") == reason


def _set_run_conditions(st: _Status, records: list[dict[str, Any]]) -> None:
    done = [r for r in records if r["outcome"] in FINISHED]
    if not done:
        st.cond(LAST_RUN_FAILED, "False", "NoRunFinished", "no run has finished yet")
        st.cond(PROMOTION_BLOCKED, "False", "NoRunFinished", "no run has finished yet")
        return
    newest = done[-1]
    if newest["outcome"] == "Failed":
        reason = str(newest.get("reason") or "Failed")
        st.cond(LAST_RUN_FAILED, "True", reason,
                f"{newest['name']} failed ({reason}): kubectl describe finetunejob {newest['name']}")  # fmt: skip
    else:
        st.cond(LAST_RUN_FAILED, "False", "Succeeded", f"{newest['name']} succeeded")
    comparison = newest.get("comparison") or {}
    if comparison.get("decision") == "Promoted":
        st.cond(
            PROMOTION_BLOCKED, "False", "Promoted", f"{newest['name']}: {comparison['message']}"
        )
    else:
        st.cond(PROMOTION_BLOCKED, "True", str(comparison.get("reason") or "NotDecided"),
                f"{newest['name']}: {comparison.get('message') or 'not decided'}")  # fmt: skip


def _bounded(
    newest_first: list[dict[str, Any]], champion: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """At most RUN_RECORDS_MAX records, running ones and the champion's always among them."""
    keep = [
        r
        for r in newest_first
        if r["outcome"] == "Running" or r["name"] == (champion or {}).get("job")
    ]
    rest = [r for r in newest_first if r not in keep]
    chosen = keep + rest[: max(0, RUN_RECORDS_MAX - len(keep))]
    return sorted(chosen, key=lambda r: (str(r.get("scheduledTime")), r["name"]), reverse=True)
