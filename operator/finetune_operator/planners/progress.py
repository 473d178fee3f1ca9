"""Read the trainer's progress channel: ``@@finetune {json}`` lines and the termination message.

Everything here is tenant input (the trainer image is ``spec.image``): objects are parsed
with bounded size and depth and checked by the models both sides share
(:mod:`finetune_operator.api.trainer_output`); anything malformed raises
:class:`TrainerOutputError` naming the field, which the planner turns into a verdict.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ..api.trainer_output import (
    PROGRESS_PREFIX,
    ChannelObject,
    DataLine,
    DataReport,
    ProgressLine,
    TrainerOutputError,
    TrainerResult,
    read_object,
    validate_object,
)

__all__ = [
    "TrainerOutputError",
    "data_status",
    "last_of",
    "numeric_metrics",
    "parse_lines",
    "parse_result",
    "progress_status",
]

_MARK = PROGRESS_PREFIX.strip()
T = TypeVar("T", ProgressLine, DataLine, TrainerResult)
_KNOWN_TYPES = ("progress", "data", "result")


def _channel_object(payload: str, source: str) -> ChannelObject | None:
    obj = read_object(payload, source)
    if obj is None or obj.get("type") not in _KNOWN_TYPES:
        return None  # not JSON, or a line type of a newer trainer: not for this operator
    return validate_object(obj, f"{obj['type']} line")


def parse_lines(text: str | None) -> list[ChannelObject]:
    """Every channel object in ``text``, in order (lines without the mark are ignored).

    Raises :class:`TrainerOutputError` for a channel line that is too large, too deep or
    has a field of the wrong type or out of bounds.
    """
    found: list[ChannelObject] = []
    for line in (text or "").splitlines():
        at = line.find(_MARK)
        if at < 0:
            continue
        parsed = _channel_object(line[at + len(_MARK) :].strip(), "progress channel line")
        if parsed is not None:
            found.append(parsed)
    return found


def last_of(objects: list[ChannelObject], kind: type[T]) -> T | None:
    for obj in reversed(objects):
        if isinstance(obj, kind):
            return obj
    return None


def parse_result(termination_message: str | None, log_tail: str | None) -> TrainerResult | None:
    """The trainer's final result: the termination message, else the last result line.

    With ``FallbackToLogsOnError`` the message may be the log's last lines instead of the
    compact JSON, so both forms are accepted.
    """
    message = (termination_message or "").strip()
    if message.startswith("{"):
        obj = read_object(message, "termination message")
        if obj is not None and "ok" in obj:
            obj.setdefault("type", "result")
            parsed = validate_object(obj, "termination message")
            if isinstance(parsed, TrainerResult):
                return parsed
            raise TrainerOutputError("termination message", "type", "must be result")
    if message:
        found = last_of(parse_lines(message), TrainerResult)
        if found is not None:
            return found
    return last_of(parse_lines(log_tail), TrainerResult)


def progress_status(line: ProgressLine) -> dict[str, Any]:
    """A progress line as ``status.progress``."""
    out = line.to_wire()
    out.pop("type", None)
    step, total = line.step, line.total_steps
    if step is not None and total:
        out["percent"] = max(0, min(100, int(100 * step / total)))
    return out


def data_status(report: DataReport | None) -> dict[str, Any] | None:
    """A data report (from a ``data`` line or the result) as ``status.data``."""
    if report is None:
        return None
    return report.to_wire() or None


def numeric_metrics(metrics: dict[str, float | None] | None) -> dict[str, float] | None:
    """Measured metrics only (a metric reported as null was not finite)."""
    out = {k: float(v) for k, v in (metrics or {}).items() if v is not None}
    return out or None
