"""Model shapes used by the benchmarks: random weights built from a config, never downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Architecture numbers of public models (config only; the weights here are random).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    },
    "mistral-7b": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32768, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    },
    "llama3.2-3b": {
        "model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
        "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
    "qwen2.5-3b": {
        "model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008,
        "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
        "vocab_size": 151936, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    },
    "qwen2.5-1.5b": {
        "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "vocab_size": 151936, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "vocab_size": 151936, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    },
    # A large vocabulary (256k) with wide attention heads (head_dim 256, 16 heads on 3,072).
    "gemma-7b": {
        "model_type": "gemma", "hidden_size": 3072, "intermediate_size": 24576,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
        "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
    },
    "tiny": {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 8192, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    },
}  # fmt: skip


def make_config(name: str) -> Any:
    from transformers import AutoConfig

    spec = dict(SHAPES[name])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    return config


def build_random_model(name: str, path: str | Path, device: str = "cpu", seed: int = 0) -> Path:
    """Write a random-weight model of shape ``name`` (bf16 safetensors) plus a tokenizer.

    The tokenizer is the small byte-level BPE of ``finetune_trainer.tinymodel``: its ids are
    a subset of the model's vocabulary, which is all the trainer CLI needs.
    """
    import torch
    from finetune_trainer.tinymodel import build_tokenizer
    from transformers import AutoModelForCausalLM

    out = Path(path)
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = make_config(name)
    tokenizer = build_tokenizer()
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        # Hand the memory back: a trainer started next, in another process, plans its batch
        # from what the GPU has free.
        torch.cuda.empty_cache()
    return out
