"""Schedule expressions: standard cron, AWS cron(...) and rate(...), their next
fire times, their EventBridge form, and one-line errors for bad ones."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fanout.errors import UserError
from fanout.schedules import parse_spec
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


@pytest.mark.parametrize(
    ("expression", "aws"),
    [
        ("*/5 * * * *", "cron(*/5 * * * ? *)"),
        ("30 9 * * 1-5", "cron(30 9 ? * 2-6 *)"),
        ("0 0 * * 0", "cron(0 0 ? * 1 *)"),
        ("0 0 * * 7", "cron(0 0 ? * 1 *)"),
        ("0 0 * * 5-7", "cron(0 0 ? * 6-7,1 *)"),
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
