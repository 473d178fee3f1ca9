"""The schedule controller's metrics exist at 0 before their first event, per namespace, and
pass promtool's checks."""

from __future__ import annotations

from finetune_operator import metrics
from prometheus_client import generate_latest
from support import promtool


def value(metric: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(metric, labels)


def test_every_run_and_decision_series_starts_at_zero() -> None:
    assert value("finetune_schedule_runs_total", namespace="team-z", trigger="Schedule",
                 outcome="Failed") is None  # fmt: skip
    metrics.see_schedule_namespace("team-z")
    for trigger in ("Schedule", "DataChange"):
        for outcome in ("Succeeded", "Failed"):
            labels = {"namespace": "team-z", "trigger": trigger, "outcome": outcome}
            assert value("finetune_schedule_runs_total", **labels) == 0.0
    for decision in ("Promoted", "Kept", "NotEligible"):
        assert value("finetune_schedule_promotion_decisions_total", namespace="team-z",
                     decision=decision) == 0.0  # fmt: skip


def test_exposition_passes_promtool_check_metrics() -> None:
    metrics.see_schedule_namespace("team-z")
    metrics.fts_last_success.labels("team-z", "weekly").set(1_765_000_000)
    promtool.run("check", "metrics", stdin=generate_latest(metrics.REGISTRY))
    metrics.forget_schedule("team-z", "weekly")
    assert value("finetune_schedule_last_success_timestamp_seconds", namespace="team-z",
                 name="weekly") is None  # fmt: skip
