"""The quality gates stop an untrained model and let a fine-tuned one through.

End to end with the real command line: ``finetune-trainer data-report``, ``evaluate
--base-only`` (the model before fine-tuning), ``train`` (trains and evaluates in the same
process), then ``evaluate`` of the saved adapter. A tiny random model writes no JSON; after
40 LoRA steps on a task with a fixed JSON answer format it does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from evalkit import TICKET_SCHEMA, ticket_messages, write_jsonl
from finetune_operator.api.trainer_config import PROGRESS_PREFIX
from finetune_operator.domain.gates import evaluate_gates, summarize

REPO = Path(__file__).resolve().parents[2]

GATES = [
    {"metric": "jsonValidity", "min": 0.9},
    {"metric": "jsonSchemaConformance", "min": 0.9},
    {"metric": "exactMatch", "min": 0.5},
    {"metric": "rougeL", "minImprovementOverBase": 0.3},
]


def _raw_rows(start: int, count: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(start, start + count):
        messages, answer = ticket_messages(i)
        rows.append(
            {
                "prompt": messages[0]["content"],
                "completion": answer,
                "task": "json",
                "json_schema": TICKET_SCHEMA,
            }
        )
    return rows


def _config(model_dir: Path, work: Path) -> dict[str, Any]:
    return {
        "jobName": "gate-flip",
        "spec": {
            "baseModel": {"uri": "file:///models/tiny"},
            "dataset": {
                "train": {"uri": "file:///data/train.jsonl"},
                "eval": {"uri": "file:///data/eval.jsonl"},
            },
            "method": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "training": {
                "maxSteps": 40,
                "learningRate": 1e-2,
                "scheduler": "constant",
                "warmupRatio": 0.0,
                "batchSize": 8,
                "gradientCheckpointing": False,
                "optimizer": "adamw_torch",
                "maxSeqLength": 96,
                "checkpointEverySteps": 1000,
                "loggingEverySteps": 10,
            },
            "resources": {"gpus": 0},
            "output": {"uri": "file:///out"},
            "qualityGates": GATES,
            "evaluation": {"maxNewTokens": 24, "batchSize": 8, "maxSamples": 8},
        },
        "paths": {
            "baseModel": str(model_dir),
            "trainData": str(work / "train.jsonl"),
            "evalData": str(work / "eval.jsonl"),
            "outputDir": str(work / "out"),
        },
        "device": "cpu",
        "progressIntervalSeconds": 30,
        "terminationLog": str(work / "termination-log"),
    }


def _cli(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    """Run the trainer CLI; (exit code, last result line, stderr)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer-image")])
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_trainer.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(PROGRESS_PREFIX):
            obj = json.loads(line[len(PROGRESS_PREFIX) :])
            if obj.get("type") == "result":
                result = obj
    return proc.returncode, result, proc.stderr


@pytest.mark.slow
def test_json_gates_fail_before_and_pass_after_fine_tuning(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    write_jsonl(tmp_path / "train.jsonl", _raw_rows(0, 48))
    write_jsonl(tmp_path / "eval.jsonl", _raw_rows(1000, 8))
    job = tmp_path / "job.json"
    job.write_text(json.dumps(_config(tiny_model_dir, tmp_path)), encoding="utf-8")
    out = tmp_path / "out"

    # Before fine-tuning: the data step writes eval.jsonl, the base model is judged.
    code, _, err = _cli("data-report", "--config", str(job))
    assert code == 0, err
    code, before, err = _cli("evaluate", "--config", str(job), "--base-only")
    assert code == 0, err
    assert before is not None and before["ok"] is True
    base = json.loads((out / "base_metrics.json").read_text())
    assert base == before["baseMetrics"]
    assert base["jsonValidity"] < 0.9
    assert base["jsonSchemaConformance"] < 0.9
    by_metric = {g["metric"]: g for g in before["gates"]}
    assert by_metric["jsonValidity"]["passed"] is False
    assert "jsonValidity" in before["message"] and "short by" in before["message"]
    assert "FAIL jsonValidity >= 0.9" in err

    # Fine-tune; the trainer evaluates in the same process (base too: an improvement gate).
    code, trained, err = _cli("train", "--config", str(job))
    assert code == 0, err
    assert trained is not None and trained["ok"] is True, trained
    metrics, base_after = trained["metrics"], trained["baseMetrics"]
    assert metrics["jsonValidity"] >= 0.9
    assert base_after["jsonValidity"] == pytest.approx(base["jsonValidity"])
    # The verdict the operator will reach from the result it reads.
    ok, summary, message = summarize(evaluate_gates(GATES, metrics, base_after))
    assert ok, message
    assert summary == "4/4 passed"

    # The saved adapter, evaluated on its own, passes every gate too.
    code, after, err = _cli("evaluate", "--config", str(job))
    assert code == 0, err
    assert after is not None and after["gatesSummary"] == "4/4 passed", after
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == after["metrics"]
    assert saved["jsonValidity"] >= 0.9 and saved["exactMatch"] >= 0.5
    assert saved["evalLoss"] == pytest.approx(metrics["evalLoss"], rel=1e-3)
    assert saved["evalLoss"] < base["evalLoss"]
    assert "PASS jsonValidity >= 0.9" in err
    # It evaluated the adapter the trainer recorded, digest checked against the manifest.
    assert after["adapterDigest"] == trained["adapter"]["digest"]

    # An adapter whose files changed since training is refused before any model loads.
    config_file = out / "adapter" / "adapter_config.json"
    config_file.write_text(config_file.read_text() + " ", encoding="utf-8")
    code, refused, _ = _cli("evaluate", "--config", str(job))
    assert code == 5
    assert refused is not None and refused["reason"] == "EvaluationFailed"
    assert "does not match its manifest.json" in refused["message"]
