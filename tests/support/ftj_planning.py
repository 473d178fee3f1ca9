"""FineTuneJob planner inputs and reads of its plans: an observation, a first plan, the next
ones (the helpers of the planner spec, tests/controller/test_planner.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from finetune_operator.api.common import Condition
from finetune_operator.api.finetunejob import FineTuneJobStatus
from finetune_operator.config import OperatorConfig
from finetune_operator.planners.finetunejob import Observed, Plan, plan

from support.ftj_samples import spec

CONFIG = OperatorConfig()
NOW = datetime(2026, 1, 1, 1, 0, 10, tzinfo=UTC)


def observe(body_spec: dict[str, Any] | None = None, **kwargs: Any) -> Observed:
    defaults: dict[str, Any] = {
        "name": "bot",
        "namespace": "ns",
        "uid": "u1",
        "generation": 1,
        "status": FineTuneJobStatus(),
        "now": NOW,
    }
    defaults.update(kwargs)
    return Observed(spec=body_spec or spec(), **defaults)


def cond(p: Plan, type_: str) -> Condition:
    found = [c for c in p.status.conditions if c.type == type_]
    assert found, f"no {type_} condition in {p.status.conditions}"
    return found[0]


def started(
    body_spec: dict[str, Any] | None = None, **kwargs: Any
) -> tuple[Plan, dict[str, Any], dict[str, Any]]:
    """Plan a fresh job and return the plan plus its Job and ConfigMap as the API would hold them."""
    first = plan(observe(body_spec, **kwargs), CONFIG)
    cm = next(a.body for a in first.actions if a.kind == "ConfigMap")
    job = next(a.body for a in first.actions if a.kind == "Job")
    assert cm is not None and job is not None
    return first, job, cm


def track(
    first: Plan,
    job: dict[str, Any],
    cm: dict[str, Any],
    body_spec: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Plan:
    kwargs.setdefault("status", first.status)
    return plan(observe(body_spec, job=job, configmap=cm, **kwargs), CONFIG)


def with_conditions(job: dict[str, Any], *types: str, reason: str = "") -> dict[str, Any]:
    conditions = [
        {
            "type": t,
            "status": "True",
            "reason": reason,
            "lastTransitionTime": "2026-01-01T01:00:00Z",
        }
        for t in types
    ]
    return {**job, "status": {"conditions": conditions}}
