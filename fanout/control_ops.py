"""Run controls on a run as a whole: cancel, pause and resume it, what the
recovery sweep does for them, and what ``fanout status`` shows of them.

Each operation is idempotent: cancelling a cancelled run, pausing a paused one
or resuming a running one changes nothing and says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fanout.backends.base import TERMINAL_RUN_STATES, Backend, RunRecord, RunState, TaskState
from fanout.backends.runcontrols import controls_of
from fanout.controls import (
    CANCEL_REASON,
    display_state,
    is_cancelled,
    live_slots,
    set_paused,
    settings_of,
    tolerance,
    tolerance_chunks,
)
from fanout.errors import UnknownRunError
from fanout.events import EventSink, emit, events_for
from fanout.finalize import finalize_run


@dataclass(frozen=True)
class Outcome:
    """What a control operation did, for the command to print."""

    run_id: str
    changed: bool
    message: str
    cancelled: int = 0  # tasks cancelled at once (cancel)
    resent: int = 0  # task messages sent again (resume)


def _run(backend: Backend, run_id: str) -> RunRecord:
    run = backend.ledger.get_run(run_id)
    if run is None:
        raise UnknownRunError(f"unknown run id {run_id!r} (see `fanout runs`)")
    return run


def cancel(backend: Backend, run_id: str, events: EventSink | None = None) -> Outcome:
    """Cancel the run: its queued and waiting tasks at once, its running chunks
    at their next checkpoint (``ctx.time_left()`` is 0, ``ctx.cancelled`` true)
    or their hard timeout. What was committed stays; the run ends ``cancelled``."""
    if (late := _too_late(_run(backend, run_id), "cancel")) is not None:
        return late
    # Counted before the stop: a chunk told of it may checkpoint at once, and
    # one running at the cancel was still stopped by it.
    running = len(backend.ledger.list_tasks(run_id, (TaskState.RUNNING,)))
    recorded = backend.ledger.stop(run_id, CANCEL_REASON)  # claims cancel what arrives later
    if not recorded and (late := _too_late(_run(backend, run_id), "cancel")) is not None:
        return late
    # Done again by a second cancel, all of it idempotent (a first one may have
    # died half way). A paused run's deliveries would be dropped before their
    # claim: let them reach it, and be cancelled there.
    controls = controls_of(backend.ledger)
    now = time.time()
    controls.change_control(run_id, lambda state: set_paused(state, False, now))
    cancelled, drained = controls.cancel_queued(run_id, now)
    run = _run(backend, run_id)
    if not recorded and is_cancelled(run):
        # The ledger's answer, not a read before the stop: of two cancels at
        # once, one announces the cancellation.
        if drained:
            finalize_run(backend.ledger, backend.store, events or events_for(backend), run_id)
        more = f" ({cancelled} more queued chunks cancelled)" if cancelled else ""
        return Outcome(run_id, False, f"run {run_id} is already cancelling{more}", cancelled)
    note = "" if is_cancelled(run) else f"; the run was already stopping ({run.stop_reason})"
    emit(events or events_for(backend), "run.stopped", run_id, reason=CANCEL_REASON)
    if drained:
        finalize_run(backend.ledger, backend.store, events or events_for(backend), run_id)
    tail = f", {running} running chunks stop at their next checkpoint" if running else ""
    return Outcome(
        run_id,
        True,
        f"cancelling run {run_id}: {cancelled} queued chunks cancelled{tail}{note}",
        cancelled=cancelled,
    )


def _too_late(run: RunRecord, what: str) -> Outcome | None:
    """The answer to ``what`` (cancel, pause) on a run that no longer runs
    chunks: finalizing (every chunk ended) or ended; else None."""
    run_id = run.run_id
    if run.state in TERMINAL_RUN_STATES:
        return Outcome(run_id, False, f"run {run_id} already ended: {run.state.value}")
    if run.state == RunState.FINALIZING or run.outstanding == 0:
        # (outstanding 0 while running: drained, its finalizer about to begin, or dead)
        return Outcome(
            run_id,
            False,
            f"run {run_id} is finalizing: every chunk has ended, nothing is left to {what}",
        )
    return None


def pause(backend: Backend, run_id: str) -> Outcome:
    """Pause the run: no new chunk of it starts (running ones checkpoint at their
    next ``ctx.time_left()`` and their continuations wait) until ``resume``.
    Not a run that is finalizing or stopping (cancelled, over its tolerance):
    no chunk of it starts anyway, and a pause would outlive its end."""
    run = _run(backend, run_id)
    if (late := _too_late(run, "pause")) is not None:
        return late
    if run.stop_reason:
        shown = "cancelling" if is_cancelled(run) else f"stopping ({run.stop_reason})"
        return Outcome(run_id, False, f"run {run_id} is {shown}: no chunk of it starts anyway")
    now = time.time()
    changed = controls_of(backend.ledger).change_control(
        run_id, lambda state: set_paused(state, True, now)
    )
    if not changed:
        return Outcome(run_id, False, f"run {run_id} is already paused")
    return Outcome(run_id, True, f"paused run {run_id} (resume with `fanout resume {run_id}`)")


def resume(backend: Backend, run_id: str) -> Outcome:
    """Resume a paused run: the messages of its queued tasks (dropped while
    paused) and of its running ones (whose worker may have died meanwhile) are
    sent again; duplicates are harmless, the ledger's claim skips them."""
    run = _run(backend, run_id)
    if run.state in TERMINAL_RUN_STATES:
        return Outcome(run_id, False, f"run {run_id} already ended: {run.state.value}")
    now = time.time()
    changed = controls_of(backend.ledger).change_control(
        run_id, lambda state: set_paused(state, False, now)
    )
    if not changed:
        return Outcome(run_id, False, f"run {run_id} is not paused")
    tasks = backend.ledger.list_tasks(run_id, (TaskState.QUEUED, TaskState.RUNNING))
    if tasks:
        backend.queue.send([t.message for t in tasks])
    return Outcome(
        run_id,
        True,
        f"resumed run {run_id}: {len(tasks)} chunk{'' if len(tasks) == 1 else 's'} sent again",
        resent=len(tasks),
    )


def sweep(backend: Backend, run: RunRecord) -> bool:
    """The recovery sweep's part for one open run: a cancelled run's tasks
    registered since the cancel (a running chunk's continuation, a retry in
    back-off) are cancelled; returns whether the run is paused (its tasks must
    not be sent again: their messages were dropped on purpose)."""
    controls = controls_of(backend.ledger)
    if is_cancelled(run) and run.outstanding:
        controls.cancel_queued(run.run_id, time.time())
        return False
    return bool(controls.read_control(run.run_id).get("paused"))


def control_info(backend: Backend, run: RunRecord, tasks: dict[str, int]) -> dict[str, Any]:
    """The run's controls for ``fanout status``: state, cap, running and waiting
    chunks, tolerated failures used."""
    state = controls_of(backend.ledger).read_control(run.run_id)
    settings = settings_of(run)
    allowed = tolerance(settings, tolerance_chunks(run))
    return {
        "state": display_state(run, bool(state.get("paused"))),
        "max_concurrency": settings.max_concurrency,
        "slots_held": len(live_slots(state, time.time())),
        "running": tasks.get(TaskState.RUNNING.value, 0),
        "waiting": tasks.get(TaskState.QUEUED.value, 0),
        "dead": run.tasks_dead,
        "tolerated": allowed,
    }


def control_line(info: dict[str, Any]) -> str:
    """``state paused  max_concurrency 2 (running 2, waiting 17)  tolerated failures 1 of 2``."""
    cap = info["max_concurrency"]
    parts = [
        f"state {info['state']}",
        f"max_concurrency {cap if cap is not None else 'none'}"
        f" (running {info['running']}, waiting {info['waiting']})",
    ]
    if info["tolerated"] is not None:
        parts.append(f"tolerated failures {info['dead']} of {info['tolerated']} used")
    return "  ".join(parts)
