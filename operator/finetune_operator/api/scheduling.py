"""Scheduling fields copied into the trainer Pod: Kubernetes' own rules, checked at admission.

Label keys and values, DNS names, tolerations and affinity follow core/v1 validation
(pkg/apis/core/validation and apimachinery's name rules), so nothing the CRD accepts is
refused later when the operator creates the trainer Job. Lists and maps are bounded so the
Job and its ConfigMap stay far below the API's object size limits, and every CEL rule runs on
bounded values (cheap within the API server's CEL cost budget).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, JsonValue, model_validator

from .common import ApiModel, cel

# apimachinery's name rules (IsQualifiedName, IsValidLabelValue, IsDNS1123Subdomain/Label).
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# `[.]` rather than `\.`: the patterns are also written inside CEL string literals.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
NONEMPTY_LABEL_VALUE_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
QUALIFIED_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# The prefix of a qualified name is a DNS subdomain: at most 253 characters.
LONG_PREFIX_PATTERN = r"^[^/]{254,}/"
QUALIFIED_NAME_MAX = 253 + 1 + 63
LABEL_VALUE_MAX = 63
DNS_SUBDOMAIN_MAX = 253
DNS_LABEL_MAX = 63

QUALIFIED_NAME_MESSAGE = (
    "must be a qualified name (a label key): an optional DNS subdomain prefix of at most 253 "
    "characters and '/', then at most 63 alphanumeric characters, '-', '_' or '.', starting "
    "and ending with an alphanumeric character"
)
_QUALIFIED_NAME_RE = re.compile(QUALIFIED_NAME_PATTERN)
_LONG_PREFIX_RE = re.compile(LONG_PREFIX_PATTERN)


def _check_qualified_name(value: str) -> str:
    """Python side of the key rules: pattern and prefix length (the CRD's pattern + CEL)."""
    if len(value) > QUALIFIED_NAME_MAX or not _QUALIFIED_NAME_RE.match(value):
        raise ValueError(QUALIFIED_NAME_MESSAGE)
    if _LONG_PREFIX_RE.match(value):
        raise ValueError("the prefix of a qualified name must be at most 253 characters")
    return value


PREFIX_RULE: dict[str, JsonValue] = {
    "rule": f"!self.matches('{LONG_PREFIX_PATTERN}')",
    "message": "the prefix (before '/') must be at most 253 characters",
}

LabelKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=QUALIFIED_NAME_MAX,
        pattern=QUALIFIED_NAME_PATTERN,
        json_schema_extra={"x-kubernetes-validations": [PREFIX_RULE]},
    ),
    AfterValidator(_check_qualified_name),
]
LabelValue = Annotated[str, Field(max_length=LABEL_VALUE_MAX, pattern=LABEL_VALUE_PATTERN)]
DnsLabel = Annotated[str, Field(min_length=1, max_length=DNS_LABEL_MAX, pattern=DNS_LABEL_PATTERN)]


def label_map_rules() -> dict[str, Any]:
    """CEL rules checking the keys of a label map (a structural schema cannot name key rules)."""
    return {
        "x-kubernetes-validations": [
            {
                "rule": f"self.all(k, k.matches('{QUALIFIED_NAME_PATTERN}'))",
                "message": f"every key {QUALIFIED_NAME_MESSAGE}",
            },
            {
                "rule": f"self.all(k, !k.matches('{LONG_PREFIX_PATTERN}'))",
                "message": "the prefix (before '/') of every key must be at most 253 characters",
            },
        ]
    }


def check_label_map(labels: dict[str, str]) -> dict[str, str]:
    for key in labels:
        try:
            _check_qualified_name(key)
        except ValueError as exc:
            raise ValueError(f"key {key!r}: {exc}") from None
    return labels


# ---------------------------------------------------------------- tolerations


class Toleration(ApiModel):
    """A pod toleration (core/v1 Toleration), checked as the API server checks a Pod's."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                "operator must be Exists when key is empty (it then tolerates every taint)",
                ".operator",
            ),
            (
                "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "value must be empty when operator is Exists",
                ".value",
            ),
            (
                "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "tolerationSeconds is allowed only with effect NoExecute",
                ".tolerationSeconds",
            ),
        )
    )

    key: str | None = Field(
        default=None,
        max_length=QUALIFIED_NAME_MAX,
        pattern=r"^$|" + QUALIFIED_NAME_PATTERN,
        description="Taint key (a label key); empty with operator Exists tolerates every taint.",
        json_schema_extra={"x-kubernetes-validations": [PREFIX_RULE]},
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (the default)."
    )
    value: LabelValue | None = Field(
        default=None, description="Taint value (a label value); empty with operator Exists."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate (all effects when unset)."
    )
    toleration_seconds: int | None = Field(
        default=None,
        description="Only with effect NoExecute: how long the pod stays bound to a tainted node.",
    )

    @model_validator(mode="after")
    def _check(self) -> Toleration:
        if self.key:
            _check_qualified_name(self.key)
        elif self.operator != "Exists":
            raise ValueError("tolerations[]: operator must be Exists when key is empty")
        if self.operator == "Exists" and self.value:
            raise ValueError("tolerations[]: value must be empty when operator is Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError(
                "tolerations[]: tolerationSeconds is allowed only with effect NoExecute"
            )
        return self


# ---------------------------------------------------------------- affinity (core/v1 Affinity)

SET_OPERATOR_RULES = (
    (
        "!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)",
        "values must be non-empty when operator is In or NotIn",
        ".values",
    ),
    (
        "!(self.operator in ['Exists', 'DoesNotExist']) || !has(self.values) || size(self.values) == 0",
        "values must be empty when operator is Exists or DoesNotExist",
        ".values",
    ),
)
INTEGER_VALUE = r"^[-+]?[0-9]{1,18}$"


def _check_set_operator(operator: str, values: list[str]) -> None:
    if operator in ("In", "NotIn") and not values:
        raise ValueError("values must be non-empty when operator is In or NotIn")
    if operator in ("Exists", "DoesNotExist") and values:
        raise ValueError("values must be empty when operator is Exists or DoesNotExist")
    if operator in ("Gt", "Lt") and (len(values) != 1 or not re.match(INTEGER_VALUE, values[0])):
        raise ValueError("operator Gt or Lt takes exactly one integer value")


class NodeSelectorRequirement(ApiModel):
    """A node label requirement (core/v1 NodeSelectorRequirement)."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            *SET_OPERATOR_RULES,
            (
                f"!(self.operator in ['Gt', 'Lt']) || (has(self.values) && size(self.values) == 1 && self.values[0].matches('{INTEGER_VALUE}'))",
                "operator Gt or Lt takes exactly one integer value",
                ".values",
            ),
        )
    )

    key: LabelKey = Field(description="Node label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(
        description="In, NotIn, Exists, DoesNotExist, Gt or Lt."
    )
    values: list[LabelValue] | None = Field(
        default=None, max_length=8, description="Values for In/NotIn (Gt/Lt: one integer)."
    )

    @model_validator(mode="after")
    def _check(self) -> NodeSelectorRequirement:
        _check_set_operator(self.operator, self.values or [])
        return self


class NodeFieldRequirement(ApiModel):
    """A node field requirement: only metadata.name can be selected."""

    key: Literal["metadata.name"] = Field(description="metadata.name.")
    operator: Literal["In", "NotIn"] = Field(description="In or NotIn.")
    values: list[Annotated[str, Field(min_length=1, max_length=DNS_SUBDOMAIN_MAX)]] = Field(
        min_length=1, max_length=1, description="Exactly one node name."
    )


class NodeSelectorTerm(ApiModel):
    """Requirements ANDed together (core/v1 NodeSelectorTerm)."""

    match_expressions: list[NodeSelectorRequirement] | None = Field(
        default=None, max_length=4, description="Node label requirements."
    )
    match_fields: list[NodeFieldRequirement] | None = Field(
        default=None, max_length=1, description="Node field requirements."
    )


class NodeSelector(ApiModel):
    """Terms ORed together (core/v1 NodeSelector)."""

    node_selector_terms: list[NodeSelectorTerm] = Field(
        min_length=1, max_length=4, description="At least one term must match."
    )


class PreferredSchedulingTerm(ApiModel):
    weight: int = Field(ge=1, le=100, description="Weight from 1 to 100.")
    preference: NodeSelectorTerm = Field(description="The preferred node term.")


class NodeAffinity(ApiModel):
    """Node affinity (core/v1 NodeAffinity)."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = Field(
        default=None, description="Nodes the pod must run on."
    )
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = (
        Field(default=None, max_length=4, description="Nodes the pod prefers.")
    )


class LabelSelectorRequirement(ApiModel):
    """A label requirement (meta/v1 LabelSelectorRequirement)."""

    model_config = ConfigDict(json_schema_extra=cel(*SET_OPERATOR_RULES))

    key: LabelKey = Field(description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In, NotIn, Exists or DoesNotExist."
    )
    values: list[LabelValue] | None = Field(
        default=None, max_length=8, description="Values for In and NotIn."
    )

    @model_validator(mode="after")
    def _check(self) -> LabelSelectorRequirement:
        _check_set_operator(self.operator, self.values or [])
        return self


class LabelSelector(ApiModel):
    """A label selector (meta/v1 LabelSelector)."""

    match_labels: (
        Annotated[dict[str, LabelValue], Field(max_length=8), AfterValidator(check_label_map)]
        | None
    ) = Field(
        default=None,
        description="Labels that must all match.",
        json_schema_extra=label_map_rules(),
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, max_length=4, description="Requirements that must all match."
    )


class PodAffinityTerm(ApiModel):
    """Pods to be near (or away from) within a topology domain (core/v1 PodAffinityTerm)."""

    label_selector: LabelSelector | None = Field(default=None, description="Pods to match.")
    namespace_selector: LabelSelector | None = Field(
        default=None, description="Namespaces to look in (default: the job's namespace)."
    )
    namespaces: list[DnsLabel] | None = Field(
        default=None, max_length=8, description="Namespaces to look in."
    )
    topology_key: LabelKey = Field(description="Node label defining the topology domain.")


class WeightedPodAffinityTerm(ApiModel):
    weight: int = Field(ge=1, le=100, description="Weight from 1 to 100.")
    pod_affinity_term: PodAffinityTerm = Field(description="The preferred term.")


class PodAffinity(ApiModel):
    """Pod affinity or anti-affinity (core/v1 PodAffinity, PodAntiAffinity)."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = Field(
        default=None, max_length=4, description="Terms that must hold."
    )
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = (
        Field(default=None, max_length=4, description="Terms preferred, by weight.")
    )


class Affinity(ApiModel):
    """Pod affinity (core/v1 Affinity), with bounded lists so the trainer Job stays small."""

    node_affinity: NodeAffinity | None = Field(default=None, description="Node affinity.")
    pod_affinity: PodAffinity | None = Field(default=None, description="Pod affinity.")
    pod_anti_affinity: PodAffinity | None = Field(default=None, description="Pod anti-affinity.")
