"""What one reconcile of an AdapterDeployment decides, as a specification on a fake clock.

Each test builds what the operator observed (from its watch caches and, where a step needs
them, the serving pods' answers), calls ``plan(observed, now)`` and reads the decision: the
actions, the status, the events and when to look again. No test waits for real time.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from finetune_operator.api.adapterdeployment import AdapterDeploymentSpec, AdapterDeploymentStatus
from finetune_operator.builders import serving as sb
from finetune_operator.planners import adapterdeployment as rules
from finetune_operator.planners.adapterdeployment_plan import (
    AnalysisWindow,
    CreateCanary,
    DeleteDeployment,
    Next,
    Observed,
    PatchTarget,
    Plan,
    PodCall,
    PodInfo,
    Served,
    canary_check_due,
    needs_pod_listing,
    plan,
)
from support.serving_plan import deployment, healthy_window, observed, pods

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
URI1, URI2 = "pvc://adapters/v1", "pvc://adapters/v2"
T0 = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def spec(uri: str = URI1, digest: str = D1, **over: Any) -> AdapterDeploymentSpec:
    raw: dict[str, Any] = {
        "adapterName": "support",
        "source": {"uri": uri, "digest": digest},
        "target": {"deployment": "llm", "container": "vllm"},
    }
    raw.update(over)
    return AdapterDeploymentSpec.model_validate(raw)


def run(obs: Observed, now: datetime) -> tuple[Any, Observed]:
    """Plan, then observe the status it wrote (as the next pass would)."""
    p = plan(obs, now)
    return p, replace(obs, status=p.status)


# ------------------------------------------------------------------ Rolling


def test_a_rolling_rollout_patches_the_target_once_and_completes_when_every_replica_serves() -> (
    None
):
    obs = observed(spec())
    p, obs = run(obs, at(0))
    assert [(type(a), a.ref) for a in p.actions] == [
        (PatchTarget, sb.AdapterRef("support", URI1, D1))
    ]
    assert p.status.phase == "Progressing" and p.status.current.outcome == "Progressing"
    assert [e.reason for e in p.events] == ["RolloutStarted"]
    assert p.next == Next.NOW  # the next pass follows the rollout

    # The watch shows the patched template, pods still the old ones: keep polling.
    obs = replace(obs, target=deployment(digest=D1, generation=2, observed=2, ready=2, updated=1))
    p, obs = run(obs, at(5))
    assert p.actions == () and p.next == Next.POLL and p.status.phase == "Progressing"

    obs = replace(obs, target=deployment(digest=D1, generation=2), pods=pods(D1))
    p, obs = run(obs, at(9))
    assert p.status.phase == "Available" and p.status.current.outcome == "Available"
    assert p.status.ready_replicas == 2 and [x.digest for x in p.status.pods] == [D1, D1]
    assert Served(D1) in p.records and p.next == Next.IDLE


def test_an_available_adapterdeployment_plans_nothing_and_keeps_its_status() -> None:
    obs = observed(spec())
    for now, target, ps in [
        (at(0), deployment(), pods(None)),
        (at(1), deployment(digest=D1, generation=2), pods(D1)),
    ]:
        _, obs = run(replace(obs, target=target, pods=ps), now)
    settled = obs.status
    for later in (at(60), at(3600)):
        p = plan(obs, later)
        assert p.actions == () and p.events == () and p.next == Next.IDLE
        assert p.status == settled  # nothing to write


def test_a_status_older_than_the_template_is_not_read_as_a_failure() -> None:
    """Right after the patch, the Deployment's status may still carry the old template's
    ProgressDeadlineExceeded: it counts only once the controller observed the new spec."""
    obs = observed(spec())
    _, obs = run(obs, at(0))
    stale = deployment(
        digest=D1, generation=3, observed=2,
        conditions=[{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}],
    )  # fmt: skip
    p, _ = run(replace(obs, target=stale), at(1))
    assert p.status.phase == "Progressing" and p.next == Next.POLL


def test_a_stalled_rollout_is_rolled_back_after_the_progress_deadline_and_not_before() -> None:
    obs = observed(spec(strategy={"progressDeadlineSeconds": 60}))
    _, obs = run(replace(obs, target=deployment(digest=D1, generation=2), pods=pods(D1)), at(0))
    _, obs = run(obs, at(1))  # revision 1 available
    obs = replace(obs, spec=spec(URI2, D2, strategy={"progressDeadlineSeconds": 60}), generation=2)
    _, obs = run(obs, at(100))  # revision 2 starts
    stuck = deployment(digest=D2, generation=3, ready=2, updated=1)
    p, obs = run(replace(obs, target=stuck), at(159))
    assert p.status.phase == "Progressing"
    p, obs = run(obs, at(161))
    assert p.status.phase == "RolledBack"
    assert p.actions == (PatchTarget(sb.AdapterRef("support", URI1, D1, None, None)),)
    degraded = next(c for c in p.status.conditions if c.type == "Degraded")
    assert degraded.reason == "RolloutDeadlineExceeded" and "after 60s" in degraded.message
    assert [(h.revision, h.outcome) for h in p.status.history] == [
        (1, "Superseded"), (2, "RolledBack"),
    ]  # fmt: skip
    # The same adapter is not tried again until the spec changes.
    restored = deployment(digest=D1, generation=4)
    _, obs = run(replace(obs, target=restored, pods=pods(D1)), at(170))
    p, _ = run(obs, at(171))
    assert p.actions == () and p.status.current.digest == D1


def _restored_after_a_failed_upgrade() -> tuple[Observed, Any]:
    """Revision 1 serves; revision 2's pods never start and the Deployment reports
    ProgressDeadlineExceeded; the rollback's pass restores revision 1's template and the
    next pass sees it complete. Returns the object as that pass left it, and its plan."""
    obs = observed(spec(), target=deployment(digest=D1), pods=pods(D1))
    _, obs = run(obs, at(0))
    _, obs = run(obs, at(1))
    obs = replace(obs, spec=spec(URI2, D2), generation=2)
    _, obs = run(obs, at(10))
    timed_out = deployment(
        digest=D2, generation=3, ready=2, updated=2,
        conditions=[{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}],
    )  # fmt: skip
    p, obs = run(replace(obs, target=timed_out), at(12))
    assert p.status.phase == "RolledBack" and p.status.current.outcome == "RollingBack"
    p, obs = run(replace(obs, target=deployment(digest=D1, generation=4)), at(13))
    assert _condition(p, "Available").reason == "PreviousRevisionRestored"
    return obs, p


def test_a_restored_revision_stays_reported_as_restored_on_later_passes() -> None:
    """A later pass (woken by a pod of the failed revision going away) keeps Available's
    PreviousRevisionRestored and writes nothing: the restore is not reworded into an
    ordinary completed rollout while the rollback stands."""
    obs, restored = _restored_after_a_failed_upgrade()
    p, obs = run(replace(obs, pods=pods(D1)), at(14))
    available = _condition(p, "Available")
    assert (available.status, available.reason) == ("True", "PreviousRevisionRestored")
    assert available.message == "revision 1 restored: 2/2 replicas available"
    assert p.status == restored.status and p.actions == () and p.next == Next.IDLE
    # Still so after the replicas were gone for a while and came back.
    _, obs = run(replace(obs, target=deployment(digest=D1, generation=4, ready=0)), at(20))
    p, _ = run(replace(obs, target=deployment(digest=D1, generation=4)), at(30))
    assert _condition(p, "Available").reason == "PreviousRevisionRestored"
    assert p.status.phase == "RolledBack"


def test_the_next_completed_rollout_after_a_restore_reports_rollout_complete() -> None:
    obs, _ = _restored_after_a_failed_upgrade()
    obs = replace(obs, spec=spec("pvc://adapters/v3", "sha256:" + "3" * 64), generation=3)
    p, obs = run(obs, at(20))
    assert p.status.current.revision == 3 and p.status.previous.outcome == "Superseded"
    done = deployment(digest="sha256:" + "3" * 64, generation=5)
    p, obs = run(replace(obs, target=done), at(21))
    assert p.status.phase == "Available"
    p, _ = run(obs, at(22))
    assert _condition(p, "Available").reason == "RolloutComplete"


# ------------------------------------------------------------------ Canary


def canary_spec(**analysis: Any) -> AdapterDeploymentSpec:
    settings = {"intervalSeconds": 30, "checks": 2, "smokeRequests": 2, **analysis}
    return spec(
        URI2, D2,
        strategy={"type": "Canary", "canary": {"analysis": settings}, "progressDeadlineSeconds": 60},
    )  # fmt: skip


def started_canary(**analysis: Any) -> Observed:
    obs = observed(canary_spec(**analysis))
    p, obs = run(obs, at(0))
    assert isinstance(p.actions[0], CreateCanary)
    canary = deployment("support-canary", D2)
    canary["spec"]["replicas"] = 1
    canary["status"].update(updatedReplicas=1, availableReplicas=1, readyReplicas=1, replicas=1)
    return replace(obs, canary=canary, canary_pods=pods(D2, 1, "support-canary-x"))


def test_a_canary_is_checked_once_per_interval_and_promoted_after_enough_checks() -> None:
    obs = started_canary()
    assert obs.status.phase == "Progressing" and obs.status.canary.checks_passed == 0
    p, obs = run(obs, at(5))
    assert p.status.phase == "Analyzing" and p.next == Next.NOW
    assert canary_check_due(obs, at(5))  # the first check is due at once

    p, obs = run(replace(obs, window=healthy_window()), at(5))
    assert p.check_ran and p.status.canary.checks_passed == 1 and p.check_in == 30
    obs = replace(obs, window=None, last_check=at(5))
    assert not canary_check_due(obs, at(20))
    p, obs = run(obs, at(20))
    assert p.actions == () and p.check_in == 15  # nothing to judge yet: the next check in 15 s

    assert canary_check_due(obs, at(35))
    p, obs = run(replace(obs, window=healthy_window()), at(35))
    assert p.status.canary.revision.outcome == "Promoted"
    assert [(type(a), a.ref) for a in p.actions] == [
        (PatchTarget, sb.AdapterRef("support", URI2, D2))
    ]
    assert p.status.current.digest == D2 and p.status.current.outcome == "Progressing"
    assert [e.reason for e in p.events] == ["CanaryPromoted"]


def generating_window(tokens: float, seconds: float, requests: int = 10) -> AnalysisWindow:
    """A healthy window whose ``requests`` answers decoded ``tokens`` in ``seconds``."""
    window = healthy_window()
    sample = replace(
        window.samples[0],
        requests=requests,
        generation_tokens=tokens + requests,  # each request's first token comes from prefill
        generation_requests=requests,
        decode_seconds=seconds,
    )
    return replace(window, samples=(sample,))


def test_a_canary_generating_below_the_minimum_is_aborted_with_both_speeds() -> None:
    obs = started_canary(minTokensPerSecondPerRequest=25)
    _, obs = run(obs, at(5))
    p, _ = run(replace(obs, window=generating_window(200, 10.0)), at(5))  # 20 tokens/s
    assert p.actions == (DeleteDeployment("support-canary"),)
    assert p.status.phase == "RolledBack" and p.status.canary.revision.outcome == "CanaryAborted"
    assert p.status.canary.tokens_per_second_per_request == 20.0
    degraded = next(c for c in p.status.conditions if c.type == "Degraded")
    assert degraded.reason == "CanarySlowGeneration"
    assert "20.0 tokens/s per request" in degraded.message
    assert "below minTokensPerSecondPerRequest 25" in degraded.message
    assert "lower the minimum" in degraded.message
    assert [e.reason for e in p.events] == ["CanarySlowGeneration"]


def test_a_canary_generating_above_the_minimum_is_promoted() -> None:
    obs = started_canary(minTokensPerSecondPerRequest=15)
    _, obs = run(obs, at(5))
    p, obs = run(replace(obs, window=generating_window(200, 10.0)), at(5))
    assert (
        p.status.canary.checks_passed == 1 and p.status.canary.tokens_per_second_per_request == 20
    )
    p, _ = run(replace(obs, window=generating_window(300, 10.0), last_check=at(5)), at(35))
    assert p.status.canary.revision.outcome == "Promoted"
    assert p.status.canary.tokens_per_second_per_request == 30.0


@pytest.mark.parametrize(
    ("window", "minimum", "outcome"),
    [
        # Enough requests, none with a second token: the speed is not judged yet.
        (healthy_window(), 25, "WaitingForTraffic"),
        (generating_window(0, 0.0), 25, "WaitingForTraffic"),
        # Slow, but 1 + 2 smoke requests are below minRequests: nothing is judged yet.
        (generating_window(5, 5.0, requests=1), 25, "WaitingForTraffic"),
        # Unset: the speed (1 token/s here) is never judged.
        (generating_window(10, 10.0), None, "Analyzing"),
    ],
    ids=["no-decode-tokens", "one-token-answers", "too-few-requests", "unset"],
)
def test_a_canary_without_speed_data_is_not_judged_on_speed(
    window: AnalysisWindow, minimum: float | None, outcome: str
) -> None:
    analysis: dict[str, Any] = {"minRequests": 5}
    if minimum is not None:
        analysis["minTokensPerSecondPerRequest"] = minimum
    obs = started_canary(**analysis)
    _, obs = run(obs, at(5))
    p, _ = run(replace(obs, window=window), at(5))
    assert p.status.phase == "Analyzing" and p.actions == ()
    progressing = next(c for c in p.status.conditions if c.type == "Progressing")
    assert progressing.reason == outcome, progressing.message
    assert p.status.canary.checks_passed == (1 if outcome == "Analyzing" else 0)


def test_a_failing_smoke_request_aborts_the_canary_and_leaves_the_target_alone() -> None:
    obs = started_canary()
    _, obs = run(obs, at(5))
    window = AnalysisWindow((), (rules.SmokeResult(False, 5.0, "HTTP 404: no such model", 404),))
    p, _ = run(replace(obs, window=window), at(5))
    assert p.actions == (DeleteDeployment("support-canary"),)
    assert p.status.phase == "RolledBack" and p.status.canary.revision.outcome == "CanaryAborted"
    assert not any(isinstance(a, PatchTarget) for a in p.actions)
    assert p.next == Next.IDLE  # failed for good: only a change wakes it


@pytest.mark.parametrize(
    ("scheduled", "aborted"),
    [(False, True), (True, False), (None, False)],  # None: the server exports no such metric
)
def test_a_canary_whose_engine_never_ran_the_adapter_is_aborted(
    scheduled: bool | None, aborted: bool
) -> None:
    obs = started_canary()
    _, obs = run(obs, at(5))
    window = replace(healthy_window(), adapter_scheduled=scheduled)
    p, _ = run(replace(obs, window=window), at(5))
    assert (p.status.phase == "RolledBack") is aborted
    if aborted:
        degraded = next(c for c in p.status.conditions if c.type == "Degraded")
        assert degraded.reason == "CanarySmokeFailed"
        assert "never scheduled that adapter" in degraded.message
        assert p.actions == (DeleteDeployment("support-canary"),)


def test_a_canary_pod_lost_mid_analysis_gets_the_deadline_from_the_loss() -> None:
    obs = started_canary()
    _, obs = run(obs, at(5))
    _, obs = run(replace(obs, window=healthy_window()), at(5))
    lost = replace(
        obs, window=None, canary_pods=(), canary=deployment("support-canary", D2, ready=0)
    )
    p, obs = run(lost, at(100))  # long after the canary's own deadline
    assert p.status.canary.unavailable_since == "2026-12-07T12:01:40Z"
    assert [e.reason for e in p.events] == ["CanaryUnavailable"]
    p, obs = run(obs, at(150))
    assert p.status.phase == "Analyzing" and p.actions == ()
    p, _ = run(obs, at(161))
    assert p.status.canary.revision.outcome == "CanaryAborted"
    assert (
        next(c for c in p.status.conditions if c.type == "Degraded").reason == "CanaryUnavailable"
    )


# ------------------------------------------------------------------ Runtime


def runtime_spec(uri: str = "pvc://adapters/support", digest: str = D1) -> AdapterDeploymentSpec:
    return spec(uri, digest, strategy={"type": "Runtime", "progressDeadlineSeconds": 60})


def test_runtime_asks_the_pods_only_while_loading_or_when_a_pod_changed() -> None:
    obs = observed(runtime_spec())
    assert not needs_pod_listing(obs)  # nothing served yet: nothing to ask
    p, obs = run(obs, at(0))
    assert p.next == Next.NOW and needs_pod_listing(obs)  # loading: ask the pods
    p, obs = run(replace(obs, loaded={"llm-abc-0": {}, "llm-abc-1": {}}), at(1))
    assert p.actions == (
        PodCall("llm-abc-0", "http://10.0.0.0:8000", "load", "support", "/adapters/support", D1),
        PodCall("llm-abc-1", "http://10.0.0.1:8000", "load", "support", "/adapters/support", D1),
    )
    assert p.status.phase == "Progressing"  # not complete before the pods confirm
    listed = {"support": "/adapters/support"}
    p, obs = run(replace(obs, loaded={"llm-abc-0": listed, "llm-abc-1": listed}), at(2))
    assert p.status.phase == "Available" and p.actions == () and p.next == Next.IDLE

    verified = {pod.name: pod.marker for pod in obs.pods}
    idle = replace(obs, loaded=None, verified=verified)
    assert not needs_pod_listing(idle)  # an idle Runtime AdapterDeployment asks nothing
    restarted = replace(idle, pods=(replace(obs.pods[0], restarts=1), obs.pods[1]))
    assert needs_pod_listing(restarted)


@pytest.mark.parametrize(
    ("uri", "in_place"),
    [
        ("pvc://adapters/v2", True),  # a new path: vLLM swaps the weights (load_inplace)
        ("pvc://adapters/support", False),  # the same path: unload first (prefix cache)
    ],
)
def test_a_runtime_upgrade_reloads_in_place_only_from_a_new_path(uri: str, in_place: bool) -> None:
    obs = observed(runtime_spec())
    _, obs = run(obs, at(0))
    _, obs = run(replace(obs, loaded={"llm-abc-0": {}, "llm-abc-1": {}}), at(1))
    listed = {"support": "/adapters/support"}
    p, obs = run(replace(obs, loaded={"llm-abc-0": listed, "llm-abc-1": listed}), at(2))
    assert p.status.phase == "Available"
    upgraded = replace(obs, spec=runtime_spec(uri, D2), generation=2, loaded=None)
    _, obs = run(upgraded, at(3))
    p, _ = run(replace(obs, loaded={"llm-abc-0": listed, "llm-abc-1": listed}), at(4))
    calls = [a for a in p.actions if isinstance(a, PodCall)]
    assert [(c.call, c.path, c.in_place) for c in calls] == [
        ("reload", "/" + uri.removeprefix("pvc://"), in_place)
    ] * 2


def test_a_pod_refusing_the_adapter_rolls_the_runtime_rollout_back() -> None:
    obs = observed(runtime_spec())
    _, obs = run(obs, at(0))
    _, obs = run(replace(obs, loaded={"llm-abc-0": {}, "llm-abc-1": {}}), at(1))
    refused = {"llm-abc-0": "LoRA rank 64 is greater than max_lora_rank 16."}
    p, _ = run(replace(obs, loaded={"llm-abc-0": {}, "llm-abc-1": {}}, load_errors=refused), at(2))
    assert p.status.phase == "RolledBack"
    degraded = next(c for c in p.status.conditions if c.type == "Degraded")
    assert degraded.reason == "LoadFailed" and "greater than max_lora_rank 16" in degraded.message
    assert p.actions == ()  # llm-abc-1 is not loaded with the refused revision meanwhile


def test_a_pod_refusing_the_api_key_fails_the_load_as_an_auth_problem() -> None:
    obs = observed(runtime_spec())
    _, obs = run(obs, at(0))
    refused = {"llm-abc-1": "Unauthorized"}
    p, _ = run(
        replace(obs, loaded={"llm-abc-0": {}, "llm-abc-1": None}, auth_errors=refused), at(1)
    )
    assert p.status.phase == "RolledBack"
    degraded = next(c for c in p.status.conditions if c.type == "Degraded")
    assert degraded.reason == "Unauthorized" and "llm-abc-1" in degraded.message
    assert "adapter was not tried" in degraded.message
    assert p.actions == ()  # llm-abc-0 is not loaded with the failed revision meanwhile


# ------------------------------------------------------------------ Runtime: failing a revision

V1 = {"support": "/adapters/support"}  # the pod lists revision 1's path
V2 = {"support": "/adapters/v2"}


def new_pod(i: int) -> PodInfo:
    """A pod the Deployment added (a scale-up or a replaced pod), with no adapter yet."""
    return PodInfo(f"llm-abc-{i}", f"uid-{i}", True, f"http://10.0.0.{i}:8000")


def _calls(p: Plan) -> list[tuple[str, str, str | None, str | None]]:
    return [(a.pod, a.call, a.digest, a.path) for a in p.actions if isinstance(a, PodCall)]


def _runtime_upgrade_stuck(automatic: bool = True) -> Observed:
    """Revision 1 (D1) serves on both pods; revision 2 (D2, a new path) started at 100 s and
    was reloaded into llm-abc-0, while llm-abc-1 has not answered since."""
    obs = observed(runtime_spec())
    _, obs = run(obs, at(0))
    _, obs = run(replace(obs, loaded={"llm-abc-0": {}, "llm-abc-1": {}}), at(1))
    _, obs = run(replace(obs, loaded={"llm-abc-0": V1, "llm-abc-1": V1}), at(2))
    assert obs.status.phase == "Available"
    upgrade = spec(
        "pvc://adapters/v2", D2, strategy={"type": "Runtime", "progressDeadlineSeconds": 60},
        rollback={"automatic": automatic},
    )  # fmt: skip
    _, obs = run(replace(obs, spec=upgrade, generation=2, loaded=None), at(100))
    p, obs = run(replace(obs, loaded={"llm-abc-0": V1, "llm-abc-1": None}), at(101))
    assert _calls(p) == [("llm-abc-0", "reload", D2, "/adapters/v2")]
    return obs


def test_a_runtime_rollout_past_its_deadline_loads_only_the_previous_revision() -> None:
    """A pod added in the pass where the deadline passes gets revision 1, not the failing
    revision 2, and the pod already reloaded goes back to revision 1 in the same pass."""
    obs = _runtime_upgrade_stuck()
    grown = replace(
        obs,
        pods=(*obs.pods, new_pod(2)),
        loaded={"llm-abc-0": V2, "llm-abc-1": None, "llm-abc-2": {}},
    )
    p, obs = run(grown, at(161))
    assert p.status.phase == "RolledBack"
    assert p.status.current.revision == 1 and p.status.current.outcome == "RollingBack"
    assert _condition(p, "Degraded").reason == "RolloutDeadlineExceeded"
    assert [a for a in p.actions if isinstance(a, PodCall) and a.digest == D2] == []
    assert _calls(p) == [
        ("llm-abc-0", "reload", D1, "/adapters/support"),
        ("llm-abc-2", "load", D1, "/adapters/support"),
    ]
    assert p.next == Next.NOW  # the next pass asks the pods whether the restore took
    # llm-abc-1 did not answer: it still serves what it was last seen serving.
    assert [(x.pod, x.digest) for x in p.status.pods] == [
        ("llm-abc-0", D1), ("llm-abc-1", D1), ("llm-abc-2", D1),
    ]  # fmt: skip

    restored = replace(obs, loaded={"llm-abc-0": V1, "llm-abc-1": V1, "llm-abc-2": V1})
    p, _ = run(restored, at(162))
    assert p.actions == () and p.status.current.outcome == "Available"
    assert _condition(p, "Available").reason == "PreviousRevisionRestored"
    assert [(h.revision, h.outcome) for h in p.status.history] == [
        (1, "Available"), (2, "RolledBack"),
    ]  # fmt: skip


def test_a_first_runtime_rollout_past_its_deadline_only_unloads() -> None:
    """No earlier revision: the rollback removes the adapter, so the pod still lacking it
    is not loaded in that pass and the one that has it is unloaded."""
    obs = observed(runtime_spec())
    _, obs = run(obs, at(0))
    _, obs = run(replace(obs, loaded={"llm-abc-0": {}, "llm-abc-1": {}}), at(1))
    # llm-abc-1's loads keep failing without a final answer (its server returns 503).
    p, obs = run(replace(obs, loaded={"llm-abc-0": V1, "llm-abc-1": {}}), at(30))
    assert _calls(p) == [("llm-abc-1", "load", D1, "/adapters/support")]
    p, _ = run(obs, at(61))
    assert p.status.phase == "RolledBack" and p.status.current is None
    assert _calls(p) == [("llm-abc-0", "unload", None, None)]
    assert [(x.pod, x.digest) for x in p.status.pods] == [("llm-abc-0", None), ("llm-abc-1", None)]


def test_a_load_refused_by_one_pod_loads_the_failing_revision_into_no_other() -> None:
    obs = _runtime_upgrade_stuck()
    refused = {"llm-abc-1": "LoRA rank 64 is greater than max_lora_rank 16."}
    p, _ = run(
        replace(obs, loaded={"llm-abc-0": V2, "llm-abc-1": {}}, load_errors=refused), at(102)
    )
    assert _condition(p, "Degraded").reason == "LoadFailed"
    # The refusal was revision 2's: the pod is still called to get revision 1 back.
    assert _calls(p) == [
        ("llm-abc-0", "reload", D1, "/adapters/support"),
        ("llm-abc-1", "load", D1, "/adapters/support"),
    ]


@pytest.mark.parametrize(
    ("listed", "serves"),
    [
        (V2, D2),
        (V1, None),  # the reload recorded for it did not take: which version it has is unknown
    ],
    ids=["reloaded", "reload-did-not-take"],
)
def test_without_automatic_rollback_the_failed_revision_is_not_loaded_into_more_pods(
    listed: dict[str, str], serves: str | None
) -> None:
    """The failed revision stays where it was loaded for a human to look at; it is not
    spread to a pod that appeared in the pass that gave up on it."""
    obs = _runtime_upgrade_stuck(automatic=False)
    grown = replace(
        obs,
        pods=(*obs.pods, new_pod(2)),
        loaded={"llm-abc-0": listed, "llm-abc-1": None, "llm-abc-2": {}},
    )
    p, _ = run(grown, at(161))
    assert p.status.phase == "Degraded" and p.status.current.outcome == "Failed"
    assert p.actions == ()
    assert [(x.pod, x.digest) for x in p.status.pods] == [
        ("llm-abc-0", serves), ("llm-abc-1", D1), ("llm-abc-2", None),
    ]  # fmt: skip
    assert p.status.ready_replicas == (1 if serves == D2 else 0)


def test_a_restore_past_its_deadline_stops_calling_the_pods() -> None:
    """Restoring revision 1 fails too: that pass loads it into no further pod, as no later
    pass would (nothing is rolled back twice)."""
    obs = _runtime_upgrade_stuck()
    _, obs = run(replace(obs, loaded={"llm-abc-0": V2, "llm-abc-1": None}), at(161))
    assert obs.status.current is not None and obs.status.current.outcome == "RollingBack"
    grown = replace(
        obs,
        pods=(*obs.pods, new_pod(2)),
        loaded={"llm-abc-0": V1, "llm-abc-1": None, "llm-abc-2": {}},
    )
    p, _ = run(grown, at(222))
    assert p.status.phase == "Degraded" and p.status.current.outcome == "Failed"
    assert _condition(p, "Degraded").reason == "RollbackFailed"
    assert p.actions == () and p.next == Next.IDLE
    assert [(x.pod, x.digest) for x in p.status.pods] == [
        ("llm-abc-0", D1), ("llm-abc-1", D1), ("llm-abc-2", None),
    ]  # fmt: skip


def test_a_runtime_reload_that_did_not_take_is_tried_again_not_taken_as_done() -> None:
    """The reloads to revision 2 failed without a final answer (a 503): the pods still list
    revision 1's path, so they are called again instead of being counted as serving it."""
    obs = _runtime_upgrade_stuck()
    p, obs = run(replace(obs, loaded={"llm-abc-0": V1, "llm-abc-1": V1}), at(102))
    assert p.status.phase == "Progressing"
    assert _calls(p) == [
        ("llm-abc-0", "reload", D2, "/adapters/v2"), ("llm-abc-1", "reload", D2, "/adapters/v2"),
    ]  # fmt: skip
    p, _ = run(replace(obs, loaded={"llm-abc-0": V2, "llm-abc-1": V2}), at(103))
    assert p.status.phase == "Available" and p.actions == ()


def test_an_available_runtime_pod_listing_another_path_is_reloaded() -> None:
    """After the rollout too: a pod listing the adapter from a path the revision does not
    use (a reload that did not take, a server's own --lora-modules) does not serve it."""
    obs = observed(runtime_spec())
    _, obs = run(obs, at(0))
    _, obs = run(replace(obs, loaded={"llm-abc-0": {}, "llm-abc-1": {}}), at(1))
    _, obs = run(replace(obs, loaded={"llm-abc-0": V1, "llm-abc-1": V1}), at(2))
    assert obs.status.phase == "Available"
    elsewhere = {"support": "/models/support"}
    p, _ = run(replace(obs, loaded={"llm-abc-0": elsewhere, "llm-abc-1": V1}), at(50))
    assert p.status.phase == "Available"
    assert _calls(p) == [("llm-abc-0", "reload", D1, "/adapters/support")]


def test_a_rollback_is_restored_only_once_no_pod_lists_the_failed_revision() -> None:
    """A restore call that fails without a final answer leaves the pod on the failed
    revision's path: it is called again, and revision 1 counts as restored only after."""
    obs = _runtime_upgrade_stuck()
    p, obs = run(replace(obs, loaded={"llm-abc-0": V2, "llm-abc-1": None}), at(161))
    assert _calls(p) == [("llm-abc-0", "reload", D1, "/adapters/support")]
    # That reload failed without a final answer: llm-abc-0 still serves revision 2.
    p, obs = run(replace(obs, loaded={"llm-abc-0": V2, "llm-abc-1": V1}), at(162))
    assert p.status.current.outcome == "RollingBack"
    assert _calls(p) == [("llm-abc-0", "reload", D1, "/adapters/support")]
    p, _ = run(replace(obs, loaded={"llm-abc-0": V1, "llm-abc-1": V1}), at(163))
    assert p.status.current.outcome == "Available" and p.actions == ()


# Canary and Rolling never call pods: the rollback pass holds only the rollback.


def test_a_promoted_canary_past_the_targets_deadline_only_restores_the_target() -> None:
    obs = started_canary()
    _, obs = run(obs, at(5))
    _, obs = run(replace(obs, window=healthy_window()), at(5))
    p, obs = run(replace(obs, window=healthy_window(), last_check=at(5)), at(35))
    assert p.status.current.outcome == "Progressing"
    stuck = deployment(digest=D2, generation=2, ready=2, updated=1)
    p, _ = run(replace(obs, target=stuck, window=None), at(96))
    assert p.status.phase == "RolledBack"
    assert p.actions == (DeleteDeployment("support-canary"), PatchTarget(None))


def test_a_canary_never_ready_is_deleted_and_the_target_left_alone() -> None:
    obs = observed(canary_spec())
    _, obs = run(obs, at(0))
    starting = deployment("support-canary", D2, ready=0)
    p, _ = run(replace(obs, canary=starting), at(61))
    assert p.status.canary.revision.outcome == "CanaryAborted"
    assert p.actions == (DeleteDeployment("support-canary"),)


# ------------------------------------------------------------------ refusals


def test_a_file_adapter_is_refused_outside_local_mode_and_nothing_is_touched() -> None:
    obs = observed(spec("file:///etc/passwd-dir", D1))
    p = plan(obs, at(0))
    assert p.actions == () and p.status.phase == "Failed" and p.next == Next.IDLE
    source = next(c for c in p.status.conditions if c.type == "SourceReady")
    assert source.reason == "LocalAdapterRefused" and "/etc" not in source.message
    assert plan(replace(obs, local_mode=True), at(0)).actions  # local mode serves it


def _serving(command: list[str], args: list[str], volumes: list[Any] | None = None) -> Any:
    """The target Deployment with the vLLM container's command line replaced."""
    dep = deployment()
    pod_spec = dep["spec"]["template"]["spec"]
    pod_spec["containers"][0].update(command=command, args=args)
    if volumes:
        pod_spec["containers"][0]["volumeMounts"].append({"name": "cfg", "mountPath": "/etc/vllm"})
        pod_spec["volumes"].append({"name": "cfg", "configMap": {"name": "serve"}})
    return dep


VLLM = ["vllm", "serve"]
BASE_ARGS = ["org/base", "--enable-lora"]
SERVE_CONFIG = {"serve": {"cfg.yaml": "port: 9100\n"}}
CFG = [{"name": "cfg"}]

PORT_CASES = [
    # (id, command, args, target.port (None: the default), strategy, server's port or None)
    ("--port N, default target", VLLM, [*BASE_ARGS, "--port", "9000"], None, "Rolling", 9000),
    ("--port=N, other target", VLLM, [*BASE_ARGS, "--port=9000"], 8080, "Rolling", 9000),
    ("no --port (vLLM's 8000)", VLLM, BASE_ARGS, 9000, "Rolling", 8000),
    ("--port N, canary", VLLM, [*BASE_ARGS, "--port", "9000"], None, "Canary", 9000),
    ("--port N, runtime", VLLM, [*BASE_ARGS, "--port", "9000"], None, "Runtime", 9000),
    ("port in --config", VLLM, [*BASE_ARGS, "--config", "/etc/vllm/cfg.yaml"], None, "Rolling",
     9100),
    ("last --port wins", VLLM, [*BASE_ARGS, "--port", "8000", "--port", "9000"], 8000, "Rolling",
     9000),
    ("sh -c", ["sh", "-c"], ["exec vllm serve org/base --enable-lora --port 9000"], 8000,
     "Rolling", 9000),
]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "args", "port", "strategy", "server_port"),
    [pytest.param(*case[1:], id=case[0]) for case in PORT_CASES],
)
def test_a_target_port_other_than_the_servers_is_refused_before_anything_is_created(
    command: list[str], args: list[str], port: int | None, strategy: str, server_port: int
) -> None:
    target: dict[str, Any] = {"deployment": "llm", "container": "vllm"}
    if port is not None:
        target["port"] = port
    s = spec(target=target, strategy={"type": strategy})
    dep = _serving(command, args, CFG if "--config" in args else None)
    obs = observed(s, target=dep, configmaps=SERVE_CONFIG)
    p = plan(obs, at(0))
    assert p.actions == () and p.status.phase == "Failed" and p.next == Next.IDLE
    compatible = next(c for c in p.status.conditions if c.type == "Compatible")
    assert compatible.status == "False" and compatible.reason == "TargetPortMismatch"
    want = port or 8000
    assert f"target.port is {want} " in compatible.message
    assert f"listens on port {server_port}:" in compatible.message
    assert f"set spec.target.port to {server_port}" in compatible.message
    # What to change on the server's side: the flag, or the key of the file that sets it.
    server_side = "port: in the server's --config file" if "--config" in args else "--port"
    assert f"{server_side}" in compatible.message and compatible.message.endswith(f" to {want}")
    assert plan(replace(obs, status=p.status), at(60)).actions == ()  # and stays refused


@pytest.mark.parametrize(
    ("command", "args", "port"),
    [
        pytest.param(VLLM, [*BASE_ARGS, "--port", "9000"], 9000, id="same port"),
        pytest.param(VLLM, BASE_ARGS, None, id="both defaults"),
        pytest.param(VLLM, [*BASE_ARGS, "--config", "/etc/vllm/cfg.yaml"], 9100, id="config"),
        # The shell decides the port: the operator cannot tell, so it does not refuse.
        pytest.param(
            ["sh", "-c"], ["exec vllm serve org/base --enable-lora --port $PORT"], 9000,
            id="shell variable",
        ),
    ],
)  # fmt: skip
def test_a_target_port_matching_the_server_or_unknowable_rolls_out(
    command: list[str], args: list[str], port: int | None
) -> None:
    target: dict[str, Any] = {"deployment": "llm", "container": "vllm"}
    if port is not None:
        target["port"] = port
    dep = _serving(command, args, CFG if "--config" in args else None)
    p = plan(observed(spec(target=target), target=dep, configmaps=SERVE_CONFIG), at(0))
    compatible = next(c for c in p.status.conditions if c.type == "Compatible")
    assert compatible.reason == "Compatible", compatible.message
    assert [type(a) for a in p.actions] == [PatchTarget]


def _available_rolling(s: AdapterDeploymentSpec) -> Observed:
    """An AdapterDeployment whose revision 1 serves on every replica."""
    obs = observed(s)
    _, obs = run(obs, at(0))
    _, obs = run(replace(obs, target=deployment(digest=D1, generation=2), pods=pods(D1)), at(1))
    assert obs.status.phase == "Available"
    return obs


def _condition(p: Plan, type_: str) -> Any:
    return next(c for c in p.status.conditions if c.type == type_)


def test_a_server_that_moved_port_under_an_available_adapter_is_reported_not_rolled_back() -> None:
    obs = _available_rolling(spec())
    moved = deployment(digest=D1, generation=3)
    moved["spec"]["template"]["spec"]["containers"][0]["args"] += ["--port", "9000"]
    p, obs = run(replace(obs, target=moved), at(60))
    compatible = _condition(p, "Compatible")
    assert compatible.status == "False" and compatible.reason == "TargetPortMismatch"
    assert "set spec.target.port to 9000" in compatible.message
    # Nothing that serves changes: no patch, no rollback; the revision stays Available.
    assert p.actions == () and p.next == Next.IDLE and p.status.phase == "Available"
    assert _condition(p, "Available").status == "True" and p.status.current.revision == 1
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "TargetPortMismatch")]
    again = plan(obs, at(120))
    assert again.events == () and again.status == obs.status  # said once, written once

    fixed = spec(target={"deployment": "llm", "container": "vllm", "port": 9000})
    p, _ = run(replace(obs, spec=fixed, generation=2), at(180))
    assert _condition(p, "Compatible").status == "True" and p.actions == ()
    assert p.status.current.revision == 1  # the same adapter: no new rollout


def test_a_target_port_edit_on_an_available_adapter_is_checked() -> None:
    obs = _available_rolling(spec())
    typo = spec(target={"deployment": "llm", "container": "vllm", "port": 8008})
    p = plan(replace(obs, spec=typo, generation=2), at(60))
    compatible = _condition(p, "Compatible")
    assert compatible.reason == "TargetPortMismatch", compatible.message
    assert "target.port is 8008 " in compatible.message and "to 8000, or" in compatible.message
    assert p.actions == () and p.status.phase == "Available"


def test_runtime_pods_are_not_called_while_target_port_is_not_the_servers() -> None:
    obs = observed(runtime_spec())
    _, obs = run(obs, at(0))
    _, obs = run(replace(obs, loaded={"llm-abc-0": {}, "llm-abc-1": {}}), at(1))
    listed = {"support": "/adapters/support"}
    _, obs = run(replace(obs, loaded={"llm-abc-0": listed, "llm-abc-1": listed}), at(2))
    assert obs.status.phase == "Available"
    restarted = replace(
        obs,
        loaded=None,
        verified={pod.name: pod.marker for pod in obs.pods[1:]},  # llm-abc-0 restarted
    )
    assert needs_pod_listing(restarted)
    typo = runtime_spec()
    typo = typo.model_copy(update={"target": typo.target.model_copy(update={"port": 9000})})
    mismatched = replace(restarted, spec=typo, generation=2)
    assert not needs_pod_listing(mismatched)  # a call would reach nothing on that port
    p = plan(mismatched, at(60))
    assert _condition(p, "Compatible").reason == "TargetPortMismatch"
    assert p.actions == () and p.status.phase == "Available"


def test_a_runtime_load_pauses_while_target_port_is_not_the_servers() -> None:
    obs = observed(runtime_spec())
    _, obs = run(obs, at(0))
    assert obs.status.phase == "Progressing" and needs_pod_listing(obs)
    right = obs.spec
    assert right is not None
    typo = right.model_copy(update={"target": right.target.model_copy(update={"port": 9000})})
    paused = replace(obs, spec=typo, generation=2)
    assert not needs_pod_listing(paused)  # no call to a port nothing listens on
    p, paused = run(paused, at(1))
    assert _condition(p, "Compatible").reason == "TargetPortMismatch"
    progressing = _condition(p, "Progressing")
    assert progressing.reason == "TargetPortMismatch" and "paused" in progressing.message
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "TargetPortMismatch")]
    # No timer while paused (a fix comes as a change), and no deadline runs out meanwhile.
    assert p.actions == () and p.next == Next.IDLE
    assert plan(paused, at(3600)).status.phase == "Progressing"

    fixed = replace(paused, spec=right, generation=3)
    assert needs_pod_listing(fixed)
    p, _ = run(replace(fixed, loaded={"llm-abc-0": {}, "llm-abc-1": {}}), at(3601))
    assert _condition(p, "Compatible").status == "True"
    assert [a.call for a in p.actions if isinstance(a, PodCall)] == ["load", "load"]
    assert p.status.phase == "Progressing", p.status.conditions


def test_a_canary_analysis_pauses_while_target_port_is_not_the_servers() -> None:
    """Smoke requests to a port nothing listens on would reject the adapter for a typo."""
    obs = started_canary()
    _, obs = run(obs, at(5))
    assert obs.status.phase == "Analyzing" and canary_check_due(obs, at(5))
    right = obs.spec
    assert right is not None
    typo = right.model_copy(update={"target": right.target.model_copy(update={"port": 9000})})
    paused = replace(obs, spec=typo, generation=2)
    assert not canary_check_due(paused, at(6))  # no smoke request, no metrics read
    p, paused = run(paused, at(6))
    assert _condition(p, "Compatible").reason == "TargetPortMismatch"
    assert _condition(p, "Progressing").reason == "TargetPortMismatch"
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "TargetPortMismatch")]
    assert p.actions == () and p.next == Next.IDLE and p.check_in is None
    assert p.status.phase == "Analyzing" and p.status.canary.revision.outcome == "Canary"

    fixed = replace(paused, spec=right, generation=3)
    assert canary_check_due(fixed, at(600))
    p, _ = run(replace(fixed, window=healthy_window()), at(600))
    assert _condition(p, "Compatible").status == "True"
    assert p.check_ran and p.status.canary.checks_passed == 1


def test_an_invalid_spec_is_reported_once() -> None:
    obs = replace(observed(spec()), spec=None, spec_error="source: set exactly one")
    p = plan(obs, at(0))
    assert p.status.phase == "Failed" and p.actions == () and p.next == Next.IDLE
    assert plan(replace(obs, status=p.status), at(99)).status == p.status


# ------------------------------------------------------------------ when to look again


def test_a_plans_outcome_becomes_a_wait_in_one_place() -> None:
    from finetune_operator.config import OperatorConfig
    from finetune_operator.handlers.adapterdeployment import (
        MAX_IMMEDIATE_PASSES,
        backoff,
        wait_after,
    )

    config = OperatorConfig(serving_poll_seconds=5.0, serving_max_backoff_seconds=60.0)
    status = AdapterDeploymentStatus()
    assert wait_after(Plan(status, next=Next.IDLE), config, 0) is None  # until something changes
    assert wait_after(Plan(status, next=Next.NOW), config, 0) == 0.0
    assert wait_after(Plan(status, next=Next.NOW), config, MAX_IMMEDIATE_PASSES) == 5.0
    assert wait_after(Plan(status, next=Next.POLL), config, 0) == 5.0
    assert wait_after(Plan(status, next=Next.POLL, check_in=1.5), config, 0) == 1.5
    assert [backoff(config, n) for n in range(1, 6)] == [5.0, 10.0, 20.0, 40.0, 60.0]


# ------------------------------------------------------------------ Every condition says why


@pytest.fixture(autouse=True)
def every_condition_has_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every scenario in this file also checks that each condition its plans write carries a
    message: a bare reason tells the user neither what happened nor what to change."""
    import sys

    from finetune_operator.planners import adapterdeployment_plan

    def checked(obs: Observed, now: datetime) -> Any:
        p = adapterdeployment_plan.plan(obs, now)
        for condition in p.status.conditions:
            assert condition.message.strip(), f"{condition.type}/{condition.reason} has no message"
        return p

    monkeypatch.setattr(sys.modules[__name__], "plan", checked)
