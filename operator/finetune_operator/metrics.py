"""Prometheus metrics of the operator, in one registry served on /metrics.

Each controller owns a section below; add new metrics to your section so names and labels
stay consistent (prefix ``finetune_``, snake_case, base units).
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

# ---------------------------------------------------------------- FineTuneJob controller

FTJ_PHASES = ("Pending", "Queued", "Training", "Evaluating", "Succeeded", "Failed", "Suspended")

ftj_phase = Gauge(
    "finetune_jobs",
    "FineTuneJobs by phase (1 for the phase each job is in).",
    ["namespace", "name", "phase"],
    registry=REGISTRY,
)
ftj_reconcile_seconds = Histogram(
    "finetune_job_reconcile_duration_seconds",
    "Time to observe, plan and act on one FineTuneJob.",
    ["trigger"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
ftj_gate_results = Counter(
    "finetune_job_gate_results_total",
    "Quality gate verdicts of finished FineTuneJobs, by metric.",
    ["metric", "result"],
    registry=REGISTRY,
)
ftj_gpu_hours = Counter(
    "finetune_job_gpu_hours_total",
    "GPU-hours consumed by trainer pods, counted when a FineTuneJob finishes.",
    ["namespace", "gpu_product"],
    registry=REGISTRY,
)
ftj_errors = Counter(
    "finetune_job_errors_total",
    "FineTuneJob failures and reconcile errors, by reason.",
    ["reason"],
    registry=REGISTRY,
)
ftj_status_writes = Counter(
    "finetune_job_status_writes_total",
    "Status writes of FineTuneJobs, by result (written, skipped as unchanged, conflict, invalid).",
    ["result"],
    registry=REGISTRY,
)


def set_ftj_phase(namespace: str, name: str, phase: str | None) -> None:
    for candidate in FTJ_PHASES:
        ftj_phase.labels(namespace, name, candidate).set(1 if candidate == phase else 0)


def forget_ftj(namespace: str, name: str) -> None:
    for candidate in FTJ_PHASES:
        with contextlib.suppress(KeyError):
            ftj_phase.remove(namespace, name, candidate)


# ---------------------------------------------------------------- AdapterDeployment controller
# (metrics of the AdapterDeployment controller go here)


_serving_ports: set[int] = set()


def serve(port: int) -> None:
    """Serve /metrics on ``port`` (0 disables) in a background thread, once per process.

    An operator restarted inside the same process (the embedded demo, tests) keeps the
    endpoint it already has instead of failing on the bound port.
    """
    if port and port not in _serving_ports:
        start_http_server(port, registry=REGISTRY)
        _serving_ports.add(port)
