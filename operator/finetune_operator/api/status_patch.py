"""The status write of every controller: a merge patch from the status read to the one planned."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Keys of status that kopf or other writers own; never compared or overwritten here.
FOREIGN_STATUS_KEYS = ("kopf",)


def status_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch turning ``current`` status into ``desired`` ({} when equal).

    Nested objects are diffed key by key with removed keys set to null (a plain merge
    patch would keep stale keys such as an old ``evalLoss``); lists are replaced whole.
    Keys owned by other writers are left alone.
    """
    current = {k: v for k, v in current.items() if k not in FOREIGN_STATUS_KEYS}
    return merge_diff(current, desired)


def merge_diff(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``current`` into ``desired``."""
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        old = current.get(key)
        if old == value:
            continue
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            patch[key] = merge_diff(old, value)
        else:
            patch[key] = value
    for key in current:
        if key not in desired:
            patch[key] = None
    return patch
