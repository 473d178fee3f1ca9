"""Generate the CustomResourceDefinitions in ``crds/`` from the pydantic models.

The models are the single source of truth; this module turns their JSON Schema into a
structural apiextensions/v1 openAPIV3Schema (inlined refs, no nulls, int-or-string, CEL rules
kept) and adds what only a CRD has: names, printer columns, subresources and the
"frozen once training started" transition rule.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ..api import adapterdeployment as ad
from ..api import finetunejob as ftj
from ..api import finetuneschedule as fts
from ..api.common import GROUP, VERSION

CATEGORY = "finetune"
# propertyNames: map keys are checked by CEL rules beside it (a structural schema has no
# propertyNames).
DROP_KEYS = {"title", "additionalProperties", "$defs", "discriminator", "propertyNames"}


class SchemaError(ValueError):
    """The models produced something a structural schema cannot express."""


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline ``$ref``s and turn pydantic's JSON Schema into a structural OpenAPI v3 one."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        extra_rules = node.pop("x-kubernetes-validations", []) + target.pop(
            "x-kubernetes-validations", []
        )
        target.update(node)  # a description beside the $ref wins over the model's own
        if extra_rules:
            target["x-kubernetes-validations"] = extra_rules
        node = target
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if node.get("x-kubernetes-int-or-string"):
            node.pop("anyOf")
        elif len(options) == 1:
            inner = _resolve(options[0], defs)
            node.pop("anyOf")
            rules = node.pop("x-kubernetes-validations", []) + inner.pop(
                "x-kubernetes-validations", []
            )
            merged = {**inner, **node}
            if rules:
                merged["x-kubernetes-validations"] = rules
            node = merged
        else:
            raise SchemaError(f"union types cannot be structural: {node}")
    if "patternProperties" in node:
        # a map with constrained keys: the values' schema stays, the keys' rule is CEL
        (values,) = node.pop("patternProperties").values()
        node["additionalProperties"] = values
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node and not isinstance(node[key], bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            node[bound] = node[key]
            node[key] = True
    if node.get("default", 0) is None:
        node.pop("default")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROP_KEYS and not (key == "additionalProperties" and isinstance(value, dict)):
            continue
        if key == "properties":
            out[key] = {name: _resolve(schema, defs) for name, schema in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _resolve(value, defs)
        else:
            out[key] = value
    if "properties" in out or out.get("x-kubernetes-preserve-unknown-fields"):
        out["type"] = "object"
    return out


def _defaulted_objects(model: type[BaseModel]) -> set[str]:
    """Field aliases of sub-models that the model fills with a default instance."""
    names = set()
    for name, field in model.model_fields.items():
        sub = field.annotation
        if (
            field.default_factory is not None
            and isinstance(sub, type)
            and issubclass(sub, BaseModel)
        ):
            names.add(field.alias or name)
    return names


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural openAPIV3Schema of one model (spec or status)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _apply_object_defaults(_resolve(raw, defs), model)


def _apply_object_defaults(schema: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Give ``default: {}`` to sub-objects that the model fills by default, recursively.

    The API server then fills their own defaults in, so CEL rules and the operator can rely
    on them being present, as the pydantic model does.
    """
    props = schema.get("properties", {})
    defaulted = _defaulted_objects(model)
    for name, field in model.model_fields.items():
        alias = field.alias or name
        sub = field.annotation
        if alias not in props or not isinstance(sub, type) or not issubclass(sub, BaseModel):
            continue
        if alias in defaulted:
            props[alias]["default"] = {}
        _apply_object_defaults(props[alias], sub)
    return schema


def _frozen_after_start_rule(spec_schema: dict[str, Any]) -> dict[str, Any]:
    """A transition rule on the root: once training started, only a few spec fields may change."""
    frozen = [name for name in spec_schema["properties"] if name not in ftj.MUTABLE_AFTER_START]
    same = " && ".join(
        f"(has(self.spec.{n}) == has(oldSelf.spec.{n}) && (!has(self.spec.{n}) || self.spec.{n} == oldSelf.spec.{n}))"
        for n in frozen
    )
    return {
        "rule": f"!has(oldSelf.status) || !has(oldSelf.status.startedAt) || ({same})",
        "message": "spec is frozen once training has started; only "
        + ", ".join(ftj.MUTABLE_AFTER_START)
        + " may change. Create a new FineTuneJob to train with other settings.",
        "reason": "FieldValueForbidden",
    }


def _root(spec: dict[str, Any], status: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "finetune.dev/v1alpha1"},
            "kind": {"type": "string", "description": "Kind of the object."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def finetunejob_crd() -> dict[str, Any]:
    spec = structural_schema(ftj.FineTuneJobSpec)
    status = structural_schema(ftj.FineTuneJobStatus)
    root = _root(spec, status, ftj.FineTuneJob.__doc__ or "")
    root["x-kubernetes-validations"] = [_frozen_after_start_rule(spec)]
    columns = [
        ("Phase", "string", ".status.phase", "Lifecycle phase."),
        ("Method", "string", ".spec.method", "qlora or lora."),
        ("Base", "string", ".spec.baseModel.uri", "Base model."),
        ("Progress", "integer", ".status.progress.percent", "Training progress in percent."),
        ("Loss", "number", ".status.progress.loss", "Latest training loss."),
        ("Gates", "string", ".status.gatesSummary", "Quality gates passed."),
    ]
    return _crd(ftj.PLURAL, ftj.KIND, "ftj", root, columns)


def adapterdeployment_crd() -> dict[str, Any]:
    spec = structural_schema(ad.AdapterDeploymentSpec)
    status = structural_schema(ad.AdapterDeploymentStatus)
    root = _root(spec, status, ad.AdapterDeployment.__doc__ or "")
    columns = [
        ("Adapter", "string", ".spec.adapterName", "Model name clients request."),
        ("Target", "string", ".spec.target.deployment", "Serving Deployment."),
        ("Strategy", "string", ".spec.strategy.type", "Rollout strategy."),
        ("Phase", "string", ".status.phase", "Rollout phase."),
        ("Ready", "integer", ".status.readyReplicas", "Ready replicas serving the adapter."),
    ]
    return _crd(ad.PLURAL, ad.KIND, "adep", root, columns)


def finetuneschedule_crd() -> dict[str, Any]:
    spec = structural_schema(fts.FineTuneScheduleSpec)
    status = structural_schema(fts.FineTuneScheduleStatus)
    root = _root(spec, status, fts.FineTuneSchedule.__doc__ or "")
    columns = [
        ("Schedule", "string", ".spec.schedule", "Cron schedule."),
        ("Suspend", "boolean", ".spec.suspend", "Whether new runs are suspended."),
        ("Last Run", "date", ".status.lastScheduleTime", "Slot of the last run started."),
        ("Last Outcome", "string", ".status.lastOutcome", "Outcome of the newest finished run."),
        ("Champion", "string", ".status.champion.job", "FineTuneJob of the champion adapter."),
    ]
    return _crd(fts.PLURAL, fts.KIND, fts.SHORT_NAME, root, columns)


def _crd(
    plural: str,
    kind: str,
    short: str,
    schema: dict[str, Any],
    columns: list[tuple[str, str, str, str]],
) -> dict[str, Any]:
    printer = [
        {"name": n, "type": t, "jsonPath": p, "description": d} for n, t, p, d in columns
    ] + [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "finetune-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    """Every CRD of this operator, in the order the docs list them."""
    return [finetunejob_crd(), adapterdeployment_crd(), finetuneschedule_crd()]


def render_all() -> dict[str, str]:
    """File name → YAML text of every CRD."""
    header = "# Generated by `finetune-operator crds` from the pydantic models. Do not edit.\n"
    return {
        f"{crd['spec']['names']['plural']}.yaml": header
        + yaml.safe_dump(crd, sort_keys=False, width=100)
        for crd in all_crds()
    }


def write(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover
    for p in write(sys.argv[1] if len(sys.argv) > 1 else "crds"):
        print(p)
