"""Quality-gate semantics: bounds, equality, base comparison, missing and non-finite values."""

from __future__ import annotations

import math
from typing import Any

import pytest
from finetune_operator.api.finetunejob import GateResult, QualityGate
from finetune_operator.domain.gates import evaluate_gate, evaluate_gates, summarize

NAN = float("nan")
INF = float("inf")

# (id, gate, metrics, base_metrics, expected passed, expected value, substrings of reason)
CASES: list[
    tuple[str, dict[str, Any], dict[str, Any], dict[str, Any] | None, bool, Any, list[str]]
] = [
    ("min above", {"metric": "rougeL", "min": 0.65}, {"rougeL": 0.7}, None, True, 0.7, []),
    (
        "min below",
        {"metric": "rougeL", "min": 0.65},
        {"rougeL": 0.41},
        None,
        False,
        0.41,
        ["rougeL 0.41 < 0.65", "short by 0.24"],
    ),
    ("min equal passes", {"metric": "rougeL", "min": 0.65}, {"rougeL": 0.65}, None, True, 0.65, []),
    (
        "max below",
        {"metric": "latencyP95Ms", "max": 500},
        {"latencyP95Ms": 420.0},
        None,
        True,
        420.0,
        [],
    ),
    (
        "max equal passes",
        {"metric": "latencyP95Ms", "max": 500},
        {"latencyP95Ms": 500},
        None,
        True,
        500,
        [],
    ),
    (
        "max above",
        {"metric": "latencyP95Ms", "max": 500},
        {"latencyP95Ms": 612.5},
        None,
        False,
        612.5,
        ["latencyP95Ms 612.5 > 500", "over by 112.5"],
    ),
    (
        "min and max, above max",
        {"metric": "exactMatch", "min": 0.1, "max": 0.9},
        {"exactMatch": 0.95},
        None,
        False,
        0.95,
        ["> 0.9"],
    ),
    (
        "missing metric",
        {"metric": "jsonValidity", "min": 0.9},
        {"rougeL": 0.5},
        None,
        False,
        None,
        ["metric jsonValidity was not measured", "task=json"],
    ),
    (
        "missing must-refuse metric",
        {"metric": "safetyRefusal", "min": 0.9},
        {},
        None,
        False,
        None,
        ["safetyRefusal was not measured", "mustRefuse"],
    ),
    (
        "nan fails",
        {"metric": "rougeL", "min": 0.0},
        {"rougeL": NAN},
        None,
        False,
        None,
        ["not a finite number"],
    ),
    (
        "inf fails",
        {"metric": "evalLoss", "max": 3.0},
        {"evalLoss": INF},
        None,
        False,
        None,
        ["not a finite number"],
    ),
    (
        "string fails",
        {"metric": "rougeL", "min": 0.1},
        {"rougeL": "0.5"},
        None,
        False,
        None,
        ["not a finite number"],
    ),
    (
        "bool fails",
        {"metric": "rougeL", "min": 0.1},
        {"rougeL": True},
        None,
        False,
        None,
        ["not a finite number"],
    ),
    # Base comparison, higher is better: improvement = value - base.
    (
        "higher-better beats base",
        {"metric": "rougeL", "minImprovementOverBase": 0.02},
        {"rougeL": 0.50},
        {"rougeL": 0.40},
        True,
        0.50,
        [],
    ),
    (
        "higher-better improvement equal passes",
        {"metric": "jsonValidity", "minImprovementOverBase": 0.25},
        {"jsonValidity": 0.75},
        {"jsonValidity": 0.5},
        True,
        0.75,
        [],
    ),
    (
        "higher-better too little",
        {"metric": "rougeL", "minImprovementOverBase": 0.05},
        {"rougeL": 0.42},
        {"rougeL": 0.40},
        False,
        0.42,
        ["vs base 0.4", "improvement 0.02 < 0.05", "short by 0.03"],
    ),
    (
        "higher-better worse than base",
        {"metric": "rougeL", "minImprovementOverBase": 0.0},
        {"rougeL": 0.30},
        {"rougeL": 0.40},
        False,
        0.30,
        ["improvement -0.1 < 0"],
    ),
    # Lower is better: improvement = base - value.
    (
        "lower-better beats base",
        {"metric": "evalLoss", "minImprovementOverBase": 0.5},
        {"evalLoss": 1.0},
        {"evalLoss": 2.0},
        True,
        1.0,
        [],
    ),
    (
        "lower-better got worse",
        {"metric": "evalLoss", "minImprovementOverBase": 0.1},
        {"evalLoss": 2.5},
        {"evalLoss": 2.0},
        False,
        2.5,
        ["improvement -0.5 < 0.1", "short by 0.6"],
    ),
    (
        "base metrics absent",
        {"metric": "rougeL", "minImprovementOverBase": 0.01},
        {"rougeL": 0.5},
        None,
        False,
        0.5,
        ["base model's metric rougeL was not measured"],
    ),
    (
        "base metric missing from base",
        {"metric": "rougeL", "minImprovementOverBase": 0.01},
        {"rougeL": 0.5},
        {"evalLoss": 2.0},
        False,
        0.5,
        ["base model's metric rougeL was not measured"],
    ),
    (
        "base metric nan",
        {"metric": "rougeL", "minImprovementOverBase": 0.01},
        {"rougeL": 0.5},
        {"rougeL": NAN},
        False,
        0.5,
        ["base model's metric rougeL is not a finite number"],
    ),
    (
        "bound passes but base comparison fails",
        {"metric": "rougeL", "min": 0.3, "minImprovementOverBase": 0.2},
        {"rougeL": 0.5},
        {"rougeL": 0.4},
        False,
        0.5,
        ["short by 0.1"],
    ),
    (
        "both parts fail, both named",
        {"metric": "rougeL", "min": 0.6, "minImprovementOverBase": 0.2},
        {"rougeL": 0.5},
        {"rougeL": 0.4},
        False,
        0.5,
        ["0.5 < 0.6", "improvement 0.1 < 0.2"],
    ),
]


@pytest.mark.parametrize(
    ("gate", "metrics", "base", "passed", "value", "reason_parts"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_gate_table(
    gate: dict[str, Any],
    metrics: dict[str, Any],
    base: dict[str, Any] | None,
    passed: bool,
    value: Any,
    reason_parts: list[str],
) -> None:
    result = evaluate_gate(gate, metrics, base)
    assert result["passed"] is passed
    assert result["metric"] == gate["metric"]
    if value is None:
        assert result["value"] is None
    else:
        assert result["value"] == pytest.approx(value)
    if passed:
        assert result["reason"] == ""
    else:
        for part in reason_parts:
            assert part in result["reason"], result["reason"]
    # The result is a valid status entry (camelCase keys, value absent when missing).
    GateResult.model_validate(result)


@pytest.mark.parametrize(
    ("gate", "text"),
    [
        ({"metric": "rougeL", "min": 0.65}, ">= 0.65"),
        ({"metric": "latencyP95Ms", "max": 500}, "<= 500"),
        ({"metric": "rougeL", "minImprovementOverBase": 0.02}, ">= base + 0.02"),
        ({"metric": "evalLoss", "minImprovementOverBase": 0.1}, "<= base - 0.1"),
        ({"metric": "exactMatch", "min": 0.1, "max": 0.9}, ">= 0.1, <= 0.9"),
    ],
)
def test_threshold_text(gate: dict[str, Any], text: str) -> None:
    assert evaluate_gate(gate, {}, None)["threshold"] == text


def test_base_value_is_reported() -> None:
    r = evaluate_gate({"metric": "evalLoss", "max": 5}, {"evalLoss": 1.5}, {"evalLoss": 2.5})
    assert r["baseValue"] == 2.5 and r["passed"]


def test_accepts_api_models_and_keeps_order() -> None:
    gates = [QualityGate(metric="rougeL", min=0.5), QualityGate(metric="evalLoss", max=2.0)]
    results = evaluate_gates(gates, {"rougeL": 0.6, "evalLoss": 3.0}, None)
    assert [r["metric"] for r in results] == ["rougeL", "evalLoss"]
    assert [r["passed"] for r in results] == [True, False]


def test_bad_gate_is_rejected() -> None:
    with pytest.raises(ValueError, match="min, max, minImprovementOverBase"):
        evaluate_gate({"metric": "rougeL"}, {"rougeL": 1.0}, None)


def test_summarize_names_each_failure_and_shortfall() -> None:
    results = evaluate_gates(
        [
            {"metric": "rougeL", "min": 0.65},
            {"metric": "jsonValidity", "min": 0.9},
            {"metric": "evalLoss", "max": 2.0},
            {"metric": "latencyP95Ms", "max": 500},
        ],
        {"rougeL": 0.41, "evalLoss": 1.2, "latencyP95Ms": 120.0},
        None,
    )
    ok, summary, message = summarize(results)
    assert ok is False
    assert summary == "2/4 passed"
    assert "2 of 4 quality gates failed" in message
    assert "rougeL 0.41 < 0.65 (short by 0.24)" in message
    assert "jsonValidity was not measured" in message
    assert "evalLoss" not in message and "latencyP95Ms" not in message


def test_summarize_all_passed_and_empty() -> None:
    results = evaluate_gates([{"metric": "rougeL", "min": 0.1}], {"rougeL": 0.2}, None)
    assert summarize(results) == (True, "1/1 passed", "all 1 quality gates passed")
    assert summarize([]) == (True, "0/0 passed", "no quality gates are set")


def test_summary_message_is_bounded() -> None:
    gates = [{"metric": "jsonValidity", "min": 0.5}] * 32
    ok, _, message = summarize(evaluate_gates(gates, {}, None))
    assert not ok and len(message) <= 2048


def test_gates_module_does_not_import_torch() -> None:
    import subprocess
    import sys
    from pathlib import Path

    operator_dir = Path(__file__).resolve().parents[2] / "operator"
    code = "import sys, finetune_operator.domain.gates; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(operator_dir), "PATH": ""},
    )
    assert out.stdout.strip() == "False"


def test_nan_threshold_never_reaches_evaluation() -> None:
    # The API refuses non-finite bounds, so a gate can never pass by comparing with NaN.
    with pytest.raises(ValueError, match="finite"):
        QualityGate(metric="rougeL", min=math.nan)
