"""Quality gates: decide from measured metrics whether an adapter may be released.

Pure functions, no I/O and no torch: the operator calls them when the trainer's result
arrives, the trainer calls them so that local runs print the same verdict.

Semantics (also in docs/evaluation.md):

- ``min``: passes when ``value >= min`` (a value equal to the threshold passes).
- ``max``: passes when ``value <= max`` (a value equal to the threshold passes).
- ``minImprovementOverBase``: improvement is ``value - base`` for metrics where higher is
  better and ``base - value`` where lower is better; passes when
  ``improvement >= threshold`` (equality passes).
- A gate with several of these passes only when every part passes.
- A metric that was not measured, or is NaN/infinite, fails the gate with a reason; so does
  an improvement gate whose base value is missing or not finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from finetune_operator.api.finetunejob import QualityGate
from finetune_operator.api.metrics_catalog import METRICS

# Why a metric is usually missing: shown in the failure reason so users know what to add.
_WHY_MISSING: dict[str, str] = {
    "evalLoss": "no eval rows with a reference completion",
    "perplexity": "no eval rows with a reference completion, or the loss overflowed",
    "rougeL": "no eval rows with a reference completion were generated",
    "exactMatch": "no eval rows with a reference completion were generated",
    "jsonValidity": "no eval rows marked task=json",
    "jsonSchemaConformance": "no eval rows carrying a jsonSchema",
    "safetyRefusal": "no eval rows marked mustRefuse",
    "latencyP50Ms": "evaluation.latencyRequests is 0, so no request was timed",
    "latencyP95Ms": "evaluation.latencyRequests is 0, so no request was timed",
    "tokensPerSecond": "evaluation.latencyRequests is 0, so no request was timed",
}

GateResultDict = dict[str, Any]

# Condition messages hold 4096 characters; leave room for the operator's own wording.
MAX_MESSAGE_CHARS = 2048


def fmt_number(x: float) -> str:
    """A short, stable rendering of a metric value or threshold (6 significant digits)."""
    return f"{x:.6g}"


def _as_gate(gate: QualityGate | Mapping[str, Any]) -> QualityGate:
    if isinstance(gate, QualityGate):
        return gate
    return QualityGate.model_validate(dict(gate))


def _finite(value: object) -> float | None:
    """The value as a float when it is a finite number, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def threshold_text(gate: QualityGate) -> str:
    """The gate as one string, e.g. '>= 0.65', '<= 500' or '>= base + 0.02'."""
    parts: list[str] = []
    if gate.min is not None:
        parts.append(f">= {fmt_number(gate.min)}")
    if gate.max is not None:
        parts.append(f"<= {fmt_number(gate.max)}")
    if gate.min_improvement_over_base is not None:
        t = fmt_number(gate.min_improvement_over_base)
        if METRICS[gate.metric].better == "higher":
            parts.append(f">= base + {t}")
        else:
            parts.append(f"<= base - {t}")
    return ", ".join(parts)


def _missing_reason(metric: str, raw: object, *, base: bool) -> str:
    who = "base model's " if base else ""
    if raw is None:
        why = _WHY_MISSING.get(metric, "it could not be computed")
        if base:
            return (
                f"{who}metric {metric} was not measured (the base model was not evaluated "
                f"or {why}); an improvement gate needs it"
            )
        return f"metric {metric} was not measured (why: e.g. {why})"
    return f"{who}metric {metric} is not a finite number ({raw!r})"


def _bound_failures(gate: QualityGate, value: float) -> list[str]:
    failures: list[str] = []
    m = gate.metric
    if gate.min is not None and not value >= gate.min:
        failures.append(
            f"{m} {fmt_number(value)} < {fmt_number(gate.min)} "
            f"(short by {fmt_number(gate.min - value)})"
        )
    if gate.max is not None and not value <= gate.max:
        failures.append(
            f"{m} {fmt_number(value)} > {fmt_number(gate.max)} "
            f"(over by {fmt_number(value - gate.max)})"
        )
    return failures


def improvement(metric: str, value: float, base: float) -> float:
    """How much better ``value`` is than ``base`` in the metric's better direction."""
    return value - base if METRICS[metric].better == "higher" else base - value


def evaluate_gate(
    gate: QualityGate | Mapping[str, Any],
    metrics: Mapping[str, Any],
    base_metrics: Mapping[str, Any] | None,
) -> GateResultDict:
    """Evaluate one gate; the result uses the status field names (camelCase)."""
    g = _as_gate(gate)
    raw = metrics.get(g.metric)
    value = _finite(raw)
    base_raw = base_metrics.get(g.metric) if base_metrics is not None else None
    base_value = _finite(base_raw)
    failures: list[str] = []

    if value is None:
        failures.append(_missing_reason(g.metric, raw, base=False))
    else:
        failures.extend(_bound_failures(g, value))

    if g.min_improvement_over_base is not None:
        if base_value is None:
            failures.append(_missing_reason(g.metric, base_raw, base=True))
        elif value is not None:
            gained = improvement(g.metric, value, base_value)
            needed = g.min_improvement_over_base
            if not gained >= needed:
                failures.append(
                    f"{g.metric} {fmt_number(value)} vs base {fmt_number(base_value)}: "
                    f"improvement {fmt_number(gained)} < {fmt_number(needed)} "
                    f"(short by {fmt_number(needed - gained)})"
                )

    return {
        "metric": g.metric,
        "threshold": threshold_text(g),
        "value": value,
        "baseValue": base_value,
        "passed": not failures,
        "reason": "; ".join(failures),
    }


def evaluate_gates(
    gates: Sequence[QualityGate | Mapping[str, Any]],
    metrics: Mapping[str, Any],
    base_metrics: Mapping[str, Any] | None,
) -> list[GateResultDict]:
    """Evaluate every gate, in order. Each result: metric, threshold, value, baseValue,
    passed, reason (empty when passed)."""
    return [evaluate_gate(g, metrics, base_metrics) for g in gates]


def summarize(results: Sequence[Mapping[str, Any]]) -> tuple[bool, str, str]:
    """(all passed, '3/4 passed', a message naming each failed gate and by how much)."""
    total = len(results)
    passed = sum(1 for r in results if r.get("passed"))
    summary = f"{passed}/{total} passed"
    if total == 0:
        return True, summary, "no quality gates are set"
    failed = [r for r in results if not r.get("passed")]
    if not failed:
        return True, summary, f"all {total} quality gates passed"
    details = "; ".join(str(r.get("reason") or f"{r.get('metric')} failed") for r in failed)
    message = f"{len(failed)} of {total} quality gates failed: {details}"
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "\u2026"
    return False, summary, message
