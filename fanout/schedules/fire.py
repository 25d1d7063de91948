"""Firing schedules: which ticks are due, firing one tick, and the scheduler loop.

A tick fires as ``coordinator.submit`` with the deterministic run id
``<name>-<yyyymmddThhmm>``: the ledger refuses a second run with the same id,
so a tick fired twice (two schedulers, two ``--at`` calls, a redelivered
EventBridge message) is one run and one set of records.

Catch-up, when the scheduler was not running at a tick's time (``due``):

- ``none``: only a tick less than :data:`GRACE` late fires; missed ones are dropped;
- ``latest``: the latest missed tick fires, once;
- ``all``: every missed tick fires, oldest first (at most :data:`MAX_CATCH_UP` a pass).

Overlap ``skip``: a tick does not start a run while another run of the same
schedule is still running, or another tick of it is claimed and not yet settled
(another scheduler is firing it); the tick is claimed and dropped, not postponed.

A tick is claimed before its run is submitted. Should the submit fail for a
reason other than the job itself (the database busy, an AWS error), the claim
is released so a later pass fires the tick, and the pass goes on with the
other schedules. Once dealt with (fired, skipped, or failed for good) the tick
is settled. A claim still unsettled :data:`SETTLE` after it was made belongs to
a scheduler that died between the claim and the submit: the next pass (or the
redelivered fire message, however late: the claim shows the tick came on time)
fires it again; the deterministic run id makes that harmless if the first
submit got through after all. A fire message that finds its tick's claim
fresh and unsettled is handed back until it is not. Ticks fire at least once,
and their runs exactly once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice, takewhile
from pathlib import Path
from typing import Any, Protocol

from fanout.backends.base import Backend, Delivery, RunState
from fanout.coordinator import submit
from fanout.errors import UserError
from fanout.failures import POISON_TRIES
from fanout.jobs import load_job
from fanout.messages import ScheduleFire
from fanout.outcomes import Handled
from fanout.packaged import job_refusal
from fanout.processes import SharedFlag, die_with_parent
from fanout.schedules import open_store
from fanout.schedules.guard import sender_refusal, tick_refusal
from fanout.schedules.model import (
    LAST_TIME,
    SCHEDULED_TIME,
    CatchUp,
    Schedule,
    ScheduleStore,
    TickClaim,
    iso,
    now_utc,
    run_id_for,
    run_id_pattern,
)
from fanout.schedules.spec import Spec, as_utc, floor_minute, just_before

log = logging.getLogger("fanout.scheduler")

#: How late a tick may be and still count as on time (catch-up ``none``).
GRACE = timedelta(seconds=60)
#: Missed ticks fired in one pass under catch-up ``all``; the next pass goes on.
MAX_CATCH_UP = 1000
#: The loop wakes at least this often, so it sees schedules added meanwhile (s).
MAX_SLEEP = 30.0
_OPEN = (RunState.RUNNING, RunState.FINALIZING)


@dataclass(frozen=True)
class Fired:
    """What happened to one tick."""

    schedule: str
    tick: datetime
    run_id: str
    outcome: str  # "fired", "skipped", "already fired", "claimed elsewhere", "failed"
    detail: str = ""

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.schedule} {iso(self.tick)}: {self.outcome} {self.run_id}{detail}"


def due(spec: Spec, after: datetime, now: datetime, catch_up: CatchUp) -> list[datetime]:
    """The ticks to fire at ``now``: of those in ``(after, now]``, what ``catch_up``
    keeps (see the module docstring)."""
    after, now = as_utc(after), as_utc(now)
    if now <= after:
        return []
    if catch_up == "all":
        ticks = takewhile(lambda tick: tick <= now, spec.ticks_after(after))
        return list(islice(ticks, MAX_CATCH_UP))
    latest = spec.latest_at_or_before(now)
    if latest is None or latest <= after:
        return []
    if catch_up == "latest" or now - latest < GRACE:
        return [latest]
    return []


def due_for(store: ScheduleStore, schedule: Schedule, now: datetime) -> list[datetime]:
    """The ticks of ``schedule`` due at ``now``, after its last claimed tick (or
    from its start). Claims after ``now`` (an ``--at`` in the future) do not count:
    their ticks are claimed already when their time comes."""
    last = store.last_tick(schedule.name, now)
    # start is inclusive: a tick exactly at start fires (as Schedule.next_fire says).
    after = last if last is not None else just_before(schedule.start)
    return due(schedule.spec, after, now, schedule.catch_up)


def scheduled_params(schedule: Schedule, tick: datetime) -> dict[str, Any]:
    """The run params of one tick: the schedule's, plus ``scheduled_time`` when the
    job takes it (a job whose Params model does not declare it would reject it)."""
    params: dict[str, Any] = dict(schedule.params)
    if takes_scheduled_time(schedule.job):
        params[SCHEDULED_TIME] = iso(tick)
    return params


def takes_scheduled_time(job_ref: str) -> bool:
    """Whether the job's params accept ``scheduled_time``: it declares the field,
    allows extra params, or has no Params model (a plain dict)."""
    model = load_job(job_ref).params_model
    if model is None or model.model_config.get("extra") == "allow":
        return True
    fields = model.model_fields
    return SCHEDULED_TIME in fields or any(f.alias == SCHEDULED_TIME for f in fields.values())


def running_runs(backend: Backend, name: str) -> list[str]:
    """Run ids of schedule ``name`` that are still going."""
    pattern = re.compile(run_id_pattern(name))
    runs = backend.ledger.list_runs(limit=10_000, states=_OPEN)
    return [r.run_id for r in runs if pattern.match(r.run_id)]


def fire(backend: Backend, schedule: Schedule, tick: datetime, store: ScheduleStore) -> Fired:
    """Submit the run of one tick (or skip it, under ``overlap skip``); the
    caller claimed the tick in ``store``."""
    tick = floor_minute(tick)
    run_id = run_id_for(schedule.name, tick)
    if schedule.overlap == "skip":
        going = [r for r in running_runs(backend, schedule.name) if r != run_id]
        if going:
            return Fired(schedule.name, tick, run_id, "skipped", f"{going[0]} is still going")
        # A tick another scheduler claimed and has not settled is a run about to
        # start (or starting): it overlaps as much as a running one. Each
        # scheduler claims before it looks, so of two firing at once at least
        # one sees the other's claim: never both fire (both may skip, rarely).
        firing = [t for t in store.unsettled_ticks(schedule.name, LAST_TIME) if t != tick]
        if firing:
            detail = f"the {iso(firing[0])} tick is being fired"
            return Fired(schedule.name, tick, run_id, "skipped", detail)
    try:
        submit(backend, schedule.job, scheduled_params(schedule, tick), run_id=run_id)
    except KeyError as exc:
        if not _is_duplicate_run(backend, exc, run_id):
            raise  # a bug or a missing object, not this tick's run existing already
        return Fired(schedule.name, tick, run_id, "already fired")
    except UserError as exc:
        # The job file moved, or its params no longer validate: say so and go on
        # with the other schedules.
        return Fired(schedule.name, tick, run_id, "failed", str(exc))
    return Fired(schedule.name, tick, run_id, "fired")


def _is_duplicate_run(backend: Backend, exc: KeyError, run_id: str) -> bool:
    """Whether ``exc`` is the ledger refusing a second run ``run_id``: ``create_run``
    signals that with ``KeyError(run_id)`` (there is no narrower type), and the run
    must then exist."""
    return exc.args == (run_id,) and backend.ledger.get_run(run_id) is not None


#: How long a claimed tick may stay unsettled before it is taken for abandoned
#: (a submit takes well under a second; a claim this old has no one behind it).
SETTLE = timedelta(seconds=60)


def fire_due(backend: Backend, store: ScheduleStore, now: datetime) -> list[Fired]:
    """Fire every tick due at ``now``. A tick another process claimed first is
    reported, not fired. An error (the database busy, an AWS error) fails that
    schedule's tick, reported as ``failed``, and the pass goes on with the other
    schedules."""
    results = []
    for schedule in store.list():
        results.extend(_fire_schedule(backend, store, schedule, now))
    return results


def _fire_schedule(
    backend: Backend, store: ScheduleStore, schedule: Schedule, now: datetime
) -> list[Fired]:
    results: list[Fired] = []
    tick: datetime | None = None
    claimed = False
    try:
        # Ticks whose scheduler died after claiming them: fired again, at least once.
        for tick in store.unsettled_ticks(schedule.name, now_utc() - SETTLE):
            log.warning("schedule %s: tick %s claimed, never fired", schedule.name, iso(tick))
            results.append(fire(backend, schedule, tick, store))
            store.settle_tick(schedule.name, tick)
        tick = None
        for tick in due_for(store, schedule, now):
            claimed = store.claim_tick(schedule.name, tick)
            if not claimed:
                run_id = run_id_for(schedule.name, tick)
                results.append(Fired(schedule.name, tick, run_id, "claimed elsewhere"))
                continue
            results.append(fire(backend, schedule, tick, store))
            claimed = False  # dealt with: fired, skipped or failed for good
            store.settle_tick(schedule.name, tick)
    except Exception as exc:
        log.exception("schedule %s: pass failed", schedule.name)
        if tick is None:  # due_for itself failed
            tick = now
        if claimed:
            # Not submitted: give the tick back, so the next pass fires it (the
            # run id is deterministic, so should it have been created after all,
            # that pass finds it "already fired"). This schedule's later ticks
            # wait for it, so that catch-up all keeps their order.
            try:
                store.release_tick(schedule.name, tick)
            except Exception:
                log.exception("schedule %s: could not release tick %s", schedule.name, iso(tick))
        message = str(exc).splitlines()[0] if str(exc) else ""
        detail = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        run_id = run_id_for(schedule.name, tick)
        results.append(Fired(schedule.name, tick, run_id, "failed", detail))
    return results


def next_wake(store: ScheduleStore, now: datetime) -> datetime | None:
    """The earliest tick after ``now`` of any schedule (not before its start)."""
    upcoming = [s.next_fire(now) for s in store.list()]
    found = [t for t in upcoming if t is not None]
    return min(found) if found else None


class StopFlag(Protocol):
    """What :func:`run_loop` stops by: a ``threading.Event``, a multiprocessing
    one, or :class:`fanout.processes.SharedFlag` (which a signal handler may set)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def run_loop(
    backend: Backend,
    store: ScheduleStore,
    stop: StopFlag,
    report: Callable[[Fired], None] | None = None,
    clock: Callable[[], datetime] = now_utc,
) -> None:
    """Fire due ticks until ``stop`` is set: wake at the next tick (at least every
    :data:`MAX_SLEEP` s, to see new schedules). A failing pass is logged and retried."""
    while not stop.is_set():
        try:
            for result in fire_due(backend, store, clock()):
                (report or _log)(result)
            wake = next_wake(store, clock())
        except Exception:
            log.exception("scheduler pass failed; retrying")
            wake = None
        now = clock()
        pause = MAX_SLEEP if wake is None else (wake - now).total_seconds()
        stop.wait(min(max(pause, 0.01), MAX_SLEEP))


def _log(result: Fired) -> None:
    level = logging.ERROR if result.outcome == "failed" else logging.INFO
    log.log(level, "%s", result)


def start_process(backend_name: str, home: Path) -> Callable[[], None]:
    """Run the scheduler loop in a child process (``fanout worker
    --with-scheduler``); returns the function that stops it.

    A process, not a thread of the supervisor: the supervisor forks worker
    children at any time (at start, and to replace one that died), and a fork
    taken while a scheduler thread held a lock (SQLite's, the database's write
    lock) would leave the new child a lock that nobody ever releases."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    stop = SharedFlag()  # not mp.Event: a child killed in its wait() hung set() for ever
    proc = ctx.Process(
        target=_process_main, args=(backend_name, home, stop), name="fanout-scheduler", daemon=True
    )
    proc.start()

    def stop_process() -> None:
        stop.set()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        stop.close()

    return stop_process


def _process_main(backend_name: str, home: Path, stop: Any) -> None:
    import signal

    from fanout.backends import open_backend

    die_with_parent()
    # Ctrl-C reaches the whole process group; the supervisor stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    backend = open_backend(backend_name, home=home)
    store = open_store(backend)
    try:
        run_loop(backend, store, stop)
    finally:
        store.close()
        backend.close()


# -- EventBridge's fire messages, routed here by the dispatcher ---------------------


def handle_fire(backend: Backend, delivery: Delivery, message: ScheduleFire) -> Handled:
    """Fire the tick a :class:`~fanout.messages.ScheduleFire` message names (the
    dispatcher decoded it), with the schedule as the store keeps it (the message
    only names it), then acknowledge.

    The message is obeyed only from the scheduler (on AWS), for a tick the
    schedule would fire now, and once: see :mod:`fanout.schedules.guard`. A
    refused message is logged with its reason and dropped. Infrastructure
    errors propagate, so the message is redelivered: the tick's claim is given
    back first (unless it was an abandoned claim this handler took over: kept,
    it fires the redelivery however late), and the run id makes the retry
    harmless."""
    refused = sender_refusal(backend.name, delivery.sender, "fire")
    if refused:
        log.error("dropping a fire message: %s", refused)
        backend.queue.ack(delivery.receipt)
        return Handled.REFUSED
    store = open_store(backend)
    try:
        # Its last delivery: a failure now dead-letters the message (settle_poison).
        last = delivery.receive_count >= POISON_TRIES
        outcome = _fire_once(backend, store, message.schedule, message.scheduled_time, last)
    finally:
        store.close()
    if outcome is Handled.SCHEDULE_IN_HAND:
        # Back when the claim would count as abandoned, to see which it was.
        backend.queue.release(delivery.receipt, SETTLE.total_seconds())
    else:
        backend.queue.ack(delivery.receipt)
    return outcome


def _fire_once(
    backend: Backend, store: ScheduleStore, name: str, when: datetime, last: bool = False
) -> Handled:
    """Check, claim and fire one tick of a fire message; what happened.

    A tick claimed already is finished, not refused: its claim says it was on
    time when it first came. A handler killed between its claim and its submit
    leaves its message on the queue, redelivered after the visibility timeout
    (six times the function's timeout when deployed), often past
    ``FIRE_LATE``: refused as late, the tick was lost. Claimed moments ago and
    not settled, the tick may be firing in another handler, or that handler
    died: the message is handed back (``SCHEDULE_IN_HAND``) until the claim
    is :data:`SETTLE` old, then fires it if nobody settled it."""
    schedule = store.get(name)
    if schedule is None:
        log.warning("dropping a fire message of unknown schedule %s", name)
        return Handled.UNKNOWN_SCHEDULE
    tick = floor_minute(when)
    claim = store.tick_claim(name, tick)
    if claim is None:
        refused = tick_refusal(schedule, when, now_utc())
        if refused:
            log.error("dropping a fire message of schedule %s: %s", name, refused)
            return Handled.REFUSED
    refused = job_refusal(schedule.job)  # on Lambda: only a deployed job
    if refused:
        log.error("dropping a fire message of schedule %s: %s", name, refused)
        return Handled.REFUSED
    if claim is None and not store.claim_tick(name, tick):
        claim = store.tick_claim(name, tick)  # another handler claimed it just now
    if claim is not None:
        held = _claimed_before(name, tick, claim)
        if held is not None:
            return held
    try:
        result = fire(backend, schedule, tick, store)
    except BaseException:
        # Not submitted: the redelivery fires it. A claim this handler made is
        # given back, for the redelivery to claim anew; an abandoned one it
        # took over is kept (abandoned still), since the redelivery of a tick
        # that old finds no claim refused as late, and the tick lost. On the
        # message's last delivery it is given back all the same: no copy
        # comes again, and an unsettled claim would hold back the schedule's
        # later ticks under overlap "skip" for ever.
        if claim is None or last:
            store.release_tick(name, tick)
        raise
    store.settle_tick(name, tick)
    _log(result)
    return Handled(f"schedule {result.outcome}")


def _claimed_before(name: str, tick: datetime, claim: TickClaim) -> Handled | None:
    """What a fire message of a ``tick`` claimed before comes to: nothing more
    (settled), handed back (a fresh claim), or None: fire it (abandoned)."""
    run_id = run_id_for(name, tick)
    if claim.settled:
        _log(Fired(name, tick, run_id, "already fired"))
        return Handled.SCHEDULE_ALREADY_FIRED
    if now_utc() - claim.claimed_at < SETTLE:
        _log(Fired(name, tick, run_id, "claimed elsewhere", "handed back until settled"))
        return Handled.SCHEDULE_IN_HAND
    # Claimed by a handler that died before it submitted: fire it now.
    log.warning("schedule %s: tick %s was claimed but never fired", name, iso(tick))
    return None
