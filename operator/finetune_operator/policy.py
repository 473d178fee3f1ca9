"""Platform policy: what a FineTuneJob may ask of the cluster, and what every trainer pod gets.

Pure. The platform team sets the policy in the Helm chart (``operator.policy``); the chart
passes each value as a ``FINETUNE_POLICY_*`` environment variable and :func:`load_policy`
reads them. The FineTuneJob planner calls :func:`check` once, before it creates any child;
a job outside the policy ends with reason ``PolicyViolation`` and a message naming each rule
and what to change. :func:`apply_defaults` adds what the platform requires to the spec the
trainer Job is built from, and the builders take every container's requests from
:func:`trainer_resources` and :func:`init_resources`, so no trainer pod is BestEffort.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .api.finetunejob import FineTuneJobSpec
from .api.scheduling import Affinity, NodeSelectorTerm, Toleration
from .domain.uris import StorageUri

# The node label a job's resources.gpuProduct becomes (builders.trainer.GPU_PRODUCT_LABEL;
# not imported from there: the builders depend on this module).
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# Where the values live in the Helm chart, for messages that name a rule.
VALUES_PREFIX = "operator.policy."
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# How many allowed values a message lists before it stops.
LISTED = 8


# ---------------------------------------------------------------- quantities


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkKMGTPE])?$")
_SUFFIX = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(1000),
    "K": Decimal(1000),  # the CRD's memory pattern allows it; read it as k
    "M": Decimal(1000) ** 2,
    "G": Decimal(1000) ** 3,
    "T": Decimal(1000) ** 4,
    "P": Decimal(1000) ** 5,
    "E": Decimal(1000) ** 6,
    "Ki": Decimal(1024),
    "Mi": Decimal(1024) ** 2,
    "Gi": Decimal(1024) ** 3,
    "Ti": Decimal(1024) ** 4,
    "Pi": Decimal(1024) ** 5,
    "Ei": Decimal(1024) ** 6,
}


def quantity(text: str) -> Decimal:
    """The value of a Kubernetes resource quantity (``500m``, ``2``, ``16Gi``, ``1e3``)."""
    match = _QUANTITY.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 16Gi)")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number + suffix)
        return Decimal(number) * _SUFFIX[suffix]
    except InvalidOperation as exc:
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from exc


# ---------------------------------------------------------------- the policy


class TaintMatch(BaseModel):
    """A taint the platform keeps tenants off: no job may tolerate it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1, max_length=253)
    value: str | None = Field(default=None, max_length=63)  # None: any value
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None  # None: any

    def describe(self) -> str:
        text = self.key + (f"={self.value}" if self.value is not None else "")
        return text + f":{self.effect}" if self.effect else text


def _setting(help_text: str, env: str, value: str) -> dict[str, str]:
    return {"help": help_text, "env": env, "value": value}


@dataclass(frozen=True)
class Policy:
    """The platform's rules for FineTuneJobs. The defaults refuse nothing; the resource
    defaults are never empty, so every trainer pod container has requests."""

    allowed_images: tuple[str, ...] = field(
        default=(),
        metadata=_setting(
            "Trainer images jobs may use (spec.image, and the operator's default image), as "
            "patterns where * matches any characters, e.g. registry.example/ml/trainer@sha256:*. "
            "JSON list or comma-separated; empty: any image.",
            "FINETUNE_POLICY_ALLOWED_IMAGES",
            "allowedImages",
        ),
    )
    max_gpus_per_job: int | None = field(
        default=None,
        metadata=_setting(
            "Most GPUs one job may use (resources.gpus x resources.nodes); empty: no maximum.",
            "FINETUNE_POLICY_MAX_GPUS_PER_JOB",
            "maxGpusPerJob",
        ),
    )
    max_gpus_per_namespace: int | None = field(
        default=None,
        metadata=_setting(
            "Most GPUs the unfinished runs of one namespace may use together (queued, "
            "suspended and running runs count); a job that would pass it is refused. "
            "Empty: no maximum.",
            "FINETUNE_POLICY_MAX_GPUS_PER_NAMESPACE",
            "maxGpusPerNamespace",
        ),
    )
    allowed_priority_classes: tuple[str, ...] = field(
        default=(),
        metadata=_setting(
            "PriorityClasses a job may name in resources.priorityClassName. JSON list or "
            "comma-separated; empty: any.",
            "FINETUNE_POLICY_ALLOWED_PRIORITY_CLASSES",
            "allowedPriorityClasses",
        ),
    )
    default_priority_class: str = field(
        default="",
        metadata=_setting(
            "PriorityClass of trainer pods whose job names none (empty: the cluster's default).",
            "FINETUNE_POLICY_DEFAULT_PRIORITY_CLASS",
            "defaultPriorityClass",
        ),
    )
    required_node_selector: Mapping[str, str] = field(
        default_factory=dict,
        metadata=_setting(
            "Node labels added to every trainer pod's nodeSelector (JSON object); a job that "
            "selects another value for one of these keys is refused.",
            "FINETUNE_POLICY_REQUIRED_NODE_SELECTOR",
            "requiredNodeSelector",
        ),
    )
    forbidden_node_selector_keys: tuple[str, ...] = field(
        default=(),
        metadata=_setting(
            "Node label keys (patterns, * matches any characters) a job may not select on, in "
            "resources.nodeSelector, resources.gpuProduct (nvidia.com/gpu.product) or node "
            "affinity. JSON list or comma-separated.",
            "FINETUNE_POLICY_FORBIDDEN_NODE_SELECTOR_KEYS",
            "forbiddenNodeSelectorKeys",
        ),
    )
    required_tolerations: tuple[Toleration, ...] = field(
        default=(),
        metadata=_setting(
            "Tolerations added to every trainer pod (JSON list of core/v1 tolerations).",
            "FINETUNE_POLICY_REQUIRED_TOLERATIONS",
            "requiredTolerations",
        ),
    )
    forbidden_tolerations: tuple[TaintMatch, ...] = field(
        default=(),
        metadata=_setting(
            'Taints no job may tolerate (JSON list of {"key", "value"?, "effect"?}; a missing '
            "value or effect means any).",
            "FINETUNE_POLICY_FORBIDDEN_TOLERATIONS",
            "forbiddenTolerations",
        ),
    )
    trainer_default_cpu: str = field(
        default="1",
        metadata=_setting(
            "CPU request of the trainer container when the job sets no resources.cpu.",
            "FINETUNE_POLICY_TRAINER_DEFAULT_CPU",
            "trainer.defaultCpu",
        ),
    )
    trainer_default_memory: str = field(
        default="4Gi",
        metadata=_setting(
            "Memory request of the trainer container when the job sets no resources.memory.",
            "FINETUNE_POLICY_TRAINER_DEFAULT_MEMORY",
            "trainer.defaultMemory",
        ),
    )
    trainer_max_cpu: str = field(
        default="",
        metadata=_setting(
            "Largest resources.cpu a job may request (empty: no maximum).",
            "FINETUNE_POLICY_TRAINER_MAX_CPU",
            "trainer.maxCpu",
        ),
    )
    trainer_max_memory: str = field(
        default="",
        metadata=_setting(
            "Largest resources.memory a job may request (empty: no maximum).",
            "FINETUNE_POLICY_TRAINER_MAX_MEMORY",
            "trainer.maxMemory",
        ),
    )
    init_cpu: str = field(
        default="100m",
        metadata=_setting(
            "CPU request of each init container (the model and data downloads).",
            "FINETUNE_POLICY_INIT_CPU",
            "initContainers.cpu",
        ),
    )
    init_memory: str = field(
        default="256Mi",
        metadata=_setting(
            "Memory request of each init container.",
            "FINETUNE_POLICY_INIT_MEMORY",
            "initContainers.memory",
        ),
    )
    init_cpu_limit: str = field(
        default="",
        metadata=_setting(
            "CPU limit of each init container (empty: none).",
            "FINETUNE_POLICY_INIT_CPU_LIMIT",
            "initContainers.cpuLimit",
        ),
    )
    init_memory_limit: str = field(
        default="",
        metadata=_setting(
            "Memory limit of each init container (empty: none).",
            "FINETUNE_POLICY_INIT_MEMORY_LIMIT",
            "initContainers.memoryLimit",
        ),
    )
    allow_file_uris: bool = field(
        default=True,
        metadata=_setting(
            "Whether jobs may use file:// URIs (base model, dataset, output): paths inside the "
            "trainer container, i.e. files baked into the image.",
            "FINETUNE_POLICY_ALLOW_FILE_URIS",
            "allowFileUris",
        ),
    )

    def image_allowed(self, image: str) -> bool:
        return not self.allowed_images or any(fnmatchcase(image, p) for p in self.allowed_images)


def rule(name: str) -> str:
    """A policy field's chart value, e.g. ``operator.policy.allowedImages``."""
    for f in fields(Policy):
        if f.name == name:
            return VALUES_PREFIX + str(f.metadata["value"])
    raise KeyError(name)


# ---------------------------------------------------------------- reading the settings


def describe_policy() -> list[dict[str, Any]]:
    """Each policy setting with its environment variable, default and help text."""
    defaults = Policy()
    return [
        {
            "name": f"policy.{f.name}",
            "env": f.metadata["env"],
            "default": _show(getattr(defaults, f.name)),
            "help": f.metadata["help"] + f" (chart: {VALUES_PREFIX}{f.metadata['value']})",
        }
        for f in fields(Policy)
    ]


def _show(value: Any) -> Any:
    if isinstance(value, tuple):
        return [v.model_dump(by_alias=True, exclude_none=True) if isinstance(v, BaseModel) else v
                for v in value]  # fmt: skip
    return dict(value) if isinstance(value, Mapping) else value


def _strings(raw: str) -> tuple[str, ...]:
    text = raw.strip()
    if text.startswith("["):
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError("expected a JSON list of strings")
        return tuple(i.strip() for i in items if i.strip())
    return tuple(i.strip() for i in text.split(",") if i.strip())


def _objects(raw: str) -> list[Any]:
    items = json.loads(raw) if raw.strip() else []
    if not isinstance(items, list):
        raise ValueError("expected a JSON list of objects")
    return items


def _parse(name: str, raw: str) -> Any:
    if name in ("allowed_images", "allowed_priority_classes", "forbidden_node_selector_keys"):
        return _strings(raw)
    if name in ("max_gpus_per_job", "max_gpus_per_namespace"):
        if not raw.strip():
            return None
        value = int(raw)
        if value < 0:
            raise ValueError("must be >= 0 (empty for no maximum)")
        return value
    if name == "required_node_selector":
        value = json.loads(raw) if raw.strip() else {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ValueError("expected a JSON object of label key -> value")
        return value
    if name == "required_tolerations":
        return tuple(Toleration.model_validate(t) for t in _objects(raw))
    if name == "forbidden_tolerations":
        return tuple(TaintMatch.model_validate(t) for t in _objects(raw))
    if name == "default_priority_class":
        text = raw.strip()
        if text and not _DNS_SUBDOMAIN.match(text):
            raise ValueError("expected a PriorityClass name (a DNS subdomain)")
        return text
    if name == "allow_file_uris":
        lowered = raw.strip().lower()
        if lowered not in ("true", "false"):
            raise ValueError("expected true or false")
        return lowered == "true"
    text = raw.strip()
    if text:
        quantity(text)
    return text


def load_policy(env: Mapping[str, str]) -> Policy:
    """The policy from ``FINETUNE_POLICY_*`` variables; ValueError names the bad variable."""
    values: dict[str, Any] = {}
    for f in fields(Policy):
        var = str(f.metadata["env"])
        if var not in env:
            continue
        try:
            values[f.name] = _parse(f.name, env[var])
        except (ValueError, ValidationError) as exc:
            raise ValueError(f"{var}={env[var]!r}: {_short(exc)}") from exc
    policy = Policy(**values)
    for problem in inconsistencies(policy):
        raise ValueError(problem)
    return policy


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
        )
    return str(exc)


def inconsistencies(policy: Policy) -> list[str]:
    """Settings that contradict each other (the operator refuses to start with them)."""
    problems: list[str] = []
    for required in ("trainer_default_cpu", "trainer_default_memory", "init_cpu", "init_memory"):
        if not getattr(policy, required):
            problems.append(
                f"{_env(required)} must not be empty: every trainer pod container gets requests"
            )
    pairs = (
        ("trainer_default_cpu", "trainer_max_cpu"),
        ("trainer_default_memory", "trainer_max_memory"),
        ("init_cpu", "init_cpu_limit"),
        ("init_memory", "init_memory_limit"),
    )
    for low, high in pairs:
        lo, hi = getattr(policy, low), getattr(policy, high)
        if lo and hi and quantity(lo) > quantity(hi):
            problems.append(f"{_env(low)}={lo} is larger than {_env(high)}={hi}")
    if (
        policy.default_priority_class
        and policy.allowed_priority_classes
        and policy.default_priority_class not in policy.allowed_priority_classes
    ):
        problems.append(
            f"{_env('default_priority_class')}={policy.default_priority_class} is not in "
            f"{_env('allowed_priority_classes')}"
        )
    return problems


def _env(name: str) -> str:
    return next(str(f.metadata["env"]) for f in fields(Policy) if f.name == name)


# ---------------------------------------------------------------- checking a job


@dataclass(frozen=True)
class NamespaceUsage:
    """GPUs held by the other unfinished runs of a job's namespace, by job name."""

    gpus_by_job: Mapping[str, int] = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return sum(self.gpus_by_job.values())


@dataclass(frozen=True)
class Violation:
    """One way a job breaks the policy: the rule, the spec field and what to change."""

    rule: str  # the chart value, e.g. operator.policy.allowedImages
    field: str  # the spec field to change, e.g. spec.image
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message} (policy {self.rule})"


def job_gpus(spec: FineTuneJobSpec) -> int:
    """GPUs a run of ``spec`` holds: per node times nodes."""
    return spec.resources.gpus * spec.resources.nodes


def _listed(values: tuple[str, ...] | list[str]) -> str:
    shown = ", ".join(values[:LISTED])
    return shown + (f" and {len(values) - LISTED} more" if len(values) > LISTED else "")


def check(
    spec: FineTuneJobSpec,
    usage: NamespaceUsage,
    policy: Policy,
    default_image: str,
) -> list[Violation]:
    """Every way ``spec`` breaks ``policy`` (empty: the job may run)."""
    return [
        *_check_image(spec, policy, default_image),
        *_check_file_uris(spec, policy),
        *_check_gpus(spec, usage, policy),
        *_check_priority_class(spec, policy),
        *_check_node_selection(spec, policy),
        *_check_tolerations(spec, policy),
        *_check_requests(spec, policy),
    ]


def refusal_message(
    spec: FineTuneJobSpec, usage: NamespaceUsage, policy: Policy, default_image: str
) -> str:
    """The condition message for a job outside the policy; empty when the job may run."""
    violations = check(spec, usage, policy, default_image)
    if not violations:
        return ""
    return (
        "the job is outside this cluster's policy and nothing was created: "
        + "; ".join(str(v) for v in violations)
        + ". Change the fields named, or ask the platform team about the rule"
    )


def _check_image(spec: FineTuneJobSpec, policy: Policy, default_image: str) -> list[Violation]:
    image = spec.image or default_image
    if policy.image_allowed(image):
        return []
    where = "" if spec.image else " (the operator's default image; set spec.image)"
    return [
        Violation(
            rule("allowed_images"),
            "spec.image",
            f"image {image!r}{where} matches none of the allowed patterns "
            f"{_listed(policy.allowed_images)}; use an image that matches one",
        )
    ]


def _uris(spec: FineTuneJobSpec) -> Iterator[tuple[str, str]]:
    yield "spec.baseModel.uri", spec.base_model.uri
    yield "spec.dataset.train.uri", spec.dataset.train.uri
    if spec.dataset.eval is not None:
        yield "spec.dataset.eval.uri", spec.dataset.eval.uri
    yield "spec.output.uri", spec.output.uri


def _check_file_uris(spec: FineTuneJobSpec, policy: Policy) -> list[Violation]:
    if policy.allow_file_uris:
        return []
    return [
        Violation(
            rule("allow_file_uris"),
            where,
            f"file:// URIs are not allowed on this cluster; use "
            f"{'pvc:// or s3://' if where == 'spec.output.uri' else 'pvc://, s3:// or hf://'}",
        )
        for where, uri in _uris(spec)
        if StorageUri.parse(uri).scheme == "file"
    ]


def _check_gpus(spec: FineTuneJobSpec, usage: NamespaceUsage, policy: Policy) -> list[Violation]:
    gpus = job_gpus(spec)
    found: list[Violation] = []
    shape = f"resources.gpus {spec.resources.gpus} x resources.nodes {spec.resources.nodes}"
    if policy.max_gpus_per_job is not None and gpus > policy.max_gpus_per_job:
        found.append(
            Violation(
                rule("max_gpus_per_job"),
                "spec.resources.gpus",
                f"the job asks for {gpus} GPUs ({shape}), more than the {policy.max_gpus_per_job} "
                "a job may use; lower resources.gpus or resources.nodes",
            )
        )
    limit = policy.max_gpus_per_namespace
    if limit is not None and gpus > 0 and usage.gpus + gpus > limit:
        held = sorted(usage.gpus_by_job.items(), key=lambda item: (-item[1], item[0]))
        holders = _listed([f"{name} {n}" for name, n in held])
        found.append(
            Violation(
                rule("max_gpus_per_namespace"),
                "spec.resources.gpus",
                f"the namespace's unfinished jobs hold {usage.gpus} GPUs"
                + (f" ({holders})" if held else "")
                + f" and this job asks for {gpus}, more than the {limit} a namespace may use; "
                "lower resources.gpus or resources.nodes, or when other jobs have finished "
                "change this job's spec (or delete and re-apply it) to check again",
            )
        )
    return found


def _check_priority_class(spec: FineTuneJobSpec, policy: Policy) -> list[Violation]:
    name = spec.resources.priority_class_name
    if not name or not policy.allowed_priority_classes or name in policy.allowed_priority_classes:
        return []
    return [
        Violation(
            rule("allowed_priority_classes"),
            "spec.resources.priorityClassName",
            f"PriorityClass {name!r} is not allowed; use one of "
            f"{_listed(policy.allowed_priority_classes)}, or leave it unset",
        )
    ]


def _affinity_keys(affinity: Affinity | None) -> Iterator[str]:
    """Node label keys (and node fields) a node affinity selects on."""
    node = affinity.node_affinity if affinity is not None else None
    if node is None:
        return
    terms: list[NodeSelectorTerm] = []
    if node.required_during_scheduling_ignored_during_execution is not None:
        terms += node.required_during_scheduling_ignored_during_execution.node_selector_terms
    for preferred in node.preferred_during_scheduling_ignored_during_execution or []:
        terms.append(preferred.preference)
    for term in terms:
        for expr in term.match_expressions or []:
            yield expr.key
        for field_expr in term.match_fields or []:
            yield field_expr.key


def _check_node_selection(spec: FineTuneJobSpec, policy: Policy) -> list[Violation]:
    res = spec.resources
    chosen: list[tuple[str, str, str]] = [  # (key, value, spec field)
        (k, v, f"spec.resources.nodeSelector[{k}]") for k, v in res.node_selector.items()
    ]
    if res.gpu_product and res.gpus > 0:
        chosen.append((GPU_PRODUCT_LABEL, res.gpu_product, "spec.resources.gpuProduct"))
    found: list[Violation] = []
    for key, value, where in chosen:
        pattern = _forbidding(key, policy)
        if pattern is not None:
            found.append(
                Violation(
                    rule("forbidden_node_selector_keys"),
                    where,
                    f"selecting nodes by {key} is not allowed (pattern {pattern!r}); remove it",
                )
            )
        required = policy.required_node_selector.get(key)
        if required is not None and required != value:
            found.append(
                Violation(
                    rule("required_node_selector"),
                    where,
                    f"the platform runs trainer pods on nodes with {key}={required}; "
                    f"remove this selection or set it to {required!r}",
                )
            )
    for key in dict.fromkeys(_affinity_keys(res.affinity)):
        pattern = _forbidding(key, policy)
        if pattern is not None:
            found.append(
                Violation(
                    rule("forbidden_node_selector_keys"),
                    "spec.resources.affinity.nodeAffinity",
                    f"selecting nodes by {key} is not allowed (pattern {pattern!r}); remove "
                    "that term",
                )
            )
    return found


def _forbidding(key: str, policy: Policy) -> str | None:
    return next((p for p in policy.forbidden_node_selector_keys if fnmatchcase(key, p)), None)


def tolerates(toleration: Toleration, taint: TaintMatch) -> bool:
    """Whether ``toleration`` tolerates some taint that ``taint`` matches (core/v1 rules:
    an empty key with Exists tolerates every key, Exists any value, no effect every effect)."""
    exists = toleration.operator == "Exists"
    if not toleration.key:
        if not exists:
            return False
    elif toleration.key != taint.key:
        return False
    if not exists and taint.value is not None and (toleration.value or "") != taint.value:
        return False
    return not toleration.effect or not taint.effect or toleration.effect == taint.effect


def _check_tolerations(spec: FineTuneJobSpec, policy: Policy) -> list[Violation]:
    found: list[Violation] = []
    for index, toleration in enumerate(spec.resources.tolerations):
        for taint in policy.forbidden_tolerations:
            if tolerates(toleration, taint):
                shown = json.dumps(toleration.to_wire(), sort_keys=True)
                found.append(
                    Violation(
                        rule("forbidden_tolerations"),
                        f"spec.resources.tolerations[{index}]",
                        f"toleration {shown} lets the trainer onto nodes tainted "
                        f"{taint.describe()}, which the platform keeps for others; remove it",
                    )
                )
                break
    return found


def _check_requests(spec: FineTuneJobSpec, policy: Policy) -> list[Violation]:
    found: list[Violation] = []
    for kind, asked, most in (
        ("cpu", spec.resources.cpu, policy.trainer_max_cpu),
        ("memory", spec.resources.memory, policy.trainer_max_memory),
    ):
        if asked and most and quantity(asked) > quantity(most):
            found.append(
                Violation(
                    rule(f"trainer_max_{kind}"),
                    f"spec.resources.{kind}",
                    f"{kind} {asked} is more than the {most} a trainer may request; "
                    f"request at most {most}",
                )
            )
    return found


# ---------------------------------------------------------------- what every pod gets


def apply_defaults(spec: FineTuneJobSpec, policy: Policy) -> FineTuneJobSpec:
    """The spec the trainer Job is built from: the platform's node selector and tolerations
    added, its default PriorityClass where the job names none. Call after :func:`check`."""
    res = spec.resources
    selector = {**res.node_selector, **policy.required_node_selector}
    tolerations = list(res.tolerations)
    for required in policy.required_tolerations:
        if required not in tolerations:
            tolerations.append(required)
    update: dict[str, Any] = {"node_selector": selector, "tolerations": tolerations}
    if not res.priority_class_name and policy.default_priority_class:
        update["priority_class_name"] = policy.default_priority_class
    return spec.model_copy(update={"resources": res.model_copy(update=update)})


def trainer_resources(spec: FineTuneJobSpec, policy: Policy) -> dict[str, dict[str, str]]:
    """CPU and memory requests (and limits) of the trainer container; GPUs are the builder's.

    A job's own resources.memory is its request and its limit; the platform's defaults are
    requests only, so a default never caps a job that needs more memory.
    """
    res = spec.resources
    requests = {
        "cpu": res.cpu or policy.trainer_default_cpu,
        "memory": res.memory or policy.trainer_default_memory,
    }
    limits = {"memory": res.memory} if res.memory else {}
    return {"requests": requests, "limits": limits}


def init_resources(policy: Policy) -> dict[str, dict[str, str]]:
    """Requests (and limits, where the platform sets them) of each init container."""
    resources: dict[str, dict[str, str]] = {
        "requests": {"cpu": policy.init_cpu, "memory": policy.init_memory}
    }
    limits = {
        k: v for k, v in (("cpu", policy.init_cpu_limit), ("memory", policy.init_memory_limit)) if v
    }
    if limits:
        resources["limits"] = limits
    return resources
