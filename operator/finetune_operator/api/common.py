"""Shared pieces of the v1alpha1 API: the base model, references and conditions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from ..domain.times import now_rfc3339

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Bounds keep every CEL rule's estimated cost inside the API server's budget.
SHORT_STRING = 253
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

ConditionStatus = Literal["True", "False", "Unknown"]


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    """``kind``/``name`` (one of this API's objects) as the controlling owner of a child:
    deleting it garbage-collects the child, and the child is not deleted before it."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def cel(*rules: tuple[str, str, str]) -> dict[str, Any]:
    """CEL validation rules for the CRD, written beside the model that mirrors them in Python.

    Each rule is (expression, message, fieldPath). The pydantic validator of the same model
    enforces the same constraint so `kubectl apply` and the Python API agree.
    """
    return {
        "x-kubernetes-validations": [
            {"rule": rule, "message": message, "fieldPath": field_path}
            for rule, message, field_path in rules
        ]
    }


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=False,
        use_attribute_docstrings=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the Kubernetes API stores it (camelCase, unset optionals left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusModel(ApiModel):
    """Status objects are written by the operator; tolerate fields from newer versions."""

    model_config = ConfigDict(extra="ignore")


DnsName = Annotated[
    str,
    Field(min_length=1, max_length=63, pattern=NAME_PATTERN),
]


class LocalObjectRef(ApiModel):
    """A reference to an object in the same namespace."""

    name: DnsName = Field(description="Name of the object in the same namespace.")


class SecretKeyRef(ApiModel):
    """A Secret in the same namespace holding credentials; its values are never copied."""

    name: DnsName = Field(description="Name of the Secret in the same namespace.")


class Condition(StatusModel):
    """A Kubernetes-style condition (see the API conventions)."""

    type: str = Field(max_length=64, description="Type of the condition, e.g. Fits or Available.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        default="",
        max_length=128,
        description="One CamelCase word saying why the condition has its status.",
    )
    message: str = Field(
        default="",
        max_length=4096,
        description="Human-readable detail, including what to change when something failed.",
    )
    last_transition_time: str = Field(
        default="",
        max_length=64,
        description="When the status last flipped (RFC 3339).",
    )
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        description="The metadata.generation this condition was computed from.",
    )


def set_condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    *,
    generation: int | None = None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """Return a copy of ``conditions`` with one condition set.

    ``lastTransitionTime`` changes only when the status flips; a new reason or message
    alone keeps the old time. Order is kept so repeated calls give identical lists,
    which lets callers skip status writes that change nothing.
    """
    result = [dict(c) for c in (conditions or [])]
    for cond in result:
        if cond.get("type") == type_:
            if cond.get("status") != status:
                cond["lastTransitionTime"] = now or now_rfc3339()
            cond["status"] = status
            cond["reason"] = reason
            cond["message"] = message
            if generation is not None:
                cond["observedGeneration"] = generation
            return result
    new: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now or now_rfc3339(),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    result.append(new)
    return result


def get_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    """The condition of the given type, or None."""
    for cond in conditions or []:
        if cond.get("type") == type_:
            return cond
    return None


def is_condition_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    """Whether the condition exists with status True."""
    cond = get_condition(conditions, type_)
    return cond is not None and cond.get("status") == "True"
