"""One reconcile of an AdapterDeployment as a pure function: :func:`plan` (observed, now).

The handler observes (the object, its FineTuneJob, the target and canary Deployments and
their pods from the operator's watch caches; the adapters loaded in serving pods and a
canary analysis window only when a step needs them), calls :func:`plan`, carries out the
returned actions, writes the returned status as one diff and waits as :attr:`Plan.next`
says. Nothing here reads the clock: ``now`` comes in, so a canary runs on a fake clock in
tests.

States, by status:
- idle (no revision in flight): resolve the source, check compatibility, start a rollout
  (Rolling: patch the target; Canary: create the canary Deployment; Runtime: load into pods);
- ``canary.revision.outcome == Canary``: wait for the canary pods, then one analysis check
  per ``intervalSeconds``: promote (patch the target) or abort (delete the canary);
- ``current.outcome == Progressing``: follow the target's rollout (or the runtime loads) to
  Available, or roll back to ``previous`` when it fails;
- ``current.outcome == RollingBack``: follow the restore;
- steady: report which pods serve which digest; Runtime loads the adapter into pods that
  restarted or were added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from ..api.adapterdeployment import (
    AdapterDeploymentSpec,
    AdapterDeploymentStatus,
    AdapterRevision,
    CanaryAnalysis,
    CanaryStatus,
    ConditionType,
    Outcome,
    Phase,
    PodAdapter,
    Reason,
)
from ..api.common import Condition, ConditionStatus, set_condition
from ..builders import serving as sb
from ..domain.times import format_rfc3339, parse_rfc3339
from ..serving import vllm_args, vllm_server
from . import adapterdeployment as rules
from .events import Event

# vLLM's bucket bounds for vllm:e2e_request_latency_seconds (smoke latencies join them).
LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
MESSAGE_MAX = 1000
UNAUTHORIZED_ADVICE = (
    "refused the operator's request for its API key (401/403), so the adapter was not "
    "tried: the server expects a key the operator did not send or that does not match. "
    "Give the vLLM container its key through --api-key or VLLM_API_KEY (a value, a Secret "
    "or a ConfigMap the operator can read), then change the spec to roll out again"
)


# ------------------------------------------------------------------ observed


@dataclass(frozen=True)
class PodInfo:
    """One pod of a serving Deployment, as far as the operator needs it."""

    name: str
    uid: str = ""
    ready: bool = True
    endpoint: str | None = None  # where the operator may reach its server (None: nowhere)
    annotations: Mapping[str, str] = field(default_factory=dict)
    restarts: int = 0

    @property
    def marker(self) -> tuple[str, int, str | None]:
        """Changes when the pod's server may have lost runtime-loaded adapters."""
        return (self.uid, self.restarts, self.endpoint)


@dataclass(frozen=True)
class AnalysisWindow:
    """What one canary analysis check saw: per-pod metric deltas and the smoke requests."""

    samples: tuple[rules.MetricsSample, ...] = ()
    smoke: tuple[rules.SmokeResult, ...] = ()
    unauthorized: bool = False  # a smoke request was refused for its API key (401/403)
    # Whether vLLM's engine on the canary pods has scheduled the adapter since they started
    # (vllm:lora_requests_info, read after the smoke requests); None: not exported.
    adapter_scheduled: bool | None = None


@dataclass(frozen=True)
class Observed:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: AdapterDeploymentSpec | None
    status: AdapterDeploymentStatus
    spec_error: str = ""
    body: Mapping[str, Any] = field(default_factory=dict)  # metadata for owner references
    ftj: Mapping[str, Any] | None = None
    schedule: Mapping[str, Any] | None = None  # the FineTuneSchedule followed (its champion)
    local: rules.LocalManifest | None = None
    target: Mapping[str, Any] | None = None
    canary: Mapping[str, Any] | None = None  # the canary Deployment
    pods: tuple[PodInfo, ...] = ()  # the target's own pods
    canary_pods: tuple[PodInfo, ...] = ()
    # Runtime: what each ready pod's server lists (None: it did not answer); only asked
    # while a runtime load is under way or a pod changed since it was last confirmed.
    loaded: Mapping[str, Mapping[str, str] | None] | None = None
    load_errors: Mapping[str, str] = field(default_factory=dict)  # pod -> permanent failure
    # Pods that refused the operator's API key (401/403) when loading or listing adapters:
    # a problem of the key, not of the adapter, reported as such.
    auth_errors: Mapping[str, str] = field(default_factory=dict)
    verified: Mapping[str, tuple[str, int, str | None]] = field(default_factory=dict)
    window: AnalysisWindow | None = None  # a canary check that was due
    last_check: datetime | None = None  # when the last canary check ran (this process)
    local_mode: bool = False
    fetch_image: str = ""
    # The target's vLLM server is read as vLLM reads it: the ConfigMaps its container takes
    # settings from (name -> data; those the operator could read) and the images whose
    # entry point runs the server.
    configmaps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    image_patterns: tuple[str, ...] | None = None

    def ready_pods(self) -> tuple[PodInfo, ...]:
        return tuple(p for p in self.pods if p.ready)


# ------------------------------------------------------------------ plan


@dataclass(frozen=True)
class PatchTarget:
    """Put this adapter's entries into the target (ref None: take them out)."""

    ref: sb.AdapterRef | None
    changes: sb.ServerArgChanges | None = None
    verb: Literal["patch"] = "patch"
    kind: Literal["Deployment"] = "Deployment"


@dataclass(frozen=True)
class CreateCanary:
    body: Mapping[str, Any]
    verb: Literal["create"] = "create"
    kind: Literal["Deployment"] = "Deployment"


@dataclass(frozen=True)
class DeleteDeployment:
    name: str
    verb: Literal["delete"] = "delete"
    kind: Literal["Deployment"] = "Deployment"


@dataclass(frozen=True)
class PodCall:
    """A runtime LoRA call to one serving pod."""

    pod: str
    endpoint: str
    call: Literal["load", "reload", "unload"]
    adapter: str
    path: str | None = None
    digest: str | None = None
    # A reload from a new path swaps the weights in place where vLLM can (load_inplace);
    # from the same path vLLM would keep prefix-cache blocks of the old weights, so that
    # one unloads first (the adapter gets a new id).
    in_place: bool = False


Action = PatchTarget | CreateCanary | DeleteDeployment | PodCall


@dataclass(frozen=True)
class Served:
    """The adapter_info metric: which digest serves (None: none)."""

    digest: str | None


@dataclass(frozen=True)
class RolloutEnded:
    """One rollout finished: its duration and how it ended (metrics)."""

    strategy: str
    outcome: str
    seconds: float


@dataclass(frozen=True)
class RolledBackRecord:
    reason: str


Record = Served | RolloutEnded | RolledBackRecord


class Next(StrEnum):
    """When to look again without a change to react to (mapped to waits in one place)."""

    IDLE = "Idle"  # only when something it depends on changes
    POLL = "Poll"  # a rollout, analysis or load is under way: again after the poll interval
    NOW = "Now"  # actions changed what the next pass sees: again at once


@dataclass(frozen=True)
class Plan:
    status: AdapterDeploymentStatus
    actions: tuple[Action, ...] = ()
    events: tuple[Event, ...] = ()
    records: tuple[Record, ...] = ()
    next: Next = Next.IDLE
    check_in: float | None = None  # seconds until the next canary check is due
    check_ran: bool = False  # this plan used an analysis window


class _Draft:
    """The status being built and what the pass decided, for one :func:`plan` call."""

    def __init__(self, obs: Observed, now: datetime) -> None:
        self.obs = obs
        self.now = now
        self.status = obs.status.model_copy(deep=True)
        self.actions: list[Action] = []
        self.events: list[Event] = []
        self.records: list[Record] = []
        self.next = Next.IDLE
        self.check_in: float | None = None
        self.check_ran = False

    @property
    def spec(self) -> AdapterDeploymentSpec:
        assert self.obs.spec is not None
        return self.obs.spec

    def condition(
        self, type_: ConditionType, status: ConditionStatus, reason: str, message: str
    ) -> None:
        wire = [c.to_wire() for c in self.status.conditions]
        updated = set_condition(
            wire, type_, status, reason, message[:MESSAGE_MAX],
            generation=self.obs.generation, now=format_rfc3339(self.now),
        )  # fmt: skip
        self.status.conditions = [Condition.model_validate(c) for c in updated]

    def phase(self, phase: Phase) -> None:
        self.status.phase = phase

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.events.append(Event("Warning" if warning else "Normal", reason, message))

    def poll(self) -> None:
        if self.next != Next.NOW:
            self.next = Next.POLL

    def again(self) -> None:
        self.next = Next.NOW

    def elapsed(self, since: str | None) -> float | None:
        start = parse_rfc3339(since)
        return None if start is None else (self.now - start).total_seconds()

    def history(self, rev: AdapterRevision) -> None:
        self.status.history = rules.record_history(self.status.history, rev)

    def build(self) -> Plan:
        return Plan(
            self.status, tuple(self.actions), tuple(self.events), tuple(self.records),
            self.next, self.check_in, self.check_ran,
        )  # fmt: skip


def plan(obs: Observed, now: datetime) -> Plan:
    """Decide the next status, actions, events and when to look again."""
    d = _Draft(obs, now)
    if obs.spec is None:
        d.condition(
            ConditionType.SOURCE_READY, "False", Reason.INVALID_SPEC,
            f"spec is invalid: {obs.spec_error}",
        )  # fmt: skip
        d.phase(Phase.FAILED)
        d.status.observed_generation = obs.generation
        return d.build()
    current, canary = d.status.current, d.status.canary
    if current is not None and current.outcome == Outcome.PROGRESSING:
        _rollout_step(d)
    elif current is not None and current.outcome == Outcome.ROLLING_BACK:
        _rollback_step(d)
    elif canary is not None and canary.revision and canary.revision.outcome == Outcome.CANARY:
        _canary_step(d)
    else:
        _idle_step(d)
    d.status.observed_generation = obs.generation
    return d.build()


# ------------------------------------------------------------------ what to observe


def needs_pod_listing(obs: Observed) -> bool:
    """Whether this pass must ask the target's pods which adapters they have (Runtime).

    Only while a runtime load or its rollback is under way, or in steady state when a
    ready pod is not confirmed to serve the current revision since it last changed
    (restarted, replaced, added) and the server still fits it (:func:`served_compatibility`).
    An idle Runtime AdapterDeployment asks nothing.
    """
    spec, status = obs.spec, obs.status
    if spec is None or spec.strategy.type != "Runtime" or status.current is None:
        return False
    compat = served_compatibility(obs)
    if compat is not None and not compat.ok:
        return False  # e.g. target.port is not the server's: a call would reach nothing
    if status.current.outcome in (Outcome.PROGRESSING, Outcome.ROLLING_BACK):
        return True
    if status.current.outcome != Outcome.AVAILABLE:
        return False
    return any(obs.verified.get(p.name) != p.marker for p in obs.ready_pods() if p.endpoint)


def canary_check_due(obs: Observed, now: datetime) -> bool:
    """A canary is serving and its next analysis check is due: gather a window."""
    canary = obs.status.canary
    if obs.spec is None or canary is None or canary.revision is None:
        return False
    if canary.revision.outcome != Outcome.CANARY or obs.status.phase != Phase.ANALYZING:
        return False
    if canary.unavailable_since is not None:
        return False
    view = _canary_view(obs, canary, now)
    if view.state != "Complete":
        return False
    compat = canary_compatibility(obs)
    if compat is not None and not compat.ok:
        return False  # the analysis pauses: no canary pod is called
    return _seconds_to_check(obs, now) <= 0


def analysis_of(spec: AdapterDeploymentSpec) -> CanaryAnalysis:
    return (spec.strategy.canary.analysis if spec.strategy.canary else None) or CanaryAnalysis()


def _seconds_to_check(obs: Observed, now: datetime) -> float:
    assert obs.spec is not None
    if obs.last_check is None:
        return 0.0
    interval = analysis_of(obs.spec).interval_seconds
    return interval - (now - obs.last_check).total_seconds()


# ------------------------------------------------------------------ source and target


def _source(d: _Draft) -> rules.SourceResult:
    src = rules.resolve_source(
        d.spec, dict(d.obs.ftj) if d.obs.ftj is not None else None, d.obs.local,
        local_mode=d.obs.local_mode,
        schedule=dict(d.obs.schedule) if d.obs.schedule is not None else None,
    )  # fmt: skip
    src = rules.resolve_desired(d.spec, d.status, src)
    d.condition(ConditionType.SOURCE_READY, "True" if src.ok else "False", src.reason, src.message)
    return src


def _target(d: _Draft) -> dict[str, Any] | None:
    return dict(d.obs.target) if d.obs.target is not None else None


def _compat(d: _Draft, ref: sb.AdapterRef) -> rules.CompatResult:
    return rules.check_compatible(
        d.spec, d.obs.name, _target(d), ref,
        configmaps=_configmaps(d.obs), image_patterns=d.obs.image_patterns,
    )  # fmt: skip


def _configmaps(obs: Observed) -> dict[str, dict[str, str]]:
    return {name: dict(data) for name, data in obs.configmaps.items()}


def edit_context(obs: Observed, deployment: Mapping[str, Any]) -> vllm_args.EditContext:
    """How the builders edit ``deployment``'s vLLM command line (its --config file read
    from the observed ConfigMaps); a container that cannot be found gets the defaults (the
    compatibility check has refused it already)."""
    assert obs.spec is not None
    try:
        return vllm_server.edit_context(
            deployment, obs.spec.target.container, _configmaps(obs), obs.image_patterns
        )
    except ValueError:
        return vllm_args.EditContext(image_patterns=obs.image_patterns)


# The outcomes of a current revision that the servers serve or are being brought to.
IN_PLACE = (Outcome.AVAILABLE, Outcome.PROGRESSING, Outcome.ROLLING_BACK)


def served_compatibility(obs: Observed) -> rules.CompatResult | None:
    """Whether the server as it is now (target.port, its flags, its --config file) fits the
    current revision (served, rolling out or being restored); None without one.

    Checked again on every pass that starts nothing and on every pass of a Runtime load, so
    an edit of spec.target or of the server (its Deployment or a ConfigMap it reads) shows
    in Compatible on an Available object too (decision 2060).
    """
    spec, current = obs.spec, obs.status.current
    if spec is None or current is None or current.outcome not in IN_PLACE:
        return None
    ref = rules.revision_ref(spec.adapter_name, current)
    target = dict(obs.target) if obs.target is not None else None
    return rules.check_compatible(
        spec, obs.name, target, ref,
        configmaps=_configmaps(obs), image_patterns=obs.image_patterns,
    )  # fmt: skip


def canary_compatibility(obs: Observed) -> rules.CompatResult | None:
    """Whether the target's server as it is now fits the revision under canary analysis
    (the check its promotion makes); None without one."""
    canary = obs.status.canary
    if obs.spec is None or canary is None or canary.revision is None:
        return None
    ref = rules.revision_ref(obs.spec.adapter_name, canary.revision)
    target = dict(obs.target) if obs.target is not None else None
    return rules.check_compatible(
        obs.spec, obs.name, target, ref,
        configmaps=_configmaps(obs), image_patterns=obs.image_patterns,
    )  # fmt: skip


def _report_compat(d: _Draft, compat: rules.CompatResult, revision: int, consequence: str) -> bool:
    """Compatible as checked now; one Warning when it turns from True to False. Returns
    whether it turned from False to True (what was paused for it goes on)."""
    before = next((c for c in d.status.conditions if c.type == ConditionType.COMPATIBLE), None)
    status: ConditionStatus = "True" if compat.ok else "False"
    d.condition(ConditionType.COMPATIBLE, status, compat.reason, compat.message)
    if not compat.ok and before is not None and before.status == "True":
        d.event(compat.reason, f"revision {revision} {consequence}: {compat.message}", warning=True)
    return compat.ok and before is not None and before.status == "False"


def _check_served(d: _Draft) -> None:
    """Compatible follows the server for the revision that serves. A mismatch changes
    nothing that serves (no rollback, no patch): it is reported, and no rollout starts and
    no Runtime pod is called until it is fixed."""
    current = d.status.current
    compat = served_compatibility(d.obs)
    if current is None or current.outcome != Outcome.AVAILABLE or compat is None:
        return
    target = _target(d)
    if compat.ok and d.spec.strategy.type == "Runtime" and target is not None:
        ref = rules.revision_ref(d.spec.adapter_name, current)
        where = rules.runtime_path(target, d.spec.target.container, ref)
        if not where.ok:
            compat = rules.CompatResult(False, where.reason, where.message)
    _report_compat(
        d, compat, current.revision,
        "keeps serving, but no rollout or runtime load starts until this is fixed",
    )  # fmt: skip


# ------------------------------------------------------------------ idle: start a rollout


def _idle_step(d: _Draft) -> None:
    src = _source(d)
    current = d.status.current
    target = _target(d)
    if not src.ok or src.ref is None:
        if current is None and not _keeps_phase(d, src):
            d.phase(Phase.PENDING if src.reason in WAITING_REASONS else Phase.FAILED)
        _check_served(d)
        _steady(d)
        return
    ref = src.ref
    if rules.same_adapter(current, ref) or rules.already_rejected(d.status, ref, d.obs.generation):
        _check_served(d)
        _steady(d)
        return
    compat = _compat(d, ref)
    if compat.ok and d.spec.strategy.type == "Runtime" and target is not None:
        where = rules.runtime_path(target, d.spec.target.container, ref)
        if not where.ok:
            compat = rules.CompatResult(False, where.reason, where.message)
    d.condition(
        ConditionType.COMPATIBLE, "True" if compat.ok else "False", compat.reason, compat.message
    )
    if not compat.ok or target is None:
        if current is None or current.outcome != Outcome.AVAILABLE:
            d.phase(Phase.FAILED)
        _steady(d)
        return
    rev = rules.new_revision(d.status, ref, format_rfc3339(d.now))
    strategy = d.spec.strategy.type
    if strategy == "Canary":
        _start_canary(d, target, ref, rev, compat.changes)
        return
    if strategy == "Rolling":
        d.actions.append(PatchTarget(ref, compat.changes))
    _make_current(d, rev)
    d.phase(Phase.PROGRESSING)
    how = (
        "loading into the serving pods"
        if strategy == "Runtime"
        else f"rolling out to Deployment {d.spec.target.deployment}"
    )
    msg = f"revision {rev.revision} ({ref.digest[:19]}…): {how}"
    d.condition(ConditionType.PROGRESSING, "True", Reason.ROLLOUT_STARTED, msg)
    d.event(Reason.ROLLOUT_STARTED, msg)
    d.again()  # the next pass follows the rollout (Runtime: asks the pods)


# Source reasons that wait for something to happen elsewhere (Pending, not Failed).
WAITING_REASONS = frozenset(
    {
        Reason.FINETUNEJOB_NOT_FINISHED,
        Reason.FINETUNESCHEDULE_NOT_FOUND,
        Reason.NO_CHAMPION,
        Reason.CHAMPION_ROLLED_BACK,
        Reason.CHAMPION_INVALID,
    }
)


def _keeps_phase(d: _Draft, src: rules.SourceResult) -> bool:
    """A champion that this object rolled back stays shown as RolledBack while the schedule
    waits for its next run, rather than turning into a wait."""
    return src.reason == Reason.CHAMPION_ROLLED_BACK and d.status.phase == Phase.ROLLED_BACK


def _make_current(d: _Draft, rev: AdapterRevision) -> None:
    old = d.status.current
    if old is not None:
        if old.outcome == Outcome.AVAILABLE:
            old = old.model_copy(update={"outcome": Outcome.SUPERSEDED})
        d.status.previous = old
        d.history(old)
    d.status.current = rev
    d.history(rev)
    d.status.rollout_started_at = rev.deployed_at


# ------------------------------------------------------------------ canary


def _start_canary(
    d: _Draft, target: dict[str, Any], ref: sb.AdapterRef, rev: AdapterRevision,
    changes: sb.ServerArgChanges,
) -> None:  # fmt: skip
    canary_spec = d.spec.strategy.canary
    replicas = canary_spec.replicas if canary_spec else 1
    body = sb.canary_deployment(
        target, dict(d.obs.body), d.spec.target.container, ref,
        replicas=replicas, fetch_image=d.obs.fetch_image, changes=changes,
        edit=edit_context(d.obs, target),
    )  # fmt: skip
    name = str(body["metadata"]["name"])
    if d.obs.canary is not None:
        d.actions.append(DeleteDeployment(name))  # a stale canary
    d.actions.append(CreateCanary(body))
    rev = rev.model_copy(update={"outcome": Outcome.CANARY})
    d.status.canary = CanaryStatus(
        revision=rev, deployment=name, checks_passed=0, started_at=rev.deployed_at
    )
    d.history(rev)
    d.phase(Phase.PROGRESSING)
    msg = f"revision {rev.revision}: canary Deployment {name} with {replicas} replica(s)"
    d.condition(ConditionType.PROGRESSING, "True", Reason.CANARY_STARTED, msg)
    d.event(Reason.CANARY_STARTED, msg)
    d.poll()


def _canary_view(obs: Observed, canary: CanaryStatus, now: datetime) -> rules.RolloutView:
    assert obs.spec is not None and canary.revision is not None
    lost_since = canary.unavailable_since
    was_serving = lost_since is not None or obs.status.phase == Phase.ANALYZING
    # A canary that was serving and lost its pods mid-analysis (node failure, eviction)
    # gets the progress deadline again from that moment, not from when it started.
    started_at = (lost_since or format_rfc3339(now)) if was_serving else canary.started_at
    return rules.deployment_rollout(
        dict(obs.canary) if obs.canary is not None else None,
        obs.spec.adapter_name, canary.revision.digest, started_at=started_at,
        deadline_seconds=obs.spec.strategy.progress_deadline_seconds, now=now,
    )  # fmt: skip


def _canary_step(d: _Draft) -> None:
    canary = d.status.canary
    assert canary is not None and canary.revision is not None
    rev = canary.revision
    src = _source(d)
    if src.ok and src.ref is not None and not rules.same_adapter(rev, src.ref):
        _abort_canary(d, Reason.SUPERSEDED, "the spec asks for another adapter now", False)
        d.again()
        return
    deadline = d.spec.strategy.progress_deadline_seconds
    lost_since = canary.unavailable_since
    was_serving = lost_since is not None or d.status.phase == Phase.ANALYZING
    view = _canary_view(d.obs, canary, d.now)
    d.poll()
    if view.state == "Failed" and was_serving and d.obs.canary is not None:
        _abort_canary(
            d, Reason.CANARY_UNAVAILABLE,
            f"the canary lost its ready pods during analysis and did not recover within "
            f"{deadline}s (strategy.progressDeadlineSeconds): {view.message}",
        )  # fmt: skip
        return
    if view.state == "Failed":
        _abort_canary(d, view.reason, f"the canary did not become ready: {view.message}")
        return
    if view.state == "InProgress" and was_serving:
        since = lost_since or format_rfc3339(d.now)
        if lost_since is None:
            canary.unavailable_since = since
            d.event(
                Reason.CANARY_UNAVAILABLE,
                f"the canary lost its ready pods ({view.message}); analysis pauses for up "
                f"to {deadline}s",
                warning=True,
            )
        d.condition(
            ConditionType.PROGRESSING, "True", Reason.CANARY_UNAVAILABLE,
            f"analysis paused since {since}: {view.message}",
        )  # fmt: skip
        return
    if view.state == "InProgress":
        d.phase(Phase.PROGRESSING)
        d.condition(ConditionType.PROGRESSING, "True", Reason.CANARY_STARTING, view.message)
        return
    if canary.unavailable_since is not None:
        canary.unavailable_since = None
        d.condition(
            ConditionType.PROGRESSING, "True", Reason.ANALYZING, "the canary is ready again"
        )
    if d.status.phase != Phase.ANALYZING:
        d.phase(Phase.ANALYZING)
        d.again()  # the first check is due at once
        return
    if _analysis_paused(d, rev):
        return
    window = d.obs.window
    if window is None:
        d.check_in = max(0.0, _seconds_to_check(d.obs, d.now))
        return
    d.check_ran = True
    d.check_in = float(analysis_of(d.spec).interval_seconds)
    if window.unauthorized:
        _abort_canary(d, Reason.UNAUTHORIZED, f"the canary pods {UNAUTHORIZED_ADVICE}")
        return
    answered = sum(1 for s in window.smoke if s.ok)
    if answered and window.adapter_scheduled is False:
        _abort_canary(
            d, Reason.CANARY_SMOKE_FAILED,
            f"{answered} smoke request(s) were answered as {d.spec.adapter_name}, but vLLM's "
            "engine on the canary pods never scheduled that adapter (vllm:lora_requests_info): "
            "the answers did not come from it. Check what sits between the operator and the "
            "server (a proxy rewriting model names) and the server's LoRA settings",
        )  # fmt: skip
        return
    _judge_window(d, canary, rev, window)


def _analysis_paused(d: _Draft, rev: AdapterRevision) -> bool:
    """While the server does not fit the canary's revision (e.g. target.port was edited),
    smoke requests would fail for that alone and reject the adapter: the analysis waits
    for a fix instead, calling no pod and running no timer."""
    compat = canary_compatibility(d.obs)
    if compat is None:
        return False
    _report_compat(d, compat, rev.revision, "is not analysed meanwhile: no canary pod is called")
    if compat.ok:
        return False
    d.condition(
        ConditionType.PROGRESSING, "True", compat.reason,
        f"canary analysis paused until this is fixed: {compat.message}",
    )  # fmt: skip
    d.next = Next.IDLE
    d.check_in = None
    return True


def smoke_window(window: AnalysisWindow) -> rules.MetricsSample:
    """The window's traffic with the smoke requests added (judged like any request)."""
    total = rules.sum_samples(list(window.samples))
    total.requests += len(window.smoke)
    total.errors += sum(1 for s in window.smoke if not s.ok)
    for s in window.smoke:
        if s.ok:
            _observe_latency(total, s.latency_ms / 1000.0)
    return total


def _observe_latency(sample: rules.MetricsSample, seconds: float) -> None:
    if not sample.latency_buckets:
        sample.latency_buckets = dict.fromkeys([*LATENCY_BUCKETS, math.inf], 0.0)
    for le in list(sample.latency_buckets):
        if seconds <= le:
            sample.latency_buckets[le] = sample.latency_buckets.get(le, 0.0) + 1
    sample.latency_count += 1


def _judge_window(
    d: _Draft, canary: CanaryStatus, rev: AdapterRevision, window: AnalysisWindow
) -> None:
    decision = rules.decide_canary(
        analysis_of(d.spec), smoke_window(window), list(window.smoke), canary.checks_passed or 0
    )
    canary.checks_passed = decision.checks_passed
    canary.requests = (canary.requests or 0) + decision.requests
    if decision.error_rate is not None:
        canary.error_rate = round(decision.error_rate, 4)
    if decision.latency_p95_ms is not None:
        canary.latency_p95_ms = round(decision.latency_p95_ms, 1)
    if decision.tokens_per_second is not None and math.isfinite(decision.tokens_per_second):
        canary.tokens_per_second_per_request = round(decision.tokens_per_second, 1)
    if decision.action == "abort":
        _abort_canary(d, decision.reason, decision.message)
        return
    if decision.action == "continue":
        d.condition(ConditionType.PROGRESSING, "True", decision.reason, decision.message)
        return
    # Promote: the target gets the adapter through the same guarded patch as Rolling.
    ref = rules.revision_ref(d.spec.adapter_name, rev)
    compat = _compat(d, ref)
    d.actions.append(PatchTarget(ref, compat.changes if compat.ok else None))
    canary.revision = rev.model_copy(update={"outcome": Outcome.PROMOTED})
    _make_current(
        d,
        rev.model_copy(
            update={"outcome": Outcome.PROGRESSING, "deployed_at": format_rfc3339(d.now)}
        ),
    )
    d.phase(Phase.PROGRESSING)
    d.condition(ConditionType.PROGRESSING, "True", Reason.CANARY_PROMOTED, decision.message)
    d.event(Reason.CANARY_PROMOTED, f"revision {rev.revision}: {decision.message}")
    d.again()


def _abort_canary(d: _Draft, reason: str, message: str, rollback: bool = True) -> None:
    canary = d.status.canary
    assert canary is not None and canary.revision is not None
    rev = canary.revision
    if canary.deployment:
        d.actions.append(DeleteDeployment(canary.deployment))
    canary.deployment = None
    canary.revision = rev.model_copy(
        update={"outcome": Outcome.CANARY_ABORTED if rollback else Outcome.SUPERSEDED}
    )
    d.history(canary.revision)
    d.next = Next.IDLE
    d.check_in = None
    if not rollback:
        d.condition(ConditionType.PROGRESSING, "False", reason, message)
        return
    d.records.append(RolledBackRecord(reason))
    started = d.elapsed(canary.started_at)
    if started is not None:
        d.records.append(RolloutEnded("Canary", "Aborted", started))
    msg = f"revision {rev.revision} not promoted: {message}"
    d.phase(Phase.ROLLED_BACK)
    d.condition(ConditionType.PROGRESSING, "False", reason, msg)
    d.condition(ConditionType.DEGRADED, "True", reason, msg)
    d.event(reason, msg, warning=True)


def _drop_canary(d: _Draft) -> None:
    canary = d.status.canary
    if canary is not None and canary.deployment:
        d.actions.append(DeleteDeployment(canary.deployment))
        canary.deployment = None


# ------------------------------------------------------------------ rollout tracking


def _observe_rollout(d: _Draft) -> rules.RolloutView:
    """Where the current revision's rollout stands: its pods for Runtime, else the target."""
    current = d.status.current
    assert current is not None
    if d.spec.strategy.type == "Runtime":
        return _runtime_view(d, current)
    view = rules.deployment_rollout(
        _target(d), d.spec.adapter_name, current.digest,
        started_at=d.status.rollout_started_at,
        deadline_seconds=d.spec.strategy.progress_deadline_seconds, now=d.now,
    )  # fmt: skip
    d.status.ready_replicas = view.ready_replicas
    d.status.pods = _pods_by_annotation(d)
    return view


def _rollout_step(d: _Draft) -> None:
    current = d.status.current
    assert current is not None
    view = _observe_rollout(d)
    if view.state == "InProgress":
        d.phase(Phase.PROGRESSING)
        d.condition(ConditionType.PROGRESSING, "True", view.reason, view.message)
        if not view.waits_for_change:
            d.poll()
        return
    if view.state == "Complete":
        _complete(d, current, view)
        return
    _rollback(d, current, view)


def _complete(d: _Draft, current: AdapterRevision, view: rules.RolloutView) -> None:
    current.outcome = Outcome.AVAILABLE
    d.history(current)
    _drop_canary(d)
    msg = _serves(d, current, view.message)
    d.phase(Phase.AVAILABLE)
    d.condition(ConditionType.AVAILABLE, "True", Reason.ROLLOUT_COMPLETE, msg)
    d.condition(ConditionType.PROGRESSING, "False", Reason.ROLLOUT_COMPLETE, msg)
    d.condition(
        ConditionType.DEGRADED,
        "False",
        Reason.AS_EXPECTED,
        f"revision {current.revision} rolled out without a failure; nothing to do",
    )
    d.records.append(Served(current.digest))
    started = d.elapsed(d.status.rollout_started_at)
    if started is not None:
        d.records.append(RolloutEnded(d.spec.strategy.type, "Available", started))
    d.event(Reason.ROLLOUT_COMPLETE, msg)
    d.next = Next.IDLE


def _rollback(d: _Draft, failed: AdapterRevision, view: rules.RolloutView) -> None:
    strategy = d.spec.strategy.type
    started = d.elapsed(d.status.rollout_started_at)
    _drop_canary(d)
    if not d.spec.rollback.automatic:
        failed.outcome = Outcome.FAILED
        d.history(failed)
        msg = (
            f"revision {failed.revision} failed: {view.message} (rollback.automatic is off: "
            "fix the servers or set another adapter)"
        )
        d.phase(Phase.DEGRADED)
        d.condition(ConditionType.PROGRESSING, "False", view.reason, msg)
        d.condition(ConditionType.DEGRADED, "True", view.reason, msg)
        d.event(view.reason, msg, warning=True)
        if started is not None:
            d.records.append(RolloutEnded(strategy, "Failed", started))
        d.next = Next.IDLE
        return
    failed.outcome = Outcome.ROLLED_BACK
    d.history(failed)
    previous = d.status.previous
    prev_ref = rules.revision_ref(d.spec.adapter_name, previous) if previous else None
    if strategy != "Runtime":
        d.actions.append(PatchTarget(prev_ref))
    d.status.previous = failed
    d.status.rollout_started_at = format_rfc3339(d.now)
    if previous is not None:
        d.status.current = previous.model_copy(update={"outcome": Outcome.ROLLING_BACK})
        restored = f"restoring revision {previous.revision}"
    else:
        d.status.current = None
        restored = "no earlier revision: the adapter is removed from the servers"
        d.condition(ConditionType.AVAILABLE, "False", Reason.NO_ADAPTER_SERVED, restored)
    msg = f"revision {failed.revision} rolled back ({view.reason}: {view.message}); {restored}"
    d.phase(Phase.ROLLED_BACK)
    d.condition(ConditionType.DEGRADED, "True", view.reason, msg)
    d.condition(
        ConditionType.PROGRESSING,
        "True" if previous else "False",
        Reason.ROLLING_BACK if previous else Reason.ROLLED_BACK,
        msg,
    )
    d.records.append(RolledBackRecord(view.reason))
    if started is not None:
        d.records.append(RolloutEnded(strategy, "RolledBack", started))
    d.event(Reason.ROLLED_BACK, msg, warning=True)
    if strategy == "Runtime":
        _restore_pods(d, previous)
    d.again()


def _restore_pods(d: _Draft, previous: AdapterRevision | None) -> None:
    """A Runtime rollback calls the pods in the pass that decides it, as Rolling patches the
    target then: each pod is brought to the previous revision (a pod that was mid-load or
    new gets it loaded), or loses the adapter when there was none. The load failures seen
    this pass were the failed revision's, so they hold no pod back."""
    if previous is None:
        _runtime_calls(d, None, None, failures_apply=False)
        return
    target = _target(d)
    if target is None or d.obs.loaded is None:
        return  # the next pass asks the pods, then restores
    ref = rules.revision_ref(d.spec.adapter_name, previous)
    where = rules.runtime_path(target, d.spec.target.container, ref)
    if where.ok:
        _runtime_calls(d, previous.digest, where.message, failures_apply=False)


def _rollback_step(d: _Draft) -> None:
    current = d.status.current
    assert current is not None
    view = _observe_rollout(d)
    if view.state == "Complete":
        current.outcome = Outcome.AVAILABLE
        d.history(current)
        msg = _restored(current, view.message)
        d.condition(ConditionType.AVAILABLE, "True", Reason.PREVIOUS_REVISION_RESTORED, msg)
        d.condition(ConditionType.PROGRESSING, "False", Reason.ROLLED_BACK, msg)
        d.records.append(Served(current.digest))
    elif view.state == "Failed":
        current.outcome = Outcome.FAILED
        msg = (
            f"restoring revision {current.revision} failed too: {view.message}; "
            "fix the serving Deployment"
        )
        d.phase(Phase.DEGRADED)
        for type_ in (ConditionType.DEGRADED, ConditionType.PROGRESSING, ConditionType.AVAILABLE):
            status: ConditionStatus = "True" if type_ == ConditionType.DEGRADED else "False"
            d.condition(type_, status, Reason.ROLLBACK_FAILED, msg)
        d.next = Next.IDLE  # failed for good: only a change wakes it
    elif view.waits_for_change:
        d.condition(ConditionType.PROGRESSING, "True", view.reason, view.message)
    else:
        d.poll()


# ------------------------------------------------------------------ steady state


def _steady(d: _Draft) -> None:
    current = d.status.current
    target = _target(d)
    if current is None or current.outcome != Outcome.AVAILABLE or target is None:
        return
    if d.spec.strategy.type == "Runtime":
        ref = rules.revision_ref(d.spec.adapter_name, current)
        where = rules.runtime_path(target, d.spec.target.container, ref)
        if where.ok and d.obs.loaded is not None:
            errors = _runtime_calls(d, current.digest, where.message)
            if d.obs.auth_errors:
                d.condition(ConditionType.DEGRADED, "True", Reason.UNAUTHORIZED, _auth_message(d))
            elif errors:
                d.condition(ConditionType.DEGRADED, "True", Reason.RELOAD_FAILED, "; ".join(errors))
        return
    d.status.pods = _pods_by_annotation(d)
    available = int((target.get("status") or {}).get("availableReplicas") or 0)
    d.status.ready_replicas = sum(1 for p in d.status.pods if p.digest == current.digest)
    annotations = ((target["spec"].get("template") or {}).get("metadata") or {}).get(
        "annotations"
    ) or {}
    if annotations.get(sb.digest_annotation(d.spec.adapter_name)) != current.digest:
        d.condition(
            ConditionType.AVAILABLE, "False", Reason.ADAPTER_REMOVED_FROM_TARGET,
            f"Deployment {d.spec.target.deployment} no longer carries revision "
            f"{current.revision} (was its pod template replaced, e.g. by a GitOps sync?); "
            "change the AdapterDeployment's spec to roll it out again",
        )  # fmt: skip
    elif available == 0:
        d.condition(
            ConditionType.AVAILABLE, "False", Reason.NO_REPLICAS_AVAILABLE,
            "the target has no available replicas",
        )  # fmt: skip
    else:
        # Worded as when the rollout (or the restore) completed, so a settled object needs
        # no new write and a restore stays reported as one until the next rollout.
        desired = int((target.get("spec") or {}).get("replicas", 1))
        detail = f"{available}/{desired} replicas available"
        if _was_restored(d.status):
            reason, msg = Reason.PREVIOUS_REVISION_RESTORED, _restored(current, detail)
        else:
            reason, msg = Reason.ROLLOUT_COMPLETE, _serves(d, current, detail)
        d.condition(ConditionType.AVAILABLE, "True", reason, msg)


def _was_restored(status: AdapterDeploymentStatus) -> bool:
    """The current revision serves again because the one after it was rolled back."""
    return status.previous is not None and status.previous.outcome == Outcome.ROLLED_BACK


def _restored(current: AdapterRevision, detail: str) -> str:
    return f"revision {current.revision} restored: {detail}"


def _serves(d: _Draft, current: AdapterRevision, detail: str) -> str:
    return (
        f"revision {current.revision} ({current.digest[:19]}…) serves as "
        f"{d.spec.adapter_name}: {detail}"
    )


def _pods_by_annotation(d: _Draft) -> list[PodAdapter]:
    """Which ready pod serves which digest: pods carry their template's annotations."""
    key = sb.digest_annotation(d.spec.adapter_name)
    return [
        PodAdapter(pod=p.name, digest=p.annotations.get(key) or None)
        for p in sorted(d.obs.ready_pods(), key=lambda p: p.name)
    ]


# ------------------------------------------------------------------ runtime loading


def _runtime_view(d: _Draft, rev: AdapterRevision) -> rules.RolloutView:
    target = _target(d)
    if target is None:
        return rules.RolloutView(
            "Failed", Reason.TARGET_NOT_FOUND, f"Deployment {d.spec.target.deployment} not found"
        )
    ref = rules.revision_ref(d.spec.adapter_name, rev)
    where = rules.runtime_path(target, d.spec.target.container, ref)
    if not where.ok:
        return rules.RolloutView("Failed", where.reason, where.message)
    compat = served_compatibility(d.obs)
    if compat is not None:
        waiting = "is not loaded meanwhile: no serving pod is called"
        if _report_compat(d, compat, rev.revision, waiting):
            # As a paused Deployment: the progress deadline counts from the resume.
            d.status.rollout_started_at = format_rfc3339(d.now)
        if not compat.ok:
            # The servers may be right (a typo in target.port): wait for a fix, call nothing.
            return rules.RolloutView(
                "InProgress", compat.reason, f"paused until this is fixed: {compat.message}",
                d.status.ready_replicas or 0, waits_for_change=True,
            )  # fmt: skip
    if d.obs.loaded is None:  # not asked yet: the next pass asks the pods
        d.again()
        return rules.RolloutView("InProgress", Reason.LOADING, "asking the serving pods")
    view = _runtime_progress(d, rev, where.message)
    if view.state == "Failed":
        _withdraw_calls(d, rev, where.message)
    return view


def _runtime_progress(d: _Draft, rev: AdapterRevision, path: str) -> rules.RolloutView:
    """Plan the calls that bring the pods to ``rev`` and judge the load from the answers."""
    assert d.obs.loaded is not None
    errors = _runtime_calls(d, rev.digest, path, permanent_only=True)
    serving = d.status.ready_replicas or 0
    if d.obs.auth_errors:
        return rules.RolloutView("Failed", Reason.UNAUTHORIZED, _auth_message(d), serving)
    if errors:
        return rules.RolloutView("Failed", Reason.LOAD_FAILED, "; ".join(errors), serving)
    ready_pods = len(d.status.pods or [])
    unreachable = any(v is None for v in d.obs.loaded.values())
    calling = any(isinstance(a, PodCall) for a in d.actions)
    if ready_pods and serving == ready_pods and not unreachable and not calling:
        return rules.RolloutView(
            "Complete", Reason.ROLLOUT_COMPLETE, f"{serving}/{ready_pods} ready pods serve it",
            serving,
        )  # fmt: skip
    elapsed = d.elapsed(d.status.rollout_started_at)
    deadline = d.spec.strategy.progress_deadline_seconds
    if elapsed is not None and elapsed > deadline:
        return rules.RolloutView(
            "Failed", Reason.ROLLOUT_DEADLINE_EXCEEDED,
            f"only {serving}/{ready_pods} ready pods serve it after {deadline}s", serving,
        )  # fmt: skip
    return rules.RolloutView(
        "InProgress", Reason.LOADING, f"{serving}/{ready_pods} ready pods serve it", serving
    )


def _withdraw_calls(d: _Draft, rev: AdapterRevision, path: str) -> None:
    """The pass that fails a revision calls no pod for it: a load planned in the same pass
    (a pod added or still lacking it) would spread the revision being given up on, and run
    after a rollback's own calls. ``status.pods`` then says what the pods serve as found."""
    d.actions = [a for a in d.actions if not isinstance(a, PodCall)]
    name = d.spec.adapter_name
    loaded = d.obs.loaded or {}
    recorded = {p.pod: p.digest for p in d.obs.status.pods or []}
    serving: dict[str, str | None] = {}
    for p in d.obs.ready_pods():
        if not p.endpoint or p.name not in loaded:
            continue
        listing, was = loaded[p.name], recorded.get(p.name)
        if listing is None:
            serving[p.name] = was  # no answer: as last seen
        elif name not in listing or (was == rev.digest and rules.not_taken(listing[name], path)):
            serving[p.name] = None  # not listed, or the call recorded for it did not take
        else:
            serving[p.name] = was
    for refused in (*d.obs.load_errors, *d.obs.auth_errors):
        serving[refused] = None  # what a refused load left behind is not known
    current = d.status.current
    digest = current.digest if current is not None else None
    d.status.pods = [PodAdapter(pod=p, digest=s) for p, s in sorted(serving.items())]
    d.status.ready_replicas = sum(1 for s in serving.values() if s and s == digest)


def _auth_message(d: _Draft) -> str:
    pods = ", ".join(sorted(d.obs.auth_errors))
    return f"pod(s) {pods} {UNAUTHORIZED_ADVICE}"


def _as_dict(loaded: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if loaded is None else dict(loaded)


def _runtime_calls(
    d: _Draft,
    digest: str | None,
    path: str | None,
    permanent_only: bool = False,
    failures_apply: bool = True,
) -> list[str]:
    """Plan the calls that bring every ready pod to ``digest`` (None: unload); the status
    says what the pods serve once they succeed. Returns failures worth reporting.
    ``failures_apply``: the pods' permanent failures observed this pass were loads of
    ``digest`` (reported, not retried); otherwise they belong to another revision."""
    name = d.spec.adapter_name
    loaded = d.obs.loaded or {}
    views = [
        rules.PodView(p.name, True, p.endpoint, _as_dict(loaded.get(p.name)))
        for p in d.obs.ready_pods()
        if p.endpoint and p.name in loaded
    ]
    endpoints = {p.name: p.endpoint for p in d.obs.ready_pods() if p.endpoint}
    recorded = {p.pod: p.digest for p in d.status.pods or []}
    runtime = rules.plan_runtime(views, name, digest, recorded, path)
    serving = dict(runtime.serving)
    errors: list[str] = []
    load_errors = d.obs.load_errors if failures_apply else {}
    auth_errors = d.obs.auth_errors if failures_apply else {}
    for pod, message in sorted(load_errors.items()):
        serving[pod] = None
        errors.append(f"pod {pod}: {message}")
    for pod in auth_errors:
        serving[pod] = None
    loaded_paths = {v.name: (v.loaded or {}).get(name) for v in views}
    calls = [
        PodCall(
            act.pod,
            endpoints[act.pod],
            act.action,
            name,
            path,
            digest,
            in_place=act.action == "reload" and loaded_paths.get(act.pod) != path,
        )
        for act in runtime.actions
        # failed for good last pass: reported, not retried
        if act.pod not in load_errors and act.pod not in auth_errors
    ]
    d.actions.extend(calls)
    if calls:
        d.again()  # the next pass sees what the calls did
    d.status.pods = [PodAdapter(pod=p, digest=s) for p, s in sorted(serving.items())]
    d.status.ready_replicas = sum(1 for s in serving.values() if s and s == digest)
    if not permanent_only and any(v is None for v in loaded.values()):
        d.poll()  # a pod did not answer: ask again
    return errors


# ------------------------------------------------------------------ deletion


def removal(obs: Observed) -> tuple[Action, ...]:
    """What deleting the AdapterDeployment undoes: its canary and its entries in the target
    (only where it owns the adapter name there; Runtime: unload from every ready pod)."""
    spec = obs.spec
    if spec is None:
        return ()
    actions: list[Action] = [DeleteDeployment(sb.canary_name(obs.name))]
    target = obs.target
    if target is None:
        return tuple(actions)
    if spec.strategy.type == "Runtime":
        actions += [
            PodCall(p.name, p.endpoint, "unload", spec.adapter_name)
            for p in obs.ready_pods()
            if p.endpoint and spec.adapter_name in ((obs.loaded or {}).get(p.name) or {})
        ]
        return tuple(actions)
    owner = ((target.get("metadata") or {}).get("annotations") or {}).get(
        sb.owner_annotation(spec.adapter_name)
    )
    if owner == obs.name:
        actions.append(PatchTarget(None))
    return tuple(actions)


def with_window(obs: Observed, window: AnalysisWindow | None) -> Observed:
    return replace(obs, window=window)
