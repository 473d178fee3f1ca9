"""Prometheus metrics of the AdapterDeployment controller."""

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
    ["strategy", "outcome"],
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
    registry=REGISTRY,
)
ROLLBACKS = Counter(
    "finetune_adapter_rollbacks_total",
    "Adapter rollouts rolled back or aborted, by reason.",
    ["namespace", "adapter", "reason"],
    registry=REGISTRY,
)

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
