"""The ledger's rules, written once: pure functions over records.

Every ledger (SQLite, DynamoDB) reads a task's records, asks these functions
what the step may do, and applies the answer with a conditional write (an
``UPDATE ... WHERE``, a DynamoDB condition expression) that fails if the
records changed since they were read. The decisions themselves live here, so
the two ledgers cannot drift apart, and each is tested on its own
(``tests/test_ledger_rules.py``):

- :func:`rule_claim`: may this attempt claim the task (and if not, why not,
  and how long to wait);
- :func:`lease_live`, :func:`attempt_in_budget`, :func:`budget_spent`: the
  lease and the attempt budget;
- :func:`after_failure`: what a failed attempt becomes (retried now, retried
  after a back-off, dead);
- :func:`may_have_orphans`: whether a commit must look for children an
  earlier attempt registered;
- :func:`final_state`: the state of a drained run;
- :func:`may_reopen`: whether a replay may reopen the run now, and
  :func:`replay_revives`: which of its tasks it puts back in the queue.

The correctness model they serve is in ``docs/architecture.md``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fanout.backends.base import (
    FINISHED_TASK_STATES,
    Claim,
    ClaimOutcome,
    Failure,
    FailureKind,
    RunState,
    TaskEvent,
    TaskRecord,
    TaskState,
)

#: The shortest wait a claim hands back (s): a message released for less would
#: come straight back while nothing has changed.
MIN_RETRY_AFTER = 0.5
#: The longest a claim waits for a parent to commit before asking again (s): the
#: parent's lease may be long (a chunk timeout), but a parent that commits
#: early should not leave its children waiting for the whole lease.
MAX_PARENT_WAIT = 30.0
#: The wait handed back when a claim lost every optimistic round to other
#: writers (s; DynamoDB): the message comes back once the contention passed.
CONTENDED_RETRY_AFTER = 1.0

#: Failure kinds that retrying cannot fix: dead at once, whatever the budget.
PERMANENT_FAILURES = frozenset(
    {FailureKind.BAD_RECORD, FailureKind.PERMANENT, FailureKind.NO_PROGRESS}
)

#: Recorded when an expired lease is taken over on the last attempt: its
#: holder never reported back, so it died mid-attempt.
CRASHED_LAST = Failure(FailureKind.CRASHED, "the worker died during the last attempt")


@dataclass(frozen=True, slots=True)
class ParentFacts:
    """What a claim needs to know of the task that registered the one claimed."""

    state: TaskState
    committed_by: str | None  # the lease token of the attempt that committed it
    lease_expires: float


@dataclass(frozen=True, slots=True)
class ClaimFacts:
    """What a ledger read before deciding a claim.

    ``parent`` is None for a run's root, and for a task whose parent record is
    gone (nothing to wait for, nothing to be orphaned by); ``spawned_by`` is
    the lease token of the parent attempt that registered the task.
    """

    task: TaskRecord
    spawned_by: str | None = None
    parent: ParentFacts | None = None
    run_stopped: bool = False


class ClaimVerdict(enum.StrEnum):
    """What a claim does, as :func:`rule_claim` decides it."""

    FINISHED = "finished"  # already finished: nothing to do
    BUSY = "busy"  # another attempt's lease is live
    WAIT = "wait"  # its parent has not committed, or it is in back-off
    ORPHANED = "orphaned"  # cancel it: the parent attempt that registered it never counted
    STOPPED = "stopped"  # cancel it: its run was stopped
    CLAIM = "claim"  # lease it for a new attempt
    TAKE_OVER = "take over"  # the holder's lease expired: record it crashed, lease it again
    BURY = "bury"  # the holder's lease expired on its last attempt: dead


@dataclass(frozen=True, slots=True)
class ClaimRuling:
    """A claim's verdict, with the seconds to wait for BUSY and WAIT."""

    verdict: ClaimVerdict
    retry_after: float = 0.0


def claim_without_write(ruling: ClaimRuling, task: TaskRecord) -> Claim | None:
    """The answer to a claim whose verdict needs no write (the task finished, or
    its lease or its parent says wait); None when the ledger must write."""
    if ruling.verdict is ClaimVerdict.FINISHED:
        return Claim(ClaimOutcome.FINISHED, task=task)
    if ruling.verdict is ClaimVerdict.BUSY:
        return Claim(ClaimOutcome.BUSY, retry_after=ruling.retry_after)
    if ruling.verdict is ClaimVerdict.WAIT:
        return Claim(ClaimOutcome.WAIT, retry_after=ruling.retry_after)
    return None


def lease_live(task: TaskRecord, now: float) -> bool:
    """Whether an attempt holds the task's lease at ``now``."""
    return task.state == TaskState.RUNNING and task.lease_expires > now


def attempt_in_budget(task: TaskRecord) -> int:
    """The task's attempts counted against its budget (a replay starts a new budget)."""
    return task.attempt - task.attempt_floor


def budget_spent(task: TaskRecord, max_attempts: int) -> bool:
    """Whether the task used every attempt its budget allows."""
    return attempt_in_budget(task) >= max_attempts


def parent_wait(parent: ParentFacts, now: float) -> float:
    """How long a child waits for its parent to commit: until the parent's
    lease runs out (it commits by then, or is taken over), within bounds."""
    return min(max(MIN_RETRY_AFTER, parent.lease_expires - now), MAX_PARENT_WAIT)


def rule_claim(facts: ClaimFacts, max_attempts: int, now: float) -> ClaimRuling:
    """May a new attempt claim ``facts.task`` at ``now``? The order matters: a
    finished task is never touched; a live lease is never broken; a child waits
    for its parent before anything else is decided about it."""
    task = facts.task
    if task.state in FINISHED_TASK_STATES:
        return ClaimRuling(ClaimVerdict.FINISHED)
    if lease_live(task, now):
        return ClaimRuling(ClaimVerdict.BUSY, task.lease_expires - now)
    parent = facts.parent
    if parent is not None:
        if parent.state not in FINISHED_TASK_STATES:
            # Registered by a parent attempt that has not committed (yet).
            return ClaimRuling(ClaimVerdict.WAIT, parent_wait(parent, now))
        if parent.committed_by != facts.spawned_by:
            # Its parent committed from another attempt, or died: the attempt
            # that registered this task never counted.
            return ClaimRuling(ClaimVerdict.ORPHANED)
    if facts.run_stopped:
        return ClaimRuling(ClaimVerdict.STOPPED)
    if task.state == TaskState.QUEUED and task.not_before > now:
        return ClaimRuling(ClaimVerdict.WAIT, task.not_before - now)
    if task.state == TaskState.RUNNING:
        # The lease expired with no word from its holder: it died (killed,
        # out of memory, machine lost) mid-attempt.
        if budget_spent(task, max_attempts):
            return ClaimRuling(ClaimVerdict.BURY)
        return ClaimRuling(ClaimVerdict.TAKE_OVER)
    return ClaimRuling(ClaimVerdict.CLAIM)


class FailureVerdict(enum.StrEnum):
    """What a failed attempt becomes."""

    RETRY_NOW = "retry now"  # handed back at once, the attempt not held against it
    RETRY = "retry"  # queued again after a back-off
    DEAD = "dead"  # dead-lettered


def after_failure(kind: FailureKind, attempt: int, max_attempts: int) -> FailureVerdict:
    """What attempt number ``attempt`` (within the budget) failing with ``kind`` becomes.

    An interrupted attempt (the user stopped the worker) goes back at once,
    even on the last attempt: stopping a worker must not kill chunks. A
    permanent failure is dead at once; any other is retried until the budget
    is spent."""
    if kind == FailureKind.INTERRUPTED:
        return FailureVerdict.RETRY_NOW
    if kind in PERMANENT_FAILURES or attempt >= max_attempts:
        return FailureVerdict.DEAD
    return FailureVerdict.RETRY


def spends_attempt(kind: FailureKind) -> bool:
    """Whether an attempt that failed with ``kind`` counts against the task's
    budget and the run's retries: not one the user interrupted (Ctrl-C, a
    stopped worker), which the ledger hands back as if never made."""
    return kind != FailureKind.INTERRUPTED


def may_have_orphans(attempts: int) -> bool:
    """Whether a task claimed ``attempts`` times in its life may have children
    an earlier attempt registered and the committing one did not (orphans to
    cancel): only if there was an earlier attempt."""
    return attempts > 1


def history_event(
    outcome: TaskEvent | FailureKind, now: float, attempt: int | None, **extra: object
) -> dict[str, object]:
    """One entry of a task's history, as both ledgers store it: its outcome,
    the time, what else is known, and the attempt (within the budget) it is
    about (None: the ledger stamps it in the write itself)."""
    event: dict[str, object] = {"outcome": str(outcome), "at": round(now, 3), **extra}
    if attempt is not None:
        event["attempt"] = attempt
    return event


def final_state(stop_reason: str | None, dead_tasks: int) -> RunState:
    """The state of a drained run: stopped by a runaway bound, failed with dead
    tasks, or succeeded."""
    if stop_reason:
        return RunState.STOPPED
    if dead_tasks:
        return RunState.FAILED
    return RunState.SUCCEEDED


def may_reopen(state: RunState) -> bool:
    """Whether a replay may reopen a run in ``state``: not while a finalizer
    writes its manifest. The finalizer listed the done tasks already; a
    replayed chunk committing meanwhile would drain the run again and start a
    second finalizer, and the manifest written last (maybe the first one's,
    without the replayed records) would be the run's. A dead finalizer's run
    is finalized by the recovery sweep, after which the replay goes through."""
    return state != RunState.FINALIZING


#: ``stop_reason`` of a run its job ended (``ctx.stop_run``; a spider's
#: ``CloseSpider``) starts so: a deliberate end, not a runaway bound.
JOB_STOP_PREFIX = "stopped by the job: "


#: A ``cancelled`` history event's mark that its run's stop was the job's own
#: (:data:`JOB_STOP_PREFIX`): a replay leaves such a task cancelled.
BY_JOB = "by_job"


def cancel_event(stop_reason: str | None, now: float, attempt: int | None) -> dict[str, object]:
    """The history event of a task its run's stop (``stop_reason``) cancelled:
    marked :data:`BY_JOB` if the job itself stopped the run."""
    by_job = bool(stop_reason) and str(stop_reason).startswith(JOB_STOP_PREFIX)
    extra: dict[str, object] = {BY_JOB: True} if by_job else {}
    return history_event(TaskEvent.CANCELLED, now, attempt, **extra)


def replay_revives(stop_reason: str | None, task: TaskRecord) -> bool:
    """Whether a replay of a run whose stop is ``stop_reason`` now (None: not
    stopped) puts ``task`` back in the queue: a dead task always; a task a
    stop cancelled too, unless the job itself stopped the run (it ran out of
    work: the event says so, :func:`cancel_event`; and a job's stop still in
    place says so for events written before they did). A replay clears the
    stop, so the run goes on, and a chunk the stop had cancelled would
    otherwise never run while the run ended ``succeeded`` (after a tolerance
    stop, most of the run). An orphan stays cancelled: the attempt that
    registered it never counted, and the one that did registered its own."""
    if task.state == TaskState.DEAD:
        return True
    if task.state != TaskState.CANCELLED or not task.history:
        return False
    if stop_reason is not None and stop_reason.startswith(JOB_STOP_PREFIX):
        return False
    last = task.history[-1]
    return last.get("outcome") == TaskEvent.CANCELLED and not last.get(BY_JOB)


def replayable(tasks_dead: int, tasks_cancelled: int) -> bool:
    """Whether a finished run may have chunks for a replay to run (dead, or
    cancelled by its stop): its offloaded payloads are kept for them."""
    return tasks_dead > 0 or tasks_cancelled > 0


def was_cancelled(task: TaskRecord) -> bool:
    """Whether a task a replay reopened had been cancelled (by its run's
    stop), not dead: the event before its ``replayed`` one says."""
    return len(task.history) > 1 and task.history[-2].get("outcome") == TaskEvent.CANCELLED


def finalizing_refusal(run_id: str) -> str:
    """The message a replay of a finalizing run is refused with (both ledgers)."""
    return f"run {run_id} is finalizing (writing its manifest): replay it once it is done"


def is_drained(outstanding: int) -> bool:
    """Whether a run with ``outstanding`` unfinished tasks is drained (ready to finalize)."""
    return outstanding == 0


def chunk_order(task: TaskRecord) -> tuple[tuple[int, ...], int]:
    """The order in which a run's tasks are listed: by chunk id, numerically
    (``0/2`` before ``0/10``), then by seq."""
    return tuple(int(p) for p in task.chunk_id.split("/")), task.seq
