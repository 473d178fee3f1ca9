"""RFC 3339 times: the one formatter and parser of the operator and the trainer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from finetune_operator.domain.times import format_rfc3339, now_rfc3339, parse_rfc3339

EARLY = datetime(2026, 12, 7, 5, 0, 9, tzinfo=UTC)


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (EARLY, "2026-12-07T05:00:09Z"),
        (EARLY.replace(microsecond=999_999), "2026-12-07T05:00:09Z"),  # whole seconds
        (EARLY.astimezone(timezone(timedelta(hours=2))), "2026-12-07T05:00:09Z"),  # as UTC
    ],
)
def test_format_writes_kubernetes_stamps(moment: datetime, text: str) -> None:
    assert format_rfc3339(moment) == text


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2026-12-07T05:00:09Z", EARLY),
        ("2026-12-07T07:00:09+02:00", EARLY),
        ("2026-12-07T05:00:09.250000Z", EARLY.replace(microsecond=250_000)),
        ("2026-12-07T05:00:09", EARLY),  # no offset: UTC, as everything in the API is
    ],
)
def test_parse_reads_rfc3339(text: str, moment: datetime) -> None:
    parsed = parse_rfc3339(text)
    assert parsed == moment
    assert parsed is not None and parsed.tzinfo is not None


@pytest.mark.parametrize("value", [None, "", "yesterday", "2026-13-01T00:00:00Z", 1765083609])
def test_parse_gives_none_for_missing_or_unreadable_values(value: object) -> None:
    assert parse_rfc3339(value) is None


def test_format_and_parse_round_trip_to_the_second() -> None:
    text = now_rfc3339()
    parsed = parse_rfc3339(text)
    assert parsed is not None and format_rfc3339(parsed) == text
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 60
