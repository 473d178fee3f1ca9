"""The unobserved-spec safety net (decisions 1207, 2040) is a daemon only while no reconcile
has observed the job's spec: an idle job (waiting or finished) holds no task of it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import kopf
from finetune_local import Emulator
from finetune_operator.handlers.daemon_stop import Daemons
from support.cluster import FAST, ftj, ftj_body, start_operator
from support.ftj_samples import spec
from support.k8s_fixtures import wait_for

# Far longer than any test: a daemon that ended did not reach the end of its sleep.
HOUR = 3600.0


def _observed(body: dict[str, Any]) -> bool:
    status = body.get("status") or {}
    return status.get("observedGeneration") == body["metadata"].get("generation")


def _wait_observed(emulator: Emulator, name: str) -> dict[str, Any]:
    def observed() -> dict[str, Any] | None:
        body = ftj(emulator, name)
        return body if _observed(body) else None

    return wait_for(observed, what="a status write that observes the spec")


def _unobserved_daemon() -> Any:
    """The daemon as kopf registered it (its filter is what kopf applies to each event)."""
    import finetune_operator.main  # noqa: F401  (registers the handlers)

    registry = kopf.get_default_registry()
    found = [h for h in registry._spawning.get_all_handlers() if h.id == "reconcile-unobserved"]
    assert len(found) == 1, [h.id for h in registry._spawning.get_all_handlers()]
    return found[0]


def test_the_daemon_of_a_job_ends_once_a_reconcile_has_observed_it(
    emulator: Emulator, operator_runner: Any
) -> None:
    """No prerequisites: the job waits, observed, with no trainer Job (so no poller either)."""
    run = start_operator(
        emulator, operator_runner, replace(FAST, unobserved_reconcile_seconds=HOUR)
    )
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    body = _wait_observed(emulator, "bot")
    assert not (body.get("status") or {}).get("trainerJob")

    daemons: Daemons = run.memo.daemons
    # It started with the job and returned when kopf stopped it: its hour-long sleep did not end.
    wait_for(lambda: (daemons.running, daemons.returned, daemons.cancelled) == (0, 1, 0),
             what=lambda: f"the daemon's end: {vars(daemons)}")  # fmt: skip


def test_no_daemon_starts_for_an_observed_job(emulator: Emulator, operator_runner: Any) -> None:
    """kopf spawns a daemon only where its filter holds: never for an observed job, also not
    when an operator starts over existing jobs; a new spec generation starts it again."""
    run = start_operator(emulator, operator_runner)
    emulator.create(ftj_body("bot", spec()), keep_status=False)
    body = _wait_observed(emulator, "bot")
    run.stop()
    when = _unobserved_daemon().when
    meta, status = body["metadata"], body.get("status")
    assert when(body=body, meta=meta, status=status, spec=body["spec"]) is False
    changed = {**meta, "generation": meta["generation"] + 1}
    assert when(body=body, meta=changed, status=status, spec=body["spec"]) is True
