"""Choices the trainer makes before training: batch/checkpointing, optimizer, dtype, targets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_trainer.errors import TrainerError
from finetune_trainer.train import (
    compute_dtype_name,
    estimator_choice,
    load_model_for_training,
    resolve_batch_and_checkpointing,
    resolve_optimizer,
)


def _spec(**training: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///m"},
            "dataset": {"train": {"uri": "file:///d.jsonl"}},
            "output": {"uri": "file:///out"},
            "training": training,
        }
    )


def test_explicit_batch_and_checkpointing_win(tiny_model: Path) -> None:
    spec = _spec(batchSize=3, gradientCheckpointing=True)
    assert resolve_batch_and_checkpointing(spec, "cpu", tiny_model) == (3, True, "spec")


def test_auto_on_cpu_uses_the_conservative_default(tiny_model: Path) -> None:
    assert resolve_batch_and_checkpointing(_spec(), "cpu", tiny_model) == (2, False, "default")
    batch, gc, _ = resolve_batch_and_checkpointing(_spec(batchSize=8), "cpu", tiny_model)
    assert (batch, gc) == (8, False)


def test_estimator_picks_batch_for_the_gpu(tiny_model: Path) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    big = estimator_choice(_spec(), config, gpu_memory_gib=80.0)
    small = estimator_choice(_spec(), config, gpu_memory_gib=0.05)
    assert big is not None and small is not None
    assert big[0] >= small[0] and big[0] >= 4
    assert estimator_choice(_spec(batchSize=2), config, 80.0)[0] == 2  # type: ignore[index]


@pytest.mark.parametrize(
    "name", ["paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adafactor"]
)
def test_optimizers_run_on_cpu(name: str) -> None:
    # bitsandbytes 0.50.2 has CPU kernels: no fallback is needed for its optimizers here.
    assert resolve_optimizer(name, "cpu") == (name, None)


def test_cpu_computes_in_float32() -> None:
    assert compute_dtype_name(_spec(), "cpu") == "float32"


def test_output_head_cannot_be_a_target(tiny_model: Path) -> None:
    spec = _spec()
    spec.method = "lora"
    spec.lora.target_modules = ["q_proj", "lm_head"]
    with pytest.raises(TrainerError) as info:
        load_model_for_training(spec, tiny_model, "cpu", False)
    assert info.value.reason == "InvalidConfig" and "remove it" in info.value.message


def test_unknown_target_module_is_reported(tiny_model: Path) -> None:
    spec = _spec()
    spec.method = "lora"
    spec.lora.target_modules = ["no_such_proj"]
    with pytest.raises(TrainerError) as info:
        load_model_for_training(spec, tiny_model, "cpu", False)
    assert "do not match the model's layers" in info.value.message
