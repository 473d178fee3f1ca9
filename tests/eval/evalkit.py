"""Helpers for the evaluation tests: trainer configs, JSONL files and a synthetic JSON task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune_operator.api.trainer_config import TrainerConfig


def make_config(
    base_model: Path,
    output_dir: Path,
    *,
    gates: list[dict[str, Any]] | None = None,
    evaluation: dict[str, Any] | None = None,
    method: str = "lora",
) -> TrainerConfig:
    spec = {
        "baseModel": {"uri": f"file://{base_model}"},
        "dataset": {"train": {"uri": f"file://{output_dir}/train.jsonl"}},
        "method": method,
        "output": {"uri": f"file://{output_dir}"},
        "training": {"maxSeqLength": 256, "batchSize": 4},
        "qualityGates": gates or [],
        "evaluation": {"maxNewTokens": 16, "batchSize": 4, **(evaluation or {})},
    }
    return TrainerConfig.model_validate(
        {
            "jobName": "eval-test",
            "spec": spec,
            "paths": {
                "baseModel": str(base_model),
                "trainData": str(output_dir / "train.jsonl"),
                "outputDir": str(output_dir),
            },
            "device": "cpu",
            "terminationLog": None,
        }
    )


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


# A synthetic task with a fixed JSON answer format: classify a support ticket.
_REFUND = ["I want my money back", "Please refund my order", "Return the payment to me"]
_QUESTION = ["How do I reset my password", "What are your opening hours", "Can I change plan"]
ANSWERS = (
    '{"intent": "refund", "priority": "high"}',
    '{"intent": "question", "priority": "low"}',
)
TICKET_SCHEMA = {
    "type": "object",
    "properties": {
        "intent": {"enum": ["refund", "question"]},
        "priority": {"enum": ["low", "high"]},
    },
    "required": ["intent", "priority"],
}


def ticket_messages(i: int) -> tuple[list[dict[str, str]], str]:
    """The i-th ticket as chat messages, and its reference answer."""
    kind = i % 2
    text = (_REFUND if kind == 0 else _QUESTION)[(i // 2) % 3]
    user = f"Classify ticket {i} as JSON: {text}"
    return [{"role": "user", "content": user}], ANSWERS[kind]


def ticket_eval_rows(tokenizer: Any, start: int, count: int) -> list[dict[str, Any]]:
    """Rows in the eval.jsonl contract shape (prompt is chat-templated)."""
    rows = []
    for i in range(start, start + count):
        messages, answer = ticket_messages(i)
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rows.append(
            {
                "prompt": prompt,
                "messages": messages,
                "completion": answer,
                "task": "json",
                "jsonSchema": TICKET_SCHEMA,
                "mustRefuse": False,
            }
        )
    return rows


def train_adapter_steps(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], steps: int, lr: float, batch: int = 8
) -> None:
    """A few plain optimiser steps on completion tokens (used until a test needs the real
    trainer); rows are in the eval.jsonl shape."""
    import random

    import torch

    examples = []
    for row in rows:
        full = tokenizer.apply_chat_template(
            [*row["messages"], {"role": "assistant", "content": row["completion"]}], tokenize=False
        )
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        examples.append((len(prompt_ids), full_ids))
    rng = random.Random(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        chunk = rng.sample(examples, min(batch, len(examples)))
        width = max(len(ids) for _, ids in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        labels = torch.full((len(chunk), width), -100)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (n_prompt, ids) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            attention[i, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
