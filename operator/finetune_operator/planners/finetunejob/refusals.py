"""A child of a new run that the API server refused (quota, admission webhook, LimitRange,
invalid object, a name taken): what it means and what the run does about it."""

from __future__ import annotations

from dataclasses import dataclass

from ...api.finetunejob import Phase, Reason
from .conditions import C, StatusDraft, transition_events
from .observed import Action, Observed, Outcome, Plan

# How much of the API server's answer a condition quotes.
SERVER_MESSAGE_LIMIT = 1000


@dataclass(frozen=True)
class Refusal:
    """The API server's answer to the create of a child it did not accept."""

    kind: str
    name: str
    code: int
    reason: str = ""  # the Status reason (Forbidden, Invalid, ...)
    message: str = ""


def quoted(message: str) -> str:
    text = " ".join(message.split())
    if len(text) > SERVER_MESSAGE_LIMIT:
        text = text[:SERVER_MESSAGE_LIMIT] + "..."
    return text


def classify_refusal(refusal: Refusal) -> tuple[Reason, str, bool]:
    """(condition reason, advice, whether the verdict is final) for a refused child.

    The advice follows the cause the server names: quota advice only for an exhausted
    ResourceQuota, field advice for an invalid object, policy advice for an admission
    webhook or policy. Only a refusal of the operator itself (RBAC) is retried: fixing it is
    the platform team's job and needs no change of the FineTuneJob.
    """
    text = refusal.message.lower()
    if "exceeded quota" in text:
        return (
            Reason.QUOTA_EXCEEDED,
            "the namespace's ResourceQuota is used up: delete finished FineTuneJobs or trainer "
            "Jobs, or ask the platform team for more; then change the spec (or delete and "
            "re-apply the FineTuneJob) to try again",
            True,
        )
    if "admission webhook" in text or "denied request" in text or "denied the request" in text:
        return (
            Reason.ADMISSION_DENIED,
            "an admission webhook or policy of the cluster refused it: change what the message "
            "names (ask the platform team which policy applies); then change the spec to try again",
            True,
        )
    if refusal.code in (400, 413, 422):
        return (
            Reason.CHILD_INVALID,
            "a field copied from the spec is not valid for Kubernetes: fix the spec field the "
            "message names (resources.nodeSelector, tolerations, affinity, priorityClassName, "
            "queueName, gpuProduct...); the change starts a new run",
            True,
        )
    if refusal.code == 403 and "cannot create resource" in text:
        return (
            Reason.JOB_REJECTED,
            "the operator's ServiceAccount may not create it: grant the chart's RBAC in this "
            "namespace (docs/install.md); the operator retries by itself",
            False,
        )
    if refusal.code == 409:
        return (
            Reason.CHILD_NAME_TAKEN,
            f"a {refusal.kind} of that name exists and was not made by the operator: delete or "
            "rename it, or rename the FineTuneJob",
            True,
        )
    return (
        Reason.CHILD_FORBIDDEN,
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
    st = StatusDraft(p.status, obs.generation, obs.now)
    st.status.trainer_job = None
    code = f"{refusal.code} {refusal.reason}".strip()
    text = (
        f"the API server refused the trainer {refusal.kind} {refusal.name} ({code}): "
        f"{quoted(refusal.message)}. To fix: {advice}"
    )
    st.cond(C.TRAINING, "False", reason, text)
    made = [
        (a.kind, a.name)
        for a in p.actions
        if a.verb == "create" and (a.kind, a.name) != (refusal.kind, refusal.name)
    ]
    actions = [Action("delete", "ConfigMap", n) for k, n in made if k == "ConfigMap"]
    actions += [Action("delete", "Service", n) for k, n in made if k == "Service"]
    if final:
        st.drop(C.ADMITTED)
        st.cond(C.SUCCEEDED, "False", reason, "")
        st.cond(C.FAILED, "True", reason, text)
        status = st.finish(Phase.FAILED)
        return Plan(status, actions=actions, events=transition_events(obs.status, status))
    status = st.finish(Phase.PENDING)
    return Plan(
        status,
        actions=actions,
        events=transition_events(obs.status, status),
        outcome=Outcome.RETRY,
        message=text,
    )
