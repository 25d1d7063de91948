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
A range that runs backwards (``22-2``) or starts where it ends (``5-5``) parses,
since stored schedules may hold one, but :func:`check_ranges` refuses it when a
schedule is added: croniter reads it unlike other crons, EventBridge among them.
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
    if lowered.startswith("@") and lowered not in _ALIASES:
        raise _bad(text, f"is not an alias fanout knows (use one of {', '.join(_ALIASES)})")
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


# -- ranges that run backwards: refused when a schedule is added --------------------
#
# croniter wraps a range whose end comes before its start round the field (hour
# 22-2 is 22, 23, 0, 1, 2), where other crons, EventBridge among them, read it
# otherwise or refuse it; and it takes a range that starts where it ends (5-5)
# for the whole field, where they take the one value. Either way a schedule
# would fire at other times locally than deployed. parse_spec does not refuse
# them, since it also loads stored schedules, and a home holding one from an
# older fanout must go on firing it; `fanout schedule add` calls check_ranges.

_MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_RANGE_ITEM = re.compile(r"^([0-9]+|[A-Za-z]{3})-([0-9]+|[A-Za-z]{3})(?:/([0-9]+))?$")


@dataclass(frozen=True)
class _Field:
    """One field of an expression as written, for the range check."""

    name: str
    low: int  # the values a range wraps round
    high: int
    names: tuple[str, ...] = ()  # names[i] is the value low + i
    sunday_ends_week: bool = False  # 5-field day-of-week: SUN and 0 end a range as 7
    wraps: bool = True  # a year range does not come round again: it was swapped

    def number(self, token: str) -> int | None:
        """A range end as a number; None for a name this field does not have."""
        if token.isdigit():
            return int(token)
        upper = token.upper()
        return self.names.index(upper) + self.low if upper in self.names else None

    def text(self, value: int, as_name: bool) -> str:
        """``value`` written back, as a name when the user wrote one."""
        return self.names[value - self.low] if as_name and self.names else str(value)


_CRON_LAYOUT: tuple[_Field, ...] = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, _MONTH_NAMES),
    _Field("day-of-week", 0, 6, _DAY_NAMES, sunday_ends_week=True),
)
_AWS_LAYOUT = (
    *_CRON_LAYOUT[:4],
    _Field("day-of-week", 1, 7, _DAY_NAMES),  # AWS: 1-7 is SUN-SAT, SUN never 8
    _Field("year", 1970, 2099, wraps=False),
)


def check_ranges(spec: Spec) -> None:
    """Refuse, with a :class:`ScheduleSpecError` naming the field and what to write
    instead, a step longer than its field (minute ``*/61``), and a range that
    runs backwards (hour ``22-2``: write ``22-23,0-2``) or starts where it ends
    (``5-5``: write ``5``), which croniter reads unlike other crons,
    EventBridge among them.

    For an expression being added (``fanout schedule add``), not for a stored
    one: parse_spec does not call it, so a schedule saved by an older fanout
    still loads and fires as it did. In the 5-field day-of-week, SUN (0 or 7)
    ends a range as 7, so ``MON-SUN``, ``FRI-SUN`` and ``5-0`` run forwards."""
    if spec.kind == "rate":
        return
    if spec.kind == "aws-cron":
        match = _AWS_CRON.match(spec.text)
        assert match is not None  # parse_spec matched it
        fields, layout = match.group(1).split(), _AWS_LAYOUT
    else:
        assert spec.cron is not None
        fields, layout = spec.cron.split(), _CRON_LAYOUT  # an alias as its fields
    for field, value in zip(layout, fields, strict=True):
        for item in value.split(","):
            problem = _step_problem(field, item) or _range_problem(field, item)
            if problem is not None:
                raise _bad(spec.text, problem)
    if spec.kind == "cron":
        _starred_day_problem(spec.text, fields[2], fields[4])


def _starred_day_problem(text: str, dom: str, dow: str) -> None:
    """A day field that starts with ``*`` but is not ``*`` (``*/2``), the other
    one restricted: Vixie cron and cronie fire when both days match (a field
    starting with ``*`` counts as unrestricted), croniter when either does, so
    ``0 0 */2 * 5`` fired on every odd day and every Friday."""
    pairs = (("day-of-month", dom, "day-of-week", dow), ("day-of-week", dow, "day-of-month", dom))
    for name, value, other_name, other in pairs:
        if value.startswith("*") and value != "*" and other not in ("*", "?"):
            first = "1-31" if name == "day-of-month" else "0-6"
            raise _bad(
                text,
                f"{name} {value!r} with a restricted {other_name}: crons disagree on"
                f" whether both days or either must match; write {first}{value[1:]}"
                " for either (as fanout reads it)",
            )


def _step_problem(field: _Field, item: str) -> str | None:
    """A step longer than the field's values (minute ``*/61``, hour ``*/25``)
    matches its first value only, and cannot mean what was meant (``*/61``
    fired hourly). A step of the field's length (``*/60``, hour ``*/24``) is
    let be: once an hour or a day is what it says."""
    base, slash, step = item.partition("/")
    if not slash or not step.isdigit() or int(step) <= field.high - field.low + 1:
        return None
    first = field.low if base in ("*", "?") else base.split("-")[0]
    return (
        f"{field.name} step {item!r} is longer than the field ({field.low}-{field.high}),"
        f" so it matches {first} alone; write {first}"
    )


def _range_problem(field: _Field, item: str) -> str | None:
    """What is wrong with one comma item of ``field``, or None."""
    match = _RANGE_ITEM.match(item)
    if not match:
        return None  # not a range; parse_spec has judged it
    first, last, step_text = match.groups()
    start, end = field.number(first), field.number(last)
    if start is None or end is None:
        return None
    as_name = not (first.isdigit() and last.isdigit())
    if field.sunday_ends_week and (start, end) == (0, 7):
        return None  # 0-7: the whole week, in every cron
    # In the 5-field day-of-week 7 is Sunday too, so 7-0 and SUN-SUN start where they end.
    if (start % 7 == end % 7) if field.sunday_ends_week else (start == end):
        return (
            f"{field.name} range {item!r} starts where it ends, which croniter reads"
            f" as the whole field; write {first}"
        )
    if field.sunday_ends_week:
        start, end = start % 7, end or 7  # SUN starts a range as 0 and ends one as 7
    if start <= end:
        return None
    step = int(step_text) if step_text else 1
    if field.wraps:
        instead = _split(field, start, end, step, as_name)
    else:
        instead = f"{last}-{first}" + (f"/{step_text}" if step_text else "")
    return (
        f"{field.name} range {item!r} runs backwards (crons disagree on what it means);"
        f" write {instead}"
    )


def _split(field: _Field, start: int, end: int, step: int, as_name: bool) -> str:
    """A backwards range as the two forward ones it wraps into: ``22-2`` is
    ``22-23,0-2``. A step carries on across the wrap (``21-2/2`` is 21, 23, 1),
    as Quartz counts it; croniter's own count there skips values (21, 23, 2)."""
    last_before_wrap = start + (field.high - start) // step * step
    after_wrap = last_before_wrap + step - (field.high - field.low + 1)
    parts = [(start, field.high)]
    if after_wrap <= end:
        parts.append((after_wrap, end))

    def part(low: int, high: int) -> str:
        if low + step > high:  # one value: a range starting where it ends is whole to croniter
            return field.text(low, as_name)
        out = f"{field.text(low, as_name)}-{field.text(high, as_name)}"
        return out + (f"/{step}" if step > 1 else "")

    return ",".join(part(low, high) for low, high in parts)


# -- day-of-week between AWS (1-7 = SUN-SAT) and cron (0-7, 0 and 7 = SUN) ---------

_DOW_ITEM = re.compile(r"^(\*|[0-9]+|[A-Za-z]{3})(?:-([0-9]+|[A-Za-z]{3}))?(?:/([0-9]+))?$")
_SUN = ("0", "SUN")


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
    # A range ending on Sunday (5-7, 5-0, FRI-SUN) ends the week in cron, while
    # AWS's week starts with it, so as AWS's 6-1 it would run backwards: split it,
    # 5-7 is 6-7 plus Sunday (1). (check_ranges refuses 0-0 and SUN-SUN at add.)
    sunday_end = end == "7" or (end in _SUN and start not in _SUN)
    if sunday_end and start not in ("7", "*"):
        if step:
            raise _bad(text, f"day-of-week {item!r} cannot be expressed for EventBridge")
        if start.isdigit():
            return ("7" if start == "6" else f"{_cron_day(start, text)}-7") + ",1"
        return ("SAT" if start == "SAT" else f"{start}-SAT") + ",SUN"
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
