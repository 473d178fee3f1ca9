"""Validate manifests against the generated CRDs the way an API server would, offline.

Steps, in the API server's order: default the object from the schema, check it against the
openAPIV3Schema turned into JSON Schema (unknown fields rejected, as `kubectl apply` does with
strict field validation), then evaluate every `x-kubernetes-validations` CEL rule, transition
rules only when an old object is given.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import cel
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
CRD_DIR = ROOT / "crds"


def load_crd(kind: str) -> dict[str, Any]:
    for path in CRD_DIR.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            return crd
    raise KeyError(kind)


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """openAPIV3Schema (structural) → JSON Schema draft 2020-12."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("default", "description", "nullable"):
            continue
        if key == "properties":
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, bool):
            bound = node["minimum" if key == "exclusiveMinimum" else "maximum"]
            if value:
                out[key] = bound
        else:
            out[key] = value
    for key in ("minimum", "maximum"):
        excl = "exclusiveM" + key[1:]
        if node.get(excl) is True:
            out.pop(key, None)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        t = out.get("type")
        out["type"] = [*t, "null"] if isinstance(t, list) else [t, "null"]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """Structural defaulting: fill missing properties that have a default, recursively."""
    if isinstance(obj, dict) and "properties" in schema:
        for name, prop in schema["properties"].items():
            if name not in obj and "default" in prop:
                obj[name] = copy.deepcopy(prop["default"])
            if name in obj:
                obj[name] = apply_defaults(prop, obj[name])
    elif isinstance(obj, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in obj]
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {k: apply_defaults(schema["additionalProperties"], v) for k, v in obj.items()}
    return obj


def _cel_errors(schema: dict[str, Any], value: Any, old: Any, path: str) -> list[str]:
    errors: list[str] = []
    for rule in schema.get("x-kubernetes-validations", []):
        expr = rule["rule"]
        if "oldSelf" in expr and old is None:
            continue  # transition rules only run on update
        context: dict[str, Any] = {"self": value}
        if old is not None:
            context["oldSelf"] = old
        if not cel.evaluate(expr, context):
            where = path + rule.get("fieldPath", "")
            errors.append(f"{where or '<root>'}: Invalid value: {rule['message']}")
    if isinstance(value, dict):
        for name, prop in schema.get("properties", {}).items():
            if name in value:
                old_child = old.get(name) if isinstance(old, dict) else None
                errors += _cel_errors(prop, value[name], old_child, f"{path}.{name}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                errors += _cel_errors(extra, item, None, f"{path}[{key}]")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _cel_errors(schema["items"], item, None, f"{path}[{i}]")
    return errors


def validate(manifest: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """All errors an API server would report for creating (or updating from ``old``)."""
    crd = load_crd(manifest.get("kind", ""))
    schema = openapi_schema(crd)
    obj = apply_defaults(schema, copy.deepcopy(manifest))
    validator = jsonschema.Draft202012Validator(to_json_schema(schema))
    errors = [
        f"{'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in validator.iter_errors(obj)
    ]
    if errors:
        return errors
    old_obj = apply_defaults(schema, copy.deepcopy(old)) if old is not None else None
    return _cel_errors(schema, obj, old_obj, "")
