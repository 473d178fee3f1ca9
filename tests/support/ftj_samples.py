"""Sample FineTuneJob specs and cluster objects shared by the controller tests."""

from __future__ import annotations

import copy
import json
from typing import Any

from finetune_operator.api.trainer_config import PROGRESS_PREFIX

BASE_SPEC: dict[str, Any] = {
    "baseModel": {
        "uri": "hf://meta-llama/Meta-Llama-3-8B-Instruct@main",
        "credentialsSecretRef": {"name": "hf-token"},
    },
    "dataset": {"train": {"uri": "pvc://datasets/support/train.jsonl"}},
    "method": "qlora",
    "lora": {"r": 64},
    "training": {"maxSeqLength": 2048, "batchSize": 4, "gradientCheckpointing": True},
    "resources": {"gpus": 1, "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
    "output": {"uri": "pvc://adapters/support-bot"},
    "qualityGates": [{"metric": "rougeL", "min": 0.3}, {"metric": "evalLoss", "max": 2.0}],
}


def spec(**overrides: Any) -> dict[str, Any]:
    """BASE_SPEC with top-level sections deep-merged from ``overrides``."""
    result = copy.deepcopy(BASE_SPEC)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = {**result[key], **value}
        elif value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def channel(obj: dict[str, Any]) -> str:
    return PROGRESS_PREFIX + json.dumps(obj)


def progress_line(step: int, total: int, loss: float = 1.5) -> str:
    return channel(
        {
            "type": "progress",
            "step": step,
            "totalSteps": total,
            "epoch": step / total,
            "loss": loss,
            "tokensPerSecond": 6800.0,
            "etaSeconds": (total - step) * 2,
            "gpuMemoryGiB": 10.1,
            "updatedAt": f"2026-01-01T00:{step % 60:02d}:00Z",
        }
    )


DATA_REPORT = {
    "rowsRead": 1000,
    "rowsKept": 950,
    "trainRows": 855,
    "evalRows": 95,
    "duplicates": 40,
    "duplicateRate": 0.04,
    "piiMasked": 12,
    "dropped": {"duplicate": 40, "tooLong": 10},
    "digest": "sha256:" + "d" * 64,
}


def result(
    ok: bool = True, metrics: dict[str, float] | None = None, **extra: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "result", "ok": ok}
    if ok:
        out.update(
            metrics=metrics if metrics is not None else {"rougeL": 0.42, "evalLoss": 1.1},
            adapter={
                "uri": "/mnt/pvc/adapters/support-bot/adapter",
                "digest": "sha256:" + "a" * 64,
                "rank": 64,
                "sizeBytes": 335_000_000,
                "baseModel": "hf://meta-llama/Meta-Llama-3-8B-Instruct@main",
                "method": "qlora",
            },
            data=DATA_REPORT,
        )
    out.update(extra)
    return out


def pod(
    name: str,
    *,
    created: str = "2026-01-01T00:00:00Z",
    phase: str = "Running",
    started: str | None = "2026-01-01T00:00:10Z",
    trainer_state: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    init_statuses: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if started:
        status["startTime"] = started
    if trainer_state is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": trainer_state}]
    if conditions:
        status["conditions"] = conditions
    if init_statuses:
        status["initContainerStatuses"] = init_statuses
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": status}
