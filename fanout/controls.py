"""Run controls, the pure rules: cancel, pause, a concurrency cap per run and
tolerated failures, written once for every backend.

A run's **control state** is one small JSON object the ledger keeps beside the
run (``fanout.backends.runcontrols``)::

    {"paused": false, "slots": {"<lease token>": <expires>}, "avg": 0.21,
     "paused_at": <since>, "paused_s": 12.5}

- ``paused``: no chunk of the run is admitted (its message is acknowledged and
  ``fanout resume`` sends the run's queued tasks again, so a paused run costs
  no polling however long it stays paused). ``paused_at`` is when the pause in
  hand began, ``paused_s`` the seconds of the pauses before it: a run's rate
  counts the time it was let run, not the night it was paused.
- ``slots``: the attempts holding one of the run's ``max_concurrency`` slots,
  with the wall-clock time the slot lapses (the attempt's lease expiry: a
  worker that dies holds its slot no longer than its hard timeout).
- ``avg``: the run's recent chunk duration (s), so a delivery refused for want
  of a slot comes back about when one should be free.

Every function here takes the state, changes it in place where it says so, and
calls nothing: the backends apply them inside one atomic step (a SQLite write
transaction, a DynamoDB conditional put on the item's version).

**Cancel** is the run's ``stop_reason`` set to :data:`CANCEL_REASON` (claims
already cancel the queued tasks of a stopped run on every backend), plus every
queued task cancelled at once; **tolerated failures** stop the run the same way
with a reason starting :data:`TOLERANCE_PREFIX` once the dead chunks exceed
the tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fanout.backends.base import RunRecord, RunState
from fanout.backends.rules import JOB_STOP_PREFIX
from fanout.backends.rules import final_state as ledger_final_state
from fanout.limits import PLANNED, RunLimits, limits_of
from fanout.retry import JITTER

#: ``stop_reason`` of a run stopped by ``fanout cancel``.
CANCEL_REASON = "cancelled (fanout cancel)"
#: ``stop_reason`` of a run whose dead chunks went over its tolerance starts so.
TOLERANCE_PREFIX = "tolerated failures exceeded"
# (A job's own stop starts with JOB_STOP_PREFIX, from the ledger rules:
# a replay goes by it, see replay_revives.)


def stop_line(reason: str) -> str:
    """How a summary says why the run stopped (the job's own words say it already)."""
    return reason if reason.startswith(JOB_STOP_PREFIX) else f"stopped: {reason}"


#: A delivery refused for a slot waits at least this long (s) before it is
#: delivered again, and at most :data:`MAX_WAIT`; SQS rounds up to whole seconds.
MIN_WAIT = 0.2
MAX_WAIT = 60.0
#: The duration assumed for a run's chunks before any finished (s).
DEFAULT_AVG = 0.5


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether an attempt may start now. ``paused``: the run is paused (drop the
    delivery; ``resume`` sends it again). Otherwise, not ``go`` means every slot
    is taken: hand the delivery back for ``retry_after`` seconds."""

    go: bool
    paused: bool = False
    retry_after: float = 0.0
    held: bool = False  # a slot was taken for the attempt (release it when it ends)


def live_slots(state: dict[str, Any], now: float) -> dict[str, float]:
    """The slots whose attempt has not lapsed."""
    slots: dict[str, float] = state.get("slots") or {}
    return {t: float(e) for t, e in slots.items() if float(e) > now}


def admit(
    state: dict[str, Any],
    token: str,
    cap: int | None,
    expires: float,
    now: float,
    receives: int = 1,
) -> Admission:
    """Admit attempt ``token`` of a run (updating ``state`` in place): refused
    while the run is paused; with a ``cap``, only if fewer than ``cap`` live
    slots are held, and then a slot lapsing at ``expires`` is taken.

    A refused delivery waits about one average chunk duration for each time it
    was delivered (``receives``), with jitter, between :data:`MIN_WAIT` and
    :data:`MAX_WAIT`: soon enough to fill a slot when it frees, spaced out for
    a delivery far back in a long backlog (SQS moves a message received 50
    times to its dead-letter queue; the recovery sweep moves it back)."""
    if state.get("paused"):
        return Admission(False, paused=True)
    if cap is None:
        return Admission(True)
    slots = live_slots(state, now)
    if token in slots or len(slots) < cap:
        slots[token] = expires
        state["slots"] = slots
        return Admission(True, held=True)
    state["slots"] = slots  # lapsed slots dropped
    return Admission(False, retry_after=_wait(float(state.get("avg", DEFAULT_AVG)), receives))


def contended(receives: int = 1) -> Admission:
    """The refusal of a delivery whose admission could not get its write in
    (``ControlContended``): handed back like one over the cap, no attempt spent."""
    return Admission(False, retry_after=_wait(DEFAULT_AVG, receives))


def _wait(avg: float, receives: int) -> float:
    wait = max(MIN_WAIT, avg) * max(receives, 1)
    return min(MAX_WAIT, wait) * JITTER.uniform(0.5, 1.0)


def release(state: dict[str, Any], token: str, took: float | None = None) -> bool:
    """Give back the slot of attempt ``token`` (in place); folds the attempt's
    duration into the run's average. True if it held one."""
    slots: dict[str, float] = state.get("slots") or {}
    held = slots.pop(token, None) is not None
    state["slots"] = slots
    if held and took is not None and math.isfinite(took) and took >= 0:
        avg = float(state.get("avg", took))
        state["avg"] = round(0.8 * avg + 0.2 * took, 4)
    return held


def set_paused(state: dict[str, Any], paused: bool, now: float) -> bool:
    """Pause or resume (in place) at ``now``; true if that changed anything."""
    changed = bool(state.get("paused")) != paused
    if changed and paused:
        state["paused_at"] = now
    elif changed:
        state["paused_s"] = round(paused_seconds(state, now), 3)
        state.pop("paused_at", None)
    state["paused"] = paused
    return changed


def paused_seconds(state: dict[str, Any], until: float) -> float:
    """Seconds the run has been paused, the pause in hand counted up to ``until``."""
    before = state.get("paused_s", 0.0)
    total = float(before) if isinstance(before, int | float) else 0.0
    since = state.get("paused_at")
    if state.get("paused") and isinstance(since, int | float):
        total += max(0.0, until - since)
    return total


def settings_of(run: RunRecord) -> RunLimits:
    """The run's settings as recorded (its schema, kept beside them, left out)."""
    return limits_of(run.settings)


def is_cancelled(run: RunRecord) -> bool:
    """Whether ``fanout cancel`` stopped the run."""
    return run.stop_reason == CANCEL_REASON


def tolerance(settings: RunLimits, chunks: int) -> int | None:
    """The number of dead chunks a run of ``chunks`` chunks tolerates (None:
    no tolerance set, any dead chunk fails the run). With both settings, the
    larger allowance holds."""
    allowed: list[int] = []
    if settings.tolerated_failures is not None:
        allowed.append(settings.tolerated_failures)
    if settings.tolerated_failure_percent is not None:
        allowed.append(math.floor(settings.tolerated_failure_percent * chunks / 100 + 1e-9))
    return max(allowed) if allowed else None


def chunks_ran(run: RunRecord) -> int:
    """The chunks of ``run`` that ended having done their work, as progress
    shows them: a cancelled chunk did not (a cancelled run's bar is not full);
    but a run that succeeded (its job stopped it, with chunks left over) did all
    it had to, its cancelled chunks counted with the rest."""
    succeeded = run.state in (RunState.SUCCEEDED, RunState.SUCCEEDED_WITH_FAILURES)
    return run.tasks_done + run.tasks_dead + (run.tasks_cancelled if succeeded else 0)


def tolerance_chunks(run: RunRecord) -> int:
    """The chunks a run's tolerated failures are counted of: those registered,
    its plan left out (it makes the work chunks and does none of their work:
    counted, 8 dead of 8 work chunks passed a tolerance of 89%)."""
    planned = bool(run.settings.get(PLANNED))
    return run.chunks_total - 1 if planned and run.chunks_total > 1 else run.chunks_total


def tolerance_exceeded(settings: RunLimits, dead: int, chunks: int) -> str | None:
    """The stop reason of a run whose ``dead`` chunks (of ``chunks`` registered
    so far) went over its tolerance, or None. Only a run with a tolerance set
    stops early: without one it runs on, as before, and ends ``failed``."""
    allowed = tolerance(settings, chunks)
    if allowed is None or dead <= allowed:
        return None
    return f"{TOLERANCE_PREFIX}: {dead} dead chunks of {chunks}, {allowed} tolerated"


def final_state(run: RunRecord, dead: int) -> RunState:
    """The state a drained run with ``dead`` dead chunks ends in: the run
    controls' states first, a run its job stopped as one that ran out of work,
    then the ledger's rule
    (:func:`fanout.backends.rules.final_state`)."""
    if is_cancelled(run):
        return RunState.CANCELLED
    reason = run.stop_reason
    if reason and reason.startswith(TOLERANCE_PREFIX):
        return RunState.FAILED
    if reason and reason.startswith(JOB_STOP_PREFIX):
        reason = None  # it ends as if it had run out of work
    if dead and not reason:
        allowed = tolerance(settings_of(run), tolerance_chunks(run))
        if allowed is not None and dead <= allowed:
            return RunState.SUCCEEDED_WITH_FAILURES
    return ledger_final_state(reason, dead)


def display_state(run: RunRecord, paused: bool) -> str:
    """What ``fanout status`` calls the run's state: ``paused`` and
    ``cancelling`` are a running run's, the others the run's own."""
    if run.state == RunState.RUNNING:
        if is_cancelled(run):
            return "cancelling"
        if run.stop_reason:
            return "stopping"
        if paused:
            return "paused"
    return run.state.value
