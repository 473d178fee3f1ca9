"""Synthetic instruction data with the length profile of real chat fine-tuning sets.

Real instruction data is long-tailed: most rows are a few hundred tokens, a few run to the
context limit. Rows here follow a lognormal length distribution (mean about 350 tokens, capped
at 2048) and have a learnable structure, so a training loss can fall:

- token ids come from a window of the vocabulary with Zipf-like frequencies (a model first
  learns the unigram distribution: a fast, visible drop from ln(vocab));
- each completion is a fixed permutation of its prompt, repeated to the completion's length
  (a model that learns to attend back to the prompt can drive the loss further down).

Everything is deterministic by seed. Rows come pre-tokenised (``input_ids`` and
``completion_mask``, the format TRL accepts as-is) or as text (``prompt``/``completion``) for
the trainer CLI.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Lognormal with sigma 0.9: median ~250, mean ~350 before capping, p99 ~1900.
DEFAULT_SIGMA = 0.9
DEFAULT_MEAN = 362.0
DEFAULT_CAP = 2048
DEFAULT_MIN = 24


@dataclass(frozen=True)
class DataShape:
    vocab_offset: int = 1000  # clear of special tokens
    vocab_window: int = 4096
    zipf_exponent: float = 1.1
    prompt_share: float = 0.4
    mean_length: float = DEFAULT_MEAN
    sigma: float = DEFAULT_SIGMA
    cap: int = DEFAULT_CAP
    min_length: int = DEFAULT_MIN


def sample_lengths(n: int, seed: int, shape: DataShape = DataShape()) -> np.ndarray:
    """``n`` row lengths, lognormal with the requested mean, clipped to [min_length, cap]."""
    rng = np.random.default_rng(seed)
    mu = math.log(shape.mean_length) - shape.sigma**2 / 2
    raw = rng.lognormal(mu, shape.sigma, size=n)
    return np.clip(np.rint(raw), shape.min_length, shape.cap).astype(np.int64)


def _zipf_probs(shape: DataShape) -> np.ndarray:
    ranks = np.arange(1, shape.vocab_window + 1, dtype=np.float64)
    p = ranks**-shape.zipf_exponent
    return p / p.sum()


def make_rows(
    n: int, seed: int = 0, shape: DataShape = DataShape(), eos_id: int = 2
) -> list[dict[str, Any]]:
    """Pre-tokenised rows: ``{"input_ids": [...], "completion_mask": [0..0, 1..1]}``."""
    lengths = sample_lengths(n, seed, shape)
    rng = np.random.default_rng(seed + 1)
    probs = _zipf_probs(shape)
    # One fixed permutation of the window: the "task" the completion applies to the prompt.
    perm = np.random.default_rng(12345).permutation(shape.vocab_window)
    rows = []
    for length in lengths:
        total = int(length)
        prompt_len = max(4, round(total * shape.prompt_share))
        completion_len = total - prompt_len - 1  # room for the end token
        prompt = rng.choice(shape.vocab_window, size=prompt_len, p=probs)
        completion = perm[np.resize(prompt, completion_len)]
        ids = np.concatenate([prompt, completion]) + shape.vocab_offset
        input_ids = [*ids.tolist(), eos_id]
        mask = [0] * prompt_len + [1] * (completion_len + 1)
        rows.append({"input_ids": input_ids, "completion_mask": mask})
    return rows


_WORDS = [
    "the",
    "a",
    "ticket",
    "refund",
    "order",
    "account",
    "payment",
    "delivery",
    "late",
    "broken",
    "replace",
    "invoice",
    "customer",
    "please",
    "help",
    "thanks",
    "issue",
    "question",
    "answer",
    "status",
    "update",
    "cancel",
    "subscription",
    "plan",
    "price",
    "error",
    "login",
    "password",
    "reset",
    "email",
    "phone",
    "address",
    "shipping",
    "return",
    "policy",
    "warranty",
    "product",
    "service",
    "team",
    "support",
    "request",
    "urgent",
    "normal",
    "low",
    "high",
    "priority",
    "today",
    "tomorrow",
    "week",
    "month",
]


def make_text_rows(
    n: int, seed: int = 0, shape: DataShape = DataShape(), words_per_token: float = 0.235
) -> list[dict[str, str]]:
    """Text rows (prompt/completion) whose token counts follow the same lognormal profile.

    ``words_per_token`` converts the target token length into a word count; it depends on the
    tokenizer (about 0.235 for the tiny byte-level BPE of ``finetune_trainer.tinymodel``).
    """
    lengths = sample_lengths(n, seed, shape)
    rng = np.random.default_rng(seed + 1)
    perm = np.random.default_rng(12345).permutation(len(_WORDS))
    rows = []
    for length in lengths:
        words = max(4, round(int(length) * words_per_token))
        prompt_words = max(2, round(words * shape.prompt_share))
        prompt = rng.integers(0, len(_WORDS), size=prompt_words)
        completion = perm[np.resize(prompt, words - prompt_words)]
        rows.append(
            {
                "prompt": " ".join(_WORDS[i] for i in prompt),
                "completion": " ".join(_WORDS[i] for i in completion),
            }
        )
    return rows


def length_stats(lengths: list[int] | np.ndarray) -> dict[str, float]:
    arr = np.asarray(lengths)
    return {
        "rows": int(arr.size),
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "max": int(arr.max()),
        "tokens": int(arr.sum()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=["tokens", "text"], default="text")
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    args = parser.parse_args(argv)
    rows: list[Any] = (
        make_rows(args.rows, args.seed)
        if args.format == "tokens"
        else make_text_rows(args.rows, args.seed)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(json.dumps(length_stats(sample_lengths(args.rows, args.seed))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
