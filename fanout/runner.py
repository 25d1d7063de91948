"""One delivery in: claim the task, run it, then commit, retry or dead-letter it.

The order of the commit steps is the correctness model (DESIGN.md):

1. write the chunk's Avro output under an attempt-unique key (uncommitted files
   are garbage: only the ledger makes a file count);
2. register the children and the continuation (conditional creates that raise
   the run's outstanding counter), then send their messages;
3. commit the task in the ledger (conditional on still holding the lease),
   which lowers the counter; the step that takes it to zero finalizes the run;
4. acknowledge the message.

A crash between any two steps is repaired by redelivery: a re-run registers
the same deterministic child ids (no double count) and re-sends those still
queued; a duplicate of a committed task is acknowledged and skipped.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel

from fanout.backends.base import (
    Backend,
    ClaimOutcome,
    Delivery,
    Failure,
    FailureKind,
    NewTask,
    Output,
    TaskEvent,
    TaskKey,
)
from fanout.backends.rules import CRASHED_LAST, FailureVerdict, after_failure
from fanout.context import ChunkContext, Continue
from fanout.events import EventSink, emit, events_for
from fanout.failures import (
    Attempt,
    describe,
    failure_of,
    interruptible,
    keep_message,
    message_id,
    no_progress,
    settle_poison,
)
from fanout.finalize import FINALIZE_STALE, finalize_run, manifest_key
from fanout.jobs import Job, RunSettings, activate, load_job
from fanout.messages import (
    FIRE_KIND,
    ChunkMessage,
    MessageError,
    decode,
    is_sweep,
    offload,
    resolve,
)
from fanout.metrics import ChunkMetrics, MetricsSink, metrics_for
from fanout.retry import compute_backoff

log = logging.getLogger("fanout.runner")

#: A lease outlives the hard timeout by this much, so a supervisor that kills an
#: overrunning attempt records it before any other worker may take the task over.
LEASE_GRACE = 5.0
#: Outcomes of :meth:`Runner.handle` that leave the message on the queue (not
#: acknowledged): it is delivered again when its visibility runs out.
RELEASED = frozenset({"busy", "wait", "retry", "lease lost", "requeued"})

__all__ = [
    "FINALIZE_STALE",
    "LEASE_GRACE",
    "RELEASED",
    "Attempt",
    "Runner",
    "manifest_key",
    "soft_margin",
]


@dataclass
class _Run:
    """What a worker caches about a run: its immutable parts."""

    job_ref: str
    job_name: str
    raw_params: dict[str, Any]
    settings: RunSettings
    schema: Any
    job: Job | None = None
    params: BaseModel | dict[str, Any] | None = None


def soft_margin(timeout: float) -> float:
    """How long before the hard timeout the soft deadline falls: 10%, at least 1 s."""
    return max(1.0, 0.1 * timeout)


class Runner:
    """Runs deliveries against one backend. One per worker process."""

    def __init__(
        self,
        backend: Backend,
        on_start: Callable[[Attempt], None] | None = None,
        on_end: Callable[[], None] | None = None,
        *,
        events: EventSink | None = None,
        metrics: MetricsSink | None = None,
        on_finalize: Callable[[str], None] | None = None,
    ) -> None:
        """``events``: where run events go (``fanout.events``); by default the
        backend's own sink (SNS on AWS with an events topic, else nowhere).
        ``metrics``: where per-attempt chunk metrics go (``fanout.metrics``); by
        default CloudWatch's embedded metric format on Lambda, else nowhere.
        ``on_finalize``: told the run id this process starts finalizing, and ""
        when it is done (the local worker's supervisor finishes the job of a
        child that died meanwhile)."""
        self.backend = backend
        self.ledger = backend.ledger
        self.queue = backend.queue
        self.store = backend.store
        self.on_start = on_start
        self.on_end = on_end
        self.on_finalize = on_finalize
        self.events: EventSink = events if events is not None else events_for(backend)
        self.metrics: MetricsSink = metrics if metrics is not None else metrics_for(backend)
        self._runs: dict[str, _Run] = {}
        #: The attempt ``handle`` claimed and has not settled yet.
        self._in_hand: Attempt | None = None

    # -- one delivery -------------------------------------------------------------

    def handle(self, delivery: Delivery, timeout: float) -> str:
        """Process one delivery under a hard ``timeout`` (s); returns what happened.
        The message was released back to the queue (not acknowledged) exactly
        when the result is in :data:`RELEASED`.

        Never raises for a message: what goes wrong outside the job's code (the
        job's own failures are the attempt's, see ``_work``) fails the attempt in
        hand if there is one, else hands the message back to be tried again
        shortly, and dead-letters it once it failed :data:`POISON_TRIES` times."""
        self._in_hand = None
        try:
            return self._handle(delivery, timeout)
        except Exception as exc:
            return self._unexpected(delivery, exc)

    def _handle(self, delivery: Delivery, timeout: float) -> str:
        if not isinstance(delivery.body, str):
            return self._invalid(delivery, "the body is not text")
        try:
            msg = decode(delivery.body)
        except MessageError as exc:
            if is_sweep(delivery.body):
                # The stack's recovery schedule (see fanout.messages.is_sweep).
                # Acknowledged first: recovery re-sends stranded tasks only when
                # the queue is empty, and this message must not count.
                from fanout.coordinator import recover
                from fanout.schedules.guard import sender_refusal

                self.queue.ack(delivery.receipt)
                refused = sender_refusal(self.backend.name, delivery.sender, "sweep")
                if refused:
                    log.error("dropping %s", refused)
                    return "refused"
                for action in recover(self.backend):
                    log.warning("recovery sweep: %s", action)
                return "swept"
            if FIRE_KIND in delivery.body:
                # A schedule's tick from EventBridge Scheduler: submit its run.
                from fanout.schedules.fire import handle_fire_message

                return handle_fire_message(self.backend, delivery)
            # Untrusted input that is not ours: drop it, loudly.
            return self._invalid(delivery, str(exc))
        run = self._run(msg.run_id)
        if run is None:
            log.warning("dropping a message for unknown run %s", msg.run_id)
            self.queue.ack(delivery.receipt)
            return "unknown run"
        if msg.seq > run.settings.max_continuations:
            return self._invalid(
                delivery,
                f"invalid message: seq {msg.seq} is over the run's max_continuations"
                f" ({run.settings.max_continuations})",
            )
        key = TaskKey(msg.run_id, msg.chunk_id, msg.seq)
        token = uuid.uuid4().hex
        now = time.time()
        claim = self.ledger.claim(key, token, timeout + LEASE_GRACE, run.settings.max_attempts, now)
        if claim.outcome in (ClaimOutcome.BUSY, ClaimOutcome.WAIT):
            self.queue.release(delivery.receipt, claim.retry_after)
            return claim.outcome.value
        if claim.outcome is not ClaimOutcome.CLAIMED:
            if claim.outcome is ClaimOutcome.BURIED:
                fields = {"run_id": key.run_id, "chunk_id": key.chunk_id, "seq": key.seq}
                log.error(
                    "task %s is dead: the worker died during its last attempt",
                    key,
                    extra={"fanout": {**fields, "event": "dead", "failure": FailureKind.CRASHED}},
                )
                self._keep_dead_letter(key, f"{CRASHED_LAST.kind}: {CRASHED_LAST.error}", "")
            if claim.outcome is ClaimOutcome.MISSING:
                log.warning("dropping a message for unregistered task %s", key)
            if claim.outcome is ClaimOutcome.FINISHED:
                # A redelivery: the attempt that finished may have died before
                # sending its children. Sending again is harmless (claims dedupe).
                self._send([(t.message, 0.0) for t in self.ledger.queued_children(key)])
            self.queue.ack(delivery.receipt)
            if claim.drained:
                self.finalize(key.run_id)
            return claim.outcome.value
        assert claim.task is not None
        attempt = Attempt(key, token, claim.attempt, delivery.receipt, now + timeout, now)
        if claim.takeover:
            self._chunk_log(
                logging.WARNING,
                "claimed",
                attempt,
                "task %s attempt %d: took over after the previous attempt %s",
                key,
                attempt.attempt,
                claim.takeover,
                takeover=claim.takeover,
            )
        else:
            self._chunk_log(
                logging.INFO, "claimed", attempt, "task %s attempt %d claimed", key, attempt.attempt
            )
        self._in_hand = attempt
        if self.on_start is not None:
            self.on_start(attempt)
        try:
            # The ledger's copy of the message is the authority on what to run:
            # the delivered body only named the task. It is trusted, and decoded
            # again only when it is not the body already decoded above.
            body = claim.task.message
            outcome = self._work(
                run, attempt, msg if body == delivery.body else decode(body), timeout
            )
        finally:
            if self.on_end is not None:
                self.on_end()
        self._in_hand = None
        return outcome

    def _invalid(self, delivery: Delivery, reason: str) -> str:
        """Drop a message that is not a valid fanout message, keeping it as a dead
        letter (``fanout dead-letters``) with the reason."""
        key = keep_message(self.store, delivery, reason)
        log.error("dropping message %s: %s (kept at %s)", message_id(delivery), reason, key)
        self.queue.ack(delivery.receipt)
        return "invalid"

    def _unexpected(self, delivery: Delivery, exc: Exception) -> str:
        """Something outside the job's code failed while handling ``delivery``."""
        reason, tb = describe(exc), traceback.format_exc()
        attempt, self._in_hand = self._in_hand, None
        if attempt is not None:
            # The task was claimed: its attempt fails like any other (retried
            # with back-off, dead-lettered in the ledger after max_attempts).
            try:
                return self.fail(attempt, Failure(FailureKind.INTERNAL, reason, tb))
            except Exception:
                log.exception("could not record the failure of %s", attempt.key)
        return settle_poison(self.queue, self.store, delivery, reason, tb)

    def _work(self, run: _Run, attempt: Attempt, msg: ChunkMessage, timeout: float) -> str:
        started = time.monotonic()
        writer = None
        try:
            job, params = self._job(attempt.key.run_id, run)
            payload, cursor = resolve(msg, self.store)
            schema = job.schema
            if schema is not None:
                from fanout.avro import RecordWriter

                writer = RecordWriter(schema, codec=run.settings.codec)
            ctx = ChunkContext(
                params=params,
                run_id=msg.run_id,
                chunk_id=msg.chunk_id,
                seq=msg.seq,
                attempt=attempt.attempt,
                cursor=cursor,
                soft_deadline=started + timeout - soft_margin(timeout),
                writer=writer,
                job_name=job.name,
                crawl=self.backend.crawl,
                settings=run.settings,
                store=self.store,
                token=attempt.token,
            )
            continuation = None
            if msg.kind == "plan":
                assert job.plan_fn is not None
                for child in job.plan_fn(params, ctx):
                    ctx.spawn(child)
            else:
                assert job.process_fn is not None
                result = job.process_fn(payload, ctx)
                if isinstance(result, Continue):
                    if msg.seq > 0 and result.cursor == cursor:
                        return self.fail(attempt, no_progress(cursor, timeout))
                    continuation = result
            data = writer.finish() if writer is not None and writer.count else b""
        except BaseException as exc:
            # The job's code: sys.exit(), KeyboardInterrupt and the like included,
            # or the worker would die with no cause recorded.
            failure = failure_of(exc)
            if isinstance(exc, KeyboardInterrupt) and interruptible():
                # A real Ctrl-C in a process that takes it (not a worker child,
                # which ignores SIGINT): hand the chunk back, then stop.
                self.fail(
                    attempt, Failure(FailureKind.INTERRUPTED, "interrupted", failure.traceback)
                )
                raise
            return self.fail(attempt, failure)
        return self._commit(run, attempt, msg, payload, ctx, continuation, data, writer)

    def _commit(
        self,
        run: _Run,
        attempt: Attempt,
        msg: ChunkMessage,
        payload: Any,
        ctx: ChunkContext,
        continuation: Continue | None,
        data: bytes,
        writer: Any,
    ) -> str:
        key, settings = attempt.key, run.settings
        output = None
        if data:
            okey = (
                f"runs/{key.run_id}/data/{key.chunk_id.replace('/', '.')}"
                f"-s{key.seq}-a{attempt.attempt}-{attempt.token[:8]}.avro"
            )
            self.store.put(okey, data)
            output = Output(okey, writer.count, len(data))

        children, stop_reason = self._children(msg, payload, ctx, continuation, settings)
        if children:
            tasks = [task for task, _ in children]
            registration = self.ledger.register(
                key.run_id, tasks, settings.max_chunks, spawned_by=attempt.token
            )
            if registration.over_limit:
                stop_reason = f"max_chunks ({settings.max_chunks}) reached at chunk {key.chunk_id}"
                children = []
            elif registration.lease_lost:
                children = []  # the commit below fails too: another attempt owns the task
        if stop_reason:
            log.warning("run %s stopped: %s", key.run_id, stop_reason)
            self.ledger.stop(key.run_id, stop_reason)
            emit(self.events, "run.stopped", key.run_id, reason=stop_reason, chunk_id=key.chunk_id)

        outcome = TaskEvent.CONTINUED if continuation is not None else TaskEvent.COMMITTED
        now = time.time()
        took = attempt.took(now)
        settle = self.ledger.commit(
            key,
            attempt.token,
            output,
            outcome,
            now,
            stats=dict(ctx.stats) or None,
            duration=took,
        )
        if not settle.ok:
            # Our lease expired and another attempt owns the task: its output
            # counts, ours is garbage, and so are the children we registered
            # (they stay queued until that attempt replaces or orphans them).
            # The message is not acknowledged: it may be the very message that
            # carries the retry of this task (a watchdog failed this attempt and
            # released it), and deleting it would strand the retry. Delivered
            # again, it is claimed, skipped as finished, or found busy.
            log.warning("task %s: lease lost before commit; output discarded", key)
            return "lease lost"
        records, nbytes = (output.records, output.bytes) if output else (0, 0)
        self._chunk_log(
            logging.INFO,
            outcome,
            attempt,
            "task %s attempt %d %s: %d records in %.3fs",
            key,
            attempt.attempt,
            outcome,
            records,
            took or 0.0,
            duration_s=took,
            records=records,
            bytes=nbytes,
        )
        self._measure(run.job_name, attempt, outcome, took, records)
        # Sent only now: a child runs only once its parent committed. A crash
        # before these sends is repaired by the redelivery of this message
        # (see handle: a finished task re-sends its queued children).
        self._send([(t.message, d) for t, d in children])
        self.queue.ack(attempt.receipt)
        if settle.drained:
            self.finalize(key.run_id)
        return outcome

    def _send(self, bodies: list[tuple[str, float]]) -> None:
        by_delay: dict[float, list[str]] = defaultdict(list)
        for body, delay in bodies:
            by_delay[delay].append(body)
        for delay, group in by_delay.items():
            self.queue.send(group, delay=delay)

    def _children(
        self,
        msg: ChunkMessage,
        payload: Any,
        ctx: ChunkContext,
        continuation: Continue | None,
        settings: RunSettings,
    ) -> tuple[list[tuple[NewTask, float]], str | None]:
        """The tasks this chunk asks for, or the runaway bound they would break."""
        limit = self.queue.max_message_bytes
        children: list[tuple[NewTask, float]] = []
        if ctx.spawned:
            depth = msg.depth + 1
            if depth > settings.max_depth:
                return [], f"max_depth ({settings.max_depth}) reached at chunk {msg.chunk_id}"
            for i, spawn in enumerate(ctx.spawned):
                child = ChunkMessage(
                    run_id=msg.run_id, chunk_id=f"{msg.chunk_id}/{i}", payload=spawn.payload
                )
                body = offload(child, self.store, limit)
                not_before = time.time() + spawn.delay if spawn.delay else 0.0
                task = NewTask(child.chunk_id, 0, depth, body, msg.chunk_id, msg.seq, not_before)
                children.append((task, spawn.delay))
        if continuation is not None:
            if msg.seq + 1 > settings.max_continuations:
                return [], (
                    f"max_continuations ({settings.max_continuations}) reached"
                    f" at chunk {msg.chunk_id}"
                )
            nxt = ChunkMessage(
                run_id=msg.run_id,
                chunk_id=msg.chunk_id,
                seq=msg.seq + 1,
                kind=msg.kind,
                payload=payload,
                cursor=continuation.cursor,
            )
            body = offload(nxt, self.store, limit)
            children.append(
                (NewTask(nxt.chunk_id, nxt.seq, msg.depth, body, msg.chunk_id, msg.seq), 0.0)
            )
        return children, None

    # -- failure ------------------------------------------------------------------

    def fail(self, attempt: Attempt, failure: Failure) -> str:
        """Retry the attempt's task with back-off, or dead-letter it when its
        attempts are spent (at once for a permanent error). Also used by a
        supervisor for an attempt it killed."""
        key = attempt.key
        run = self._run(key.run_id)
        settings = run.settings if run is not None else RunSettings()
        now = time.time()
        if failure.duration is None:
            failure = replace(failure, duration=attempt.took(now))
        job_name = run.job_name if run is not None else ""
        verdict = after_failure(failure.kind, attempt.attempt, settings.max_attempts)
        if verdict is not FailureVerdict.DEAD:
            delay = (
                0.0
                if verdict is FailureVerdict.RETRY_NOW
                else compute_backoff(
                    attempt.attempt, base=settings.backoff_base, cap=settings.backoff_cap
                )
            )
            if self.ledger.retry(key, attempt.token, failure, now + delay, now):
                self._chunk_log(
                    logging.WARNING,
                    "retried",
                    attempt,
                    "task %s attempt %d %s: %s; retry in %.1fs",
                    key,
                    attempt.attempt,
                    failure.kind,
                    failure.error,
                    delay,
                    failure=failure.kind,
                    error=failure.error,
                    duration_s=failure.duration,
                    retry_in_s=round(delay, 3),
                )
                self._measure(job_name, attempt, "retried", failure.duration, 0)
                self.queue.release(attempt.receipt, delay)
                return "retry"
            return "lease lost"
        settle = self.ledger.bury(key, attempt.token, failure, now)
        if not settle.ok:
            # Another attempt owns the task (a watchdog or supervisor already
            # failed this one): the message may carry its retry, so it stays.
            return "lease lost"
        self._chunk_log(
            logging.ERROR,
            "dead",
            attempt,
            "task %s is dead after attempt %d: %s: %s",
            key,
            attempt.attempt,
            failure.kind,
            failure.error,
            failure=failure.kind,
            error=failure.error,
            duration_s=failure.duration,
        )
        self._measure(job_name, attempt, "dead", failure.duration, 0)
        self._keep_dead_letter(key, f"{failure.kind}: {failure.error}", failure.traceback)
        self.queue.ack(attempt.receipt)
        if settle.drained:
            self.finalize(key.run_id)
        return "dead"

    # -- observability --------------------------------------------------------------

    def _chunk_log(
        self, level: int, event: str, attempt: Attempt, msg: str, *args: object, **fields: Any
    ) -> None:
        """One log line per chunk event, its fields under ``fanout`` for the JSON
        formatter (``fanout.logs``); fields that are None are left out."""
        if not log.isEnabledFor(level):
            return  # the hot path in production (WARNING): build nothing
        key = attempt.key
        extra: dict[str, Any] = {
            "run_id": key.run_id,
            "chunk_id": key.chunk_id,
            "seq": key.seq,
            "attempt": attempt.attempt,
            "event": event,
            "remaining_s": round(attempt.deadline - time.time(), 3),
        }
        extra.update((k, round(v, 3) if isinstance(v, float) else v) for k, v in fields.items())
        extra = {k: v for k, v in extra.items() if v is not None}
        log.log(level, msg, *args, extra={"fanout": extra})

    def _measure(
        self, job_name: str, attempt: Attempt, outcome: str, took: float | None, records: int
    ) -> None:
        """Hand one settled attempt to the metrics sink; a sink that fails is logged."""
        try:
            self.metrics.record(
                ChunkMetrics(
                    job=job_name,
                    run_id=attempt.key.run_id,
                    chunk_id=attempt.key.chunk_id,
                    seq=attempt.key.seq,
                    attempt=attempt.attempt,
                    outcome=outcome,
                    duration=took or 0.0,
                    records=records,
                    retried=outcome == "retried",
                )
            )
        except Exception:
            log.exception("could not record the metrics of %s", attempt.key)

    def _keep_dead_letter(self, key: TaskKey, error: str, tb: str) -> None:
        """Keep the dead chunk's message and error in the store, beside its run."""
        task = self.ledger.get_task(key)
        letter = {
            "run_id": key.run_id,
            "chunk_id": key.chunk_id,
            "seq": key.seq,
            "error": error,
            "traceback": tb,
            "message": json.loads(task.message) if task else None,
            "history": task.history if task else [],
        }
        dkey = f"runs/{key.run_id}/dead/{key.chunk_id.replace('/', '.')}-s{key.seq}.json"
        self.store.put(dkey, json.dumps(letter, indent=2).encode())
        emit(
            self.events,
            "chunk.dead",
            key.run_id,
            chunk_id=key.chunk_id,
            seq=key.seq,
            error=error,
            dead_letter=dkey,
        )

    # -- the end of a run ---------------------------------------------------------

    def finalize(self, run_id: str, stale_after: float = FINALIZE_STALE) -> bool:
        """Write the manifest of a drained run and record its final state.
        Only one caller per drain does the work (another may take over once it
        is ``stale_after`` seconds old); returns whether this one did."""
        if self.on_finalize is not None:
            self.on_finalize(run_id)  # a supervisor takes over if this process dies
        try:
            return finalize_run(self.ledger, self.store, self.events, run_id, stale_after)
        finally:
            if self.on_finalize is not None:
                self.on_finalize("")

    # -- caches -------------------------------------------------------------------

    def _run(self, run_id: str) -> _Run | None:
        run = self._runs.get(run_id)
        if run is None:
            record = self.ledger.get_run(run_id)
            if record is None:
                return None
            settings = {k: v for k, v in record.settings.items() if k != "schema"}
            run = _Run(
                job_ref=record.job,
                job_name=record.job_name,
                raw_params=record.params,
                settings=RunSettings.model_validate(settings),
                schema=record.settings.get("schema"),
            )
            self._runs[run_id] = run
        return run

    def _job(self, run_id: str, run: _Run) -> tuple[Job, Any]:
        # Loaded afresh for each run, with the modules beside the job file, and
        # again when one of them changed (a fix before a replay): runs do not
        # share job modules, and the job's own modules are the ones imported.
        job = load_job(run.job_ref, run_id)
        activate(job)
        if job is not run.job:
            job.check()
            run.params = job.validate_params(run.raw_params)
            run.job = job
        return job, run.params
