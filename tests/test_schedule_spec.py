"""Schedule expressions: standard cron, AWS cron(...) and rate(...), their next
fire times, their EventBridge form, and one-line errors for bad ones."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fanout.errors import UserError
from fanout.schedules import check_ranges, parse_spec
from fanout.schedules.spec import ScheduleSpecError


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def fires(expression: str, after: str, count: int = 5) -> list[str]:
    return [f"{x:%Y-%m-%dT%H:%M}" for x in parse_spec(expression).fires(t(after), count)]


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("*/5 * * * *", "2026-03-01T10:02", ["2026-03-01T10:05", "2026-03-01T10:10"]),
        # After a tick means strictly after it.
        ("*/5 * * * *", "2026-03-01T10:05", ["2026-03-01T10:10", "2026-03-01T10:15"]),
        # 2026-03-06 is a Friday: weekdays at 09:30, so Monday comes next.
        ("30 9 * * 1-5", "2026-03-06T10:00", ["2026-03-09T09:30", "2026-03-10T09:30"]),
        ("0 0 * * 0", "2026-03-01T01:00", ["2026-03-08T00:00", "2026-03-15T00:00"]),  # Sundays
        ("0 0 * * 7", "2026-03-01T01:00", ["2026-03-08T00:00", "2026-03-15T00:00"]),  # 7 too
        ("@daily", "2026-03-01T01:00", ["2026-03-02T00:00", "2026-03-03T00:00"]),
        ("0 12 L * *", "2026-02-01T00:00", ["2026-02-28T12:00", "2026-03-31T12:00"]),
        # Both day fields restricted: either one (cron's rule). Mar 1 2026 is a Sunday.
        ("0 6 1 * 1", "2026-02-28T00:00", ["2026-03-01T06:00", "2026-03-02T06:00"]),
        # AWS: day-of-week 1-7 is SUN-SAT, so 2-6 is MON-FRI.
        ("cron(30 9 ? * 2-6 *)", "2026-03-06T10:00", ["2026-03-09T09:30", "2026-03-10T09:30"]),
        ("cron(0 0 ? * 1 *)", "2026-03-01T01:00", ["2026-03-08T00:00", "2026-03-15T00:00"]),
        ("cron(0 0 ? * SUN *)", "2026-03-01T01:00", ["2026-03-08T00:00", "2026-03-15T00:00"]),
        # 6L: the last Friday; 6#2 the second Friday (AWS numbering).
        ("cron(0 12 ? * 6L *)", "2026-01-01T00:00", ["2026-01-30T12:00", "2026-02-27T12:00"]),
        ("cron(0 12 ? * 6#2 *)", "2026-01-01T00:00", ["2026-01-09T12:00", "2026-02-13T12:00"]),
        ("cron(0 8 1 * ? *)", "2026-01-15T00:00", ["2026-02-01T08:00", "2026-03-01T08:00"]),
        # The year field: nothing before 2030, nothing after.
        ("cron(0 0 1 1 ? 2030)", "2026-06-01T00:00", ["2030-01-01T00:00"]),
        ("cron(0 0 1 1 ? 2028-2029)", "2026-06-01T00:00", ["2028-01-01T00:00", "2029-01-01T00:00"]),
        # rate: anchored at the epoch, so aligned to the clock.
        ("rate(5 minutes)", "2026-03-01T10:02", ["2026-03-01T10:05", "2026-03-01T10:10"]),
        ("rate(1 minute)", "2026-03-01T10:02:30", ["2026-03-01T10:03", "2026-03-01T10:04"]),
        ("rate(2 hours)", "2026-03-01T01:00", ["2026-03-01T02:00", "2026-03-01T04:00"]),
        ("rate(1 day)", "2026-03-01T01:00", ["2026-03-02T00:00", "2026-03-03T00:00"]),
    ],
)
def test_next_fire_times(expression: str, after: str, expected: list[str]) -> None:
    assert fires(expression, after, len(expected) + 1)[: len(expected)] == expected
    if expression.startswith("cron(0 0 1 1 ? 20"):
        assert fires(expression, after, 5) == expected  # and no more


@pytest.mark.parametrize(
    ("expression", "when", "expected"),
    [
        ("*/5 * * * *", "2026-03-01T10:07:59", "2026-03-01T10:05"),
        ("*/5 * * * *", "2026-03-01T10:05:00", "2026-03-01T10:05"),  # at a tick: that tick
        ("cron(0 12 ? * 6L *)", "2026-02-10T00:00", "2026-01-30T12:00"),
        ("rate(5 minutes)", "2026-03-01T10:09:59", "2026-03-01T10:05"),
        ("rate(5 minutes)", "2026-03-01T10:10:00", "2026-03-01T10:10"),
    ],
)
def test_latest_tick_at_or_before(expression: str, when: str, expected: str) -> None:
    latest = parse_spec(expression).latest_at_or_before(t(when))
    assert latest is not None and f"{latest:%Y-%m-%dT%H:%M}" == expected


def test_no_fire_time_left_is_none() -> None:
    spec = parse_spec("cron(0 0 1 1 ? 2027)")
    assert spec.next_after(t("2027-06-01T00:00")) is None
    assert spec.latest_at_or_before(t("2026-06-01T00:00")) is None


def test_cron_and_rate_agree_on_a_five_minute_grid() -> None:
    after = "2026-03-01T23:41:17"
    assert fires("rate(5 minutes)", after, 50) == fires("*/5 * * * *", after, 50)
    assert parse_spec("rate(5 minutes)").next_after(t(after)) == t("2026-03-01T23:45")


@pytest.mark.parametrize(
    ("expression", "needle"),
    [
        ("", "is empty"),
        ("61 * * * *", "minute '61'"),
        ("* 24 * * *", "hour '24'"),
        ("* * * 13 *", "month '13'"),
        ("* * * * 8", "day-of-week '8'"),
        ("*/5 * * *", "has 4 fields"),
        ("0 0 * * * 2030", "has 6 fields"),  # a year needs AWS's cron(...)
        ("0 0 31 2 *", "never fires"),
        ("H * * * *", "minute 'H': H (hashed) and R (random) values are not cron"),
        ("R * * * *", "minute 'R': H (hashed) and R (random) values are not cron"),
        # Not only first in the expression: croniter would draw a new value each parse.
        ("0 R * * *", "hour 'R': H (hashed) and R (random) values are not cron"),
        ("0 0 R * *", "day-of-month 'R': H (hashed)"),
        ("0 0 * * R", "day-of-week 'R': H (hashed)"),
        ("0 0 * * 1,R", "day-of-week '1,R': H (hashed)"),
        ("0 H * * *", "hour 'H': H (hashed)"),
        ("cron(0 R ? * MON *)", "hour 'R': H (hashed)"),
        ("cron(R 0 1 * ? *)", "minute 'R': H (hashed)"),
        ("every five minutes", "has 3 fields"),
        ("cron(0 12 * * MON *)", "exactly one of day-of-month and day-of-week must be ?"),
        ("cron(0 12 ? * ? *)", "exactly one"),
        ("cron(0 12 1 * ?)", "has 5 fields"),
        ("cron(0 12 ? * 8 *)", "day-of-week 8 is out of range"),
        ("cron(0 12 ? * 0 *)", "day-of-week 0 is out of range"),
        ("cron(? 12 1 * ? *)", "? is only allowed"),
        ("cron(0 12 ? * MON 2100)", "year '2100'"),
        ("rate(0 minutes)", "at least 1"),
        ("rate(1 minutes)", "write rate(1 minute)"),
        ("rate(5 minute)", "write rate(5 minutes)"),
        ("rate(5 weeks)", "expected rate("),
        ("rate(five minutes)", "expected rate("),
        ("at(2026-03-01T10:00:00)", "not supported"),
        ("@fortnightly", "is not an alias fanout knows (use one of @yearly"),
        ("@reboot", "is not an alias fanout knows"),
    ],
)
def test_bad_expressions_say_what_is_wrong(expression: str, needle: str) -> None:
    with pytest.raises(ScheduleSpecError) as caught:
        parse_spec(expression)
    message = str(caught.value)
    assert isinstance(caught.value, UserError)  # one line, exit 2 in the CLI
    assert "\n" not in message
    assert message.startswith(f"schedule expression {expression!r}: ")
    assert needle in message


# -- ranges that run backwards: refused at add (check_ranges), not by parse_spec ------

BACKWARDS = "runs backwards (crons disagree on what it means); write"
SAME_ENDS = "starts where it ends, which croniter reads as the whole field; write"


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("0 22-2 * * *", f"hour range '22-2' {BACKWARDS} 22-23,0-2"),
        ("0 23-2 * * *", f"hour range '23-2' {BACKWARDS} 23,0-2"),  # no 23-23: see 5-5
        ("50-10 * * * *", f"minute range '50-10' {BACKWARDS} 50-59,0-10"),
        # A step carries on across the wrap, as Quartz counts it: 21, 23, then 1.
        ("50-10/5 * * * *", f"minute range '50-10/5' {BACKWARDS} 50-59/5,0-10/5"),
        ("0 21-2/2 * * *", f"hour range '21-2/2' {BACKWARDS} 21-23/2,1"),
        ("0 22-2/2 * * *", f"hour range '22-2/2' {BACKWARDS} 22,0-2/2"),
        ("0 0 20-3 * *", f"day-of-month range '20-3' {BACKWARDS} 20-31,1-3"),
        ("0 0 * DEC-FEB *", f"month range 'DEC-FEB' {BACKWARDS} DEC,JAN-FEB"),
        ("0 0 * 11-2 *", f"month range '11-2' {BACKWARDS} 11-12,1-2"),
        ("0 0 * * FRI-MON", f"day-of-week range 'FRI-MON' {BACKWARDS} FRI-SAT,SUN-MON"),
        ("0 0 * * fri-mon", f"day-of-week range 'fri-mon' {BACKWARDS} FRI-SAT,SUN-MON"),
        ("0 0 * * 5-1", f"day-of-week range '5-1' {BACKWARDS} 5-6,0-1"),
        ("0 0 * * 2-1", f"day-of-week range '2-1' {BACKWARDS} 2-6,0-1"),  # croniter: every day
        ("0 0 * * 1,5-1", f"day-of-week range '5-1' {BACKWARDS} 5-6,0-1"),  # in a list too
        # AWS's form: SUN is 1 and ends no range, so SAT-SUN is 7-1.
        ("cron(0 12 ? * SAT-SUN *)", f"day-of-week range 'SAT-SUN' {BACKWARDS} SAT,SUN"),
        ("cron(0 12 ? * 6-2 *)", f"day-of-week range '6-2' {BACKWARDS} 6-7,1-2"),
        ("cron(0 22-2 1 * ? *)", f"hour range '22-2' {BACKWARDS} 22-23,0-2"),
        ("cron(0 0 1 NOV-FEB ? *)", f"month range 'NOV-FEB' {BACKWARDS} NOV-DEC,JAN-FEB"),
        # Years do not come round again: a backwards year range was swapped.
        ("cron(0 0 1 1 ? 2031-2030)", f"year range '2031-2030' {BACKWARDS} 2030-2031"),
        # croniter reads N-N as the whole field (every hour), other crons as N.
        ("0 5-5 * * *", f"hour range '5-5' {SAME_ENDS} 5"),
        ("0 5-5/3 * * *", f"hour range '5-5/3' {SAME_ENDS} 5"),
        ("0 0 * MAR-MAR *", f"month range 'MAR-MAR' {SAME_ENDS} MAR"),
        ("0 0 * * FRI-FRI", f"day-of-week range 'FRI-FRI' {SAME_ENDS} FRI"),
        # Sunday to Sunday, however it is written (0 and 7 are both Sunday).
        ("0 0 * * SUN-SUN", f"day-of-week range 'SUN-SUN' {SAME_ENDS} SUN"),
        ("0 0 * * 0-0", f"day-of-week range '0-0' {SAME_ENDS} 0"),
        ("0 0 * * 7-7", f"day-of-week range '7-7' {SAME_ENDS} 7"),
        ("0 0 * * 7-0", f"day-of-week range '7-0' {SAME_ENDS} 7"),
        ("cron(0 12 ? * 2-2 *)", f"day-of-week range '2-2' {SAME_ENDS} 2"),
        ("cron(0 0 1 1 ? 2030-2030)", f"year range '2030-2030' {SAME_ENDS} 2030"),
    ],
)
def test_a_backwards_range_is_refused_at_add_with_what_to_write(expression: str, why: str) -> None:
    spec = parse_spec(expression)  # it parses: a stored schedule may hold it
    with pytest.raises(ScheduleSpecError) as caught:
        check_ranges(spec)
    assert isinstance(caught.value, UserError)  # one line, exit 2 in the CLI
    assert str(caught.value) == f"schedule expression {expression!r}: {why}"


@pytest.mark.parametrize(
    "expression",
    [
        # In the 5-field day-of-week, SUN (0 or 7) at a range's end is 7.
        "0 0 * * MON-SUN",
        "0 0 * * FRI-SUN",
        "0 0 * * SAT-SUN",
        "0 0 * * 1-0",
        "0 0 * * 5-0",
        "0 0 * * 5-7",
        "0 0 * * 0-7",  # the whole week
        "0 0 * * 7-1",  # and at its start 0: Sunday, Monday
        "0 0 * * MON-SUN/2",
        "*/5 * * * *",
        "0 9-17 * * 1-5",
        "0-30/10 22-23 1-15 JAN-MAR MON-FRI",
        "5 4 3 2 1",
        "0 0 L * *",
        "0 12 * * 5#2",
        "@daily",
        "rate(5 minutes)",
        "cron(0 12 ? * MON-FRI *)",
        "cron(0 12 ? * SUN-SAT *)",
        "cron(0 12 ? * 2-7 *)",
        "cron(0 12 ? * 6L *)",
        "cron(0 0 1 JAN-DEC ? 2030-2031)",
    ],
)
def test_forward_ranges_are_accepted(expression: str) -> None:
    check_ranges(parse_spec(expression))


@pytest.mark.parametrize(
    ("expression", "days"),
    [
        # 2030-01-01 is a Tuesday: the days each fires on, from the Wednesday.
        ("0 0 * * MON-SUN", ["Wed", "Thu", "Fri", "Sat", "Sun", "Mon", "Tue"]),
        ("0 0 * * 1-0", ["Wed", "Thu", "Fri", "Sat", "Sun", "Mon", "Tue"]),
        ("0 0 * * FRI-SUN", ["Fri", "Sat", "Sun", "Fri", "Sat", "Sun", "Fri"]),
        ("0 0 * * 5-0", ["Fri", "Sat", "Sun", "Fri", "Sat", "Sun", "Fri"]),
        ("0 0 * * SAT-SUN", ["Sat", "Sun", "Sat", "Sun", "Sat", "Sun", "Sat"]),
        ("0 0 * * 7-1", ["Sun", "Mon", "Sun", "Mon", "Sun", "Mon", "Sun"]),
    ],
)
def test_a_range_ending_on_sunday_fires_through_sunday(expression: str, days: list[str]) -> None:
    ticks = parse_spec(expression).fires(t("2030-01-01T00:00"), len(days))
    assert [f"{tick:%a}" for tick in ticks] == days


def test_a_stored_backwards_range_still_loads_and_fires_as_before() -> None:
    """A schedule saved by a fanout that did not refuse 22-2 loads (the model's
    validator and Schedule.spec do not call check_ranges) and fires where
    croniter wraps it: 22, 23, 0, 1, 2."""
    from fanout.schedules import Schedule

    when = t("2030-01-01T00:00")
    schedule = Schedule(
        name="s", expression="0 22-2 * * *", job="j.py", start=when, created_at=when
    )
    hours = [f"{tick:%H}" for tick in schedule.spec.fires(when, 6)]
    assert hours == ["01", "02", "22", "23", "00", "01"]


@pytest.mark.parametrize(
    ("expression", "aws"),
    [
        ("*/5 * * * *", "cron(*/5 * * * ? *)"),
        ("30 9 * * 1-5", "cron(30 9 ? * 2-6 *)"),
        ("0 0 * * 0", "cron(0 0 ? * 1 *)"),
        ("0 0 * * 7", "cron(0 0 ? * 1 *)"),
        ("0 0 * * 5-7", "cron(0 0 ? * 6-7,1 *)"),
        # Sunday ends a cron range but starts AWS's week: as AWS's 6-1 it would
        # run backwards, so it is split.
        ("0 0 * * 5-0", "cron(0 0 ? * 6-7,1 *)"),
        ("0 0 * * 1-0", "cron(0 0 ? * 2-7,1 *)"),
        ("0 0 * * 6-7", "cron(0 0 ? * 7,1 *)"),
        ("0 0 * * MON-SUN", "cron(0 0 ? * MON-SAT,SUN *)"),
        ("0 0 * * FRI-SUN", "cron(0 0 ? * FRI-SAT,SUN *)"),
        ("0 0 * * SAT-SUN", "cron(0 0 ? * SAT,SUN *)"),
        ("0 0 * * 7-1", "cron(0 0 ? * 1-2 *)"),
        ("0 0 * * SUN-MON", "cron(0 0 ? * SUN-MON *)"),
        ("0 0 * * MON,FRI", "cron(0 0 ? * MON,FRI *)"),
        ("0 12 * * 5#2", "cron(0 12 ? * 6#2 *)"),
        ("0 12 * * L5", "cron(0 12 ? * 6L *)"),
        ("0 12 * * 1/2", "cron(0 12 ? * 2/2 *)"),
        ("0 8 1 * *", "cron(0 8 1 * ? *)"),
        ("@hourly", "cron(0 * * * ? *)"),
        ("cron(0 12 ? * 6L *)", "cron(0 12 ? * 6L *)"),
        ("rate(5 minutes)", "rate(5 minutes)"),
    ],
)
def test_eventbridge_form(expression: str, aws: str) -> None:
    # The expected strings are written by hand from AWS's documentation
    # (day-of-week 1-7 is SUN-SAT, ? in one day field, a year field).
    assert parse_spec(expression).aws_expression() == aws


def test_cron_either_day_rule_has_no_eventbridge_form() -> None:
    with pytest.raises(ScheduleSpecError, match="both day-of-month and day-of-week"):
        parse_spec("0 6 1 * 1").aws_expression()


def test_a_stepped_range_ending_on_sunday_has_no_eventbridge_form() -> None:
    # MON-SUN/2 is Mon, Wed, Fri, Sun; AWS's 2-1/2 would run backwards.
    with pytest.raises(ScheduleSpecError, match="'MON-SUN/2' cannot be expressed"):
        parse_spec("0 0 * * MON-SUN/2").aws_expression()


def test_parsing_is_cached_by_the_text() -> None:
    from fanout.schedules import Schedule

    parse_spec.cache_clear()
    first = parse_spec("*/7 * * * *")
    assert parse_spec("*/7 * * * *") is first
    assert parse_spec.cache_info().hits == 1
    when = t("2030-01-01T00:00")
    schedule = Schedule(name="s", expression="*/7 * * * *", job="j.py", start=when, created_at=when)
    assert schedule.spec is schedule.spec is first  # not parsed again on each access


@pytest.mark.parametrize(
    ("expression", "when", "expected"),
    [
        ("rate(5 minutes)", "2030-01-01T00:00:00", "2030-01-01T00:00"),  # on a tick: it
        ("rate(5 minutes)", "2030-01-01T00:00:01", "2030-01-01T00:05"),
        ("*/5 * * * *", "2030-01-01T00:05:00", "2030-01-01T00:05"),
        ("*/5 * * * *", "2030-01-01T00:04:59.999999", "2030-01-01T00:05"),
        ("*/5 * * * *", "2030-01-01T00:05:00.000001", "2030-01-01T00:10"),
        ("cron(0 0 1 1 ? 2030)", "2030-01-01T00:00:00", "2030-01-01T00:00"),
    ],
)
def test_first_tick_at_or_after(expression: str, when: str, expected: str) -> None:
    first = parse_spec(expression).first_at_or_after(t(when))
    assert first is not None and f"{first:%Y-%m-%dT%H:%M}" == expected
