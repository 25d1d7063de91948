"""The AWS Lambda entry point: one SQS event-source batch through the runner.

Each record runs under a hard timeout taken from the invocation's remaining
time (less a safety margin), so its lease expires when Lambda would kill it.
Records the runner handed back to the queue (another worker holds the task, a
back-off, a retry) are reported in ``batchItemFailures``: Lambda then leaves
them to reappear when their visibility (set by the runner) runs out, and
deletes the rest. Heavy imports (Scrapy, Twisted) happen only in crawl jobs.
"""

from __future__ import annotations

import logging
from typing import Any

from fanout.backends import open_backend
from fanout.backends.base import Backend, Delivery
from fanout.runner import RELEASED, Runner

log = logging.getLogger("fanout.lambda")

#: Seconds kept back from the invocation's remaining time (commit, response).
SAFETY = 2.0
#: A record is not started with less time than this left: it is handed back.
MIN_TIMEOUT = 3.0

_warm: tuple[Backend, Runner] | None = None  # reused by a warm container


def _runner() -> Runner:
    global _warm
    if _warm is None:
        backend = open_backend("aws")
        _warm = (backend, Runner(backend))
    return _warm[1]


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The SQS event source handler: ``{"batchItemFailures": [...]}``."""
    runner = _runner()
    failures: list[str] = []
    for record in event.get("Records", ()):
        message_id = str(record.get("messageId", ""))
        timeout = context.get_remaining_time_in_millis() / 1000.0 - SAFETY
        if timeout < MIN_TIMEOUT:
            failures.append(message_id)  # too little time left: let SQS redeliver it
            continue
        delivery = Delivery(
            body=str(record.get("body", "")),
            receipt=str(record.get("receiptHandle", "")),
            receive_count=int(record.get("attributes", {}).get("ApproximateReceiveCount", 1)),
        )
        try:
            outcome = runner.handle(delivery, timeout)
        except Exception:
            # An infrastructure failure (the ledger or store unreachable after
            # botocore's retries): SQS redelivers, the ledger keeps it exact.
            log.exception("record %s failed; it will be redelivered", message_id)
            failures.append(message_id)
            continue
        if outcome in RELEASED:
            failures.append(message_id)
    return {"batchItemFailures": [{"itemIdentifier": m} for m in failures]}
