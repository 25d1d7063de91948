"""What handling one delivery came to: :meth:`fanout.dispatch.Dispatcher.handle`'s
answer, which the local worker logs and counts and the Lambda handler turns
into ``batchItemFailures``.

A ``StrEnum``: each member is the word logs and tests have always seen, so
nothing that compares or prints an outcome changes. :data:`RELEASED` are the
outcomes that leave the message on the queue (not acknowledged): it comes back
when its visibility runs out.
"""

from __future__ import annotations

import enum


class Handled(enum.StrEnum):
    """The outcome of one delivery."""

    # A chunk, run or not.
    COMMITTED = "committed"  # its output committed; its children sent
    CONTINUED = "continued"  # a slice committed; its continuation sent
    RETRY = "retry"  # failed, handed back for another attempt after a back-off
    DEAD = "dead"  # failed its last attempt (or permanently): dead-lettered
    LEASE_LOST = "lease lost"  # another attempt took the task over meanwhile
    UNKNOWN_RUN = "unknown run"  # the run is not in the ledger
    # What the chunk's claim found (ClaimOutcome's words).
    FINISHED = "finished"  # a redelivery of a finished task
    BUSY = "busy"  # another attempt's lease is live
    WAIT = "wait"  # in back-off, or waiting for its parent
    BURIED = "buried"  # its last attempt's worker died: now dead
    CANCELLED = "cancelled"  # its run was stopped
    MISSING = "missing"  # never registered
    # Run controls.
    PAUSED = "paused"  # its run is paused: dropped, resent on resume
    CAPPED = "capped"  # its run is at max_concurrency: handed back for later
    # A batch's claim given back unstarted (fanout.batches): as if never claimed.
    HANDED_BACK = "handed back"
    # A message that is not a chunk to run.
    INVALID = "invalid"  # not a fanout message: kept as a dead letter
    DEAD_LETTERED = "dead-lettered"  # failed every delivery: kept as a dead letter
    REQUEUED = "requeued"  # failed outside the job's code: handed back
    # Failed outside the job's code: a copy sent in its place (SQS), this
    # delivery settled (the Lambda event source deletes it, if we could not).
    COPIED = "requeued as a copy"
    REFUSED = "refused"  # a tick or sweep from a sender not obeyed
    SWEPT = "swept"  # a recovery sweep ran
    # A schedule's tick.
    UNKNOWN_SCHEDULE = "unknown schedule"
    SCHEDULE_FIRED = "schedule fired"
    SCHEDULE_SKIPPED = "schedule skipped"
    SCHEDULE_ALREADY_FIRED = "schedule already fired"
    SCHEDULE_CLAIMED_ELSEWHERE = "schedule claimed elsewhere"
    # Claimed moments ago and not settled: handed back to see whether it was.
    SCHEDULE_IN_HAND = "schedule in hand elsewhere"
    SCHEDULE_FAILED = "schedule failed"


#: Outcomes that leave the message on the queue, to be delivered again.
RELEASED = frozenset(
    {
        Handled.BUSY,
        Handled.WAIT,
        Handled.RETRY,
        Handled.LEASE_LOST,
        Handled.REQUEUED,
        Handled.CAPPED,
        Handled.HANDED_BACK,
        Handled.SCHEDULE_IN_HAND,
    }
)
