"""A schedule as fanout keeps it, the seam its stores implement, and the
deterministic run id of one tick."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator

from fanout.errors import UserError
from fanout.schedules.spec import Spec, as_utc, floor_minute, parse_spec

#: Schedule names: what EventBridge Scheduler allows, and short enough that
#: ``<name>-<yyyymmddThhmm>`` is a valid run id (fanout.messages.RUN_ID_PATTERN).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: The run param a scheduled run gets its tick in, when its job declares it.
SCHEDULED_TIME = "scheduled_time"
#: Claimed ticks older than this are forgotten (all but the latest one before a
#: new claim): a claim only has to outlive the processes racing for its tick.
KEEP_TICKS = timedelta(days=7)

Overlap = Literal["skip", "allow"]
CatchUp = Literal["none", "latest", "all"]


class Schedule(BaseModel):
    """One schedule: when (``expression``), what (``job`` and ``params``) and how
    ticks that overlap a running run or were missed are handled."""

    # Validators are built on first use: every CLI command imports this module
    # (through the schedule commands), few of them validate a schedule.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    name: str = Field(pattern=NAME_PATTERN)
    expression: str
    job: str = Field(min_length=1)
    params: dict[str, JsonValue] = Field(default_factory=dict)
    #: skip: no run starts while an earlier run of this schedule is still going.
    overlap: Overlap = "allow"
    #: Missed ticks (the scheduler was not running): fire none, the latest, or all.
    catch_up: CatchUp = "latest"
    #: No tick before this instant fires.
    start: datetime
    created_at: datetime

    @field_validator("expression")
    @classmethod
    def _parses(cls, value: str) -> str:
        parse_spec(value)
        return " ".join(value.split())

    @field_validator("start", "created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return as_utc(value)

    @property
    def spec(self) -> Spec:
        """The parsed expression (parse_spec caches it by the text)."""
        return parse_spec(self.expression)

    def next_fire(self, after: datetime | None = None) -> datetime | None:
        """The first tick not before ``start`` (inclusive: a tick exactly at start
        fires) and, when ``after`` is given, strictly after ``after``; None if
        there is none. What ``schedule add|list``, the loop's wake-up and
        EventBridge's ``StartDate`` all count from."""
        if after is None or as_utc(after) < self.start:
            return self.spec.first_at_or_after(self.start)
        return self.spec.next_after(after)


@dataclass(frozen=True, slots=True)
class TickClaim:
    """A claimed tick: when it was claimed, and whether it was dealt with since."""

    claimed_at: datetime
    settled: bool


class ScheduleStore(Protocol):
    """Where schedules live: the local database, or EventBridge Scheduler.

    ``claim_tick`` is the one atomic step: of all the processes that evaluate a
    tick, exactly one is told True, so a tick is fired (or skipped) once.
    """

    def add(self, schedule: Schedule) -> None:
        """Create the schedule; :class:`UserError` if the name is taken."""

    def get(self, name: str) -> Schedule | None:
        """The schedule, or None."""

    def list(self) -> list[Schedule]:
        """Every schedule, by name."""

    def remove(self, name: str) -> bool:
        """Delete the schedule (and its claimed ticks); whether it existed."""

    def claim_tick(self, name: str, tick: datetime) -> bool:
        """Claim ``tick`` of schedule ``name``: True for exactly one caller."""

    def release_tick(self, name: str, tick: datetime) -> None:
        """Forget the claim of ``tick`` (its run could not be submitted), so a
        later pass claims and fires it again; nothing if it was not claimed."""

    def last_tick(self, name: str, at_or_before: datetime | None = None) -> datetime | None:
        """The latest tick claimed for the schedule (at or before ``at_or_before``,
        when given), or None."""

    def settle_tick(self, name: str, tick: datetime) -> None:
        """Note that the claimed ``tick`` was dealt with (fired, skipped, or failed
        for good): it is not fired again."""

    def unsettled_ticks(self, name: str, claimed_before: datetime) -> builtins.list[datetime]:
        """Claimed ticks never settled, claimed before ``claimed_before``: their
        scheduler died between the claim and the submit. Oldest first."""

    def tick_claim(self, name: str, tick: datetime) -> TickClaim | None:
        """The claim of ``tick`` (a strongly consistent read), or None if unclaimed."""

    def close(self) -> None:
        """Release connections."""


def run_id_for(name: str, tick: datetime) -> str:
    """The run id of one tick: ``<name>-<yyyymmddThhmm>`` (UTC). Deterministic, so a
    tick fired twice (two schedulers, a redelivered message) is one run."""
    return f"{name}-{floor_minute(tick):%Y%m%dT%H%M}"


def run_id_pattern(name: str) -> str:
    """A regex matching the run ids of schedule ``name`` (see :func:`run_id_for`)."""
    import re

    return re.escape(name) + r"-[0-9]{8}T[0-9]{4}$"


def iso(when: datetime) -> str:
    """``2026-11-22T14:05:00Z``."""
    return as_utc(when).strftime("%Y-%m-%dT%H:%M:%SZ")


#: The times a ``--start``, ``--after`` or ``--at`` may name.
FIRST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LAST_TIME = datetime(2100, 1, 1, tzinfo=UTC)


def parse_time(text: str, what: str) -> datetime:
    """An ISO-8601 time from the command line (naive means UTC);
    :class:`UserError` naming ``what`` if it does not parse."""
    try:
        when = as_utc(datetime.fromisoformat(text.strip()))
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 in a far zone
        raise UserError(
            f"{what} {text!r} is not an ISO-8601 time (e.g. 2026-11-22T14:05:00Z)"
        ) from None
    if not FIRST_TIME <= when < LAST_TIME:
        # The years schedules can fire in (croniter's); beyond them date arithmetic
        # overflows.
        raise UserError(f"{what} {text!r} is outside the years 1970 to 2099")
    return when


def now_utc() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)
