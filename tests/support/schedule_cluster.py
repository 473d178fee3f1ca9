"""One FineTuneSchedule in the embedded API and its runs: create it, read its status and
runs, finish a run as its trainer would."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from finetune_local import Emulator
from finetune_operator.planners.finetuneschedule import run_name

from support.cluster import NS, start_pod, wait_job
from support.ftj_samples import result
from support.schedule_samples import sched_spec

# A yearly schedule whose latest time (1 January 2026, 00:00 UTC) is past and was not run yet:
# the operator starts its run at once, and the slot stays the same however long a test takes.
SLOT = datetime(2026, 1, 1, tzinfo=UTC)
RUN = run_name("weekly", SLOT)
LAST = "2025-06-01T00:00:00Z"


def schedule(
    emulator: Emulator, status: dict[str, Any] | None = None, **overrides: Any
) -> dict[str, Any]:
    spec = sched_spec(schedule="0 0 1 1 *", timeZone="UTC", **overrides)
    return emulator.create(
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneSchedule",
            "metadata": {"name": "weekly", "namespace": NS},
            "spec": spec,
            "status": {"lastScheduleTime": LAST, **(status or {})},
        },
        keep_status=True,
    )


def sched_status(emulator: Emulator) -> dict[str, Any]:
    obj = emulator.read("finetuneschedules", NS, "weekly")
    return dict((obj or {}).get("status") or {})


def runs(emulator: Emulator) -> list[str]:
    return sorted(o["metadata"]["name"] for o in emulator.read_all("finetunejobs", NS))


def finish_run(emulator: Emulator, metrics: dict[str, float] | None = None, **extra: Any) -> None:
    """Play the trainer: the run's trainer Job succeeds with a result."""
    job_name = f"{RUN}-train-g1"
    pod = start_pod(emulator, wait_job(emulator, job_name, timeout=30))
    message = json.dumps(result(metrics=metrics, **extra))
    emulator.terminate_container(NS, pod, exit_code=0, message=message, container="trainer")
    emulator.set_job_finished(NS, job_name, succeeded=True)
