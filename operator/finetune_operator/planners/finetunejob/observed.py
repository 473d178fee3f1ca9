"""What the FineTuneJob planner is given (:class:`Observed`) and what it returns (:class:`Plan`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from ...api.finetunejob import MUTABLE_AFTER_START, FineTuneJobSpec, FineTuneJobStatus
from ...policy import NamespaceUsage
from ..events import Event
from .cost import PriceTable


@dataclass(frozen=True)
class Observed:
    """Everything the planner needs, gathered by the handler."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: Mapping[str, Any]  # as applied: the planner reports an invalid one
    status: FineTuneJobStatus  # as stored (api.finetunejob.parse_status)
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


class Outcome(StrEnum):
    """What the handler tells kopf once a plan is carried out (one kopf error per member)."""

    OK = "ok"  # the status says it all: nothing to retry
    PERMANENT = "permanent"  # nothing will change until the spec does
    RETRY = "retry"  # try again soon


@dataclass
class Plan:
    status: FineTuneJobStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    outcome: Outcome = Outcome.OK
    message: str = ""


def spec_hash(spec: FineTuneJobSpec) -> str:
    """Hash of the fields that define a run (those that may change mid-run left out)."""
    wire = spec.to_wire()
    for key in MUTABLE_AFTER_START:
        wire.pop(key, None)
    blob = json.dumps(wire, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
