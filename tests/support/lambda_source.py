"""What Lambda's SQS event source mapping does, for tests: receive a batch
with the queue's visibility timeout, invoke ``fanout.aws_lambda.handler`` with
an SQS-shaped event and a context whose remaining time runs down, delete the
records the handler did not report in ``batchItemFailures`` (nothing at all
when the invocation crashed or was killed), and leave the rest to reappear.

An invocation runs in this process, or (``invoke_killed``) in a child process
that hangs while writing its first output file and is SIGKILLed when its
function timeout is up, the way Lambda ends an invocation that overruns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INVOKE = Path(__file__).with_name("lambda_invoke.py")
TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
#: Lambda's limit on a function's init phase (s), which its timeout does not count.
INIT_LIMIT = 10.0


def checkout_pythonpath(environ: dict[str, str] | None = None) -> str:
    """``PYTHONPATH`` for a child process of the tests: this checkout first (so
    the child imports the ``fanout`` under test, not whichever is installed),
    then the tests' helpers, then what was already there."""
    existing = (os.environ if environ is None else environ).get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (str(REPO), str(TESTS), existing) if p)


class Countdown:
    """The part of Lambda's context object the handler uses."""

    def __init__(self, timeout_ms: int) -> None:
        self.deadline = time.time() + timeout_ms / 1000.0

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.time()) * 1000))


def sqs_event(messages: list[dict[str, Any]], queue_arn: str = "") -> dict[str, Any]:
    """The event an SQS event source mapping hands a function."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "messageAttributes": {
                    name: {
                        "stringValue": value.get("StringValue"),
                        "stringListValues": [],
                        "binaryListValues": [],
                        "dataType": value.get("DataType", "String"),
                    }
                    for name, value in (m.get("MessageAttributes") or {}).items()
                },
                "md5OfBody": m.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            }
            for m in messages
        ]
    }


@dataclass
class EventSource:
    """Polls one queue and drives the handler like the event source mapping."""

    sqs: Any
    queue_url: str
    timeout_ms: int = 15_000  # the function's timeout
    visibility: int = 20  # the queue's visibility timeout (s)
    batch: int = 10
    env: dict[str, str] = field(default_factory=dict)  # for killed invocations
    invocations: int = 0
    records: int = 0
    failures: int = 0
    redelivered: int = 0  # records seen with ApproximateReceiveCount > 1
    killed: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def receive(self) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=self.batch,
            VisibilityTimeout=self.visibility,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        self.records += len(got)
        self.redelivered += sum(
            int(m.get("Attributes", {}).get("ApproximateReceiveCount", "1")) > 1 for m in got
        )
        return got

    def invoke(self, messages: list[dict[str, Any]]) -> set[str]:
        """One invocation in this process; returns the failed message ids."""
        import fanout.aws_lambda as lambda_mod

        self.invocations += 1
        response = lambda_mod.handler(sqs_event(messages), Countdown(self.timeout_ms))
        failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
        self.failures += len(failed)
        entries = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
            for i, m in enumerate(messages)
            if m["MessageId"] not in failed
        ]
        if entries:
            self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
        return failed

    def invoke_killed(self, messages: list[dict[str, Any]], workdir: Path) -> None:
        """One invocation in a child process that hangs on its first output file
        and is killed at the function timeout (see :meth:`reap`); nothing of the
        batch is deleted."""
        self.invocations += 1
        event = workdir / f"event-{self.invocations}.json"
        event.write_text(json.dumps(sqs_event(messages)))
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = checkout_pythonpath(env)
        proc = subprocess.Popen(
            [sys.executable, str(INVOKE), str(event), str(self.timeout_ms), "--hang-on-output"],
            env=env,
        )
        proc.spawned = time.time()  # type: ignore[attr-defined]
        proc.started = event.with_suffix(".started")  # type: ignore[attr-defined]
        self.killed.append(proc)

    def _deadline(self, proc: subprocess.Popen[bytes]) -> float:
        """When Lambda would kill ``proc``: its timeout after the handler was
        invoked; before that, its init phase may take up to :data:`INIT_LIMIT`
        (a loaded machine's imports are no part of the function's timeout)."""
        timeout = self.timeout_ms / 1000.0
        try:
            return float(proc.started.read_text()) + timeout  # type: ignore[attr-defined]
        except (OSError, ValueError):  # not invoked yet (or being written)
            return proc.spawned + INIT_LIMIT + timeout  # type: ignore[attr-defined]

    def reap(self, force: bool = False) -> None:
        """SIGKILL killed invocations whose time is up (all of them if ``force``)."""
        for proc in list(self.killed):
            if force or time.time() >= self._deadline(proc):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                proc.wait()
                self.killed.remove(proc)
