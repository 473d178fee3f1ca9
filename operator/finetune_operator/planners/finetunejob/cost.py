"""What a run costs: GPU time of its trainer pods, priced from the operator's price table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ...api.finetunejob import Cost, FineTuneJobSpec
from ...builders.trainer import TRAINER_CONTAINER
from ...domain.times import parse_rfc3339
from .trainer_objects import container_status

# While a run goes on, status.cost is refreshed once this much wall time (per GPU) has
# passed since the recorded figure; it is exact once the run ends.
COST_REFRESH_SECONDS = 300.0


@dataclass(frozen=True)
class PriceTable:
    prices: Mapping[str, float]
    currency: str = "USD"
    default: float | None = None

    def price(self, product: str | None) -> float | None:
        if product and product in self.prices:
            return self.prices[product]
        return self.default

    @classmethod
    def from_configmap_data(cls, data: Mapping[str, str] | None) -> PriceTable | None:
        """``{gpuProduct: pricePerHour, currency: EUR, default: 2.0}``; bad entries skipped."""
        if not data:
            return None
        prices: dict[str, float] = {}
        default = None
        for key, raw in data.items():
            if key == "currency":
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                continue
            if key == "default":
                default = value
            else:
                prices[key] = value
        return cls(prices=prices, currency=str(data.get("currency", "USD"))[:8], default=default)


def gpu_seconds(pods: tuple[Mapping[str, Any], ...], gpus: int, now: datetime) -> float:
    """GPU time the pods held: from each pod's start to its trainer's end (or now)."""
    total = 0.0
    for pod in pods:
        start = parse_rfc3339((pod.get("status") or {}).get("startTime"))
        if start is None:
            continue
        trainer = container_status(pod, TRAINER_CONTAINER) or {}
        state = trainer.get("state") or {}
        end = parse_rfc3339((state.get("terminated") or {}).get("finishedAt"))
        if end is None:
            phase = (pod.get("status") or {}).get("phase")
            end = now if phase in ("Running", "Pending", None, "") else start
        total += max(0.0, (end - start).total_seconds())
    return total * max(1, gpus)


def updated_cost(
    recorded: Cost | None,
    pods: tuple[Mapping[str, Any], ...],
    spec: FineTuneJobSpec,
    prices: PriceTable | None,
    now: datetime,
    *,
    running: bool,
) -> Cost | None:
    """The cost to record now, or None to keep what status has.

    While the run goes on, the running cost is rewritten every few minutes, not at every
    poll: one status write per poll for a growing number helps nobody.
    """
    res = spec.resources
    has_recorded = recorded is not None and bool(recorded.model_fields_set)
    recorded_seconds = float((recorded.gpu_seconds if recorded else None) or 0.0)
    seconds = max(gpu_seconds(pods, res.gpus, now), recorded_seconds)
    refresh = COST_REFRESH_SECONDS * max(1, res.gpus * res.nodes)
    if has_recorded and running and seconds - recorded_seconds < refresh:
        return None
    if res.gpus == 0:
        return None  # a CPU-only run uses no GPU time: no cost to report
    if seconds <= 0 and not pods:
        return None
    price = prices.price(res.gpu_product) if prices else None
    if price is None or prices is None:
        return Cost(gpu_seconds=round(seconds, 1))
    return Cost(
        gpu_seconds=round(seconds, 1),
        price_per_gpu_hour=price,
        estimated_cost=round(seconds / 3600 * price, 4),
        currency=prices.currency,
    )
