"""kopf handlers of FineTuneJob: observe, plan (pure), act, write status.

Every trigger — create, update, resume after an operator restart, the poller of a running job and
events of the trainer Jobs and pods — runs the same level-based :func:`reconcile`, serialised per
object. Triggers that come from the watches (Job and Pod events, polls) read the FineTuneJob and
its children from the watches' indexes where those are provably fresh (decision 1650). Names of
children are deterministic, so a repeated create meets the existing object (409) and is taken as
success: never two trainer Jobs for one generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, assert_never

import kopf
from pydantic import ValidationError

from .. import metrics
from ..api.common import GROUP, VERSION
from ..api.finetunejob import (
    KIND,
    PLURAL,
    ConditionType,
    FineTuneJobSpec,
    FineTuneJobStatus,
    Phase,
    parse_status,
    status_wire,
)
from ..api.status_patch import status_patch
from ..builders import distributed, names
from ..builders.trainer import TRAINER_CONTAINER
from ..clients.kube import KubeClient, KubeError
from ..config import OperatorConfig, load_config
from ..planners.finetunejob import (
    Action,
    Event,
    Observed,
    Outcome,
    Plan,
    PriceTable,
    Refusal,
    child_refused,
    condition,
    is_settled,
    is_terminal,
    plan,
    pod_age_key,
    referenced_objects,
    run_generation,
)
from ..policy import NamespaceUsage
from .daemon_stop import daemons_of, start_daemons, stop_daemons
from .gpu_usage import GpuLedger
from .object_locks import ObjectLocks
from .trainer_watch import (
    CHILD_LABELS,
    CHILD_SELECTOR,
    SETTLED,
    WatchedObjects,
    ftj_owner_name,
    trainer_ended,
)

log = logging.getLogger(__name__)


class _QuietPollerStops(logging.Filter):
    """kopf warns each time it cancels a daemon; for a poller of a job that just finished
    that is the normal end (one warning per job at scale), so it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Daemon 'poll_running' is cancelled")


logging.getLogger("kopf.objects").addFilter(_QuietPollerStops())

# Children whose creation makes an event: the trainer Job is what users look at next
# (`kubectl logs job/...`); its ConfigMap and Service are details (decision 1201).
EVENT_CHILD_KINDS = ("Job",)


# How long a read of the price table is reused: it changes rarely, and re-reading it on every
# reconcile was one request per poll of every running job.
PRICE_TABLE_TTL_SECONDS = 60.0
# How long a PersistentVolumeClaim or Secret seen to exist is taken to still exist: the jobs of
# a team reference the same few claims, and asking again for every new job was a third of the
# requests of a job's start. A missing one is asked for again each time (decision 1205).
REFERENCE_SEEN_TTL_SECONDS = 30.0
# Polls of running jobs in flight at once. When the API is slow, polls stretch (progress
# shows later) instead of delaying the first reconcile of new jobs (decision 1200).
POLL_CONCURRENCY = 4


class RunState:
    """Per-operator-run state shared by all handlers (kept in kopf's memo, not globals,
    so that locks belong to the event loop of the run that uses them).

    Holds only what is in flight: a job's lock exists while a reconcile of it runs or waits,
    so memory does not grow with the number of jobs ever seen.
    """

    def __init__(self) -> None:
        self._locks = ObjectLocks()
        self.prices: tuple[float, PriceTable | None] | None = None  # (monotonic read time, table)
        # (kind, namespace, name) -> monotonic time it was last seen to exist.
        self.references_seen: dict[tuple[str, str, str], float] = {}
        # Polls take turns so that new jobs and Job events are not queued behind them.
        self.poll_slots = asyncio.Semaphore(POLL_CONCURRENCY)
        self.running_pollers = 0  # running jobs being polled (sets their interval)
        self.gpus = GpuLedger()  # GPUs of each namespace's runs (platform policy)
        self.watched = WatchedObjects()  # FineTuneJobs, trainer Jobs and pods as watched

    def serialised(self, namespace: str, name: str) -> AbstractAsyncContextManager[None]:
        """One reconcile of an object at a time (create/update, poll and Job events race)."""
        return self._locks.held(namespace, name)

    def recently_seen(self, kind: str, namespace: str, name: str) -> bool:
        seen = self.references_seen.get((kind, namespace, name))
        return seen is not None and time.monotonic() - seen < REFERENCE_SEEN_TTL_SECONDS

    def saw(self, kind: str, namespace: str, name: str) -> None:
        now = time.monotonic()
        if len(self.references_seen) > 4096:  # bounded: drop what has expired
            self.references_seen = {
                k: t for k, t in self.references_seen.items()
                if now - t < REFERENCE_SEEN_TTL_SECONDS
            }  # fmt: skip
        self.references_seen[(kind, namespace, name)] = now

    @property
    def tracked_objects(self) -> int:
        """Objects with a reconcile running or waiting (for tests and the scale benchmark)."""
        return len(self._locks)


def runtime(memo: Any) -> tuple[KubeClient, OperatorConfig]:
    """The client and configuration prepared at startup (tests may pass their own in memo)."""
    kube = getattr(memo, "kube", None)
    config = getattr(memo, "config", None)
    if kube is None or config is None:
        raise kopf.TemporaryError("operator is still starting", delay=1)
    return kube, config


def run_state(memo: Any) -> RunState:
    state: RunState | None = getattr(memo, "ftj_state", None)
    if state is None:
        raise kopf.TemporaryError("operator is still starting", delay=1)
    return state


# ---------------------------------------------------------------- observe


async def _missing_references(
    kube: KubeClient, namespace: str, spec: FineTuneJobSpec, state: RunState | None = None
) -> tuple[str, ...]:
    claims, secrets = referenced_objects(spec)
    checks = [("PersistentVolumeClaim", claim, "fix the pvc:// URI") for claim in claims] + [
        ("Secret", secret, "fix credentialsSecretRef") for secret in secrets
    ]
    missing: list[str] = []
    for kind, ref, fix in checks:
        if state is not None and state.recently_seen(kind, namespace, ref):
            continue
        try:
            found = await kube.exists(kind, namespace, ref)
        except KubeError as exc:
            if exc.status != 403:
                raise
            # Not allowed to look (RBAC): the kubelet reports a missing object later.
            log.info("cannot check %s %s/%s: %s", kind, namespace, ref, exc.message)
            continue
        if not found:
            missing.append(f"{kind} {ref!r} not found in namespace {namespace}: create it or {fix}")
        elif state is not None:
            state.saw(kind, namespace, ref)
    return tuple(missing)


async def _price_table(
    kube: KubeClient, config: OperatorConfig, state: RunState | None
) -> PriceTable | None:
    now = time.monotonic()
    if state is not None and state.prices is not None:
        read_at, table = state.prices
        if now - read_at < PRICE_TABLE_TTL_SECONDS:
            return table
    try:
        cm = await kube.get("ConfigMap", config.operator_namespace, config.price_table_configmap)
    except KubeError as exc:
        log.debug("price table unreadable: %s", exc)
        return None
    table = PriceTable.from_configmap_data((cm or {}).get("data"))
    if state is not None:
        state.prices = (now, table)
    return table


async def _children(
    kube: KubeClient,
    namespace: str,
    name: str,
    uid: str,
    job_name: str,
    gen: int,
    watched: WatchedObjects | None,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], bool]:
    """The trainer Job and its pods, and whether they came from the watches: they do when the
    watch has the Job, else they are asked for.

    A Job that the watch shows finished is the moment the run's verdict is decided, and its
    pods' last changes (the trainer's exit, its result) travel on another watch stream that
    may lag: those pods are listed from the server, once per run.
    """
    job = watched.job(namespace, name, uid, job_name) if watched is not None else None
    if job is not None and watched is not None and not _job_finished(job):
        return job, watched.job_pods(namespace, name, job), True
    if job is None:
        job = await kube.get("Job", namespace, job_name)
    pods = await kube.list(
        "Pod",
        namespace,
        {names.LABEL_JOB: names.label_value(name), names.LABEL_GENERATION: str(gen)},
    )
    return job, pods, False


async def _newest_log(
    kube: KubeClient, config: OperatorConfig, namespace: str, pods: list[dict[str, Any]]
) -> tuple[bool, str | None]:
    """Whether a rank-0 trainer has started, and the newest such pod's log tail (None when
    the server has no log for it: not started after all, or the pod is gone)."""
    # Progress comes from global rank 0 (pod 0 of a multi-node Job).
    started = [p for p in distributed.rank0_pods(pods) if _trainer_started(p)]
    if not started:
        return False, None
    newest = max(started, key=pod_age_key)
    log_tail = await kube.read_log(
        namespace, newest["metadata"]["name"], TRAINER_CONTAINER, config.log_tail_lines
    )
    return True, log_tail


def _job_finished(job: Mapping[str, Any]) -> bool:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed", "FailureTarget") and (
            cond.get("status") == "True"
        ):
            return True
    return False


async def observe(
    kube: KubeClient,
    config: OperatorConfig,
    body: Mapping[str, Any],
    state: RunState | None = None,
    from_watch: bool = False,
) -> Observed:
    """Gather the FineTuneJob's children, pod states, log tail, references and prices.

    A settled job (finished, spec unchanged since) needs none of them: its status stays.
    With ``from_watch`` the trainer Job and its pods come from the watches' indexes.
    """
    meta = body.get("metadata") or {}
    name, namespace = str(meta["name"]), str(meta["namespace"])
    generation = int(meta.get("generation") or 1)
    status = parse_status(body.get("status"))
    settled = is_settled(status, generation)
    job_name = status.trainer_job
    job = configmap = None
    pods: list[dict[str, Any]] = []
    log_tail = None
    gen = run_generation(job_name)
    if job_name and gen is not None and not settled:
        watched = state.watched if (state is not None and from_watch) else None
        uid = str(meta.get("uid") or "")
        job, pods, watched_ones = await _children(
            kube, namespace, name, uid, job_name, gen, watched
        )
        started, log_tail = await _newest_log(kube, config, namespace, pods)
        if started and log_tail is None and watched_ones:
            # The watch shows a trainer the server has no log of: the pod went while the
            # watch was cut off (a watch resumed after a gap does not replay deletions).
            job, pods, _ = await _children(kube, namespace, name, uid, job_name, gen, None)
            _, log_tail = await _newest_log(kube, config, namespace, pods)
        job_annotations = ((job or {}).get("metadata") or {}).get("annotations") or {}
        if names.ANNOTATION_SPEC_HASH not in job_annotations:
            # The run's spec hash is on the Job; the ConfigMap is read only without it.
            configmap = await kube.get(
                "ConfigMap", namespace, names.trainer_configmap_name(name, gen)
            )

    missing: tuple[str, ...] | None = None
    if not settled and (job_name is None or is_terminal(status)):
        try:
            spec = FineTuneJobSpec.model_validate(body.get("spec") or {})
            missing = await _missing_references(kube, namespace, spec, state)
        except ValidationError:
            missing = None  # the planner reports the invalid spec
    prices = None if settled else await _price_table(kube, config, state)
    return Observed(
        name=name,
        namespace=namespace,
        uid=str(meta.get("uid") or ""),
        generation=generation,
        spec=body.get("spec") or {},
        status=status,
        annotations=dict(meta.get("annotations") or {}),
        job=job,
        configmap=configmap,
        pods=tuple(pods),
        log_tail=log_tail,
        missing_refs=missing,
        prices=prices,
        # Read after the last await: the plan that may start a run follows in the same step.
        namespace_usage=state.gpus.usage(namespace, name) if state else NamespaceUsage(),
    )


def _trainer_started(pod: Mapping[str, Any]) -> bool:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == TRAINER_CONTAINER:
            state = cs.get("state") or {}
            return "running" in state or "terminated" in state
    return False


# ---------------------------------------------------------------- act


class ChildRejected(Exception):
    """The API server refused a child (quota, admission webhook, LimitRange, invalid)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(f"{refusal.kind} {refusal.name}: {refusal.code} {refusal.message}")
        self.refusal = refusal


# HTTP statuses of a create the API server will refuse again as long as the spec is the same.
REFUSED_CREATE = (400, 403, 413, 422)


def _controller_uid(obj: Mapping[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid") or "")
    return None


def _made_by_operator(obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(names.LABEL_MANAGED_BY) == names.MANAGER


async def _create(kube: KubeClient, namespace: str, action: Action) -> bool:
    """Create a child, or adopt the one of that name if it belongs to this FineTuneJob.

    A child owned by another uid was left by a deleted FineTuneJob of the same name (the
    garbage collector had not reached it yet): adopting it would hand the new job an old run
    that the collector then removes. It is deleted and a fresh one made (decision 1621).
    """
    assert action.body is not None
    kind, name, owner = action.kind, action.name, _controller_uid(action.body)
    try:
        existing, created = await kube.create(action.body)
        if created or _controller_uid(existing) == owner:
            return created
        if not _made_by_operator(existing):
            message = f"{kind} {name!r} already exists and was not made by finetune-operator"
            raise ChildRejected(Refusal(kind, name, 409, "AlreadyExists", message))
        log.info("%s %s/%s belongs to a deleted FineTuneJob; replacing it", kind, namespace, name)
        await kube.delete(action.kind, namespace, action.name)
        _, created = await kube.create(action.body)
    except KubeError as exc:
        if exc.status in REFUSED_CREATE:
            raise ChildRejected(Refusal(kind, name, exc.status, exc.reason, exc.message)) from exc
        raise
    if not created:  # the stale one still exists (its deletion is under way)
        raise kopf.TemporaryError(f"the stale {kind} {name} is still being deleted", delay=1)
    return created


async def execute(kube: KubeClient, namespace: str, p: Plan) -> list[Event]:
    """Carry out the plan's actions; returns events for what actually changed."""
    events: list[Event] = []
    for action in p.actions:
        if action.verb == "create" and action.body is not None:
            created = await _create(kube, namespace, action)
            if created and action.kind in EVENT_CHILD_KINDS:
                events.append(
                    Event("Normal", f"{action.kind}Created", f"created {action.kind} {action.name}")
                )
        elif action.verb == "patch" and action.body is not None:
            await kube.patch(action.kind, namespace, action.name, action.body)
        elif action.verb == "delete":
            await kube.delete(action.kind, namespace, action.name)
    return events


async def going_away(kube: KubeClient, namespace: str, name: str) -> bool:
    """Whether the FineTuneJob or its namespace is being deleted right now."""
    body = await kube.get(KIND, namespace, name)
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return True
    try:
        ns = await kube.get("Namespace", "", namespace)
    except KubeError as exc:
        if exc.status != 403:
            raise
        return False  # not allowed to look (an older RBAC): cannot tell, go on as before
    if ns is None:
        return True
    terminating = (ns.get("status") or {}).get("phase") == "Terminating"
    return terminating or bool((ns.get("metadata") or {}).get("deletionTimestamp"))


def _reports_trouble(p: Plan) -> bool:
    return any(event.type == "Warning" for event in p.events)


async def _plan_and_act(
    kube: KubeClient,
    config: OperatorConfig,
    namespace: str,
    obs: Observed,
    state: RunState | None = None,
) -> tuple[Plan, list[Event]] | None:
    """Plan and carry out one observation; None when the object turned out to be going away.

    Bad news (a Warning: a missing trainer Job, a missing reference, a refused child) is
    checked against a deletion under way first: deleting a namespace removes children and
    references in no particular order, and that is not a failure (decision 1620).
    """
    p = plan(obs, config)
    if _reports_trouble(p) and await going_away(kube, namespace, obs.name):
        return None
    if state is not None and any(a.kind == "Job" and a.verb == "create" for a in p.actions):
        state.gpus.reserve(namespace, obs.name, obs.spec)  # before any other reconcile runs
    try:
        return p, await execute(kube, namespace, p)
    except ChildRejected as exc:
        if state is not None:
            state.gpus.release(namespace, obs.name)
        refused = child_refused(obs, p, exc.refusal)
        cleanup = Plan(refused.status, actions=refused.actions)
        await execute(kube, namespace, cleanup)  # what this run created goes with it
        if await going_away(kube, namespace, obs.name):
            return None
        if refused.outcome == Outcome.RETRY:  # a final refusal is counted with its verdict
            metrics.ftj_errors.labels(namespace, "JobRejected").inc()
        return refused, []


async def reconcile(
    kube: KubeClient,
    config: OperatorConfig,
    namespace: str,
    name: str,
    trigger: str,
    state: RunState | None = None,
    from_watch: bool = False,
) -> Plan | None:
    """Observe, plan, act and write status for one FineTuneJob; retried on write conflicts.

    ``from_watch``: triggered by a watch (a Job or Pod event, the poll of a running job): the
    FineTuneJob and its children are taken from the watches' indexes where they are fresh.
    """
    started = time.monotonic()
    metrics.see_namespace(namespace)
    serialised = state.serialised(namespace, name) if state else contextlib.nullcontext()
    async with serialised:
        try:
            # Events of children created by an attempt whose status write then failed: the
            # next attempt adopts those children (409), so their events would be lost.
            created: list[Event] = []
            for attempt in range(max(1, config.status_write_retries)):
                body = await _read_ftj(kube, namespace, name, state, from_watch and attempt == 0)
                if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
                    return None
                if body.get(SETTLED):  # finished for its current spec: nothing can change
                    return None
                obs = await observe(kube, config, body, state, from_watch)
                acted = await _plan_and_act(kube, config, namespace, obs, state)
                if acted is None:
                    return None
                p, action_events = acted
                created += action_events
                # Against the status as this version reads it: what it cannot read stays
                # as stored, as it did when status was carried along as a dict.
                patch = status_patch(status_wire(obs.status), status_wire(p.status))
                if patch:
                    try:
                        # No resourceVersion precondition: this operator is the only status
                        # writer and serialises reconciles per object, while kopf's own
                        # metadata patches change the resourceVersion (decision 1202).
                        written = await kube.patch_status(KIND, namespace, name, patch, None)
                    except KubeError as exc:
                        if exc.status == 422:
                            # The server found the status invalid: writing it again cannot
                            # help, so it is not retried as a conflict (kopf backs off).
                            metrics.ftj_status_writes.labels(namespace, "invalid").inc()
                            log.error(
                                "status of %s/%s refused as invalid: %s",
                                namespace,
                                name,
                                exc.message[:500],
                            )
                            raise
                        if exc.status == 409:
                            metrics.ftj_status_writes.labels(namespace, "conflict").inc()
                            log.info(
                                "status write of %s/%s conflicted (%s); retrying",
                                namespace,
                                name,
                                exc.status,
                            )
                            continue
                        raise
                    metrics.ftj_status_writes.labels(namespace, "written").inc()
                    if state is not None:
                        state.watched.remember(written)
                else:
                    metrics.ftj_status_writes.labels(namespace, "skipped").inc()
                _record_metrics(obs, p, body)
                for event in created + (p.events if patch else []):
                    await kube.emit_event(body, event.type, event.reason, event.message)
                return p
            metrics.ftj_errors.labels(namespace, "StatusConflict").inc()
            raise kopf.TemporaryError("status writes kept conflicting; retrying later", delay=2)
        except KubeError as exc:
            # API trouble (5xx, throttling, RBAC): count it and let kopf retry with backoff.
            metrics.ftj_errors.labels(namespace, f"Api{exc.status}").inc()
            delay = min(5.0, config.retry_seconds)
            raise kopf.TemporaryError(f"Kubernetes API error: {exc}", delay=delay) from exc
        finally:
            metrics.ftj_reconcile_seconds.labels(namespace, trigger).observe(
                time.monotonic() - started
            )


async def _read_ftj(
    kube: KubeClient, namespace: str, name: str, state: RunState | None, from_watch: bool
) -> dict[str, Any] | None:
    """The FineTuneJob: from the watch when it shows the version this operator last read or
    wrote, else from the server (which is then the version remembered)."""
    if state is not None and from_watch:
        body = state.watched.fresh_ftj(namespace, name)
        if body is not None:
            return body
    body = await kube.get(KIND, namespace, name)
    if state is not None:
        state.watched.remember(body)
    return body


def _gpu_product(body: Mapping[str, Any]) -> str:
    return str(((body.get("spec") or {}).get("resources") or {}).get("gpuProduct") or "unknown")


def _record_status_metrics(
    namespace: str, name: str, status: FineTuneJobStatus, body: Mapping[str, Any]
) -> str:
    """The series a job's status sets on every reconcile (and a restart restores); its GPU
    product."""
    metrics.set_ftj_phase(namespace, name, status.phase)
    if status.phase == Phase.SUCCEEDED:
        metrics.record_success(namespace, status.completed_at)
    product = _gpu_product(body)
    metrics.see_gpu_product(namespace, product)
    return product


def _record_metrics(obs: Observed, p: Plan, body: Mapping[str, Any]) -> None:
    status = p.status
    product = _record_status_metrics(obs.namespace, obs.name, status, body)
    before, after = is_terminal(obs.status), is_terminal(status)
    if after and not before:
        for gate in status.gates or []:
            metrics.ftj_gate_results.labels(
                obs.namespace, gate.metric, "pass" if gate.passed else "fail"
            ).inc()
        gpu_seconds = float((status.cost.gpu_seconds if status.cost else None) or 0.0)
        metrics.ftj_gpu_seconds.labels(obs.namespace, product).inc(gpu_seconds)
        failed = condition(status, ConditionType.FAILED)
        if failed is not None and failed.status == "True":
            metrics.ftj_errors.labels(obs.namespace, str(failed.reason)).inc()


def _raise_for_outcome(p: Plan | None, config: OperatorConfig) -> None:
    """The one place a plan's outcome becomes kopf's answer (every Outcome member has a case)."""
    if p is None:
        return
    match p.outcome:
        case Outcome.OK:
            return
        case Outcome.PERMANENT:
            raise kopf.PermanentError(p.message)
        case Outcome.RETRY:
            raise kopf.TemporaryError(p.message, delay=config.retry_seconds)
        case _:
            assert_never(p.outcome)


# ---------------------------------------------------------------- handlers


@kopf.on.startup()
async def configure(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    ftj_gpus_in_use: Any = None,
    ftj_watched: Any = None,
    ftj_trainer_jobs: Any = None,
    ftj_trainer_pods: Any = None,
    **_: Any,
) -> None:
    if getattr(memo, "config", None) is None:
        memo.config = load_config()
    memo.ftj_state = RunState()
    start_daemons(memo)
    memo.ftj_state.gpus.index = ftj_gpus_in_use  # kopf's index, kept up to date by kopf
    watched = memo.ftj_state.watched  # kopf's indexes too (decision 1650)
    watched.ftjs, watched.jobs, watched.pods = ftj_watched, ftj_trainer_jobs, ftj_trainer_pods
    # The API server sends only the operator's own Jobs. Pods stay unselected: kopf keeps one
    # watch per resource, and the AdapterDeployment controller needs the serving pods, which
    # carry no label of ours (decision 1520); the trainer-pod index filters on the label.
    settings.watching.label_selectors["batch", "v1", "jobs"] = CHILD_SELECTOR
    if getattr(memo, "kube", None) is None:
        memo.kube = KubeClient.from_environment()
    # Handler progress lives in annotations so status holds only what users read.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="finetune.dev")
    settings.persistence.finalizer = names.FINALIZER
    # Events kopf posts (kopf.info/warn of the AdapterDeployment controller) carry the same
    # source as the FineTuneJob controller's own: one name in `kubectl describe`.
    settings.posting.reporting_component = names.EVENT_SOURCE
    settings.posting.reporting_instance = names.EVENT_SOURCE
    # Pollers of finished jobs return by themselves within this time (see poll_running).
    settings.background.instant_exit_timeout = STOP_RETURN_SECONDS
    # Watched namespaces are known at start: their series exist before any event (decision 1700).
    for namespace in memo.config.watch_namespaces:
        if not any(c in namespace for c in "*?["):
            metrics.see_namespace(namespace)
    if not getattr(memo, "metrics_served", False) and memo.config.metrics_port:
        metrics.serve(memo.config.metrics_port)
        memo.metrics_served = True


# How long the operator, when it stops, lets reconciles under way finish their writes.
SHUTDOWN_GRACE_SECONDS = 5.0


@kopf.on.cleanup()
async def release_client(memo: kopf.Memo, **_: Any) -> None:
    """Close the API client's connections when the operator stops, once the daemons have
    stopped and the reconciles still under way (a poll is shielded from cancellation) have
    written their status."""
    await stop_daemons(memo)
    state = getattr(memo, "ftj_state", None)
    deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
    while state is not None and state.tracked_objects and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    kube = getattr(memo, "kube", None)
    if isinstance(kube, KubeClient):
        await kube.close()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def on_change(
    name: str, namespace: str | None, memo: Any, reason: str, body: kopf.Body, **_: Any
) -> None:
    kube, config = runtime(memo)
    state = run_state(memo)
    if reason == kopf.Reason.RESUME and _resumed_settled(str(namespace), name, body):
        return
    _raise_for_outcome(
        await reconcile(kube, config, str(namespace), name, trigger=str(reason), state=state),
        config,
    )


def _resumed_settled(namespace: str, name: str, body: Mapping[str, Any]) -> bool:
    """Whether the job kopf resumes (an operator start) is a settled run: its trainer ran and
    has a verdict for the current spec, so a reconcile could change nothing. It is then
    neither read again nor reconciled; only the metric series a reconcile would set are set
    (phase, newest success, GPU product; decision 2080). A later spec change is an update,
    reconciled as ever. Jobs that ended before any run started (invalid spec, policy,
    refused) are checked again, since a new operator version or policy may let them start."""
    status = parse_status(body.get("status"))
    generation = int((body.get("metadata") or {}).get("generation") or 1)
    if status.trainer_job is None or not is_settled(status, generation):
        return False
    metrics.see_namespace(namespace)
    _record_status_metrics(namespace, name, status, body)
    return True


# kopf waits this long for a stopped poller to return by itself (it wakes at once; one in a
# reconcile returns when it ends) before it cancels it; a graceful return needs no further
# handling cycle (no extra patch).
STOP_RETURN_SECONDS = 1.0


def poll_interval(config: OperatorConfig, running_jobs: int) -> float:
    """Seconds between two polls of one running job: the configured interval, stretched so
    that all running jobs together are polled at most progress_polls_per_second times a
    second (the API server's load stays bounded however many jobs run; decision 1206)."""
    return max(config.progress_poll_seconds, running_jobs / config.progress_polls_per_second)


def _is_running(status: Mapping[str, Any] | None, **_: Any) -> bool:
    """A run exists and has no verdict yet: the only state worth polling."""
    parsed = parse_status(status)
    return bool(parsed.trainer_job) and not is_terminal(parsed)


@kopf.daemon(
    GROUP,
    VERSION,
    PLURAL,
    when=_is_running,
    cancellation_timeout=5.0,
)
async def poll_running(
    name: str, namespace: str | None, stopped: kopf.DaemonStopped, memo: Any, **_: Any
) -> None:
    """Read a running trainer's progress every :func:`poll_interval`: its log tail, and cost.

    kopf starts this task when a run starts and stops it when the filter no longer holds
    (the job finished, failed or was deleted), so finished jobs cost nothing. Pod states,
    completion and failure come from the watches (:func:`trainer_job_event`,
    :func:`trainer_pod_event`); the poll only reads the log, the one thing no watch
    delivers, and only while the trainer container runs: a pending job costs no request
    (decision 1650).
    """
    kube, config = runtime(memo)
    state = run_state(memo)
    daemons = daemons_of(memo)
    namespace = str(namespace)
    polling = False
    try:
        with daemons.alive():
            while not daemons.asked_to_stop(stopped):
                await daemons.sleep(stopped, poll_interval(config, state.running_pollers))
                if daemons.asked_to_stop(stopped):
                    break
                running = state.watched.trainer_is_running(namespace, name)
                if running != polling:  # the budget counts only jobs whose trainer runs
                    state.running_pollers += 1 if running else -1
                    polling = running
                if not running:
                    continue
                await _poll(kube, config, state, namespace, name)
    finally:
        if polling:
            state.running_pollers -= 1


async def _poll(
    kube: KubeClient, config: OperatorConfig, state: RunState, namespace: str, name: str
) -> None:
    try:
        # Should a cancellation come, it must not cut a reconcile between its status
        # write and its events.
        async with state.poll_slots:
            await asyncio.shield(
                reconcile(
                    kube, config, namespace, name, trigger="poll", state=state, from_watch=True
                )
            )
    except (kopf.TemporaryError, KubeError) as exc:
        log.info("poll of %s/%s deferred: %s", namespace, name, exc)


def _spec_unobserved(meta: Mapping[str, Any], status: Mapping[str, Any] | None, **_: Any) -> bool:
    """No reconcile has written status for the object's current spec generation yet."""
    return parse_status(status).observed_generation != meta.get("generation")


# Between two tries of the safety net below, should a try not get through (API errors).
UNOBSERVED_RETRY_SECONDS = 30.0


@kopf.daemon(
    GROUP,
    VERSION,
    PLURAL,
    id="reconcile-unobserved",
    when=_spec_unobserved,
    cancellation_timeout=5.0,
)
async def reconcile_unobserved(
    name: str, namespace: str | None, stopped: kopf.DaemonStopped, memo: Any, **_: Any
) -> None:
    """Reconcile a job that kopf's handlers left unobserved (decision 1207).

    When two operator instances add the finalizer at once, the loser's retry turns into a
    no-op and kopf then waits for a further change of the object before it runs the create
    handler; nothing else may ever change it. kopf stops this task as soon as a reconcile
    has written ``observedGeneration``, which on the normal path is long before it fires.
    A daemon rather than a kopf timer: its sleep is one the operator's cleanup can end
    (decision 2000).
    """
    kube, config = runtime(memo)
    daemons = daemons_of(memo)
    delay = float(config.unobserved_reconcile_seconds)
    with daemons.alive():
        while True:
            await daemons.sleep(stopped, delay)
            if daemons.asked_to_stop(stopped):
                return
            delay = UNOBSERVED_RETRY_SECONDS
            log.info(
                "%s/%s: no reconcile has observed its spec yet; reconciling now", namespace, name
            )
            try:
                # A cancellation must not cut a reconcile between its status write and events.
                await asyncio.shield(
                    reconcile(
                        kube, config, str(namespace), name, trigger="unobserved",
                        state=run_state(memo),
                    )
                )  # fmt: skip
            except (kopf.TemporaryError, KubeError) as exc:
                log.info("reconcile of unobserved %s/%s deferred: %s", namespace, name, exc)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
async def trainer_job_event(body: kopf.Body, memo: Any, type: str | None, **_: Any) -> None:
    """A trainer Job changed: reconcile its FineTuneJob at once (nothing polls for it)."""
    name = ftj_owner_name(body)
    # None: the initial listing (resume reconciles those jobs); ADDED: the reconcile that made
    # the Job writes its status next, and a new Job has nothing to report yet.
    if name is None or type in (None, "ADDED"):
        return
    await _reconcile_after_event(
        memo, str((body.get("metadata") or {}).get("namespace")), name, "job-event"
    )


@kopf.on.event("", "v1", "pods", labels=CHILD_LABELS)
async def trainer_pod_event(body: kopf.Body, memo: Any, type: str | None, **_: Any) -> None:
    """A trainer pod changed or went: reconcile its FineTuneJob at once.

    Scheduling, image pulls and the trainer's start show here; no poll asks for them
    (decision 1650). Not reconciled: the initial listing (None; the resume handler covers
    those jobs), a new pod (ADDED: nothing to report before the scheduler or the kubelet
    changes it), and a pod whose trainer container has ended: the Job controller records
    that exit in the Job's status next (a Job event), and the run's verdict waits for the
    Job, so a reconcile now would only show a moment in between as a state of its own.
    """
    if type in (None, "ADDED") or (type != "DELETED" and trainer_ended(body)):
        return
    state = run_state(memo)
    name = state.watched.owner_of_pod(body)
    if name is None:  # its Job is not known yet: the Job's own events reconcile
        return
    namespace = str((body.get("metadata") or {}).get("namespace"))
    # They take turns with the polls they replace, so that a burst of pod changes does not
    # queue the first reconcile of new jobs behind it (decision 1200).
    async with state.poll_slots:
        await _reconcile_after_event(memo, namespace, name, "pod-event")


async def _reconcile_after_event(memo: Any, namespace: str, name: str, trigger: str) -> None:
    kube, config = runtime(memo)
    try:
        state = run_state(memo)
        await reconcile(
            kube, config, namespace, name, trigger=trigger, state=state, from_watch=True
        )
    except (kopf.TemporaryError, KubeError) as exc:
        log.info("reconcile of %s/%s after a %s deferred: %s", namespace, name, trigger, exc)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def on_delete(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    """Delete the trainer Job (its pods follow) and ConfigMaps; user volumes are never touched."""
    kube, _config = runtime(memo)
    namespace = str(namespace)
    run_state(memo).gpus.release(namespace, name)  # its GPUs are free for the namespace
    run_state(memo).watched.forget(namespace, name)
    selector = {names.LABEL_JOB: names.label_value(name)}
    # After any reconcile in flight: one that read the object just before its deletion may
    # still be creating children, which this listing must see (fast create/delete).
    async with run_state(memo).serialised(namespace, name):
        for kind in ("Job", "Service", "ConfigMap"):
            for child in await kube.list(kind, namespace, selector):
                owners = (child.get("metadata") or {}).get("ownerReferences") or []
                if any(o.get("kind") == KIND and o.get("name") == name for o in owners):
                    await kube.delete(kind, namespace, child["metadata"]["name"])
    metrics.forget_ftj(namespace, name)
