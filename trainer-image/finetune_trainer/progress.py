"""The progress channel: ``@@finetune {json}`` lines on stdout and the termination message.

The operator tails the pod log for progress lines and reads the final result from the
container's termination message (see docs/decisions/0100-progress-channel.md). Every object
is checked against the models the operator reads it with
(:mod:`finetune_operator.api.trainer_output`) before it is written.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from finetune_operator.api.trainer_output import (
    MAX_MESSAGE_CHARS,
    PROGRESS_PREFIX,
    TERMINATION_LIMIT,
    validate_object,
)
from finetune_operator.domain.times import now_rfc3339

if TYPE_CHECKING:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

__all__ = ["TERMINATION_LIMIT", "ProgressReporter", "compact_result", "emit", "progress_line"]


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: report them as absent."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def checked(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` as the operator will accept it: non-finite numbers as absent, an overlong
    message shortened; raises ``TrainerOutputError`` for anything else the shared model
    refuses (a bug here, better found than shipped to the operator)."""
    out: dict[str, Any] = _finite(dict(obj))
    if isinstance(out.get("message"), str) and len(out["message"]) > MAX_MESSAGE_CHARS:
        out["message"] = out["message"][: MAX_MESSAGE_CHARS - 3] + "..."
    if out.get("type") in ("progress", "data", "result"):
        validate_object(out, f"{out['type']} line")
    return out


def progress_line(obj: dict[str, Any]) -> str:
    """One protocol line (no newline)."""
    return PROGRESS_PREFIX + json.dumps(checked(obj), separators=(",", ":"), ensure_ascii=False)


def emit(obj: dict[str, Any], stream: TextIO | None = None) -> None:
    """Print one protocol line and flush so that the pod log has it at once.

    In a data-parallel run only global rank 0 speaks (the operator reads one stream).
    """
    from .distributed import is_main_process

    if not is_main_process():
        return
    out = stream or sys.stdout
    out.write(progress_line(obj) + "\n")
    out.flush()


def compact_result(result: dict[str, Any], limit: int = TERMINATION_LIMIT) -> str:
    """The result as compact JSON under ``limit`` bytes, dropping detail in a fixed order."""
    obj = checked({"type": "result", **result})
    if "type" not in result:
        obj.pop("type")
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for key in ("baseMetrics", "data", "comparedMetrics", "metrics"):
        if len(text.encode()) < limit:
            return text
        if obj.pop(key, None) is not None and key == "comparedMetrics":
            obj["comparedError"] = "the compared metrics did not fit the termination message"
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    while len(text.encode()) >= limit and obj.get("message"):
        obj["message"] = str(obj["message"])[: max(0, len(str(obj["message"])) // 2)] + "..."
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return text


def write_termination_log(path: str | None, result: dict[str, Any]) -> None:
    from .distributed import is_main_process

    if not path or not is_main_process():
        return
    try:
        Path(path).write_text(compact_result(result), encoding="utf-8")
    except OSError as exc:  # e.g. /dev/termination-log outside Kubernetes
        log.warning("could not write the termination message to %s: %s", path, exc)


def report_result(result: dict[str, Any], termination_log: str | None) -> None:
    """Print the final ``result`` line and write the termination message."""
    full = {"type": "result", **result}
    emit(full)
    write_termination_log(termination_log, full)


def gpu_memory_gib() -> float | None:
    """Peak CUDA memory allocated so far, in GiB (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


class ProgressReporter:
    """Builds throttled progress objects from trainer state (kept apart from transformers)."""

    def __init__(
        self, interval_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval_seconds
        self.clock = clock
        self.start_time: float | None = None
        self.start_step = 0
        self.start_tokens = 0
        self.last_emit: float | None = None
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.last_lr: float | None = None

    def begin(self, step: int, tokens: int) -> None:
        self.start_time = self.clock()
        self.start_step = step
        self.start_tokens = tokens

    def observe_logs(self, logs: dict[str, float]) -> None:
        if "loss" in logs:
            self.last_loss = float(logs["loss"])
        if "eval_loss" in logs:
            self.last_eval_loss = float(logs["eval_loss"])
        if "learning_rate" in logs:
            self.last_lr = float(logs["learning_rate"])

    def due(self) -> bool:
        now = self.clock()
        return self.last_emit is None or now - self.last_emit >= self.interval

    def build(
        self, step: int, total: int, epoch: float | None, tokens: int, gpu_gib: float | None
    ) -> dict[str, Any]:
        now = self.clock()
        self.last_emit = now
        elapsed = now - (self.start_time if self.start_time is not None else now)
        done = step - self.start_step
        tps = (tokens - self.start_tokens) / elapsed if elapsed > 0 else None
        eta = round((total - step) * elapsed / done) if done > 0 and total >= step else None
        return {
            "type": "progress",
            "step": step,
            "totalSteps": total,
            "epoch": round(epoch, 4) if epoch is not None else None,
            "loss": self.last_loss,
            "evalLoss": self.last_eval_loss,
            "learningRate": self.last_lr,
            "tokensPerSecond": round(tps, 2) if tps is not None else None,
            "etaSeconds": eta,
            "gpuMemoryGiB": gpu_gib,
            "updatedAt": now_rfc3339(),
        }


def make_progress_callback(
    interval_seconds: float, stream: TextIO | None = None
) -> TrainerCallback:
    """A transformers ``TrainerCallback`` that prints throttled progress lines."""
    from transformers import TrainerCallback

    reporter = ProgressReporter(interval_seconds)

    class ProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self.reporter = reporter

        def _emit(self, state: TrainerState) -> None:
            if not state.is_world_process_zero:  # one reporter per job, not per GPU
                return
            emit(
                reporter.build(
                    state.global_step,
                    state.max_steps,
                    state.epoch,
                    int(getattr(state, "num_input_tokens_seen", 0) or 0),
                    gpu_memory_gib(),
                ),
                stream,
            )

        def on_train_begin(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
        ) -> None:
            reporter.begin(state.global_step, int(getattr(state, "num_input_tokens_seen", 0) or 0))

        def on_log(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            logs: dict[str, float] | None = None,
            **kw: Any,
        ) -> None:
            reporter.observe_logs(logs or {})
            if "eval_loss" in (logs or {}) and reporter.due():
                self._emit(state)

        def on_step_end(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
        ) -> None:
            if reporter.due():
                self._emit(state)

        def on_train_end(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
        ) -> None:
            self._emit(state)

    return ProgressCallback()
