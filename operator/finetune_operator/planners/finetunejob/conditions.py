"""The FineTuneJob's conditions: the status a plan builds, when a run has finished, and which
condition changes make an event."""

from __future__ import annotations

from datetime import datetime

from ...api.common import Condition, ConditionStatus
from ...api.finetunejob import (
    WARNING_REASONS,
    ConditionType,
    FineTuneJobStatus,
    Phase,
    Reason,
)
from ...domain.times import format_rfc3339
from ..events import Event

C = ConditionType
_ORDER: dict[str, int] = {type_: i for i, type_ in enumerate(ConditionType)}
# How much of a message a condition keeps.
MESSAGE_LIMIT = 4096

# Reasons of a run the API server refused to start (a child was not accepted). The verdict
# holds for the spec generation it was given to: only a spec change tries again.
REFUSAL_REASONS = frozenset(
    {
        Reason.QUOTA_EXCEEDED,
        Reason.ADMISSION_DENIED,
        Reason.CHILD_INVALID,
        Reason.CHILD_FORBIDDEN,
        Reason.CHILD_NAME_TAKEN,
    }
)

# Normal condition changes that make an event: the milestones a user waits for. Every other
# Normal change (Validated, Fits, a first Admitted=NoQueue, Evaluated, GatesPassed...) is in
# status only; a Warning always makes one. See decision 1201.
MILESTONES = frozenset(
    {
        (C.ADMITTED, "True", Reason.ADMITTED),  # Kueue admitted the queued Job
        (C.TRAINING, "True", Reason.RUNNING),  # the trainer pod started
        (C.SUCCEEDED, "True", Reason.SUCCEEDED),  # the verdict, gates passed, adapter recorded
    }
)


def condition(status: FineTuneJobStatus, type_: ConditionType) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def _is_true(status: FineTuneJobStatus, type_: ConditionType) -> bool:
    found = condition(status, type_)
    return found is not None and found.status == "True"


def is_terminal(status: FineTuneJobStatus) -> bool:
    """Whether the recorded run has finished (Succeeded or Failed is True)."""
    return _is_true(status, C.SUCCEEDED) or _is_true(status, C.FAILED)


def is_settled(status: FineTuneJobStatus, generation: int) -> bool:
    """A finished run whose verdict already reflects the current spec: reconciling it again
    can change nothing, so nothing needs to be observed.

    Not settled while a spec change waits for the run to end (Validated reason
    ``SpecChangeDeferred``): that change starts a new run once this one finished.
    """
    if not is_terminal(status) or status.observed_generation != generation:
        return False
    validated = condition(status, C.VALIDATED)
    return validated is None or validated.reason != Reason.SPEC_CHANGE_DEFERRED


def refused_for(status: FineTuneJobStatus, generation: int) -> bool:
    """Whether the API server refused to start a run of this spec generation."""
    failed = condition(status, C.FAILED)
    return (
        failed is not None
        and failed.status == "True"
        and failed.reason in REFUSAL_REASONS
        and failed.observed_generation == generation
    )


class StatusDraft:
    """The desired status, built from a copy of the current one (which stays as it is)."""

    def __init__(self, current: FineTuneJobStatus, generation: int, now: datetime) -> None:
        self.status = current.model_copy(deep=True)
        self.generation = generation
        self.now = format_rfc3339(now)

    def cond(
        self, type_: ConditionType, status: ConditionStatus, reason: str, message: str = ""
    ) -> None:
        """Set one condition; its lastTransitionTime changes only when its status flips."""
        message = message[:MESSAGE_LIMIT]
        for cond in self.status.conditions:
            if cond.type == type_:
                if cond.status != status:
                    cond.last_transition_time = self.now
                cond.status, cond.reason, cond.message = status, reason, message
                cond.observed_generation = self.generation
                return
        self.status.conditions.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=self.now,
                observed_generation=self.generation,
            )
        )

    def drop(self, *types: ConditionType) -> None:
        self.status.conditions = [c for c in self.status.conditions if c.type not in types]

    def finish(self, phase: Phase | None) -> FineTuneJobStatus:
        self.status.phase = phase
        self.status.observed_generation = self.generation
        for cond in self.status.conditions:
            if not cond.message.strip():
                cond.message = default_message(cond)
        self.status.conditions = sorted(
            self.status.conditions, key=lambda c: _ORDER.get(c.type, len(_ORDER))
        )
        return self.status


def default_message(cond: Condition) -> str:
    """A message for a condition set without one: every condition says what it means."""
    if cond.type == C.SUCCEEDED and cond.status == "False":
        return f"the run failed ({cond.reason}); the Failed condition says what to change"
    if cond.type == C.FAILED and cond.status == "False":
        return "the run succeeded"
    return f"{cond.type} is {cond.status} ({cond.reason})"


def transition_events(old: FineTuneJobStatus, new: FineTuneJobStatus) -> list[Event]:
    """Events for the condition changes a user acts on or waits for (messages carry no
    secrets): a Warning for each failure or problem that appears or changes, a Normal event
    for each milestone reached. Conditions list everything else."""
    events: list[Event] = []
    before = {c.type: c for c in old.conditions}
    for cond in new.conditions:
        prev = before.get(cond.type)
        if prev is not None and (prev.status, prev.reason) == (cond.status, cond.reason):
            continue
        reason = str(cond.reason or cond.type)
        warning = reason in WARNING_REASONS or (cond.type == C.FAILED and cond.status == "True")
        if not warning and (cond.type, cond.status, cond.reason) not in MILESTONES:
            continue
        text = f"{cond.type}={cond.status}"
        if cond.message:
            text += f": {cond.message}"
        event = Event("Warning" if warning else "Normal", reason, text[:1024])
        # One failure often sets several conditions to the same reason (GatesPassed,
        # Succeeded and Failed for GatesFailed): one event, the last (Failed's) message.
        events = [e for e in events if e.reason != reason] + [event]
    return events
