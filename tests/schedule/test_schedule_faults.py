"""API errors on every write of a schedule's cycle and cut watch streams: the schedule ends
with exactly one run for its slot, promoted, as without them."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_local import Emulator
from support.cluster import add_prerequisites, start_operator
from support.k8s_fixtures import wait_for
from support.schedule_cluster import RUN, finish_run, runs, sched_status, schedule

# (plural, subresource, verbs): the writes of a schedule's cycle.
WRITES = {
    "status": ("finetuneschedules", "status", ("patch",)),
    "run-create": ("finetunejobs", None, ("create",)),
    "event": ("events", None, ("create",)),
}


@pytest.mark.parametrize("code", [409, 429, 500])
@pytest.mark.parametrize("write", sorted(WRITES))
def test_write_errors_converge_to_one_promoted_run(
    emulator: Emulator, operator_runner: Any, write: str, code: int
) -> None:
    plural, sub, verbs = WRITES[write]
    if code == 409 and write == "run-create":
        pytest.skip("a 409 on create means AlreadyExists: the run is then found by name")
    add_prerequisites(emulator)
    fault = emulator.inject_fault(plural, code, count=2, subresource=sub, verbs=verbs,
                                  retry_after_seconds=1)  # fmt: skip
    schedule(emulator)
    start_operator(emulator, operator_runner)
    wait_for(lambda: runs(emulator) == [RUN], timeout=30, what="the run")
    finish_run(emulator)
    st = wait_for(
        lambda: sched_status(emulator) if sched_status(emulator).get("champion") else None,
        timeout=30,
        what="champion",
    )
    assert fault.served >= 1, "the fault was never met"
    assert st["champion"]["job"] == RUN and runs(emulator) == [RUN]
    assert [r["name"] for r in st["runs"]] == [RUN]


def test_cut_watches_converge(emulator: Emulator, operator_runner: Any) -> None:
    add_prerequisites(emulator)
    start_operator(emulator, operator_runner)
    emulator.cut_watches()
    schedule(emulator)
    wait_for(lambda: runs(emulator) == [RUN], timeout=30, what="the run")
    emulator.cut_watches()
    finish_run(emulator)
    wait_for(lambda: (sched_status(emulator).get("champion") or {}).get("job") == RUN,
             timeout=30, what="champion")  # fmt: skip
    assert runs(emulator) == [RUN]
