"""How attempts and messages fail: the attempt in hand, the cause of a failure,
and the dead letters of messages that could not be handled.

Two kinds of dead letter exist. A *task* that failed ``max_attempts`` times is
kept by the ledger (``fanout failed RUN``). A *message* that never became a
task (garbage, forged, or one that broke the engine on every delivery) has no
task to keep it, so it is written to the store under ``dead-letters/`` with the
reason (``fanout dead-letters``). A message is dead-lettered after
:data:`POISON_TRIES` deliveries that failed for a reason outside the job's
code, so no message can crash-loop a worker, locally or on Lambda, whatever
SQS's own redrive policy says.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import itertools
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
import types
from dataclasses import dataclass, replace
from typing import Any

from fanout.backends import keys
from fanout.backends.base import Delivery, Failure, FailureKind, Ledger, Queue, Store, TaskKey
from fanout.errors import PermanentError, RecordError
from fanout.events import EventSink, emit
from fanout.json_fields import storable
from fanout.outcomes import Handled

log = logging.getLogger("fanout.runner")

#: Deliveries of one message that failed outside the job's code before it is
#: dead-lettered (SQS's redrive policy in the template allows 50).
POISON_TRIES = 5
#: The most of a message body a dead letter keeps (characters).
KEEP_BODY = 16 * 1024
#: The most of a failure's error and traceback the ledger records (UTF-8
#: bytes). A task's DynamoDB item holds its message (up to 256 KiB), the last
#: traceback, and the error once more per attempt in its history (up to 100
#: attempts), all under DynamoDB's 400 KB item limit.
MAX_ERROR_BYTES = 1000
MAX_TRACEBACK_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Attempt:
    """The attempt in progress: what a supervisor needs to fail one it killed."""

    key: TaskKey
    token: str
    attempt: int
    receipt: str
    deadline: float  # wall clock: the hard timeout
    started: float = 0.0  # wall clock: the claim (0: unknown), for the attempt's duration

    def to_json(self) -> str:
        return json.dumps(
            [
                self.key.run_id,
                self.key.chunk_id,
                self.key.seq,
                self.token,
                self.attempt,
                self.receipt,
                self.deadline,
                self.started,
            ]
        )

    @classmethod
    def from_json(cls, text: str) -> Attempt:
        run_id, chunk_id, seq, token, attempt, receipt, deadline, *rest = json.loads(text)
        started = float(rest[0]) if rest else 0.0
        return cls(TaskKey(run_id, chunk_id, seq), token, attempt, receipt, deadline, started)

    def took(self, now: float) -> float | None:
        """Seconds since the claim, if known."""
        return max(0.0, now - self.started) if self.started else None


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``, its control characters escaped."""
    try:
        message = str(exc)
    except Exception as bad:  # a job's exception whose __str__ raises
        # Not the job's exception's failure as fanout's own internal error.
        message = f"(its message could not be made: {type(bad).__name__} in __str__)"
    text = message.splitlines()[0] if message else ""
    # Shown on terminals (logs, `fanout failed`): an escape sequence from a
    # crawled page or a job's message must not recolour, retitle or clear one.
    text = _CONTROL.sub(_escaped, text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: Control characters but the tab (C0, DEL and C1), and the bidirectional
#: overrides and isolates, which can reverse what a line shows.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def clip(text: str, limit: int) -> str:
    """``text`` if it is at most ``limit`` UTF-8 bytes, else its head and tail
    with a note of how much was left out between them, within ``limit``."""
    if len(text) * 4 <= limit or len(text.encode("utf-8", "replace")) <= limit:
        return text
    half = max(0, (limit - 60) // 2)  # room for the note
    head, tail = _fit(text[:half], half, keep_end=False), _fit(text[-half:], half, keep_end=True)
    left_out = len(text) - len(head) - len(tail)
    return f"{head} [... {left_out:,} characters clipped ...] {tail}"


def _fit(text: str, limit: int, keep_end: bool) -> str:
    """The start (or end, ``keep_end``) of ``text`` within ``limit`` UTF-8 bytes."""
    while len(text.encode("utf-8", "replace")) > limit:
        keep = len(text) * 3 // 4
        text = text[len(text) - keep :] if keep_end else text[:keep]
    return text


def clip_failure(failure: Failure) -> Failure:
    """``failure`` with its error and traceback clipped to what the ledger
    records (:data:`MAX_ERROR_BYTES`, :data:`MAX_TRACEBACK_BYTES`), head and
    tail kept, and made text a ledger takes (:func:`storable`). A huge
    exception text (a whole response body in the message) made the ledger's
    write of the failure fail (DynamoDB's 400 KB item limit), so the attempt
    was never recorded as failed."""
    error = clip(storable(failure.error), MAX_ERROR_BYTES)
    tb = clip(storable(failure.traceback), MAX_TRACEBACK_BYTES)
    if error is failure.error and tb is failure.traceback:
        return failure
    return replace(failure, error=error, traceback=tb)


#: A traceback deeper than this many frames is told by its first and last halves.
TRACEBACK_FRAMES = 100


#: How ``traceback`` joins a chain of exceptions, innermost first.
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def format_traceback(exc: BaseException) -> str:
    """``traceback.format_exception(exc)``, chain included, but each deep stack
    told by its first and last :data:`TRACEBACK_FRAMES` / 2 frames: a runaway
    recursion under a raised recursion limit (a million frames) took 23 s to
    format, past the chunk's hard timeout, and the attempt was recorded as
    timed out, its cause lost; as long when the job raised another exception
    from it. Never raises: an exception whose traceback cannot be walked (a
    ``__traceback__`` that raises) killed the worker that formatted it."""
    try:
        return _format_chain(exc)
    except Exception as problem:
        return f"{_type_name(exc)} (its traceback could not be formatted: {_type_name(problem)})\n"


def _type_name(exc: BaseException) -> str:
    return type(exc).__qualname__


def _format_chain(exc: BaseException) -> str:
    links, joins, seen = [exc], [], {id(exc)}
    while len(links) < 10:
        last = links[-1]
        if last.__cause__ is not None:
            nxt, join = last.__cause__, _CAUSE
        elif last.__context__ is not None and not last.__suppress_context__:
            nxt, join = last.__context__, _CONTEXT
        else:
            break
        if id(nxt) in seen:
            break
        seen.add(id(nxt))
        links.append(nxt)
        joins.append(join)
    out = []
    for i in range(len(links) - 1, -1, -1):  # the innermost first, as Python prints
        out.append(_format_one(links[i]))
        if i:
            out.append(joins[i - 1])
    return "".join(out)


def _format_one(exc: BaseException) -> str:
    """One exception of a chain, its stack bounded (see :func:`format_traceback`).
    Its links are taken off while it is formatted: ``traceback`` extracts every
    frame of a cause even when told not to print it (``chain=False``)."""
    cause, context, suppress = exc.__cause__, exc.__context__, exc.__suppress_context__
    exc.__cause__ = exc.__context__ = None
    try:
        return _format_alone(exc)
    finally:
        exc.__cause__, exc.__context__ = cause, context
        exc.__suppress_context__ = suppress


def _format_alone(exc: BaseException) -> str:
    depth, tb = 0, exc.__traceback__
    while tb is not None and depth <= TRACEBACK_FRAMES:
        depth, tb = depth + 1, tb.tb_next
    if depth <= TRACEBACK_FRAMES:
        return "".join(traceback.format_exception(exc))
    half = TRACEBACK_FRAMES // 2
    first = itertools.islice(traceback.walk_tb(exc.__traceback__), half)
    last: collections.deque[types.TracebackType] = collections.deque(maxlen=half)
    total, tb = 0, exc.__traceback__
    while tb is not None:  # following the links is cheap; formatting each frame is not
        last.append(tb)
        total, tb = total + 1, tb.tb_next
    frames = traceback.StackSummary.extract
    return "".join(
        [
            "Traceback (most recent call last):\n",
            *frames(first).format(),
            f"  ... {total - 2 * half:,} frames not shown ...\n",
            *frames((t.tb_frame, t.tb_lineno) for t in last).format(),
            *traceback.format_exception_only(exc),
        ]
    )


def failure_of(exc: BaseException) -> Failure:
    """The recorded cause of an exception raised by the job's code (call inside
    the ``except`` block: the traceback is the one being handled)."""
    tb = format_traceback(exc)
    if isinstance(exc, RecordError):
        return Failure(FailureKind.BAD_RECORD, describe(exc), tb)
    if isinstance(exc, PermanentError):
        return Failure(FailureKind.PERMANENT, describe(exc), tb)
    if isinstance(exc, SystemExit):
        return Failure(FailureKind.EXITED, f"the job called sys.exit({exc.code!r})", tb)
    if isinstance(exc, MemoryError):
        return Failure(FailureKind.OUT_OF_MEMORY, describe(exc), tb)
    if isinstance(exc, KeyboardInterrupt):
        return Failure(FailureKind.ERROR, "KeyboardInterrupt raised by the job", tb)
    return Failure(FailureKind.ERROR, describe(exc), tb)


def exit_cause(exitcode: int | None) -> str:
    """Why a worker process ended, from its exit code, for ``fanout failed``."""
    if exitcode is None:
        return "worker process vanished"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"worker process killed by {name}"
    return f"worker process exited with code {exitcode} (os._exit, or a crash in native code)"


def poison_delay(deliveries: int) -> float:
    """Seconds before a message that failed ``deliveries`` times is tried again:
    short at first (a passing outage), doubling, at most a minute."""
    return float(min(60.0, 0.5 * 2 ** max(0, deliveries - 1)))


def message_id(delivery: Delivery) -> str:
    """The delivery's message id, or a digest of its body when the queue gave none."""
    if delivery.message_id:
        return delivery.message_id
    body = delivery.body if isinstance(delivery.body, bytes) else str(delivery.body).encode()
    return "sha1-" + hashlib.sha1(body).hexdigest()[:16]


def keep_message(
    store: Store, delivery: Delivery, reason: str, tb: str = "", failures: int = 0
) -> str:
    """Write the dead letter of a message that will not be handled; returns its
    key. ``failures``: its failed deliveries, this one included (0: not
    counted, as for a message dropped at once, not valid)."""
    body: Any = delivery.body
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    now = time.time()
    mid = message_id(delivery)
    letter = {
        "message_id": mid,
        "at": round(now, 3),
        "reason": reason,
        "deliveries": delivery.receive_count,
        "failures": failures,
        "body": text[:KEEP_BODY],
        "body_chars": len(text),
        "traceback": tb,
    }
    # Named by when the message was sent, where the queue says, and its id:
    # a message dead-lettered again (its worker killed before the ack)
    # overwrites its first letter rather than adding a second.
    sent = delivery.sent_at if delivery.sent_at is not None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(sent))
    key = keys.dead_message_key(stamp, _key_safe(mid))
    store.put(key, json.dumps(letter, indent=1).encode())
    return key


def _key_safe(message_id: str) -> str:
    """``message_id`` as a store key's part: letters, digits, ``-`` and ``_``,
    with a digest of the id where it had to be changed, so two ids never name
    one letter (``a.b`` and ``a_b``, or two long ids alike in their first 80)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in message_id)
    if safe == message_id and len(safe) <= 80:
        return safe
    digest = hashlib.sha1(message_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{safe[:80]}-{digest}"


def keep_missing(store: Store, delivery: Delivery, key: TaskKey) -> None:
    """Keep the dead letter of a message naming a task its run never
    registered (forged, or a bug's: the engine registers a task before it sends
    its message), as an unknown run's is kept; the caller acknowledges it.
    Only logged before, it left no trace ``fanout dead-letters`` could show."""
    at = keep_message(store, delivery, f"run {key.run_id} has no task {key.chunk_id} seq {key.seq}")
    log.error("dropping a message for unregistered task %s (kept at %s)", key, at)


def drop_invalid(queue: Queue, store: Store, delivery: Delivery, reason: str) -> Handled:
    """Drop a message that is not a valid fanout message: keep it as a dead letter
    (``fanout dead-letters``) with the reason, and acknowledge it. Returns the
    outcome, ``"invalid"``."""
    key = keep_message(store, delivery, reason)
    log.error("dropping message %s: %s (kept at %s)", message_id(delivery), reason, key)
    queue.ack(delivery.receipt)
    return Handled.INVALID


def keep_dead_task(
    ledger: Ledger, store: Store, events: EventSink, key: TaskKey, error: str, tb: str
) -> str:
    """Keep a dead task's message, error and history in the store beside its
    run, and announce it (``chunk.dead``); returns the dead letter's key."""
    task = ledger.get_task(key)
    letter = {
        "run_id": key.run_id,
        "chunk_id": key.chunk_id,
        "seq": key.seq,
        "error": error,
        "traceback": tb,
        "message": json.loads(task.message) if task else None,
        "history": task.history if task else [],
    }
    dkey = keys.dead_task_key(key.run_id, key.chunk_id, key.seq)
    store.put(dkey, json.dumps(letter, indent=2).encode())
    emit(
        events,
        "chunk.dead",
        key.run_id,
        chunk_id=key.chunk_id,
        seq=key.seq,
        error=error,
        dead_letter=dkey,
    )
    return dkey


def list_messages(store: Store, limit: int = 100) -> list[dict[str, Any]]:
    """The ``limit`` message dead letters of the newest messages (by when they
    were sent: a letter is named so), oldest first, each with its ``key``."""
    found = list(store.list(keys.DEAD_LETTERS))[-limit:]
    letters = []
    for key in found:
        try:
            letter = json.loads(store.get(key))
        except (KeyError, ValueError):
            continue  # removed meanwhile, or not ours
        if isinstance(letter, dict):
            letter["key"] = key
            letters.append(letter)
    return letters


def settle_poison(
    queue: Queue,
    store: Store,
    delivery: Delivery,
    reason: str,
    tb: str,
    *,
    sender_checked: bool = False,
) -> Handled:
    """A delivery that failed outside the job's code with no attempt in hand:
    hand it back to be tried again shortly, or, on its :data:`POISON_TRIES`-th
    failure, keep it as a dead letter and acknowledge it. Never raises.

    Failures are counted, not receives (``Delivery.failures``, raised by the
    queue's ``release_failed``): a chunk message handed back harmlessly (its
    task busy, its parent still running, its run capped) is received again
    and again, and counting those would dead-letter it at its first passing
    error. A message whose sender is checked (``sender_checked``: a schedule's
    tick, a sweep) cannot be handed back as a copy on SQS, which would be
    sent by us; its receives are counted, as ``fanout.schedules.fire`` does."""
    mid = message_id(delivery)
    tries = delivery.receive_count if sender_checked else delivery.failures + 1
    try:
        if tries >= POISON_TRIES:
            # A tick's or sweep's receives are no count of its failures.
            key = keep_message(store, delivery, reason, tb, 0 if sender_checked else tries)
            log.error(
                "message %s dead-lettered after %d failed deliveries: %s (kept at %s)",
                mid,
                tries,
                reason,
                key,
            )
            queue.ack(delivery.receipt)
            return Handled.DEAD_LETTERED
        delay = poison_delay(tries)
        log.error(
            "message %s failed (failure %d of %d): %s; tried again in %gs",
            mid,
            tries,
            POISON_TRIES,
            reason,
            delay,
        )
        if sender_checked:
            queue.release(delivery.receipt, delay)
        elif queue.release_failed(delivery, delay):
            return Handled.COPIED  # (settled: not to be handed back again)
    except Exception as problem:
        # The backend itself is failing: the message comes back when its
        # visibility runs out, its failure not counted (on SQS, its receives
        # are still bounded by the queue's redrive policy; locally, it comes
        # back until the backend works again).
        log_failure("message %s could not be handed back", mid, exc=problem)
    return Handled.REQUEUED


def no_progress(cursor: Any, timeout: float, asked_time: bool = True) -> Failure:
    """A continuation that resumes from the cursor it was given would repeat
    itself up to ``max_continuations`` times: fail it at once, saying why. A
    job that never asked ``ctx.time_left()`` did not stop for lack of time: its
    cursor does not move on (a slice that took 0.001 s was told to raise
    --chunk-timeout). One that asked may have had too little of it."""
    shown = json.dumps(cursor)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    head = f"resume_at({shown}) made no progress since the previous slice: "
    if not asked_time:
        return Failure(
            FailureKind.NO_PROGRESS,
            head + "the job resumed at the cursor it was given without asking"
            " ctx.time_left() (move the cursor on, or return None when the chunk is done)",
        )
    return Failure(
        FailureKind.NO_PROGRESS,
        head + f"chunk timeout too short for this job ({timeout:g}s; raise --chunk-timeout,"
        " or on AWS the FunctionTimeout stack parameter), or the job does not move its cursor on",
    )


def interruptible() -> bool:
    """Whether this process takes Ctrl-C as KeyboardInterrupt (worker children
    ignore SIGINT: a KeyboardInterrupt there can only be the job's own)."""
    return signal.getsignal(signal.SIGINT) is signal.default_int_handler


#: Errors of a file system that cannot take a write: read-only, full, over quota.
_NO_WRITE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT})
#: What SQLite says when the database's file system cannot take a write (it
#: keeps the errno to itself).
_NO_WRITE_SQLITE = (
    "database or disk is full",
    "attempt to write a readonly database",
    "unable to open database file",
    "disk i/o error",
)


def cannot_write(exc: BaseException) -> bool:
    """Whether ``exc`` says the local backend's files cannot be written (a
    read-only or full file system), as opposed to a bug."""
    if isinstance(exc, OSError):
        return exc.errno in _NO_WRITE_ERRNOS
    sqlite3 = sys.modules.get("sqlite3")  # (not imported: not one of its errors)
    if sqlite3 is not None and isinstance(exc, sqlite3.OperationalError):
        return str(exc).lower().startswith(_NO_WRITE_SQLITE)
    return False


def disk_full(st: os.statvfs_result) -> bool:
    """Whether the file system ``st`` describes takes no more data from this
    process: no block free to it (root may still write the blocks reserved for
    it; /proc and the like, with no blocks at all, are not full)."""
    free = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return free == 0 and st.f_blocks > 0


def log_failure(message: str, *args: Any, exc: BaseException) -> None:
    """``log.exception(message, *args)``, but one line for a file system that
    cannot take a write (a full disk repeats it at every try: a traceback each
    time filled the terminal, and said nothing more)."""
    if cannot_write(exc):
        log.error(message + ": %s (no space, or a read-only file system)", *args, exc)
    else:
        log.exception(message, *args)
