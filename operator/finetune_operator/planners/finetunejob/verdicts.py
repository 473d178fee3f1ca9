"""How a run ends: its verdict (Succeeded, or Failed with a reason and what to change), the
adapter it recorded and the quality gates' results."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...api.finetunejob import (
    AdapterRecord,
    Estimate,
    FineTuneJobSpec,
    GateResult,
    Phase,
    Reason,
)
from ...api.trainer_output import AdapterOutput, TrainerResult
from ...builders.trainer import pod_paths
from ...config import OperatorConfig
from ...domain.gates import evaluate_gates, summarize
from ..events import Event
from ..progress import TrainerOutputError, numeric_metrics
from .conditions import C, StatusDraft, transition_events
from .observed import Action, Observed, Outcome, Plan
from .trainer_objects import PodView, job_condition

# What to do about each failure the trainer reports (its message says the specifics).
TRAINER_REASON_ADVICE: dict[str, str] = {
    Reason.DATA_UNUSABLE: "fix the dataset (see status.data) or relax dataset.cleaning limits",
    Reason.DATA_NOT_FOUND: "check dataset.train/eval URIs and that the files exist",
    Reason.MODEL_NOT_FOUND: "check baseModel.uri (and its revision) and its credentials Secret",
    Reason.INVALID_CONFIG: "fix the spec field named above",
    Reason.TRAINING_FAILED: "read the trainer log (kubectl logs job/{job})",
    Reason.EVALUATION_FAILED: "read the trainer log (kubectl logs job/{job}); evaluation settings may be too large",
    Reason.UPLOAD_FAILED: "check spec.output.uri (the bucket must exist) and the keys of spec.output.credentialsSecretRef (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for non-AWS services)",
}


def local_to_uri(path: str, spec: FineTuneJobSpec) -> str:
    """The trainer reports local paths; translate the output directory back to spec.output.uri."""
    local_out = pod_paths(spec).paths.output_dir
    if path.startswith(local_out):
        return spec.output.uri.rstrip("/") + path[len(local_out) :]
    return path


def adapter_record(adapter: AdapterOutput | None, spec: FineTuneJobSpec) -> AdapterRecord | None:
    """The adapter as status records it (the output URI, not the trainer's local path)."""
    if adapter is None:
        return None
    record: dict[str, Any] = {
        "uri": local_to_uri(adapter.uri, spec),
        "digest": adapter.digest,
        "baseModel": adapter.base_model or spec.base_model.uri,
        "method": adapter.method or spec.method,
    }
    if adapter.rank is not None:
        record["rank"] = adapter.rank
    if adapter.size_bytes is not None:
        record["sizeBytes"] = adapter.size_bytes
    if adapter.merged_uri:
        record["mergedUri"] = local_to_uri(adapter.merged_uri, spec)
    return AdapterRecord.model_validate(record)


def output_invalid(
    obs: Observed,
    st: StatusDraft,
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
    return finish_failed(obs, st, job, Reason.TRAINER_OUTPUT_INVALID, message, actions, events)


def memory_advice(spec: FineTuneJobSpec, estimate: Estimate | None, *, host: bool) -> str:
    """What to change after running out of memory, given what the run already used.

    Only changes that are still open are offered: no ``method: qlora`` for a QLoRA run, no
    checkpointing when it was on, no smaller batch below 1 (the estimate holds what an
    ``auto`` batch and an unset checkpointing resolved to).
    """
    t, res = spec.training, spec.resources
    estimate = estimate or Estimate()
    batch = t.batch_size if isinstance(t.batch_size, int) else estimate.batch_size
    checkpointing = t.gradient_checkpointing
    if checkpointing is None:
        checkpointing = estimate.gradient_checkpointing
    options: list[str] = []
    if host:
        now = f" (now {res.memory})" if res.memory else " (unset: the node's default)"
        options.append(f"raise resources.memory{now}")
    if host and res.gpus > 0:
        # Training state lives on the GPU: batch or checkpointing barely change host memory,
        # which goes to loading the model and preparing the data.
        return options[0]
    # A packed run let go ahead within the prediction margin (estimate over the GPU) already
    # had the smallest checkpointed micro-batch: only its length, the method or the GPU remain.
    smallest = t.packing and estimate.fits is False and not host
    if not smallest:
        if isinstance(batch, int) and batch > 1:
            options.append(f"a smaller training.batchSize (now {batch})")
        elif batch is None:
            options.append("a smaller training.batchSize")
        if checkpointing is not True:
            options.append("training.gradientCheckpointing: true")
    if spec.method != "qlora":
        options.append("method: qlora")
    options.append(f"a shorter training.maxSeqLength (now {t.max_seq_length})")
    if not host and (len(options) == 1 or smallest):
        options.append("a GPU with more memory (resources.gpuProduct)")
    return "; or ".join(options)


def failure_reason(
    spec: FineTuneJobSpec,
    job_name: str,
    failed: Mapping[str, Any],
    view: PodView,
    result: TrainerResult | None,
    estimate: Estimate | None = None,
) -> tuple[str, str]:
    """(reason, message) of a failed run: the trainer's own verdict, else what Kubernetes saw."""
    if result is not None and result.ok is False:
        reason = result.reason or Reason.TRAINING_FAILED
        message = result.message or ""
        advice = TRAINER_REASON_ADVICE.get(reason, "").format(job=job_name)
        if reason == Reason.OUT_OF_MEMORY:
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
            Reason.OOM_KILLED,
            "the trainer ran out of host memory (OOMKilled). To fix: "
            + memory_advice(spec, estimate, host=True),
        )
    job_reason = str(failed.get("reason") or "")
    if job_reason == "DeadlineExceeded":
        return Reason.DEADLINE_EXCEEDED, (
            f"trainer Job {job_name} ran past activeDeadlineSeconds ({spec.active_deadline_seconds}); "
            "raise spec.activeDeadlineSeconds or train fewer steps (training.maxSteps/epochs)"
        )
    detail = ""
    if term:
        detail = f" Last exit: {term.get('reason') or 'Error'} (exit code {term.get('exitCode')})"
        if term.get("message"):
            detail += f": {str(term['message'])[-500:]}"
    if job_reason == "BackoffLimitExceeded":
        return Reason.BACKOFF_LIMIT_EXCEEDED, (
            f"trainer failed {spec.backoff_limit + 1} times.{detail} Read kubectl logs job/{job_name}"
        )
    return (
        Reason.POD_FAILED,
        f"trainer Job {job_name} failed ({job_reason or 'unknown reason'}).{detail}",
    )


def finish_failed(
    obs: Observed,
    st: StatusDraft,
    job: Mapping[str, Any],
    reason: str,
    message: str,
    actions: list[Action],
    events: list[Event],
) -> Plan:
    st.cond(C.TRAINING, "False", reason, message)
    st.cond(C.SUCCEEDED, "False", reason, "")
    st.cond(C.FAILED, "True", reason, message)
    st.status.completed_at = completed_at(job, st)
    status = st.finish(Phase.FAILED)
    return Plan(status, actions=actions, events=transition_events(obs.status, status) + events)


def completed_at(job: Mapping[str, Any], st: StatusDraft) -> str:
    job_status = job.get("status") or {}
    if job_status.get("completionTime"):
        return str(job_status["completionTime"])
    for cond in job_status.get("conditions") or []:
        if cond.get("type") in ("Failed", "Complete") and cond.get("lastTransitionTime"):
            return str(cond["lastTransitionTime"])
    return st.status.completed_at or st.now


def record_compared(st: StatusDraft, spec: FineTuneJobSpec, result: TrainerResult) -> None:
    """evaluation.compareWith's metrics on the same eval rows, or why there are none."""
    if spec.evaluation.compare_with is None:
        return
    compared = numeric_metrics(result.compared_metrics)
    if compared:
        st.status.compared_metrics = compared
        st.status.compared_timing_comparable = result.compared_timing_comparable
    else:
        st.status.compared_error = result.compared_error or (
            "the trainer reported no compared metrics (a trainer image without compareWith?)"
        )


def finish_complete(
    obs: Observed,
    st: StatusDraft,
    spec: FineTuneJobSpec,
    job_name: str,
    job: Mapping[str, Any],
    result: TrainerResult | None,
    actions: list[Action],
    events: list[Event],
) -> Plan:
    st.status.completed_at = completed_at(job, st)
    if result is None:
        message = (
            f"trainer Job {job_name} completed without a result (no termination message or result "
            "line); check the trainer image version"
        )
        return finish_failed(obs, st, job, Reason.RESULT_MISSING, message, actions, events)
    if result.ok is False:
        estimate = st.status.estimate
        reason, message = failure_reason(spec, job_name, {}, PodView(), result, estimate)
        return finish_failed(obs, st, job, reason, message, actions, events)

    st.cond(C.TRAINING, "False", Reason.COMPLETED, "training finished")
    metrics = numeric_metrics(result.metrics)
    base_metrics = numeric_metrics(result.base_metrics)
    if metrics:
        st.status.metrics = metrics
        st.cond(C.EVALUATED, "True", Reason.EVALUATED, f"{len(metrics)} metrics measured")
    else:
        st.cond(C.EVALUATED, "False", Reason.NO_METRICS, "the trainer reported no metrics")
    if base_metrics:
        st.status.base_metrics = base_metrics
    record_compared(st, spec, result)
    adapter = adapter_record(result.adapter, spec)
    if adapter:
        st.status.adapter = adapter

    gate_results = evaluate_gates(list(spec.quality_gates), metrics or {}, base_metrics)
    passed, summary, gate_message = summarize(gate_results)
    st.status.gates = [GateResult.model_validate(r) for r in gate_results]
    st.status.gates_summary = summary
    if not adapter:
        message = "the trainer reported success but no adapter (uri and digest); check the trainer image version"
        return finish_failed(obs, st, job, Reason.RESULT_MISSING, message, actions, events)
    if passed:
        gates = Reason.GATES_PASSED if spec.quality_gates else Reason.NO_GATES
        st.cond(C.GATES_PASSED, "True", gates, gate_message)
        st.cond(
            C.SUCCEEDED,
            "True",
            Reason.SUCCEEDED,
            f"adapter {adapter.uri} ({adapter.digest[:19]}) is ready",
        )
        st.cond(C.FAILED, "False", Reason.SUCCEEDED, "")
        status = st.finish(Phase.SUCCEEDED)
        return Plan(status, actions=actions, events=transition_events(obs.status, status) + events)
    message = f"quality gates failed ({summary}): {gate_message}. The adapter stays at {adapter.uri} for inspection"
    st.cond(C.GATES_PASSED, "False", Reason.GATES_FAILED, gate_message)
    st.cond(C.SUCCEEDED, "False", Reason.GATES_FAILED, "")
    st.cond(C.FAILED, "True", Reason.GATES_FAILED, message)
    status = st.finish(Phase.FAILED)
    return Plan(status, actions=actions, events=transition_events(obs.status, status) + events)


def invalid(obs: Observed, st: StatusDraft, reason: Reason, message: str) -> Plan:
    """A spec that cannot run (invalid, or refused by the platform policy): Failed, unless a
    run of an earlier spec still goes on (it keeps its phase and ends as it would)."""
    st.cond(C.VALIDATED, "False", reason, message)
    running = (
        obs.job is not None
        and not job_condition(obs.job, "Complete")
        and not job_condition(obs.job, "Failed")
    )
    if not running:
        st.cond(C.FAILED, "True", reason, message)
        st.cond(C.SUCCEEDED, "False", reason, "")
    status = st.finish(Phase.FAILED if not running else (obs.status.phase or Phase.TRAINING))
    return Plan(
        status,
        events=transition_events(obs.status, status),
        outcome=Outcome.PERMANENT,
        message=message,
    )
