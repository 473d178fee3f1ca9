"""Pure decisions for AdapterDeployments: source, compatibility, rollout, canary, runtime.

Every function here takes observed state (dicts as the API returns them, typed status,
samples the clients collected) and returns a decision; none does I/O.
:mod:`.adapterdeployment_plan` strings them into one reconcile decision.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from ..api.adapterdeployment import (
    AdapterDeploymentSpec,
    AdapterDeploymentStatus,
    AdapterRevision,
    CanaryAnalysis,
    Outcome,
    Reason,
)
from ..api.common import get_condition
from ..api.finetunejob import ADAPTER_URI_PATTERN, DIGEST_PATTERN, URI_MAX, check_uri
from ..builders import serving as sb
from ..domain.times import parse_rfc3339
from ..domain.uris import StorageUri, UriError, split_scheme
from ..serving import vllm_args, vllm_server

MAX_HISTORY = 20

# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Verdict:
    """A condition-shaped answer: ok, or the reason and what to change."""

    ok: bool
    reason: str
    message: str = ""


@dataclass(frozen=True)
class SourceResult(Verdict):
    ref: sb.AdapterRef | None = None


@dataclass(frozen=True)
class CompatResult(Verdict):
    changes: sb.ServerArgChanges = field(default_factory=sb.ServerArgChanges)


# ------------------------------------------------------------------ source


@dataclass(frozen=True)
class LocalManifest:
    """What the operator could read from a ``file://`` adapter (None fields: unknown)."""

    digest: str | None = None
    rank: int | None = None
    base_model: str | None = None
    error: str | None = None
    missing: bool = False


def resolve_source(
    spec: AdapterDeploymentSpec,
    ftj: dict[str, Any] | None,
    local: LocalManifest | None = None,
    *,
    local_mode: bool = False,
    schedule: dict[str, Any] | None = None,
) -> SourceResult:
    """Which adapter the spec asks for, or why it cannot be served yet.

    ``ftj`` and ``schedule`` are the FineTuneJob and the FineTuneSchedule the source names
    (None: not found). ``file://`` adapters name a path on the operator's own disk; outside local mode they
    are refused before anything looks at that path, so a tenant cannot probe the
    operator's filesystem through the answers.
    """
    src = spec.source
    name = spec.adapter_name
    if src.fine_tune_job_ref is not None:
        result = _from_finetunejob(spec, src.fine_tune_job_ref.name, ftj)
        if result.ref is not None and not local_mode and is_local(result.ref.uri):
            return local_refused(f"FineTuneJob {src.fine_tune_job_ref.name} records a")
        return result
    if src.fine_tune_schedule_ref is not None:
        result = _from_schedule(name, src.fine_tune_schedule_ref.name, schedule)
        if result.ref is not None and not local_mode and is_local(result.ref.uri):
            return local_refused(f"FineTuneSchedule {src.fine_tune_schedule_ref.name} names a")
        return result
    assert src.uri is not None and src.digest is not None  # the model guarantees both
    if not local_mode and is_local(src.uri):
        return local_refused("source.uri is a")
    rank, base = src.rank, src.base_model
    if local is not None:
        if local.missing:
            return SourceResult(
                False,
                Reason.ADAPTER_NOT_FOUND,
                f"{src.uri}: no adapter manifest there ({local.error}); fix source.uri",
            )
        if local.error:
            return SourceResult(
                False,
                Reason.DIGEST_MISMATCH,
                f"{src.uri}: the files do not match the adapter's manifest ({local.error}); "
                "the adapter was changed after it was written: re-export it",
            )
        if local.digest and local.digest != src.digest:
            return SourceResult(
                False,
                Reason.DIGEST_MISMATCH,
                f"source.digest is {src.digest} but the adapter at {src.uri} has digest "
                f"{local.digest}: set source.digest to the adapter's digest (or point "
                "source.uri at the adapter you meant)",
            )
        rank = rank or local.rank
        base = base or local.base_model
    secret = src.credentials_secret_ref.name if src.credentials_secret_ref else None
    ref = sb.AdapterRef(name, src.uri, src.digest, base, rank, secret)
    return SourceResult(True, Reason.RESOLVED, f"{src.uri} ({src.digest})", ref)


def is_local(uri: str) -> bool:
    return split_scheme(uri)[0] == "file"


def local_refused(what: str) -> SourceResult:
    return SourceResult(
        False,
        Reason.LOCAL_ADAPTER_REFUSED,
        f"{what} file:// adapter, which only the operator's local mode serves: store the "
        "adapter on a PVC (pvc://), in S3 (s3://) or on the Hugging Face Hub (hf://)",
    )


def _from_finetunejob(
    spec: AdapterDeploymentSpec, ftj_name: str, ftj: dict[str, Any] | None
) -> SourceResult:
    if ftj is None:
        return SourceResult(
            False,
            Reason.FINETUNEJOB_NOT_FOUND,
            f"FineTuneJob {ftj_name} not found in this namespace: create it or fix "
            "source.fineTuneJobRef.name",
        )
    status = ftj.get("status") or {}
    phase = status.get("phase") or "Pending"
    conditions = status.get("conditions") or []
    if phase == "Failed":
        succeeded = get_condition(conditions, "Succeeded") or {}
        why = succeeded.get("message") or "see its conditions"
        return SourceResult(
            False, Reason.FINETUNEJOB_FAILED, f"FineTuneJob {ftj_name} failed: {why}"
        )
    if phase != "Succeeded":
        return SourceResult(
            False,
            Reason.FINETUNEJOB_NOT_FINISHED,
            f"FineTuneJob {ftj_name} is {phase}: the adapter is rolled out once it succeeds",
        )
    gates = get_condition(conditions, "GatesPassed")
    if spec.require_gates and (gates is None or gates.get("status") != "True"):
        detail = (gates or {}).get("message") or "no gate verdict recorded"
        return SourceResult(
            False,
            Reason.GATES_FAILED,
            f"FineTuneJob {ftj_name}: quality gates not passed ({detail}); improve the "
            "adapter or, to serve it anyway, set requireGates: false",
        )
    adapter = status.get("adapter") or {}
    if not adapter.get("uri") or not adapter.get("digest"):
        return SourceResult(
            False,
            Reason.ADAPTER_MISSING,
            f"FineTuneJob {ftj_name} succeeded but records no adapter",
        )
    try:
        StorageUri.parse(str(adapter["uri"]))
    except UriError as exc:
        # Status is written by whoever may write it: a location no step can read is refused
        # here, before any child is built for it.
        return SourceResult(
            False,
            Reason.ADAPTER_MISSING,
            f"FineTuneJob {ftj_name} records an adapter location the operator does not "
            f"serve ({exc})",
        )
    secret = (((ftj.get("spec") or {}).get("output") or {}).get("credentialsSecretRef") or {}).get(
        "name"
    )
    ref = sb.AdapterRef(
        spec.adapter_name,
        str(adapter["uri"]),
        str(adapter["digest"]),
        adapter.get("baseModel"),
        adapter.get("rank"),
        secret,
    )
    return SourceResult(
        True, Reason.RESOLVED, f"FineTuneJob {ftj_name}: {ref.uri} ({ref.digest})", ref
    )


def _from_schedule(
    adapter_name: str, sched_name: str, schedule: dict[str, Any] | None
) -> SourceResult:
    """The champion a FineTuneSchedule names in its status, or what is awaited.

    A schedule or champion that does not exist yet is a wait, not a failure: schedules
    are often created with their followers, and the first run takes a while. A champion
    that a follower rolled back is not offered again (decision 1804).
    """
    if schedule is None:
        return SourceResult(
            False,
            Reason.FINETUNESCHEDULE_NOT_FOUND,
            f"waiting for FineTuneSchedule {sched_name} in this namespace: create it (or fix "
            "source.fineTuneScheduleRef.name)",
        )
    champion = (schedule.get("status") or {}).get("champion") or {}
    if not isinstance(champion, dict) or not champion:
        return SourceResult(
            False,
            Reason.NO_CHAMPION,
            f"waiting for FineTuneSchedule {sched_name} to promote a champion: its first "
            "successful run becomes the champion and is rolled out then",
        )
    job = str(champion.get("job") or "?")[:253]
    adapter = champion.get("adapter") or {}
    uri, digest = adapter.get("uri"), adapter.get("digest")
    problem = _champion_problem(uri, digest)
    if problem is not None:
        return SourceResult(
            False,
            Reason.CHAMPION_INVALID,
            f"FineTuneSchedule {sched_name}: champion {job} {problem}; waiting for a champion "
            "with a valid adapter",
        )
    rejected = champion.get("rolledBack") or {}
    if isinstance(rejected, dict) and rejected:
        return SourceResult(
            False,
            Reason.CHAMPION_ROLLED_BACK,
            f"FineTuneSchedule {sched_name}: champion {job} ({str(digest)[:19]}…) was rejected "
            f"by AdapterDeployment {str(rejected.get('adapterDeployment'))[:253]} "
            f"({str(rejected.get('reason'))[:64]}); waiting for the schedule's next successful "
            "run to replace it",
        )
    template = (schedule.get("spec") or {}).get("jobTemplate") or {}
    output = (template.get("spec") or {}).get("output") or {}
    secret = (output.get("credentialsSecretRef") or {}).get("name")
    rank = adapter.get("rank")
    ref = sb.AdapterRef(
        adapter_name,
        str(uri),
        str(digest),
        str(adapter["baseModel"]) if adapter.get("baseModel") else None,
        rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
        str(secret) if secret else None,
    )
    return SourceResult(
        True,
        Reason.RESOLVED,
        f"FineTuneSchedule {sched_name}: champion {job}, {ref.uri} ({ref.digest})",
        ref,
    )


def _champion_problem(uri: object, digest: object) -> str | None:
    """Why a champion's adapter cannot be served (status is written by whoever may write
    it, so it is checked as a spec's source.uri and source.digest would be), or None."""
    if not isinstance(uri, str) or not isinstance(digest, str) or not uri or not digest:
        return "records no adapter (uri and digest)"
    if len(uri) > URI_MAX or not re.fullmatch(ADAPTER_URI_PATTERN, uri):
        return "records an adapter location the operator does not serve"
    try:
        check_uri(uri)
    except ValueError as exc:
        return f"records an unusable adapter location ({exc})"
    if not re.fullmatch(DIGEST_PATTERN, digest):
        return "records a digest that is not sha256:<64 hex>"
    return None


# ------------------------------------------------------------------ compatibility


def _container(deployment: dict[str, Any], name: str | None) -> dict[str, Any]:
    pod_spec = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    return dict(pod_spec["containers"][sb.find_container(pod_spec, name)])


def check_compatible(
    spec: AdapterDeploymentSpec,
    adep_name: str,
    deployment: dict[str, Any] | None,
    ref: sb.AdapterRef,
    *,
    configmaps: vllm_server.ConfigMaps | None = None,
    image_patterns: tuple[str, ...] | None = None,
) -> CompatResult:
    """Whether the target server can serve ``ref``; when not, the exact flag to change.

    With ``target.allowServerArgChanges`` the flags that only need raising
    (``--enable-lora``, ``--max-lora-rank``, ``--max-loras``) come back as changes
    instead of a refusal. The Runtime strategy never restarts pods, so it cannot
    change flags.
    """
    tgt = spec.target
    if deployment is None:
        return CompatResult(
            False,
            Reason.TARGET_NOT_FOUND,
            f"Deployment {tgt.deployment} not found in this namespace: create it or fix "
            "target.deployment",
        )
    try:
        args = vllm_server.inspect(
            deployment,
            container=tgt.container,
            configmaps=configmaps,
            image_patterns=image_patterns,
        )
    except ValueError as exc:
        return CompatResult(False, Reason.CONTAINER_NOT_FOUND, f"{exc}: fix target.container")
    cname = args.container
    if not args.vllm:
        return CompatResult(
            False,
            Reason.SERVER_NOT_DETECTED,
            f"{args.problems[0]}: set target.container to the vLLM container "
            "(docs/adapterdeployment.md lists the forms the operator reads)",
        )
    invalid = _problem(args, "--lora-modules: ")
    if invalid is not None:
        return CompatResult(False, Reason.SERVER_ARGS_INVALID, f"container {cname}: {invalid}")
    # The --config file may set any LoRA flag: without it nothing can be judged or edited.
    unread = _problem(args, "--config ") if args.config_file else None
    if unread is not None:
        return CompatResult(False, Reason.SERVER_CONFIG_UNREADABLE, f"container {cname}: {unread}")
    if args.port_known and args.port != tgt.port:
        # The operator would call a port nothing listens on: every load and smoke request
        # would fail as if the adapter were at fault.
        server_side = (
            f"port: in the server's --config file {args.config_file}"
            if args.port_from_config
            else "the server's --port"
        )
        return CompatResult(
            False,
            Reason.TARGET_PORT_MISMATCH,
            f"target.port is {tgt.port} but the vLLM server of container {cname} listens on "
            f"port {args.port}: set spec.target.port to {args.port}, or change {server_side} "
            f"to {tgt.port}",
        )
    owners = ((deployment.get("metadata") or {}).get("annotations") or {}).get(
        sb.owner_annotation(spec.adapter_name)
    )
    if owners and owners != adep_name:
        return CompatResult(
            False,
            Reason.ADAPTER_NAME_TAKEN,
            f"AdapterDeployment {owners} already serves adapterName {spec.adapter_name} on "
            f"Deployment {tgt.deployment}: choose another adapterName",
        )
    runtime = spec.strategy.type == "Runtime"
    if runtime and args.api_server_count > 1:
        # vLLM refuses to start with runtime updating on and several API-server processes
        # (vllm/entrypoints/cli/serve.py): there is no running server to load into.
        return CompatResult(
            False,
            Reason.RUNTIME_UPDATES_DISABLED,
            f"container {cname} runs {args.api_server_count} API-server processes "
            "(--api-server-count, or --data-parallel-size above 1 on vLLM 0.20 and later) and "
            f"vLLM does not start with {RUNTIME_UPDATES_ENV} on in that case: use strategy "
            "Rolling, or run one API server (--api-server-count 1)",
        )
    if runtime and args.runtime_lora_updating is False:
        return CompatResult(
            False,
            Reason.RUNTIME_UPDATES_DISABLED,
            f"container {cname} does not allow loading adapters at runtime: set the "
            f"environment variable {RUNTIME_UPDATES_ENV}=True in it, or use strategy Rolling",
        )
    allow = tgt.allow_server_arg_changes and not runtime
    how = (
        "(the Runtime strategy never restarts pods: change it in the Deployment, or use Rolling)"
        if runtime
        else "(or set target.allowServerArgChanges: true)"
    )
    enable = False
    if not args.enable_lora:
        if not allow:
            return CompatResult(
                False,
                Reason.LORA_NOT_ENABLED,
                f"container {cname}: add --enable-lora to its args {how}",
            )
        enable = True
    if ref.base_model:
        same = vllm_args.same_base_model(
            ref.base_model, [n for n in [*args.base_model_names, args.model] if n]
        )
        if same is False:
            served = args.model or ", ".join(args.base_model_names)
            return CompatResult(
                False,
                Reason.BASE_MODEL_MISMATCH,
                f"the adapter was trained on {ref.base_model} but container {cname} serves "
                f"{served}: target a Deployment serving {ref.base_model}",
            )
    rank_setting: int | None = None
    if ref.rank is not None and ref.rank > args.max_lora_rank:
        try:
            needed = vllm_args.rank_setting_for(ref.rank, args.version)
        except vllm_args.ServerArgsError as exc:
            return CompatResult(False, Reason.RANK_TOO_LARGE, str(exc))
        if not allow:
            return CompatResult(
                False,
                Reason.RANK_TOO_LARGE,
                f"adapter rank {ref.rank} is above --max-lora-rank {args.max_lora_rank} of "
                f"container {cname} (vLLM refuses to start): set --max-lora-rank {needed} "
                f"{how}",
            )
        rank_setting = needed
    others = [m.name for m in args.lora_modules if m.name != spec.adapter_name]
    wanted = len(others) + 1
    loras_setting: int | None = None
    if wanted > args.max_loras:
        if not allow:
            return CompatResult(
                False,
                Reason.TOO_MANY_ADAPTERS,
                f"container {cname} would serve {wanted} adapters ({', '.join([*others, spec.adapter_name])}) "
                f"but --max-loras is {args.max_loras}: set --max-loras {wanted} {how}",
            )
        loras_setting = wanted
    changes = sb.ServerArgChanges(enable, rank_setting, loras_setting)
    msg = "server accepts the adapter"
    if changes.any():
        msg += " after raising: " + ", ".join(describe_changes(changes))
    return CompatResult(True, Reason.COMPATIBLE, msg, changes)


RUNTIME_UPDATES_ENV = vllm_server.RUNTIME_UPDATES_ENV


def _problem(server: vllm_server.ServerModel, prefix: str) -> str | None:
    return next((q for q in server.problems if q.startswith(prefix)), None)


def runtime_updates_allowed(
    container: dict[str, Any], configmaps: vllm_server.ConfigMaps | None = None
) -> bool | None:
    """Whether vLLM's runtime LoRA endpoints are on, read as vLLM's envs.py reads them.

    Only ``1`` or ``true`` (any case, surrounding blanks ignored) count as on. None when it
    cannot be told: the variable comes from a Secret or a ConfigMap the operator lacks.
    """
    return vllm_server.runtime_lora_updating(container, configmaps)


def describe_changes(changes: sb.ServerArgChanges) -> list[str]:
    out = []
    if changes.enable_lora:
        out.append("--enable-lora")
    if changes.max_lora_rank is not None:
        out.append(f"--max-lora-rank {changes.max_lora_rank}")
    if changes.max_loras is not None:
        out.append(f"--max-loras {changes.max_loras}")
    return out


def runtime_path(deployment: dict[str, Any], container: str | None, ref: sb.AdapterRef) -> Verdict:
    """The path a running server loads ``ref`` from, without restarting its pods.

    ``file://`` paths are used as they are; ``pvc://claim/dir`` needs the claim already
    mounted in the server container. s3/hf need a fetch step, which only a restart gives.
    """
    uri = StorageUri.parse(ref.uri)
    if uri.scheme == "file":
        return Verdict(True, Reason.RESOLVED, uri.path)
    if uri.scheme == "pvc":
        claim, sub = uri.claim, uri.path
        pod_spec = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
        vols = {
            v.get("name"): v
            for v in pod_spec.get("volumes") or []
            if (v.get("persistentVolumeClaim") or {}).get("claimName") == claim
        }
        main = _container(deployment, container)
        for mount in main.get("volumeMounts") or []:
            if mount.get("name") in vols:
                mounted = str(mount.get("subPath") or "").strip("/")
                if mounted and not (sub == mounted or sub.startswith(mounted + "/")):
                    continue
                rest = sub[len(mounted) :].strip("/") if mounted else sub
                base = str(mount["mountPath"]).rstrip("/")
                return Verdict(True, Reason.RESOLVED, f"{base}/{rest}" if rest else base)
        return Verdict(
            False,
            Reason.ADAPTER_NOT_MOUNTED,
            f"the Runtime strategy loads from volumes the server already has: mount PVC "
            f"{claim} in container {main.get('name')}, or use strategy Rolling",
        )
    return Verdict(
        False,
        Reason.ADAPTER_NOT_MOUNTED,
        f"{ref.uri}: the Runtime strategy cannot fetch s3:// or hf:// adapters into running "
        "pods: use strategy Rolling or Canary (they fetch in an init container)",
    )


# ------------------------------------------------------------------ rollout tracking

RolloutState = Literal["Complete", "InProgress", "Failed"]


@dataclass(frozen=True)
class RolloutView:
    state: RolloutState
    reason: str
    message: str
    ready_replicas: int = 0
    # Paused until something it depends on changes (no timer, no deadline meanwhile).
    waits_for_change: bool = False


def deployment_rollout(
    deployment: dict[str, Any] | None,
    adapter_name: str,
    digest: str | None,
    *,
    started_at: str | None,
    deadline_seconds: int,
    now: datetime,
) -> RolloutView:
    """How far the Deployment got in serving ``digest`` (None: the adapter removed).

    Complete follows ``kubectl rollout status``: the controller saw the latest template,
    every replica is updated and available, and no old replica is left. Failed when the
    Deployment reports ``ProgressDeadlineExceeded`` or our own deadline passes.
    """
    if deployment is None:
        return RolloutView("Failed", Reason.TARGET_NOT_FOUND, "the target Deployment disappeared")
    meta = deployment.get("metadata") or {}
    spec = deployment.get("spec") or {}
    st = deployment.get("status") or {}
    annotations = ((spec.get("template") or {}).get("metadata") or {}).get("annotations") or {}
    if annotations.get(sb.digest_annotation(adapter_name)) != digest:
        return RolloutView(
            "InProgress",
            Reason.TEMPLATE_NOT_UPDATED,
            "the pod template does not carry the adapter yet",
        )
    desired = int(spec.get("replicas", 1))
    ready = int(st.get("readyReplicas") or 0)
    observed = int(st.get("observedGeneration") or 0)
    if observed < int(meta.get("generation") or 0):
        # The status still describes the previous template (its conditions included).
        return _unless_overdue(
            RolloutView(
                "InProgress", Reason.ROLLING_OUT, "the Deployment controller has not seen the change yet", ready
            ),
            started_at, deadline_seconds, now,
        )  # fmt: skip
    for cond in st.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return RolloutView(
                "Failed",
                Reason.PROGRESS_DEADLINE_EXCEEDED,
                f"Deployment {meta.get('name')}: {cond.get('message') or 'progress deadline exceeded'}",
                ready,
            )
    updated = int(st.get("updatedReplicas") or 0)
    available = int(st.get("availableReplicas") or 0)
    total = int(st.get("replicas") or 0)
    if (
        observed >= int(meta.get("generation") or 0)
        and updated >= desired
        and available >= desired
        and total <= updated
    ):
        return RolloutView(
            "Complete", Reason.ROLLOUT_COMPLETE, f"{available}/{desired} replicas available", ready
        )
    start = parse_rfc3339(started_at)
    if start is not None and (now - start).total_seconds() > deadline_seconds:
        return RolloutView(
            "Failed",
            Reason.ROLLOUT_DEADLINE_EXCEEDED,
            f"only {available}/{desired} replicas available and {updated} updated after "
            f"{deadline_seconds}s (strategy.progressDeadlineSeconds): check the serving pods' "
            "events and logs",
            ready,
        )
    return RolloutView(
        "InProgress",
        Reason.ROLLING_OUT,
        f"{updated}/{desired} updated, {available}/{desired} available",
        ready,
    )


def _unless_overdue(
    view: RolloutView, started_at: str | None, deadline_seconds: int, now: datetime
) -> RolloutView:
    start = parse_rfc3339(started_at)
    if start is not None and (now - start).total_seconds() > deadline_seconds:
        return RolloutView(
            "Failed", Reason.ROLLOUT_DEADLINE_EXCEEDED,
            f"{view.message} after {deadline_seconds}s (strategy.progressDeadlineSeconds)",
            view.ready_replicas,
        )  # fmt: skip
    return view


# ------------------------------------------------------------------ canary analysis


@dataclass
class MetricsSample:
    """Counters read from one server's /metrics (cumulative since it started)."""

    requests: float = 0.0
    errors: float = 0.0
    successes: float = 0.0
    latency_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    latency_count: float = 0.0
    # Finished requests' generation: vllm:request_generation_tokens (_sum, _count) and
    # vllm:request_decode_time_seconds (_sum), observed together per finished request.
    generation_tokens: float = 0.0
    generation_requests: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens(self) -> float:
        """Tokens generated while decoding: each request's first token comes from prefill."""
        return max(0.0, self.generation_tokens - self.generation_requests)

    @property
    def tokens_per_second_per_request(self) -> float | None:
        """Decode tokens over decode time: the speed a request's stream sees, weighted by
        tokens. None without decode tokens; infinite when their time measured zero."""
        tokens = self.decode_tokens
        if tokens <= 0:
            return None
        return tokens / self.decode_seconds if self.decode_seconds > 0 else math.inf


def _restarted(prev: MetricsSample, cur: MetricsSample) -> bool:
    return (
        cur.requests < prev.requests
        or cur.latency_count < prev.latency_count
        or cur.generation_requests < prev.generation_requests
    )


def sample_delta(prev: MetricsSample | None, cur: MetricsSample) -> MetricsSample:
    """The window between two samples; a counter that went down means a restart."""
    if prev is None or _restarted(prev, cur):
        return cur
    return MetricsSample(
        requests=cur.requests - prev.requests,
        errors=max(0.0, cur.errors - prev.errors),
        successes=max(0.0, cur.successes - prev.successes),
        latency_buckets={
            le: max(0.0, n - prev.latency_buckets.get(le, 0.0))
            for le, n in cur.latency_buckets.items()
        },
        latency_count=cur.latency_count - prev.latency_count,
        generation_tokens=max(0.0, cur.generation_tokens - prev.generation_tokens),
        generation_requests=cur.generation_requests - prev.generation_requests,
        decode_seconds=max(0.0, cur.decode_seconds - prev.decode_seconds),
    )


def with_generation_of(window: MetricsSample, during: MetricsSample) -> MetricsSample:
    """``window`` with the generation counted in ``during`` added (the smoke requests: the
    client sees their answers, only the server their decode time)."""
    return replace(
        window,
        generation_tokens=window.generation_tokens + during.generation_tokens,
        generation_requests=window.generation_requests + during.generation_requests,
        decode_seconds=window.decode_seconds + during.decode_seconds,
    )


def sum_samples(samples: list[MetricsSample]) -> MetricsSample:
    out = MetricsSample()
    for s in samples:
        out.requests += s.requests
        out.errors += s.errors
        out.successes += s.successes
        out.latency_count += s.latency_count
        out.generation_tokens += s.generation_tokens
        out.generation_requests += s.generation_requests
        out.decode_seconds += s.decode_seconds
        for le, n in s.latency_buckets.items():
            out.latency_buckets[le] = out.latency_buckets.get(le, 0.0) + n
    return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Quantile from cumulative buckets by linear interpolation inside the bucket.

    Like Prometheus' ``histogram_quantile``: a quantile in the ``+Inf`` bucket returns
    the largest finite bound. None when the window holds no observations.
    """
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                finite = [b for b in bounds if b != float("inf")]
                return finite[-1] if finite else None
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return bounds[-1]


@dataclass(frozen=True)
class SmokeResult:
    ok: bool
    latency_ms: float
    error: str | None = None
    status: int | None = None  # HTTP status; None when no answer came

    @property
    def server_error(self) -> bool:
        """A 5xx: the server failed the request (judged by the error rate)."""
        return self.status is not None and self.status >= 500


@dataclass(frozen=True)
class CanaryDecision:
    action: Literal["continue", "promote", "abort"]
    reason: str
    message: str
    checks_passed: int
    error_rate: float | None
    latency_p95_ms: float | None
    requests: int
    tokens_per_second: float | None = None  # per request while decoding; None: no data


def decide_canary(
    analysis: CanaryAnalysis,
    window: MetricsSample,
    smoke: list[SmokeResult],
    checks_passed: int,
) -> CanaryDecision:
    """One analysis check: abort on a failed smoke request or a threshold breach, count
    a passing check, promote after ``analysis.checks`` passing checks.

    ``window`` holds the traffic of the window, smoke requests included. A smoke request
    answered with a 5xx counts in the error rate like any request; one that got no
    answer or a 4xx (typically 404: the server does not know the adapter) shows the
    adapter is not served at all, which no threshold excuses.
    """
    requests = int(window.requests)
    error_rate = window.errors / window.requests if window.requests > 0 else None
    p95_s = histogram_quantile(0.95, window.latency_buckets)
    p95_ms = None if p95_s is None else p95_s * 1000.0
    failed = [s for s in smoke if not s.ok and not s.server_error]

    speed = window.tokens_per_second_per_request

    def verdict(
        action: Literal["continue", "promote", "abort"], reason: str, msg: str, passed: int
    ) -> CanaryDecision:
        return CanaryDecision(action, reason, msg, passed, error_rate, p95_ms, requests, speed)

    if failed:
        return verdict(
            "abort",
            Reason.CANARY_SMOKE_FAILED,
            f"{len(failed)}/{len(smoke)} smoke requests to the canary failed: {failed[0].error}",
            checks_passed,
        )
    judged = requests > 0 and requests >= analysis.min_requests
    if judged and error_rate is not None and error_rate > analysis.max_error_rate:
        return verdict(
            "abort",
            Reason.CANARY_ERROR_RATE,
            f"error rate {error_rate:.1%} over {requests} requests is above "
            f"maxErrorRate {analysis.max_error_rate:.1%}",
            checks_passed,
        )
    if judged and p95_ms is not None and p95_ms > analysis.max_latency_p95_ms:
        return verdict(
            "abort",
            Reason.CANARY_LATENCY,
            f"p95 latency {p95_ms:.0f} ms over {requests} requests is above "
            f"maxLatencyP95Ms {analysis.max_latency_p95_ms:.0f}",
            checks_passed,
        )
    minimum = analysis.min_tokens_per_second_per_request
    if judged and minimum is not None and speed is not None and speed < minimum:
        return verdict(
            "abort", Reason.CANARY_SLOW_GENERATION, slow_generation_message(window, minimum),
            checks_passed,
        )  # fmt: skip
    if not judged:
        return verdict(
            "continue",
            Reason.WAITING_FOR_TRAFFIC,
            f"{requests} requests in this window, analysis needs at least "
            f"{max(1, analysis.min_requests)}",
            checks_passed,
        )
    if minimum is not None and speed is None:
        # Only answers of one token (or a server without the metrics): nothing to judge
        # the speed on, so this check neither passes nor fails.
        return verdict(
            "continue",
            Reason.WAITING_FOR_TRAFFIC,
            f"{requests} requests in this window but none generated more than one token "
            "(vllm:request_generation_tokens, vllm:request_decode_time_seconds); "
            "minTokensPerSecondPerRequest needs longer answers, e.g. a smokePrompt that "
            "asks for a sentence",
            checks_passed,
        )
    passed = checks_passed + 1
    if passed >= analysis.checks:
        return verdict(
            "promote", Reason.CANARY_PASSED, f"{passed}/{analysis.checks} checks passed", passed
        )
    return verdict(
        "continue", Reason.ANALYZING, f"{passed}/{analysis.checks} checks passed", passed
    )


def slow_generation_message(window: MetricsSample, minimum: float) -> str:
    """Measured against required speed, and what to change."""
    speed = window.tokens_per_second_per_request or 0.0
    return (
        f"generation speed {speed:.1f} tokens/s per request ({window.decode_tokens:.0f} "
        f"tokens decoded in {window.decode_seconds:.1f} s over "
        f"{window.generation_requests:.0f} requests) is below minTokensPerSecondPerRequest "
        f"{minimum:g}: serve the adapter on faster GPUs or with less load per replica "
        "(--max-num-seqs, more replicas), use a lower LoRA rank or --max-lora-rank, or "
        "lower the minimum"
    )


# ------------------------------------------------------------------ runtime loading


@dataclass(frozen=True)
class PodView:
    """One serving pod: readiness and what its server says it has loaded."""

    name: str
    ready: bool
    endpoint: str | None
    loaded: dict[str, str] | None  # adapter name -> path, from /v1/models; None: unreachable


@dataclass(frozen=True)
class PodAction:
    pod: str
    action: Literal["load", "reload", "unload"]


@dataclass(frozen=True)
class RuntimePlan:
    actions: list[PodAction]
    serving: dict[str, str | None]  # pod -> digest it serves after the actions succeed
    ready_pods: int
    done: bool


def not_taken(listed_path: str | None, path: str | None) -> bool:
    """Whether a pod listing the adapter from ``listed_path`` shows that a load from
    ``path`` did not take (the call failed without a final answer). A server that names
    no path cannot say; the same path cannot tell two versions apart."""
    return bool(path and listed_path and listed_path != path)


def plan_runtime(
    pods: list[PodView],
    adapter_name: str,
    digest: str | None,
    recorded: dict[str, str | None],
    path: str | None,
) -> RuntimePlan:
    """Which Ready pods need the adapter (re)loaded or unloaded.

    ``recorded`` is what the operator loaded earlier (status.pods): what its calls leave
    once they succeed. A pod whose server no longer lists the adapter restarted (or is
    new): load. A pod that lists it but was recorded with another digest, or lists it from
    another path than ``path`` (the revision's: a call recorded as made did not take),
    needs a reload. ``digest`` None removes the adapter everywhere.
    """
    actions: list[PodAction] = []
    serving: dict[str, str | None] = {}
    ready = [p for p in pods if p.ready and p.endpoint]
    for pod in ready:
        if pod.loaded is None:
            serving[pod.name] = recorded.get(pod.name)
            continue
        listed = adapter_name in pod.loaded
        have = recorded.get(pod.name) if listed else None
        if digest is None:
            if listed:
                actions.append(PodAction(pod.name, "unload"))
            serving[pod.name] = None
            continue
        if not listed:
            actions.append(PodAction(pod.name, "load"))
        elif have != digest or not_taken(pod.loaded.get(adapter_name), path):
            actions.append(PodAction(pod.name, "reload"))
        serving[pod.name] = digest
    unreachable = any(p.loaded is None for p in ready)
    return RuntimePlan(
        actions, serving, len(ready), not actions and not unreachable and bool(ready)
    )


# ------------------------------------------------------------------ revision history


def revision_ref(adapter_name: str, revision: AdapterRevision) -> sb.AdapterRef:
    return sb.AdapterRef(
        adapter_name, revision.uri, revision.digest, revision.base_model, revision.rank
    )


def resolve_desired(
    spec: AdapterDeploymentSpec,
    status: AdapterDeploymentStatus,
    source: SourceResult,
) -> SourceResult:
    """Apply ``rollback.toRevision``: serve an earlier revision instead of the source."""
    wanted = spec.rollback.to_revision
    if wanted is None:
        return source
    history = status.history or []
    for rev in history:
        if rev.revision == wanted:
            ref = revision_ref(spec.adapter_name, rev)
            return SourceResult(
                True, Reason.ROLLBACK_TO_REVISION, f"revision {wanted}: {ref.uri}", ref
            )
    have = ", ".join(str(r.revision) for r in history) or "none"
    return SourceResult(
        False,
        Reason.REVISION_NOT_FOUND,
        f"rollback.toRevision {wanted} is not in status.history (have: {have}); "
        "pick one of those or remove rollback.toRevision",
    )


def next_revision(status: AdapterDeploymentStatus) -> int:
    numbers = [r.revision for r in status.history or []]
    canary = status.canary.revision if status.canary else None
    for rev in (status.current, status.previous, canary):
        if rev is not None:
            numbers.append(rev.revision)
    return max(numbers, default=0) + 1


def new_revision(status: AdapterDeploymentStatus, ref: sb.AdapterRef, now: str) -> AdapterRevision:
    return AdapterRevision(
        revision=next_revision(status),
        uri=ref.uri,
        digest=ref.digest,
        base_model=ref.base_model or None,
        rank=ref.rank,
        deployed_at=now,
        outcome=Outcome.PROGRESSING,
    )


def record_history(
    history: list[AdapterRevision] | None, rev: AdapterRevision
) -> list[AdapterRevision]:
    """History with ``rev`` added or updated in place, newest last, at most 20 entries."""
    out = [r.model_copy() for r in history or [] if r.revision != rev.revision]
    out.append(rev.model_copy())
    out.sort(key=lambda r: r.revision)
    return out[-MAX_HISTORY:]


def same_adapter(rev: AdapterRevision | None, ref: sb.AdapterRef) -> bool:
    return rev is not None and rev.digest == ref.digest and rev.uri == ref.uri


REJECTED = (Outcome.ROLLED_BACK, Outcome.CANARY_ABORTED, Outcome.FAILED)


def already_rejected(
    status: AdapterDeploymentStatus, ref: sb.AdapterRef, generation: int
) -> AdapterRevision | None:
    """The history entry that already failed with this adapter for this generation.

    A rolled-back or aborted adapter is not retried until the spec changes, so a bad
    adapter cannot flap the serving pods.
    """
    if (status.observed_generation or -1) != generation:
        return None
    for rev in reversed(status.history or []):
        if same_adapter(rev, ref):
            return rev if rev.outcome in REJECTED else None
    return None
