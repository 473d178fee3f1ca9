"""Following a run: mid-run spec changes, progress and cost, admission, the trainer pod's
state (one table, :data:`TRAINING_STATES`) and, once the Job ends, the verdict."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ...api.common import ConditionStatus
from ...api.finetunejob import (
    MUTABLE_AFTER_START,
    DataReport,
    FineTuneJobSpec,
    Phase,
    Progress,
    Reason,
)
from ...api.trainer_output import DataLine, ProgressLine
from ...builders import distributed
from ...builders.trainer import GPU_PRODUCT_LABEL, TRAINER_CONTAINER
from ...config import OperatorConfig
from ...domain.times import format_rfc3339, parse_rfc3339
from ..events import Event
from ..progress import (
    TrainerOutputError,
    data_status,
    last_of,
    parse_lines,
    parse_result,
    progress_status,
)
from .conditions import C, StatusDraft, is_terminal, transition_events
from .cost import updated_cost
from .observed import Action, Observed, Plan
from .trainer_objects import PodView, job_condition, pod_age_key, pod_view
from .verdicts import failure_reason, finish_complete, finish_failed, output_invalid

IMAGE_PULL_ERRORS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName")
CONTAINER_CONFIG_ERRORS = ("CreateContainerConfigError", "CreateContainerError")


# ---------------------------------------------------------------- the trainer pod's state


@dataclass(frozen=True)
class RunView:
    """What decides the Training condition of a run that has no verdict yet."""

    spec: FineTuneJobSpec
    job_name: str
    image: str  # the trainer image in use
    pod: PodView
    pods: int  # trainer pods seen (evicted and replaced ones included)
    suspended: bool
    queue: str | None
    step: int | None = None
    total_steps: int | None = None

    @property
    def trained_all_steps(self) -> bool:
        step, total = self.step, self.total_steps
        return step is not None and total is not None and total > 0 and step >= total


@dataclass(frozen=True)
class TrainingState:
    """One row of :data:`TRAINING_STATES`: when it applies, the Training condition and the
    phase it gives (and, for a trained run, the Evaluated condition that follows)."""

    name: str
    applies: Callable[[RunView], bool]
    status: ConditionStatus
    reason: Reason
    phase: Phase
    message: Callable[[RunView], str]
    evaluating: bool = False  # also Evaluated=Unknown (Evaluating)


def _wanted_gpus(v: RunView) -> str:
    product = v.spec.resources.gpu_product
    return f"{v.spec.resources.gpus} free GPU(s)" + (f" of product {product}" if product else "")


def _where(v: RunView) -> str:
    return f" (step {v.step}/{v.total_steps})" if v.step is not None and v.total_steps else ""


# The first row that applies decides; the last always does.
TRAINING_STATES: tuple[TrainingState, ...] = (
    TrainingState(
        "paused", lambda v: v.suspended and not v.queue,
        "False", Reason.SUSPENDED, Phase.SUSPENDED,
        lambda v: "training is paused; it resumes from the last checkpoint",
    ),
    TrainingState(
        "queued", lambda v: v.suspended,
        "False", Reason.QUEUED, Phase.QUEUED,
        lambda v: "waiting for admission",
    ),
    TrainingState(
        "unschedulable", lambda v: bool(v.pod.unschedulable),
        "False", Reason.UNSCHEDULABLE, Phase.PENDING,
        lambda v: f"no node has {_wanted_gpus(v)}: {v.pod.unschedulable}. Check GPU quota and "
        f"node pools ({GPU_PRODUCT_LABEL} labels), lower resources.gpus, or use "
        "resources.queueName",
    ),
    TrainingState(
        "image pull failed", lambda v: v.pod.waiting_reason in IMAGE_PULL_ERRORS,
        "False", Reason.IMAGE_PULL_FAILED, Phase.PENDING,
        lambda v: f"container {v.pod.waiting_container} cannot pull image {v.image} "
        f"({v.pod.waiting_reason}: {v.pod.waiting_message[:300]}). Check spec.image and the "
        "registry credentials (imagePullSecrets of the namespace's default ServiceAccount)",
    ),
    TrainingState(
        "container config error", lambda v: v.pod.waiting_reason in CONTAINER_CONFIG_ERRORS,
        "False", Reason.CONTAINER_CONFIG_ERROR, Phase.PENDING,
        lambda v: f"container {v.pod.waiting_container} cannot start: "
        f"{v.pod.waiting_message[:300]}. Check that the referenced Secrets and keys exist",
    ),
    TrainingState(
        "trained, evaluating", lambda v: v.pod.running and v.trained_all_steps,
        "False", Reason.COMPLETED, Phase.EVALUATING,
        lambda v: f"trained {v.step} steps",
        evaluating=True,
    ),
    TrainingState(
        "running", lambda v: v.pod.running,
        "True", Reason.RUNNING, Phase.TRAINING,
        lambda v: f"trainer pod is running{_where(v)}",
    ),
    TrainingState(
        "restarting", lambda v: v.pod.terminated is not None and v.pods > 0,
        "False", Reason.RESTARTING, Phase.TRAINING,
        lambda v: f"trainer pod exited ({(v.pod.terminated or {}).get('reason')}, exit code "
        f"{(v.pod.terminated or {}).get('exitCode')}); the Job retries it",
    ),
    TrainingState(
        "pending", lambda v: True,
        "False", Reason.PENDING, Phase.PENDING,
        lambda v: f"trainer Job {v.job_name} is waiting for its pod to start",
    ),
)  # fmt: skip


def training_state(view: RunView) -> TrainingState:
    """The row of :data:`TRAINING_STATES` that describes this run now."""
    return next(row for row in TRAINING_STATES if row.applies(view))


# ---------------------------------------------------------------- tracking


def track_run(
    obs: Observed,
    st: StatusDraft,
    spec: FineTuneJobSpec,
    current_hash: str,
    run_hash: str | None,
    job_name: str,
    config: OperatorConfig,
) -> Plan:
    st.cond(C.VALIDATED, "True", Reason.VALID, "spec is valid")
    events: list[Event] = []
    actions: list[Action] = []
    job = obs.job

    if is_terminal(obs.status):
        # Finished runs keep their verdict; only a spec change starts a new one.
        status = st.finish(obs.status.phase)
        return Plan(status, events=transition_events(obs.status, status))

    if job is None:
        message = (
            f"trainer Job {job_name} no longer exists and the run had not finished; change the "
            "spec (or delete and re-apply the FineTuneJob) to run again"
        )
        st.cond(C.TRAINING, "False", Reason.TRAINER_JOB_MISSING, message)
        st.cond(C.SUCCEEDED, "False", Reason.TRAINER_JOB_MISSING, "")
        st.cond(C.FAILED, "True", Reason.TRAINER_JOB_MISSING, message)
        status = st.finish(Phase.FAILED)
        return Plan(status, events=transition_events(obs.status, status))

    if run_hash is not None and run_hash != current_hash:
        st.cond(
            C.VALIDATED,
            "True",
            Reason.SPEC_CHANGE_DEFERRED,
            f"spec changed while trainer Job {job_name} runs; only "
            f"{', '.join(MUTABLE_AFTER_START)} apply to a running job. The change starts a new run "
            "when this one finishes; delete the FineTuneJob to stop this run now",
        )

    queue = (job.get("metadata") or {}).get("labels", {}).get("kueue.x-k8s.io/queue-name")
    finished = bool(job_condition(job, "Complete") or job_condition(job, "Failed"))
    patch = _mid_run_changes(job, spec, queue, finished)
    if patch:
        actions.append(Action("patch", "Job", job_name, {"spec": patch}))
        if "suspend" in patch:
            verb = "Suspending" if spec.suspend else "Resuming"
            events.append(Event("Normal", verb, f"{verb.lower()} trainer Job {job_name}"))
    suspended = bool(patch.get("suspend", (job.get("spec") or {}).get("suspend")))

    pods = tuple(sorted(obs.pods, key=pod_age_key))
    newest = pods[-1] if pods else None
    if spec.resources.nodes > 1:  # one pod per node: the failed one, else rank 0's
        newest = distributed.status_pod(pods, TRAINER_CONTAINER)
    view = pod_view(newest)
    try:
        channel = parse_lines(obs.log_tail)
        result = None
        if view.terminated is not None or finished:
            result = parse_result((view.terminated or {}).get("message"), obs.log_tail)
    except TrainerOutputError as exc:
        return output_invalid(obs, st, spec, job_name, job, finished, exc, actions, events, config)

    # Progress and data report (kept from earlier polls when the tail no longer has them).
    line = last_of(channel, ProgressLine)
    if line is not None:
        st.status.progress = Progress.model_validate(progress_status(line))
    data_line = last_of(channel, DataLine)
    if data_line is not None and (report := data_status(data_line.report)):
        st.status.data = DataReport.model_validate(report)

    # Cost, restarts, start time.
    running = not finished and view.terminated is None
    cost = updated_cost(obs.status.cost, pods, spec, obs.prices, obs.now, running=running)
    if cost is not None:
        st.status.cost = cost
    if len(pods) > spec.resources.nodes:
        st.status.restarts = len(pods) - spec.resources.nodes
    starts = [t for p in pods if (t := parse_rfc3339((p.get("status") or {}).get("startTime")))]
    if starts and not st.status.started_at:
        st.status.started_at = format_rfc3339(min(starts))

    _admission(st, spec, queue, suspended, bool(pods))

    if result is not None and (report := data_status(result.data)):
        st.status.data = DataReport.model_validate(report)

    complete = job_condition(job, "Complete")
    failed = job_condition(job, "Failed") or job_condition(job, "FailureTarget")
    if complete:
        return finish_complete(obs, st, spec, job_name, job, result, actions, events)
    if failed:
        estimate = st.status.estimate
        reason, message = failure_reason(spec, job_name, failed, view, result, estimate)
        return finish_failed(obs, st, job, reason, message, actions, events)

    # Still running or waiting.
    progress = st.status.progress
    run = RunView(
        spec=spec,
        job_name=job_name,
        image=spec.image or config.trainer_image,
        pod=view,
        pods=len(pods),
        suspended=suspended,
        queue=queue,
        step=progress.step if progress else None,
        total_steps=progress.total_steps if progress else None,
    )
    state = training_state(run)
    st.cond(C.TRAINING, state.status, state.reason, state.message(run))
    if state.evaluating:
        st.cond(C.EVALUATED, "Unknown", Reason.EVALUATING, "evaluating the adapter")
    status = st.finish(state.phase)
    return Plan(status, actions=actions, events=transition_events(obs.status, status) + events)


def _mid_run_changes(
    job: Mapping[str, Any], spec: FineTuneJobSpec, queue: str | None, finished: bool
) -> dict[str, Any]:
    """The trainer Job's settings that follow the spec while it runs."""
    job_spec = job.get("spec") or {}
    patch: dict[str, Any] = {}
    if finished:
        return patch
    if not queue and bool(job_spec.get("suspend")) != spec.suspend:
        patch["suspend"] = spec.suspend
    if (
        spec.active_deadline_seconds != job_spec.get("activeDeadlineSeconds")
        and spec.active_deadline_seconds is not None
    ):
        patch["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.backoff_limit != job_spec.get("backoffLimit"):
        patch["backoffLimit"] = spec.backoff_limit
    return patch


def _admission(
    st: StatusDraft, spec: FineTuneJobSpec, queue: str | None, suspended: bool, has_pods: bool
) -> None:
    """The Admitted condition: Kueue's admission, a suspension, or no queue at all."""
    if queue:
        if suspended and not has_pods:
            st.cond(
                C.ADMITTED,
                "False",
                Reason.QUEUED,
                f"waiting for Kueue LocalQueue {queue!r} to admit the Job",
            )
        else:
            st.cond(C.ADMITTED, "True", Reason.ADMITTED, f"admitted by Kueue LocalQueue {queue!r}")
        if spec.suspend:
            st.cond(
                C.ADMITTED,
                "False" if suspended else "True",
                Reason.SUSPEND_NOT_SUPPORTED_WITH_QUEUE,
                "Kueue manages this Job's suspension; deactivate its Workload "
                '(kubectl patch workload ... --type merge -p \'{"spec":{"active":false}}\') to pause it',
            )
    elif suspended:
        st.cond(
            C.ADMITTED,
            "False",
            Reason.SUSPENDED,
            "spec.suspend is true; set it to false to resume from the last checkpoint",
        )
    else:
        st.cond(C.ADMITTED, "True", Reason.NO_QUEUE, "no queueName: the Job starts at once")
