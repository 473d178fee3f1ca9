"""CustomResourceDefinition schemas, applied as the API server applies them (pure apart from file reading).

A structural openAPIV3Schema is turned into three steps the server runs on every write:
prune unknown fields, fill defaults, then validate (the JSON Schema dialect differences
are converted: `nullable`, `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields`,
`x-kubernetes-embedded-resource`). CEL rules (`x-kubernetes-validations`) are not
evaluated here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .resources import ResourceType

Schema = dict[str, Any]
Body = dict[str, Any]

_OPENAPI_ONLY_KEYS = {
    "nullable",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "default",
}


def to_json_schema(schema: Schema) -> Schema:
    """Convert one openAPIV3Schema node (recursively) to plain JSON Schema."""
    result: Schema = {key: value for key, value in schema.items() if key not in _OPENAPI_ONLY_KEYS}
    if schema.get("x-kubernetes-int-or-string"):
        result.pop("type", None)
        result["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema:
        result["properties"] = {
            name: to_json_schema(sub) for name, sub in schema["properties"].items()
        }
    if isinstance(schema.get("additionalProperties"), dict):
        result["additionalProperties"] = to_json_schema(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        result["items"] = to_json_schema(schema["items"])
    for combinator in ("allOf", "anyOf", "oneOf"):
        if combinator in schema and combinator in result:
            result[combinator] = [to_json_schema(sub) for sub in schema[combinator]]
    if "not" in schema:
        result["not"] = to_json_schema(schema["not"])
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(schema.get(exclusive), bool):
            # OpenAPI 3.0 marks a bound exclusive with a flag; JSON Schema 2020-12 wants the
            # bound itself as the value of exclusiveMinimum/exclusiveMaximum.
            flag = result.pop(exclusive)
            if flag and bound in result:
                result[exclusive] = result.pop(bound)
    if schema.get("nullable"):
        if "type" in result:
            result["type"] = [result["type"], "null"]
        elif "anyOf" in result:
            result["anyOf"] = [*result["anyOf"], {"type": "null"}]
    return result


def prune_and_default(value: Any, schema: Schema, *, root: bool = False) -> Any:
    """Drop fields the schema does not know and fill in schema defaults (the server's order)."""
    if isinstance(value, dict):
        if schema.get("x-kubernetes-embedded-resource") or root:
            keep_meta = {k: value[k] for k in ("apiVersion", "kind", "metadata") if k in value}
        else:
            keep_meta = {}
        properties: dict[str, Schema] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        result: dict[str, Any] = {}
        for key, item in value.items():
            if key in keep_meta:  # object metadata is never pruned
                result[key] = copy.deepcopy(item)
            elif key in properties:
                if item is None and not properties[key].get("nullable"):
                    continue  # the API server drops nulls of non-nullable fields before defaulting
                result[key] = prune_and_default(item, properties[key])
            elif isinstance(additional, dict):
                result[key] = prune_and_default(item, additional)
            elif preserve or additional is True:
                result[key] = copy.deepcopy(item)
        for key, sub in properties.items():
            if key not in result and "default" in sub:
                result[key] = prune_and_default(copy.deepcopy(sub["default"]), sub)
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune_and_default(item, schema["items"]) for item in value]
    return value


def _path(error: jsonschema.ValidationError) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path]
    return "".join(parts).lstrip(".") or "<root>"


def make_validator(openapi_schema: Schema) -> Callable[[Body], list[str]]:
    """A function listing every schema violation of an object, as `path: message` lines."""
    checker = jsonschema.Draft202012Validator(to_json_schema(openapi_schema))

    def validate(body: Body) -> list[str]:
        errors = sorted(checker.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))
        return [f"{_path(error)}: {error.message}" for error in errors]

    return validate


def make_defaulter(openapi_schema: Schema) -> Callable[[Body], Body]:
    def default(body: Body) -> Body:
        return dict(prune_and_default(body, openapi_schema, root=True))

    return default


def load_crd_file(
    path: Path,
) -> Iterator[tuple[ResourceType, Callable[[Body], list[str]], Callable[[Body], Body]]]:
    """Every served version of every CRD in a YAML file, with its validator and defaulter."""
    for document in yaml.safe_load_all(path.read_text()):
        if not isinstance(document, dict) or document.get("kind") != "CustomResourceDefinition":
            continue
        spec = document["spec"]
        names = spec["names"]
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            subresources = version.get("subresources") or {}
            rtype = ResourceType(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                status_subresource="status" in subresources,
                extra_subresources=("scale",) if "scale" in subresources else (),
                short_names=tuple(names.get("shortNames", ())),
                categories=tuple(names.get("categories", ())),
                singular=names.get("singular", names["kind"].lower()),
                unconditional_update=False,
            )
            openapi = (version.get("schema") or {}).get("openAPIV3Schema") or {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
            }
            yield rtype, make_validator(openapi), make_defaulter(openapi)
