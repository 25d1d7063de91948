"""The AWS Lambda entry point: one SQS event-source batch through the dispatcher.

Each record runs under a hard timeout taken from the invocation's remaining
time (less a safety margin), so its lease expires when Lambda would kill it.
Records the dispatcher handed back to the queue (another worker holds the task, a
back-off, a retry) are reported in ``batchItemFailures``: Lambda then leaves
them to reappear when their visibility (set by the runner) runs out, and
deletes the rest. Records the invocation has no time left to start are
reported too, and made visible again at once, not after the queue's
visibility timeout. Heavy imports (Scrapy, Twisted) happen only in crawl jobs.

**A chunk that overruns is never silent.** Lambda kills an invocation at its
timeout without a word, so a watchdog thread plays the local worker's
supervisor: when a chunk passes its hard timeout (the remaining time less
:data:`SAFETY`), it records the attempt as "timed out" in the ledger (retried
with back-off, or dead-lettered) and hands back the batch's records that never
started, so they are redelivered at once rather than after the visibility
timeout. Should the stuck chunk still try to commit, its lease is gone and the
commit is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from fanout.backends import open_backend
from fanout.backends.base import (
    Backend,
    Delivery,
    Failure,
    FailureKind,
    sqs_count,
    sqs_sent_at,
)
from fanout.dispatch import Dispatcher
from fanout.failures import Attempt
from fanout.jobs import Job
from fanout.outcomes import RELEASED
from fanout.packaged import check_packaged
from fanout.phases import RunInfo
from fanout.runner import Runner

log = logging.getLogger("fanout.lambda")

#: Seconds kept back from the invocation's remaining time (commit, response).
SAFETY = 2.0
#: A record is not started with less time than this left: it is handed back.
MIN_TIMEOUT = 3.0

_warm: tuple[Backend, Dispatcher, _Watchdog] | None = None  # reused by a warm container


class _Watchdog:
    """Fails the attempt in hand once it is past its hard deadline (see above)."""

    def __init__(self) -> None:
        self.runner: Runner | None = None
        self._lock = threading.Lock()
        self._attempt: Attempt | None = None
        self._timer: threading.Timer | None = None
        self.unstarted: list[str] = []  # receipts of this batch not started yet
        #: Receipts whose attempt the watchdog failed: the runner may still return
        #: for them (the chunk ended between the hard timeout and Lambda's kill),
        #: but their message must not be deleted, it carries the retry.
        self.expired: set[str] = set()

    def begin_batch(self, receipts: list[str]) -> None:
        """A batch arrives: none of its records has started."""
        with self._lock:
            self.unstarted = list(receipts)
            self.expired = set()

    def starting(self, receipt: str) -> None:
        """The handler takes up the record of ``receipt``."""
        with self._lock:
            if receipt in self.unstarted:
                self.unstarted.remove(receipt)

    def was_expired(self, receipt: str) -> bool:
        """Whether the record of ``receipt`` was failed by the watchdog."""
        with self._lock:
            return receipt in self.expired

    def start(self, attempt: Attempt) -> None:
        """The runner's ``on_start``: arm the timer for this attempt."""
        with self._lock:
            self._attempt = attempt
            delay = max(0.0, attempt.deadline - time.time())
            self._timer = threading.Timer(delay, self._expire, args=(attempt,))
            self._timer.daemon = True
            self._timer.start()

    def end(self) -> None:
        """The runner's ``on_end``: the attempt settled in time."""
        with self._lock:
            self._attempt = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _expire(self, attempt: Attempt) -> None:
        with self._lock:
            if self._attempt is not attempt or self.runner is None:
                return
            self._attempt = None
            self.expired.add(attempt.receipt)
            unstarted, self.unstarted = self.unstarted, []
        log.error("task %s passed its hard timeout; recording it as timed out", attempt.key)
        try:
            self.runner.fail(
                attempt,
                Failure(FailureKind.TIMED_OUT, "chunk ran past the invocation's remaining time"),
            )
            for receipt in unstarted:
                self.runner.queue.release(receipt, 0.0)
        except Exception:
            log.exception("could not record the timeout of %s", attempt.key)


class _PackagedRunner(Runner):
    """The runner on Lambda: a run's job ref must resolve inside the deployed
    package (:mod:`fanout.packaged`) before the job is loaded. Refused, the
    attempt fails permanently and the task is dead-lettered. A job's
    KeyboardInterrupt is an ordinary failure (:meth:`takes_ctrl_c`)."""

    def _job(self, run_id: str, run: RunInfo) -> tuple[Job, Any]:
        check_packaged(run.job_ref)
        return super()._job(run_id, run)

    def takes_ctrl_c(self) -> bool:
        """No: nobody presses Ctrl-C on Lambda, though its runtime keeps Python's
        SIGINT handler. A KeyboardInterrupt is the job's own failure; taken for
        a Ctrl-C, it handed the chunk back without spending an attempt and
        escaped the handler, so the batch came back to do it again, forever."""
        return False


def _dispatcher() -> tuple[Dispatcher, _Watchdog]:
    global _warm
    if _warm is None:
        # Cold start: JSON lines at the stage's level, botocore quiet (fanout.logs).
        from fanout.logs import configure_logging

        configure_logging()
        from fanout.backends.aws.clients import LAMBDA_ATTEMPTS, limit_attempts

        limit_attempts(LAMBDA_ATTEMPTS)
        backend = open_backend("aws")
        watchdog = _Watchdog()
        runner = _PackagedRunner(backend, on_start=watchdog.start, on_end=watchdog.end)
        watchdog.runner = runner
        _warm = (backend, Dispatcher(backend, runner), watchdog)
    return _warm[1], _warm[2]


def _hand_back(dispatcher: Dispatcher, records: list[Any], context: Any) -> list[str]:
    """Release the batch's ``records`` this invocation has no time to start, at
    once, and return their message ids for ``batchItemFailures`` (so they are
    not deleted). Only reported, they waited out the queue's visibility timeout
    (at least 6 x the function's timeout when deployed): chunks sat idle, and a
    schedule's tick came back too late to fire (``schedules.guard.FIRE_LATE``)
    and was dropped. Once a release fails (SQS unreachable: each one would
    spend botocore's retries) or the last second has come, the rest are only
    reported: the invocation must answer before its time is up."""
    ids = []
    releasing = True
    for record in records:
        ids.append(_field(record, "messageId"))
        if not releasing or context.get_remaining_time_in_millis() < 1000:
            continue
        try:
            dispatcher.backend.queue.release(_field(record, "receiptHandle"), 0.0)
        except Exception:
            # Reported all the same: it comes back when its visibility runs out.
            log.exception("could not hand back record %s (the rest are only reported)", ids[-1])
            releasing = False
    return ids


def _field(record: Any, name: str) -> str:
    """A record's string field; "" where an event SQS never sends lacks it."""
    value = record.get(name, "") if isinstance(record, dict) else ""
    return str(value) if value is not None else ""


def _receive_count(attributes: Any) -> int:
    try:
        return max(1, int(attributes.get("ApproximateReceiveCount", 1)))
    except (AttributeError, TypeError, ValueError):
        return 1


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The SQS event source handler: ``{"batchItemFailures": [...]}``."""
    dispatcher, watchdog = _dispatcher()
    found = event.get("Records") if isinstance(event, dict) else None
    records: list[Any] = list(found) if isinstance(found, list) else []
    watchdog.begin_batch([_field(r, "receiptHandle") for r in records])
    failures: list[str] = []
    for i, record in enumerate(records):
        message_id = _field(record, "messageId")
        receipt = _field(record, "receiptHandle")
        timeout = context.get_remaining_time_in_millis() / 1000.0 - SAFETY
        if timeout < MIN_TIMEOUT:
            # Too little time left for this record and the ones after it.
            if i == 0:
                log.warning(
                    "%.1f s left: too little to start a chunk (at least %.0f s): raise the"
                    " function's timeout",
                    timeout + SAFETY,
                    MIN_TIMEOUT + SAFETY,
                )
            failures.extend(_hand_back(dispatcher, records[i:], context))
            break
        watchdog.starting(receipt)
        attributes = record.get("attributes") if isinstance(record, dict) else None
        attributes = attributes if isinstance(attributes, dict) else {}
        delivery = Delivery(
            # Checked by the dispatcher: may not be text (or no record at all).
            body=record.get("body", "") if isinstance(record, dict) else record,
            receipt=receipt,
            receive_count=_receive_count(attributes),
            message_id=message_id,
            sender=attributes.get("SenderId"),
            sent_at=sqs_sent_at(attributes),
            failures=sqs_count(
                record.get("messageAttributes") if isinstance(record, dict) else None
            ),
        )
        try:
            outcome = dispatcher.handle(delivery, timeout)
        except Exception:
            # An infrastructure failure (the ledger or store unreachable after
            # botocore's retries): SQS redelivers, the ledger keeps it exact.
            log.exception("record %s failed; it will be redelivered", message_id)
            failures.append(message_id)
            continue
        if outcome in RELEASED or watchdog.was_expired(receipt):
            failures.append(message_id)
    watchdog.begin_batch([])
    return {"batchItemFailures": [{"itemIdentifier": m} for m in failures]}
