"""Real training on the CPU with the tiny model: LoRA learns, QLoRA (4-bit) trains, merge is exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api.trainer_config import TrainerConfig
from support.trainer_samples import json_task_rows, make_config, write_jsonl

pytestmark = pytest.mark.slow

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _run(tmp_path: Path, tiny_model: Path, **kw: Any) -> tuple[TrainerConfig, Any, Any]:
    from finetune_trainer.data import load_tokenizer, prepare_data
    from finetune_trainer.train import train_adapter

    train = write_jsonl(tmp_path / "train.jsonl", json_task_rows(48))
    config = TrainerConfig.model_validate(make_config(tiny_model, train, tmp_path / "out", **kw))
    tokenizer, _ = load_tokenizer(config.paths.base_model)
    prepared = prepare_data(config.spec.dataset, train, None, tokenizer, 96, 42)
    return config, prepared, train_adapter(config, prepared, tokenizer)


def _losses(outcome: Any) -> list[float]:
    return [float(e["loss"]) for e in outcome.log_history if "loss" in e]


def test_lora_loss_falls_on_a_learnable_task(tmp_path: Path, tiny_model: Path) -> None:
    _config, _prepared, outcome = _run(
        tmp_path,
        tiny_model,
        training={"maxSteps": 30, "learningRate": 2e-2, "loggingEverySteps": 5},
        lora={"r": 16, "alpha": 32, "targetModules": LINEAR},
    )
    losses = _losses(outcome)
    assert outcome.global_step == 30 and len(losses) == 6
    assert losses[-1] < losses[0] / 4, losses
    assert outcome.metrics["evalLoss"] < losses[0]
    assert (outcome.adapter_dir / "adapter_model.safetensors").is_file()
    assert (outcome.adapter_dir / "tokenizer_config.json").is_file()


def test_qlora_trains_a_4bit_base(tmp_path: Path, tiny_model: Path) -> None:
    import bitsandbytes as bnb

    _config, _prepared, outcome = _run(
        tmp_path,
        tiny_model,
        method="qlora",
        extra_spec={"quantization": {"type": "nf4", "doubleQuant": True}},
        training={
            "maxSteps": 12,
            "learningRate": 2e-2,
            "loggingEverySteps": 3,
            "gradientCheckpointing": True,
            "optimizer": "paged_adamw_8bit",
        },
    )
    quantised = [m for m in outcome.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised, "the base layers should be 4-bit"
    assert quantised[0].weight.quant_state.quant_type == "nf4"
    losses = _losses(outcome)
    assert losses[-1] < losses[0], losses
    assert outcome.training_arguments["computeDtype"] == "float32"  # CPU
    assert outcome.training_arguments["optimizer"] == "paged_adamw_8bit"


def test_packing_keeps_training(tmp_path: Path, tiny_model: Path) -> None:
    _config, prepared, outcome = _run(
        tmp_path,
        tiny_model,
        training={"maxSteps": 6, "packing": True, "maxSeqLength": 256, "batchSize": 2},
    )
    losses = _losses(outcome)
    assert outcome.global_step == 6 and losses[-1] < losses[0]
    # Packed: each 256-token sequence holds several ~55-token rows (not one row each).
    tokens = outcome.log_history[-1].get("num_input_tokens_seen") or 0
    assert tokens > 6 * 2 * max(len(t.input_ids) for t in prepared.train)


def test_merged_model_matches_base_plus_adapter(tmp_path: Path, tiny_model: Path) -> None:
    import torch
    from finetune_trainer.train import merge_adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _config, _prepared, outcome = _run(
        tmp_path, tiny_model, training={"maxSteps": 8, "learningRate": 2e-2}
    )
    merged_dir = merge_adapter(
        tiny_model, outcome.adapter_dir, tmp_path / "merged", "bfloat16", "cpu"
    )
    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = tok("Ticket 3: customer wants refund. Answer in JSON.", return_tensors="pt").input_ids
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, outcome.adapter_dir).eval()
        adapted_logits = adapted(ids).logits
        merged_logits = merged(ids).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3), "adapter had no effect"
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-4, rtol=1e-4)
    assert not any("lora" in name for name, _ in merged.named_parameters())
