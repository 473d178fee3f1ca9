"""The fit check of packed runs: token budgets from the same model the trainer's fast path
plans with, and ``auto`` left for the trainer to resolve on the node."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from finetune_operator import estimator as est
from finetune_operator import packed_memory as packed
from finetune_operator.config import OperatorConfig
from finetune_operator.planners.finetunejob import Observed, Plan, plan
from support.ftj_samples import spec

CONFIG = OperatorConfig()
NOW = datetime(2026, 1, 1, 1, 0, 10, tzinfo=UTC)
LLAMA3_8B = est.MODEL_FAMILIES["llama-3-8b"]


def planned(body: dict[str, Any]) -> tuple[Plan, dict[str, Any] | None]:
    p = plan(
        Observed(spec=body, name="bot", namespace="ns", uid="u1", generation=1, status={}, now=NOW),
        CONFIG,
    )
    cm = next((a.body for a in p.actions if a.kind == "ConfigMap"), None)
    return p, (yaml.safe_load(cm["data"]["job.yaml"])["spec"]["training"] if cm else None)


def fits(p: Plan) -> dict[str, Any]:
    return next(c for c in p.status["conditions"] if c["type"] == "Fits")


def packed_spec(**training: Any) -> dict[str, Any]:
    base = {"packing": True, "batchSize": "auto", "gradientCheckpointing": None}
    return spec(training={**base, **training})


@pytest.mark.parametrize(
    ("gpu_gib", "dropout", "tokens", "gc"),
    [
        (80, 0.05, 8192, False),  # an H100: no recomputation
        (80, 0.0, 12288, False),  # without dropout's copies a larger micro-batch fits
        (24, 0.05, 16384, True),  # a 24 GB card (less 10% headroom): checkpointed
    ],
)
def test_packed_auto_plans_tokens_and_leaves_auto_to_the_trainer(
    gpu_gib: float, dropout: float, tokens: int, gc: bool
) -> None:
    body = packed_spec()
    body["resources"] = {"gpus": 1, "gpuMemoryGiB": gpu_gib}
    body["lora"] = {"r": 64, "dropout": dropout}
    p, training = planned(body)
    record = p.status["estimate"]
    assert fits(p)["status"] == "True" and "with packing" in fits(p)["message"]
    assert (record["tokensPerMicroBatch"], record["gradientCheckpointing"]) == (tokens, gc)
    # the same planner the trainer runs on the node, with the operator's headroom
    same = packed.plan_micro_batch(
        LLAMA3_8B,
        method="qlora",
        lora_rank=64,
        max_seq_length=2048,
        memory_budget_gib=gpu_gib * (1 - CONFIG.memory_headroom),
        lora_dropout=dropout,
    )
    assert record["peakGiB"] == same.predicted_peak_gib <= gpu_gib * (1 - CONFIG.memory_headroom)
    assert sum(record["breakdown"].values()) == pytest.approx(record["peakGiB"], abs=0.05)
    # auto stays auto: the trainer plans from the memory it finds free
    assert training is not None
    assert training["batchSize"] == "auto" and training.get("gradientCheckpointing") is None


def test_explicit_packed_batch_is_a_token_budget() -> None:
    p, training = planned(packed_spec(batchSize=2, gradientCheckpointing=True))
    record = p.status["estimate"]
    assert record["tokensPerMicroBatch"] == 2 * 2048 and record["gradientCheckpointing"] is True
    assert training is not None and training["batchSize"] == 2


def test_explicit_packed_choice_that_does_not_fit_is_replaced_not_refused() -> None:
    # 16 x 2048 tokens without checkpointing needs well over 80 GB; the planner's choice fits.
    p, training = planned(packed_spec(batchSize=16, gradientCheckpointing=False))
    assert fits(p)["status"] == "True"
    assert "will be replaced" in fits(p)["message"]
    assert p.status["estimate"]["tokensPerMicroBatch"] < 16 * 2048
    assert training is not None  # children are made: the trainer replaces the choice too


def test_packed_run_that_cannot_fit_creates_nothing() -> None:
    body = packed_spec()
    body["method"] = "lora"
    body["baseModel"] = {"uri": "hf://meta-llama/Meta-Llama-3-70B@main"}
    body["resources"] = {"gpus": 1, "gpuProduct": "Tesla-T4"}
    p, training = planned(body)
    assert p.actions == [] and training is None and p.outcome == "permanent"
    assert fits(p)["reason"] == "InsufficientGPUMemory"
    assert "packing" in fits(p)["message"] and "maxSeqLength" in fits(p)["message"]


def test_unpacked_runs_keep_the_row_estimator() -> None:
    p, training = planned(spec(training={"batchSize": "auto", "gradientCheckpointing": None}))
    assert "tokensPerMicroBatch" not in p.status["estimate"]
    assert training is not None and isinstance(training["batchSize"], int)
