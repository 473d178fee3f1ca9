"""kopf wiring of the AdapterDeployment controller: observe, plan (pure), act, write status.

Each AdapterDeployment has one small task (a kopf daemon) that sleeps until something it
depends on changes. kopf watches keep six in-memory caches (indexes): the
AdapterDeployments' references, Deployments, which ConfigMaps their vLLM servers read,
their pods, FineTuneJobs and the champions of FineTuneSchedules. A change of the object, of
its FineTuneJob, of its schedule's champion, of the target or canary Deployment, of one of
their pods or of the data of a ConfigMap the target's server reads wakes the task; it then
observes from the caches (reading only those ConfigMaps by name), runs the pure
:func:`~finetune_operator.planners.adapterdeployment_plan.plan`, carries out the actions
and writes status as one diff (nothing when nothing changed). Serving pods are called
only while a rollout, a canary analysis or a runtime load is under way; only then does
the task also wake on a timer (``servingPollSeconds``). An idle or failed
AdapterDeployment costs no request at all (decision 1520).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import aiohttp
import kopf
from pydantic import ValidationError

from .. import metrics_serving
from ..api.adapterdeployment import PLURAL, AdapterDeploymentSpec, AdapterDeploymentStatus
from ..api.common import GROUP, VERSION
from ..api.finetuneschedule import PLURAL as SCHEDULE_PLURAL
from ..api.status_patch import FOREIGN_STATUS_KEYS, status_patch
from ..builders import names
from ..builders import serving as sb
from ..clients.adapter_store import read_local_manifest
from ..clients.kube import KubeClient, KubeError
from ..clients.serving_kube import ServingKube
from ..clients.vllm import (
    VllmClient,
    VllmError,
    VllmErrorKind,
    parse_lora_requests_info,
    parse_metrics,
)
from ..config import OperatorConfig, load_config
from ..planners import adapterdeployment as rules
from ..planners import adapterdeployment_plan as ad
from ..serving import vllm_server
from ..serving.serving_config import annotation_endpoint, pod_ip_endpoint
from .daemon_stop import Daemons, daemons_of, start_daemons, stop_daemons

log = logging.getLogger(__name__)

KIND = "AdapterDeployment"
MAX_PATCH_ATTEMPTS = 8
# Passes in a row that ask to look again at once, before the poll interval applies anyway.
MAX_IMMEDIATE_PASSES = 20
# How long kopf waits for a stopped task to return by itself (a sleeping one wakes at once;
# one in a pass returns when the pass ends) before it cancels it.
STOP_RETURN_SECONDS = 1.0
# How long the operator, when it stops, lets passes under way finish their writes.
SHUTDOWN_GRACE_SECONDS = 5.0
POD_TEMPLATE_HASH = "pod-template-hash"

Marker = tuple[str, int, str | None]
T = TypeVar("T")
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------ state in kopf's memo


@dataclass
class Memory:
    """What one AdapterDeployment's task keeps between passes (lost on restart, by design:
    after a restart the next canary window starts from the pods' totals, and Runtime pods
    are asked once what they serve)."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    written: dict[str, Any] | None = None  # the object as our last status write returned it
    verified: dict[str, Marker] = field(default_factory=dict)  # pod -> marker when confirmed
    # pod -> (marker, digest, vLLM's reason, whether the key was refused) of a final refusal
    load_errors: dict[str, tuple[Marker, str, str, bool]] = field(default_factory=dict)
    last_check: datetime | None = None
    samples: dict[str, rules.MetricsSample] = field(default_factory=dict)
    failures: int = 0
    # Deployments this task just wrote: name -> resourceVersion of the write (None: deleted).
    # The next pass waits until the watch caches caught up, so it never plans from a
    # Deployment as it was before its own write.
    expected: dict[str, str | None] = field(default_factory=dict)


class ServingState:
    """The controller's per-run state (memo.serving): memories, one HTTP session, the clock."""

    def __init__(self, clock: Clock = utc_now) -> None:
        self.memories: dict[tuple[str, str], Memory] = {}
        # What followers read of each FineTuneSchedule, as last seen: only a change wakes them.
        self.schedules: dict[tuple[str, str], dict[str, Any]] = {}
        # A digest of the data of each ConfigMap a serving Deployment's vLLM server reads, as
        # last seen: only a change of its data wakes the AdapterDeployments.
        self.configmaps: dict[tuple[str, str], str] = {}
        self.session: aiohttp.ClientSession | None = None
        self.clock = clock
        self.stopping = False  # set at cleanup: no new HTTP session after the last is closed
        self.passes: set[asyncio.Task[Any]] = set()  # passes under way

    async def run_pass(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a pass that a cancellation of its task does not cut between its actions and
        its status write; the cleanup waits for it before closing the HTTP session."""
        task = asyncio.ensure_future(work)
        self.passes.add(task)
        task.add_done_callback(self._pass_ended)
        return await asyncio.shield(task)

    def _pass_ended(self, task: asyncio.Task[Any]) -> None:
        self.passes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Its task was cancelled meanwhile (the operator stops): nobody else will say it.
            log.debug("a pass ended with %r", task.exception())

    def memory(self, namespace: str, name: str) -> Memory:
        return self.memories.setdefault((namespace, name), Memory())

    def wake(self, keys: Iterable[tuple[str, str]]) -> None:
        for key in keys:
            memory = self.memories.get(key)
            if memory is not None:
                memory.wake.set()

    def client(self, config: OperatorConfig) -> VllmClient:
        """A vLLM client on the shared session, without a key (see with_api_key)."""
        return VllmClient(self.http(), config.serving_http_timeout_seconds)

    def http(self) -> aiohttp.ClientSession:
        if self.stopping:
            raise Unfinished("the operator is stopping")
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession()
        return self.session


def runtime(memo: kopf.Memo) -> tuple[KubeClient, OperatorConfig, ServingState]:
    kube: KubeClient | None = getattr(memo, "kube", None)
    config: OperatorConfig | None = getattr(memo, "config", None)
    state = _serving(memo)
    if kube is None or config is None or state is None:
        raise kopf.TemporaryError("operator is still starting", delay=1)
    return kube, config, state


def _serving(memo: kopf.Memo) -> ServingState | None:
    """The state made at startup in the memo (None until then)."""
    state: ServingState | None = getattr(memo, "serving", None)
    return state


@kopf.on.startup()
async def configure_serving(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "config", None) is None:
        memo.config = load_config()
    if getattr(memo, "kube", None) is None:
        memo.kube = KubeClient.from_environment()
    if getattr(memo, "serving", None) is None:
        memo.serving = ServingState()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="finetune.dev")
    settings.persistence.finalizer = names.FINALIZER
    start_daemons(memo)
    if settings.background.instant_exit_timeout is None:
        settings.background.instant_exit_timeout = STOP_RETURN_SECONDS


@kopf.on.cleanup()
async def release_serving(memo: kopf.Memo, **_: Any) -> None:
    """Close the HTTP session once the tasks have stopped and their passes have ended."""
    await stop_daemons(memo)
    state = _serving(memo)
    if state is not None:
        if state.passes:
            await asyncio.wait(set(state.passes), timeout=SHUTDOWN_GRACE_SECONDS)
        state.stopping = True
        if state.session is not None:
            await state.session.close()
    kube = getattr(memo, "kube", None)
    # The FineTuneJob controller closes the shared client when it runs in this operator.
    if getattr(memo, "ftj_state", None) is None and isinstance(kube, KubeClient):
        await kube.close()


# Posts a Kubernetes Event about the AdapterDeployment: (type, reason, message).
Poster = Callable[[str, str, str], None]

# ------------------------------------------------------------------ caches (kopf indexes)

# (namespace, name) -> the slim JSON of the objects of that name (of a Deployment, for pods).
ObjectKey = tuple[str | None, str]
ObjectIndex = kopf.Index[ObjectKey, dict[str, Any]]
# (kind, namespace, name) of a dependency -> the AdapterDeployments that depend on it.
RefKey = tuple[str, str | None, str]


def _slim_deployment(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "metadata": {
            k: meta[k]
            for k in (
                "name",
                "namespace",
                "uid",
                "generation",
                "resourceVersion",
                "annotations",
                "labels",
            )
            if k in meta
        },
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def owning_deployment(pod: Mapping[str, Any]) -> str | None:
    """The Deployment whose ReplicaSet controls the pod (``<deployment>-<pod-template-hash>``)."""
    meta = pod.get("metadata") or {}
    template_hash = (meta.get("labels") or {}).get(POD_TEMPLATE_HASH)
    for owner in meta.get("ownerReferences") or []:
        if owner.get("controller") and owner.get("kind") == "ReplicaSet" and template_hash:
            name = str(owner.get("name") or "")
            if name.endswith(f"-{template_hash}"):
                return name[: -len(template_hash) - 1]
    return None


def _slim_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    return {
        "metadata": {
            k: meta[k]
            for k in ("name", "uid", "annotations", "labels", "deletionTimestamp")
            if k in meta
        },
        "spec": {"hostNetwork": bool((pod.get("spec") or {}).get("hostNetwork"))},
        "status": {
            k: status[k]
            for k in ("phase", "conditions", "podIP", "containerStatuses")
            if k in status
        },
    }


@kopf.index("apps", "v1", "deployments")
def serving_deployments(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[ObjectKey, dict[str, Any]]:
    return {(namespace, name): _slim_deployment(body)}


@kopf.index("", "v1", "pods")
def serving_pods(
    namespace: str | None, body: kopf.Body, **_: Any
) -> dict[ObjectKey, dict[str, Any]] | None:
    deployment = owning_deployment(body)
    return {(namespace, deployment): _slim_pod(body)} if deployment else None


@kopf.index(GROUP, VERSION, "finetunejobs")
def serving_sources(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[ObjectKey, dict[str, Any]]:
    output = ((body.get("spec") or {}).get("output")) or {}
    return {
        (namespace, name): {
            "spec": {"output": {"credentialsSecretRef": output.get("credentialsSecretRef")}},
            "status": dict(body.get("status") or {}),
        }
    }


def _slim_schedule(body: Mapping[str, Any]) -> dict[str, Any]:
    """What a follower reads of a FineTuneSchedule: its champion and the credentials its
    runs write adapters with (the champion is fetched with them)."""
    template = ((body.get("spec") or {}).get("jobTemplate")) or {}
    output = ((template.get("spec") or {}).get("output")) or {}
    return {
        "spec": {
            "jobTemplate": {
                "spec": {"output": {"credentialsSecretRef": output.get("credentialsSecretRef")}}
            }
        },
        "status": {"champion": (body.get("status") or {}).get("champion")},
    }


@kopf.index(GROUP, VERSION, SCHEDULE_PLURAL)
def serving_schedules(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[ObjectKey, dict[str, Any]]:
    return {(namespace, name): _slim_schedule(body)}


@kopf.index(GROUP, VERSION, PLURAL)
def serving_refs(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> dict[RefKey, str]:
    """Which Deployments, FineTuneJobs and FineTuneSchedules each AdapterDeployment depends
    on."""
    refs: dict[RefKey, str] = {("Deployment", namespace, sb.canary_name(name)): name}
    target = (spec.get("target") or {}).get("deployment")
    if target:
        refs[("Deployment", namespace, str(target))] = name
    ftj = ((spec.get("source") or {}).get("fineTuneJobRef") or {}).get("name")
    if ftj:
        refs[("FineTuneJob", namespace, str(ftj))] = name
    schedule = ((spec.get("source") or {}).get("fineTuneScheduleRef") or {}).get("name")
    if schedule:
        refs[("FineTuneSchedule", namespace, str(schedule))] = name
    return refs


@kopf.index("apps", "v1", "deployments")
def serving_configmap_readers(
    namespace: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> dict[ObjectKey, str] | None:
    """Which Deployments' vLLM servers take settings from each ConfigMap (a --config file,
    VLLM_API_KEY or VLLM_ALLOW_RUNTIME_LORA_UPDATING): its change wakes their
    AdapterDeployments (decision 2060)."""
    config: OperatorConfig | None = getattr(memo, "config", None)
    patterns = config.vllm_image_patterns if config is not None else None
    read = vllm_server.configmaps_read(body, patterns)
    return {(namespace, configmap): name for configmap in read} or None


def _caches(kwargs: Mapping[str, Any]) -> Caches:
    return Caches(
        kwargs["serving_deployments"],
        kwargs["serving_pods"],
        kwargs["serving_sources"],
        kwargs["serving_schedules"],
    )


def _one(index: ObjectIndex | None, key: ObjectKey) -> dict[str, Any] | None:
    store = index.get(key) if index is not None else None
    for value in store or ():
        return dict(value)
    return None


def _dependents(
    refs: kopf.Index[RefKey, str], kind: str, namespace: str | None, name: str
) -> list[tuple[str, str]]:
    return [(str(namespace), str(ad_name)) for ad_name in refs.get((kind, namespace, name)) or ()]


# Async (in the operator's loop), not threads: they set asyncio events of the tasks.
@kopf.on.event("apps", "v1", "deployments")
async def deployment_changed(
    namespace: str | None, name: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    state = _serving(memo)
    if state is not None:
        state.wake(_dependents(kwargs["serving_refs"], "Deployment", namespace, name))


@kopf.on.event("", "v1", "pods")
async def pod_changed(
    namespace: str | None, body: kopf.Body, memo: kopf.Memo, **kwargs: Any
) -> None:
    state = _serving(memo)
    deployment = owning_deployment(body)
    if state is not None and deployment:
        state.wake(_dependents(kwargs["serving_refs"], "Deployment", namespace, deployment))


@kopf.on.event(GROUP, VERSION, "finetunejobs")
async def source_changed(namespace: str | None, name: str, memo: kopf.Memo, **kwargs: Any) -> None:
    state = _serving(memo)
    if state is not None:
        state.wake(_dependents(kwargs["serving_refs"], "FineTuneJob", namespace, name))


@kopf.on.event(GROUP, VERSION, SCHEDULE_PLURAL)
async def schedule_changed(
    namespace: str | None,
    name: str,
    body: kopf.Body,
    type: str | None,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """Wake the schedule's followers when what they read of it changed: its champion (or
    the credentials) — not at each of its runs' status updates."""
    state = _serving(memo)
    if state is None:
        return
    key = (str(namespace), name)
    seen = None if type == "DELETED" else _slim_schedule(body)
    if key in state.schedules and state.schedules[key] == seen:
        return
    if seen is None:
        state.schedules.pop(key, None)
    else:
        state.schedules[key] = seen
    state.wake(_dependents(kwargs["serving_refs"], "FineTuneSchedule", namespace, name))


def _data_digest(body: Mapping[str, Any]) -> str:
    """A digest of a ConfigMap's data: metadata-only changes (labels, annotations) keep it."""
    data = {"data": body.get("data") or {}, "binaryData": body.get("binaryData") or {}}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@kopf.on.event("", "v1", "configmaps")
async def configmap_changed(
    namespace: str | None,
    name: str,
    body: kopf.Body,
    type: str | None,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """Wake the AdapterDeployments whose target's vLLM server reads this ConfigMap when its
    data changed. Any other ConfigMap costs one lookup in memory and no request."""
    state = _serving(memo)
    if state is None:
        return
    key = (str(namespace), name)
    readers = set(kwargs["serving_configmap_readers"].get((namespace, name)) or ())
    if not readers:
        state.configmaps.pop(key, None)
        return
    seen = None if type == "DELETED" else _data_digest(body)
    if seen is not None and state.configmaps.get(key) == seen:
        return
    if seen is None:
        state.configmaps.pop(key, None)
    else:
        state.configmaps[key] = seen
    refs = kwargs["serving_refs"]
    for deployment in sorted(readers):
        state.wake(_dependents(refs, "Deployment", namespace, deployment))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def adapterdeployment_changed(
    namespace: str | None, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    """Wake the task, except for the echo of its own status write."""
    state = _serving(memo)
    if state is None:
        return
    memory = state.memories.get((str(namespace), name))
    if memory is None:
        return
    written = memory.written
    own_echo = written is not None and _rv(written) == _rv(body)
    if not own_echo:
        memory.wake.set()


# ------------------------------------------------------------------ observe


@dataclass(frozen=True)
class Caches:
    deployments: ObjectIndex
    pods: ObjectIndex
    sources: ObjectIndex
    schedules: ObjectIndex


def _rv(body: Mapping[str, Any] | None) -> str:
    return str(((body or {}).get("metadata") or {}).get("resourceVersion") or "")


def fresher(live: Mapping[str, Any], written: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The newer of the watched object and the one our last status write returned.

    Right after a write the watch may not have delivered it yet; planning from the older
    copy would repeat what that pass did.
    """
    if written is None:
        return live
    try:
        return written if int(_rv(written)) > int(_rv(live)) else live
    except ValueError:
        return live


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    st = pod.get("status") or {}
    if st.get("phase") != "Running" or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or []
    )


def pod_endpoint(pod: Mapping[str, Any], port: int, local_mode: bool) -> str | None:
    """Where the operator may reach a pod's server: its own pod IP on target.port.

    Pods on the host network are never called (their IP is the node's, where other
    services listen); the endpoint annotation is honoured only in local mode.
    """
    if local_mode:
        return annotation_endpoint(dict(pod), port)
    if (pod.get("spec") or {}).get("hostNetwork"):
        return None
    return pod_ip_endpoint(dict(pod), port)


def _pod_infos(
    pods: Iterable[Mapping[str, Any]], port: int, local_mode: bool
) -> tuple[ad.PodInfo, ...]:
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        restarts = sum(
            int(cs.get("restartCount") or 0)
            for cs in (pod.get("status") or {}).get("containerStatuses") or []
        )
        ready = _pod_ready(pod)
        out.append(
            ad.PodInfo(
                name=str(meta.get("name")),
                uid=str(meta.get("uid") or ""),
                ready=ready,
                endpoint=pod_endpoint(pod, port, local_mode) if ready else None,
                annotations=dict(meta.get("annotations") or {}),
                restarts=restarts,
            )
        )
    return tuple(sorted(out, key=lambda p: p.name))


# How long a pass waits for the watch caches to show the task's own writes.
CACHE_CATCH_UP_SECONDS = 5.0


def _newer_or_same(seen: str, wanted: str) -> bool:
    try:
        return int(seen) >= int(wanted)
    except ValueError:
        return seen == wanted


async def caught_up(caches: Caches, namespace: str, memory: Memory) -> None:
    """Wait until the Deployments this task wrote look as its writes left them."""
    deadline = time.monotonic() + CACHE_CATCH_UP_SECONDS
    while memory.expected and time.monotonic() < deadline:
        for name, wanted in list(memory.expected.items()):
            cached = _one(caches.deployments, (namespace, name))
            if (wanted is None and cached is None) or (
                wanted is not None and cached is not None and _newer_or_same(_rv(cached), wanted)
            ):
                del memory.expected[name]
        if memory.expected:
            await asyncio.sleep(0.02)
    memory.expected.clear()


def _base_observation(
    body: Mapping[str, Any], config: OperatorConfig, caches: Caches, memory: Memory
) -> ad.Observed:
    meta = body.get("metadata") or {}
    name, namespace = str(meta["name"]), str(meta["namespace"])
    raw_status = {
        k: v for k, v in (body.get("status") or {}).items() if k not in FOREIGN_STATUS_KEYS
    }
    try:
        status = AdapterDeploymentStatus.model_validate(raw_status)
    except ValidationError:
        log.warning("%s/%s: status unreadable; starting from an empty one", namespace, name)
        status = AdapterDeploymentStatus()
    common: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": str(meta.get("uid") or ""),
        "generation": int(meta.get("generation") or 0),
        "status": status,
        "body": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": dict(meta)},
        "local_mode": config.local_mode,
        "fetch_image": config.trainer_image,
        "image_patterns": config.vllm_image_patterns,
    }
    try:
        spec = AdapterDeploymentSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        return ad.Observed(spec=None, spec_error=str(exc), **common)
    ftj_ref = spec.source.fine_tune_job_ref
    schedule_ref = spec.source.fine_tune_schedule_ref
    port, local_mode = spec.target.port, config.local_mode
    canary_name = sb.canary_name(name)
    target_pods = caches.pods.get((namespace, spec.target.deployment)) or ()
    obs = ad.Observed(
        spec=spec,
        ftj=_one(caches.sources, (namespace, ftj_ref.name)) if ftj_ref else None,
        schedule=_one(caches.schedules, (namespace, schedule_ref.name)) if schedule_ref else None,
        target=_one(caches.deployments, (namespace, spec.target.deployment)),
        canary=_one(caches.deployments, (namespace, canary_name)),
        pods=_pod_infos(target_pods, port, local_mode),
        canary_pods=_pod_infos(caches.pods.get((namespace, canary_name)) or (), port, local_mode),
        verified=dict(memory.verified),
        last_check=memory.last_check,
        **common,
    )
    return obs if status.current is None else _with_errors(obs, memory, status.current.digest)


def _with_errors(obs: ad.Observed, memory: Memory, digest: str) -> ad.Observed:
    """Permanent load failures of this digest into pods that did not change since."""
    markers = {p.name: p.marker for p in obs.pods}
    errors = {
        pod: message
        for pod, (marker, failed_digest, message, unauthorized) in memory.load_errors.items()
        if markers.get(pod) == marker and failed_digest == digest and not unauthorized
    }
    refused = {
        pod: message
        for pod, (marker, failed_digest, message, unauthorized) in memory.load_errors.items()
        if markers.get(pod) == marker and failed_digest == digest and unauthorized
    }
    return replace(obs, load_errors=errors, auth_errors=refused)


async def read_api_key(kube: ServingKube, obs: ad.Observed) -> str | None:
    """The key the target's vLLM server expects as a Bearer token, found where the vLLM
    container takes it (vllm_server's model: ``--api-key``, ``VLLM_API_KEY`` as a value,
    from a ConfigMap or from a Secret, whose data is read here). Never logged, never in
    status or events; None when the server has no key or the operator cannot tell it."""
    if obs.spec is None or obs.target is None:
        return None
    try:
        server = vllm_server.inspect(
            obs.target,
            container=obs.spec.target.container,
            configmaps=dict(obs.configmaps),
            image_patterns=obs.image_patterns,
        )
    except ValueError:
        return None
    source = server.api_key
    secrets: dict[str, dict[str, str]] = {}
    from_secret = source is not None and source.kind in ("secret", "envFrom")
    if source is not None and from_secret and source.literal is None and source.name:
        secrets[source.name] = await _secret_data(kube, obs.namespace, source.name)
    return vllm_server.resolve_api_key(source, secrets)


async def _secret_data(kube: ServingKube, namespace: str, name: str) -> dict[str, str]:
    """A Secret's decoded data ({} when it is missing or unreadable)."""
    try:
        secret = await kube.get("Secret", namespace, name)
    except KubeError as exc:
        log.info(
            "%s: Secret %s with the server's API key unreadable (%s)", namespace, name, exc.status
        )
        return {}
    data: dict[str, str] = {}
    for key, raw in ((secret or {}).get("data") or {}).items():
        try:
            data[str(key)] = base64.b64decode(str(raw)).decode()
        except (binascii.Error, UnicodeDecodeError):
            continue
    return data


async def read_configmaps(
    kube: ServingKube, obs: ad.Observed
) -> dict[str, Mapping[str, str]] | None:
    """The ConfigMaps the target's vLLM container takes settings from (its ``--config``
    file, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, ``VLLM_API_KEY``); None when it takes none.

    One the operator may not read or that does not exist is left out: the server model
    then says what it could not tell (``ServerConfigUnreadable`` for a --config file).
    """
    if obs.spec is None or obs.target is None:
        return None
    names = vllm_server.configmaps_needed(obs.target, obs.spec.target.container, obs.image_patterns)
    found: dict[str, Mapping[str, str]] = {}
    for name in names:
        try:
            cm = await kube.get("ConfigMap", obs.namespace, name)
        except KubeError as exc:
            if exc.status != 403:
                raise
            log.info("%s: ConfigMap %s not readable by the operator (403)", obs.namespace, name)
            continue
        if cm is not None:
            found[name] = {str(k): str(v) for k, v in (cm.get("data") or {}).items()}
    return found if names else None


async def _loaded(vllm: VllmClient, obs: ad.Observed) -> ad.Observed:
    """What each ready pod's server lists (None: it did not answer); pods that refused the
    operator's API key go to ``auth_errors``."""
    refused: dict[str, str] = {}

    async def ask(pod: ad.PodInfo) -> tuple[str, Mapping[str, str] | None]:
        assert pod.endpoint is not None
        try:
            return pod.name, await vllm.loaded_adapters(pod.endpoint)
        except VllmError as exc:
            log.info("pod %s: %s", pod.name, exc.message)
            if exc.kind is VllmErrorKind.UNAUTHORIZED:
                refused[pod.name] = exc.message
            return pod.name, None

    answers = await asyncio.gather(*(ask(p) for p in obs.pods if p.ready and p.endpoint))
    return replace(obs, loaded=dict(answers), auth_errors={**obs.auth_errors, **refused})


async def _analysis_window(
    vllm: VllmClient, obs: ad.Observed, memory: Memory
) -> ad.AnalysisWindow | None:
    """One canary check's observations: metric deltas per pod and the smoke requests."""
    assert obs.spec is not None
    analysis = ad.analysis_of(obs.spec)
    live = {p.name: p.endpoint for p in obs.canary_pods if p.ready and p.endpoint}
    if not live:
        return None
    parts: dict[str, rules.MetricsSample] = {}
    before_smoke: dict[str, rules.MetricsSample] = {}
    for pod, endpoint in live.items():
        assert endpoint is not None
        try:
            sample = await vllm.metrics(endpoint)
        except VllmError as exc:
            log.info("canary metrics from %s failed: %s", pod, exc.message[:200])
            continue
        before_smoke[pod] = sample
        parts[pod] = rules.sample_delta(memory.samples.get(pod), sample)
    endpoints = [e for e in live.values() if e]
    smoke = await asyncio.gather(
        *(
            vllm.smoke(endpoints[i % len(endpoints)], obs.spec.adapter_name, analysis.smoke_prompt)
            for i in range(analysis.smoke_requests)
        )
    )
    # The window closes after the smoke requests so they count in the next sample's base;
    # the same page says whether the engine scheduled the adapter (no extra request).
    scheduled: bool | None = None
    for pod, endpoint in live.items():
        assert endpoint is not None
        try:
            text = await vllm.metrics_text(endpoint)
        except VllmError:
            memory.samples.pop(pod, None)
            continue
        memory.samples[pod] = parse_metrics(text)
        if pod in parts:
            # The smoke answers' generation is known only from the server's side.
            during = rules.sample_delta(before_smoke[pod], memory.samples[pod])
            parts[pod] = rules.with_generation_of(parts[pod], during)
        info = parse_lora_requests_info(text)
        if info.max_lora is not None:  # the server exports vllm:lora_requests_info
            scheduled = bool(scheduled) or obs.spec.adapter_name in info.seen
    unauthorized = any(s.kind is VllmErrorKind.UNAUTHORIZED for s in smoke)
    return ad.AnalysisWindow(tuple(parts.values()), tuple(smoke), unauthorized, scheduled)


# ------------------------------------------------------------------ act


class Unfinished(Exception):
    """A pass could not finish (the target kept changing, a call failed): try again later."""


async def patch_target(
    kube: ServingKube, obs: ad.Observed, action: ad.PatchTarget, fetch_image: str
) -> str | None:
    """Apply this adapter's entries to the target; on a lost race re-read and retry."""
    assert obs.spec is not None
    name = obs.spec.target.deployment
    for attempt in range(MAX_PATCH_ATTEMPTS):
        dep = await kube.get("Deployment", obs.namespace, name)
        if dep is None:
            raise Unfinished(f"Deployment {name} not found")
        ops = sb.rollout_patch(
            dep, obs.spec.target.container, obs.spec.adapter_name, action.ref,
            owner=obs.name, fetch_image=fetch_image, changes=action.changes,
            edit=ad.edit_context(obs, dep),
        )  # fmt: skip
        if not sb.patch_changes_anything(ops):
            return None
        try:
            written = await kube.json_patch("Deployment", obs.namespace, name, ops)
            return _rv(written)
        except KubeError as exc:
            if not exc.conflict:
                raise
            log.info("Deployment %s changed under us (attempt %d); retrying", name, attempt + 1)
            await asyncio.sleep(0.05 * (attempt + 1))
    raise Unfinished(f"Deployment {name} kept changing")


async def pod_call(
    vllm: VllmClient, obs: ad.Observed, call: ad.PodCall, memory: Memory, post: Poster
) -> None:
    """One runtime LoRA call; a final refusal is remembered for the next pass to report
    (a transient failure is not: the pod is asked again until the deadline)."""
    try:
        if call.call == "unload" or (call.call == "reload" and not call.in_place):
            await vllm.unload_adapter(call.endpoint, call.adapter)
        if call.call in ("load", "reload"):
            assert call.path is not None
            await vllm.load_adapter(call.endpoint, call.adapter, call.path, replace=call.in_place)
            post(
                "Normal", "AdapterLoaded", f"pod {call.pod}: loaded {call.adapter} ({call.digest})"
            )
    except VllmError as exc:
        log.info("pod %s: %s %s failed: %s", call.pod, call.call, call.adapter, exc.message)
        # Transient (no answer, 5xx without a known reason): tried again until the deadline.
        if exc.permanent and call.digest:
            marker = next((p.marker for p in obs.pods if p.name == call.pod), ("", 0, None))
            unauthorized = exc.kind is VllmErrorKind.UNAUTHORIZED
            memory.load_errors[call.pod] = (marker, call.digest, exc.message, unauthorized)


async def execute(
    kube: ServingKube,
    vllm: VllmClient,
    config: OperatorConfig,
    obs: ad.Observed,
    actions: Iterable[ad.Action],
    memory: Memory,
    post: Poster,
) -> None:
    for action in actions:
        if isinstance(action, ad.PatchTarget):
            assert obs.spec is not None
            written = await patch_target(kube, obs, action, config.trainer_image)
            if written:
                memory.expected[obs.spec.target.deployment] = written
        elif isinstance(action, ad.CreateCanary):
            created = await _create_canary(kube, obs.namespace, action)
            memory.expected[str(action.body["metadata"]["name"])] = _rv(created)
            memory.samples.clear()
            memory.last_check = None
        elif isinstance(action, ad.DeleteDeployment):
            if await kube.delete("Deployment", obs.namespace, action.name):
                memory.expected[action.name] = None
        else:
            await pod_call(vllm, obs, action, memory, post)


async def _create_canary(
    kube: ServingKube, namespace: str, action: ad.CreateCanary
) -> dict[str, Any]:
    name = str(action.body["metadata"]["name"])
    try:
        return await kube.create(action.body)
    except KubeError as exc:
        if exc.status != 409:
            raise
        await kube.delete("Deployment", namespace, name)  # a stale canary the cache missed
        raise Unfinished(f"an old canary Deployment {name} was in the way") from exc


def _record(obs: ad.Observed, records: Iterable[ad.Record]) -> None:
    assert obs.spec is not None
    spec = obs.spec
    # Every series of this object exists at 0 from its first pass (increase() sees the first).
    metrics_serving.see(obs.namespace, spec.adapter_name, spec.strategy.type)
    for record in records:
        if isinstance(record, ad.Served):
            metrics_serving.set_served(
                obs.namespace, spec.adapter_name, record.digest, spec.target.deployment
            )
        elif isinstance(record, ad.RolloutEnded):
            metrics_serving.ROLLOUT_DURATION.labels(
                obs.namespace, record.strategy, record.outcome
            ).observe(record.seconds)
        else:
            metrics_serving.ROLLBACKS.labels(obs.namespace, spec.adapter_name, record.reason).inc()


def _poster(body: Mapping[str, Any]) -> Poster:
    def post(type_: str, reason: str, message: str) -> None:
        try:
            # kopf types its Body class here but reads any mapping.
            if type_ == "Warning":
                kopf.warn(cast(Any, body), reason=reason, message=message)
            else:
                kopf.info(cast(Any, body), reason=reason, message=message)
        except Exception:  # events are best effort (no operator context in some tests)
            log.debug("event %s not posted", reason)

    return post


def _mark_verified(obs: ad.Observed, p: ad.Plan, memory: Memory) -> None:
    """Remember which Runtime pods were seen serving the current revision."""
    if obs.loaded is None or obs.spec is None:
        return
    current = p.status.current
    called = {a.pod for a in p.actions if isinstance(a, ad.PodCall)}
    recorded = {pod.pod: pod.digest for pod in p.status.pods or []}
    for pod in obs.pods:
        listed = obs.spec.adapter_name in (obs.loaded.get(pod.name) or {})
        if (
            current is not None
            and listed
            and pod.name not in called
            and recorded.get(pod.name) == current.digest
        ):
            memory.verified[pod.name] = pod.marker
        else:
            memory.verified.pop(pod.name, None)
    present = {pod.name for pod in obs.pods}
    for gone in set(memory.verified) - present:
        del memory.verified[gone]


async def reconcile(
    kube: ServingKube,
    config: OperatorConfig,
    state: ServingState,
    body: Mapping[str, Any],
    caches: Caches,
) -> ad.Plan:
    """One pass: observe, plan, act, write status."""
    memory = state.memory(str(body["metadata"]["namespace"]), str(body["metadata"]["name"]))
    body = fresher(body, memory.written)
    await caught_up(caches, str(body["metadata"]["namespace"]), memory)
    now = state.clock()
    obs = _base_observation(body, config, caches, memory)
    uri = obs.spec.source.uri if obs.spec is not None else None
    if config.local_mode and uri and rules.is_local(uri):
        # Local mode only: the adapter is a folder on the operator's own disk (hashed).
        obs = replace(obs, local=await asyncio.to_thread(read_local_manifest, uri))
    configmaps = await read_configmaps(kube, obs)
    if configmaps is not None:
        obs = replace(obs, configmaps=configmaps)
    vllm: VllmClient | None = None

    async def client() -> VllmClient:
        nonlocal vllm
        if vllm is None:
            assert obs.spec is not None
            key = await read_api_key(kube, obs)
            vllm = state.client(config).with_api_key(key)
        return vllm

    if ad.needs_pod_listing(obs):
        obs = await _loaded(await client(), obs)
    if ad.canary_check_due(obs, now):
        window = await _analysis_window(await client(), obs, memory)
        if window is not None:
            memory.last_check = now
            obs = ad.with_window(obs, window)
    p = ad.plan(obs, now)
    post = _poster(body)
    if p.actions:
        await execute(kube, await client(), config, obs, p.actions, memory, post)
    if obs.spec is not None and obs.spec.strategy.type == "Runtime":
        _mark_verified(obs, p, memory)
    if obs.spec is not None:
        _record(obs, p.records)
    desired = p.status.to_wire()
    patch = status_patch(body.get("status") or {}, desired)
    if patch:
        memory.written = await kube.patch_status(KIND, obs.namespace, obs.name, patch)
    for event in p.events:
        post(event.type, event.reason, event.message)
    return p


def wait_after(p: ad.Plan, config: OperatorConfig, immediate_passes: int) -> float | None:
    """How long the task sleeps after a pass unless woken (None: until woken). The one
    place where a plan's outcome becomes timing."""
    if p.next == ad.Next.NOW and immediate_passes < MAX_IMMEDIATE_PASSES:
        return 0.0
    if p.next == ad.Next.IDLE:
        return None
    poll = config.serving_poll_seconds
    return poll if p.check_in is None else max(0.0, min(poll, p.check_in))


def backoff(config: OperatorConfig, failures: int) -> float:
    """After ``failures`` failed passes in a row: the poll interval, doubling, capped."""
    seconds = config.serving_poll_seconds * 2 ** min(failures - 1, 30)
    return float(min(config.serving_max_backoff_seconds, seconds))


@kopf.daemon(GROUP, VERSION, PLURAL, id="serve-adapter", cancellation_timeout=5.0)
async def serve_adapter(
    namespace: str | None,
    name: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """The task of one AdapterDeployment: a pass whenever something it depends on changed."""
    kube_client, config, state = runtime(memo)
    kube = ServingKube(kube_client)
    caches = _caches(kwargs)
    memory = state.memory(str(namespace), name)
    daemons = daemons_of(memo)
    try:
        with daemons.alive():
            await _serve(kube, config, state, body, caches, memory, stopped, daemons)
    finally:
        if body.get("metadata", {}).get("deletionTimestamp"):
            state.memories.pop((str(namespace), name), None)


async def _serve(
    kube: ServingKube,
    config: OperatorConfig,
    state: ServingState,
    body: kopf.Body,
    caches: Caches,
    memory: Memory,
    stopped: kopf.DaemonStopped,
    daemons: Daemons,
) -> None:
    """Passes until the task is asked to stop or the object is being deleted."""
    meta = body.get("metadata", {})
    immediate = 0
    delay: float | None = 0.0
    while not daemons.asked_to_stop(stopped):
        await daemons.sleep(stopped, delay, memory.wake)
        if daemons.asked_to_stop(stopped):
            break
        memory.wake.clear()
        if body.get("metadata", {}).get("deletionTimestamp"):
            break
        try:
            p = await state.run_pass(reconcile(kube, config, state, body, caches))
        except (KubeError, VllmError, Unfinished, aiohttp.ClientError, OSError) as exc:
            memory.failures += 1
            delay = backoff(config, memory.failures)
            log.warning(
                "%s/%s: pass failed, next try in %.0fs: %s",
                meta.get("namespace"), meta.get("name"), delay, exc,
            )  # fmt: skip
            continue
        except Exception:  # keep the task alive: one bad pass must not stop it for good
            memory.failures += 1
            delay = backoff(config, memory.failures)
            log.exception(
                "%s/%s: unexpected error; next try in %.0fs",
                meta.get("namespace"), meta.get("name"), delay,
            )  # fmt: skip
            continue
        memory.failures = 0
        immediate = immediate + 1 if p.next == ad.Next.NOW else 0
        delay = wait_after(p, config, immediate)


@kopf.on.delete(GROUP, VERSION, PLURAL, id="remove-adapter")
async def remove_adapter(
    body: kopf.Body,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """Take the adapter out of the target (its entries only) and drop the canary."""
    kube_client, config, state = runtime(memo)
    kube = ServingKube(kube_client)
    caches = _caches(kwargs)
    memory = Memory()
    obs = _base_observation(body, config, caches, memory)
    spec = obs.spec
    if spec is None:
        return
    try:
        obs = replace(obs, configmaps=await read_configmaps(kube, obs) or {})
    except KubeError as exc:
        raise kopf.TemporaryError(f"removing the adapter: {exc}", delay=5) from exc
    vllm = state.client(config).with_api_key(await read_api_key(kube, obs))
    if spec.strategy.type == "Runtime":
        obs = await _loaded(vllm, obs)
    try:
        await execute(kube, vllm, config, obs, ad.removal(obs), memory, _poster(body))
    except (KubeError, Unfinished) as exc:
        raise kopf.TemporaryError(f"removing the adapter: {exc}", delay=5) from exc
    metrics_serving.set_served(obs.namespace, spec.adapter_name, None, spec.target.deployment)
    state.memories.pop((obs.namespace, obs.name), None)
