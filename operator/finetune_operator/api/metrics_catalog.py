"""The evaluation metrics a quality gate may name, and which direction is better.

One table shared by the API (gate validation), the trainer (metric names it writes) and
the gate evaluator (what "improvement over base" means for each metric).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["higher", "lower"]
# The names, in the table's order (a test checks they match METRICS).
MetricName = Literal[
    "evalLoss",
    "perplexity",
    "rougeL",
    "exactMatch",
    "jsonValidity",
    "jsonSchemaConformance",
    "safetyRefusal",
    "latencyP50Ms",
    "latencyP95Ms",
    "tokensPerSecond",
]


@dataclass(frozen=True)
class MetricInfo:
    name: MetricName
    better: Direction
    unit: str
    description: str
    # A wall-clock measurement: it depends on the machine, the GPU and what ran before it,
    # so two values compare only when measured in one run under the same conditions.
    timing: bool = False


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo(
            "evalLoss",
            "lower",
            "nats/token",
            "Mean cross-entropy on completion tokens of the eval set.",
        ),
        MetricInfo("perplexity", "lower", "", "exp(evalLoss)."),
        MetricInfo(
            "rougeL", "higher", "F1 0..1", "ROUGE-L F1 of generated vs reference completions."
        ),
        MetricInfo(
            "exactMatch",
            "higher",
            "0..1",
            "Share of generations equal to the reference after whitespace normalisation.",
        ),
        MetricInfo(
            "jsonValidity",
            "higher",
            "0..1",
            "Share of JSON-task rows whose generation parses as JSON.",
        ),
        MetricInfo(
            "jsonSchemaConformance",
            "higher",
            "0..1",
            "Share of rows with a JSON Schema whose generation conforms to it.",
        ),
        MetricInfo(
            "safetyRefusal", "higher", "0..1", "Share of must-refuse rows the model refused."
        ),
        MetricInfo(
            "latencyP50Ms",
            "lower",
            "ms",
            "Median time to generate one request's whole completion alone (batch 1).",
            timing=True,
        ),
        MetricInfo(
            "latencyP95Ms",
            "lower",
            "ms",
            "95th percentile time to generate one request's whole completion alone (batch 1).",
            timing=True,
        ),
        MetricInfo(
            "tokensPerSecond",
            "higher",
            "tokens/s",
            "Generated tokens per second of one request generated alone (batch 1).",
            timing=True,
        ),
    )
}

METRIC_NAMES: tuple[str, ...] = tuple(METRICS)
TIMING_METRICS: frozenset[str] = frozenset(m.name for m in METRICS.values() if m.timing)
