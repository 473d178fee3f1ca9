"""The three patch flavours the Kubernetes API accepts, applied to plain dicts (pure)."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

# List fields that strategic merge patches merge by a key instead of replacing
# (the subset of the built-in types' patch strategies that the operator touches).
STRATEGIC_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "conditions": "type",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
    "tolerations": "key",
}


class PatchTestFailed(ValueError):
    """A JSON-patch `test` operation did not hold (the API server answers 422)."""


class InvalidPatch(ValueError):
    """The patch document itself is malformed (the API server answers 400/422)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, `null` deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    return _merge_object(target, patch)


def _merge_object(target: Any, patch: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _merge_keyed_list(target: list[Any], patch: list[Any], key: str) -> list[Any]:
    result = copy.deepcopy(target)
    positions = {
        item.get(key): index for index, item in enumerate(result) if isinstance(item, dict)
    }
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            return copy.deepcopy(patch)  # not a keyed list after all: replace like a merge patch
        directive = item.get("$patch")
        index = positions.get(item[key])
        if directive == "delete":
            if index is not None:
                result[index] = None
            continue
        cleaned = {k: v for k, v in item.items() if k != "$patch"}
        if index is None:
            result.append(cleaned)
            positions[item[key]] = len(result) - 1
        else:
            result[index] = strategic_merge_patch(result[index], cleaned)
    return [item for item in result if item is not None]


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A strategic merge patch: a merge patch whose known keyed lists merge item by item."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    return _strategic_merge_object(target, patch)


def _strategic_merge_object(target: Any, patch: dict[str, Any]) -> dict[str, Any]:
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result: dict[str, Any] = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif (
            isinstance(value, list)
            and key in STRATEGIC_MERGE_KEYS
            and isinstance(result.get(key), list)
        ):
            result[key] = _merge_keyed_list(result[key], value, STRATEGIC_MERGE_KEYS[key])
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def json_patch(target: dict[str, Any], operations: Any) -> dict[str, Any]:
    """RFC 6902 JSON patch; a failed `test` raises PatchTestFailed."""
    if not isinstance(operations, list):
        raise InvalidPatch("a JSON patch must be a list of operations")
    try:
        patched = jsonpatch.JsonPatch(operations).apply(copy.deepcopy(target))
    except jsonpatch.JsonPatchTestFailed as exc:
        raise PatchTestFailed(str(exc)) from exc
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
        raise InvalidPatch(str(exc)) from exc
    if not isinstance(patched, dict):
        raise InvalidPatch("a JSON patch must leave an object behind")
    return patched


def apply_patch(target: dict[str, Any], patch: Any, content_type: str) -> dict[str, Any]:
    """Dispatch on the request's Content-Type, as the API server does."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == JSON_PATCH:
        return json_patch(target, patch)
    if not isinstance(patch, dict):
        raise InvalidPatch(f"a {kind} body must be a JSON object")
    if kind == MERGE_PATCH:
        return _merge_object(target, patch)
    if kind == STRATEGIC_MERGE_PATCH:
        return _strategic_merge_object(target, patch)
    raise InvalidPatch(f"unsupported patch type {kind!r}")
