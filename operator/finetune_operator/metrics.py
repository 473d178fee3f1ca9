"""Prometheus metrics of the operator, in one registry served on /metrics.

Each controller owns a section below; add new metrics to your section so names and labels
stay consistent (prefix ``finetune_``, snake_case, base units, a ``namespace`` label wherever
the event belongs to one tenant).

Labelled series are created at 0 for every known label value as soon as the operator sees a
namespace (``see_namespace``): a series born at its first increment already reads 1, and
``increase()``/``rate()`` cannot count that first event (decision 1700).
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .api.finetunejob import FAILURE_REASONS, Phase, Reason
from .api.metrics_catalog import METRIC_NAMES
from .domain.times import parse_rfc3339

REGISTRY = CollectorRegistry(auto_describe=True)

# ---------------------------------------------------------------- FineTuneJob controller

FTJ_PHASES = tuple(phase.value for phase in Phase)
# What starts a reconcile: kopf's causes, the progress poll, the unobserved-spec timer and
# events of the trainer Job and its pods.
FTJ_TRIGGERS = ("resume", "create", "update", "poll", "unobserved", "job-event", "pod-event")
# Reasons of Failed=True (docs/troubleshooting.md lists each; a test keeps both in step).
FTJ_FAILURE_REASONS = tuple(reason.value for reason in Reason if reason in FAILURE_REASONS)
# Reconcile errors counted next to the failures: the API refused the trainer Job, status
# writes kept conflicting, or the API answered an error (Api<status>; the usual ones here).
FTJ_RECONCILE_ERRORS = (
    "JobRejected",
    "StatusConflict",
    "Api403",
    "Api404",
    "Api409",
    "Api422",
    "Api429",
    "Api500",
    "Api503",
)
FTJ_STATUS_WRITE_RESULTS = ("written", "skipped", "conflict")
GATE_RESULTS = ("pass", "fail")

ftj_phase = Gauge(
    "finetune_jobs",
    "FineTuneJobs by phase (1 for the phase each job is in).",
    ["namespace", "name", "phase"],
    registry=REGISTRY,
)
ftj_reconcile_seconds = Histogram(
    "finetune_job_reconcile_duration_seconds",
    "Time to observe, plan and act on one FineTuneJob.",
    ["namespace", "trigger"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
ftj_gate_results = Counter(
    "finetune_job_gate_results_total",
    "Quality gate verdicts of finished FineTuneJobs, by metric.",
    ["namespace", "metric", "result"],
    registry=REGISTRY,
)
# Base unit seconds (finetune_job_gpu_hours_total before; docs/install.md, upgrade notes).
ftj_gpu_seconds = Counter(
    "finetune_job_gpu_seconds_total",
    "GPU-seconds consumed by trainer pods, counted when a FineTuneJob finishes.",
    ["namespace", "gpu_product"],
    registry=REGISTRY,
)
ftj_errors = Counter(
    "finetune_job_errors_total",
    "FineTuneJob failures and reconcile errors, by reason.",
    ["namespace", "reason"],
    registry=REGISTRY,
)
ftj_status_writes = Counter(
    "finetune_job_status_writes_total",
    "Status writes of FineTuneJobs, by result (written, skipped as unchanged, conflict, invalid).",
    ["namespace", "result"],
    registry=REGISTRY,
)

ftj_last_success = Gauge(
    "finetune_job_last_success_timestamp_seconds",
    "Completion time (Unix seconds) of the newest succeeded FineTuneJob, from its status.",
    ["namespace"],
    registry=REGISTRY,
)
_last_success: dict[str, float] = {}


def record_success(namespace: str, completed_at: str | None) -> None:
    """Keep the newest completion time of a succeeded job; read from status on every
    reconcile, so a restarted operator restores it when it resumes the jobs."""
    if not completed_at:
        return
    completed = parse_rfc3339(completed_at)
    if completed is None:
        return
    when = completed.timestamp()
    if when > _last_success.get(namespace, float("-inf")):
        _last_success[namespace] = when
        ftj_last_success.labels(namespace).set(when)


_seen_namespaces: set[str] = set()


def see_namespace(namespace: str) -> None:
    """Create every known labelled series of ``namespace`` at 0, once per process."""
    if namespace in _seen_namespaces:
        return
    _seen_namespaces.add(namespace)
    for trigger in FTJ_TRIGGERS:
        ftj_reconcile_seconds.labels(namespace, trigger)
    for metric in METRIC_NAMES:
        for result in GATE_RESULTS:
            ftj_gate_results.labels(namespace, metric, result)
    for reason in FTJ_FAILURE_REASONS + FTJ_RECONCILE_ERRORS:
        ftj_errors.labels(namespace, reason)
    for result in FTJ_STATUS_WRITE_RESULTS:
        ftj_status_writes.labels(namespace, result)


def see_gpu_product(namespace: str, gpu_product: str) -> None:
    """Create a job's GPU-seconds series at 0 while it runs, before its usage is counted."""
    ftj_gpu_seconds.labels(namespace, gpu_product)


def set_ftj_phase(namespace: str, name: str, phase: str | None) -> None:
    for candidate in FTJ_PHASES:
        ftj_phase.labels(namespace, name, candidate).set(1 if candidate == phase else 0)


def forget_ftj(namespace: str, name: str) -> None:
    for candidate in FTJ_PHASES:
        with contextlib.suppress(KeyError):
            ftj_phase.remove(namespace, name, candidate)


# ---------------------------------------------------------------- FineTuneSchedule controller

FTS_TRIGGERS = ("Schedule", "DataChange")
FTS_OUTCOMES = ("Succeeded", "Failed")
FTS_DECISIONS = ("Promoted", "Kept", "NotEligible")

fts_runs = Counter(
    "finetune_schedule_runs_total",
    "Finished runs (FineTuneJobs) of FineTuneSchedules, by trigger and outcome.",
    ["namespace", "trigger", "outcome"],
    registry=REGISTRY,
)
fts_promotions = Counter(
    "finetune_schedule_promotion_decisions_total",
    "Promotion decisions about finished runs: Promoted (new champion), Kept (the champion "
    "stays) or NotEligible (the run failed).",
    ["namespace", "decision"],
    registry=REGISTRY,
)
fts_last_success = Gauge(
    "finetune_schedule_last_success_timestamp_seconds",
    "Completion time (Unix seconds) of a schedule's newest successful run, from its status "
    "(time() minus it: seconds since the last fresh adapter).",
    ["namespace", "name"],
    registry=REGISTRY,
)
_fts_seen_namespaces: set[str] = set()


def see_schedule_namespace(namespace: str) -> None:
    """Create the FineTuneSchedule series of ``namespace`` at 0, once per process."""
    if namespace in _fts_seen_namespaces:
        return
    _fts_seen_namespaces.add(namespace)
    for trigger in FTS_TRIGGERS:
        for outcome in FTS_OUTCOMES:
            fts_runs.labels(namespace, trigger, outcome)
    for decision in FTS_DECISIONS:
        fts_promotions.labels(namespace, decision)


def forget_schedule(namespace: str, name: str) -> None:
    with contextlib.suppress(KeyError):
        fts_last_success.remove(namespace, name)


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
