"""kopf handlers of AdapterDeployment: observe, decide (pure planners), act, write status.

One daemon per AdapterDeployment runs :meth:`Controller.tick` every
``FINETUNE_SERVING_POLL_SECONDS``. A tick is level-based: it reads the object, the
FineTuneJob, the target Deployment and its pods, and moves the rollout one step. What
a rollout is doing lives in status (``current.outcome``, ``canary``), so an operator
restart resumes where it left off; only the previous metrics sample of a canary window
lives in memory (after a restart the next window starts from the pods' totals).

Steps by state:
- idle: resolve the source, check compatibility, start a rollout (Rolling: patch the
  target; Canary: create the canary Deployment; Runtime: load into pods);
- ``canary.revision.outcome == Canary``: wait for the canary pods, then one analysis
  check per ``intervalSeconds``: promote (patch the target) or abort (delete the canary);
- ``current.outcome == Progressing``: track the target rollout (or runtime loads) to
  Available, or roll back to ``previous`` when it fails;
- ``current.outcome == RollingBack``: track the restore;
- steady: report which pods serve which digest; Runtime re-loads the adapter into pods
  that restarted or were added.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import aiohttp
import kopf
from pydantic import ValidationError

from .. import metrics_serving
from ..api.adapterdeployment import PLURAL, AdapterDeploymentSpec, CanaryAnalysis
from ..api.common import GROUP, VERSION, now_rfc3339, set_condition
from ..builders import serving as sb
from ..clients.adapter_store import read_local_manifest
from ..clients.serving_kube import ServingKube, ServingKubeError
from ..clients.vllm import VLLM_LATENCY_BUCKETS, VllmClient, VllmError
from ..planners import adapterdeployment as plan
from ..serving_config import SETTINGS

log = logging.getLogger(__name__)

MAX_PATCH_ATTEMPTS = 8


# ------------------------------------------------------------------ helpers


def merge_patch_diff(old: Any, new: Any) -> Any:
    """The JSON merge patch turning ``old`` into ``new`` (removed keys become null)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    diff: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        diff[key] = None
    for key, value in new.items():
        if key not in old:
            diff[key] = value
        elif old[key] != value:
            diff[key] = merge_patch_diff(old[key], value)
    return diff


def _elapsed(since: str | None) -> float | None:
    start = plan.parse_time(since)
    return None if start is None else (datetime.now(UTC) - start).total_seconds()


def _pod_ready(pod: dict[str, Any]) -> bool:
    st = pod.get("status") or {}
    if st.get("phase") != "Running" or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or []
    )


@dataclass
class _Memory:
    """Per-object state that need not survive a restart."""

    last_check: float = 0.0
    samples: dict[str, plan.MetricsSample] = field(default_factory=dict)


_MEMORY: dict[str, _Memory] = {}


@dataclass
class Tick:
    """One pass over one AdapterDeployment: what was read and the status being built."""

    body: dict[str, Any]
    spec: AdapterDeploymentSpec
    status: dict[str, Any]
    unreachable: bool = False  # a Ready pod did not answer during this tick

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def uid(self) -> str:
        return str(self.body["metadata"].get("uid") or f"{self.namespace}/{self.name}")

    @property
    def generation(self) -> int:
        return int(self.body["metadata"].get("generation") or 0)

    def condition(self, type_: str, status: str, reason: str, message: str = "") -> None:
        self.status["conditions"] = set_condition(
            self.status.get("conditions"),
            type_,
            status,  # type: ignore[arg-type]
            reason,
            message,
            generation=self.generation,
        )

    def phase(self, phase: str) -> None:
        self.status["phase"] = phase

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        try:
            if warning:
                kopf.warn(cast(Any, self.body), reason=reason, message=message)
            else:
                kopf.info(cast(Any, self.body), reason=reason, message=message)
        except Exception:  # events are best effort (no operator context in some tests)
            log.debug("event %s not posted", reason)


# ------------------------------------------------------------------ controller


class Controller:
    def __init__(self, kube: ServingKube, vllm: VllmClient) -> None:
        self.kube = kube
        self.vllm = vllm

    # ---------------------------------------------------------- entry

    async def tick(self, namespace: str, name: str) -> None:
        body = await self.kube.get("AdapterDeployment", namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        before = copy.deepcopy(body.get("status") or {})
        try:
            spec = AdapterDeploymentSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            t = Tick(body, None, copy.deepcopy(before))  # type: ignore[arg-type]
            t.condition("SourceReady", "False", "InvalidSpec", f"spec is invalid: {exc}")
            t.phase("Failed")
            await self._write(t, before)
            return
        t = Tick(body, spec, copy.deepcopy(before))
        metrics_serving.see(namespace, spec.adapter_name, spec.strategy.type)
        current = t.status.get("current") or {}
        canary = t.status.get("canary") or {}
        if current.get("outcome") == "Progressing":
            await self._rollout_step(t)
        elif current.get("outcome") == "RollingBack":
            await self._rollback_step(t)
        elif (canary.get("revision") or {}).get("outcome") == "Canary":
            await self._canary_step(t)
        else:
            await self._idle_step(t)
        t.status["observedGeneration"] = t.generation
        await self._write(t, before)

    async def _write(self, t: Tick, before: dict[str, Any]) -> None:
        diff = merge_patch_diff(before, t.status)
        if diff:
            await self.kube.patch_status("AdapterDeployment", t.namespace, t.name, diff)

    # ---------------------------------------------------------- reading

    async def _source(self, t: Tick) -> plan.SourceResult:
        ref = t.spec.source.fine_tune_job_ref
        ftj = await self.kube.get("FineTuneJob", t.namespace, ref.name) if ref else None
        local = None
        if t.spec.source.uri:
            local = await asyncio.to_thread(read_local_manifest, t.spec.source.uri)
        src = plan.resolve_source(t.spec, ftj, local)
        src = plan.resolve_desired(t.spec, t.status, src)
        t.condition("SourceReady", "True" if src.ok else "False", src.reason, src.message)
        return src

    async def _target(self, t: Tick) -> dict[str, Any] | None:
        return await self.kube.get("Deployment", t.namespace, t.spec.target.deployment)

    def _endpoint(self, pod: dict[str, Any], port: int) -> str | None:
        return SETTINGS.endpoint_resolver(pod, port)

    async def _pods(
        self, t: Tick, deployment: dict[str, Any], canary: bool
    ) -> list[dict[str, Any]]:
        selector = dict(
            ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        )
        pods = await self.kube.list_objects("Pod", t.namespace, selector)
        if not canary:
            pods = [
                p
                for p in pods
                if sb.CANARY_LABEL not in ((p.get("metadata") or {}).get("labels") or {})
            ]
        return sorted(pods, key=lambda p: str(p["metadata"]["name"]))

    # ---------------------------------------------------------- patching the target

    async def _patch_target(
        self, t: Tick, ref: sb.AdapterRef | None, changes: sb.ServerArgChanges | None = None
    ) -> None:
        """Apply this adapter's entries to the target; on a lost race re-read and retry."""
        name = t.spec.target.deployment
        for attempt in range(MAX_PATCH_ATTEMPTS):
            dep = await self.kube.get("Deployment", t.namespace, name)
            if dep is None:
                raise kopf.TemporaryError(f"Deployment {name} not found", delay=5)
            ops = sb.rollout_patch(
                dep, t.spec.target.container, t.spec.adapter_name, ref,
                owner=t.name, fetch_image=SETTINGS.fetch_image, changes=changes,
            )  # fmt: skip
            if not sb.patch_changes_anything(ops):
                return
            try:
                await self.kube.json_patch("Deployment", t.namespace, name, ops)
                return
            except ServingKubeError as exc:
                if not exc.conflict:
                    raise
                log.info("Deployment %s changed under us (attempt %d); retrying", name, attempt + 1)
                await asyncio.sleep(0.05 * (attempt + 1))
        raise kopf.TemporaryError(f"Deployment {name} kept changing; will retry", delay=2)

    # ---------------------------------------------------------- idle: start a rollout

    async def _idle_step(self, t: Tick) -> None:
        src = await self._source(t)
        current = t.status.get("current")
        target = await self._target(t)
        if not src.ok or src.ref is None:
            if not current:
                t.phase("Pending" if src.reason == "FineTuneJobNotFinished" else "Failed")
            await self._steady(t, target)
            return
        ref = src.ref
        if current and plan.same_adapter(current, ref):
            await self._steady(t, target)
            return
        if plan.already_rejected(t.status, ref, t.generation):
            await self._steady(t, target)
            return
        compat = plan.check_compatible(t.spec, t.name, target, ref)
        if compat.ok and t.spec.strategy.type == "Runtime" and target is not None:
            where = plan.runtime_path(target, t.spec.target.container, ref)
            if not where.ok:
                compat = plan.CompatResult(False, where.reason, where.message)
        t.condition("Compatible", "True" if compat.ok else "False", compat.reason, compat.message)
        if not compat.ok or target is None:
            if not current or current.get("outcome") != "Available":
                t.phase("Failed")
            await self._steady(t, target)
            return
        rev = plan.new_revision(t.status, ref, now_rfc3339())
        strategy = t.spec.strategy.type
        if strategy == "Canary":
            await self._start_canary(t, target, ref, rev, compat.changes)
            return
        if strategy == "Rolling":
            await self._patch_target(t, ref, compat.changes)
        self._make_current(t, rev)
        t.phase("Progressing")
        how = (
            "loading into the serving pods"
            if strategy == "Runtime"
            else f"rolling out to Deployment {t.spec.target.deployment}"
        )
        msg = f"revision {rev['revision']} ({ref.digest[:19]}…): {how}"
        t.condition("Progressing", "True", "RolloutStarted", msg)
        t.event("RolloutStarted", msg)
        if strategy == "Runtime":
            await self._rollout_step(t)

    def _make_current(self, t: Tick, rev: dict[str, Any]) -> None:
        old = t.status.get("current")
        if old:
            old = {**old, "outcome": "Superseded"} if old.get("outcome") == "Available" else old
            t.status["previous"] = old
            t.status["history"] = plan.record_history(t.status.get("history"), old)
        t.status["current"] = rev
        t.status["history"] = plan.record_history(t.status.get("history"), rev)
        t.status["rolloutStartedAt"] = rev["deployedAt"]

    # ---------------------------------------------------------- canary

    async def _start_canary(
        self, t: Tick, target: dict[str, Any], ref: sb.AdapterRef, rev: dict[str, Any],
        changes: sb.ServerArgChanges,
    ) -> None:  # fmt: skip
        canary_spec = t.spec.strategy.canary
        replicas = canary_spec.replicas if canary_spec else 1
        body = sb.canary_deployment(
            target, t.body, t.spec.target.container, ref,
            replicas=replicas, fetch_image=SETTINGS.fetch_image, changes=changes,
        )  # fmt: skip
        name = body["metadata"]["name"]
        if await self.kube.get("Deployment", t.namespace, name) is not None:
            await self.kube.delete("Deployment", t.namespace, name)  # a stale canary
        await self.kube.create(body)
        rev = {**rev, "outcome": "Canary"}
        t.status["canary"] = {
            "revision": rev,
            "deployment": name,
            "checksPassed": 0,
            "startedAt": rev["deployedAt"],
        }
        t.status["history"] = plan.record_history(t.status.get("history"), rev)
        _MEMORY[t.uid] = _Memory()
        t.phase("Progressing")
        msg = f"revision {rev['revision']}: canary Deployment {name} with {replicas} replica(s)"
        t.condition("Progressing", "True", "CanaryStarted", msg)
        t.event("CanaryStarted", msg)

    async def _canary_step(self, t: Tick) -> None:
        canary = t.status["canary"]
        rev = canary["revision"]
        src = await self._source(t)
        if src.ok and src.ref is not None and not plan.same_adapter(rev, src.ref):
            await self._abort_canary(
                t, "Superseded", "the spec asks for another adapter now", rollback=False
            )
            return
        dep = await self.kube.get("Deployment", t.namespace, canary["deployment"])
        deadline = t.spec.strategy.progress_deadline_seconds
        # A canary that was serving and lost its pods mid-analysis (node failure, eviction)
        # gets the progress deadline again from that moment, not from when it started.
        lost_since = canary.get("unavailableSince")
        was_serving = lost_since is not None or t.status.get("phase") == "Analyzing"
        now = datetime.now(UTC)
        started_at = (lost_since or now_rfc3339()) if was_serving else canary.get("startedAt")
        view = plan.deployment_rollout(
            dep, t.spec.adapter_name, rev["digest"], started_at=started_at,
            deadline_seconds=deadline, now=now,
        )  # fmt: skip
        if view.state == "Failed" and was_serving and dep is not None:
            await self._abort_canary(
                t, "CanaryUnavailable",
                f"the canary lost its ready pods during analysis and did not recover within "
                f"{deadline}s (strategy.progressDeadlineSeconds): {view.message}",
            )  # fmt: skip
            return
        if view.state == "Failed":
            await self._abort_canary(
                t, view.reason, f"the canary did not become ready: {view.message}"
            )
            return
        if view.state == "InProgress" and was_serving:
            if lost_since is None:
                canary["unavailableSince"] = started_at
                t.event(
                    "CanaryUnavailable",
                    f"the canary lost its ready pods ({view.message}); analysis pauses for up "
                    f"to {deadline}s",
                    warning=True,
                )
            t.condition(
                "Progressing", "True", "CanaryUnavailable",
                f"analysis paused since {started_at}: {view.message}",
            )  # fmt: skip
            return
        if view.state == "InProgress":
            t.phase("Progressing")
            t.condition("Progressing", "True", "CanaryStarting", view.message)
            return
        assert dep is not None
        if canary.pop("unavailableSince", None) is not None:
            t.condition("Progressing", "True", "Analyzing", "the canary is ready again")
        t.phase("Analyzing")
        analysis = (
            t.spec.strategy.canary.analysis if t.spec.strategy.canary else None
        ) or CanaryAnalysis()
        mem = _MEMORY.setdefault(t.uid, _Memory())
        if mem.last_check and time.monotonic() - mem.last_check < analysis.interval_seconds:
            return
        mem.last_check = time.monotonic()
        pods = [p for p in await self._pods(t, dep, canary=True) if _pod_ready(p)]
        endpoints = {p["metadata"]["name"]: self._endpoint(p, t.spec.target.port) for p in pods}
        live = {pod: ep for pod, ep in endpoints.items() if ep}
        if not live:
            return
        window_parts = []
        for pod, ep in live.items():
            try:
                sample = await self.vllm.metrics(ep)
            except VllmError as exc:
                log.info("canary metrics from %s failed: %s", pod, exc)
                continue
            window_parts.append(plan.sample_delta(mem.samples.get(pod), sample))
        eps = list(live.values())
        smoke = await asyncio.gather(
            *(
                self.vllm.smoke(eps[i % len(eps)], t.spec.adapter_name, analysis.smoke_prompt)
                for i in range(analysis.smoke_requests)
            )
        )
        # The window closes after the smoke requests so they count in the next sample's base.
        for pod, ep in live.items():
            try:
                mem.samples[pod] = await self.vllm.metrics(ep)
            except VllmError:
                mem.samples.pop(pod, None)
        window = plan.sum_samples(window_parts)
        # Smoke requests are judged by their own results; add them to the window's counts.
        window.requests += len(smoke)
        window.errors += sum(1 for s in smoke if not s.ok)
        for s in smoke:
            if s.ok:
                _observe(window, s.latency_ms / 1000.0)
        decision = plan.decide_canary(
            analysis, window, list(smoke), int(canary.get("checksPassed") or 0)
        )
        canary["checksPassed"] = decision.checks_passed
        canary["requests"] = int(canary.get("requests") or 0) + decision.requests
        if decision.error_rate is not None:
            canary["errorRate"] = round(decision.error_rate, 4)
        if decision.latency_p95_ms is not None:
            canary["latencyP95Ms"] = round(decision.latency_p95_ms, 1)
        if decision.action == "abort":
            await self._abort_canary(t, decision.reason, decision.message)
            return
        if decision.action == "continue":
            t.condition("Progressing", "True", decision.reason, decision.message)
            return
        # Promote: the target gets the adapter through the same guarded patch as Rolling.
        ref = plan.revision_ref(t.spec.adapter_name, rev)
        target = await self._target(t)
        compat = plan.check_compatible(t.spec, t.name, target, ref)
        await self._patch_target(t, ref, compat.changes if compat.ok else None)
        canary["revision"] = {**rev, "outcome": "Promoted"}
        self._make_current(t, {**rev, "outcome": "Progressing", "deployedAt": now_rfc3339()})
        t.phase("Progressing")
        t.condition("Progressing", "True", "CanaryPromoted", decision.message)
        t.event("CanaryPromoted", f"revision {rev['revision']}: {decision.message}")

    async def _abort_canary(
        self, t: Tick, reason: str, message: str, rollback: bool = True
    ) -> None:
        canary = t.status["canary"]
        rev = canary["revision"]
        if canary.get("deployment"):
            await self.kube.delete("Deployment", t.namespace, canary["deployment"])
        canary.pop("deployment", None)
        outcome = "CanaryAborted" if rollback else "Superseded"
        canary["revision"] = {**rev, "outcome": outcome}
        t.status["history"] = plan.record_history(t.status.get("history"), canary["revision"])
        _MEMORY.pop(t.uid, None)
        if not rollback:
            t.condition("Progressing", "False", reason, message)
            return
        metrics_serving.ROLLBACKS.labels(t.namespace, t.spec.adapter_name, reason).inc()
        started = _elapsed(canary.get("startedAt"))
        if started is not None:
            metrics_serving.ROLLOUT_DURATION.labels(t.namespace, "Canary", "Aborted").observe(
                started
            )
        msg = f"revision {rev['revision']} not promoted: {message}"
        t.phase("RolledBack")
        t.condition("Progressing", "False", reason, msg)
        t.condition("Degraded", "True", reason, msg)
        t.event(reason, msg, warning=True)

    # ---------------------------------------------------------- rollout tracking

    async def _observe_rollout(self, t: Tick) -> tuple[plan.RolloutView, dict[str, Any] | None]:
        """Where the current revision's rollout stands: its pods for Runtime, else the
        target Deployment (returned too, for callers that list its pods)."""
        current = t.status["current"]
        deadline = t.spec.strategy.progress_deadline_seconds
        if t.spec.strategy.type == "Runtime":
            return await self._runtime_step(t, current, deadline), None
        dep = await self._target(t)
        view = plan.deployment_rollout(
            dep, t.spec.adapter_name, current["digest"], started_at=t.status.get("rolloutStartedAt"),
            deadline_seconds=deadline, now=datetime.now(UTC),
        )  # fmt: skip
        t.status["readyReplicas"] = view.ready_replicas
        return view, dep

    async def _rollout_step(self, t: Tick) -> None:
        current = t.status["current"]
        view, dep = await self._observe_rollout(t)
        if dep is not None:
            t.status["pods"] = await self._pods_by_annotation(t, dep)
        if view.state == "InProgress":
            t.phase("Progressing")
            t.condition("Progressing", "True", view.reason, view.message)
            return
        if view.state == "Complete":
            await self._complete(t, current, view)
            return
        await self._rollback(t, current, view)

    async def _complete(self, t: Tick, current: dict[str, Any], view: plan.RolloutView) -> None:
        current["outcome"] = "Available"
        t.status["history"] = plan.record_history(t.status.get("history"), current)
        await self._drop_canary(t)
        msg = f"revision {current['revision']} ({current['digest'][:19]}…) serves as {t.spec.adapter_name}: {view.message}"
        t.phase("Available")
        t.condition("Available", "True", "RolloutComplete", msg)
        t.condition("Progressing", "False", "RolloutComplete", msg)
        t.condition("Degraded", "False", "AsExpected", "")
        metrics_serving.set_served(
            t.namespace, t.spec.adapter_name, current["digest"], t.spec.target.deployment
        )
        started = _elapsed(t.status.get("rolloutStartedAt"))
        if started is not None:
            metrics_serving.ROLLOUT_DURATION.labels(
                t.namespace, t.spec.strategy.type, "Available"
            ).observe(started)
        t.event("RolloutComplete", msg)

    async def _rollback(self, t: Tick, failed: dict[str, Any], view: plan.RolloutView) -> None:
        strategy = t.spec.strategy.type
        started = _elapsed(t.status.get("rolloutStartedAt"))
        await self._drop_canary(t)
        if not t.spec.rollback.automatic:
            failed["outcome"] = "Failed"
            t.status["history"] = plan.record_history(t.status.get("history"), failed)
            msg = f"revision {failed['revision']} failed: {view.message} (rollback.automatic is off: fix the servers or set another adapter)"
            t.phase("Degraded")
            t.condition("Progressing", "False", view.reason, msg)
            t.condition("Degraded", "True", view.reason, msg)
            t.event(view.reason, msg, warning=True)
            if started is not None:
                metrics_serving.ROLLOUT_DURATION.labels(t.namespace, strategy, "Failed").observe(
                    started
                )
            return
        failed["outcome"] = "RolledBack"
        t.status["history"] = plan.record_history(t.status.get("history"), failed)
        previous = t.status.get("previous")
        prev_ref = plan.revision_ref(t.spec.adapter_name, previous) if previous else None
        if strategy != "Runtime":
            await self._patch_target(t, prev_ref)
        t.status["previous"] = failed
        t.status["rolloutStartedAt"] = now_rfc3339()
        if previous:
            t.status["current"] = {**previous, "outcome": "RollingBack"}
            restored = f"restoring revision {previous['revision']}"
        else:
            t.status.pop("current", None)
            restored = "no earlier revision: the adapter is removed from the servers"
            t.condition("Available", "False", "NoAdapterServed", restored)
        msg = (
            f"revision {failed['revision']} rolled back ({view.reason}: {view.message}); {restored}"
        )
        t.phase("RolledBack")
        t.condition("Degraded", "True", view.reason, msg)
        t.condition(
            "Progressing",
            "True" if previous else "False",
            "RollingBack" if previous else "RolledBack",
            msg,
        )
        metrics_serving.ROLLBACKS.labels(t.namespace, t.spec.adapter_name, view.reason).inc()
        if started is not None:
            metrics_serving.ROLLOUT_DURATION.labels(t.namespace, strategy, "RolledBack").observe(
                started
            )
        t.event("RolledBack", msg, warning=True)
        if strategy == "Runtime" and not previous:
            await self._runtime_apply(t, None, None)

    async def _rollback_step(self, t: Tick) -> None:
        current = t.status["current"]
        view, _ = await self._observe_rollout(t)
        if view.state == "Complete":
            current["outcome"] = "Available"
            t.status["history"] = plan.record_history(t.status.get("history"), current)
            msg = f"revision {current['revision']} restored: {view.message}"
            t.condition("Available", "True", "PreviousRevisionRestored", msg)
            t.condition("Progressing", "False", "RolledBack", msg)
            metrics_serving.set_served(
                t.namespace, t.spec.adapter_name, current["digest"], t.spec.target.deployment
            )
        elif view.state == "Failed":
            current["outcome"] = "Failed"
            msg = f"restoring revision {current['revision']} failed too: {view.message}; fix the serving Deployment"
            t.phase("Degraded")
            t.condition("Degraded", "True", "RollbackFailed", msg)
            t.condition("Progressing", "False", "RollbackFailed", msg)
            t.condition("Available", "False", "RollbackFailed", msg)

    async def _drop_canary(self, t: Tick) -> None:
        canary = t.status.get("canary")
        if canary and canary.get("deployment"):
            await self.kube.delete("Deployment", t.namespace, canary["deployment"])
            canary.pop("deployment", None)

    # ---------------------------------------------------------- steady state

    async def _steady(self, t: Tick, target: dict[str, Any] | None) -> None:
        current = t.status.get("current")
        if not current or current.get("outcome") != "Available" or target is None:
            return
        if t.spec.strategy.type == "Runtime":
            ref = plan.revision_ref(t.spec.adapter_name, current)
            where = plan.runtime_path(target, t.spec.target.container, ref)
            if where.ok:
                errors = await self._runtime_apply(t, current["digest"], where.message)
                if errors:
                    t.condition("Degraded", "True", "ReloadFailed", "; ".join(errors)[:1000])
            return
        t.status["pods"] = await self._pods_by_annotation(t, target)
        available = int((target.get("status") or {}).get("availableReplicas") or 0)
        t.status["readyReplicas"] = sum(
            1 for p in t.status["pods"] if p.get("digest") == current["digest"]
        )
        annotations = ((target["spec"].get("template") or {}).get("metadata") or {}).get(
            "annotations"
        ) or {}
        if annotations.get(sb.digest_annotation(t.spec.adapter_name)) != current["digest"]:
            t.condition(
                "Available", "False", "AdapterRemovedFromTarget",
                f"Deployment {t.spec.target.deployment} no longer carries revision {current['revision']} "
                "(was its pod template replaced, e.g. by a GitOps sync?); change the AdapterDeployment's "
                "spec to roll it out again",
            )  # fmt: skip
        elif available == 0:
            t.condition(
                "Available", "False", "NoReplicasAvailable", "the target has no available replicas"
            )
        else:
            t.condition("Available", "True", "RolloutComplete", f"{available} replica(s) available")

    async def _pods_by_annotation(self, t: Tick, dep: dict[str, Any]) -> list[dict[str, Any]]:
        """Which ready pod serves which digest: pods carry their template's annotations."""
        key = sb.digest_annotation(t.spec.adapter_name)
        out = []
        for pod in await self._pods(t, dep, canary=False):
            if _pod_ready(pod):
                digest = ((pod["metadata"].get("annotations")) or {}).get(key)
                out.append(
                    {"pod": pod["metadata"]["name"], **({"digest": digest} if digest else {})}
                )
        return out

    # ---------------------------------------------------------- runtime loading

    async def _runtime_step(self, t: Tick, rev: dict[str, Any], deadline: int) -> plan.RolloutView:
        target = await self._target(t)
        if target is None:
            return plan.RolloutView(
                "Failed", "TargetNotFound", f"Deployment {t.spec.target.deployment} not found"
            )
        ref = plan.revision_ref(t.spec.adapter_name, rev)
        where = plan.runtime_path(target, t.spec.target.container, ref)
        if not where.ok:
            return plan.RolloutView("Failed", where.reason, where.message)
        errors = await self._runtime_apply(t, rev["digest"], where.message, permanent_only=True)
        if errors:
            return plan.RolloutView(
                "Failed", "LoadFailed", "; ".join(errors)[:1000], t.status.get("readyReplicas") or 0
            )
        serving = t.status.get("readyReplicas") or 0
        ready_pods = len([p for p in t.status.get("pods") or []])
        if ready_pods and serving == ready_pods and not t.unreachable:
            return plan.RolloutView(
                "Complete",
                "RolloutComplete",
                f"{serving}/{ready_pods} ready pods serve it",
                serving,
            )
        elapsed = _elapsed(t.status.get("rolloutStartedAt"))
        if elapsed is not None and elapsed > deadline:
            return plan.RolloutView(
                "Failed", "RolloutDeadlineExceeded",
                f"only {serving}/{ready_pods} ready pods serve it after {deadline}s", serving,
            )  # fmt: skip
        return plan.RolloutView(
            "InProgress", "Loading", f"{serving}/{ready_pods} ready pods serve it", serving
        )

    async def _runtime_apply(
        self, t: Tick, digest: str | None, path: str | None, permanent_only: bool = False
    ) -> list[str]:
        """Bring every Ready pod to ``digest`` (None: unload). Returns errors worth failing for."""
        target = await self._target(t)
        if target is None:
            return []
        name = t.spec.adapter_name
        pods = [p for p in await self._pods(t, target, canary=False) if _pod_ready(p)]
        views: list[plan.PodView] = []
        endpoints: dict[str, str] = {}
        for pod in pods:
            pod_name = pod["metadata"]["name"]
            ep = self._endpoint(pod, t.spec.target.port)
            loaded: dict[str, str] | None = None
            if ep:
                endpoints[pod_name] = ep
                try:
                    loaded = await self.vllm.loaded_adapters(ep)
                except VllmError as exc:
                    log.info("pod %s: %s", pod_name, exc)
            views.append(plan.PodView(pod_name, True, ep, loaded))
        recorded = {p["pod"]: p.get("digest") for p in t.status.get("pods") or []}
        runtime = plan.plan_runtime(views, name, digest, recorded)
        serving = dict(runtime.serving)
        loaded_paths = {v.name: (v.loaded or {}).get(name) for v in views}
        errors: list[str] = []
        for action in runtime.actions:
            ep = endpoints[action.pod]
            try:
                # A reload from a new path swaps the weights in place where vLLM can
                # (load_inplace); from the same path vLLM would keep prefix-cache blocks of
                # the old weights, so that one unloads first (a new adapter id).
                in_place = action.action == "reload" and loaded_paths.get(action.pod) != path
                if action.action == "unload" or (action.action == "reload" and not in_place):
                    await self.vllm.unload_adapter(ep, name)
                if action.action in ("load", "reload"):
                    assert path is not None
                    await self.vllm.load_adapter(ep, name, path, replace=in_place)
                    t.event("AdapterLoaded", f"pod {action.pod}: loaded {name} ({digest})")
            except VllmError as exc:
                serving[action.pod] = None
                if exc.permanent or not permanent_only:
                    errors.append(f"pod {action.pod}: {exc.message}")
                log.info("pod %s: %s %s failed: %s", action.pod, action.action, name, exc)
        t.status["pods"] = [
            {"pod": p, **({"digest": d} if d else {})} for p, d in sorted(serving.items())
        ]
        t.status["readyReplicas"] = sum(1 for d in serving.values() if d and d == digest)
        t.unreachable = any(v.loaded is None for v in views)
        return errors

    # ---------------------------------------------------------- deletion

    async def remove(self, body: dict[str, Any]) -> None:
        """Take the adapter out of the target (its entries only) and drop the canary."""
        try:
            spec = AdapterDeploymentSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            return
        t = Tick(body, spec, copy.deepcopy(dict(body.get("status") or {})))
        await self._drop_canary(t)
        canary_name = sb.canary_name(t.name)
        await self.kube.delete("Deployment", t.namespace, canary_name)
        target = await self._target(t)
        if target is None:
            return
        if spec.strategy.type == "Runtime":
            await self._runtime_apply(t, None, None)
        else:
            owner = ((target["metadata"].get("annotations")) or {}).get(
                sb.owner_annotation(spec.adapter_name)
            )
            if owner == t.name:
                await self._patch_target(t, None)
        metrics_serving.set_served(t.namespace, spec.adapter_name, None, spec.target.deployment)


def _observe(sample: plan.MetricsSample, seconds: float) -> None:
    """Add one latency observation to a window's cumulative buckets."""
    if not sample.latency_buckets:
        sample.latency_buckets = dict.fromkeys([*VLLM_LATENCY_BUCKETS, float("inf")], 0.0)
    for le in list(sample.latency_buckets):
        if seconds <= le:
            sample.latency_buckets[le] = sample.latency_buckets.get(le, 0.0) + 1
    sample.latency_count += 1


# ------------------------------------------------------------------ kopf wiring


def _kube() -> ServingKube:
    return ServingKube.from_environment()


@kopf.daemon(GROUP, VERSION, PLURAL, id="serve-adapter", cancellation_timeout=5.0)
async def serve_adapter(
    namespace: str | None, name: str, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    """The reconcile loop of one AdapterDeployment."""
    assert namespace is not None  # AdapterDeployment is namespaced
    kube = _kube()
    async with aiohttp.ClientSession() as session:
        controller = Controller(kube, VllmClient(session, SETTINGS.http_timeout_seconds))
        try:
            await _serve_until_stopped(controller, namespace, name, stopped)
        finally:
            await kube.close()


async def _serve_until_stopped(
    controller: Controller, namespace: str, name: str, stopped: kopf.DaemonStopped
) -> None:
    while not stopped:
        try:
            await controller.tick(namespace, name)
        except kopf.TemporaryError as exc:
            log.info("%s/%s: %s", namespace, name, exc)
        except (ServingKubeError, VllmError, aiohttp.ClientError, OSError) as exc:
            log.warning("%s/%s: tick failed, will retry: %s", namespace, name, exc)
        except Exception:  # keep reconciling: one bad pass must not stop the loop
            log.exception("%s/%s: unexpected error; will retry", namespace, name)
        await stopped.wait(SETTINGS.poll_seconds)


@kopf.on.delete(GROUP, VERSION, PLURAL, id="remove-adapter")
async def remove_adapter(body: kopf.Body, **_: Any) -> None:
    kube = _kube()
    async with aiohttp.ClientSession() as session:
        controller = Controller(kube, VllmClient(session, SETTINGS.http_timeout_seconds))
        try:
            await controller.remove(dict(body))
        finally:
            await kube.close()
