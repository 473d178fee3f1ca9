"""Starting a run: a clean slate, the platform policy, the referenced objects, the GPU memory
check, then the trainer's ConfigMap, Job (and Service for several nodes)."""

from __future__ import annotations

from ...api.common import owner_reference
from ...api.finetunejob import KIND, FineTuneJobSpec, Phase, Reason
from ...builders import distributed
from ...builders.trainer import (
    TRAINER_CONTAINER,
    resolve_trainer_config,
    trainer_configmap,
    trainer_job,
)
from ...config import OperatorConfig
from ...policy import apply_defaults, refusal_message
from .conditions import C, StatusDraft, transition_events
from .observed import Action, Observed, Outcome, Plan
from .preflight import check_fit
from .verdicts import invalid

# Status fields that describe one run; a new run starts without them.
RUN_FIELDS = (
    "trainer_job",
    "progress",
    "estimate",
    "data",
    "metrics",
    "base_metrics",
    "compared_metrics",
    "compared_error",
    "compared_timing_comparable",
    "gates",
    "gates_summary",
    "adapter",
    "cost",
    "restarts",
    "started_at",
    "completed_at",
)


def start_run(
    obs: Observed, st: StatusDraft, spec: FineTuneJobSpec, hash_: str, config: OperatorConfig
) -> Plan:
    # A new run (first, or after an edit of a finished one) starts from a clean slate.
    for name in RUN_FIELDS:
        setattr(st.status, name, None)
    st.drop(C.ADMITTED, C.TRAINING, C.EVALUATED, C.GATES_PASSED, C.SUCCEEDED, C.FAILED)
    st.cond(C.VALIDATED, "True", Reason.VALID, "spec is valid")

    refusal = refusal_message(spec, obs.namespace_usage, config.policy, config.trainer_image)
    if refusal:
        return invalid(obs, st, Reason.POLICY_VIOLATION, refusal)

    if obs.missing_refs:
        message = "; ".join(obs.missing_refs)
        st.cond(C.VALIDATED, "False", Reason.REFERENCE_NOT_FOUND, message)
        st.drop(C.FAILED, C.SUCCEEDED)
        status = st.finish(Phase.PENDING)
        return Plan(
            status,
            events=transition_events(obs.status, status),
            outcome=Outcome.RETRY,
            message=message,
        )

    fit = check_fit(spec, obs.annotations, config)
    st.cond(C.FITS, fit.status, fit.reason, fit.message)
    if fit.estimate is not None:
        st.status.estimate = fit.estimate
    if fit.status == "False":
        st.cond(C.FAILED, "True", fit.reason, fit.message)
        st.cond(C.SUCCEEDED, "False", fit.reason, "")
        status = st.finish(Phase.FAILED)
        return Plan(
            status,
            events=transition_events(obs.status, status),
            outcome=Outcome.PERMANENT,
            message=fit.message,
        )
    st.drop(C.FAILED, C.SUCCEEDED)

    owner = owner_reference(KIND, obs.name, obs.uid)
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
    st.status.trainer_job = job_name
    actions = [Action("create", "ConfigMap", cm["metadata"]["name"], cm)]
    if service is not None:
        actions.append(Action("create", "Service", service["metadata"]["name"], service))
    actions.append(Action("create", "Job", job_name, job))
    if spec.resources.queue_name:
        st.cond(
            C.ADMITTED,
            "False",
            Reason.QUEUED,
            f"waiting for Kueue LocalQueue {spec.resources.queue_name!r} to admit the Job",
        )
        phase = Phase.QUEUED
    elif spec.suspend:
        st.cond(
            C.ADMITTED, "False", Reason.SUSPENDED, "spec.suspend is true; set it to false to start"
        )
        phase = Phase.SUSPENDED
    else:
        st.cond(C.ADMITTED, "True", Reason.NO_QUEUE, "no queueName: the Job starts at once")
        phase = Phase.PENDING
    st.cond(C.TRAINING, "False", Reason.PENDING, f"trainer Job {job_name} created")
    status = st.finish(phase)
    return Plan(status, actions=actions, events=transition_events(obs.status, status))
