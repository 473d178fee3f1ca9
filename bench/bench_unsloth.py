"""Unsloth's training speed on the benchmark's model and rows, in a process of its own.

``bench_train.py`` starts this for its ``unsloth[:TOKENS]`` variants (``unsloth_command``):
Unsloth patches transformers, TRL and PEFT when it is imported, so it must come first and
must not share a process with the other variants. It needs its own TRL and datasets
(``bench/gpu_wheels.sh --unsloth DIR``, first on ``PYTHONPATH``) and a GPU.

Same random base (``--model-dir``), same rows (``bench/data.py``, same seed), same step
clock and token counting as the other variants (``bench_train.StepClock``,
``make_counting_trainer``, ``step_metrics``). Unsloth's own fast path: QLoRA nf4 with
double quantisation, r on all seven projections, LoRA dropout 0, padding-free best-fit
packing into TOKENS-token micro-batches, and its offloaded gradient checkpointing
(``use_gradient_checkpointing="unsloth"``). Writes one result object to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--name", required=True, help="the variant's name in the results")
    parser.add_argument("--tokens", type=int, required=True, help="tokens per packed micro-batch")
    parser.add_argument("--method", choices=["qlora", "lora"], default="qlora")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--peak-tflops", type=float, default=800.0)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import unsloth  # first: it patches transformers, TRL and PEFT as it is imported

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "trainer-image"))
    import importlib.metadata as md

    import torch
    from bench_train import (
        StepClock,
        count_tokens,
        environment,
        make_counting_trainer,
        peak_memory,
        step_metrics,
    )
    from data import make_rows
    from datasets import Dataset
    from finetune_operator.domain.estimator import ModelShape
    from trl import SFTConfig
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model_dir,
        max_seq_length=args.tokens,
        dtype=torch.bfloat16,
        load_in_4bit=args.method == "qlora",
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=args.rank,
        lora_alpha=16,
        lora_dropout=0.0,  # Unsloth's fast LoRA kernels need dropout 0
        target_modules=TARGETS,
        bias="none",
        use_gradient_checkpointing="unsloth",  # offloads the checkpointed inputs to the host
        random_state=args.seed,
    )
    rows = make_rows(args.rows, args.seed)
    env = environment()
    env["unsloth"] = getattr(unsloth, "__version__", None)
    env["unsloth_zoo"] = md.version("unsloth_zoo")
    result: dict[str, Any] = {
        "variant": args.name,
        "environment": env,
        "config": {
            "max_length": args.tokens,
            "packing": True,
            "padding_free": True,
            "gradient_checkpointing": "unsloth",
            "lora_dropout": 0.0,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        sft_args = SFTConfig(
            output_dir=tmp,
            optim="paged_adamw_8bit",
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            max_steps=args.warmup_steps + args.steps,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            bf16=True,
            seed=args.seed,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=1,
            max_length=args.tokens,
            packing=True,
            packing_strategy="bfd",
            padding_free=True,
            completion_only_loss=True,
            dataset_num_proc=min(8, os.cpu_count() or 1),
        )
        torch.manual_seed(args.seed)
        clock = StepClock()
        trainer = make_counting_trainer(False)(
            model=model,
            args=sft_args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[clock.callback],
        )
        trainer.token_log = []
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result["allocatedBeforeTrainGiB"] = round(torch.cuda.memory_allocated() / 1024**3, 2)
        trainer.train()
        result.update(peak_memory())
        history = [h for h in trainer.state.log_history if "loss" in h]
        micro = [count_tokens(kept) for kept in trainer.token_log]
    shape = ModelShape.from_config(model.config)
    result.update(step_metrics(clock.stamps, micro, 1, history, shape, args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
