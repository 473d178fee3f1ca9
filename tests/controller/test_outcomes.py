"""Every outcome a FineTuneJob plan can have becomes exactly one answer to kopf."""

from __future__ import annotations

import kopf
import pytest
from finetune_operator.api.finetunejob import FineTuneJobStatus
from finetune_operator.handlers.finetunejob import _raise_for_outcome
from finetune_operator.planners.finetunejob import Outcome, Plan
from support.ftj_planning import CONFIG

# What kopf is told for each outcome: nothing (the status says it all), never retry, or
# retry after the operator's retry interval.
KOPF_ANSWER: dict[Outcome, type[kopf.PermanentError | kopf.TemporaryError] | None] = {
    Outcome.OK: None,
    Outcome.PERMANENT: kopf.PermanentError,
    Outcome.RETRY: kopf.TemporaryError,
}


@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_outcome_maps_to_its_kopf_answer(outcome: Outcome) -> None:
    p = Plan(FineTuneJobStatus(), outcome=outcome, message="lower the batch size")
    answer = KOPF_ANSWER[outcome]
    if answer is None:
        _raise_for_outcome(p, CONFIG)
        return
    with pytest.raises(answer, match="lower the batch size") as raised:
        _raise_for_outcome(p, CONFIG)
    assert type(raised.value) is answer
    if isinstance(raised.value, kopf.TemporaryError):
        assert raised.value.delay == CONFIG.retry_seconds


def test_outcomes_keep_their_values() -> None:
    # Plans built before the enum compared equal to these strings, as they still do.
    assert [o.value for o in Outcome] == ["ok", "permanent", "retry"]
    assert Plan(FineTuneJobStatus()).outcome == "ok"
