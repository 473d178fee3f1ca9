"""The trainer's fast-path hook, on the CPU: it rewrites the SFT settings to padding-free
packing, and a TRL training run with the varlen attention function trains (the boundaries
TRL's collator computes reach the attention through the model's keyword arguments)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.mark.slow
def test_fast_path_settings_train_with_varlen_attention(tmp_path: Path) -> None:
    import torch
    from datasets import Dataset
    from finetune_operator.api.trainer_config import TrainerConfig
    from finetune_trainer import fastpath, train
    from finetune_trainer.tinymodel import build_tiny_model
    from trl import SFTTrainer

    model_dir = build_tiny_model(tmp_path / "model", initializer_range=0.3)
    config = TrainerConfig.model_validate(
        {
            "jobName": "fast",
            "spec": {
                "baseModel": {"uri": "file:///models/tiny"},
                "dataset": {"train": {"uri": "file:///data/train.jsonl"}},
                "method": "lora",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "training": {
                    "maxSteps": 4,
                    "learningRate": 5e-3,
                    "batchSize": 2,
                    "gradientCheckpointing": False,
                    "optimizer": "adamw_torch",
                    "maxSeqLength": 64,
                    "packing": True,
                    "warmupRatio": 0.0,
                    "loggingEverySteps": 1,
                },
                "resources": {"gpus": 0},
                "output": {"uri": "file:///out"},
            },
            "paths": {
                "baseModel": str(model_dir),
                "trainData": "/dev/null",
                "outputDir": str(tmp_path / "out"),
            },
            "device": "cpu",
            "terminationLog": None,
        }
    )
    torch.manual_seed(0)
    model = train.load_model_for_training(config.spec, model_dir, "cpu", False)
    args = train.build_sft_config(
        config, "cpu", 2, False, "adamw_torch", tmp_path / "ckpt", has_eval=False
    )
    args.save_strategy = "no"
    assert train.apply_fast_path(config, model, args, "cpu", "adamw_torch") is None
    note = train.apply_fast_path(config, model, args, "cuda", "adamw_torch")
    assert note is not None and "fast path" in note
    # batchSize 2 x maxSeqLength 64: an explicit batch becomes a 128-token budget when a
    # budget can be planned; without a GPU there is no plan and the default budget applies
    assert args.packing and args.padding_free and args.per_device_train_batch_size == 1
    assert args.max_length >= 64
    assert getattr(args, "activation_checkpointing", False) == args.gradient_checkpointing
    fastpath.set_attention(model, fastpath.register_varlen_attention())

    calls: list[int] = []
    original = fastpath._per_row_sdpa

    def counting(q, k, v, cu, scale):  # type: ignore[no-untyped-def]
        calls.append(int(cu.numel()) - 1)
        return original(q, k, v, cu, scale)

    fastpath._per_row_sdpa = counting  # type: ignore[assignment]
    try:
        rows = [[5 + (i * 3 + j) % 40 for j in range(8 + (i % 5) * 6)] for i in range(40)]
        dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
        from finetune_trainer.tinymodel import build_tokenizer

        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=build_tokenizer()
        )
        trainer.train()
    finally:
        fastpath._per_row_sdpa = original  # type: ignore[assignment]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert calls and max(calls) > 1  # several rows per packed micro-batch, kept apart


def _tiny_packed_run(tmp_path: Path, trainer_cls: type, grad_accum: int) -> object:
    import torch
    from datasets import Dataset
    from finetune_trainer.tinymodel import build_tiny_model
    from support.packed_training import PACKED_ROWS, packed_cpu_args, packed_lora_trainer
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    if not model_dir.exists():
        build_tiny_model(model_dir, initializer_range=0.3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = PACKED_ROWS
    prompt = [min(3, len(r) // 3) for r in rows]
    dataset = Dataset.from_dict(
        {
            "input_ids": rows,
            "completion_mask": [
                [0] * p + [1] * (len(r) - p) for p, r in zip(prompt, rows, strict=True)
            ],
        }
    )
    args = packed_cpu_args(
        tmp_path / f"out-{trainer_cls.__name__}",
        gradient_accumulation_steps=grad_accum,
        completion_only_loss=True,
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,
    )
    trainer = packed_lora_trainer(model, args, dataset, trainer_cls=trainer_cls)
    trainer.train()
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_fast_trainer_class_trains_exactly_like_trl(tmp_path: Path, grad_accum: int) -> None:
    """Same loss, metrics and token counts as TRL's own SFTTrainer, without reading the GPU
    back mid-step (on the CPU the reads are free, so only the numbers are compared here)."""
    from finetune_trainer import fastpath
    from trl import SFTTrainer

    ours = _tiny_packed_run(tmp_path, fastpath.trainer_class(), grad_accum)
    theirs = _tiny_packed_run(tmp_path, SFTTrainer, grad_accum)

    def logged(trainer: object, key: str) -> list[float]:
        history = trainer.state.log_history  # type: ignore[attr-defined]
        return [h[key] for h in history if key in h and "train_loss" not in h]

    assert len(logged(ours, "loss")) == 5
    for key in ("loss", "grad_norm", "num_tokens"):
        assert logged(ours, key) == pytest.approx(logged(theirs, key), rel=1e-5), key
    assert ours.state.num_input_tokens_seen == theirs.state.num_input_tokens_seen  # type: ignore[attr-defined]
    assert ours.state.num_input_tokens_seen > 0  # type: ignore[attr-defined]
    for key in ("entropy", "mean_token_accuracy"):
        mine, trl = logged(ours, key), logged(theirs, key)
        assert len(mine) == len(trl) == 5
        if grad_accum == 1:  # one micro-batch per log line: the same number
            assert mine == pytest.approx(trl, rel=1e-5), key
        else:  # TRL averages micro-batches, the fast path weighs them by their tokens
            assert mine == pytest.approx(trl, rel=0.1, abs=0.02), key
