"""The runner runs chunks: claim the task, run it, then commit, retry or dead-letter it.

It is handed a delivery already decoded as a :class:`~fanout.messages.ChunkMessage`
by the dispatcher (``fanout.dispatch``), which routes the queue's other kinds
of message elsewhere. The order of the commit steps is the correctness model
(docs/architecture.md, "The commit order"):

1. write the chunk's Avro output under an attempt-unique key (uncommitted files
   are garbage: only the ledger makes a file count);
2. register the children and the continuation (``fanout.spawn``: conditional
   creates that raise the run's outstanding counter);
3. commit the task in the ledger (conditional on still holding the lease),
   which lowers the counter (and records a stop the chunk asked for); the step
   that takes it to zero finalizes the run (``fanout.finalize``);
4. send the children's messages (a child runs only once its parent
   committed), then acknowledge the message.

A crash between any two steps is repaired by redelivery: a re-run registers
the same deterministic child ids (no double count) and re-sends those still
queued; a duplicate of a committed task is acknowledged and skipped.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fanout.backends import keys
from fanout.backends.base import (
    Backend,
    Claim,
    ClaimOutcome,
    CommitRequest,
    Delivery,
    Failure,
    FailureKind,
    Output,
    Settle,
    TaskEvent,
    TaskKey,
)
from fanout.backends.rules import CRASHED_LAST, FailureVerdict, after_failure, spends_attempt
from fanout.chunklog import chunk_event
from fanout.context import ChunkContext, Continue
from fanout.control_gate import Gate
from fanout.errors import PermanentError
from fanout.events import EventSink, events_for
from fanout.failures import (
    Attempt,
    clip_failure,
    describe,
    drop_invalid,
    failure_of,
    format_traceback,
    interruptible,
    keep_dead_task,
    keep_missing,
    log_failure,
    no_progress,
)
from fanout.finalize import FINALIZE_STALE, finalize_run
from fanout.isolation import ProcessState
from fanout.jobs import Job, activate, load_job
from fanout.limits import RunLimits, stats_problem
from fanout.messages import ChunkMessage, decode, resolve
from fanout.metrics import MetricsSink, metrics_for, record_attempt
from fanout.outcomes import Handled
from fanout.phases import LEASE_GRACE, Ask, Ready, RunInfo
from fanout.retry import compute_backoff
from fanout.spawn import next_tasks, plan_payloads

if TYPE_CHECKING:
    from fanout.avro import Encoded

log = logging.getLogger("fanout.runner")

__all__ = ["LEASE_GRACE", "Ask", "Attempt", "Ready", "Runner", "soft_margin"]


def soft_margin(timeout: float) -> float:
    """How long before the hard timeout the soft deadline falls: 10%, at least 1 s."""
    return max(1.0, 0.1 * timeout)


class Runner:
    """Runs chunks against one backend. One per worker process, behind its
    dispatcher (``fanout.dispatch``); a supervisor also uses it to fail an
    attempt it killed (:meth:`fail`) and to finish a drained run
    (:meth:`finalize`)."""

    def __init__(
        self,
        backend: Backend,
        on_start: Callable[[Attempt], None] | None = None,
        on_end: Callable[[], None] | None = None,
        *,
        events: EventSink | None = None,
        metrics: MetricsSink | None = None,
        on_finalize: Callable[[str], None] | None = None,
        on_claim: Callable[[list[Attempt], list[Attempt]], None] | None = None,
    ) -> None:
        """``events``, ``metrics``: where run events and chunk metrics go (the
        backend's by default: SNS, CloudWatch EMF on Lambda, else nowhere).
        ``on_finalize`` (a run id, "" when done) and ``on_claim`` (the attempts
        about to be claimed) let a local worker's supervisor finish, or give
        back, what a child that died left."""
        self.backend = backend
        self.ledger = backend.ledger
        self.queue = backend.queue
        self.store = backend.store
        self.on_start = on_start
        self.on_end = on_end
        self.on_finalize = on_finalize
        self.on_claim = on_claim
        #: Put back after every chunk: a chunk's os.chdir, os.umask or os.environ
        #: changes are not the next one's.
        self._process = ProcessState()
        self.events: EventSink = events if events is not None else events_for(backend)
        self.metrics: MetricsSink = metrics if metrics is not None else metrics_for(backend)
        self._runs: dict[str, RunInfo] = {}
        #: The attempt ``handle`` claimed and has not settled yet.
        self._in_hand: Attempt | None = None
        #: Run controls: pause, max_concurrency, cancel, tolerated failures.
        self.gate = Gate(backend, self.events)

    # -- one delivery -------------------------------------------------------------

    def handle(self, delivery: Delivery, message: ChunkMessage, timeout: float) -> Handled:
        """Run the chunk ``message`` (the decoded body of ``delivery``) under a hard
        ``timeout`` (s); returns what happened. The message was released back to
        the queue (not acknowledged) exactly when the result is in
        ``fanout.outcomes.RELEASED``.

        What goes wrong outside the job's code (the job's own failures are the
        attempt's, see ``_work``) fails the attempt in hand, if there is one;
        with none, or if failing it fails too, the exception propagates to the
        dispatcher, which hands the message back to be tried again shortly."""
        self._in_hand = None
        try:
            return self._handle(delivery, message, timeout)
        except Exception as exc:
            return self.fail_in_hand(exc)

    def fail_in_hand(self, exc: Exception) -> Handled:
        """``exc`` went wrong outside the job's code: fail the attempt in hand
        like any other failure (retried with back-off, dead-lettered after
        max_attempts); with none in hand, or if that fails too, raise ``exc``."""
        attempt, self._in_hand = self._in_hand, None
        if attempt is None:
            raise exc
        tb = format_traceback(exc)
        # A PermanentError here is the job's (a spawned payload that is no message).
        kind = FailureKind.PERMANENT if isinstance(exc, PermanentError) else FailureKind.INTERNAL
        try:
            return self.fail(attempt, Failure(kind, describe(exc), tb))
        except Exception as problem:
            log_failure("could not record the failure of %s", attempt.key, exc=problem)
        raise exc

    def takes_ctrl_c(self) -> bool:
        """Whether a KeyboardInterrupt out of a job may be a user's Ctrl-C, to hand
        the chunk back and stop on (no attempt spent), not the job's own failure:
        only where SIGINT is taken as one (``fanout.failures.interruptible``; on
        Lambda, where nobody presses Ctrl-C, no)."""
        return interruptible()

    def forget_in_hand(self) -> None:
        """The attempt in hand is settled elsewhere (``fanout.batches``)."""
        self._in_hand = None

    def batchable(self, msg: ChunkMessage) -> bool:
        """Whether ``msg`` may be claimed in a batch (``fanout.batches``): its run is
        known and uncapped (a capped run's attempts each take a slot when
        admitted, so a batch would take several at once)."""
        run = self._run(msg.run_id)
        return run is not None and run.settings.max_concurrency is None

    def _handle(self, delivery: Delivery, msg: ChunkMessage, timeout: float) -> Handled:
        ask = self.ask(delivery, msg, timeout, time.time())
        if isinstance(ask, Handled):
            return ask
        if self.on_claim is not None:
            self.on_claim([ask.unclaimed()], [])
        claim = self.ledger.claim(
            ask.key, ask.token, ask.lease_seconds, ask.run.settings.max_attempts, ask.now
        )
        attempt = self.claimed(ask, claim)
        if isinstance(attempt, Handled):
            return attempt
        try:
            ready = self.work(ask, attempt)
            result = (
                ready
                if isinstance(ready, Handled)
                else self.settled(ready, self.ledger.commit(*ready.commit_args()))
            )
        finally:
            # Run controls: the slot is given back once the attempt settled.
            self.gate.release(
                ask.key.run_id, ask.run.settings, ask.token, attempt.took(time.time())
            )
        self._in_hand = None
        return result

    # -- the phases of one delivery, also driven in batches (fanout.batches) ---------

    def ask(
        self, delivery: Delivery, msg: ChunkMessage, timeout: float, now: float
    ) -> Handled | Ask:
        """What to claim for ``delivery``, or what became of it without a claim
        (an unknown run, a forged ``seq``, a paused or capped run)."""
        run = self._run(msg.run_id)
        if run is None:  # forged, or another stage's: kept (fanout dead-letters)
            drop_invalid(self.queue, self.store, delivery, f"unknown run {msg.run_id!r}")
            return Handled.UNKNOWN_RUN
        if msg.seq > run.settings.max_continuations:
            return drop_invalid(
                self.queue,
                self.store,
                delivery,
                f"invalid message: seq {msg.seq} is over the run's max_continuations"
                f" ({run.settings.max_continuations})",
            )
        ask = Ask(delivery, msg, run, TaskKey(msg.run_id, msg.chunk_id, msg.seq), timeout, now)
        # Run controls (fanout.control_gate): a paused run's delivery is dropped,
        # one over the run's max_concurrency handed back; neither is an attempt.
        admission = self.gate.admit(
            ask.key.run_id, run.settings, ask.token, now + ask.lease_seconds, delivery.receive_count
        )
        if not admission.go:
            return self.gate.refuse(delivery, admission)
        return ask

    def claimed(self, ask: Ask, claim: Claim, in_hand: bool = True) -> Handled | Attempt:
        """The attempt ``claim`` started (the one in hand, unless ``in_hand`` is
        false: a batch's attempts are in hand one at a time, when they start), or
        what became of the delivery when the ledger said no."""
        key, run, delivery = ask.key, ask.run, ask.delivery
        if claim.outcome is not ClaimOutcome.CLAIMED:
            self.gate.release(key.run_id, run.settings, ask.token)  # the slot, if one was taken
        if claim.outcome in (ClaimOutcome.BUSY, ClaimOutcome.WAIT):
            self.queue.release(delivery.receipt, claim.retry_after)
            return Handled(claim.outcome.value)
        if claim.outcome is not ClaimOutcome.CLAIMED:
            if claim.outcome is ClaimOutcome.BURIED:
                fields = {"run_id": key.run_id, "chunk_id": key.chunk_id, "seq": key.seq}
                log.error(
                    "task %s is dead: the worker died during its last attempt",
                    key,
                    extra={"fanout": {**fields, "event": "dead", "failure": FailureKind.CRASHED}},
                )
                error = f"{CRASHED_LAST.kind}: {CRASHED_LAST.error}"
                keep_dead_task(self.ledger, self.store, self.events, key, error, "")
            if claim.outcome is ClaimOutcome.MISSING:  # forged: kept, as an unknown run's is
                keep_missing(self.store, delivery, key)
            if claim.outcome is ClaimOutcome.FINISHED:
                # A redelivery: the attempt that finished may have died before
                # sending its children. Sending again is harmless (claims dedupe).
                self._send([(t.message, 0.0) for t in self.ledger.queued_children(key)])
            self.queue.ack(delivery.receipt)
            # Run controls: a chunk buried here counts against the tolerance too.
            buried = claim.outcome is ClaimOutcome.BURIED
            if claim.drained or (buried and self.gate.after_dead(key.run_id, run.settings)):
                self.finalize(key.run_id)
            return Handled(claim.outcome.value)
        assert claim.task is not None
        ask.body = claim.task.message
        attempt = Attempt(
            key, ask.token, claim.attempt, delivery.receipt, ask.now + ask.timeout, ask.now
        )
        if in_hand:
            self._in_hand = attempt
        if claim.takeover:
            chunk_event(
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
            chunk_event(
                logging.INFO, "claimed", attempt, "task %s attempt %d claimed", key, attempt.attempt
            )
        return attempt

    def work(self, ask: Ask, attempt: Attempt) -> Handled | Ready:
        """Run the claimed ``attempt`` and write its output and children: the
        commit it is ready for, or what became of it (failed, retried, dead).
        ``attempt`` may have been claimed a little before it starts (in a batch):
        its hard deadline and its time budget count from now."""
        now = time.time()
        if now > attempt.started:
            attempt = Attempt(
                attempt.key, attempt.token, attempt.attempt, attempt.receipt, now + ask.timeout, now
            )
        self._in_hand = attempt
        if self.on_start is not None:
            self.on_start(attempt)
        try:
            # The ledger's copy of the message is the authority on what to run:
            # the delivered body only named the task. It is trusted, and decoded
            # again only when it is not the body already decoded above.
            body = ask.body
            msg = ask.msg if body == ask.delivery.body else decode(body)
            return self._work(ask.run, attempt, msg, ask.timeout)
        finally:
            self._process.restore()
            if self.on_end is not None:
                self.on_end()

    def _work(
        self, run: RunInfo, attempt: Attempt, msg: ChunkMessage, timeout: float
    ) -> Handled | Ready:
        started = time.monotonic()
        writer = None
        try:
            job, params = self._job(attempt.key.run_id, run)
            payload, cursor = resolve(msg, self.store)
            schema = job.schema
            if schema is not None:
                # Issue 14: a table job's writer has one file per partition.
                from fanout.tables.writer import make_writer

                writer = make_writer(job, schema, run.settings.codec)
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
                probe=self.gate.probe(msg.run_id),  # run controls: cancel and pause
                plan=msg.kind == "plan",
            )
            continuation = None
            # The job's own code starts: its environment noted now, after the load
            # above (what its module set at import is no change of this chunk's).
            self._process.job_code_starts()
            if msg.kind == "plan":
                assert job.plan_fn is not None
                for child in plan_payloads(job.plan_fn(params, ctx)):
                    ctx.spawn(child)
            else:
                assert job.process_fn is not None
                result = ctx.outcome(job.process_fn(payload, ctx))
                if result is not None:
                    # Told to stop (cancel, pause) is no lack of progress.
                    if msg.seq > 0 and result.cursor == cursor and ctx.told_to_stop is None:
                        # (A job's bug, or too short a budget? see no_progress)
                        return self.fail(attempt, no_progress(cursor, timeout, ctx.asked_time))
                    continuation = result
            ctx.end()  # a thread the job left running may not spawn now
            if (problem := stats_problem(ctx.stats)) is not None:
                raise PermanentError(problem)  # the job's: a retry would count the same
            # Even with no record counted: a job that caught a RecordError (and
            # every refusal after it) must not commit the chunk empty.
            data = writer.finish_file() if writer is not None else None
        except BaseException as exc:
            # The job's code: sys.exit(), KeyboardInterrupt and the like included,
            # or the worker would die with no cause recorded.
            failure = failure_of(exc)
            if isinstance(exc, KeyboardInterrupt) and self.takes_ctrl_c():
                # A real Ctrl-C in a process that takes it (not a worker child,
                # which ignores SIGINT): hand the chunk back, then stop.
                self.fail(
                    attempt, Failure(FailureKind.INTERRUPTED, "interrupted", failure.traceback)
                )
                raise
            return self.fail(attempt, failure)
        return self._ready(run, attempt, msg, payload, ctx, continuation, data, writer)

    def _ready(
        self,
        run: RunInfo,
        attempt: Attempt,
        msg: ChunkMessage,
        payload: Any,
        ctx: ChunkContext,
        continuation: Continue | None,
        data: Encoded | None,
        writer: Any,
    ) -> Ready:
        key, settings = attempt.key, run.settings
        output = None
        if getattr(writer, "partitioned", False):  # issue 14: partition files + parts list
            output = writer.commit(self.store, key, attempt.attempt, attempt.token)
        elif data:
            at = keys.output_key(key.run_id, key.chunk_id, key.seq, attempt.attempt, attempt.token)
            self.store.put(at, data.file())
            data.close()  # (else a temporary file lives until the writer goes)
            output = Output(at, writer.count, data.size)

        children, stop_reason = next_tasks(
            msg,
            payload,
            ctx.spawned,
            continuation,
            settings,
            self.store,
            self.queue.max_message_bytes,
            attempt.token,
            ctx.stop_reason,
        )
        if children:
            tasks = [task for task, _ in children]
            # max_chunks counts the chunks a run creates, not its root: a plan
            # of max_chunks payloads fits, as ctx.spawn's own bound says.
            registration = self.ledger.register(
                key.run_id, tasks, settings.max_chunks + 1, spawned_by=attempt.token
            )
            if registration.over_limit:
                stop_reason = f"max_chunks ({settings.max_chunks}) reached at chunk {key.chunk_id}"
                children = []
            elif registration.lease_lost:
                children = []  # the commit below fails too: another attempt owns the task
        if stop_reason and ctx.stop_reason is None:  # a runaway bound: at once
            self.gate.stop(key.run_id, stop_reason, key.chunk_id)  # (this task still runs)
        outcome = TaskEvent.CONTINUED if continuation is not None else TaskEvent.COMMITTED
        now = time.time()
        # The job's own ctx.stop_run goes in the commit's step: written before, a failed
        # commit's retry would be cancelled; after, a worker dying between would lose it.
        stop = stop_reason if ctx.stop_reason is not None else None
        stats, took = dict(ctx.stats) or None, attempt.took(now)
        request = CommitRequest(key, attempt.token, output, outcome, now, stats, took, stop)
        return Ready(run, attempt, request, [(t.message, d) for t, d in children])

    def settled(self, ready: Ready, settle: Settle) -> Handled:
        """Finish an attempt the ledger answered ``settle`` to committing: on
        success send its children and acknowledge its message."""
        attempt, request = ready.attempt, ready.request
        key, output, outcome, took = request.key, request.output, request.outcome, request.duration
        if self._in_hand is not None and self._in_hand.token == attempt.token:
            self._in_hand = None
        if not settle.ok:
            # Our lease expired and another attempt owns the task: its output
            # counts, ours is garbage, and so are the children we registered
            # (they stay queued until that attempt replaces or orphans them).
            # The message is not acknowledged: it may be the very message that
            # carries the retry of this task (a watchdog failed this attempt and
            # released it), and deleting it would strand the retry. Delivered
            # again, it is claimed, skipped as finished, or found busy.
            log.warning("task %s: lease lost before commit; output discarded", key)
            return Handled.LEASE_LOST
        records, nbytes = (output.records, output.bytes) if output else (0, 0)
        chunk_event(
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
        record_attempt(self.metrics, ready.run.job_name, attempt, outcome, took, records)
        # Sent only now: a child runs only once its parent committed. A crash
        # before these sends is repaired by the redelivery of this message
        # (see handle: a finished task re-sends its queued children).
        self._send(ready.children)
        drained = settle.drained
        if settle.stopped:
            drained = self.gate.stopped(key.run_id, request.stop_reason, key.chunk_id) or drained
        elif any(delay for _, delay in ready.children):  # rare: one ledger read
            drained = self.gate.after_delayed_children(key.run_id) or drained
        self.queue.ack(attempt.receipt)
        if drained:
            self.finalize(key.run_id)
        return Handled(outcome.value)  # committed or continued

    def _send(self, bodies: list[tuple[str, float]]) -> None:
        by_delay: dict[float, list[str]] = defaultdict(list)
        for body, delay in bodies:
            by_delay[delay].append(body)
        for delay, group in by_delay.items():
            self.queue.send(group, delay=delay)

    # -- failure ------------------------------------------------------------------

    def fail(self, attempt: Attempt, failure: Failure) -> Handled:
        """Retry the attempt's task with back-off, or dead-letter it when its
        attempts are spent (at once for a permanent error). Also used by a
        supervisor for an attempt it killed."""
        key = attempt.key
        run = self._run(key.run_id)
        settings = run.settings if run is not None else RunLimits()
        now = time.time()
        if failure.duration is None:
            failure = replace(failure, duration=attempt.took(now))
        # Within the ledger's item limit, or recording the failure fails too.
        failure = clip_failure(failure)
        job_name = run.job_name if run is not None else ""
        self.gate.release(key.run_id, settings, attempt.token, failure.duration)  # run controls
        verdict = after_failure(failure.kind, attempt.attempt, settings.max_attempts)
        if verdict is not FailureVerdict.DEAD:
            n = 0 if verdict is FailureVerdict.RETRY_NOW else attempt.attempt  # 0: no wait
            delay = compute_backoff(n, base=settings.backoff_base, cap=settings.backoff_cap)
            if self.ledger.retry(key, attempt.token, failure, now + delay, now):
                chunk_event(
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
                # An interrupted attempt is no retry (rules.spends_attempt).
                outcome = "retried" if spends_attempt(failure.kind) else "interrupted"
                record_attempt(self.metrics, job_name, attempt, outcome, failure.duration, 0)
                self.queue.release(attempt.receipt, delay)
                return Handled.RETRY
            return Handled.LEASE_LOST
        settle = self.ledger.bury(key, attempt.token, failure, now)
        if not settle.ok:
            # Another attempt owns the task (a watchdog or supervisor already
            # failed this one): the message may carry its retry, so it stays.
            return Handled.LEASE_LOST
        chunk_event(
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
        record_attempt(self.metrics, job_name, attempt, "dead", failure.duration, 0)
        error = f"{failure.kind}: {failure.error}"
        keep_dead_task(self.ledger, self.store, self.events, key, error, failure.traceback)
        self.queue.ack(attempt.receipt)
        # Run controls: past its tolerated failures the run stops (and may drain).
        if self.gate.after_dead(key.run_id, settings) or settle.drained:
            self.finalize(key.run_id)
        return Handled.DEAD

    # -- the end of a run ---------------------------------------------------------

    def finalize(self, run_id: str, stale_after: float = FINALIZE_STALE) -> bool:
        """Write the manifest of a drained run and record its final state
        (:func:`fanout.finalize.finalize_run`); returns whether this one did."""
        if self.on_finalize is not None:
            self.on_finalize(run_id)  # a supervisor takes over if this process dies
        try:
            return finalize_run(self.ledger, self.store, self.events, run_id, stale_after)
        finally:
            if self.on_finalize is not None:
                self.on_finalize("")

    def _run(self, run_id: str) -> RunInfo | None:
        run = self._runs.get(run_id)
        if run is None:
            record = self.ledger.get_run(run_id)
            if record is None:
                return None
            run = self._runs[run_id] = RunInfo.of(record)
        return run

    def _job(self, run_id: str, run: RunInfo) -> tuple[Job, Any]:
        # Loaded afresh for each run, with the modules beside the job file, and
        # again when one of them changed (a fix before a replay): runs do not
        # share job modules, and the job's own modules are the ones imported.
        job = load_job(run.job_ref, run_id)
        activate(job)
        if job is not run.job:
            job.check()
            if (drift := run.schema_drift(job)) is not None:
                raise PermanentError(drift)
            run.params = job.validate_params(run.raw_params)
            run.job = job
        return job, run.params
