"""Metric computations on hand-built generations (no model involved)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer.errors import TrainerError
from finetune_trainer.evaluate import (
    DEFAULT_REFUSAL_MARKERS,
    EvalRow,
    conforms,
    exact_match,
    extract_json,
    generation_metrics,
    has_json,
    is_refusal,
    load_eval_rows,
    percentile,
    rouge_l_f1,
    timing_metrics,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"intent": "refund"}', {"intent": "refund"}),
        ("  \n[1, 2, 3]\n ", [1, 2, 3]),
        ("42", 42),
        ('Sure! Here it is: {"a": 1} Hope that helps.', {"a": 1}),
        ('```json\n{"a": [1, 2]}\n```', {"a": [1, 2]}),
        ('Answer:\n```\n["x"]\n```\nDone', ["x"]),
        # The first opening bracket does not parse; the next block does.
        ('{not json} then {"ok": true}', {"ok": True}),
        ('list [1, 2] before {"a": 1}', [1, 2]),
        ('{"a": {"b": [1, {"c": null}]}} trailing', {"a": {"b": [1, {"c": None}]}}),
    ],
)
def test_extract_json_finds_value(text: str, expected: Any) -> None:
    assert extract_json(text) == expected
    assert has_json(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I think the intent is refund",
        '{"intent": "refund"',  # truncated by the token budget
        "{'intent': 'refund'}",  # Python repr, not JSON
        "[1, 2,",
        "yes",
    ],
)
def test_extract_json_rejects(text: str) -> None:
    assert not has_json(text)


SCHEMA = {
    "type": "object",
    "properties": {
        "intent": {"enum": ["refund", "question"]},
        "priority": {"enum": ["low", "high"]},
    },
    "required": ["intent", "priority"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ('{"intent": "refund", "priority": "high"}', True),
        ('Result: {"intent": "question", "priority": "low"}.', True),
        ('{"intent": "refund"}', False),  # required field missing
        ('{"intent": "other", "priority": "low"}', False),  # not in enum
        ('{"intent": "refund", "priority": "high", "x": 1}', False),
        ("no json here", False),
    ],
)
def test_schema_conformance(text: str, ok: bool) -> None:
    assert conforms(text, SCHEMA) is ok


@pytest.mark.parametrize(
    "text",
    [
        "I can't help with that.",
        "I\u2019m sorry, but I cannot provide instructions for that.",
        "I CANNOT assist with this request.",
        "As requested... no. I will not   do that.",
        "죄송하지만 그 요청은 도와드릴 수 없습니다.",
        "해당 정보는 제공할 수 없습니다.",
        "요청하신 내용은 도와드리기 어렵습니다.",
    ],
)
def test_refusals_detected_english_and_korean(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure, here is how to bake bread: mix flour and water.",
        '{"intent": "refund", "priority": "high"}',
        "네, 도와드리겠습니다. 먼저 설정 메뉴를 여세요.",
        "",
    ],
)
def test_non_refusals_not_detected(text: str) -> None:
    assert not is_refusal(text)


def test_custom_refusal_markers_replace_defaults() -> None:
    assert is_refusal("POLICY_BLOCK: request denied", ["policy_block"])
    assert not is_refusal("I can't help with that.", ["policy_block"])
    assert "i can't" in DEFAULT_REFUSAL_MARKERS


def test_exact_match_normalises_whitespace_only() -> None:
    assert exact_match("  hello   world\n", "hello world")
    assert exact_match('{"a":\n  1}', '{"a": 1}')
    assert not exact_match("Hello world", "hello world")  # case matters
    assert not exact_match("hello world.", "hello world")


def test_rouge_l_values() -> None:
    assert rouge_l_f1(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l_f1(["completely different words"], ["the cat sat"]) == 0.0
    # LCS "the cat the mat" = 4 of 6 tokens both ways: P = R = F1 = 4/6.
    assert rouge_l_f1(["the cat was on the mat"], ["the cat sat in the mat"]) == pytest.approx(
        4 / 6
    )
    # The mean over pairs.
    assert rouge_l_f1(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)


def test_rouge_l_counts_korean_tokens() -> None:
    # The stock rouge-score tokenizer drops non-ASCII text; Korean words must count.
    assert rouge_l_f1(["환불 요청 접수"], ["환불 요청 접수"]) == pytest.approx(1.0)
    assert rouge_l_f1(["환불 요청"], ["환불 요청 접수 완료"]) == pytest.approx(2 / 3)


def test_rouge_l_both_empty_is_a_match() -> None:
    assert rouge_l_f1(["..."], [""]) == 1.0


def test_percentile_linear_interpolation() -> None:
    assert percentile([10.0], 95) == 10.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(list(map(float, range(1, 101))), 95) == pytest.approx(95.05)


def test_timing_metrics_are_per_request_at_batch_one() -> None:
    # Four requests, each generated alone: 0.2 s, 0.2 s, 0.2 s and 1.0 s.
    m = timing_metrics([0.2, 0.2, 0.2, 1.0], [10, 10, 10, 50])
    assert m["latencyP50Ms"] == pytest.approx(200.0)
    # p95 position 2.85 of [200, 200, 200, 1000] -> 200 + 0.85 * 800
    assert m["latencyP95Ms"] == pytest.approx(880.0)
    # The tokens a caller gets per second of waiting: 80 tokens in 1.6 s.
    assert m["tokensPerSecond"] == pytest.approx(50.0)
    assert timing_metrics([], []) == {}


def _row(**kw: Any) -> EvalRow:
    return EvalRow(prompt="p", **kw)


def test_generation_metrics_on_hand_built_generations() -> None:
    rows = [
        _row(completion='{"intent": "refund"}', task="json", json_schema={"required": ["intent"]}),
        _row(
            completion='{"intent": "question"}', task="json", json_schema={"required": ["intent"]}
        ),
        _row(completion="Paris is the capital of France."),
        _row(completion="I can't help with that.", must_refuse=True),
        _row(completion=None, must_refuse=True),
    ]
    generations = [
        '{"intent": "refund"}',  # exact, valid, conforms
        'intent: {"answer": 1}',  # valid JSON block, not conforming
        "Paris is the capital of France.",
        "죄송하지만 도와드릴 수 없습니다.",
        "Sure, here you go.",
    ]
    m = generation_metrics(rows, generations)
    assert m["exactMatch"] == pytest.approx(2 / 4)  # row 5 has no reference
    assert m["jsonValidity"] == 1.0
    assert m["jsonSchemaConformance"] == 0.5
    assert m["safetyRefusal"] == 0.5
    assert 0.5 < m["rougeL"] < 1.0


def test_metrics_without_rows_are_omitted() -> None:
    m = generation_metrics([_row(completion="a b c")], ["a b c"])
    assert set(m) == {"rougeL", "exactMatch"}
    assert generation_metrics([_row(completion=None)], ["x"]) == {}


def test_load_eval_rows_contract_and_raw_keys(tmp_path: Path) -> None:
    path = tmp_path / "eval.jsonl"
    lines = [
        {"prompt": "p1", "completion": "c1", "task": "json", "jsonSchema": {"type": "object"}},
        {"prompt": "p2", "completion": "c2", "json_schema": {"type": "array"}, "must_refuse": True},
        {"prompt": "p3", "completion": "c3", "mustRefuse": False},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    rows = load_eval_rows(path, max_samples=2)
    assert [r.prompt for r in rows] == ["p1", "p2"]
    assert rows[0].task == "json" and rows[0].json_schema == {"type": "object"}
    assert rows[1].json_schema == {"type": "array"} and rows[1].must_refuse


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("", "has no eval rows"),
        ('{"completion": "x"}\n', "missing 'prompt'"),
        ("not json\n", ":1: not valid JSON"),
        ('{"prompt": "p", "jsonSchema": [1]}\n', "'jsonSchema' must be a JSON object"),
    ],
)
def test_load_eval_rows_errors_say_what_to_fix(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "eval.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(TrainerError, match=message):
        load_eval_rows(path, max_samples=10)


def test_loss_batches_respect_rows_and_token_budget() -> None:
    from finetune_trainer.evaluate import loss_batches

    def ex(n: int) -> tuple[list[int], list[int]]:
        return [0] * n, [0] * n

    sizes = [[len(e[0]) for e in b] for b in loss_batches([ex(3)] * 5, 2, 100)]
    assert sizes == [[3, 3], [3, 3], [3]]
    # 10 + 10 fit in 20 padded tokens; a 30-token row goes alone; then 5 + 5.
    sizes = [
        [len(e[0]) for e in b] for b in loss_batches([ex(10), ex(10), ex(30), ex(5), ex(5)], 8, 20)
    ]
    assert sizes == [[10, 10], [30], [5, 5]]
    assert list(loss_batches([], 4, 10)) == []


def test_json_task_marker_is_case_insensitive() -> None:
    assert EvalRow(prompt="p", task="JSON").is_json_task
    assert not EvalRow(prompt="p", task="summary").is_json_task
