"""Schedule expressions: parsing, next-fire times, and the EventBridge form.

Three forms are accepted, all evaluated in UTC:

- standard 5-field cron, ``minute hour day-of-month month day-of-week``
  (day-of-week 0-7, 0 and 7 both Sunday; names, ranges, steps, ``L``, ``W``,
  ``5#2``; a day-of-month and a day-of-week both restricted means either, as in
  cron), and the aliases ``@hourly``, ``@daily``, ``@midnight``, ``@weekly``,
  ``@monthly``, ``@yearly``, ``@annually``;
- AWS's ``cron(minute hour day-of-month month day-of-week year)``: day-of-week
  1-7 is SUN-SAT, exactly one of the two day fields is ``?``, ``6L`` is the last
  Friday of the month, ``6#3`` the third Friday; years from 1970 to 2099 (croniter's
  range; AWS's goes on to 2199);
- AWS's ``rate(N minute|minutes|hour|hours|day|days)`` (singular exactly when
  N is 1, as AWS requires): a fixed interval anchored at the Unix epoch, so
  ``rate(5 minutes)`` fires at :00, :05, ... and ``rate(1 day)`` at midnight UTC,
  wherever and whenever the schedule was made.

Cron expressions are evaluated by croniter; an AWS cron is translated into
croniter's 7-field form (``... second year``). Ticks fall on whole minutes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import islice
from typing import TYPE_CHECKING, Literal

from fanout.errors import UserError

if TYPE_CHECKING:
    from croniter import croniter

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
MAX_YEARS = 130  # 1970 to 2099, the years croniter knows

_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_RATE = re.compile(r"^rate\(\s*(\d+)\s+(minute|minutes|hour|hours|day|days)\s*\)$")
_UNIT_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
_AWS_CRON = re.compile(r"^cron\((.*)\)$")
# croniter's extensions that are not cron: H (hashed) and R (random) values,
# searched for in one field at a time (an R after a space is still one).
_NOT_CRON = re.compile(r"(^|[,\-/])[HhRr](?![A-Za-z])")


class ScheduleSpecError(UserError):
    """A schedule expression that does not parse (the message names it)."""


def _bad(text: str, why: str) -> ScheduleSpecError:
    return ScheduleSpecError(f"schedule expression {text!r}: {why}")


@dataclass(frozen=True)
class Spec:
    """A parsed schedule expression: when it fires."""

    text: str  # as the user wrote it
    kind: Literal["cron", "aws-cron", "rate"]
    cron: str | None = None  # what croniter evaluates (5 or 7 fields)
    interval: int | None = None  # rate: seconds

    def next_after(self, when: datetime) -> datetime | None:
        """The first tick strictly after ``when``; None if there is none."""
        when = as_utc(when)
        if self.interval is not None:
            seconds = (when - EPOCH) // timedelta(seconds=1)
            return EPOCH + timedelta(seconds=(seconds // self.interval + 1) * self.interval)
        assert self.cron is not None
        try:
            found: datetime = _croniter(self.cron, when).get_next(datetime)
        except _croniter_error():  # no such date any more (a past year)
            return None
        return found

    def first_at_or_after(self, when: datetime) -> datetime | None:
        """The first tick at or after ``when`` (a tick exactly at ``when`` counts);
        None if there is none. What an inclusive start (``--start``) means."""
        return self.next_after(just_before(when))

    def latest_at_or_before(self, when: datetime) -> datetime | None:
        """The last tick at or before ``when``; None if there is none."""
        when = as_utc(when)
        if self.interval is not None:
            seconds = (when - EPOCH) // timedelta(seconds=1)
            return EPOCH + timedelta(seconds=seconds // self.interval * self.interval)
        assert self.cron is not None
        # Ticks are whole minutes, and get_prev is strictly before its base.
        base = floor_minute(when) + MINUTE
        try:
            found: datetime = _croniter(self.cron, base).get_prev(datetime)
        except _croniter_error():
            return None
        return found

    def ticks_after(self, after: datetime) -> Iterator[datetime]:
        """The ticks strictly after ``after``, in order (one croniter for them all)."""
        if self.interval is not None:
            tick = self.next_after(after)
            assert tick is not None
            while True:
                yield tick
                tick += timedelta(seconds=self.interval)
        assert self.cron is not None
        iterator = _croniter(self.cron, as_utc(after))
        while True:
            try:
                yield iterator.get_next(datetime)
            except _croniter_error():
                return

    def fires(self, after: datetime, count: int) -> list[datetime]:
        """The next ``count`` ticks strictly after ``after``."""
        return list(islice(self.ticks_after(after), count))

    def aws_expression(self) -> str:
        """The same schedule as an EventBridge Scheduler expression; a
        :class:`ScheduleSpecError` if EventBridge cannot express it."""
        if self.kind != "cron":
            return self.text
        assert self.cron is not None
        minute, hour, dom, month, dow = self.cron.split()
        dom = "*" if dom == "?" else dom
        dow = "*" if dow == "?" else dow
        if dow == "*":
            dow = "?"
        elif dom == "*":
            dom = "?"
        else:
            raise _bad(
                self.text,
                "restricts both day-of-month and day-of-week (cron's 'either'),"
                " which EventBridge cannot express: use cron(...) with ? in one of them",
            )
        if dow != "?":
            dow = ",".join(_dow_to_aws(item, self.text) for item in dow.split(","))
        return f"cron({minute} {hour} {dom} {month} {dow} *)"


def as_utc(when: datetime) -> datetime:
    """``when`` as an aware UTC datetime (a naive one is taken to be UTC)."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def just_before(when: datetime) -> datetime:
    """The exclusive bound that makes ``when`` inclusive: "strictly after
    ``just_before(t)``" is "at or after ``t``" for ticks (whole seconds or minutes)."""
    return as_utc(when) - timedelta(microseconds=1)


def floor_minute(when: datetime) -> datetime:
    """``when`` (UTC) with seconds and microseconds dropped."""
    return as_utc(when).replace(second=0, microsecond=0)


@lru_cache(maxsize=512)
def parse_spec(text: str) -> Spec:
    """Parse a schedule expression; :class:`ScheduleSpecError` says what is wrong.

    Cached by the text: a :class:`Spec` is immutable, and parsing runs croniter
    (a ``get_next`` to prove the expression fires), which every access of
    ``Schedule.spec`` would otherwise repeat."""
    given = text
    text = " ".join(text.split())
    if not text:
        raise _bad(given, "is empty")
    lowered = text.lower()
    if lowered.startswith("rate("):
        return _parse_rate(text)
    if lowered.startswith("cron("):
        return _parse_aws_cron(text)
    if lowered.startswith("at("):
        raise _bad(text, "one-time at(...) schedules are not supported (use `fanout submit`)")
    cron = _ALIASES.get(lowered, text)
    fields = cron.split()
    if len(fields) != 5:
        raise _bad(
            text,
            f"has {len(fields)} fields; standard cron has 5 (minute hour day-of-month month"
            " day-of-week); for a year use cron(minute hour day-of-month month day-of-week year)",
        )
    _check_croniter(text, cron)
    return Spec(text, "cron", cron=cron)


def _parse_rate(text: str) -> Spec:
    match = _RATE.match(text)
    if not match:
        raise _bad(text, "expected rate(N minute|minutes|hour|hours|day|days)")
    value, unit = int(match.group(1)), match.group(2)
    if value < 1:
        raise _bad(text, "the rate must be at least 1")
    if (value == 1) != (not unit.endswith("s")):
        # AWS rejects rate(1 minutes) and rate(5 minute); so do we, so that a
        # schedule that works locally also deploys.
        want = unit.rstrip("s") if value == 1 else unit.rstrip("s") + "s"
        raise _bad(text, f"write rate({value} {want})")
    interval = value * _UNIT_SECONDS[unit.rstrip("s")]
    if interval > MAX_YEARS * 366 * 86400:
        raise _bad(text, f"the rate is longer than {MAX_YEARS} years: it would never fire")
    return Spec(text, "rate", interval=interval)


def _parse_aws_cron(text: str) -> Spec:
    match = _AWS_CRON.match(text)
    if not match:
        raise _bad(text, "expected cron(minute hour day-of-month month day-of-week year)")
    fields = match.group(1).split()
    if len(fields) != 6:
        raise _bad(
            text,
            f"has {len(fields)} fields; AWS cron has 6"
            " (minute hour day-of-month month day-of-week year)",
        )
    minute, hour, dom, month, dow, year = fields
    if "?" in (minute, hour, month, year):
        raise _bad(text, "? is only allowed in day-of-month or day-of-week")
    if (dom == "?") == (dow == "?"):
        raise _bad(text, "exactly one of day-of-month and day-of-week must be ? (an AWS rule)")
    dom = "*" if dom == "?" else dom
    dow = "*" if dow == "?" else ",".join(_dow_from_aws(i, text) for i in dow.split(","))
    cron = f"{minute} {hour} {dom} {month} {dow} 0 {year}"
    _check_croniter(text, cron)
    return Spec(text, "aws-cron", cron=cron)


def _check_croniter(text: str, cron: str) -> None:
    for name, value in zip(_FIELDS, cron.split(), strict=False):
        if _NOT_CRON.search(value):
            # croniter would pick a new random (or hashed) value at every parse.
            raise _bad(text, f"{name} {value!r}: H (hashed) and R (random) values are not cron")
    try:
        iterator = _croniter(cron, EPOCH)
    except (ValueError, KeyError, IndexError, TypeError) as exc:  # CroniterError is a ValueError
        raise _bad(text, _croniter_reason(cron, exc)) from None
    try:
        # An expression naming a date that never exists (February 30th).
        iterator.get_next(datetime)
    except _croniter_error():
        raise _bad(text, "never fires (no such date)") from None


def _croniter(cron: str, base: datetime) -> croniter:
    # croniter (a leaf library, ~30 ms to import) is imported when an expression
    # is first evaluated, not with this module: every CLI command imports the
    # schedule commands, and only they need it.
    from croniter import croniter

    # croniter gives up after 50 years without a match by default; a year
    # field may name any year up to 2099, searched from as early as 1970.
    return croniter(cron, base, max_years_between_matches=MAX_YEARS)


def _croniter_error() -> type[ValueError]:
    """croniter's error for an expression with no next (or previous) tick.
    Called in ``except`` clauses, so only once croniter has raised something."""
    from croniter.croniter import CroniterError

    return CroniterError


_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week", "second", "year")
_RANGES = ("0-59", "0-23", "1-31", "1-12 or JAN-DEC", "0-7 or SUN-SAT", "0", "1970-2099")


def _croniter_reason(cron: str, exc: Exception) -> str:
    """Which field croniter refused, found by trying each one alone."""
    fields = cron.split()
    for i, value in enumerate(fields):
        alone = " ".join(value if j == i else "*" for j in range(len(fields)))
        try:
            _croniter(alone, EPOCH)
        except (ValueError, KeyError, IndexError, TypeError):
            return f"{_FIELDS[i]} {value!r} is not valid (allowed: {_RANGES[i]})"
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"does not parse ({message})"


# -- day-of-week between AWS (1-7 = SUN-SAT) and cron (0-7, 0 and 7 = SUN) ---------

_DOW_ITEM = re.compile(r"^(\*|[0-9]+|[A-Za-z]{3})(?:-([0-9]+|[A-Za-z]{3}))?(?:/([0-9]+))?$")


def _dow_from_aws(item: str, text: str) -> str:
    """One comma item of an AWS day-of-week field, in croniter's numbering."""
    upper = item.upper()
    if upper == "L":
        return "6"  # the last day of the week: Saturday
    if upper.endswith("L") and len(upper) > 1:
        return "L" + _aws_day(upper[:-1], text)  # croniter: L5 = the last Friday
    if "#" in upper:
        day, _, nth = upper.partition("#")
        return f"{_aws_day(day, text)}#{nth}"
    match = _DOW_ITEM.match(upper)
    if not match:
        raise _bad(text, f"day-of-week item {item!r} does not parse")
    start, end, step = match.groups()
    out = start if start == "*" else _aws_day(start, text)
    if end is not None:
        out += "-" + _aws_day(end, text)
    return out + (f"/{step}" if step else "")


def _aws_day(day: str, text: str) -> str:
    if not day.isdigit():
        return day  # a name: the same in both
    n = int(day)
    if not 1 <= n <= 7:
        raise _bad(text, f"day-of-week {n} is out of range (AWS: 1-7, SUN-SAT)")
    return str(n - 1)


def _dow_to_aws(item: str, text: str) -> str:
    """One comma item of a croniter day-of-week field, in AWS's numbering."""
    upper = item.upper()
    if upper.startswith("L") and len(upper) > 1:
        return _cron_day(upper[1:], text) + "L"
    if "#" in upper:
        day, _, nth = upper.partition("#")
        return f"{_cron_day(day, text)}#{nth}"
    match = _DOW_ITEM.match(upper)
    if not match:
        raise _bad(text, f"day-of-week item {item!r} cannot be expressed for EventBridge")
    start, end, step = match.groups()
    if end is not None and end == "7" and start != "7":
        if step:
            raise _bad(text, f"day-of-week {item!r} cannot be expressed for EventBridge")
        # 5-7 (FRI-SUN) is 6-7 plus Sunday (1) in AWS's numbering.
        return f"{_cron_day(start, text)}-7,1"
    out = start if start == "*" else _cron_day(start, text)
    if end is not None:
        out += "-" + _cron_day(end, text)
    return out + (f"/{step}" if step else "")


def _cron_day(day: str, text: str) -> str:
    if not day.isdigit():
        return day
    n = int(day)
    if not 0 <= n <= 7:
        raise _bad(text, f"day-of-week {n} is out of range (0-7)")
    return str(n % 7 + 1)
