"""The operator's metrics as Prometheus sees them: every series a panel or alert needs exists
at 0 before its first event (so ``increase()`` counts that event), every series names its
namespace, and the exposition passes ``promtool check metrics``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from finetune_local import Emulator
from finetune_operator import metrics, metrics_serving
from finetune_operator.api.metrics_catalog import METRIC_NAMES
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import promtool
from support.cluster import (
    NS,
    add_prerequisites,
    ftj_body,
    start_operator,
    start_pod,
    wait_condition,
    wait_job,
    wait_phase,
)
from support.ftj_samples import spec

TROUBLESHOOTING = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of /metrics as Prometheus stores it: (sample name, labels) -> value."""
    text = generate_latest(metrics.REGISTRY).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def test_exposition_passes_promtool_check_metrics() -> None:
    metrics.see_namespace("team-a")
    metrics.see_gpu_product("team-a", "NVIDIA-H100-80GB-HBM3")
    metrics.set_ftj_phase("team-a", "bot", "Training")
    metrics_serving.see("team-a", "support", "Canary")
    metrics_serving.set_served("team-a", "support", "sha256:" + "a" * 64, "llm")
    promtool.run("check", "metrics", stdin=generate_latest(metrics.REGISTRY))


def test_every_series_names_its_namespace() -> None:
    metrics.see_namespace("team-a")
    metrics_serving.see("team-a", "support", "Rolling")
    families = {name for name, _labels in scrape()}
    assert families
    for (name, labels), _value in scrape().items():
        if name.endswith("_created"):
            continue  # prometheus_client's creation time of the same series
        assert "namespace" in dict(labels), f"{name} has no namespace label: {labels}"


def documented_failure_reasons() -> set[str]:
    """Reasons docs/troubleshooting.md lists with Failed=True."""
    reasons: set[str] = set()
    in_failures = False
    for line in TROUBLESHOOTING.read_text().splitlines():
        if line.startswith("#"):
            in_failures = "(`Failed=True`)" in line
            continue
        row = re.match(r"\| `([A-Za-z]+)` \|(.*)", line)
        if row and (in_failures or "Failed=True" in row.group(2).split("|")[0]):
            reasons.add(row.group(1))
    return reasons


def test_every_documented_failure_reason_is_counted_from_zero() -> None:
    assert set(metrics.FTJ_FAILURE_REASONS) == documented_failure_reasons()
    metrics.see_namespace("team-b")
    samples = scrape()
    for reason in metrics.FTJ_FAILURE_REASONS + metrics.FTJ_RECONCILE_ERRORS:
        assert key("finetune_job_errors_total", namespace="team-b", reason=reason) in samples
    for metric in METRIC_NAMES:
        for result in ("pass", "fail"):
            labels = {"namespace": "team-b", "metric": metric, "result": result}
            assert samples[key("finetune_job_gate_results_total", **labels)] == 0


def test_first_failure_of_a_namespace_is_scraped_at_zero_before_it_happens(
    emulator: Emulator, operator_runner: Any
) -> None:
    """What Prometheus sees of a real operator: the job's series at 0 while it trains, then
    the failure as a step from 0 to 1 (a series born at 1 is invisible to increase())."""
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    pod = start_pod(emulator, wait_job(emulator, "bot-train-g1"))
    wait_phase(emulator, "bot", "Training")

    before = scrape()
    every_reason = metrics.FTJ_FAILURE_REASONS + metrics.FTJ_RECONCILE_ERRORS
    for reason in every_reason:
        assert key("finetune_job_errors_total", namespace=NS, reason=reason) in before, reason
    gpu = key("finetune_job_gpu_seconds_total", namespace=NS, gpu_product="NVIDIA-H100-80GB-HBM3")
    assert gpu in before  # at 0 unless an earlier job in this process counted its time
    for trigger in metrics.FTJ_TRIGGERS:
        count = key("finetune_job_reconcile_duration_seconds_count", namespace=NS, trigger=trigger)
        assert count in before, trigger

    emulator.terminate_container(NS, pod, exit_code=137, reason="OOMKilled", container="trainer")
    emulator.set_job_finished(NS, "bot-train-g1", succeeded=False)
    wait_condition(emulator, "bot", "Failed", "True", "OOMKilled")
    after = scrape()
    oom = key("finetune_job_errors_total", namespace=NS, reason="OOMKilled")
    assert after[oom] == before[oom] + 1
    assert after[gpu] > before[gpu]
