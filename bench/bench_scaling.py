"""Data-parallel scaling: the same QLoRA run on 1 GPU, then on N GPUs (torchrun), as JSON.

    PYTHONPATH=operator:trainer-image python bench/bench_scaling.py --workdir /scratch/bench \
        [--gpus 2] [--steps 40] [--layers 32] [--seq 2048] [--batch 4] [--accumulation 2]

Both runs go through ``finetune-trainer train`` exactly as in a trainer pod (the N-GPU run
with ``--nproc-per-node N``), on the same data and the same global batch (the trainer
divides ``gradientAccumulation`` by the number of GPUs), so they process the same tokens.
The model is a random model with Llama-3-8B shapes (hidden 4096, 32 layers, GQA 32/8,
intermediate 14336, vocabulary 128256), written once to ``<workdir>/model`` in bfloat16.

Printed: tokens/s of each run (the trainer's own figure, all ranks counted) and
``scalingEfficiency = tokens/s(N) / (N x tokens/s(1))``; the target is 0.85.
Needs a machine with at least ``--gpus`` CUDA GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PREFIX = "@@finetune "
TARGET = 0.85
WORDS = [
    "order",
    "refund",
    "invoice",
    "delivery",
    "account",
    "password",
    "upgrade",
    "plan",
    "support",
    "ticket",
    "customer",
    "shipping",
    "warehouse",
    "payment",
    "card",
    "billing",
    "address",
    "return",
    "label",
    "product",
    "issue",
    "answer",
]


def make_model(path: Path, layers: int) -> Path:
    """A random model with Llama-3-8B shapes (bfloat16) and the tiny tokenizer."""
    if (path / "config.json").is_file():
        return path
    import torch
    from finetune_trainer.tinymodel import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_data(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 300)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 200)))
            f.write(json.dumps({"prompt": f"Case {i}: {prompt}", "completion": answer}) + "\n")
    return path


def trainer_config(args: argparse.Namespace, model: Path, data: Path, out: Path) -> dict[str, Any]:
    return {
        "jobName": f"bench-scaling-{out.name}",
        "spec": {
            "baseModel": {"uri": "file:///models/llama-3-8b-shaped"},
            "dataset": {"train": {"uri": "file:///data/train.jsonl"}, "evalSplit": 0.01},
            "method": "qlora",
            "lora": {"r": 64, "alpha": 16, "targetModules": ["all-linear"]},
            "training": {
                "maxSteps": args.steps,
                "batchSize": args.batch,
                "gradientAccumulation": args.accumulation,
                "gradientCheckpointing": True,
                "maxSeqLength": args.seq,
                "packing": True,
                "optimizer": "paged_adamw_8bit",
                "checkpointEverySteps": 1_000_000,
                "loggingEverySteps": 5,
            },
            "resources": {"gpus": 1},
            "output": {"uri": "file:///out"},
        },
        "paths": {"baseModel": str(model), "trainData": str(data), "outputDir": str(out)},
        "device": "cuda",
        "progressIntervalSeconds": 0,
        "terminationLog": str(out / "termination-log"),
    }


def run(args: argparse.Namespace, gpus: int, model: Path, data: Path) -> dict[str, Any]:
    out = Path(args.workdir) / f"run-{gpus}gpu"
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "job.json"
    cfg_path.write_text(json.dumps(trainer_config(args, model, data, out)), encoding="utf-8")
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer-image")]),
        HF_HUB_OFFLINE="1",
        CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(gpus)),
    )
    cmd = [sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(cfg_path)]
    cmd += ["--no-eval", "--nproc-per-node", str(gpus)]
    started = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    (out / "stderr.log").write_text(proc.stderr, encoding="utf-8")
    lines = [
        json.loads(line[len(PREFIX) :])
        for line in proc.stdout.splitlines()
        if line.startswith(PREFIX)
    ]
    progress = [o for o in lines if o.get("type") == "progress"]
    if proc.returncode != 0 or not progress:
        raise SystemExit(f"{gpus}-GPU run failed (exit {proc.returncode}); see {out}/stderr.log")
    last = max(progress, key=lambda o: o["step"])
    return {
        "gpus": gpus,
        "steps": last["step"],
        "tokensPerSecond": last.get("tokensPerSecond"),
        "peakGpuMemoryGiB": last.get("gpuMemoryGiB"),
        "wallSeconds": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="Scratch folder (model, data, runs).")
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the data-parallel run.")
    parser.add_argument("--steps", type=int, default=40, help="Optimiser steps per run.")
    parser.add_argument("--layers", type=int, default=32, help="Decoder layers (32 = 8B).")
    parser.add_argument("--seq", type=int, default=2048, help="Packed sequence length.")
    parser.add_argument("--batch", type=int, default=4, help="Micro-batch per GPU.")
    parser.add_argument(
        "--accumulation",
        type=int,
        default=2,
        help="gradientAccumulation of the spec (a multiple of --gpus keeps the global batch).",
    )
    args = parser.parse_args()

    import torch

    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"needs {args.gpus} CUDA GPUs, found {torch.cuda.device_count()}")
    if args.accumulation % args.gpus:
        raise SystemExit("--accumulation must be a multiple of --gpus (same global batch)")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / "model", args.layers)
    tokens_needed = args.steps * args.batch * args.accumulation * args.seq
    data = make_data(work / "train.jsonl", rows=max(200, tokens_needed // 500 + 200))
    single = run(args, 1, model, data)
    multi = run(args, args.gpus, model, data)
    efficiency = None
    if single["tokensPerSecond"] and multi["tokensPerSecond"]:
        efficiency = multi["tokensPerSecond"] / (args.gpus * single["tokensPerSecond"])
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(0),
                "settings": {
                    "layers": args.layers,
                    "seq": args.seq,
                    "batchPerGpu": args.batch,
                    "globalBatch": args.batch * args.accumulation,
                    "steps": args.steps,
                    "method": "qlora",
                    "rank": 64,
                },
                "runs": [single, multi],
                "scalingEfficiency": round(efficiency, 3) if efficiency else None,
                "target": TARGET,
                "meetsTarget": bool(efficiency and efficiency >= TARGET),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
