"""The 5-field cron syntax of Kubernetes CronJobs, evaluated in a time zone.

``minute hour day-of-month month day-of-week``, each field ``*``, a number, a range ``a-b``,
a step ``*/n`` or ``a-b/n``, or a comma list of those; month and weekday names (``JAN``,
``MON``) and the macros ``@yearly``, ``@annually``, ``@monthly``, ``@weekly``, ``@daily``,
``@midnight`` and ``@hourly``. As in cron, a run is due when the day of the month *or* the
day of the week matches if both are restricted.

Daylight saving time (decision 1801): a wall-clock time that does not exist on a
spring-forward day runs at the first minute after the gap; a wall-clock time that occurs twice
on a fall-back day runs once, at its first occurrence.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
WEEKDAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# (name, lowest, highest, names) of each field, in order.
FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 7, WEEKDAYS),
)
# A search gives up after this many days: every valid expression matches within 8 years
# (29 February on a given weekday), so an expression that does not never matches (31 February).
SEARCH_DAYS = 366 * 8 + 2


class CronError(ValueError):
    """The expression or time zone is not valid; the message says what to change."""


@dataclass(frozen=True)
class Cron:
    """A parsed expression: the allowed values of each field."""

    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # day-of-month field is '*'
    any_weekday: bool  # day-of-week field is '*'

    def matches_day(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        weekday = (day.weekday() + 1) % 7
        if self.any_day and self.any_weekday:
            return True
        if self.any_day:
            return weekday in self.weekdays
        if self.any_weekday:
            return day.day in self.days
        return day.day in self.days or weekday in self.weekdays


def _value(token: str, lo: int, hi: int, names: tuple[str, ...], what: str) -> int:
    upper = token.upper()
    if names and upper in names:
        return names.index(upper) + (1 if what == "month" else 0)
    if not token.isdigit():
        raise CronError(f"{what}: {token!r} is not a number{' or name' if names else ''}")
    value = int(token)
    if not lo <= value <= hi:
        raise CronError(f"{what}: {value} is out of range {lo}-{hi}")
    return value


def _field(text: str, lo: int, hi: int, names: tuple[str, ...], what: str) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{what}: empty item in {text!r}")
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise CronError(f"{what}: step {step_text!r} must be a positive number")
            step = int(step_text)
        if base == "*":
            start, end = lo, hi
        elif "-" in base:
            first, _, last = base.partition("-")
            start = _value(first, lo, hi, names, what)
            end = _value(last, lo, hi, names, what)
            if start > end:
                raise CronError(f"{what}: range {base!r} runs backwards")
        else:
            start = _value(base, lo, hi, names, what)
            end = hi if step_text else start
        values.update(range(start, end + 1, step))
    return values


def parse(expression: str) -> Cron:
    """Parse a cron expression; raises :class:`CronError` saying what is wrong."""
    text = " ".join(expression.split())
    text = MACROS.get(text.lower(), text)
    parts = text.split(" ")
    if len(parts) != 5:
        raise CronError(
            f"schedule {expression!r} must have 5 fields (minute hour day-of-month month "
            "day-of-week) or be a macro such as @daily"
        )
    sets = [
        _field(p, lo, hi, names, what)
        for p, (what, lo, hi, names) in zip(parts, FIELDS, strict=False)
    ]
    weekdays = {0 if d == 7 else d for d in sets[4]}
    return Cron(
        expression=expression,
        minutes=tuple(sorted(sets[0])),
        hours=tuple(sorted(sets[1])),
        days=frozenset(sets[2]),
        months=frozenset(sets[3]),
        weekdays=frozenset(weekdays),
        any_day=parts[2].startswith("*"),
        any_weekday=parts[4].startswith("*"),
    )


def zone(name: str | None) -> ZoneInfo:
    """The IANA time zone (UTC when unset)."""
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CronError(
            f"timeZone {name!r} is not a known IANA time zone (e.g. Europe/Berlin)"
        ) from exc


def _instant(day: date, hour: int, minute: int, tz: ZoneInfo) -> datetime:
    """The UTC instant of a local wall-clock time; a time inside a DST gap maps to the
    first minute after the gap."""
    naive = datetime.combine(day, time(hour, minute))
    local = naive.replace(tzinfo=tz)
    utc = local.astimezone(UTC)
    if utc.astimezone(tz).replace(tzinfo=None) == naive:
        return utc
    # In the gap: the offset before the change applies (fold=0), which lands after the gap;
    # step back to the first minute that exists.
    probe = utc
    while True:
        earlier = probe - timedelta(minutes=1)
        if earlier.astimezone(tz).replace(tzinfo=None) < naive:
            return probe
        probe = earlier


def _day_instants(cron: Cron, day: date, tz: ZoneInfo) -> list[datetime]:
    """Run instants of one local day, ascending (duplicates from a DST gap merged)."""
    if not cron.matches_day(day):
        return []
    found = {_instant(day, h, m, tz) for h in cron.hours for m in cron.minutes}
    return sorted(found)


def next_after(cron: Cron, tz: ZoneInfo, moment: datetime) -> datetime | None:
    """The first run instant strictly after ``moment`` (None: the expression never matches)."""
    day = moment.astimezone(tz).date() - timedelta(days=1)  # a gap may shift into the next day
    for offset in range(SEARCH_DAYS):
        for instant in _day_instants(cron, day + timedelta(days=offset), tz):
            if instant > moment:
                return instant
    return None


def last_at_or_before(cron: Cron, tz: ZoneInfo, moment: datetime) -> datetime | None:
    """The latest run instant at or before ``moment`` (None: none in the searched years)."""
    day = moment.astimezone(tz).date() + timedelta(days=1)
    for offset in range(SEARCH_DAYS):
        for instant in reversed(_day_instants(cron, day - timedelta(days=offset), tz)):
            if instant <= moment:
                return instant
    return None


def validate(expression: str, time_zone: str | None = None) -> None:
    """Raise :class:`CronError` unless the expression parses and matches some time."""
    cron = parse(expression)
    tz = zone(time_zone)
    if next_after(cron, tz, datetime(2000, 1, 1, tzinfo=UTC)) is None:
        raise CronError(f"schedule {expression!r} never matches a date (e.g. 31 February)")
