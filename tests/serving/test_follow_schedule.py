"""AdapterDeployments that follow a FineTuneSchedule (source.fineTuneScheduleRef): the
source rule for the schedule's champion and the plan over a champion's life (present,
absent, changed, rolled back)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.adapterdeployment import AdapterDeploymentSpec
from finetune_operator.builders import serving as sb
from finetune_operator.planners import adapterdeployment as rules
from finetune_operator.planners.adapterdeployment_plan import (
    CreateCanary,
    DeleteDeployment,
    Next,
    Observed,
    PatchTarget,
    plan,
)
from finetune_operator.tools import crdvalidation
from pydantic import ValidationError
from support.serving_plan import deployment, healthy_window, observed, pods

REPO = Path(__file__).resolve().parents[2]
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
T0 = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def follower(**over: Any) -> AdapterDeploymentSpec:
    raw: dict[str, Any] = {
        "adapterName": "support",
        "source": {"fineTuneScheduleRef": {"name": "weekly"}},
        "target": {"deployment": "llm", "container": "vllm"},
    }
    raw.update(over)
    return AdapterDeploymentSpec.model_validate(raw)


def canary_follower() -> AdapterDeploymentSpec:
    settings = {"intervalSeconds": 30, "checks": 2, "smokeRequests": 2}
    return follower(
        strategy={"type": "Canary", "canary": {"analysis": settings}, "progressDeadlineSeconds": 60}
    )


def schedule(
    digest: str | None = D1,
    uri: str = "pvc://adapters/weekly/run-1",
    rolled_back: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A FineTuneSchedule as the controller's cache holds it."""
    champion: dict[str, Any] | None = None
    if digest is not None:
        champion = {
            "job": "weekly-run-1",
            "adapter": {"uri": uri, "digest": digest, "baseModel": "org/base", "rank": 16},
            "since": "2026-12-07T02:00:00Z",
        }
        if rolled_back:
            champion["rolledBack"] = rolled_back
    return {
        "spec": {"jobTemplate": {"spec": {"output": {"credentialsSecretRef": {"name": "s3"}}}}},
        "status": {"champion": champion},
    }


# ------------------------------------------------------------------ the spec


@pytest.mark.parametrize(
    "source",
    [
        {},
        {"fineTuneScheduleRef": {"name": "weekly"}, "fineTuneJobRef": {"name": "ftj"}},
        {"fineTuneScheduleRef": {"name": "weekly"}, "uri": "pvc://a/b", "digest": D1},
    ],
)
def test_a_source_names_exactly_one_kind(source: dict[str, Any]) -> None:
    """The model and the CRD's CEL rule (what the API server checks) agree."""
    with pytest.raises(ValidationError, match="exactly one of fineTuneJobRef, uri or fine"):
        follower(source=source)
    assert crd_errors(source) == [
        "spec.source.uri: Invalid value: set exactly one of fineTuneJobRef, uri or "
        "fineTuneScheduleRef"
    ]


def test_the_crd_accepts_a_schedule_source() -> None:
    assert crd_errors({"fineTuneScheduleRef": {"name": "weekly"}}) == []


def crd_errors(source: dict[str, Any]) -> list[str]:
    crds = crdvalidation.load_crd_dir(REPO / "crds")
    served = next(v for v in crds.values() if v.kind == "AdapterDeployment")
    body = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "support", "namespace": "team"},
        "spec": {"adapterName": "support", "target": {"deployment": "llm"}, "source": source},
    }
    return list(served.errors(body))


# ------------------------------------------------------------------ the source rule


def test_the_champion_is_served_with_the_schedules_output_credentials() -> None:
    res = rules.resolve_source(follower(), None, schedule=schedule())
    assert (res.ok, res.reason) == (True, "Resolved")
    assert res.ref == sb.AdapterRef(
        "support", "pvc://adapters/weekly/run-1", D1, "org/base", 16, "s3"
    )
    assert "weekly-run-1" in res.message


@pytest.mark.parametrize(
    ("sched", "reason", "needle"),
    [
        (None, "FineTuneScheduleNotFound", "waiting for FineTuneSchedule weekly"),
        (schedule(digest=None), "NoChampion", "to promote a champion"),
        (
            schedule(rolled_back={"adapterDeployment": "support", "reason": "CanaryAborted"}),
            "ChampionRolledBack",
            "rejected by AdapterDeployment support (CanaryAborted)",
        ),
        (schedule(uri="pvc://adapters/../secrets"), "ChampionInvalid", "'..'"),
        (schedule(uri="http://evil/adapter"), "ChampionInvalid", "location"),
        (schedule(digest="md5:abc"), "ChampionInvalid", "sha256"),
        (schedule(uri="file:///etc"), "LocalAdapterRefused", "pvc://"),
    ],
)
def test_what_a_follower_waits_for(sched: dict[str, Any] | None, reason: str, needle: str) -> None:
    res = rules.resolve_source(follower(), None, schedule=sched)
    assert (res.ok, res.reason, res.ref) == (False, reason, None)
    assert needle in res.message


def test_a_local_champion_is_served_in_local_mode() -> None:
    res = rules.resolve_source(
        follower(), None, schedule=schedule(uri="file:///adapters/a"), local_mode=True
    )
    assert res.ok and res.ref is not None and res.ref.uri == "file:///adapters/a"


# ------------------------------------------------------------------ the plan


def following(s: AdapterDeploymentSpec, sched: dict[str, Any] | None, **over: Any) -> Observed:
    return observed(s, schedule=sched, **over)


def run(obs: Observed, now: datetime) -> tuple[Any, Observed]:
    p = plan(obs, now)
    return p, replace(obs, status=p.status)


def condition(p: Any, type_: str) -> Any:
    return next(c for c in p.status.conditions if c.type == type_)


@pytest.mark.parametrize(
    ("sched", "reason"), [(None, "FineTuneScheduleNotFound"), (schedule(None), "NoChampion")]
)
def test_no_schedule_or_no_champion_yet_is_pending_and_asks_for_nothing(
    sched: dict[str, Any] | None, reason: str
) -> None:
    p = plan(following(follower(), sched), at(0))
    assert p.status.phase == "Pending" and p.actions == () and p.next == Next.IDLE
    source = condition(p, "SourceReady")
    assert (source.status, source.reason) == ("False", reason)


def available(obs: Observed, digest: str, now: float) -> Observed:
    """The watch shows the patched target and its pods; the rollout completes."""
    obs = replace(obs, target=deployment(digest=digest, generation=2), pods=pods(digest))
    p, obs = run(obs, at(now))
    assert p.status.phase == "Available" and p.status.current.digest == digest
    return obs


def test_each_new_champion_is_a_new_rollout() -> None:
    obs = following(follower(), schedule(D1))
    p, obs = run(obs, at(0))
    assert [a.ref.digest for a in p.actions if isinstance(a, PatchTarget)] == [D1]
    obs = available(obs, D1, 5)
    # Nothing changes while the champion stays.
    p, obs = run(obs, at(60))
    assert p.actions == () and p.next == Next.IDLE
    # The schedule promotes a new champion: revision 2 rolls out, with the same generation.
    obs = replace(obs, schedule=schedule(D2, "pvc://adapters/weekly/run-2"))
    p, obs = run(obs, at(100))
    assert [a.ref for a in p.actions if isinstance(a, PatchTarget)] == [
        sb.AdapterRef("support", "pvc://adapters/weekly/run-2", D2, "org/base", 16, "s3")
    ]
    assert p.status.current.revision == 2 and p.status.previous.digest == D1
    obs = available(obs, D2, 105)
    assert [(h.revision, h.outcome) for h in obs.status.history] == [
        (1, "Superseded"), (2, "Available"),
    ]  # fmt: skip


def test_the_schedule_disappearing_keeps_the_served_adapter() -> None:
    obs = following(follower(), schedule(D1))
    _, obs = run(obs, at(0))
    obs = available(obs, D1, 5)
    p, _ = run(replace(obs, schedule=None), at(60))
    assert p.actions == () and p.status.phase == "Available"
    assert condition(p, "SourceReady").reason == "FineTuneScheduleNotFound"


def aborted_canary_of(obs: Observed, digest: str, now: float) -> Observed:
    """Start the canary of ``digest`` (the champion obs names) and fail its smoke check."""
    p, obs = run(obs, at(now))
    assert isinstance(p.actions[0], CreateCanary)
    canary = deployment("support-canary", digest)
    canary["spec"]["replicas"] = 1
    canary["status"].update(updatedReplicas=1, availableReplicas=1, readyReplicas=1, replicas=1)
    obs = replace(obs, canary=canary, canary_pods=pods(digest, 1, "support-canary-x"))
    _, obs = run(obs, at(now + 5))
    failing = replace(healthy_window(), smoke=(rules.SmokeResult(False, 5.0, "HTTP 500", 500),))
    p, obs = run(replace(obs, window=failing), at(now + 5))
    assert p.actions == (DeleteDeployment("support-canary"),)
    return replace(obs, window=None, canary=None, canary_pods=())


def test_a_rolled_back_champion_is_not_retried_and_the_next_one_gets_a_canary() -> None:
    obs = following(canary_follower(), schedule(D1))
    obs = aborted_canary_of(obs, D1, 0)
    assert obs.status.phase == "RolledBack"
    # What the schedule reads: the digest's history entry and the Degraded condition.
    assert [(h.digest, h.outcome) for h in obs.status.history] == [(D1, "CanaryAborted")]
    degraded = next(c for c in obs.status.conditions if c.type == "Degraded")
    assert degraded.status == "True" and "not promoted" in degraded.message
    # Woken again with the same champion: nothing is tried.
    p, obs = run(obs, at(60))
    assert p.actions == () and p.next == Next.IDLE and p.status.phase == "RolledBack"
    # The schedule marks its champion: still nothing, and the phase stays.
    marked = schedule(D1, rolled_back={"adapterDeployment": "support", "reason": "CanaryAborted"})
    p, obs = run(replace(obs, schedule=marked), at(70))
    assert p.actions == () and p.status.phase == "RolledBack"
    assert condition(p, "SourceReady").reason == "ChampionRolledBack"
    # The next champion gets a canary of its own.
    obs = replace(obs, schedule=schedule(D2, "pvc://adapters/weekly/run-2"))
    p, _ = run(obs, at(100))
    assert [type(a) for a in p.actions] == [CreateCanary]
    assert p.status.canary.revision.digest == D2 and p.status.canary.revision.revision == 2


def test_a_champion_another_follower_rejected_is_not_rolled_out() -> None:
    marked = schedule(D3, rolled_back={"adapterDeployment": "eu", "reason": "RolledBack"})
    p = plan(following(follower(), marked), at(0))
    assert p.actions == () and p.status.phase == "Pending"
    assert "rejected by AdapterDeployment eu" in condition(p, "SourceReady").message


def test_a_marked_champion_stays_out_after_a_spec_edit() -> None:
    """A spec edit makes a rejected adapter eligible again for other sources; a champion the
    schedule marked rejected stays out whatever the follower's spec says."""
    obs = aborted_canary_of(following(canary_follower(), schedule(D1)), D1, 0)
    marked = schedule(D1, rolled_back={"adapterDeployment": "support", "reason": "CanaryAborted"})
    p, _ = run(replace(obs, schedule=marked, generation=2), at(60))
    assert p.actions == () and condition(p, "SourceReady").reason == "ChampionRolledBack"


def test_a_new_champion_during_a_canary_supersedes_it() -> None:
    obs = following(canary_follower(), schedule(D1))
    p, obs = run(obs, at(0))
    assert [type(a) for a in p.actions] == [CreateCanary]
    obs = replace(obs, canary=deployment("support-canary", D1))
    obs = replace(obs, schedule=schedule(D2, "pvc://adapters/weekly/run-2"))
    p, obs = run(obs, at(10))
    assert p.actions == (DeleteDeployment("support-canary"),)
    assert p.status.canary.revision.outcome == "Superseded" and p.next == Next.NOW
    p, _ = run(replace(obs, canary=None), at(11))
    assert [type(a) for a in p.actions] == [CreateCanary]
    assert p.status.canary.revision.digest == D2
