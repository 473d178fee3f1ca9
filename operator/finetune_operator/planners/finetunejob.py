"""Decide a FineTuneJob's status and the operator's next actions from what was observed.

Pure: the handler observes (the FineTuneJob, its trainer Job and pods, the log tail, which
referenced PVCs/Secrets exist, the price table), calls :func:`plan`, then carries out the
returned actions and writes the returned status. Running :func:`plan` again on the same
observation gives the same result, which makes every handler safe to repeat.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError

from .. import estimator as est
from .. import packed_memory as packed
from ..api.common import get_condition, set_condition
from ..api.finetunejob import MUTABLE_AFTER_START, FineTuneJobSpec
from ..api.trainer_output import AdapterOutput, DataLine, ProgressLine, TrainerResult
from ..builders import distributed, names
from ..builders.trainer import (
    GPU_PRODUCT_LABEL,
    TRAINER_CONTAINER,
    pod_paths,
    resolve_trainer_config,
    trainer_configmap,
    trainer_job,
)
from ..config import OperatorConfig
from ..gates import evaluate_gates, summarize
from ..policy import NamespaceUsage, apply_defaults, refusal_message
from .events import Event
from .progress import (
    TrainerOutputError,
    data_status,
    last_of,
    numeric_metrics,
    parse_lines,
    parse_result,
    progress_status,
)

MODEL_SHAPE_ANNOTATION = "finetune.dev/model-shape"

# Condition types, in the order they appear in status.
VALIDATED = "Validated"
FITS = "Fits"
ADMITTED = "Admitted"
TRAINING = "Training"
EVALUATED = "Evaluated"
GATES_PASSED = "GatesPassed"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
CONDITION_TYPES = (VALIDATED, FITS, ADMITTED, TRAINING, EVALUATED, GATES_PASSED, SUCCEEDED, FAILED)

# Status fields that describe one run; a new run starts without them.
RUN_FIELDS = (
    "trainerJob",
    "progress",
    "estimate",
    "data",
    "metrics",
    "baseMetrics",
    "comparedMetrics",
    "comparedError",
    "gates",
    "gatesSummary",
    "adapter",
    "cost",
    "restarts",
    "startedAt",
    "completedAt",
)

# While a run goes on, status.cost is refreshed once this much wall time (per GPU) has
# passed since the recorded figure; it is exact once the run ends.
COST_REFRESH_SECONDS = 300.0

# Condition reasons that warrant a Warning event when they appear.
WARNING_REASONS = frozenset(
    {
        "InvalidSpec",
        "UnsupportedSpec",
        "ReferenceNotFound",
        "InsufficientGPUMemory",
        "ImagePullFailed",
        "ContainerConfigError",
        "Unschedulable",
        "OOMKilled",
        "OutOfMemory",
        "DataUnusable",
        "DataNotFound",
        "ModelNotFound",
        "InvalidConfig",
        "TrainingFailed",
        "EvaluationFailed",
        "UploadFailed",
        "GatesFailed",
        "DeadlineExceeded",
        "BackoffLimitExceeded",
        "TrainerJobMissing",
        "ResultMissing",
        "SpecChangeDeferred",
        "SuspendNotSupportedWithQueue",
        "PodFailed",
        "JobRejected",
        "PolicyViolation",
        "QuotaExceeded",
        "AdmissionDenied",
        "ChildInvalid",
        "ChildForbidden",
        "ChildNameTaken",
        "TrainerOutputInvalid",
    }
)

# Reasons of a run the API server refused to start (a child was not accepted). The verdict
# holds for the spec generation it was given to: only a spec change tries again.
REFUSAL_REASONS = frozenset(
    {"QuotaExceeded", "AdmissionDenied", "ChildInvalid", "ChildForbidden", "ChildNameTaken"}
)
# How much of the API server's answer a condition quotes.
SERVER_MESSAGE_LIMIT = 1000

# What to do about each failure the trainer reports (its message says the specifics).
TRAINER_REASON_ADVICE = {
    "DataUnusable": "fix the dataset (see status.data) or relax dataset.cleaning limits",
    "DataNotFound": "check dataset.train/eval URIs and that the files exist",
    "ModelNotFound": "check baseModel.uri (and its revision) and its credentials Secret",
    "InvalidConfig": "fix the spec field named above",
    "TrainingFailed": "read the trainer log (kubectl logs job/{job})",
    "EvaluationFailed": "read the trainer log (kubectl logs job/{job}); evaluation settings may be too large",
    "UploadFailed": "check spec.output.uri (the bucket must exist) and the keys of spec.output.credentialsSecretRef (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for non-AWS services)",
}


# ---------------------------------------------------------------- inputs and outputs


@dataclass(frozen=True)
class PriceTable:
    prices: Mapping[str, float]
    currency: str = "USD"
    default: float | None = None

    def price(self, product: str | None) -> float | None:
        if product and product in self.prices:
            return self.prices[product]
        return self.default

    @classmethod
    def from_configmap_data(cls, data: Mapping[str, str] | None) -> PriceTable | None:
        """``{gpuProduct: pricePerHour, currency: EUR, default: 2.0}``; bad entries skipped."""
        if not data:
            return None
        prices: dict[str, float] = {}
        default = None
        for key, raw in data.items():
            if key == "currency":
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                continue
            if key == "default":
                default = value
            else:
                prices[key] = value
        return cls(prices=prices, currency=str(data.get("currency", "USD"))[:8], default=default)


@dataclass(frozen=True)
class Observed:
    """Everything the planner needs, gathered by the handler."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    annotations: Mapping[str, str] = field(default_factory=dict)
    job: Mapping[str, Any] | None = None
    configmap: Mapping[str, Any] | None = None
    pods: tuple[Mapping[str, Any], ...] = ()
    log_tail: str | None = None
    missing_refs: tuple[str, ...] | None = None  # None: not checked (not needed)
    prices: PriceTable | None = None
    # The FineTuneJob or its namespace is being deleted: what is missing now is being
    # removed on purpose, not lost (decision 1620).
    going_away: bool = False
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    # GPUs held by the namespace's other unfinished runs (for the platform policy).
    namespace_usage: NamespaceUsage = field(default_factory=NamespaceUsage)


@dataclass(frozen=True)
class Action:
    """One write to the Kubernetes API."""

    verb: Literal["create", "patch", "delete"]
    kind: Literal["ConfigMap", "Job", "Service"]
    name: str
    body: dict[str, Any] | None = None


@dataclass
class Plan:
    status: dict[str, Any]
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # "permanent": nothing will change until the spec does; "retry": try again soon.
    outcome: Literal["ok", "permanent", "retry"] = "ok"
    message: str = ""

    @property
    def needs_run(self) -> bool:
        return self.outcome == "ok" and not is_terminal(self.status)


# ---------------------------------------------------------------- small helpers


def spec_hash(spec: FineTuneJobSpec) -> str:
    """Hash of the fields that define a run (those that may change mid-run left out)."""
    wire = spec.to_wire()
    for key in MUTABLE_AFTER_START:
        wire.pop(key, None)
    blob = json.dumps(wire, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def is_terminal(status: Mapping[str, Any]) -> bool:
    """Whether the recorded run has finished (Succeeded or Failed is True)."""
    return _cond_true(status, SUCCEEDED) or _cond_true(status, FAILED)


def is_settled(status: Mapping[str, Any], generation: int) -> bool:
    """A finished run whose verdict already reflects the current spec: reconciling it again
    can change nothing, so nothing needs to be observed.

    Not settled while a spec change waits for the run to end (Validated reason
    ``SpecChangeDeferred``): that change starts a new run once this one finished.
    """
    if not is_terminal(status) or status.get("observedGeneration") != generation:
        return False
    validated = get_condition(list(status.get("conditions") or []), VALIDATED) or {}
    return validated.get("reason") != "SpecChangeDeferred"


def _cond_true(status: Mapping[str, Any], type_: str) -> bool:
    cond = get_condition(list(status.get("conditions") or []), type_)
    return cond is not None and cond.get("status") == "True"


def run_generation(job_name: str | None) -> int | None:
    """The generation a trainer Job was built for, from its deterministic name."""
    if not job_name:
        return None
    m = re.search(r"-train-g([0-9]+)$", job_name)
    return int(m.group(1)) if m else None


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _job_condition(job: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return dict(cond)
    return None


def pod_age_key(pod: Mapping[str, Any]) -> tuple[str, bool, str]:
    """Oldest first; a replacement pod created in the same second as the pod it replaces
    (an eviction) sorts after it, so "the newest pod" is the one still running."""
    meta = pod.get("metadata") or {}
    finished = (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded")
    return (str(meta.get("creationTimestamp") or ""), not finished, str(meta.get("name") or ""))


_pod_sort_key = pod_age_key


def _container_status(pod: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == name:
            return dict(cs)
    return None


# ---------------------------------------------------------------- the status builder


class _Status:
    """Accumulates the desired status, starting from the current one."""

    def __init__(self, current: Mapping[str, Any], generation: int, now: datetime) -> None:
        self.data: dict[str, Any] = json.loads(json.dumps(dict(current)))
        self.data["conditions"] = list(self.data.get("conditions") or [])
        self.generation = generation
        self.now = _rfc3339(now)

    def cond(
        self,
        type_: str,
        status: Literal["True", "False", "Unknown"],
        reason: str,
        message: str = "",
    ) -> None:
        self.data["conditions"] = set_condition(
            self.data["conditions"],
            type_,
            status,
            reason,
            message[:4096],
            generation=self.generation,
            now=self.now,
        )

    def drop(self, *types: str) -> None:
        self.data["conditions"] = [c for c in self.data["conditions"] if c.get("type") not in types]

    def finish(self, phase: str) -> dict[str, Any]:
        self.data["phase"] = phase
        self.data["observedGeneration"] = self.generation
        for c in self.data["conditions"]:
            if not str(c.get("message") or "").strip():
                c["message"] = _default_message(c)
        order = {t: i for i, t in enumerate(CONDITION_TYPES)}
        self.data["conditions"].sort(key=lambda c: order.get(c.get("type"), len(order)))
        return {k: v for k, v in self.data.items() if v is not None}


def _default_message(c: Mapping[str, Any]) -> str:
    """A message for a condition set without one: every condition says what it means."""
    type_, status, reason = c.get("type"), c.get("status"), c.get("reason")
    if type_ == SUCCEEDED and status == "False":
        return f"the run failed ({reason}); the Failed condition says what to change"
    if type_ == FAILED and status == "False":
        return "the run succeeded"
    return f"{type_} is {status} ({reason})"


# Normal condition changes that make an event: the milestones a user waits for. Every other
# Normal change (Validated, Fits, a first Admitted=NoQueue, Evaluated, GatesPassed...) is in
# status only; a Warning always makes one. See decision 1201.
MILESTONES = frozenset(
    {
        (ADMITTED, "True", "Admitted"),  # Kueue admitted the queued Job
        (TRAINING, "True", "Running"),  # the trainer pod started
        (SUCCEEDED, "True", "Succeeded"),  # the verdict, gates passed, adapter recorded
    }
)


def transition_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """Events for the condition changes a user acts on or waits for (messages carry no
    secrets): a Warning for each failure or problem that appears or changes, a Normal event
    for each milestone reached. Conditions list everything else."""
    events: list[Event] = []
    before = {c.get("type"): c for c in old.get("conditions") or []}
    for cond in new.get("conditions") or []:
        prev = before.get(cond.get("type"))
        key = (cond.get("type"), cond.get("status"), cond.get("reason"))
        if prev and (prev.get("status"), prev.get("reason")) == key[1:]:
            continue
        reason = str(cond.get("reason") or cond.get("type"))
        warning = reason in WARNING_REASONS or (
            cond.get("type") == FAILED and cond.get("status") == "True"
        )
        if not warning and key not in MILESTONES:
            continue
        text = f"{cond.get('type')}={cond.get('status')}"
        if cond.get("message"):
            text += f": {cond['message']}"
        event = Event("Warning" if warning else "Normal", reason, text[:1024])
        # One failure often sets several conditions to the same reason (GatesPassed,
        # Succeeded and Failed for GatesFailed): one event, the last (Failed's) message.
        events = [e for e in events if e.reason != reason] + [event]
    return events


# ---------------------------------------------------------------- preflight


@dataclass(frozen=True)
class FitResult:
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    batch: int | None = None
    gradient_checkpointing: bool | None = None
    estimate: dict[str, Any] | None = None


def model_shape(
    spec: FineTuneJobSpec,
    annotations: Mapping[str, str],
    model_config: tuple[Mapping[str, Any], str] | None = None,
) -> tuple[est.ModelShape | None, str]:
    """The base model's shape from the annotation hint, the model's own ``config.json``
    (``(parsed, where)``, when the caller can read it: local mode) or the known families,
    with its source."""
    raw = annotations.get(MODEL_SHAPE_ANNOTATION)
    if not raw and model_config is not None:
        parsed, where = model_config
        try:
            return est.ModelShape.from_hf_config(dict(parsed)), f"config.json in {where}"
        except (TypeError, ValueError, KeyError) as exc:
            return None, f"config.json in {where} is not usable: {exc}"
    if raw:
        try:
            return est.shape_from_hint(
                json.loads(raw) if raw.strip().startswith(("{", '"')) else raw
            ), (f"annotation {MODEL_SHAPE_ANNOTATION}")
        except ValueError as exc:
            return None, f"annotation {MODEL_SHAPE_ANNOTATION} is not usable: {exc}"
    family = est.family_from_uri(spec.base_model.uri)
    if family is not None:
        return est.MODEL_FAMILIES[family], f"known family {family}"
    return None, "the model is not a known family"


def check_fit(
    spec: FineTuneJobSpec,
    annotations: Mapping[str, str],
    config: OperatorConfig,
    model_config: tuple[Mapping[str, Any], str] | None = None,
) -> FitResult:
    """Whether the run fits the GPU; resolves ``auto`` batch and unset checkpointing."""
    res = spec.resources
    user_batch = spec.training.batch_size if isinstance(spec.training.batch_size, int) else None
    user_gc = spec.training.gradient_checkpointing
    if res.gpus == 0:
        return FitResult(
            "Unknown", "NoGPU", "resources.gpus is 0: training runs on CPU; no GPU memory check"
        )
    shape, source = model_shape(spec, annotations, model_config)
    if shape is None:
        return FitResult(
            "Unknown",
            "ModelShapeUnknown",
            f"cannot predict GPU memory: {source}. The trainer checks again with the model's "
            f"config.json; to check before scheduling, annotate the FineTuneJob with "
            f'{MODEL_SHAPE_ANNOTATION}: \'{{"family": "llama-3-8b"}}\' (known: '
            f"{', '.join(sorted(est.MODEL_FAMILIES))}) or a config.json-style object",
        )
    gpu_gib = res.gpu_memory_gi_b or est.gpu_memory_gib(
        res.gpu_product, config.gpu_memory_overrides
    )
    product = res.gpu_product or "the GPU"
    if gpu_gib is None and config.default_gpu_memory_gib > 0:
        gpu_gib = config.default_gpu_memory_gib
    if gpu_gib is None:
        why = (
            f"GPU product {res.gpu_product!r} is unknown"
            if res.gpu_product
            else "no resources.gpuProduct is set"
        )
        return FitResult(
            "Unknown",
            "GPUMemoryUnknown",
            f"cannot check the fit: {why}; set resources.gpuMemoryGiB (or a known gpuProduct)",
        )
    if spec.training.packing:
        return check_packed_fit(spec, shape, source, gpu_gib, product, config, user_batch, user_gc)
    setup = est.TrainingSetup.from_spec(spec)
    batch, gc, estimate = est.choose_batch_and_checkpointing(
        shape,
        setup,
        gpu_gib,
        batch=user_batch,
        gradient_checkpointing=user_gc,
        headroom=config.memory_headroom,
    )
    usable = gpu_gib * (1 - config.memory_headroom)
    record = {
        "peakGiB": estimate.peak_gib,
        "gpuMemoryGiB": round(gpu_gib, 2),
        "fits": estimate.fits(gpu_gib, config.memory_headroom),
        "batchSize": batch,
        "gradientCheckpointing": gc,
        "parameters": estimate.parameters,
        "breakdown": estimate.breakdown,
    }
    if record["fits"]:
        return FitResult(
            "True",
            "Fits",
            f"predicted peak {estimate.peak_gib:.1f} GiB per GPU of {usable:.1f} GiB usable on "
            f"{product} (batchSize {batch}, gradientCheckpointing {str(gc).lower()}; shape from {source})",
            batch,
            gc,
            record,
        )
    failing = est.TrainingSetup.from_spec(spec, micro_batch=batch, gc=gc)
    fixes = est.suggest_fixes(shape, failing, gpu_gib, headroom=config.memory_headroom)
    advice = (
        "; or ".join(str(f) for f in fixes)
        if fixes
        else "no setting of this job fits; use a GPU with more memory (resources.gpuProduct)"
    )
    return FitResult(
        "False",
        "InsufficientGPUMemory",
        f"predicted peak {estimate.peak_gib:.1f} GiB per GPU exceeds {usable:.1f} GiB usable on "
        f"{product} ({gpu_gib:.1f} GiB less {config.memory_headroom:.0%} headroom). To fit: {advice}",
        batch,
        gc,
        record,
    )


def check_packed_fit(
    spec: FineTuneJobSpec,
    shape: est.ModelShape,
    source: str,
    gpu_gib: float,
    product: str,
    config: OperatorConfig,
    user_batch: int | None,
    user_gc: bool | None,
) -> FitResult:
    """The fit of a packed run: memory depends on tokens per micro-batch, not rows.

    ``auto`` batch and unset checkpointing stay unresolved in the trainer's configuration:
    on the node the trainer plans again from the memory it finds free (same model, see
    ``packed_memory``). An explicit batch means batchSize x maxSeqLength tokens; when that
    or an explicit checkpointing choice does not fit, the trainer replaces it with the
    planner's, and so does this check.
    """
    t = spec.training
    usable = gpu_gib * (1 - config.memory_headroom)
    run: dict[str, Any] = {
        "method": spec.method,
        "lora_rank": spec.lora.r,
        "optimizer": t.optimizer,
        "lora_dropout": spec.lora.dropout,
    }
    try:
        plan, replaced = packed.plan_or_replace(
            shape,
            gradient_checkpointing=user_gc,
            tokens_per_micro_batch=user_batch * t.max_seq_length if user_batch else None,
            max_seq_length=t.max_seq_length,
            memory_budget_gib=usable,
            **run,
        )
    except ValueError as exc:
        return FitResult(
            "False",
            "InsufficientGPUMemory",
            f"{exc} ({product}: {gpu_gib:.1f} GiB less {config.memory_headroom:.0%} "
            "headroom; with packing the memory depends on maxSeqLength, not batchSize; "
            "lora.dropout 0 also saves memory)",
            user_batch,
            user_gc,
        )
    note = "; the requested batchSize/gradientCheckpointing do not fit and will be replaced"
    breakdown = packed.peak_breakdown_bytes(
        shape,
        tokens=plan.tokens_per_micro_batch,
        gradient_checkpointing=plan.gradient_checkpointing,
        **run,
    )
    record = {
        "peakGiB": plan.predicted_peak_gib,
        "gpuMemoryGiB": round(gpu_gib, 2),
        "fits": True,
        "batchSize": user_batch,
        "gradientCheckpointing": plan.gradient_checkpointing,
        "tokensPerMicroBatch": plan.tokens_per_micro_batch,
        "parameters": shape.parameters(),
        "breakdown": {k: round(v / packed.GIB, 2) for k, v in breakdown.items()},
    }
    return FitResult(
        "True",
        "Fits",
        f"predicted peak {plan.predicted_peak_gib:.1f} GiB per GPU of {usable:.1f} GiB usable on "
        f"{product} with packing ({plan.tokens_per_micro_batch} tokens per micro-batch, "
        f"gradientCheckpointing {str(plan.gradient_checkpointing).lower()}; shape from "
        f"{source}){note if replaced else ''}",
        None if replaced else user_batch,
        None if replaced else user_gc,
        record,
    )


def referenced_objects(spec: FineTuneJobSpec) -> tuple[list[str], list[str]]:
    """(PVC claim names, Secret names) the trainer pod needs."""
    claims: list[str] = []
    secrets: list[str] = []
    sources: list[tuple[str, Any]] = [
        (spec.base_model.uri, spec.base_model.credentials_secret_ref),
        (spec.dataset.train.uri, spec.dataset.train.credentials_secret_ref),
        (spec.output.uri, spec.output.credentials_secret_ref),
    ]
    if spec.dataset.eval is not None:
        sources.append((spec.dataset.eval.uri, spec.dataset.eval.credentials_secret_ref))
    for uri, ref in sources:
        if uri.startswith("pvc://"):
            claim = uri[len("pvc://") :].split("/", 1)[0]
            if claim not in claims:
                claims.append(claim)
        if ref is not None and ref.name not in secrets:
            secrets.append(ref.name)
    return claims, secrets


# ---------------------------------------------------------------- the plan


def plan(obs: Observed, config: OperatorConfig) -> Plan:
    """The desired status and actions for one observation."""
    if obs.going_away:
        # Children, references and the namespace disappear on purpose: nothing to report,
        # nothing to create (a status write or an event would only race the deletion).
        return Plan(dict(obs.status))
    st = _Status(obs.status, obs.generation, obs.now)
    try:
        spec = FineTuneJobSpec.model_validate(dict(obs.spec))
    except ValidationError as exc:
        return _invalid(obs, st, "InvalidSpec", _validation_message(exc))
    current_hash = spec_hash(spec)
    recorded_job = obs.status.get("trainerJob")
    run_hash = (
        ((obs.configmap or {}).get("metadata") or {})
        .get("annotations", {})
        .get(names.ANNOTATION_SPEC_HASH)
    )
    if obs.job is not None:
        run_hash = (
            (obs.job.get("metadata") or {})
            .get("annotations", {})
            .get(names.ANNOTATION_SPEC_HASH, run_hash)
        )

    if recorded_job is None and refused_for(obs.status, obs.generation):
        return Plan(dict(obs.status))  # refused for this spec: only a spec change tries again
    new_run_needed = recorded_job is None or (
        is_terminal(obs.status) and run_hash is not None and run_hash != current_hash
    )
    if new_run_needed:
        return _start_run(obs, st, spec, current_hash, config)
    return _track_run(obs, st, spec, current_hash, run_hash, str(recorded_job), config)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"spec.{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


def _invalid(obs: Observed, st: _Status, reason: str, message: str) -> Plan:
    st.cond(VALIDATED, "False", reason, message)
    running = (
        obs.job is not None
        and not _job_condition(obs.job, "Complete")
        and not _job_condition(obs.job, "Failed")
    )
    if not running:
        st.cond(FAILED, "True", reason, message)
        st.cond(SUCCEEDED, "False", reason, "")
    status = st.finish("Failed" if not running else str(obs.status.get("phase") or "Training"))
    return Plan(
        status, events=transition_events(obs.status, status), outcome="permanent", message=message
    )


def _start_run(
    obs: Observed, st: _Status, spec: FineTuneJobSpec, hash_: str, config: OperatorConfig
) -> Plan:
    # A new run (first, or after an edit of a finished one) starts from a clean slate.
    for key in RUN_FIELDS:
        st.data.pop(key, None)
    st.drop(ADMITTED, TRAINING, EVALUATED, GATES_PASSED, SUCCEEDED, FAILED)
    st.cond(VALIDATED, "True", "Valid", "spec is valid")

    refusal = refusal_message(spec, obs.namespace_usage, config.policy, config.trainer_image)
    if refusal:
        return _invalid(obs, st, "PolicyViolation", refusal)

    if obs.missing_refs:
        message = "; ".join(obs.missing_refs)
        st.cond(VALIDATED, "False", "ReferenceNotFound", message)
        st.drop(FAILED, SUCCEEDED)
        status = st.finish("Pending")
        return Plan(
            status, events=transition_events(obs.status, status), outcome="retry", message=message
        )

    fit = check_fit(spec, obs.annotations, config)
    st.cond(FITS, fit.status, fit.reason, fit.message)
    if fit.estimate is not None:
        st.data["estimate"] = fit.estimate
    if fit.status == "False":
        st.cond(FAILED, "True", fit.reason, fit.message)
        st.cond(SUCCEEDED, "False", fit.reason, "")
        status = st.finish("Failed")
        return Plan(
            status,
            events=transition_events(obs.status, status),
            outcome="permanent",
            message=fit.message,
        )
    st.drop(FAILED, SUCCEEDED)

    owner = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "name": obs.name,
        "uid": obs.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    trainer_config = resolve_trainer_config(
        obs.name,
        obs.namespace,
        obs.generation,
        spec,
        batch_size=fit.batch,
        gradient_checkpointing=fit.gradient_checkpointing,
        config=config,
    )
    cm = trainer_configmap(obs.name, obs.namespace, obs.generation, trainer_config, owner, hash_)
    # The pods get what the platform requires (node selector, tolerations, PriorityClass).
    pod_spec = apply_defaults(spec, config.policy)
    job = trainer_job(obs.name, obs.namespace, obs.generation, pod_spec, owner, config, hash_)
    # Several GPUs or nodes: torchrun options, and for nodes an Indexed Job + its Service.
    service = distributed.apply(job, spec, TRAINER_CONTAINER)
    job_name = job["metadata"]["name"]
    st.data["trainerJob"] = job_name
    actions = [Action("create", "ConfigMap", cm["metadata"]["name"], cm)]
    if service is not None:
        actions.append(Action("create", "Service", service["metadata"]["name"], service))
    actions.append(Action("create", "Job", job_name, job))
    if spec.resources.queue_name:
        st.cond(
            ADMITTED,
            "False",
            "Queued",
            f"waiting for Kueue LocalQueue {spec.resources.queue_name!r} to admit the Job",
        )
        phase = "Queued"
    elif spec.suspend:
        st.cond(ADMITTED, "False", "Suspended", "spec.suspend is true; set it to false to start")
        phase = "Suspended"
    else:
        st.cond(ADMITTED, "True", "NoQueue", "no queueName: the Job starts at once")
        phase = "Pending"
    st.cond(TRAINING, "False", "Pending", f"trainer Job {job_name} created")
    status = st.finish(phase)
    return Plan(status, actions=actions, events=transition_events(obs.status, status))


def refused_for(status: Mapping[str, Any], generation: int) -> bool:
    """Whether the API server refused to start a run of this spec generation."""
    failed = get_condition(list(status.get("conditions") or []), FAILED) or {}
    return (
        failed.get("status") == "True"
        and failed.get("reason") in REFUSAL_REASONS
        and failed.get("observedGeneration") == generation
    )


@dataclass(frozen=True)
class Refusal:
    """The API server's answer to the create of a child it did not accept."""

    kind: str
    name: str
    code: int
    reason: str = ""  # the Status reason (Forbidden, Invalid, ...)
    message: str = ""


def _quoted(message: str) -> str:
    text = " ".join(message.split())
    if len(text) > SERVER_MESSAGE_LIMIT:
        text = text[:SERVER_MESSAGE_LIMIT] + "..."
    return text


def classify_refusal(refusal: Refusal) -> tuple[str, str, bool]:
    """(condition reason, advice, whether the verdict is final) for a refused child.

    The advice follows the cause the server names: quota advice only for an exhausted
    ResourceQuota, field advice for an invalid object, policy advice for an admission
    webhook or policy. Only a refusal of the operator itself (RBAC) is retried: fixing it is
    the platform team's job and needs no change of the FineTuneJob.
    """
    text = refusal.message.lower()
    if "exceeded quota" in text:
        return (
            "QuotaExceeded",
            "the namespace's ResourceQuota is used up: delete finished FineTuneJobs or trainer "
            "Jobs, or ask the platform team for more; then change the spec (or delete and "
            "re-apply the FineTuneJob) to try again",
            True,
        )
    if "admission webhook" in text or "denied request" in text or "denied the request" in text:
        return (
            "AdmissionDenied",
            "an admission webhook or policy of the cluster refused it: change what the message "
            "names (ask the platform team which policy applies); then change the spec to try again",
            True,
        )
    if refusal.code in (400, 413, 422):
        return (
            "ChildInvalid",
            "a field copied from the spec is not valid for Kubernetes: fix the spec field the "
            "message names (resources.nodeSelector, tolerations, affinity, priorityClassName, "
            "queueName, gpuProduct...); the change starts a new run",
            True,
        )
    if refusal.code == 403 and "cannot create resource" in text:
        return (
            "JobRejected",
            "the operator's ServiceAccount may not create it: grant the chart's RBAC in this "
            "namespace (docs/install.md); the operator retries by itself",
            False,
        )
    if refusal.code == 409:
        return (
            "ChildNameTaken",
            f"a {refusal.kind} of that name exists and was not made by the operator: delete or "
            "rename it, or rename the FineTuneJob",
            True,
        )
    return (
        "ChildForbidden",
        "the API server forbids it (a LimitRange or an admission plugin): change the spec's "
        "resources so they fit what the message names, or ask the platform team; then change "
        "the spec to try again",
        True,
    )


def child_refused(obs: Observed, p: Plan, refusal: Refusal) -> Plan:
    """The API server refused a child of a new run (quota, webhook, LimitRange, invalid).

    What the run had created before the refusal is deleted. A final refusal is a Failed
    verdict for this spec generation (no retry loop); an RBAC refusal of the operator stays
    Pending and is retried.
    """
    reason, advice, final = classify_refusal(refusal)
    st = _Status(p.status, obs.generation, obs.now)
    st.data.pop("trainerJob", None)
    code = f"{refusal.code} {refusal.reason}".strip()
    text = (
        f"the API server refused the trainer {refusal.kind} {refusal.name} ({code}): "
        f"{_quoted(refusal.message)}. To fix: {advice}"
    )
    st.cond(TRAINING, "False", reason, text)
    made = [
        (a.kind, a.name)
        for a in p.actions
        if a.verb == "create" and (a.kind, a.name) != (refusal.kind, refusal.name)
    ]
    actions = [Action("delete", "ConfigMap", n) for k, n in made if k == "ConfigMap"]
    actions += [Action("delete", "Service", n) for k, n in made if k == "Service"]
    if final:
        st.drop(ADMITTED)
        st.cond(SUCCEEDED, "False", reason, "")
        st.cond(FAILED, "True", reason, text)
        status = st.finish("Failed")
        return Plan(status, actions=actions, events=transition_events(obs.status, status))
    status = st.finish("Pending")
    return Plan(
        status,
        actions=actions,
        events=transition_events(obs.status, status),
        outcome="retry",
        message=text,
    )


# ---------------------------------------------------------------- tracking a run


@dataclass
class _PodView:
    """What the newest trainer pod says."""

    phase: str = ""
    waiting_reason: str = ""
    waiting_message: str = ""
    waiting_container: str = ""
    unschedulable: str = ""
    terminated: Mapping[str, Any] | None = None
    running: bool = False


def _pod_view(pod: Mapping[str, Any] | None) -> _PodView:
    view = _PodView()
    if pod is None:
        return view
    status = pod.get("status") or {}
    view.phase = str(status.get("phase") or "")
    for cond in status.get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            view.unschedulable = str(cond.get("message") or "no node fits")
    statuses = list(status.get("initContainerStatuses") or []) + list(
        status.get("containerStatuses") or []
    )
    for cs in statuses:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in (
            "ErrImagePull",
            "ImagePullBackOff",
            "InvalidImageName",
            "CreateContainerConfigError",
            "CreateContainerError",
        ):
            view.waiting_reason = str(waiting["reason"])
            view.waiting_message = str(waiting.get("message") or "")
            view.waiting_container = str(cs.get("name") or "")
            break
    trainer = _container_status(pod, TRAINER_CONTAINER)
    if trainer:
        state = trainer.get("state") or {}
        view.running = "running" in state
        view.terminated = state.get("terminated")
    for cs in status.get("initContainerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term and term.get("exitCode", 0) != 0 and view.terminated is None:
            view.terminated = {**term, "container": cs.get("name")}
    return view


def _gpu_seconds(pods: tuple[Mapping[str, Any], ...], gpus: int, now: datetime) -> float:
    total = 0.0
    for pod in pods:
        start = _parse_time((pod.get("status") or {}).get("startTime"))
        if start is None:
            continue
        trainer = _container_status(pod, TRAINER_CONTAINER) or {}
        state = trainer.get("state") or {}
        end = _parse_time((state.get("terminated") or {}).get("finishedAt"))
        if end is None:
            phase = (pod.get("status") or {}).get("phase")
            end = now if phase in ("Running", "Pending", None, "") else start
        total += max(0.0, (end - start).total_seconds())
    return total * max(1, gpus)


def _local_to_uri(path: str, spec: FineTuneJobSpec) -> str:
    """The trainer reports local paths; translate the output directory back to spec.output.uri."""
    local_out = pod_paths(spec).paths.output_dir
    if path.startswith(local_out):
        return spec.output.uri.rstrip("/") + path[len(local_out) :]
    return path


def _adapter_record(adapter: AdapterOutput | None, spec: FineTuneJobSpec) -> dict[str, Any] | None:
    if adapter is None:
        return None
    record: dict[str, Any] = {
        "uri": _local_to_uri(adapter.uri, spec),
        "digest": adapter.digest,
        "baseModel": adapter.base_model or spec.base_model.uri,
        "method": adapter.method or spec.method,
    }
    if adapter.rank is not None:
        record["rank"] = adapter.rank
    if adapter.size_bytes is not None:
        record["sizeBytes"] = adapter.size_bytes
    if adapter.merged_uri:
        record["mergedUri"] = _local_to_uri(adapter.merged_uri, spec)
    return record


def _track_run(
    obs: Observed,
    st: _Status,
    spec: FineTuneJobSpec,
    current_hash: str,
    run_hash: str | None,
    job_name: str,
    config: OperatorConfig,
) -> Plan:
    st.cond(VALIDATED, "True", "Valid", "spec is valid")
    events: list[Event] = []
    actions: list[Action] = []
    job = obs.job
    terminal_before = is_terminal(obs.status)

    if terminal_before:
        # Finished runs keep their verdict; only a spec change starts a new one.
        status = st.finish(str(obs.status.get("phase")))
        return Plan(status, events=transition_events(obs.status, status))

    if job is None:
        message = (
            f"trainer Job {job_name} no longer exists and the run had not finished; change the "
            "spec (or delete and re-apply the FineTuneJob) to run again"
        )
        st.cond(TRAINING, "False", "TrainerJobMissing", message)
        st.cond(SUCCEEDED, "False", "TrainerJobMissing", "")
        st.cond(FAILED, "True", "TrainerJobMissing", message)
        status = st.finish("Failed")
        return Plan(status, events=transition_events(obs.status, status))

    if run_hash is not None and run_hash != current_hash:
        st.cond(
            VALIDATED,
            "True",
            "SpecChangeDeferred",
            f"spec changed while trainer Job {job_name} runs; only "
            f"{', '.join(MUTABLE_AFTER_START)} apply to a running job. The change starts a new run "
            "when this one finishes; delete the FineTuneJob to stop this run now",
        )

    # Settings that may change mid-run.
    job_spec = job.get("spec") or {}
    queue = (job.get("metadata") or {}).get("labels", {}).get("kueue.x-k8s.io/queue-name")
    patch: dict[str, Any] = {}
    finished = bool(_job_condition(job, "Complete") or _job_condition(job, "Failed"))
    if not finished:
        if not queue and bool(job_spec.get("suspend")) != spec.suspend:
            patch["suspend"] = spec.suspend
        if (
            spec.active_deadline_seconds != job_spec.get("activeDeadlineSeconds")
            and spec.active_deadline_seconds is not None
        ):
            patch["activeDeadlineSeconds"] = spec.active_deadline_seconds
        if spec.backoff_limit != job_spec.get("backoffLimit"):
            patch["backoffLimit"] = spec.backoff_limit
    if patch:
        actions.append(Action("patch", "Job", job_name, {"spec": patch}))
        if "suspend" in patch:
            verb = "Suspending" if spec.suspend else "Resuming"
            events.append(Event("Normal", verb, f"{verb.lower()} trainer Job {job_name}"))
    suspended = bool(patch.get("suspend", job_spec.get("suspend")))

    pods = tuple(sorted(obs.pods, key=_pod_sort_key))
    newest = pods[-1] if pods else None
    if spec.resources.nodes > 1:  # one pod per node: the failed one, else rank 0's
        newest = distributed.status_pod(pods, TRAINER_CONTAINER)
    view = _pod_view(newest)
    try:
        channel = parse_lines(obs.log_tail)
        result = None
        if view.terminated is not None or finished:
            result = parse_result((view.terminated or {}).get("message"), obs.log_tail)
    except TrainerOutputError as exc:
        return _output_invalid(obs, st, spec, job_name, job, finished, exc, actions, events, config)

    # Progress and data report (kept from earlier polls when the tail no longer has them).
    line = last_of(channel, ProgressLine)
    if line is not None:
        st.data["progress"] = progress_status(line)
    data_line = last_of(channel, DataLine)
    if data_line is not None and data_status(data_line.report):
        st.data["data"] = data_status(data_line.report)

    # Cost, restarts, start time.
    recorded_cost = obs.status.get("cost") or {}
    recorded_seconds = float(recorded_cost.get("gpuSeconds") or 0.0)
    gpu_seconds = max(_gpu_seconds(pods, spec.resources.gpus, obs.now), recorded_seconds)
    refresh = COST_REFRESH_SECONDS * max(1, spec.resources.gpus * spec.resources.nodes)
    if (
        recorded_cost
        and not finished
        and view.terminated is None
        and gpu_seconds - recorded_seconds < refresh
    ):
        # While the run goes on, the running cost is rewritten every few minutes, not at
        # every poll: one status write per poll for a growing number helps nobody.
        st.data["cost"] = dict(recorded_cost)
    elif spec.resources.gpus == 0:
        pass  # a CPU-only run uses no GPU time: no cost to report
    elif gpu_seconds > 0 or pods:
        cost: dict[str, Any] = {"gpuSeconds": round(gpu_seconds, 1)}
        price = obs.prices.price(spec.resources.gpu_product) if obs.prices else None
        if price is not None and obs.prices is not None:
            cost.update(
                pricePerGpuHour=price,
                estimatedCost=round(gpu_seconds / 3600 * price, 4),
                currency=obs.prices.currency,
            )
        st.data["cost"] = cost
    if len(pods) > spec.resources.nodes:
        st.data["restarts"] = len(pods) - spec.resources.nodes
    starts = [t for p in pods if (t := _parse_time((p.get("status") or {}).get("startTime")))]
    if starts and not st.data.get("startedAt"):
        st.data["startedAt"] = _rfc3339(min(starts))

    # Admission.
    if queue:
        if suspended and not pods:
            st.cond(
                ADMITTED,
                "False",
                "Queued",
                f"waiting for Kueue LocalQueue {queue!r} to admit the Job",
            )
        else:
            st.cond(ADMITTED, "True", "Admitted", f"admitted by Kueue LocalQueue {queue!r}")
        if spec.suspend:
            st.cond(
                ADMITTED,
                "False" if suspended else "True",
                "SuspendNotSupportedWithQueue",
                "Kueue manages this Job's suspension; deactivate its Workload "
                '(kubectl patch workload ... --type merge -p \'{"spec":{"active":false}}\') to pause it',
            )
    elif suspended:
        st.cond(
            ADMITTED,
            "False",
            "Suspended",
            "spec.suspend is true; set it to false to resume from the last checkpoint",
        )
    else:
        st.cond(ADMITTED, "True", "NoQueue", "no queueName: the Job starts at once")

    if result is not None and data_status(result.data):
        st.data["data"] = data_status(result.data)

    complete = _job_condition(job, "Complete")
    failed = _job_condition(job, "Failed") or _job_condition(job, "FailureTarget")

    if complete:
        return _finish_complete(obs, st, spec, job_name, job, result, actions, events)
    if failed:
        estimate = st.data.get("estimate")
        reason, message = _failure_reason(spec, job_name, failed, view, result, estimate)
        return _finish_failed(obs, st, job, reason, message, actions, events)

    # Still running or waiting.
    if suspended and not queue:
        st.cond(
            TRAINING,
            "False",
            "Suspended",
            "training is paused; it resumes from the last checkpoint",
        )
        phase = "Suspended"
    elif suspended:
        st.cond(TRAINING, "False", "Queued", "waiting for admission")
        phase = "Queued"
    elif view.unschedulable:
        product = spec.resources.gpu_product
        want = f"{spec.resources.gpus} free GPU(s)" + (f" of product {product}" if product else "")
        st.cond(
            TRAINING,
            "False",
            "Unschedulable",
            f"no node has {want}: {view.unschedulable}. Check GPU quota and node pools "
            f"({GPU_PRODUCT_LABEL} labels), lower resources.gpus, or use resources.queueName",
        )
        phase = "Pending"
    elif view.waiting_reason in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
        image = spec.image or config.trainer_image
        st.cond(
            TRAINING,
            "False",
            "ImagePullFailed",
            f"container {view.waiting_container} cannot pull image {image} ({view.waiting_reason}: "
            f"{view.waiting_message[:300]}). Check spec.image and the registry credentials "
            "(imagePullSecrets of the namespace's default ServiceAccount)",
        )
        phase = "Pending"
    elif view.waiting_reason in ("CreateContainerConfigError", "CreateContainerError"):
        st.cond(
            TRAINING,
            "False",
            "ContainerConfigError",
            f"container {view.waiting_container} cannot start: {view.waiting_message[:300]}. "
            "Check that the referenced Secrets and keys exist",
        )
        phase = "Pending"
    elif view.running:
        progress = st.data.get("progress") or {}
        step, total = progress.get("step"), progress.get("totalSteps")
        if isinstance(step, int) and isinstance(total, int) and total > 0 and step >= total:
            st.cond(TRAINING, "False", "Completed", f"trained {step} steps")
            st.cond(EVALUATED, "Unknown", "Evaluating", "evaluating the adapter")
            phase = "Evaluating"
        else:
            where = f" (step {step}/{total})" if step is not None and total else ""
            st.cond(TRAINING, "True", "Running", f"trainer pod is running{where}")
            phase = "Training"
    elif view.terminated is not None and len(pods) > 0:
        code = view.terminated.get("exitCode")
        st.cond(
            TRAINING,
            "False",
            "Restarting",
            f"trainer pod exited ({view.terminated.get('reason')}, exit code {code}); the Job retries it",
        )
        phase = "Training"
    else:
        st.cond(
            TRAINING, "False", "Pending", f"trainer Job {job_name} is waiting for its pod to start"
        )
        phase = "Pending"
    status = st.finish(phase)
    return Plan(status, actions=actions, events=transition_events(obs.status, status) + events)


def _output_invalid(
    obs: Observed,
    st: _Status,
    spec: FineTuneJobSpec,
    job_name: str,
    job: Mapping[str, Any],
    finished: bool,
    exc: TrainerOutputError,
    actions: list[Action],
    events: list[Event],
    config: OperatorConfig,
) -> Plan:
    """The trainer wrote something the operator cannot accept: the run ends here.

    A trainer that breaks the contract cannot be tracked (its progress and result mean
    nothing), so a Job still running is stopped rather than left to hold its GPUs.
    """
    image = spec.image or config.trainer_image
    message = (
        f"the trainer's output is not valid: {exc}. The trainer image {image} must write the "
        "progress channel of this operator version (docs/trainer.md); use the operator's "
        "trainer image or fix the image named in spec.image"
    )
    if not finished:
        actions.append(Action("delete", "Job", job_name))
        message += f". Trainer Job {job_name} was stopped"
    return _finish_failed(obs, st, job, "TrainerOutputInvalid", message, actions, events)


def memory_advice(spec: FineTuneJobSpec, estimate: Mapping[str, Any] | None, *, host: bool) -> str:
    """What to change after running out of memory, given what the run already used.

    Only changes that are still open are offered: no ``method: qlora`` for a QLoRA run, no
    checkpointing when it was on, no smaller batch below 1 (the estimate holds what an
    ``auto`` batch and an unset checkpointing resolved to).
    """
    t, res = spec.training, spec.resources
    estimate = estimate or {}
    batch = t.batch_size if isinstance(t.batch_size, int) else estimate.get("batchSize")
    checkpointing = t.gradient_checkpointing
    if checkpointing is None:
        checkpointing = estimate.get("gradientCheckpointing")
    options: list[str] = []
    if host:
        now = f" (now {res.memory})" if res.memory else " (unset: the node's default)"
        options.append(f"raise resources.memory{now}")
    if host and res.gpus > 0:
        # Training state lives on the GPU: batch or checkpointing barely change host memory,
        # which goes to loading the model and preparing the data.
        return options[0]
    if isinstance(batch, int) and batch > 1:
        options.append(f"a smaller training.batchSize (now {batch})")
    elif batch is None:
        options.append("a smaller training.batchSize")
    if checkpointing is not True:
        options.append("training.gradientCheckpointing: true")
    if spec.method != "qlora":
        options.append("method: qlora")
    options.append(f"a shorter training.maxSeqLength (now {t.max_seq_length})")
    if not host and len(options) == 1:
        options.append("a GPU with more memory (resources.gpuProduct)")
    return "; or ".join(options)


def _failure_reason(
    spec: FineTuneJobSpec,
    job_name: str,
    failed: Mapping[str, Any],
    view: _PodView,
    result: TrainerResult | None,
    estimate: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    if result is not None and result.ok is False:
        reason = result.reason or "TrainingFailed"
        message = result.message or ""
        advice = TRAINER_REASON_ADVICE.get(reason, "").format(job=job_name)
        if reason == "OutOfMemory":
            advice = memory_advice(spec, estimate, host=False)
        if not message and not advice:
            # A reason this operator does not know, without detail: the log has it.
            return reason, (
                f"the trainer failed with {reason} and gave no detail; "
                f"read its log: kubectl logs job/{job_name}"
            )
        return reason, f"{message}. To fix: {advice}" if advice and message else (message or advice)
    term = view.terminated or {}
    if term.get("reason") == "OOMKilled":
        return (
            "OOMKilled",
            "the trainer ran out of host memory (OOMKilled). To fix: "
            + memory_advice(spec, estimate, host=True),
        )
    job_reason = str(failed.get("reason") or "")
    if job_reason == "DeadlineExceeded":
        return "DeadlineExceeded", (
            f"trainer Job {job_name} ran past activeDeadlineSeconds ({spec.active_deadline_seconds}); "
            "raise spec.activeDeadlineSeconds or train fewer steps (training.maxSteps/epochs)"
        )
    detail = ""
    if term:
        detail = f" Last exit: {term.get('reason') or 'Error'} (exit code {term.get('exitCode')})"
        if term.get("message"):
            detail += f": {str(term['message'])[-500:]}"
    if job_reason == "BackoffLimitExceeded":
        return "BackoffLimitExceeded", (
            f"trainer failed {spec.backoff_limit + 1} times.{detail} Read kubectl logs job/{job_name}"
        )
    return "PodFailed", f"trainer Job {job_name} failed ({job_reason or 'unknown reason'}).{detail}"


def _finish_failed(
    obs: Observed,
    st: _Status,
    job: Mapping[str, Any],
    reason: str,
    message: str,
    actions: list[Action],
    events: list[Event],
) -> Plan:
    st.cond(TRAINING, "False", reason, message)
    st.cond(SUCCEEDED, "False", reason, "")
    st.cond(FAILED, "True", reason, message)
    st.data["completedAt"] = _completed_at(job, st)
    status = st.finish("Failed")
    return Plan(status, actions=actions, events=transition_events(obs.status, status) + events)


def _completed_at(job: Mapping[str, Any], st: _Status) -> str:
    job_status = job.get("status") or {}
    if job_status.get("completionTime"):
        return str(job_status["completionTime"])
    for cond in job_status.get("conditions") or []:
        if cond.get("type") in ("Failed", "Complete") and cond.get("lastTransitionTime"):
            return str(cond["lastTransitionTime"])
    return str(st.data.get("completedAt") or st.now)


def _record_compared(st: _Status, spec: FineTuneJobSpec, result: TrainerResult) -> None:
    """evaluation.compareWith's metrics on the same eval rows, or why there are none."""
    if spec.evaluation.compare_with is None:
        return
    compared = numeric_metrics(result.compared_metrics)
    if compared:
        st.data["comparedMetrics"] = compared
    else:
        st.data["comparedError"] = result.compared_error or (
            "the trainer reported no compared metrics (a trainer image without compareWith?)"
        )


def _finish_complete(
    obs: Observed,
    st: _Status,
    spec: FineTuneJobSpec,
    job_name: str,
    job: Mapping[str, Any],
    result: TrainerResult | None,
    actions: list[Action],
    events: list[Event],
) -> Plan:
    st.data["completedAt"] = _completed_at(job, st)
    if result is None:
        message = (
            f"trainer Job {job_name} completed without a result (no termination message or result "
            "line); check the trainer image version"
        )
        return _finish_failed(obs, st, job, "ResultMissing", message, actions, events)
    if result.ok is False:
        estimate = st.data.get("estimate")
        reason, message = _failure_reason(spec, job_name, {}, _PodView(), result, estimate)
        return _finish_failed(obs, st, job, reason, message, actions, events)

    st.cond(TRAINING, "False", "Completed", "training finished")
    metrics = numeric_metrics(result.metrics)
    base_metrics = numeric_metrics(result.base_metrics)
    if metrics:
        st.data["metrics"] = metrics
        st.cond(EVALUATED, "True", "Evaluated", f"{len(metrics)} metrics measured")
    else:
        st.cond(EVALUATED, "False", "NoMetrics", "the trainer reported no metrics")
    if base_metrics:
        st.data["baseMetrics"] = base_metrics
    _record_compared(st, spec, result)
    adapter = _adapter_record(result.adapter, spec)
    if adapter:
        st.data["adapter"] = adapter

    gate_results = evaluate_gates(list(spec.quality_gates), metrics or {}, base_metrics)
    passed, summary, gate_message = summarize(gate_results)
    st.data["gates"] = [{k: v for k, v in r.items() if v is not None} for r in gate_results]
    st.data["gatesSummary"] = summary
    if not adapter:
        message = "the trainer reported success but no adapter (uri and digest); check the trainer image version"
        return _finish_failed(obs, st, job, "ResultMissing", message, actions, events)
    if passed:
        st.cond(
            GATES_PASSED, "True", "GatesPassed" if spec.quality_gates else "NoGates", gate_message
        )
        st.cond(
            SUCCEEDED,
            "True",
            "Succeeded",
            f"adapter {adapter['uri']} ({adapter['digest'][:19]}) is ready",
        )
        st.cond(FAILED, "False", "Succeeded", "")
        status = st.finish("Succeeded")
        return Plan(status, actions=actions, events=transition_events(obs.status, status) + events)
    message = f"quality gates failed ({summary}): {gate_message}. The adapter stays at {adapter['uri']} for inspection"
    st.cond(GATES_PASSED, "False", "GatesFailed", gate_message)
    st.cond(SUCCEEDED, "False", "GatesFailed", "")
    st.cond(FAILED, "True", "GatesFailed", message)
    status = st.finish("Failed")
    return Plan(status, actions=actions, events=transition_events(obs.status, status) + events)
