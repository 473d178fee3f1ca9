"""The cron expressions a FineTuneSchedule accepts and when they fire, time zones and DST included."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from finetune_operator.domain import cron


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def nxt(expr: str, after: datetime, tz: str = "UTC") -> datetime | None:
    return cron.next_after(cron.parse(expr), cron.zone(tz), after)


def prev(expr: str, at: datetime, tz: str = "UTC") -> datetime | None:
    return cron.last_at_or_before(cron.parse(expr), cron.zone(tz), at)


def test_monday_two_am_in_berlin_winter_is_one_am_utc() -> None:
    assert nxt("0 2 * * MON", utc(2026, 12, 7, 1, 30), "Europe/Berlin") == utc(2026, 12, 14, 1, 0)
    assert prev("0 2 * * MON", utc(2026, 12, 7, 1, 30), "Europe/Berlin") == utc(2026, 12, 7, 1, 0)


def test_the_same_wall_clock_time_in_summer_is_an_hour_earlier_in_utc() -> None:
    assert nxt("0 2 * * 1", utc(2026, 7, 1), "Europe/Berlin") == utc(2026, 7, 6, 0, 0)


def test_strictly_after_and_at_or_before() -> None:
    assert nxt("0 * * * *", utc(2026, 1, 1, 10, 0)) == utc(2026, 1, 1, 11, 0)
    assert prev("0 * * * *", utc(2026, 1, 1, 10, 0)) == utc(2026, 1, 1, 10, 0)


def test_a_time_skipped_by_spring_forward_runs_right_after_the_gap() -> None:
    # 29 March 2026: Berlin jumps from 02:00 CET to 03:00 CEST (01:00 UTC).
    assert nxt("30 2 * * *", utc(2026, 3, 28, 12), "Europe/Berlin") == utc(2026, 3, 29, 1, 0)
    # Several slots inside the gap run once, not once each.
    first = nxt("*/15 2 * * *", utc(2026, 3, 28, 12), "Europe/Berlin")
    assert first == utc(2026, 3, 29, 1, 0)
    assert nxt("*/15 2 * * *", first, "Europe/Berlin") == utc(2026, 3, 30, 0, 0)


def test_a_time_repeated_by_fall_back_runs_once() -> None:
    # 25 October 2026: Berlin goes from 03:00 CEST back to 02:00 CET; 02:30 happens twice.
    first = nxt("30 2 * * *", utc(2026, 10, 24, 12), "Europe/Berlin")
    assert first == utc(2026, 10, 25, 0, 30)  # 02:30 CEST
    assert nxt("30 2 * * *", first, "Europe/Berlin") == utc(2026, 10, 26, 1, 30)


def test_new_york_uses_its_own_transition_dates() -> None:
    # 8 March 2026: New York springs forward while Europe has not yet.
    assert nxt("0 9 * * *", utc(2026, 3, 7, 15), "America/New_York") == utc(2026, 3, 8, 13, 0)
    assert nxt("0 9 * * *", utc(2026, 3, 6, 15), "America/New_York") == utc(2026, 3, 7, 14, 0)


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("@daily", utc(2026, 1, 1, 5), utc(2026, 1, 2)),
        ("@weekly", utc(2026, 1, 1), utc(2026, 1, 4)),  # Sunday
        ("@monthly", utc(2026, 1, 15), utc(2026, 2, 1)),
        ("@yearly", utc(2026, 1, 15), utc(2027, 1, 1)),
        ("@hourly", utc(2026, 1, 1, 5, 1), utc(2026, 1, 1, 6)),
        ("*/20 9-10 * * *", utc(2026, 1, 1, 9, 45), utc(2026, 1, 1, 10, 0)),
        ("0 0 1-10/3 * *", utc(2026, 1, 2), utc(2026, 1, 4)),
        ("0 0 * JAN,mar *", utc(2026, 1, 31, 1), utc(2026, 3, 1)),
        ("0 0 29 2 *", utc(2026, 1, 1), utc(2028, 2, 29)),
        ("0 0 * * 7", utc(2026, 1, 1), utc(2026, 1, 4)),  # 7 is Sunday too
        ("0 0 * * FRI-SAT", utc(2026, 1, 1), utc(2026, 1, 2)),
        # Day of month and day of week both restricted: either matches (as in cron).
        ("0 0 13 * FRI", utc(2026, 2, 1), utc(2026, 2, 6)),
        ("0 0 13 * FRI", utc(2026, 2, 10), utc(2026, 2, 13)),
    ],
)
def test_fields_macros_and_names(expr: str, after: datetime, expected: datetime) -> None:
    assert nxt(expr, after) == expected


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("0 2 * *", "5 fields"),
        ("60 * * * *", "minute: 60 is out of range 0-59"),
        ("0 24 * * *", "hour: 24 is out of range"),
        ("0 0 0 * *", "day of month: 0 is out of range"),
        ("0 0 * 13 *", "month: 13 is out of range"),
        ("0 0 * * 8", "day of week: 8 is out of range"),
        ("*/0 * * * *", "step '0' must be a positive number"),
        ("5-1 * * * *", "runs backwards"),
        ("0 0 * FOO *", "is not a number or name"),
        ("1,,2 * * * *", "empty item"),
        ("@every 5m", "5 fields"),
    ],
)
def test_bad_expressions_say_what_is_wrong(expr: str, fragment: str) -> None:
    with pytest.raises(cron.CronError, match=fragment.replace("(", r"\(")):
        cron.parse(expr)


def test_an_expression_that_never_matches_is_refused() -> None:
    with pytest.raises(cron.CronError, match="never matches"):
        cron.validate("0 0 31 2 *")
    cron.validate("0 0 31 1,2 *")


def test_unknown_time_zone_is_refused() -> None:
    with pytest.raises(cron.CronError, match="IANA time zone"):
        cron.zone("Mars/Olympus")
