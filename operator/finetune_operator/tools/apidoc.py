"""Render docs/api.md (every field of every kind) from the generated CRD schemas."""

from __future__ import annotations

import json
import sys
from typing import Any

from . import crdgen

HEADER = """# API reference: finetune.dev/v1alpha1

Generated from the pydantic models by `finetune-operator docs`; do not edit by hand.
`kubectl explain finetunejob.spec --recursive` shows the same descriptions on a cluster.

"""


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    t = node.get("type", "object")
    if t == "array":
        return f"list of {_type(node.get('items', {}))}"
    if t == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {_type(node['additionalProperties'])}"
    return str(t)


def _bounds(node: dict[str, Any]) -> str:
    parts = []
    for key, label in (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("maxLength", "max length"),
        ("maxItems", "max items"),
    ):
        if key in node:
            strict = node.get("exclusiveM" + key[1:]) is True
            sign = label.replace("≥", ">").replace("≤", "<") if strict else label
            parts.append(f"{sign} {node[key]}")
    return ", ".join(parts)


def _rows(node: dict[str, Any], prefix: str, required: set[str]) -> list[str]:
    rows = []
    for name, prop in node.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        default = (
            json.dumps(prop["default"])
            if "default" in prop
            else ("required" if name in required else "")
        )
        desc = " ".join(str(prop.get("description", "")).split()).replace("|", "\\|")
        bounds = _bounds(prop)
        rows.append(
            f"| `{path}` | {_type(prop)} | {default} | {desc}{' (' + bounds + ')' if bounds else ''} |"
        )
        child = prop.get("items", prop) if prop.get("type") == "array" else prop
        if "properties" in child:
            rows += _rows(
                child, path + ("[]" if child is not prop else ""), set(child.get("required", []))
            )
    return rows


def _rules(node: dict[str, Any], prefix: str) -> list[str]:
    out = [
        f"- `{prefix or 'object'}`: {r['message']}"
        for r in node.get("x-kubernetes-validations", [])
    ]
    for name, prop in node.get("properties", {}).items():
        out += _rules(
            prop.get("items", prop) if prop.get("type") == "array" else prop,
            f"{prefix}.{name}" if prefix else name,
        )
    return out


def render() -> str:
    text = HEADER
    for crd in crdgen.all_crds():
        names = crd["spec"]["names"]
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        text += (
            f"## {names['kind']} (`{names['plural']}`, short name `{names['shortNames'][0]}`)\n\n"
        )
        text += " ".join(str(schema.get("description", "")).split()) + "\n\n"
        for part in ("spec", "status"):
            sub = schema["properties"][part]
            text += f"### {names['kind']}.{part}\n\n| field | type | default | meaning |\n|---|---|---|---|\n"
            text += "\n".join(_rows(sub, "", set(sub.get("required", [])))) + "\n\n"
        text += (
            f"### Validation rules ({names['kind']})\n\n" + "\n".join(_rules(schema, "")) + "\n\n"
        )
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(render())
