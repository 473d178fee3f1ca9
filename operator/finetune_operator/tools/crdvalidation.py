"""Custom resources checked the way the Kubernetes API server checks them, offline.

One implementation serves `python -m finetune_operator.tools.validate`, the embedded API server
(`finetune_local`) and the tests. For a CRD's openAPIV3Schema it runs the server's
steps in the server's order:

1. strict decoding (what `kubectl apply` asks for): unknown fields are errors;
2. pruning of unknown fields (non-strict writes) and schema defaults;
3. metadata: name a DNS-1123 subdomain, namespace a DNS label, label and annotation keys
   qualified names, label values label values, annotation size (apimachinery ObjectMeta rules);
4. the structural schema with JSON types taken as they are: "16" is no integer and "true"
   no boolean; `nullable`, `x-kubernetes-int-or-string` and Go regular expressions
   (`$` is the end of the text) as the server reads them;
5. every `x-kubernetes-validations` CEL rule, transition rules (those naming `oldSelf`) only
   on an update and only where the old object has the value.

Needs `jsonschema` and `common-expression-language` (the `validate` extra); a missing one
raises `MissingDependency` saying how to install it.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..api.scheduling import (
    DNS_LABEL_MAX,
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_MAX,
    DNS_SUBDOMAIN_PATTERN,
    LABEL_VALUE_MAX,
    LABEL_VALUE_PATTERN,
)

Schema = dict[str, Any]
Body = dict[str, Any]

INSTALL_HINT = (
    "offline validation needs jsonschema and common-expression-language, the validate extra: "
    "pip install '.[validate]' in a checkout of the operator (make setup installs it in .venv)"
)


class MissingDependency(ImportError):
    """A package of the `validate` extra is not installed."""


def _import_jsonschema() -> Any:
    try:
        import jsonschema
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependency(INSTALL_HINT) from exc
    return jsonschema


def _import_cel() -> Any:
    try:
        import cel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependency(INSTALL_HINT) from exc
    return cel


# ---------------------------------------------------------------- YAML as kubectl reads it


class KubeYamlLoader(yaml.SafeLoader):
    """Plain scalars resolved as kubectl's YAML library (go-yaml v2) resolves them.

    PyYAML and go-yaml disagree on a few plain scalars: `2e-4` is a number for kubectl but a
    string for PyYAML, `1:30` a string for kubectl but an integer for PyYAML, `y`/`n` booleans
    for kubectl only, and dates stay strings. Quoted scalars are strings for both.
    """


KubeYamlLoader.yaml_implicit_resolvers = {}
_GO_BOOL = {
    **dict.fromkeys(("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"), True),
    **dict.fromkeys(("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"), False),
}  # fmt: skip
_GO_NULL = {"", "~", "null", "Null", "NULL"}
_GO_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_GO_SPECIAL_FLOAT = {
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), math.inf),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), -math.inf),
    **dict.fromkeys((".nan", ".NaN", ".NAN"), math.nan),
}
_GO_INT = re.compile(r"[-+]?(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)")
_TAG = "tag:finetune.dev,2026:go-plain"


def _go_int(text: str) -> int | None:
    plain = text.replace("_", "")
    if not _GO_INT.fullmatch(plain):
        return None
    sign = -1 if plain.startswith("-") else 1
    digits = plain.lstrip("+-")
    base = 10
    if digits[:2].lower() in ("0x", "0o", "0b"):
        base = {"0x": 16, "0o": 8, "0b": 2}[digits[:2].lower()]
        digits = digits[2:]
    elif len(digits) > 1 and digits.startswith("0"):
        base = 8
    value = sign * int(digits, base)
    return value if -(2**63) <= value < 2**64 else None


def _construct_go_plain(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    text = loader.construct_scalar(node)
    assert isinstance(text, str)
    if text in _GO_NULL:
        return None
    if text in _GO_BOOL:
        return _GO_BOOL[text]
    if text in _GO_SPECIAL_FLOAT:
        return _GO_SPECIAL_FLOAT[text]
    if text[:1] in "+-0123456789.":
        if (number := _go_int(text)) is not None:
            return number
        if _GO_FLOAT.fullmatch(text.replace("_", "")):
            return float(text.replace("_", ""))
    return text


def _construct_json_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[str, Any]:
    # keys become strings as they are read, so `yes:` and `1:` stay two keys ("true", "1")
    loader.flatten_mapping(node)
    return {
        _json_key(loader.construct_object(key, deep=True)): loader.construct_object(
            value, deep=True
        )
        for key, value in node.value
    }


KubeYamlLoader.add_constructor("tag:yaml.org,2002:map", _construct_json_mapping)
KubeYamlLoader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"<<\Z"), ["<"])
KubeYamlLoader.add_implicit_resolver(_TAG, re.compile(r".*", re.DOTALL), None)
KubeYamlLoader.add_constructor(_TAG, _construct_go_plain)


def _json_key(key: Any) -> str:
    """A mapping key as kubectl turns YAML into JSON: `yes:` is the key "true", `1:` is "1"."""
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    return key if isinstance(key, str) else repr(key)


def load_documents(text: str) -> list[Any]:
    """Every document of a YAML (or JSON) stream, scalars typed as kubectl types them."""
    return list(yaml.load_all(text, Loader=KubeYamlLoader))  # a SafeLoader subclass


# ---------------------------------------------------------------- names (apimachinery rules)

ANNOTATIONS_MAX_BYTES = 256 * 1024
# The same rules the API types carry as CRD patterns (api/scheduling.py).
_DNS1123_LABEL = re.compile(DNS_LABEL_PATTERN)
_DNS1123_SUBDOMAIN = re.compile(DNS_SUBDOMAIN_PATTERN)
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")  # the part after '/'
_LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)


def _length_and_pattern_errors(
    value: str, limit: int, pattern: re.Pattern[str], message: str
) -> list[str]:
    errors = []
    if len(value) > limit:
        errors.append(f"must be no more than {limit} characters")
    if not pattern.fullmatch(value):
        errors.append(message)
    return errors


def dns1123_label_errors(value: str) -> list[str]:
    return _length_and_pattern_errors(
        value,
        DNS_LABEL_MAX,
        _DNS1123_LABEL,
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
        "or '-', and must start and end with an alphanumeric character",
    )


def dns1123_subdomain_errors(value: str) -> list[str]:
    return _length_and_pattern_errors(
        value,
        DNS_SUBDOMAIN_MAX,
        _DNS1123_SUBDOMAIN,
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
        "characters, '-' or '.', and must start and end with an alphanumeric character",
    )


def qualified_name_errors(value: str) -> list[str]:
    """A label or annotation key: an optional DNS subdomain prefix and '/', then a name."""
    parts = value.split("/")
    if len(parts) > 2:
        return ["a qualified name must be a name with an optional DNS subdomain prefix and '/'"]
    errors = []
    name = parts[-1]
    if len(parts) == 2:
        if not parts[0]:
            errors.append("prefix part must be non-empty")
        else:
            errors += [f"prefix part {e}" for e in dns1123_subdomain_errors(parts[0])]
    if not name:
        errors.append("name part must be non-empty")
    elif len(name) > 63:
        errors.append("name part must be no more than 63 characters")
    if name and not _QUALIFIED_NAME.fullmatch(name):
        errors.append(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character"
        )
    return errors


def label_value_errors(value: str) -> list[str]:
    return _length_and_pattern_errors(
        value,
        LABEL_VALUE_MAX,
        _LABEL_VALUE,
        "a valid label must be an empty string or consist of alphanumeric characters, "
        "'-', '_' or '.', and must start and end with an alphanumeric character",
    )


_OBJECT_META_FIELDS = {
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
    "annotations", "ownerReferences", "finalizers", "managedFields",
}  # fmt: skip


def _invalid(path: str, value: Any, message: str) -> str:
    return f"{path}: Invalid value: {_quote(value)}: {message}"


def _quote(value: Any) -> str:
    return '"' + value + '"' if isinstance(value, str) else repr(value)


def _string_map_errors(value: Any, path: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{path}: Invalid value: must be a map of strings"]
    return [
        f"{path}[{key}]: Invalid value: {_quote(item)}: must be a string (quote it)"
        for key, item in value.items()
        if not isinstance(item, str)
    ]


def metadata_errors(meta: Any, *, namespaced: bool) -> list[str]:
    """ObjectMeta rules the API server applies to every object (custom resources included)."""
    if not isinstance(meta, dict):
        return ["metadata: Required value: must be an object with a name"]
    errors: list[str] = []
    name, generate = meta.get("name"), meta.get("generateName")
    if not name and not generate:
        errors.append("metadata.name: Required value: name or generateName is required")
    if name is not None:
        if not isinstance(name, str):
            errors.append(_invalid("metadata.name", name, "must be a string"))
        elif name:
            errors += [_invalid("metadata.name", name, e) for e in dns1123_subdomain_errors(name)]
    if isinstance(generate, str) and generate:
        masked = generate[:-1] + "a" if generate.endswith("-") else generate
        errors += [
            _invalid("metadata.generateName", generate, e) for e in dns1123_subdomain_errors(masked)
        ]
    namespace = meta.get("namespace")
    if namespace is not None:
        if not namespaced:
            errors.append("metadata.namespace: Forbidden: not allowed on this type")
        elif not isinstance(namespace, str):
            errors.append(_invalid("metadata.namespace", namespace, "must be a string"))
        elif namespace:
            errors += [
                _invalid("metadata.namespace", namespace, e)
                for e in dns1123_label_errors(namespace)
            ]
    errors += _labels_errors(meta.get("labels"))
    errors += _annotations_errors(meta.get("annotations"))
    for i, finalizer in enumerate(meta.get("finalizers") or []):
        where = f"metadata.finalizers[{i}]"
        if not isinstance(finalizer, str):
            errors.append(_invalid(where, finalizer, "must be a string"))
        else:
            errors += [_invalid(where, finalizer, e) for e in qualified_name_errors(finalizer)]
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for key in ("apiVersion", "kind", "name", "uid"):
            if not isinstance(ref, dict) or not ref.get(key):
                errors.append(f"metadata.ownerReferences[{i}].{key}: Required value")
    return errors


def _labels_errors(labels: Any) -> list[str]:
    if labels is None:
        return []
    errors = _string_map_errors(labels, "metadata.labels")
    if isinstance(labels, dict):
        for key, value in labels.items():
            errors += [_invalid("metadata.labels", key, e) for e in qualified_name_errors(key)]
            if isinstance(value, str):
                errors += [_invalid("metadata.labels", value, e) for e in label_value_errors(value)]
    return errors


def _annotations_errors(annotations: Any) -> list[str]:
    if annotations is None:
        return []
    errors = _string_map_errors(annotations, "metadata.annotations")
    if isinstance(annotations, dict):
        size = 0
        for key, value in annotations.items():
            errors += [
                _invalid("metadata.annotations", key, e) for e in qualified_name_errors(key.lower())
            ]
            size += len(key.encode()) + len(str(value).encode())
        if size > ANNOTATIONS_MAX_BYTES:
            errors.append(
                f"metadata.annotations: Too long: may not be more than {ANNOTATIONS_MAX_BYTES} bytes"
            )
    return errors


# ---------------------------------------------------------------- structural schema

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


def go_regex(pattern: str) -> re.Pattern[str]:
    """A CRD `pattern` (Go RE2 syntax) as Python reads it: `$` only at the end of the text."""
    out, in_class, escaped = [], False, False
    for char in pattern:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            out.append(char)
            escaped = True
        elif char == "[" and not in_class:
            in_class = True
            out.append(char)
        elif char == "]" and in_class:
            in_class = False
            out.append(char)
        elif char == "$" and not in_class:
            out.append(r"\Z")
        else:
            out.append(char)
    return re.compile("".join(out), re.ASCII)


@functools.cache
def _validator_class() -> Any:
    jsonschema = _import_jsonschema()

    def pattern(validator: Any, patrn: str, instance: Any, schema: Schema) -> Iterator[Any]:
        if validator.is_type(instance, "string") and not go_regex(patrn).search(instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {patrn!r}")

    return jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": pattern})


_JSON_TYPES = {
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    dict: "object",
    list: "array",
}


def _schema_message(error: Any) -> str:
    """The API server's wording for a type error, with the usual fix for a quoted value."""
    if error.validator == "pattern" and isinstance(error.instance, str):
        message = f"Invalid value: {_short(error.instance)}: should match {error.validator_value!r}"
        int_or_string = {"type": "integer"} in (error.schema.get("anyOf") or [])
        if int_or_string and re.fullmatch(r"[-+]?[0-9]+", error.instance.strip()):
            message += f" or be an integer (write {error.instance!r} without quotes)"
        return message
    bound, instance = error.validator_value, error.instance
    size_messages = {
        "maxItems": lambda: f"Too many: {len(instance)}: must have at most {bound} items",
        "maxProperties": lambda: f"Too many: {len(instance)}: must have at most {bound} entries",
        "maxLength": lambda: (
            f"Too long: {len(instance)} characters: may not be longer than {bound}"
        ),
        "minItems": lambda: f"Required value: must have at least {bound} items",
        "minLength": lambda: (
            f"Invalid value: {_quote(instance)}: must be at least {bound} characters"
        ),
        "enum": lambda: (
            f"Unsupported value: {_short(instance)}: supported values: "
            + ", ".join(_quote(v) for v in bound)
        ),
        "minimum": lambda: (
            f"Invalid value: {_short(instance)}: should be greater than or equal to {bound}"
        ),
        "maximum": lambda: (
            f"Invalid value: {_short(instance)}: should be less than or equal to {bound}"
        ),
    }
    if error.validator in size_messages:
        return size_messages[error.validator]()
    if error.validator != "type":
        text = str(error.message)
        return text if len(text) <= 300 else text[:297] + "..."
    wanted = error.validator_value
    got = _JSON_TYPES.get(type(error.instance), "null")
    message = f'Invalid value: "{got}": must be of type {wanted}'
    if isinstance(error.instance, str):
        text = error.instance.strip()
        if wanted == "boolean" and text in _GO_BOOL:
            message += " (write true or false without quotes)"
        elif (wanted == "integer" and re.fullmatch(r"[-+]?[0-9]+", text)) or (
            wanted == "number" and _GO_FLOAT.fullmatch(text)
        ):
            message += f" (write {error.instance!r} without quotes)"
    return message


def _schema_problem(error: Any) -> str:
    """One schema violation as `path: message`; a missing field is named in the path."""
    path = _json_path(error.absolute_path)
    if error.validator == "required":
        missing = re.match(r"'(.+)' is a required property", str(error.message))
        if missing:
            where = missing.group(1) if path == "<root>" else f"{path}.{missing.group(1)}"
            return f"{where}: Required value"
    return f"{path}: {_schema_message(error)}"


def _short(value: Any, limit: int = 80) -> str:
    """A value for a message, cut short: a tenant's megabyte must not flood the output."""
    text = _quote(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_path(parts: Iterable[Any]) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
    return text.lstrip(".") or "<root>"


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


def unknown_fields(value: Any, schema: Schema, path: str = "", *, root: bool = False) -> list[str]:
    """Fields the schema does not declare: errors under strict field validation (kubectl's default)."""
    found: list[str] = []
    if isinstance(value, dict):
        properties: dict[str, Schema] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        open_ended = schema.get("x-kubernetes-preserve-unknown-fields") or additional is True
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if root and key == "metadata":
                found += (
                    [f"metadata.{k}" for k in (item or {}) if k not in _OBJECT_META_FIELDS]
                    if isinstance(item, dict)
                    else []
                )
            elif root and key in ("apiVersion", "kind"):
                continue
            elif key in properties:
                found += unknown_fields(item, properties[key], where)
            elif isinstance(additional, dict):
                found += unknown_fields(item, additional, f"{path}[{key}]")
            elif not open_ended:
                found.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


# ---------------------------------------------------------------- CEL rules


@functools.cache
def _program(rule: str) -> Any:
    return _import_cel().compile(rule)


def _uses_old_self(rule: str) -> bool:
    return "oldSelf" in _program(rule).variables()


def cel_value(value: Any, schema: Schema) -> Any:
    """A value as CEL sees it under its schema: `type: number` is always a double."""
    if isinstance(value, dict):
        properties: dict[str, Schema] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        return {
            key: cel_value(
                item, properties.get(key) or (additional if isinstance(additional, dict) else {})
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        items = schema.get("items")
        return [cel_value(item, items if isinstance(items, dict) else {}) for item in value]
    if isinstance(value, bool):
        return value
    if schema.get("type") == "number" and isinstance(value, int):
        return float(value)
    integer = schema.get("type") == "integer" or schema.get("x-kubernetes-int-or-string")
    if integer and isinstance(value, float) and value.is_integer():
        return int(value)  # JSON has one number type: 16.0 reaches the server as 16
    return value


_MISSING = object()


def cel_errors(schema: Schema, value: Any, old: Any = _MISSING, path: str = "") -> list[str]:
    """Every failing `x-kubernetes-validations` rule under this node, as `path: message`.

    Transition rules (naming `oldSelf`) run only when an old value exists at the same place,
    as the API server correlates them: by property name and map key, never inside lists.
    """
    errors: list[str] = []
    for rule in schema.get("x-kubernetes-validations") or []:
        expression = rule["rule"]
        if _uses_old_self(expression) and old is _MISSING:
            continue
        context = {"self": cel_value(value, schema)}
        if old is not _MISSING:
            context["oldSelf"] = cel_value(old, schema)
        where = (path + rule.get("fieldPath", "")).lstrip(".") or "<root>"
        try:
            passed = _program(expression).execute(context) is True
        except Exception as exc:  # a rule that cannot run refuses the object, as on the server
            errors.append(f"{where}: Invalid value: rule {expression!r} could not run: {exc}")
            continue
        if not passed:
            message = rule.get("message") or f"failed rule: {expression}"
            errors.append(f"{where}: Invalid value: {message}")
    if isinstance(value, dict):
        properties: dict[str, Schema] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key) or (additional if isinstance(additional, dict) else None)
            if sub is None:
                continue
            old_item = old.get(key, _MISSING) if isinstance(old, dict) else _MISSING
            where = f"{path}.{key}" if key in properties else f"{path}[{key}]"
            errors += cel_errors(sub, item, old_item, where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += cel_errors(schema["items"], item, _MISSING, f"{path}[{i}]")
    return errors


# ---------------------------------------------------------------- one served version of a CRD


@dataclass(frozen=True)
class ServedVersion:
    """One served version of a CRD: its names and the schema the server checks it against."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    status_subresource: bool
    openapi: Schema
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    singular: str = ""
    scale_subresource: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def default(self, body: Body) -> Body:
        """Prune unknown fields and fill schema defaults, as the server stores the object."""
        return dict(prune_and_default(body, self.openapi, root=True))

    @functools.cached_property
    def _checker(self) -> Any:
        return _validator_class()(to_json_schema(self.openapi))

    def schema_errors(self, body: Body) -> list[str]:
        """Structural-schema violations of an already defaulted object, as `path: message`."""
        errors = sorted(
            self._checker.iter_errors(body), key=lambda e: [str(p) for p in e.absolute_path]
        )
        return [_schema_problem(error) for error in errors]

    def apply_errors(self, new: Body, old: Body | None = None) -> list[str]:
        """What `kubectl apply` of ``new`` meets (a create, or an update of ``old``): strict
        field validation of the object as sent, then the checks of the object the server
        writes through the main resource."""
        problems = self.type_meta_errors(new)
        if problems:
            return problems
        problems = [
            f'{field}: Invalid value: unknown field "{field}"'
            for field in unknown_fields(new, self.openapi, root=True)
        ]
        meta = new.get("metadata")
        if isinstance(meta, dict) and not meta.get("name") and meta.get("generateName"):
            problems.append(
                "metadata.name: Required value: kubectl apply needs a name "
                "(generateName works with kubectl create only)"
            )
        return problems + self.errors(self.main_resource_write(new, old), old)

    def main_resource_write(self, new: Body, old: Body | None = None) -> Body:
        """What the server validates when ``new`` is written through the main resource (a
        create, or an update of ``old``): with a status subresource the status of ``new`` is
        ignored; a create has none, an update keeps the stored one."""
        if not self.status_subresource:
            return new
        body = {k: v for k, v in new.items() if k != "status"}
        if old is not None and "status" in old:
            body["status"] = copy.deepcopy(old["status"])
        return body

    def errors(self, body: Body, old: Body | None = None) -> list[str]:
        """Everything the API server refuses in a write of ``body`` (``old``: the stored
        object of an update). Unknown fields are pruned, as for a non-strict client; see
        `apply_errors` for what `kubectl apply` meets.
        """
        problems = self.type_meta_errors(body)
        if problems:
            return problems
        problems += [f"{where}: Invalid value: not a JSON number" for where in _non_finite(body)]
        stored_old = self.default(old) if old is not None else None
        candidate = self.default(body)
        problems += metadata_errors(candidate.get("metadata"), namespaced=self.namespaced)
        if stored_old is not None:
            problems += _update_metadata_errors(stored_old, candidate)
        schema_problems = self.schema_errors(candidate)
        problems += schema_problems
        if not schema_problems:  # CEL sees only values of the declared types
            old_value: Any = stored_old if stored_old is not None else _MISSING
            problems += cel_errors(self.openapi, candidate, old_value)
        return problems

    def type_meta_errors(self, body: Any) -> list[str]:
        if not isinstance(body, dict):
            return ["<root>: Invalid value: an object is required"]
        errors = []
        if body.get("kind") != self.kind:
            errors.append(_invalid("kind", body.get("kind"), f"must be {self.kind}"))
        if body.get("apiVersion") != self.api_version:
            errors.append(
                _invalid("apiVersion", body.get("apiVersion"), f"must be {self.api_version}")
            )
        return errors


def _non_finite(value: Any, path: str = "") -> Iterator[str]:
    """Where a NaN or infinity sits: JSON cannot carry them, so kubectl cannot send them."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path or "<root>"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _non_finite(item, f"{path}[{i}]")


def _update_metadata_errors(old: Body, new: Body) -> list[str]:
    errors = []
    for key in ("name", "namespace"):
        before = (old.get("metadata") or {}).get(key)
        after = (new.get("metadata") or {}).get(key)
        if after not in (None, before):
            errors.append(
                f"metadata.{key}: Invalid value: {_quote(after)}: field is immutable "
                f"(the stored object is {_quote(before)}: this would be another object)"
            )
    return errors


def served_versions(crd: Body) -> Iterator[ServedVersion]:
    """Every served version of one CustomResourceDefinition object."""
    spec = crd["spec"]
    names = spec["names"]
    for version in spec.get("versions", []):
        if not version.get("served", True):
            continue
        subresources = version.get("subresources") or {}
        openapi = (version.get("schema") or {}).get("openAPIV3Schema") or {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
        }
        yield ServedVersion(
            group=spec["group"],
            version=version["name"],
            kind=names["kind"],
            plural=names["plural"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            status_subresource="status" in subresources,
            scale_subresource="scale" in subresources,
            openapi=openapi,
            short_names=tuple(names.get("shortNames", ())),
            categories=tuple(names.get("categories", ())),
            singular=names.get("singular", names["kind"].lower()),
        )


def load_crd_file(path: Path) -> Iterator[ServedVersion]:
    """Every served version of every CRD in a YAML file."""
    for document in yaml.safe_load_all(path.read_text()):
        if isinstance(document, dict) and document.get("kind") == "CustomResourceDefinition":
            yield from served_versions(document)


def load_crd_dir(directory: Path) -> dict[tuple[str, str], ServedVersion]:
    """(apiVersion, kind) → served version, for every CRD YAML file in a folder."""
    found: dict[tuple[str, str], ServedVersion] = {}
    for path in sorted(Path(directory).glob("*.y*ml")):
        for served in load_crd_file(path):
            found[(served.api_version, served.kind)] = served
    return found
