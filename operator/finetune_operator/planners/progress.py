"""Read the trainer's progress channel: ``@@finetune {json}`` lines and the termination message."""

from __future__ import annotations

import json
from typing import Any

from ..api.trainer_config import PROGRESS_PREFIX

_MARK = PROGRESS_PREFIX.strip()


def parse_lines(text: str | None) -> list[dict[str, Any]]:
    """Every well-formed channel object in ``text``, in order (other lines are ignored)."""
    found: list[dict[str, Any]] = []
    for line in (text or "").splitlines():
        at = line.find(_MARK)
        if at < 0:
            continue
        payload = line[at + len(_MARK) :].strip()
        try:
            obj = json.loads(payload)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("type"), str):
            found.append(obj)
    return found


def last_of(objects: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    for obj in reversed(objects):
        if obj.get("type") == kind:
            return obj
    return None


def parse_result(termination_message: str | None, log_tail: str | None) -> dict[str, Any] | None:
    """The trainer's final result: the termination message, else the last result line.

    With ``FallbackToLogsOnError`` the message may be the log's last lines instead of the
    compact JSON, so both forms are accepted.
    """
    message = (termination_message or "").strip()
    if message:
        try:
            obj = json.loads(message)
            if isinstance(obj, dict) and "ok" in obj:
                obj.setdefault("type", "result")
                return obj
        except ValueError:
            pass
        found = last_of(parse_lines(message), "result")
        if found is not None:
            return found
    return last_of(parse_lines(log_tail), "result")


_PROGRESS_FIELDS = (
    "step",
    "totalSteps",
    "epoch",
    "loss",
    "evalLoss",
    "learningRate",
    "tokensPerSecond",
    "etaSeconds",
    "gpuMemoryGiB",
    "updatedAt",
)


def _finite_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value == value
        and abs(value) != float("inf")
    )


def progress_status(line: dict[str, Any]) -> dict[str, Any]:
    """A progress line as ``status.progress`` (unknown or non-finite fields dropped)."""
    out: dict[str, Any] = {}
    for key in _PROGRESS_FIELDS:
        value = line.get(key)
        if key == "updatedAt":
            if isinstance(value, str):
                out[key] = value[:64]
        elif _finite_number(value):
            out[key] = value
    if "etaSeconds" in out:
        out["etaSeconds"] = int(out["etaSeconds"])
    for key in ("step", "totalSteps"):
        if key in out:
            out[key] = int(out[key])
    step, total = out.get("step"), out.get("totalSteps")
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        out["percent"] = max(0, min(100, int(100 * step / total)))
    return out


_DATA_FIELDS = (
    "rowsRead",
    "rowsKept",
    "trainRows",
    "evalRows",
    "duplicates",
    "duplicateRate",
    "piiMasked",
    "dropped",
    "digest",
)


def data_status(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """A data report (from a ``data`` line or the result) as ``status.data``."""
    if not isinstance(report, dict):
        return None
    out = {k: report[k] for k in _DATA_FIELDS if k in report and report[k] is not None}
    if isinstance(out.get("dropped"), dict):
        out["dropped"] = {str(k): int(v) for k, v in out["dropped"].items() if isinstance(v, int)}
    return out or None


def numeric_metrics(metrics: Any) -> dict[str, float] | None:
    """Finite numeric metrics only; anything else is left out rather than invented."""
    if not isinstance(metrics, dict):
        return None
    out = {str(k): float(v) for k, v in metrics.items() if _finite_number(v)}
    return out or None
