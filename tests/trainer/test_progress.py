"""Progress lines, throttling and the termination message size limit."""

from __future__ import annotations

import io
import json
from typing import Any

from finetune_operator.api.trainer_config import PROGRESS_PREFIX
from finetune_trainer.progress import (
    TERMINATION_LIMIT,
    ProgressReporter,
    compact_result,
    emit,
    write_termination_log,
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_emit_writes_one_prefixed_json_line() -> None:
    buf = io.StringIO()
    emit({"type": "progress", "loss": float("nan"), "step": 3}, buf)
    line = buf.getvalue()
    assert line.startswith(PROGRESS_PREFIX) and line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line[len(PROGRESS_PREFIX) :]) == {"type": "progress", "loss": None, "step": 3}


def test_reporter_throttles_and_computes_rate_and_eta() -> None:
    clock = FakeClock()
    r = ProgressReporter(interval_seconds=10, clock=clock)
    r.begin(step=20, tokens=1000)  # resumed at step 20
    assert r.due()
    first = r.build(20, 120, 0.5, 1000, None)
    assert first["tokensPerSecond"] is None and first["etaSeconds"] is None
    clock.t += 5
    assert not r.due()
    clock.t += 5
    assert r.due()
    r.observe_logs({"loss": 1.5, "learning_rate": 1e-4, "eval_loss": 1.7})
    p = r.build(40, 120, 1.0, 3000, 2.5)
    assert p["tokensPerSecond"] == 200.0  # 2000 tokens in 10 s
    assert p["etaSeconds"] == 40  # 80 steps left at 0.5 s per step
    assert (p["loss"], p["evalLoss"], p["learningRate"], p["gpuMemoryGiB"]) == (1.5, 1.7, 1e-4, 2.5)
    assert p["updatedAt"].endswith("Z")


def test_compact_result_stays_under_the_limit() -> None:
    big: dict[str, Any] = {
        "type": "result",
        "ok": True,
        "reason": "Succeeded",
        "message": "m",
        "data": {"dropped": {f"reason-number-{i}": i for i in range(250)}},
        "baseMetrics": {f"m{i}": 0.1 for i in range(200)},
        "metrics": {"rougeL": 0.7},
        "adapter": {"uri": "/out/adapter", "digest": "sha256:" + "a" * 64},
    }
    text = compact_result(big)
    assert len(text.encode()) < TERMINATION_LIMIT
    out = json.loads(text)
    assert "baseMetrics" not in out and "data" not in out
    assert out["metrics"] == {"rougeL": 0.7} and out["adapter"]["digest"].startswith("sha256:")
    small = {"type": "result", "ok": False, "reason": "DataUnusable", "message": "x"}
    assert json.loads(compact_result(small)) == small


def test_termination_log_tolerates_unwritable_path(tmp_path: Any) -> None:
    write_termination_log(str(tmp_path / "missing-dir" / "log"), {"ok": True})
    target = tmp_path / "log"
    write_termination_log(str(target), {"ok": True})
    assert json.loads(target.read_text()) == {"ok": True}
