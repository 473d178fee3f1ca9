"""Rows, trainer configurations and the subprocess environment shared by the trainer tests.

A module with its own name (not ``conftest``): other test folders have a ``conftest.py`` too,
and importing helpers from "conftest" would pick whichever folder was collected first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
INTENTS = ["refund", "question", "complaint", "cancel", "upgrade", "invoice", "delivery", "login"]


def json_task_rows(n: int = 48) -> list[dict[str, Any]]:
    """A learnable task: the answer is always a small JSON object with a fixed shape."""
    rows = []
    for i in range(n):
        intent = INTENTS[i % len(INTENTS)]
        rows.append(
            {
                "prompt": f"Ticket {i}: customer wants {intent}. Answer in JSON.",
                "completion": json.dumps({"intent": intent, "priority": "high"}),
                "task": "json",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_config(
    model_dir: Path,
    train_path: Path,
    output_dir: Path,
    *,
    eval_path: Path | None = None,
    training: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    method: str = "lora",
    lora: dict[str, Any] | None = None,
    output: dict[str, Any] | None = None,
    extra_spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A TrainerConfig dict (camelCase) for a short CPU run."""
    train = {
        "maxSteps": 6,
        "learningRate": 5e-3,
        "batchSize": 4,
        "gradientCheckpointing": False,
        "optimizer": "adamw_torch",
        "maxSeqLength": 96,
        "checkpointEverySteps": 100,
        "loggingEverySteps": 1,
        "warmupRatio": 0.0,
        **(training or {}),
    }
    ds: dict[str, Any] = {"train": {"uri": "file:///data/train.jsonl"}, **(dataset or {})}
    if eval_path is not None:
        ds["eval"] = {"uri": "file:///data/eval.jsonl"}
    spec: dict[str, Any] = {
        "baseModel": {"uri": "file:///models/tiny"},
        "dataset": ds,
        "method": method,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **(lora or {})},
        "training": train,
        "resources": {"gpus": 0},
        "output": {"uri": "file:///out", **(output or {})},
        **(extra_spec or {}),
    }
    return {
        "jobName": "test-job",
        "namespace": "default",
        "spec": spec,
        "paths": {
            "baseModel": str(model_dir),
            "trainData": str(train_path),
            "evalData": str(eval_path) if eval_path else None,
            "outputDir": str(output_dir),
        },
        "device": "cpu",
        "progressIntervalSeconds": 0,
        "terminationLog": str(output_dir / "termination-log"),
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer-image")])
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


HOLD_TRAINING = Path(__file__).parent / "hold_training"


def held_after_step(env: dict[str, str], step: int) -> dict[str, str]:
    """``env`` for a trainer that stops making progress after ``step`` (see hold_training)."""
    held = dict(env)
    held["PYTHONPATH"] = os.pathsep.join([str(HOLD_TRAINING), env.get("PYTHONPATH", "")])
    held["HOLD_TRAINING_AFTER_STEP"] = str(step)
    return held
