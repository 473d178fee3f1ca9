"""Every condition a FineTuneJob can carry has a message, and a failing one says what to do.

The walk replays every scenario of the planner's spec (tests/controller/test_planner.py) and
checks each condition of each status planned on the way, so a new reason is covered as soon
as its scenario exists; the trainer's own failure reasons are walked one by one below."""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
import test_planner
from finetune_operator.planners.finetunejob import TRAINER_REASON_ADVICE, Plan
from support import ftj_planning
from support.ftj_planning import cond, started, track, with_conditions
from support.ftj_samples import pod, result


def planner_spec_plans(monkeypatch: pytest.MonkeyPatch) -> list[Plan]:
    plans: list[Plan] = []
    real = test_planner.plan

    def recording(*args: Any, **kwargs: Any) -> Plan:
        planned = real(*args, **kwargs)
        plans.append(planned)
        return planned

    # The scenarios plan directly and through the helpers that build their inputs.
    monkeypatch.setattr(test_planner, "plan", recording)
    monkeypatch.setattr(ftj_planning, "plan", recording)
    for name, scenario in sorted(vars(test_planner).items()):
        if name.startswith("test_") and not inspect.signature(scenario).parameters:
            scenario()
    return plans


def test_every_condition_in_the_planner_spec_has_a_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plans = planner_spec_plans(monkeypatch)
    seen: set[tuple[str, str, str]] = set()
    empty: set[tuple[str, str, str]] = set()
    for planned in plans:
        for c in planned.status.conditions:
            key = (c.type, c.status, c.reason)
            seen.add(key)
            if not c.message.strip():
                empty.add(key)
    assert len(seen) > 30, f"the walk reached too few reasons: {sorted(seen)}"
    assert not empty, f"conditions without a message: {sorted(empty)}"


def failed_by_trainer(reason: str, message: str) -> Plan:
    first, job, cm = started()
    outcome = result(ok=False, reason=reason, message=message)
    terminated = {"terminated": {"exitCode": 3, "reason": "Error", "message": json.dumps(outcome)}}
    done = with_conditions(job, "FailureTarget", "Failed", reason="PodFailurePolicy")
    return track(first, done, cm, pods=(pod("p", phase="Failed", trainer_state=terminated),))


@pytest.mark.parametrize("reason", [*sorted(TRAINER_REASON_ADVICE), "DataInvalid"])
def test_a_trainer_failure_without_detail_still_says_what_to_do(reason: str) -> None:
    planned = failed_by_trainer(reason, "")
    failed = cond(planned, "Failed")
    assert (failed.status, failed.reason) == ("True", reason)
    assert failed.message.strip(), reason
    if reason not in TRAINER_REASON_ADVICE:
        assert "kubectl logs job/bot-train-g1" in failed.message
    succeeded = cond(planned, "Succeeded")
    assert (succeeded.status, succeeded.reason) == ("False", reason)
    assert "Failed condition" in succeeded.message
