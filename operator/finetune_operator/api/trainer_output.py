"""What the trainer tells the operator: progress lines, the data report and the final result.

The trainer writes these models (``@@finetune {json}`` lines on stdout, the result also as
the container's termination message) and the operator reads them back with the same models.
The trainer image is the tenant's choice (``spec.image``), so what the operator reads is
hostile input: :func:`read_object` bounds its size and nesting before parsing, the models
check every type strictly (no coercion of ``"16"`` to 16, no NaN) and bound every number,
string and map that may reach the FineTuneJob status. Fields the operator does not know are
ignored, so a trainer may add detail (more data-report counters) without breaking older
operators (decision 1623).

Only pydantic and the standard library: the trainer imports this without the operator.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

# Lines the trainer prints on stdout for the operator to read (progress, final result).
PROGRESS_PREFIX = "@@finetune "
# Kubernetes keeps at most this much of a termination message.
TERMINATION_LIMIT = 4096
# The longest channel line read; the trainer's lines are far shorter (the full result,
# with metrics and the data report, is a few KiB).
MAX_LINE_BYTES = 64 * 1024
# The deepest nesting of objects and lists in a channel object (the result is 3 deep).
MAX_DEPTH = 8
# The largest count or size accepted (JSON integers beyond this lose precision anyway).
MAX_COUNT = 2**53
# Entries of a map of counters or metrics.
MAX_ENTRIES = 256
# Characters of a result's message (the trainer shortens longer ones).
MAX_MESSAGE_CHARS = 16384
# Characters of the reason a compared adapter was not evaluated (status.comparedError).
COMPARED_ERROR_CHARS = 1024

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Key = Annotated[str, Field(min_length=1, max_length=64)]
Reason = Annotated[str, Field(pattern=r"^[A-Z][A-Za-z0-9]{0,63}$")]
Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
Uri = Annotated[str, Field(min_length=1, max_length=2048)]


class TrainerOutputError(ValueError):
    """A channel object or termination message the operator cannot accept, naming the field."""

    def __init__(self, source: str, field: str, problem: str) -> None:
        self.source = source
        self.field = field[:200]
        self.problem = problem[:200]
        where = f"{source} field {self.field}" if field else source
        super().__init__(f"{where}: {self.problem}")


class ChannelModel(BaseModel):
    """camelCase on the wire; strict types; unknown fields ignored (newer trainers)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, strict=True, extra="ignore"
    )

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class DataReport(ChannelModel):
    """The data step's report (``data`` line, and ``data`` of the result).

    ``dropped`` counts rows by reason, whatever reasons the data step knows; other counters
    a trainer adds are ignored here and kept in its data_report.json.
    """

    rows_read: Count | None = None
    rows_kept: Count | None = None
    train_rows: Count | None = None
    eval_rows: Count | None = None
    duplicates: Count | None = None
    duplicate_rate: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    pii_masked: Count | None = None
    dropped: Annotated[dict[Key, Count], Field(max_length=MAX_ENTRIES)] | None = None
    digest: Annotated[str, Field(max_length=128)] | None = None


class ProgressLine(ChannelModel):
    """One throttled progress report."""

    type: Literal["progress"] = "progress"
    step: Count | None = None
    total_steps: Count | None = None
    epoch: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    loss: Finite | None = None
    eval_loss: Finite | None = None
    learning_rate: Finite | None = None
    tokens_per_second: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    eta_seconds: Count | None = None
    gpu_memory_gi_b: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = Field(
        default=None, alias="gpuMemoryGiB"
    )
    updated_at: Annotated[str, Field(max_length=64)] | None = None


class DataLine(ChannelModel):
    type: Literal["data"] = "data"
    report: DataReport


class AdapterOutput(ChannelModel):
    """The adapter the trainer wrote (local paths; the operator maps them to output.uri)."""

    uri: Uri
    digest: Digest
    rank: Annotated[int, Field(ge=1, le=65536)] | None = None
    size_bytes: Count | None = None
    base_model: Uri | None = None
    method: Literal["lora", "qlora"] | None = None
    merged_uri: Uri | None = None


Metrics = Annotated[dict[Key, Finite | None], Field(max_length=MAX_ENTRIES)]


class TrainerResult(ChannelModel):
    """The final result: success with metrics and the adapter, or a failure reason."""

    type: Literal["result"] = "result"
    ok: bool
    reason: Reason | None = None
    message: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] | None = None
    metrics: Metrics | None = None
    base_metrics: Metrics | None = None
    # spec.evaluation.compareWith measured on the same eval rows, or why it was not.
    compared_metrics: Metrics | None = None
    compared_error: Annotated[str, Field(max_length=COMPARED_ERROR_CHARS)] | None = None
    # true: compared_metrics' timing metrics were measured as metrics' were (decision 2020).
    compared_timing_comparable: bool | None = None
    adapter: AdapterOutput | None = None
    data: DataReport | None = None


ChannelObject = ProgressLine | DataLine | TrainerResult
_MODELS: dict[str, type[ProgressLine] | type[DataLine] | type[TrainerResult]] = {
    "progress": ProgressLine,
    "data": DataLine,
    "result": TrainerResult,
}


def nesting_depth(text: str) -> int:
    """The deepest nesting of ``{``/``[`` in JSON text (brackets inside strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "}]":
            depth -= 1
    return deepest


def read_object(text: str, source: str) -> dict[str, Any] | None:
    """Parse one JSON object within the size and depth bounds.

    None when ``text`` is not JSON at all (a log line that merely looks like one);
    :class:`TrainerOutputError` when it is too large, too deep or not an object.
    """
    if len(text.encode(errors="replace")) > MAX_LINE_BYTES:
        raise TrainerOutputError(source, "", f"longer than {MAX_LINE_BYTES} bytes")
    if nesting_depth(text) > MAX_DEPTH:
        raise TrainerOutputError(source, "", f"nested deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        raise TrainerOutputError(source, "", f"not a JSON object but {type(obj).__name__}")
    return obj


def _field_of(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err.get("loc", ()))
    return field, str(err.get("msg", "invalid"))[:200]


def validate_object(obj: dict[str, Any], source: str) -> ChannelObject:
    """The typed channel object for ``obj`` (its ``type`` picks the model)."""
    kind = obj.get("type")
    model = _MODELS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise TrainerOutputError(source, "type", f"must be one of {', '.join(_MODELS)}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        field, problem = _field_of(exc)
        raise TrainerOutputError(source, field, problem) from exc
