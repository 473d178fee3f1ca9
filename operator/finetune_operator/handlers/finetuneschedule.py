"""kopf handlers of FineTuneSchedule: observe, plan (pure), act, write status.

Every trigger — create, update, resume after an operator restart, the schedule's clock and
status changes of the FineTuneJobs it owns — runs the same level-based :func:`reconcile`,
serialised per schedule. A run's name comes from its slot, so a repeated create meets the run
already made (409) and is taken as success: never two runs for one slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

import kopf

from .. import metrics
from ..api.adapterdeployment import KIND as AD_KIND
from ..api.adapterdeployment import PLURAL as AD_PLURAL
from ..api.common import GROUP, VERSION
from ..api.finetunejob import KIND as FTJ_KIND
from ..api.finetunejob import PLURAL as FTJ_PLURAL
from ..api.finetuneschedule import KIND, PLURAL
from ..api.status_patch import FOREIGN_STATUS_KEYS, status_patch
from ..builders import names
from ..clients.kube import KubeClient, KubeError
from ..config import OperatorConfig
from ..domain.times import parse_rfc3339
from ..planners.finetuneschedule import (
    LABEL_SCHEDULE,
    Observed,
    Plan,
    RunAction,
    plan,
    run_outcome,
)
from .daemon_stop import daemons_of, start_daemons, stop_daemons
from .finetunejob import runtime
from .object_locks import ObjectLocks

log = logging.getLogger(__name__)

# How often a sleeping clock looks whether its schedule is due (a stop wakes it at once). It
# reads only memory: the API is asked once per due time, not per check.
CLOCK_TICK_SECONDS = 0.5
# After a failed reconcile (API errors), the clock tries again after this long.
CLOCK_RETRY_SECONDS = 5.0


class ScheduleState:
    """Per-operator-run state of the schedule controller (in kopf's memo)."""

    def __init__(self) -> None:
        self._locks = ObjectLocks()
        # (namespace, name) -> monotonic time the schedule is next due.
        self.due: dict[tuple[str, str], float] = {}

    def serialised(self, namespace: str, name: str) -> AbstractAsyncContextManager[None]:
        return self._locks.held(namespace, name)

    @property
    def in_flight(self) -> int:
        """Schedules with a reconcile running or waiting."""
        return len(self._locks)


def schedule_state(memo: kopf.Memo) -> ScheduleState:
    """The state made at startup in the operator's memo (kopf gives each object a shallow
    copy of it, so state made later would not be shared between objects' handlers)."""
    state: ScheduleState | None = getattr(memo, "ftsched_state", None)
    if state is None:
        raise kopf.TemporaryError("operator is still starting", delay=1)
    return state


class RunNameTaken(Exception):
    """A FineTuneJob of the run's name exists and belongs to something else."""


# ---------------------------------------------------------------- observe


def follows(ad: Mapping[str, Any]) -> str | None:
    """The schedule an AdapterDeployment follows (spec.source.fineTuneScheduleRef), if any."""
    ref = ((ad.get("spec") or {}).get("source") or {}).get("fineTuneScheduleRef") or {}
    name = ref.get("name") if isinstance(ref, Mapping) else None
    return str(name) if name else None


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("controller") and ref.get("uid") == uid:
            return True
    return False


async def _adapter_deployments(kube: KubeClient, namespace: str) -> list[dict[str, Any]]:
    """The namespace's AdapterDeployments; none when they cannot be listed (their CRD is not
    installed, or RBAC of an older chart): a schedule works without followers."""
    try:
        return await kube.list(AD_KIND, namespace)
    except KubeError as exc:
        if exc.status not in (403, 404):
            raise
        log.info("cannot list AdapterDeployments in %s: %s", namespace, exc.message[:200])
        return []


async def observe(
    kube: KubeClient, config: OperatorConfig, body: Mapping[str, Any], now: datetime
) -> Observed:
    meta = body.get("metadata") or {}
    name, namespace, uid = str(meta["name"]), str(meta["namespace"]), str(meta.get("uid") or "")
    selector = {LABEL_SCHEDULE: names.label_value(name)}
    runs = await kube.list(FTJ_KIND, namespace, selector)
    probes: list[dict[str, Any]] = []
    probe_pods: list[dict[str, Any]] = []
    spec = body.get("spec") or {}
    # Probe Jobs exist only with trigger.onDataChange (and are removed once it is unset).
    if (spec.get("trigger") or {}).get("onDataChange") is not None or (
        (body.get("status") or {}).get("dataCheck") is not None
    ):
        probes = [j for j in await kube.list("Job", namespace, selector) if owned_by(j, uid)]
        if probes:
            probe_pods = await kube.list("Pod", namespace, selector)
    status = dict(body.get("status") or {})
    for key in FOREIGN_STATUS_KEYS:
        status.pop(key, None)
    followers = [ad for ad in await _adapter_deployments(kube, namespace) if follows(ad) == name]
    return Observed(
        name=name,
        namespace=namespace,
        uid=uid,
        generation=int(meta.get("generation") or 1),
        created=parse_rfc3339(meta.get("creationTimestamp")) or now,
        spec=body.get("spec") or {},
        status=status,
        runs=tuple(r for r in runs if owned_by(r, uid)),
        now=now,
        followers=tuple(followers),
        probes=tuple(probes),
        probe_pods=tuple(probe_pods),
        trainer_image=config.trainer_image,
        pull_policy=config.image_pull_policy,
    )


# ---------------------------------------------------------------- act


async def execute(kube: KubeClient, namespace: str, owner_uid: str, p: Plan) -> None:
    for action in p.actions:
        if action.verb == "delete":
            await kube.delete(action.kind, namespace, action.name)
        elif action.body is not None:
            await _create(kube, namespace, owner_uid, action)


async def _create(kube: KubeClient, namespace: str, owner_uid: str, action: RunAction) -> None:
    """Create the run, or meet the one of that name this schedule already made."""
    assert action.body is not None
    existing, created = await kube.create(action.body)
    if not created and not owned_by(existing, owner_uid):
        raise RunNameTaken(
            f"{action.kind} {namespace}/{action.name} exists and was not made for this "
            "schedule: rename or delete it"
        )


# ---------------------------------------------------------------- reconcile


async def reconcile(
    kube: KubeClient,
    config: OperatorConfig,
    namespace: str,
    name: str,
    trigger: str,
    state: ScheduleState,
    now: datetime | None = None,
) -> Plan | None:
    """Observe, plan, act and write status for one schedule; retried on write conflicts."""
    metrics.see_schedule_namespace(namespace)
    async with state.serialised(namespace, name):
        try:
            for _attempt in range(max(1, config.status_write_retries)):
                body = await kube.get(KIND, namespace, name)
                if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
                    state.due.pop((namespace, name), None)
                    return None
                obs = await observe(kube, config, body, now or datetime.now(UTC))
                p = plan(obs)
                await execute(kube, namespace, obs.uid, p)
                patch = status_patch(obs.status, p.status)
                if patch:
                    try:
                        await kube.patch_status(KIND, namespace, name, patch, None)
                    except KubeError as exc:
                        if exc.status == 409:
                            continue
                        raise
                    for event in p.events:
                        await kube.emit_event(body, event.type, event.reason, event.message)
                    _record_metrics(obs, p)
                _remember_due(state, namespace, name, p)
                log.debug("%s/%s reconciled (%s)", namespace, name, trigger)
                return p
            raise kopf.TemporaryError("status writes kept conflicting; retrying later", delay=2)
        except RunNameTaken as exc:
            raise kopf.TemporaryError(str(exc), delay=max(30.0, config.retry_seconds)) from exc
        except KubeError as exc:
            delay = min(5.0, config.retry_seconds)
            raise kopf.TemporaryError(f"Kubernetes API error: {exc}", delay=delay) from exc


def _remember_due(state: ScheduleState, namespace: str, name: str, p: Plan) -> None:
    if p.wake_after is None:
        state.due.pop((namespace, name), None)
    else:
        state.due[(namespace, name)] = time.monotonic() + p.wake_after


def _record_metrics(obs: Observed, p: Plan) -> None:
    for record in p.finished:
        metrics.fts_runs.labels(obs.namespace, record["trigger"], record["outcome"]).inc()
    before = {r.get("name"): r for r in obs.status.get("runs") or []}
    for record in p.status.get("runs") or []:
        comparison = record.get("comparison")
        if comparison and not (before.get(record["name"]) or {}).get("comparison"):
            metrics.fts_promotions.labels(obs.namespace, comparison["decision"]).inc()
    last = parse_rfc3339(p.status.get("lastSuccessfulTime"))
    if last is not None:
        metrics.fts_last_success.labels(obs.namespace, obs.name).set(last.timestamp())


def _raise_for_outcome(p: Plan | None) -> None:
    if p is not None and p.outcome == "permanent":
        raise kopf.PermanentError(p.message)


# ---------------------------------------------------------------- handlers


@kopf.on.startup()
async def start_schedules(memo: kopf.Memo, **_: Any) -> None:
    """The controller's shared state; the series of watched namespaces (known at start) exist
    before any event."""
    memo.ftsched_state = ScheduleState()
    start_daemons(memo)
    config = getattr(memo, "config", None)
    for namespace in getattr(config, "watch_namespaces", ()) or ():
        if not any(c in namespace for c in "*?[!,"):
            metrics.see_schedule_namespace(namespace)


# How long the operator, when it stops, lets schedule reconciles under way finish their writes.
SHUTDOWN_GRACE_SECONDS = 5.0


@kopf.on.cleanup()
async def finish_reconciles(memo: kopf.Memo, **_: Any) -> None:
    """Let the clocks stop and reconciles under way (a clock's is shielded from cancellation)
    write their status before the API client's connections are closed."""
    await stop_daemons(memo)
    state: ScheduleState | None = getattr(memo, "ftsched_state", None)
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
    while state is not None and state.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def on_change(
    name: str, namespace: str | None, memo: kopf.Memo, reason: str, **_: Any
) -> None:
    kube, config = runtime(memo)
    state = schedule_state(memo)
    _raise_for_outcome(await reconcile(kube, config, str(namespace), name, str(reason), state))


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def schedule_clock(
    name: str, namespace: str | None, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any
) -> None:
    """Reconcile the schedule when its next time comes (the plan says when).

    Sleeps on a deadline in memory that every reconcile of the schedule moves, so an edited
    schedule or a finished run takes effect without waiting for the old deadline.
    """
    kube, config = runtime(memo)
    state = schedule_state(memo)
    daemons = daemons_of(memo)
    key = (str(namespace), name)
    with daemons.alive():
        while not daemons.asked_to_stop(stopped):
            due = state.due.get(key)
            now = time.monotonic()
            if due is not None and now >= due:
                try:
                    await asyncio.shield(
                        reconcile(kube, config, key[0], name, trigger="clock", state=state)
                    )
                except (kopf.TemporaryError, kopf.PermanentError, KubeError) as exc:
                    log.info("scheduled reconcile of %s/%s deferred: %s", key[0], name, exc)
                    state.due[key] = time.monotonic() + CLOCK_RETRY_SECONDS
                continue
            wait = CLOCK_TICK_SECONDS if due is None else min(CLOCK_TICK_SECONDS, due - now)
            await daemons.sleep(stopped, max(0.01, wait))


@kopf.on.event(GROUP, VERSION, FTJ_PLURAL, labels={LABEL_SCHEDULE: kopf.PRESENT})
async def run_event(body: kopf.Body, memo: kopf.Memo, type: str | None, **_: Any) -> None:
    """A run changed (its status, or it was deleted): reconcile its schedule at once."""
    meta = body.get("metadata") or {}
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("kind") == KIND), None)
    if owner is None or type in (None, "ADDED"):
        return
    # Progress of a running run changes nothing here: only its end or its deletion does.
    if (
        type != "DELETED"
        and run_outcome(body)[0] == "Running"
        and not meta.get("deletionTimestamp")
    ):
        return
    kube, config = runtime(memo)
    try:
        await reconcile(
            kube, config, str(meta.get("namespace")), str(owner["name"]), "run-event",
            schedule_state(memo),
        )  # fmt: skip
    except (kopf.TemporaryError, KubeError) as exc:
        log.info("reconcile after a run's change deferred: %s", exc)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_SCHEDULE: kopf.PRESENT})
async def probe_event(body: kopf.Body, memo: kopf.Memo, type: str | None, **_: Any) -> None:
    """A data probe finished: reconcile its schedule at once to read the result."""
    meta = body.get("metadata") or {}
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("kind") == KIND), None)
    conditions = (body.get("status") or {}).get("conditions") or []
    ended = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                for c in conditions)  # fmt: skip
    if owner is None or type in (None, "ADDED", "DELETED") or not ended:
        return
    kube, config = runtime(memo)
    try:
        await reconcile(
            kube, config, str(meta.get("namespace")), str(owner["name"]), "probe-event",
            schedule_state(memo),
        )  # fmt: skip
    except (kopf.TemporaryError, KubeError) as exc:
        log.info("reconcile after a data probe deferred: %s", exc)


def _follows_a_schedule(spec: Mapping[str, Any] | None, **_: Any) -> bool:
    return follows({"spec": spec or {}}) is not None


@kopf.on.event(GROUP, VERSION, AD_PLURAL, when=_follows_a_schedule)
async def follower_event(body: kopf.Body, memo: kopf.Memo, type: str | None, **_: Any) -> None:
    """An AdapterDeployment following a schedule changed (it may have rolled the champion
    back): reconcile the schedule."""
    schedule = follows(body)
    if schedule is None or type is None:
        return
    kube, config = runtime(memo)
    meta = body.get("metadata") or {}
    try:
        await reconcile(
            kube, config, str(meta.get("namespace")), schedule, "follower-event",
            schedule_state(memo),
        )  # fmt: skip
    except (kopf.TemporaryError, KubeError) as exc:
        log.info("reconcile after an AdapterDeployment's change deferred: %s", exc)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def on_delete(
    name: str, namespace: str | None, uid: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """Delete the schedule's runs (the garbage collector would too; this is at once). Their
    adapters in storage are never touched."""
    kube, _config = runtime(memo)
    namespace = str(namespace)
    state = schedule_state(memo)
    async with state.serialised(namespace, name):
        state.due.pop((namespace, name), None)
        runs = await kube.list(FTJ_KIND, namespace, {LABEL_SCHEDULE: names.label_value(name)})
        for run in runs:
            if owned_by(run, str(uid or "")):
                await kube.delete(FTJ_KIND, namespace, run["metadata"]["name"])
    metrics.forget_schedule(namespace, name)
