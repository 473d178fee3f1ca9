"""Evaluation speed: batched greedy generation exactly as the evaluator runs it.

Builds a random-weight model of a real architecture from its config (nothing is downloaded)
directly on the device, quantises its linear layers to 4-bit nf4 as a QLoRA job loads its
base (``--quant none`` keeps bf16), attaches a fresh LoRA adapter (r=16 on every linear
layer, as after training), then runs ``finetune_trainer.evaluate.generate`` over a set of
prompts exactly as the evaluator does: the first ``--latency-requests`` one at a time
(batch 1, timed), the rest in batches of ``--batch-size``. Reports the evaluator's own
metrics (``timing_metrics``: per-request latency = time to generate one request's whole
completion alone; tokens/s = the timed requests' tokens over their time) and the wall time
of the whole generation. Prints one JSON object.

    python bench/bench_eval.py                      # llama3-8b shape, CUDA required
    python bench/bench_eval.py --batch-size 16 --max-new-tokens 256
    python bench/bench_eval.py --tiny               # CPU smoke check, seconds

A random model rarely emits its EOS token, so nearly every request generates the whole
``--max-new-tokens`` budget: the numbers are for full-length answers.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "operator"))
sys.path.insert(0, str(HERE.parent / "trainer-image"))

GIB = 1024**3

# Architecture numbers (config only; the weights are random).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    },
}

_WORDS = [
    "the",
    "customer",
    "asked",
    "about",
    "a",
    "refund",
    "for",
    "order",
    "number",
    "and",
    "wants",
    "an",
    "answer",
    "in",
    "json",
    "with",
    "fields",
    "intent",
    "priority",
    "summary",
    "please",
    "classify",
    "this",
    "ticket",
    "quickly",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--tiny", action="store_true", help="Tiny shape, runs on CPU (smoke check).")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--quant", choices=["nf4", "none"], default="nf4")
    p.add_argument("--lora-r", type=int, default=16, help="0 measures the base model alone.")
    p.add_argument("--prompts", type=int, default=64, help="Requests in the run.")
    p.add_argument("--batch-size", type=int, default=8, help="evaluation.batchSize.")
    p.add_argument("--latency-requests", type=int, default=16, help="evaluation.latencyRequests.")
    p.add_argument("--prompt-tokens", type=int, default=256, help="Approximate prompt length.")
    p.add_argument("--max-new-tokens", type=int, default=128, help="evaluation.maxNewTokens.")
    p.add_argument("--warmup-batches", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.shape = "tiny"
        if args.device == "auto":
            args.device = "cpu"
        args.prompts = min(args.prompts, 16)
        args.prompt_tokens = min(args.prompt_tokens, 64)
        args.max_new_tokens = min(args.max_new_tokens, 16)
    return args


def pick_device(requested: str, tiny: bool) -> str:
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run on a GPU machine, or pass --tiny")
    if requested == "cpu" and not tiny:
        raise SystemExit("the full-size benchmark needs CUDA; use --tiny for a CPU smoke check")
    return requested


def build_model(shape: str, device: str, seed: int, tokenizer: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        **SHAPES[shape],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    # Built in its final dtype on the device: an 8B model never exists in fp32.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def quantize_nf4(model: Any, device: str) -> int:
    """Replace every linear layer but the output head with a bitsandbytes nf4 layer (double
    quantisation), as ``load_in_4bit`` does; returns how many were replaced."""
    import bitsandbytes as bnb
    import torch

    compute = torch.bfloat16 if device == "cuda" else torch.float32
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or name == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                child.weight.data.to("cpu" if device == "cpu" else device),
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
            )
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(device))  # quantises on the move
            del child
            replaced += 1
    if device == "cuda":
        torch.cuda.empty_cache()
    return replaced


def make_rows(tokenizer: Any, count: int, prompt_tokens: int, seed: int) -> list[Any]:
    from finetune_trainer.evaluate import EvalRow

    rng = random.Random(seed)
    rows = []
    for i in range(count):
        words: list[str] = []
        # Vary lengths by +-25% so left padding is exercised as in real eval sets.
        target = max(8, int(prompt_tokens * rng.uniform(0.75, 1.25)))
        while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < target:
            words.extend(rng.choices(_WORDS, k=16))
        messages = [{"role": "user", "content": f"Request {i}: " + " ".join(words)}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rows.append(EvalRow(prompt=prompt, messages=messages))
    return rows


def environment(device: str) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for pkg in ("transformers", "peft", "bitsandbytes"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    info["gpu"] = torch.cuda.get_device_name(0) if device == "cuda" else None
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from finetune_trainer.evaluate import generate, timing_metrics
    from finetune_trainer.tinymodel import build_tokenizer

    device = pick_device(args.device, args.tiny)
    began = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(args.shape, device, args.seed, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    quantized = quantize_nf4(model, device) if args.quant == "nf4" else 0
    if args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", lora_dropout=0.0
        )
        model = get_peft_model(model, lora).eval()
    rows = make_rows(tokenizer, args.prompts, args.prompt_tokens, args.seed)
    setup_seconds = time.perf_counter() - began
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    kwargs = {
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_tokens": 8192,
        "timed_requests": args.latency_requests,
    }
    with torch.inference_mode():
        if args.warmup_batches > 0:
            warmup = {**kwargs, "timed_requests": 0}
            generate(model, tokenizer, rows[: args.batch_size * args.warmup_batches], **warmup)
        generation_began = time.perf_counter()
        result = generate(model, tokenizer, rows, **kwargs)
        generation_seconds = time.perf_counter() - generation_began
    metrics = timing_metrics(result.request_seconds, result.request_tokens)
    prompt_lengths = [len(tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) for r in rows]
    return {
        "benchmark": "eval-generation",
        "shape": args.shape,
        "parameters": params,
        "device": device,
        "quant": args.quant,
        "quantizedLinearLayers": quantized,
        "loraR": args.lora_r,
        "prompts": len(rows),
        "batchSize": args.batch_size,
        "latencyRequests": len(result.request_seconds),
        "promptTokensMean": round(sum(prompt_lengths) / len(prompt_lengths), 1),
        "maxNewTokens": args.max_new_tokens,
        "generatedTokens": result.generated_tokens,
        "batches": len(result.batch_sizes),
        "generationSeconds": round(generation_seconds, 3),
        "timedTokensMean": (
            round(sum(result.request_tokens) / len(result.request_tokens), 1)
            if result.request_tokens
            else None
        ),
        "latencyP50Ms": round(metrics["latencyP50Ms"], 1) if metrics else None,
        "latencyP95Ms": round(metrics["latencyP95Ms"], 1) if metrics else None,
        "tokensPerSecond": round(metrics.get("tokensPerSecond", 0.0), 1) if metrics else None,
        "peakGpuMemoryGiB": (
            round(torch.cuda.max_memory_allocated() / GIB, 2) if device == "cuda" else None
        ),
        "setupSeconds": round(setup_seconds, 1),
        "environment": environment(device),
    }


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run(parse_args(argv)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
