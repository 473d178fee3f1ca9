"""Every example's quality gates can pass: each gate names a metric the evaluator writes, the
example's own settings and data measure it, and speed thresholds hold what the evaluator
measured for the same model shape on the same GPU (bench/results, docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from finetune_operator.api.finetunejob import FineTuneJobSpec, QualityGate
from finetune_operator.api.metrics_catalog import METRIC_NAMES, METRICS, MetricName

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))

# Evaluator speed measured by bench/bench_eval.py, by (model shape, method, GPU product).
MEASURED = {
    ("llama3-8b", "qlora", "NVIDIA-H100-80GB-HBM3"): (
        ROOT / "bench" / "results" / "h100-2026-12-07" / "eval-batch1.json"
    ),
}
# Which shape an example's base model has (random weights of that shape were measured).
SHAPES = {"meta-llama/Meta-Llama-3-8B-Instruct": "llama3-8b"}
SPEED_METRICS = {"latencyP50Ms", "latencyP95Ms", "tokensPerSecond"}
# Metrics measured only on eval rows the data marks: the row key, and the words an example
# with remote data uses to tell the user.
ROW_MARKS = {
    "jsonValidity": ("task", '"task": "json"'),
    "jsonSchemaConformance": ("json_schema", "json_schema"),
    "safetyRefusal": ("must_refuse", "must_refuse"),
}
# A speed gate looser than this many times the measured value gates nothing.
MAX_SLACK = 4.0


def _jobs() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "FineTuneJob":
                found.append((path, doc))
    return found


JOBS = _jobs()
JOB_IDS = [f"{p.relative_to(ROOT)}:{d['metadata']['name']}" for p, d in JOBS]


def test_gates_accept_exactly_the_metrics_of_the_table() -> None:
    """The gate's metric type (the CRD enum) lists the evaluator's table, in its order."""
    assert get_args(MetricName) == METRIC_NAMES


def test_examples_have_gates_to_check() -> None:
    assert sum(bool(d["spec"].get("qualityGates")) for _, d in JOBS) >= 2


def _spec(doc: dict[str, Any]) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(doc["spec"])


@pytest.mark.parametrize(("path", "doc"), JOBS, ids=JOB_IDS)
def test_every_gate_names_a_metric_and_a_reachable_bound(path: Path, doc: dict[str, Any]) -> None:
    for gate in _spec(doc).quality_gates:
        info = METRICS.get(gate.metric)
        assert info is not None, f"{path}: {gate.metric} is not a metric the evaluator writes"
        if "0..1" in info.unit:
            assert gate.min is None or gate.min <= 1, f"{path}: {gate.metric} never exceeds 1"
            assert gate.max is None or gate.max >= 0, f"{path}: {gate.metric} is never below 0"
        if info.better == "lower":
            assert gate.max is None or gate.max > 0, f"{path}: {gate.metric} is never <= 0"


def _local_data(path: Path, uri: str) -> Path | None:
    """The bundled file an example's dataset URI stands for (same file name next to it)."""
    candidate = path.parent / Path(uri).name
    return candidate if candidate.is_file() else None


@pytest.mark.parametrize(("path", "doc"), JOBS, ids=JOB_IDS)
def test_row_marked_metrics_have_marked_rows(path: Path, doc: dict[str, Any]) -> None:
    spec = _spec(doc)
    for gate in spec.quality_gates:
        if gate.metric not in ROW_MARKS:
            continue
        mark, hint = ROW_MARKS[gate.metric]
        data = _local_data(path, spec.dataset.train.uri)
        if data is not None:
            rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
            marked = sum(bool(r.get(mark)) for r in rows)
            # The eval split is a random share: most rows must carry the mark to be sure.
            assert marked >= len(rows) / 2, f"{data}: {marked} rows marked {mark}"
        else:
            # Remote data: the example must tell the user which rows to mark.
            assert hint in path.read_text(), f"{path}: say that {gate.metric} needs {hint} rows"


def _speed_reference(path: Path, spec: FineTuneJobSpec) -> dict[str, Any]:
    repo = spec.base_model.uri.removeprefix("hf://").split("@")[0]
    key = (SHAPES.get(repo, repo), spec.method, spec.resources.gpu_product)
    measured = MEASURED.get(key)  # type: ignore[arg-type]
    assert measured is not None, (
        f"{path}: no evaluator speed was measured for {key}; run bench/bench_eval.py for it "
        "and add the result to MEASURED before gating on speed"
    )
    result: dict[str, Any] = json.loads(measured.read_text())
    return result


def _speed_gates(spec: FineTuneJobSpec) -> list[QualityGate]:
    return [g for g in spec.quality_gates if g.metric in SPEED_METRICS]


def batch_one_bounds(ref: dict[str, Any]) -> dict[str, float]:
    """What the evaluator's per-request numbers (batch 1) are at worst, from a benchmark.

    A batch-1 measurement (``latencyRequests`` > 0) is taken as it is. A run that timed
    batches bounds them: one request alone finishes no later than the batch it would share
    (every decoding step of a batch does at least the work of a step of one request), and
    gets at least its share of the batch's tokens per second."""
    if ref.get("latencyRequests"):
        return {m: float(ref[m]) for m in SPEED_METRICS}
    share = float(ref["tokensPerSecond"]) / int(ref["batchSize"])
    return {
        "latencyP50Ms": float(ref["latencyP50Ms"]),
        "latencyP95Ms": float(ref["latencyP95Ms"]),
        "tokensPerSecond": share,
    }


def test_batched_benchmark_bounds_one_request() -> None:
    batched = {"latencyP50Ms": 900.0, "latencyP95Ms": 1000.0, "tokensPerSecond": 80.0}
    bounds = batch_one_bounds({**batched, "batchSize": 8})
    assert bounds == {"latencyP50Ms": 900.0, "latencyP95Ms": 1000.0, "tokensPerSecond": 10.0}
    alone = {**batched, "batchSize": 8, "latencyRequests": 16}
    assert batch_one_bounds(alone)["tokensPerSecond"] == 80.0


@pytest.mark.parametrize(("path", "doc"), JOBS, ids=JOB_IDS)
def test_speed_gates_hold_what_the_evaluator_measured(path: Path, doc: dict[str, Any]) -> None:
    spec = _spec(doc)
    gates = _speed_gates(spec)
    if not gates:
        return
    assert spec.evaluation.latency_requests > 0, f"{path}: latencyRequests 0 times nothing"
    ref = _speed_reference(path, spec)
    assert ref["quant"] == "nf4" and ref["loraR"] > 0  # a 4-bit base with an unmerged adapter
    bounds = batch_one_bounds(ref)
    # Random weights never stop early: the reference is for full-length answers, the worst
    # case; scale it to the example's answer budget.
    scale = spec.evaluation.max_new_tokens / ref["maxNewTokens"]
    for gate in gates:
        if gate.metric == "tokensPerSecond":
            measured = bounds["tokensPerSecond"]
            assert gate.min is not None and gate.max is None
            assert gate.min <= measured, f"{path}: {gate.min} tokens/s > measured {measured}"
            assert gate.min * MAX_SLACK >= measured, f"{path}: {gate.min} tokens/s gates nothing"
        else:
            predicted = bounds[gate.metric] * scale
            assert gate.max is not None and gate.min is None
            assert gate.max >= predicted, f"{path}: {gate.metric} {gate.max} < {predicted:.0f}"
            assert gate.max <= predicted * MAX_SLACK, f"{path}: {gate.max} ms gates nothing"
