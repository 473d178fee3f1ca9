"""The benchmark's synthetic data: deterministic, long-tailed like chat data, learnable."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from data import length_stats, make_rows, make_text_rows, sample_lengths


def test_rows_are_deterministic_by_seed() -> None:
    assert make_rows(50, seed=3) == make_rows(50, seed=3)
    assert make_rows(50, seed=3) != make_rows(50, seed=4)
    assert make_text_rows(20, seed=1) == make_text_rows(20, seed=1)


def test_lengths_are_long_tailed_with_the_chat_profile() -> None:
    stats = length_stats(sample_lengths(20000, seed=0))
    assert 330 <= stats["mean"] <= 370
    assert stats["p50"] < stats["mean"]  # right-skewed
    assert stats["max"] == 2048  # capped
    assert stats["p99"] > 4 * stats["p50"]


def test_completion_is_a_fixed_function_of_the_prompt() -> None:
    rows = make_rows(30, seed=0)
    mapping: dict[int, int] = {}
    for row in rows:
        ids, mask = row["input_ids"], row["completion_mask"]
        assert len(ids) == len(mask)
        prompt = [t for t, m in zip(ids, mask, strict=True) if m == 0]
        completion = [t for t, m in zip(ids, mask, strict=True) if m == 1][:-1]  # drop end token
        for i, token in enumerate(completion):
            source = prompt[i % len(prompt)]
            assert mapping.setdefault(source, token) == token
