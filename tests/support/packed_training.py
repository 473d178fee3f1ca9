"""The settings of a few packed training steps of the tiny model on the CPU, shared by the
fast-path, offload, compiled-layer and LoRA dropout tests (each adds what it compares)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

TINY_LAYERS = 3
# Token rows of 6 to 36 tokens that pack into a few bins of the tiny tokenizer's vocabulary.
PACKED_ROWS = [[5 + (i * 7 + j) % 50 for j in range(6 + (i % 7) * 5)] for i in range(48)]


def tiny_lora_model(
    *, dropout: float = 0.0, gc: bool = False, prepare: Callable[[Any], None] | None = None
) -> Any:
    """A seeded 3-layer Llama with LoRA r=4 on every linear layer, in training mode;
    ``prepare`` changes the base model before PEFT wraps it (e.g. 4-bit projections)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    base = LlamaForCausalLM(config)
    if prepare is not None:
        prepare(base)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    model = get_peft_model(base, lora)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def quantise_projections(
    model: Any, names: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
) -> None:
    """bitsandbytes 4-bit (nf4) projections, as QLoRA loads them (the MLP's by default, or
    ``names`` of the MLP and attention); PEFT then wraps them in its 4-bit LoRA layer."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for name in names:
            owner = layer.mlp if hasattr(layer.mlp, name) else layer.self_attn
            dense = getattr(owner, name)
            quantised = bnb.nn.Linear4bit(
                dense.in_features,
                dense.out_features,
                bias=dense.bias is not None,
                compute_dtype=torch.float32,
            )
            quantised.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False)
            if dense.bias is not None:
                quantised.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
            setattr(owner, name, quantised.to("cpu"))  # quantises the weight
    model.is_loaded_in_4bit = True  # what PEFT reads to pick its 4-bit LoRA layer


def packed_batch(step: int, tokens: int = 48) -> dict[str, Any]:
    """One packed row of two sequences (position ids restart at the second), seeded by step."""
    import torch

    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 97, (1, tokens), generator=gen)
    split = tokens // 3
    positions = torch.cat([torch.arange(split), torch.arange(tokens - split)])[None]
    return {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}


def packed_cpu_args(output_dir: str | Path, **overrides: Any) -> Any:
    """TRL's SFTConfig for five packed (bfd, padding-free) steps at a constant learning rate,
    one logged loss per step, nothing saved; ``overrides`` win."""
    from trl import SFTConfig

    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": 5,
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 1,
        "max_length": 96,
        "packing": True,
        "packing_strategy": "bfd",
        "padding_free": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "lr_scheduler_type": "constant",
        "disable_tqdm": True,
    }
    return SFTConfig(**(settings | overrides))


def packed_lora_trainer(
    model: Any,
    args: Any,
    train_dataset: Any = None,
    *,
    dropout: float = 0.0,
    trainer_cls: Any = None,
) -> Any:
    """The fast path's SFT trainer (or ``trainer_cls``) with LoRA r=4 on every linear layer,
    on ``train_dataset`` (default: PACKED_ROWS) and the tiny tokenizer."""
    from datasets import Dataset
    from finetune_trainer import fastpath
    from finetune_trainer.tinymodel import build_tokenizer
    from peft import LoraConfig

    if train_dataset is None:
        train_dataset = Dataset.from_dict({"input_ids": PACKED_ROWS})
    return (trainer_cls or fastpath.trainer_class())(
        model=model,
        args=args,
        train_dataset=train_dataset,
        processing_class=build_tokenizer(),
        peft_config=LoraConfig(
            r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"
        ),
    )


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_4bit_model(*, dropout: float = 0.0, gc: bool = False) -> Any:
    """The tiny model with every projection in 4 bits, LoRA r=4 on all of them; ``lora_B``
    starts seeded and non-zero (PEFT's zeros would hide the adapter path from the loss)."""
    import torch

    model = tiny_lora_model(
        dropout=dropout, gc=gc, prepare=lambda m: quantise_projections(m, ALL_PROJECTIONS)
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model


def steps(model: Any, count: int = 3) -> tuple[list[float], dict[str, Any]]:
    """Losses of ``count`` optimiser steps and the adapter gradients of the first one."""
    import torch

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optim = torch.optim.SGD(params.values(), lr=0.05)
    losses, first_grads = [], {}
    for step in range(count):
        torch.manual_seed(step)  # both runs draw their dropout masks from the same seed
        loss = model(**packed_batch(step)).loss
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.detach().clone() for n, p in params.items()}
        optim.step()
        optim.zero_grad()
        losses.append(float(loss.detach()))
    return losses, first_grads
