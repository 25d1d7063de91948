"""The backend seam: the records the engine keeps and the three Protocols
(queue, object store, ledger) that every backend implements; crawl jobs' state
has a Protocol of its own (:mod:`fanout.backends.crawlstate`).

The engine (``fanout.runner``, ``fanout.coordinator``) speaks only to these
Protocols. Each method of :class:`Ledger` is one atomic step of the correctness
model (docs/architecture.md, "The ledger decides"): a conditional write on
DynamoDB, one transaction in SQLite, so a crash between two calls leaves the
ledger in a state the next call can reason about. The contract suite in
``tests/contract/`` runs against every backend.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, runtime_checkable

from fanout.backends.crawlstate import CrawlState

#: Where a crawl's per-domain counters are named in a run's stats,
#: ``domain/<domain>/<what>`` (``fanout.crawl.stats``): the ledgers may keep
#: them apart from the run's own (DynamoDB: an item per domain).
DOMAIN_STATS = "domain/"


class TaskState(enum.StrEnum):
    """Where one task (a chunk id at one ``seq``) stands."""

    QUEUED = "queued"  # registered, waiting for a worker (or for its back-off)
    RUNNING = "running"  # a worker holds the lease
    DONE = "done"  # committed (its output, if any, counts)
    DEAD = "dead"  # failed max_attempts times; kept for replay
    CANCELLED = "cancelled"  # skipped because its run was stopped by a runaway bound


FINISHED_TASK_STATES = frozenset({TaskState.DONE, TaskState.DEAD, TaskState.CANCELLED})


class RunState(enum.StrEnum):
    """The life of a run. ``finalizing`` is the short step that writes the manifest."""

    RUNNING = "running"
    FINALIZING = "finalizing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # drained, with dead chunks
    STOPPED = "stopped"  # drained after a runaway bound was hit
    # Run controls (fanout.controls): ended by `fanout cancel`; drained with
    # dead chunks within its tolerated failures.
    CANCELLED = "cancelled"
    SUCCEEDED_WITH_FAILURES = "succeeded_with_failures"


TERMINAL_RUN_STATES = frozenset(
    {
        RunState.SUCCEEDED,
        RunState.FAILED,
        RunState.STOPPED,
        RunState.CANCELLED,  # run controls (fanout.controls)
        RunState.SUCCEEDED_WITH_FAILURES,
    }
)


@dataclass(frozen=True, slots=True)
class TaskKey:
    """A task's identity: chunk ids are deterministic (``0``, ``0/3``, ``0/3/1``),
    a continuation bumps ``seq``."""

    run_id: str
    chunk_id: str
    seq: int = 0

    def __str__(self) -> str:
        return f"{self.run_id}:{self.chunk_id}#{self.seq}"


@dataclass(frozen=True, slots=True)
class NewTask:
    """A task to register: its key, the encoded message that runs it, and the
    task whose commit releases it (None for a run's root)."""

    chunk_id: str
    seq: int
    depth: int
    message: str
    parent_chunk: str | None = None
    parent_seq: int = 0
    #: Wall-clock time before which it may not be claimed (``ctx.spawn(delay=)``):
    #: the queue's own delay stops at 15 minutes on SQS, the ledger's does not.
    not_before: float = 0.0


@dataclass(frozen=True, slots=True)
class Output:
    """A committed Avro file."""

    key: str
    records: int
    bytes: int


class FailureKind(enum.StrEnum):
    """Why an attempt failed. The values are what the ledger stores (a history
    event's ``outcome``, the prefix of a task's ``error``) and what crosses
    process boundaries: a :class:`~enum.StrEnum`, so they are plain strings
    there and records written before this enum read back unchanged."""

    ERROR = "error"  # the job raised (retried)
    BAD_RECORD = "bad record"  # a record did not fit the schema (dead at once)
    PERMANENT = "permanent"  # fanout.PermanentError (dead at once)
    NO_PROGRESS = "no progress"  # resume_at with the cursor it was given (dead at once)
    EXITED = "exited"  # the job called sys.exit()
    OUT_OF_MEMORY = "out of memory"
    TIMED_OUT = "timed out"  # past the hard timeout: killed by the supervisor/watchdog
    CRASHED = "crashed"  # the process died (a signal, os._exit, a lease that expired)
    INTERRUPTED = "interrupted"  # the worker was stopped: handed back, no attempt spent
    INTERNAL = "internal error"  # fanout itself failed around the job's code


class TaskEvent(enum.StrEnum):
    """The ``outcome`` of a task's history events other than failures (those
    carry their :class:`FailureKind`). Stored as these strings."""

    COMMITTED = "committed"  # the attempt committed its output
    CONTINUED = "continued"  # committed a slice; a continuation (seq + 1) goes on
    DEAD = "dead"  # dead-lettered: no attempt left, or a permanent failure
    ORPHANED = "orphaned"  # cancelled: the parent attempt that registered it never counted
    CANCELLED = "cancelled"  # cancelled: its run was stopped by a runaway bound
    REVIVED = "revived"  # an orphan registered again by the attempt that counts
    REPLAYED = "replayed"  # a dead task put back in the queue (``fanout replay``)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an attempt failed, as kept in the ledger for ``fanout failed``."""

    kind: FailureKind
    error: str  # one line
    traceback: str = ""
    duration: float | None = None  # seconds the attempt ran, when known (its history keeps it)


def took_field(duration: float | None) -> dict[str, float]:
    """An attempt's run time as a ledger history event keeps it (``duration_s``,
    read by ``fanout logs`` and ``fanout cost``); nothing when unknown."""
    return {} if duration is None else {"duration_s": round(duration, 3)}


@dataclass(slots=True)
class TaskRecord:
    """A task as the ledger keeps it."""

    run_id: str
    chunk_id: str
    seq: int
    state: TaskState
    attempt: int  # claims so far (lifetime)
    attempt_floor: int  # attempts the budget does not count (before a replay, or interrupted)
    depth: int
    message: str
    lease_token: str | None = None
    lease_expires: float = 0.0
    not_before: float = 0.0  # back-off: no claim before this time
    output: Output | None = None
    error: str | None = None
    traceback: str | None = None
    history: list[dict[str, object]] = field(default_factory=list)
    updated_at: float = 0.0

    @property
    def key(self) -> TaskKey:
        return TaskKey(self.run_id, self.chunk_id, self.seq)


@dataclass(slots=True)
class RunRecord:
    """A run as the ledger keeps it, with its counters."""

    run_id: str
    job: str  # how to load the job again: "/abs/path.py" or "module:attr"
    job_name: str
    params: dict[str, object]
    settings: dict[str, object]
    state: RunState = RunState.RUNNING
    stop_reason: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    finished_at: float | None = None
    outstanding: int = 0  # registered tasks not yet finished (the fan-in counter)
    tasks_total: int = 0  # tasks registered (a continuation is a task)
    chunks_total: int = 0  # distinct chunk ids registered (what max_chunks bounds)
    tasks_done: int = 0
    tasks_dead: int = 0
    tasks_cancelled: int = 0
    records: int = 0
    bytes: int = 0
    retries: int = 0
    manifest_key: str | None = None
    stats: dict[str, int] = field(default_factory=dict)  # summed over committed tasks
    finalize_at: float | None = None  # when its finalizer began: who may finish it


class ClaimOutcome(enum.StrEnum):
    """What a claim found. Only ``claimed`` means: run the task now."""

    CLAIMED = "claimed"
    FINISHED = "finished"  # duplicate delivery of a finished task: acknowledge and skip
    BUSY = "busy"  # another worker's lease is live: retry after ``retry_after``
    WAIT = "wait"  # in back-off until ``retry_after``
    BURIED = "buried"  # an expired lease used the last attempt: now dead
    CANCELLED = "cancelled"  # its run was stopped: skipped
    MISSING = "missing"  # no such task (never registered): acknowledge and log


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to :meth:`Ledger.claim`."""

    outcome: ClaimOutcome
    task: TaskRecord | None = None
    attempt: int = 0  # the attempt number within the current budget (1-based)
    retry_after: float = 0.0  # seconds, for BUSY and WAIT
    takeover: FailureKind | None = None  # CRASHED when an expired lease was taken over
    drained: bool = False  # this step brought the run's outstanding counter to zero


@dataclass(frozen=True, slots=True)
class Settle:
    """The answer to a step that finishes a task."""

    ok: bool  # False: the lease was lost (another attempt owns the task now)
    drained: bool = False
    #: A commit that carried a ``stop_reason``: whether it recorded the run's
    #: stop (False where the run had been stopped already).
    stopped: bool = False


@dataclass(frozen=True, slots=True)
class Registration:
    """The answer to :meth:`Ledger.register`."""

    created: int  # tasks newly created (already-registered ones are not counted twice)
    over_limit: bool = False  # max_chunks would be exceeded: nothing was registered
    lease_lost: bool = False  # the registering attempt no longer holds its parent's lease


@runtime_checkable
class Ledger(Protocol):
    """Runs, tasks and their counters. Every method is atomic."""

    def create_run(self, run: RunRecord, root: NewTask) -> None:
        """Create ``run`` with its root task queued and ``outstanding == 1``.
        Raises ``KeyError`` if the run id exists."""

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run, or None."""

    def domain_stats(self, run_id: str) -> dict[str, int]:
        """A crawl run's per-domain counters (``domain/<domain>/<what>``) where
        the ledger keeps them apart from the run's own ``stats`` (DynamoDB: an
        item per domain); empty where ``stats`` holds them already."""

    def list_runs(
        self, limit: int = 50, states: Collection[RunState] | None = None
    ) -> list[RunRecord]:
        """Newest first (optionally only those in ``states``)."""

    def register(
        self,
        run_id: str,
        tasks: Sequence[NewTask],
        max_chunks: int,
        spawned_by: str | None = None,
    ) -> Registration:
        """Create the tasks that do not exist yet (conditional create), raising
        ``outstanding`` and ``tasks_total`` by the number created. If that would
        take ``chunks_total`` (tasks at seq 0) over ``max_chunks``, create nothing
        and say so.

        ``spawned_by`` is the lease token of the parent attempt registering them:
        a task runs only once its parent committed with that same token, and
        nothing is registered unless that attempt still holds the parent's lease
        (a late attempt must not take over children of the one that won). A task
        already registered by an earlier attempt of the parent that never
        committed is taken over (its message replaced) while still queued, or
        revived if it was cancelled as an orphan."""

    def claim(
        self, key: TaskKey, token: str, lease_seconds: float, max_attempts: int, now: float
    ) -> Claim:
        """Take the lease on a queued task, or on a running one whose lease expired
        (the next attempt; the expired one is recorded as timed out or crashed).
        A takeover beyond ``max_attempts`` buries the task instead. A task whose
        parent has not committed waits; one whose parent committed from another
        attempt (or died) is an orphan, and is cancelled."""

    def commit(
        self,
        key: TaskKey,
        token: str,
        output: Output | None,
        outcome: TaskEvent,
        now: float,
        stats: Mapping[str, int] | None = None,
        duration: float | None = None,
        stop_reason: str | None = None,
    ) -> Settle:
        """Mark the task done with its output, if ``token`` still holds the lease.
        ``outcome`` (``COMMITTED`` or ``CONTINUED``) goes into its history, with the
        attempt's ``duration`` (s) when given; ``stats`` (counters such as pages
        fetched) are added to the run's. A ``stop_reason`` (the job's
        ``ctx.stop_run``) stops the run in the same step, unless it was stopped
        already (:attr:`Settle.stopped` says which): a worker that dies right
        after the commit cannot lose the stop."""

    def retry(
        self, key: TaskKey, token: str, failure: Failure, not_before: float, now: float
    ) -> bool:
        """Release the lease after a failed attempt; no claim before ``not_before``."""

    def bury(self, key: TaskKey, token: str, failure: Failure, now: float) -> Settle:
        """Dead-letter the task (its message stays in the ledger for replay)."""

    def stop(self, run_id: str, reason: str) -> bool:
        """Note why the run stopped (a runaway bound, a cancel): queued tasks are
        cancelled when claimed. The first reason stays; returns whether this
        call recorded it (False: the run was stopping already, or is no longer
        running: a finalizing run has no chunk left to stop)."""

    def queued_children(self, key: TaskKey) -> list[TaskRecord]:
        """Tasks registered by ``key`` that are still queued (to re-send them when a
        duplicate delivery shows the parent's sends may have been lost)."""

    def get_task(self, key: TaskKey) -> TaskRecord | None:
        """The task, or None."""

    def list_tasks(
        self, run_id: str, states: Collection[TaskState] | None = None, *, history: bool = True
    ) -> list[TaskRecord]:
        """The run's tasks (optionally only those in ``states``), ordered by chunk id and seq.
        With ``history=False`` their ``history`` is left empty: reading and
        decoding every event of a large run is most of the cost of listing it,
        and a caller such as the finalizer needs none."""

    def reopen(
        self, run_id: str, chunk_ids: Collection[str] | None, now: float
    ) -> list[TaskRecord]:
        """Put dead tasks (all, or those of ``chunk_ids``) back in the queue state with a
        fresh attempt budget, and the run back to running, its stop (if any)
        cleared; with the stop, the tasks it cancelled come back too
        (:func:`~fanout.backends.rules.replay_revives`). Returns the reopened
        tasks (dead and revived)."""

    def begin_finalize(self, run_id: str, now: float, stale_after: float) -> bool:
        """Take the right to write the manifest: true once per drain (or again after
        ``stale_after`` seconds, if the finalizer died)."""

    def finish(
        self,
        run_id: str,
        state: RunState,
        manifest_key: str,
        now: float,
        began: float | None = None,
    ) -> bool:
        """Record the run's final state and manifest, unless the run was reopened
        meanwhile or (given ``began``, the ``now`` of the caller's
        :meth:`begin_finalize`) another finalizer took it over. Returns whether
        it recorded them."""

    def close(self) -> None:
        """Release connections."""


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One claim of a batch (:meth:`BatchLedger.claim_many`): the arguments of
    :meth:`Ledger.claim` but ``now``, which the batch shares."""

    key: TaskKey
    token: str
    lease_seconds: float
    max_attempts: int


@dataclass(frozen=True, slots=True)
class CommitRequest:
    """One commit of a batch (:meth:`BatchLedger.commit_many`): the arguments of
    :meth:`Ledger.commit`."""

    key: TaskKey
    token: str
    output: Output | None
    outcome: TaskEvent
    now: float
    stats: Mapping[str, int] | None = None
    duration: float | None = None
    stop_reason: str | None = None


@runtime_checkable
class BatchLedger(Protocol):
    """A ledger that can claim, and commit, several tasks in one atomic step.

    Optional: a worker batches quick chunks only when its ledger is one (the
    SQLite ledger, where every step is a write transaction under one lock, so
    ten claims in one transaction cost about what one does). Each item's
    answer is exactly what the single call would have answered, taken in
    order; the batch is all-or-nothing only in that it is one transaction.
    DynamoDB has no such step (a transaction there is all-or-nothing and
    costs twice the units), so the AWS ledger is not one."""

    def claim_many(self, requests: Sequence[ClaimRequest], now: float) -> list[Claim]:
        """:meth:`Ledger.claim` for each request, in order, in one step."""

    def commit_many(self, requests: Sequence[CommitRequest]) -> list[Settle]:
        """:meth:`Ledger.commit` for each request, in order, in one step."""

    def give_back_many(self, claims: Sequence[tuple[TaskKey, str]], now: float) -> list[bool]:
        """Undo claims whose attempts never started, each ``(key, token)``: the task
        is queued again as it was before the claim (its attempt count too), with
        nothing in its history, if ``token`` still holds its lease. Whether each
        was given back, in one step."""

    def held_back(self, run_ids: Collection[str]) -> set[str]:
        """The runs of ``run_ids`` in which no attempt may start now: stopped
        (cancelled, over their tolerance, a bound, ``ctx.stop_run``) or paused.
        A batch asks before each start past its first: an attempt claimed
        before a stop or a pause is given back, not started after it."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One received message."""

    body: str
    receipt: str
    receive_count: int
    message_id: str = ""  # the queue's id for it, for logs and dead letters
    #: Who sent it, where the queue says (SQS's ``SenderId``); None elsewhere.
    sender: str | None = None
    #: When the queue took it (s since the epoch), where it says: its dead
    #: letter is named by it and the id, so a redelivery's overwrites it.
    sent_at: float | None = None
    #: Its deliveries so far that failed outside the job's code and were handed
    #: back by :meth:`Queue.release_failed`: what ``fanout.failures.POISON_TRIES``
    #: counts. Not ``receive_count``, which every harmless hand-back (a busy
    #: task, a parent still running, a capped run) also raises.
    failures: int = 0


def sqs_sent_at(attributes: Mapping[str, Any]) -> float | None:
    """SQS's ``SentTimestamp`` (milliseconds since the epoch, as text) in
    seconds, from a received message's or a Lambda event record's attributes;
    None if it is missing, not a number, or not a time (a dead letter is named
    by it: past the year 9999 the name could not be made)."""
    try:
        sent = float(attributes["SentTimestamp"]) / 1000
    except (KeyError, TypeError, ValueError):
        return None
    return sent if 0 <= sent < _YEAR_10000 else None


#: 10000-01-01T00:00:00Z in seconds since the epoch.
_YEAR_10000 = 253_402_300_800.0

#: The SQS message attribute counting a message's failed deliveries
#: (:attr:`Delivery.failures`): SQS keeps no count but its receives, so the
#: AWS queue's ``release_failed`` hands a failed message back as a copy that
#: carries the count.
FAILURES = "fanout-failures"


def sqs_count(attributes: Any, name: str = FAILURES) -> int:
    """The count the message attribute ``name`` holds (:data:`FAILURES` by
    default), as SQS returns it (``StringValue``) or a Lambda event record has
    it (``stringValue``); 0 where it is missing or not a count."""
    try:
        value = attributes[name]
        return max(0, int(value.get("StringValue", value.get("stringValue"))))
    except (KeyError, TypeError, ValueError, AttributeError):
        return 0


@runtime_checkable
class Queue(Protocol):
    """At-least-once delivery with visibility timeouts, like SQS."""

    max_message_bytes: int

    def send(self, bodies: Sequence[str], delay: float = 0.0) -> None:
        """Enqueue messages, visible after ``delay`` seconds."""

    def receive(self, max_messages: int, visibility: float) -> list[Delivery]:
        """Up to ``max_messages`` visible messages, hidden for ``visibility`` seconds."""

    def ack(self, receipt: str) -> None:
        """Delete a received message. A queue that can tell a stale receipt
        (redelivered since) ignores it; SQS may still honour one. Either is safe:
        the ledger, not the queue, decides what runs and what is finished."""

    def release(self, receipt: str, delay: float) -> None:
        """Make a received message visible again after ``delay`` seconds (rounded
        up to the queue's unit: whole seconds on SQS)."""

    def release_failed(self, delivery: Delivery, delay: float) -> bool:
        """Hand back a delivery that failed outside the job's code, visible
        again after ``delay`` seconds, its next delivery's ``failures`` one
        higher. The message may come back as a copy (SQS: a new message id,
        sent by the caller; so not for a message whose sender is checked):
        then True, and this delivery is to be acknowledged, not released
        (deleted already, unless that failed); False if released in place."""

    def pending(self) -> int:
        """Messages not yet deleted (visible, delayed or in flight)."""

    def redrive(self, limit: int = 1000) -> int:
        """Move up to ``limit`` messages the queue service dead-lettered (received
        too often without an acknowledgement) back to the queue; returns how many.
        Safe: the ledger decides what a redelivered message does. 0 for a queue
        that never dead-letters on its own."""

    def close(self) -> None:
        """Release connections."""


@runtime_checkable
class Store(Protocol):
    """An object store keyed like S3 (``runs/<run_id>/...``)."""

    def put(self, key: str, data: bytes | BinaryIO, *, if_absent: bool = False) -> bool:
        """Write an object atomically (readers never see half of it). With
        ``if_absent``, write only if the key does not exist; return whether it wrote."""

    def get(self, key: str) -> bytes:
        """The object's bytes; ``KeyError`` if missing."""

    def open(self, key: str) -> BinaryIO:
        """A binary file object to read; ``KeyError`` if missing."""

    def exists(self, key: str) -> bool:
        """Whether the key exists."""

    def list(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix``, sorted."""

    def delete(self, key: str) -> None:
        """Remove the key if present."""

    def url(self, key: str) -> str:
        """Where the object is, for people (a path or an s3:// URL)."""

    def close(self) -> None:
        """Release resources."""


@dataclass
class Backend:
    """The seams of one backend, opened together: the three every job uses, and
    the crawl state (:class:`~fanout.backends.crawlstate.CrawlState`) that
    crawl jobs use beside the ledger (None: this backend has none)."""

    name: str
    queue: Queue
    store: Store
    ledger: Ledger
    crawl: CrawlState | None = None

    def close(self) -> None:
        self.queue.close()
        self.ledger.close()
        self.store.close()
