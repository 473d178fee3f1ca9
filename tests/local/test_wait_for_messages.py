"""The test harness's `wait_for`: a timeout says what was awaited, as it was at the timeout."""

from __future__ import annotations

import pytest
from support.k8s_fixtures import wait_for


def test_a_callable_description_is_read_at_the_timeout_not_before_the_wait() -> None:
    polls: list[int] = []

    def never() -> bool:
        polls.append(1)
        return False

    with pytest.raises(AssertionError) as raised:
        wait_for(never, 0.05, what=lambda: f"polled {len(polls)} times")
    assert len(polls) > 1
    assert f"waiting for 'polled {len(polls)} times'; last value: False" in str(raised.value)


def test_a_text_description_and_none_at_all() -> None:
    with pytest.raises(AssertionError, match="waiting for 'the thing'; last value: 0"):
        wait_for(lambda: 0, 0.01, what="the thing")
    with pytest.raises(AssertionError, match="waiting for <function"):
        wait_for(lambda: None, 0.01)
