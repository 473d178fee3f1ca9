"""GPUs held by each namespace's unfinished FineTuneJob runs, for the platform policy's
``maxGpusPerNamespace``, without a request of its own (decision 1640).

A kopf index, fed by the FineTuneJob watch the operator has anyway, maps each namespace to
the jobs whose run has started and not finished (``status.trainerJob`` set, no verdict) and
the GPUs they use. kopf fills every index from its initial listing before any handler runs,
so a restarted operator counts the runs that exist before it starts new ones.

The index learns of a run only when the status naming its trainer Job comes back through
the watch. Runs started by this process since are held in a short-lived reservation, taken
in the same step of the event loop as the policy check that let them start, so jobs applied
together (``kubectl apply -f dir/``) cannot all pass a check that counted none of the others.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import kopf

from ..api.common import GROUP, VERSION
from ..api.finetunejob import PLURAL, parse_status
from ..planners.finetunejob import is_terminal
from ..policy import NamespaceUsage

# A reservation stands in for a run until the index has it; the status write that records
# the run takes milliseconds, this bound only matters when it never comes (a failed write).
RESERVATION_SECONDS = 120.0


def spec_gpus(spec: Mapping[str, Any] | None) -> int:
    """GPUs a run of this spec holds (GPUs per node times nodes); 0 for what is not a count."""
    resources = (spec or {}).get("resources") or {}
    gpus, nodes = resources.get("gpus", 1), resources.get("nodes", 1)
    if not isinstance(gpus, int) or not isinstance(nodes, int) or isinstance(gpus, bool):
        return 0
    return max(0, gpus) * max(1, nodes)


def _holds_gpus(spec: Mapping[str, Any], status: Mapping[str, Any], **_: Any) -> bool:
    parsed = parse_status(status)
    return bool(parsed.trainer_job) and not is_terminal(parsed) and spec_gpus(spec) > 0


@kopf.index(GROUP, VERSION, PLURAL, when=_holds_gpus)
def ftj_gpus_in_use(
    name: str, namespace: str | None, spec: Mapping[str, Any], **_: Any
) -> dict[str, tuple[str, int]]:
    """namespace -> (job name, GPUs) for every unfinished run that uses GPUs."""
    return {str(namespace): (name, spec_gpus(spec))}


class GpuLedger:
    """What a namespace's other runs hold: the index plus this process's fresh reservations."""

    def __init__(self) -> None:
        # kopf's live index (ftj_gpus_in_use), handed over at startup
        self.index: kopf.Index[str, tuple[str, int]] | None = None
        # namespace -> job name -> (GPUs, monotonic time reserved)
        self.reservations: dict[str, dict[str, tuple[int, float]]] = {}

    def usage(self, namespace: str, name: str) -> NamespaceUsage:
        """GPUs held in ``namespace`` by jobs other than ``name``."""
        held: dict[str, int] = {}
        if self.index is not None:
            for job, gpus in self.index.get(namespace, ()):
                held[job] = gpus
        reserved = self.reservations.get(namespace, {})
        now = time.monotonic()
        for job, (gpus, since) in list(reserved.items()):
            if job in held or now - since > RESERVATION_SECONDS:
                del reserved[job]  # the index has it now, or it never came
            else:
                held[job] = gpus
        if not reserved:
            self.reservations.pop(namespace, None)
        held.pop(name, None)
        return NamespaceUsage(held)

    def reserve(self, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
        gpus = spec_gpus(spec)
        if gpus > 0:
            self.reservations.setdefault(namespace, {})[name] = (gpus, time.monotonic())

    def release(self, namespace: str, name: str) -> None:
        self.reservations.get(namespace, {}).pop(name, None)
