"""Deterministic names and labels of the objects the operator creates."""

from __future__ import annotations

import hashlib

MAX_NAME = 63

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_JOB = "finetune.dev/finetunejob"
LABEL_GENERATION = "finetune.dev/generation"
ANNOTATION_SPEC_HASH = "finetune.dev/spec-hash"
MANAGER = "finetune-operator"
# The finalizer kopf puts on the operator's objects (settings.persistence.finalizer).
FINALIZER = "finetune.dev/cleanup"
# The source (component) of every Event the operator records, for both kinds: its own
# events and those kopf posts (settings.posting.reporting_component).
EVENT_SOURCE = "finetune-operator"


def child_name(owner: str, suffix: str, limit: int = MAX_NAME) -> str:
    """``<owner>-<suffix>``, shortened with a stable hash when longer than ``limit``.

    The same inputs always give the same name, so a retried create meets the object it
    already made (409) instead of making a second one.
    """
    full = f"{owner}-{suffix}"
    if len(full) <= limit:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 2
    prefix = owner[:keep].rstrip("-.")
    return f"{prefix}-{digest}-{suffix}"


def trainer_job_name(owner: str, generation: int) -> str:
    return child_name(owner, f"train-g{generation}")


def trainer_configmap_name(owner: str, generation: int) -> str:
    return child_name(owner, f"trainer-g{generation}")


def child_labels(owner: str, generation: int) -> dict[str, str]:
    """Labels on every child: who made it, for which FineTuneJob and generation."""
    return {
        LABEL_MANAGED_BY: MANAGER,
        LABEL_NAME: "finetune-trainer",
        LABEL_JOB: label_value(owner),
        LABEL_GENERATION: str(generation),
    }


def label_value(value: str) -> str:
    """A label value for ``value``: itself when short enough, else a hashed prefix."""
    if len(value) <= MAX_NAME:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{value[: MAX_NAME - 9].rstrip('-.')}-{digest}"
