"""What a fire or sweep message must prove before it is obeyed.

Anyone who may send to the work queue can write a ``schedule.fire`` or
``fanout.sweep`` message; the envelope's validation (``fanout.messages``)
only proves it is well formed. So, on receipt:

- a fire message's tick must be one the schedule itself would fire: on its
  grid, at or after its start, and close to now (:data:`FIRE_LATE` late at
  most, :data:`FIRE_EARLY` early at most, for clock skew). The receiver then
  claims the tick in the schedule store, the same claim the local scheduler
  and ``scheduler --at`` make, so a tick fires once however often it is sent
  (a tick claimed already is not checked again: its claim was, and a handler
  that died after it is finished by the redelivery, ``fanout.schedules.fire``);
- on AWS, fire and sweep messages must come from the stack's scheduler role:
  SQS stamps every message with its sender's ``SenderId`` (for an assumed
  role ``<role id>:<session>``), which a sender cannot choose. The role's
  unique id is ``FANOUT_AWS_SCHEDULER_SENDER`` (the template sets it); an AWS
  receiver without it refuses them all rather than trust anyone.

Each check returns the reason for refusing, or None.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from fanout.schedules.model import Schedule, iso
from fanout.schedules.spec import as_utc, floor_minute

#: How late a fire message may be received and still fire: EventBridge sends at
#: the tick, but the queue may hold it (a throttled function, a redelivery
#: after an infrastructure error, with the stack's 6-minute visibility).
FIRE_LATE = timedelta(minutes=10)
#: How early: the clocks of EventBridge and of the receiver may differ a little.
FIRE_EARLY = timedelta(minutes=1)
#: The environment variable holding the scheduler role's unique id (``AROA...``).
SENDER_ENV = "FANOUT_AWS_SCHEDULER_SENDER"


def tick_refusal(schedule: Schedule, tick: datetime, now: datetime) -> str | None:
    """Why ``tick`` (from a fire message received at ``now``) must not fire
    ``schedule``; None if it may."""
    tick = floor_minute(tick)  # what fire() runs: ticks are whole minutes
    if schedule.spec.first_at_or_after(tick) != tick:
        return f"{iso(tick)} is not a tick of {schedule.expression!r}"
    if tick < schedule.start:
        return f"{iso(tick)} is before the schedule's start {iso(schedule.start)}"
    now = as_utc(now)
    if tick < now - FIRE_LATE:
        return f"{iso(tick)} is more than {_minutes(FIRE_LATE)} minutes before now ({iso(now)})"
    if tick > now + FIRE_EARLY:
        return f"{iso(tick)} is more than {_minutes(FIRE_EARLY)} minute(s) after now ({iso(now)})"
    return None


def sender_refusal(backend_name: str, sender: str | None, what: str) -> str | None:
    """Why a ``what`` ("fire", "sweep") message sent by ``sender`` (its SQS
    ``SenderId``) must not be obeyed; None if it may. Only AWS has senders."""
    if backend_name != "aws":
        return None
    expected = os.environ.get(SENDER_ENV, "").strip()
    if not expected:
        return f"{SENDER_ENV} is not set, so no {what} message is trusted"
    if sender is None or sender.split(":", 1)[0] != expected:
        return f"a {what} message from {sender or 'an unknown sender'}, not the scheduler role"
    return None


def _minutes(delta: timedelta) -> int:
    return int(delta.total_seconds() // 60)
