"""trigger.onDataChange, on a fake clock: a probe Job fingerprints the data once per check
interval; a run starts when the fingerprint differs from the last run's."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from finetune_operator.builders.data_probe import LABEL_PROBE
from finetune_operator.planners.finetuneschedule import Plan, plan, run_name
from support.schedule_samples import observed, run, sched_spec

NOW = datetime(2026, 12, 3, 10, 7, 30, tzinfo=UTC)  # check slot 10:00 (interval 900 s)
CHECK = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
PROBE = f"weekly-probe-{int(CHECK.timestamp()) // 60}"


def data_spec(**trigger: Any) -> dict[str, Any]:
    on = {"checkIntervalSeconds": 900, "minIntervalSeconds": 3600}
    return sched_spec(trigger={"onSchedule": False, "onDataChange": on, **trigger})


def probe(name: str = PROBE) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": "default", "labels": {LABEL_PROBE: name}},
            "status": {}}  # fmt: skip


def probe_pod(result: dict[str, Any], exit_code: int = 0, name: str = PROBE) -> dict[str, Any]:
    state = {"terminated": {"exitCode": exit_code, "message": json.dumps(result)}}
    return {"metadata": {"name": f"{name}-x", "labels": {LABEL_PROBE: name}},
            "status": {"containerStatuses": [{"name": "fingerprint-train", "state": state}]}}  # fmt: skip


def creates(p: Plan, kind: str) -> list[str]:
    return [a.name for a in p.actions if a.verb == "create" and a.kind == kind]


def test_a_check_starts_a_probe_job_with_the_tenants_claim_read_only_and_no_token() -> None:
    p = plan(observed(NOW, spec=data_spec()))
    assert creates(p, "Job") == [PROBE] and creates(p, "FineTuneJob") == []
    body = p.actions[0].body
    assert body is not None
    pod = body["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["volumes"][1] == {
        "name": "data-0", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}
    }  # fmt: skip
    container = pod["containers"][0]
    assert container["args"] == [
        "--uri",
        "pvc://datasets/support/train.jsonl",
        "--pvc-root",
        "/mnt/pvc",
        "--termination-log",
        "/dev/termination-log",
    ]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert body["metadata"]["ownerReferences"][0]["kind"] == "FineTuneSchedule"
    assert p.wake_after == 10.0  # a Job event usually comes first
    assert "nextScheduleTime" not in p.status
    assert next(c for c in p.status["conditions"] if c["type"] == "Ready")["reason"] == (
        "WaitingForDataChange"
    )


def test_the_first_fingerprint_starts_a_run_that_records_it() -> None:
    found = {"type": "fingerprint", "digest": "sha256:one", "files": 1, "bytes": 9}
    p = plan(observed(NOW, spec=data_spec(), probes=(probe(),), probe_pods=(probe_pod(found),)))
    name = run_name("weekly", CHECK)
    assert creates(p, "FineTuneJob") == [name]
    body = next(a.body for a in p.actions if a.name == name)
    assert body is not None
    assert body["metadata"]["annotations"]["finetune.dev/trigger"] == "DataChange"
    digest = body["metadata"]["annotations"]["finetune.dev/source-digest"]
    assert digest.startswith("sha256:")
    assert p.status["dataCheck"]["sourceDigest"] == digest
    assert p.status["runs"][0]["trigger"] == "DataChange"
    # The finished probe is removed.
    assert ("delete", PROBE, "Job") in [(a.verb, a.name, a.kind) for a in p.actions]


def check_at(slot: datetime, status: dict[str, Any], runs: tuple[dict[str, Any], ...],
             digest: str) -> Plan:  # fmt: skip
    """A look a few seconds into a check slot whose probe reported ``digest``."""
    name = f"weekly-probe-{int(slot.timestamp()) // 60}"
    found = {"type": "fingerprint", "digest": digest}
    return plan(observed(slot + timedelta(seconds=5), spec=data_spec(), status=status, runs=runs,
                         probes=(probe(name),), probe_pods=(probe_pod(found, name=name),)))  # fmt: skip


def test_unchanged_data_starts_nothing_and_changed_data_waits_for_the_minimum_interval() -> None:
    first = check_at(CHECK, {}, (), "sha256:one")
    digest = first.status["dataCheck"]["sourceDigest"]
    last_run = run(CHECK, "Succeeded")
    last_run["metadata"]["annotations"]["finetune.dev/source-digest"] = digest
    # 15 minutes later, the same data: no run.
    p = check_at(CHECK + timedelta(minutes=15), first.status, (last_run,), "sha256:one")
    assert p.status["dataCheck"]["sourceDigest"] == digest
    assert creates(p, "FineTuneJob") == []
    # New data 30 minutes after the last run: not before minIntervalSeconds (1 hour).
    p = check_at(CHECK + timedelta(minutes=30), p.status, (last_run,), "sha256:two")
    assert p.status["dataCheck"]["sourceDigest"] != digest
    assert creates(p, "FineTuneJob") == []
    # An hour after the last run, the changed data starts a run.
    slot = CHECK + timedelta(minutes=60)
    p = check_at(slot, p.status, (last_run,), "sha256:two")
    assert creates(p, "FineTuneJob") == [run_name("weekly", slot)]


def test_a_probe_that_fails_is_reported_and_starts_no_run() -> None:
    error = {
        "type": "fingerprint",
        "error": "/mnt/pvc/datasets/x does not exist: check the dataset URI",
    }
    p = plan(observed(NOW, spec=data_spec(), probes=(probe(),),
                      probe_pods=(probe_pod(error, exit_code=2),)))  # fmt: skip
    assert creates(p, "FineTuneJob") == []
    assert "does not exist" in p.status["dataCheck"]["error"]
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "DataCheckFailed")]


def test_a_running_probe_is_waited_for_and_old_probes_are_removed() -> None:
    old = "weekly-probe-1"
    p = plan(observed(NOW, spec=data_spec(), probes=(probe(), probe(old))))
    assert creates(p, "Job") == [] and creates(p, "FineTuneJob") == []
    assert [(a.verb, a.name) for a in p.actions] == [("delete", old)]
    assert p.wake_after == 10.0


def test_a_replayed_check_never_makes_a_second_run() -> None:
    found = {"type": "fingerprint", "digest": "sha256:one"}
    spec = data_spec(onDataChange={"checkIntervalSeconds": 900, "minIntervalSeconds": 60})
    first = plan(observed(NOW, spec=spec, probes=(probe(),), probe_pods=(probe_pod(found),)))
    made = run(CHECK, "Failed")  # it even finished already
    made["metadata"]["annotations"]["finetune.dev/trigger"] = "DataChange"
    # The status write was lost: the probe is still there, and so is the run it started.
    again = plan(observed(NOW + timedelta(seconds=20), spec=spec, runs=(made,),
                          probes=(probe(),), probe_pods=(probe_pod(found),)))  # fmt: skip
    assert creates(first, "FineTuneJob") == [run_name("weekly", CHECK)]
    assert creates(again, "FineTuneJob") == []


def test_with_both_triggers_a_scheduled_run_records_the_known_fingerprint() -> None:
    spec = sched_spec(trigger={"onSchedule": True, "onDataChange": {}})
    status = {"dataCheck": {"slot": "2026-12-07T01:00:00Z", "sourceDigest": "sha256:known"}}
    p = plan(observed(datetime(2026, 12, 7, 1, 0, 5, tzinfo=UTC), spec=spec, status=status))
    runs = creates(p, "FineTuneJob")
    assert len(runs) == 1
    body = next(a.body for a in p.actions if a.name == runs[0])
    assert body is not None
    assert body["metadata"]["annotations"]["finetune.dev/source-digest"] == "sha256:known"


def test_the_probe_runs_the_operators_trainer_image_not_the_templates_override() -> None:
    spec = data_spec()
    spec["jobTemplate"]["spec"]["image"] = "registry.example/team/custom-trainer:old"
    p = plan(observed(NOW, spec=spec))
    body = p.actions[0].body
    assert body is not None
    assert body["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "ghcr.io/finetune-dev/trainer:test"
    )
