"""RFC 3339 times as Kubernetes writes them (``2026-12-07T05:00:00Z``), in one place.

Pure standard library: the trainer image imports it too.
"""

from __future__ import annotations

from datetime import UTC, datetime

RFC3339_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_rfc3339(moment: datetime) -> str:
    """``moment`` in UTC, to the second, with a ``Z`` (the form of Kubernetes' own stamps)."""
    return moment.astimezone(UTC).strftime(RFC3339_FORMAT)


def now_rfc3339() -> str:
    """The current UTC time as Kubernetes writes it."""
    return format_rfc3339(datetime.now(UTC))


def parse_rfc3339(value: object) -> datetime | None:
    """A time-zone-aware datetime, or None for a missing or unreadable value.

    Accepts a ``Z`` or a numeric offset and fractional seconds; a stamp without an offset
    is taken as UTC, as everything in the API is.
    """
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
