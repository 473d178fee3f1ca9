"""Prometheus metrics of the AdapterDeployment controller.

Series are created at 0 when the controller first sees an AdapterDeployment (``see``), so the
first rollout, rollback or abort shows in ``increase()`` (decision 1700).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .metrics import REGISTRY

ADAPTER_INFO = Gauge(
    "finetune_adapter_info",
    "Adapter version served: 1 for the digest each AdapterDeployment currently serves.",
    ["namespace", "adapter", "digest", "target"],
    registry=REGISTRY,
)
ROLLOUT_DURATION = Histogram(
    "finetune_adapter_rollout_duration_seconds",
    "Time from the start of an adapter rollout to its end, by strategy and outcome.",
    ["namespace", "strategy", "outcome"],
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
    registry=REGISTRY,
)
ROLLBACKS = Counter(
    "finetune_adapter_rollbacks_total",
    "Adapter rollouts rolled back or aborted, by reason.",
    ["namespace", "adapter", "reason"],
    registry=REGISTRY,
)

# Outcomes of a rollout, per strategy (only a canary is aborted).
ROLLOUT_OUTCOMES: dict[str, tuple[str, ...]] = {
    "Rolling": ("Available", "Failed", "RolledBack"),
    "Runtime": ("Available", "Failed", "RolledBack"),
    "Canary": ("Available", "Failed", "RolledBack", "Aborted"),
}
# Reasons a rollout is rolled back or a canary aborted (docs/troubleshooting.md).
ROLLBACK_REASONS = (
    "CanaryErrorRate",
    "CanaryLatency",
    "CanarySlowGeneration",
    "CanarySmokeFailed",
    "CanaryUnavailable",
    "ProgressDeadlineExceeded",
    "RolloutDeadlineExceeded",
)

_seen: set[tuple[str, str, str]] = set()


def see(namespace: str, adapter: str, strategy: str) -> None:
    """Create the rollout and rollback series of one AdapterDeployment at 0, once."""
    key = (namespace, adapter, strategy)
    if key in _seen:
        return
    _seen.add(key)
    for outcome in ROLLOUT_OUTCOMES.get(strategy, ()):
        ROLLOUT_DURATION.labels(namespace, strategy, outcome)
    for reason in ROLLBACK_REASONS:
        ROLLBACKS.labels(namespace, adapter, reason)


_served: dict[tuple[str, str], tuple[str, str]] = {}


def set_served(namespace: str, adapter: str, digest: str | None, target: str) -> None:
    """Point the info gauge at the digest now served (drop the old label set)."""
    key = (namespace, adapter)
    old = _served.pop(key, None)
    if old is not None and old != (digest, target):
        ADAPTER_INFO.remove(namespace, adapter, old[0], old[1])
    if digest:
        ADAPTER_INFO.labels(namespace, adapter, digest, target).set(1)
        _served[key] = (digest, target)
