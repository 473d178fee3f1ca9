"""Label and field selectors as the Kubernetes API server understands them (pure)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Matcher = Callable[[Mapping[str, Any]], bool]

_SET_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_EQ_RE = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(==|=|!=)\s*([A-Za-z0-9_.-]*)\s*$")


class SelectorError(ValueError):
    """A selector string the API server would reject."""


def _split_terms(selector: str) -> list[str]:
    """Split on commas that are not inside `in (...)` parentheses."""
    terms: list[str] = []
    depth = 0
    current = ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        terms.append(current)
    return [term for term in terms if term.strip()]


def _label_term(term: str) -> Callable[[Mapping[str, str]], bool]:
    eq = _EQ_RE.match(term)
    if eq:
        key, op, value = eq.groups()
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    match = _SET_RE.match(term)
    if not match:
        raise SelectorError(f"unable to parse label selector term {term!r}")
    negated, key, op, values_text = match.groups()
    if op is None:
        if negated:
            return lambda labels: key not in labels
        return lambda labels: key in labels
    if negated:
        raise SelectorError(f"'!' cannot be combined with {op!r} in {term!r}")
    values = {value.strip() for value in (values_text or "").split(",") if value.strip()}
    if op == "in":
        return lambda labels: labels.get(key) in values
    return lambda labels: labels.get(key) not in values


def parse_label_selector(selector: str | None) -> Matcher:
    """Return a predicate over an object; an empty selector matches everything."""
    if not selector:
        return lambda _obj: True
    checks = [_label_term(term) for term in _split_terms(selector)]

    def matches(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(check(labels) for check in checks)

    return matches


def _field_value(obj: Mapping[str, Any], path: str) -> str | None:
    current: Any = obj
    for part in path.split("."):
        if not isinstance(current, Mapping):
            return None
        current = current.get(part)
    return None if current is None else str(current)


def parse_field_selector(selector: str | None) -> Matcher:
    """Equality-based field selectors (`metadata.name=x`, `status.phase!=Running`)."""
    if not selector:
        return lambda _obj: True
    checks: list[tuple[str, bool, str]] = []
    for term in _split_terms(selector):
        eq = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", term)
        if not eq:
            raise SelectorError(f"unable to parse field selector term {term!r}")
        path, op, value = eq.groups()
        checks.append((path, op == "!=", value))

    def matches(obj: Mapping[str, Any]) -> bool:
        for path, negated, value in checks:
            equal = (_field_value(obj, path) or "") == value
            if equal == negated:
                return False
        return True

    return matches
