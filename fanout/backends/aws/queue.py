"""The work queue on SQS (a standard queue).

What SQS gives, and how the engine copes where it gives less than the
:class:`~fanout.backends.base.Queue` contract of the local queue:

- **Whole seconds.** Visibility timeouts and delays are whole seconds in SQS;
  they are rounded *up* (a message is never visible earlier than asked).
  :attr:`SqsQueue.min_visibility` says so to callers and tests.
- **Delays up to 15 minutes.** ``DelaySeconds`` is at most 900: a longer delay
  sends the message delayed by 900 s. When it arrives early, the ledger's claim
  answers WAIT (the task's ``not_before`` is still ahead) and the engine
  releases it again for the rest of the back-off, so a long delay costs a few
  extra receives, never an early run.
- **Stale receipts.** A receipt handle is meant for the latest receive only, but
  SQS (and moto) may still honour an older one: a late ``ack`` from a worker
  whose lease expired can delete the redelivered copy, and a late ``release``
  can make it visible. The ledger keeps this safe: a released copy is claimed
  BUSY and released again while the new lease is live, and a task whose message
  was deleted while it was still running is re-sent by the recovery sweep
  (``fanout.coordinator.recover``) if that attempt dies. :attr:`SqsQueue.exact_receipts`
  is False to say so.
- **No order.** A standard queue delivers in roughly, not exactly, send order
  (:attr:`SqsQueue.ordered` is False); the engine never relies on order.
- **At least once.** SQS may, rarely, deliver a message twice even while it is
  in flight; the ledger's claim makes the second delivery harmless.

**Dispatch through SNS** (optional, :attr:`AwsSettings.topic`). Messages are
then published to an SNS topic (``PublishBatch``, 10 a call) that has the work
queue subscribed with raw message delivery, so the queue receives the body
unchanged and the receiving side is the same; other subscribers (an audit
queue, a second region) can see the work without the engine knowing. SNS has
no per-message delay, so *delayed* messages (back-offs, ``spawn(delay=...)``)
still go straight to SQS with ``DelaySeconds``: publishing them through SNS
would deliver them at once, and the engine would only claim them WAIT and
release them again, a receive per message for nothing. No message attributes
are set: raw delivery would pass them on as SQS attributes nobody reads, and
they count against the 256 KiB limit.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fanout.backends.aws import AwsSettings
from fanout.backends.aws.clients import client, error_code
from fanout.backends.base import FAILURES, Delivery, sqs_count, sqs_sent_at
from fanout.fairness import group_of
from fanout.json_fields import sqs_safe

log = logging.getLogger(__name__)

#: SQS's limits.
MAX_BATCH = 10
MAX_DELAY = 900  # DelaySeconds
MAX_VISIBILITY = 43_200  # VisibilityTimeout (12 hours)

#: The message attribute counting a message's trips back from the DLQ, and how
#: many a message may make (see :meth:`SqsQueue.redrive`).
REDRIVES = "fanout-redrives"
MAX_REDRIVES = 3
#: SQS's limit on a message, attributes included, and on a batch's total.
SQS_LIMIT = 256 * 1024
#: Bytes of a message kept for the attributes fanout sets (FAILURES and
#: REDRIVES: each name, type and value, about 25 bytes), with room to spare.
ATTRIBUTE_ROOM = 256
#: How long a redrive sweep hides the DLQ messages it is moving (s).
REDRIVE_VISIBILITY = 60

#: How many times entries of a batch that SQS failed (not the sender's fault) are
#: re-sent before ``send`` gives up. botocore already retried the whole call.
SEND_ATTEMPTS = 5

#: Receipt errors that only mean "this receipt is stale": the message was
#: deleted, or received again since, or is no longer in flight.
_STALE_RECEIPT_CODES = frozenset(
    {
        "ReceiptHandleIsInvalid",
        "AWS.SimpleQueueService.ReceiptHandleIsInvalid",
        "InvalidParameterValue",  # e.g. "Value ... for parameter ReceiptHandle is invalid"
        "MessageNotInflight",
        "AWS.SimpleQueueService.MessageNotInflight",
    }
)

#: Characters SQS refuses in a message body.
_BAD_CHARS = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _sendable(body: str) -> str:
    """``body``, or, if it is JSON holding characters SQS refuses, the same JSON
    with them escaped (``fanout.json_fields.sqs_safe``); any other body as it
    is, for :meth:`SqsQueue._check` to refuse."""
    if body.isascii() or _BAD_CHARS.search(body) is None:
        return body
    try:
        # Strict: no raw control character, so what is left to escape is what
        # sqs_safe escapes (U+FFFE, U+FFFF, lone surrogates), inside strings.
        json.loads(body)
    except ValueError:
        return body
    return sqs_safe(body)


def _seconds(value: float, limit: int) -> int:
    """``value`` seconds as SQS's whole seconds: rounded up, within 0..limit."""
    return min(max(math.ceil(value), 0), limit)


class SqsQueue:
    """The :class:`~fanout.backends.base.Queue` of the AWS backend, on one SQS queue."""

    #: The largest body sent as it is (UTF-8 bytes), also per batch: SQS's
    #: limit (256 KiB) less :data:`ATTRIBUTE_ROOM`, since SQS counts message
    #: attributes against it too. A larger body goes to the store (the engine
    #: offloads by this figure), so a message can always be handed back with
    #: its failure count and moved back from the DLQ with its trips.
    max_message_bytes: int = SQS_LIMIT - ATTRIBUTE_ROOM

    #: Visibility timeouts and delays are whole seconds (rounded up).
    min_visibility: float = 1.0

    #: A standard queue does not keep send order.
    ordered: bool = False

    #: A stale receipt may still delete or release the message (see the module doc).
    exact_receipts: bool = False

    def __init__(self, settings: AwsSettings, sqs: Any = None, sns: Any = None) -> None:
        self.settings = settings
        self.sqs: Any = sqs if sqs is not None else client("sqs", settings)
        name = settings.queue
        if name.startswith(("https://", "http://")):
            self.url = name
        else:
            self.url = str(self.sqs.get_queue_url(QueueName=name)["QueueUrl"])
        self._dlq_url: str | None = None
        self._dlq_known = False  # _dlq_url looked up yet
        #: The dispatch topic's ARN, or None to send straight to SQS.
        self.topic_arn: str | None = None
        self.sns: Any = None
        if settings.topic:
            self.sns = sns if sns is not None else client("sns", settings)
            self.topic_arn = topic_arn(self.sns, settings.topic)

    # -- send ---------------------------------------------------------------------

    def send(self, bodies: Sequence[str], delay: float = 0.0) -> None:
        """Enqueue ``bodies`` (``SendMessageBatch``, 10 a call), visible after
        ``delay`` seconds (rounded up; at most 900, see the module doc). With a
        dispatch topic, undelayed bodies are published to it instead
        (``PublishBatch``, 10 a call; see the module doc).

        A JSON body holding characters SQS refuses (U+FFFE, U+FFFF) is sent with
        them as ``\\uXXXX`` escapes, the same JSON value: the engine's encoders
        escape them already, but a task registered before they did (re-sent
        by the sweep or a replay) may still hold them.

        Raises ``ValueError`` (and sends nothing) if a body is over
        :attr:`max_message_bytes` in UTF-8 or, not being JSON, holds
        characters SQS refuses.
        Entries SQS fails on its side are re-sent a few times; then
        ``RuntimeError``. Not atomic: on an error, earlier batches stay sent
        (the engine's sends are idempotent).
        """
        if not bodies:
            return
        bodies = [_sendable(body) for body in bodies]
        sizes = [self._check(body) for body in bodies]
        delay_seconds = _seconds(delay, MAX_DELAY)
        for batch in _batches(bodies, sizes, self.max_message_bytes):
            if self.topic_arn is not None and delay_seconds == 0:
                self._publish_batch(batch)
            else:
                self._send_batch(batch, delay_seconds)

    def _check(self, body: str) -> int:
        size = len(body.encode())
        if size > self.max_message_bytes:
            raise ValueError(f"message of {size} bytes exceeds {self.max_message_bytes} bytes")
        bad = _BAD_CHARS.search(body)
        if bad:
            raise ValueError(f"message holds a character SQS refuses: {bad.group()!r}")
        return size

    def _send_batch(self, batch: list[str], delay_seconds: int) -> None:
        entries: dict[str, dict[str, Any]] = {
            str(i): {"Id": str(i), "MessageBody": body, "DelaySeconds": delay_seconds}
            for i, body in enumerate(batch)
        }
        for entry in entries.values():
            _grouped(entry)
        _send_entries(
            "SQS",
            lambda e: self.sqs.send_message_batch(QueueUrl=self.url, Entries=e),
            entries,
        )

    def _publish_batch(self, batch: list[str]) -> None:
        entries = {str(i): {"Id": str(i), "Message": body} for i, body in enumerate(batch)}
        _send_entries(
            "SNS",
            lambda e: self.sns.publish_batch(TopicArn=self.topic_arn, PublishBatchRequestEntries=e),
            entries,
        )

    # -- receive ------------------------------------------------------------------

    def receive(self, max_messages: int, visibility: float) -> list[Delivery]:
        """Up to ``max_messages`` visible messages, hidden for ``visibility``
        seconds (rounded up to whole seconds, at most 12 hours).

        Calls ``ReceiveMessage`` (10 at most a call, no long polling) until it
        has ``max_messages`` or a call returns nothing; a short poll samples
        SQS's servers, so it may return fewer messages than are visible.
        """
        timeout = _seconds(visibility, MAX_VISIBILITY)
        got: list[Delivery] = []
        while len(got) < max_messages:
            response = self.sqs.receive_message(
                QueueUrl=self.url,
                MaxNumberOfMessages=min(MAX_BATCH, max_messages - len(got)),
                VisibilityTimeout=timeout,
                WaitTimeSeconds=0,
                # SenderId: fire and sweep messages are obeyed only from the
                # scheduler role (fanout.schedules.guard).
                MessageSystemAttributeNames=[
                    "ApproximateReceiveCount",
                    "SenderId",
                    "SentTimestamp",
                ],
                MessageAttributeNames=[FAILURES],
            )
            messages = response.get("Messages") or []
            if not messages:
                break
            for m in messages:
                attributes = m.get("Attributes") or {}
                count = int(attributes.get("ApproximateReceiveCount", 1))
                got.append(
                    Delivery(
                        m["Body"],
                        m["ReceiptHandle"],
                        count,
                        message_id=m.get("MessageId", ""),
                        sender=attributes.get("SenderId"),
                        sent_at=sqs_sent_at(attributes),
                        failures=sqs_count(m.get("MessageAttributes")),
                    )
                )
        return got

    # -- settle -------------------------------------------------------------------

    def ack(self, receipt: str) -> None:
        """Delete the message. An invalid receipt (already deleted) is ignored; a
        stale one may still delete it in SQS (see the module doc)."""
        try:
            self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=receipt)
        except Exception as exc:
            if error_code(exc) not in _STALE_RECEIPT_CODES:
                raise
            log.debug("ack of a stale receipt ignored: %s", exc)

    def release(self, receipt: str, delay: float) -> None:
        """Make the message visible again after ``delay`` seconds (rounded up; at
        most 12 hours after its receive, SQS's limit). An invalid or expired
        receipt is ignored: the message is visible already, or gone."""
        try:
            self.sqs.change_message_visibility(
                QueueUrl=self.url,
                ReceiptHandle=receipt,
                VisibilityTimeout=_seconds(delay, MAX_VISIBILITY),
            )
        except Exception as exc:
            if error_code(exc) not in _STALE_RECEIPT_CODES:
                raise
            # Also "total visibility beyond 12 hours": the message then simply
            # becomes visible when its current timeout ends, and is claimed WAIT.
            log.debug("release of a stale receipt ignored: %s", exc)

    def release_failed(self, delivery: Delivery, delay: float) -> bool:
        """Hand back a delivery that failed, counting the failure: SQS cannot
        change a message, so a copy is sent, delayed by ``delay`` (rounded up;
        at most 900 s) and carrying the count as :data:`FAILURES`, and then the
        delivery is deleted. A crash in between leaves both, which the ledger
        tells apart; a copy that cannot be sent (SQS refuses or fails it) falls
        back to :meth:`release`, the failure not counted, and SQS's own redrive
        policy still bounds the message's receives. True once the copy is sent.

        The copy's ``SenderId`` is the caller's: a message whose sender is
        checked (a schedule's tick, a sweep) must be handed back with
        :meth:`release`, its receives counted instead."""
        entry: dict[str, Any] = {
            "QueueUrl": self.url,
            "MessageBody": delivery.body,
            "DelaySeconds": _seconds(delay, MAX_DELAY),
            "MessageAttributes": {
                FAILURES: {"DataType": "Number", "StringValue": str(delivery.failures + 1)}
            },
        }
        try:
            self.sqs.send_message(**_grouped(entry))
        except Exception:
            log.warning(
                "could not send the copy of a failed message; released instead", exc_info=True
            )
            self.release(delivery.receipt, delay)
            return False
        try:
            self.ack(delivery.receipt)
        except Exception:
            # The copy carries on. Not raised: the caller would report the
            # delivery released, and the original would come back beside its
            # copy, two lineages of one message each dead-lettered on its own.
            # The Lambda event source deletes a delivery it is not told failed.
            log.warning("could not delete a failed message sent again as a copy", exc_info=True)
        return True

    def pending(self) -> int:
        """Messages not yet deleted: visible, delayed and in flight (SQS's
        approximate counts, which lag by up to a minute)."""
        names = [
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        ]
        response = self.sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=names)
        attributes = response.get("Attributes") or {}
        return sum(int(attributes.get(name, 0)) for name in names)

    def redrive(self, limit: int = 1000) -> int:
        """Move messages from the dead-letter queue (its URL from the queue's
        ``RedrivePolicy``) back to this queue, straight to SQS. Done by hand, not
        with ``StartMessageMoveTask``: emulators (moto) lack it, and a sweep
        moves at most ``limit`` messages at a time.

        A message counts its trips in the ``fanout-redrives`` attribute: one that
        was already moved back :data:`MAX_REDRIVES` times stays in the DLQ (a
        poison message that fails before the ledger sees it would otherwise
        circle forever), and is logged."""
        try:
            dlq = self._dead_letter_url()
        except Exception as exc:
            if error_code(exc) not in ("AccessDenied", "AccessDeniedException"):
                raise
            # A role without DLQ access (a worker outside the stack): recovery
            # still does the rest, and says what it cannot do.
            log.warning("cannot read the dead-letter queue of %s: %s", self.url, exc)
            return 0
        if dlq is None:
            return 0
        moved = 0
        while moved < limit:
            messages = self.sqs.receive_message(
                QueueUrl=dlq,
                MaxNumberOfMessages=min(MAX_BATCH, limit - moved),
                VisibilityTimeout=REDRIVE_VISIBILITY,
                MessageAttributeNames=[REDRIVES, FAILURES],
            ).get("Messages", [])
            if not messages:
                break
            back = []
            for m in messages:
                trips = sqs_count(m.get("MessageAttributes"), REDRIVES)
                if trips >= MAX_REDRIVES:
                    log.error(
                        "message %s stays in the DLQ after %d redrives", m["MessageId"], trips
                    )
                else:
                    back.append((m, trips + 1))
            if not back:
                continue
            entries = {
                str(i): _redriven(m, trips) | {"Id": str(i)} for i, (m, trips) in enumerate(back)
            }
            refused = []
            # Within SQS's limit on a whole batch too: ten large messages in one
            # were refused together (BatchRequestTooLong), small ones with them.
            for group in _by_size(entries):
                refused += _send_entries(
                    "SQS",
                    lambda batch: self.sqs.send_message_batch(QueueUrl=self.url, Entries=batch),
                    group,
                    keep_going=True,
                )
            for failed in refused:
                # Left in the DLQ, not lost; one such message must not stop the
                # sweep (recovery's other steps come after this one).
                m = back[int(failed["Id"])][0]
                log.error(
                    "message %s stays in the DLQ: SQS refused to take it back: %s: %s",
                    m["MessageId"],
                    failed.get("Code"),
                    failed.get("Message"),
                )
            left = {f["Id"] for f in refused}
            taken = [(i, m) for i, (m, _) in enumerate(back) if str(i) not in left]
            if taken:
                # Deleted only once re-sent: a crash in between duplicates, never loses.
                self.sqs.delete_message_batch(
                    QueueUrl=dlq,
                    Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in taken],
                )
            moved += len(taken)
        if moved:
            log.warning("moved %d dead-lettered messages back to %s", moved, self.url)
        return moved

    def _dead_letter_url(self) -> str | None:
        """The DLQ's URL from the queue's redrive policy (looked up once)."""
        if self._dlq_known:
            return self._dlq_url
        attributes = (
            self.sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["RedrivePolicy"]).get(
                "Attributes"
            )
            or {}
        )
        policy = attributes.get("RedrivePolicy")
        url: str | None = None
        if policy:
            arn = str(json.loads(policy)["deadLetterTargetArn"])
            account, name = arn.split(":")[4], arn.split(":")[5]
            url = self.sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]
        self._dlq_url, self._dlq_known = url, True
        return url

    def close(self) -> None:
        """Nothing to release: the boto3 client is shared by the process."""


def _by_size(entries: dict[str, dict[str, Any]]) -> Iterator[dict[str, dict[str, Any]]]:
    """``entries`` in groups whose bodies and attributes (counted at
    :data:`ATTRIBUTE_ROOM` an entry) fit one batch of SQS's message limit."""
    group: dict[str, dict[str, Any]] = {}
    total = 0
    for key, entry in entries.items():
        size = len(entry["MessageBody"].encode()) + ATTRIBUTE_ROOM
        if group and total + size > SQS_LIMIT:
            yield group
            group, total = {}, 0
        group[key] = entry
        total += size
    if group:
        yield group


def _redriven(message: dict[str, Any], trips: int) -> dict[str, Any]:
    """The batch entry moving ``message`` back from the DLQ on its ``trips``-th
    trip: its failures still counted, its fair-share group kept."""
    attributes = {REDRIVES: {"DataType": "Number", "StringValue": str(trips)}}
    failures = sqs_count(message.get("MessageAttributes"))
    if failures:
        attributes[FAILURES] = {"DataType": "Number", "StringValue": str(failures)}
    return _grouped({"MessageBody": message["Body"], "MessageAttributes": attributes})


def _grouped(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` (a send's, its body under ``MessageBody``) with its message's
    fair-share group (:mod:`fanout.fairness`), which SQS fair queues key on."""
    group = group_of(entry["MessageBody"])
    if group:
        entry["MessageGroupId"] = group
    return entry


def _send_entries(
    service: str,
    call: Callable[[list[dict[str, Any]]], dict[str, Any]],
    entries: dict[str, dict[str, Any]],
    *,
    keep_going: bool = False,
) -> list[dict[str, Any]]:
    """Send a batch with ``call`` (``SendMessageBatch`` or ``PublishBatch``: the
    same ``Failed`` answer), re-sending the entries the service failed on its
    side; the sender's faults are ``ValueError`` (resending cannot help), or,
    with ``keep_going``, returned (the service's ``Failed`` entries) while the
    rest are sent."""
    refused: list[dict[str, Any]] = []
    for attempt in range(1, SEND_ATTEMPTS + 1):
        response = call(list(entries.values()))
        failed = response.get("Failed") or []
        sender_faults = [f for f in failed if f.get("SenderFault")]
        if sender_faults and not keep_going:
            first = sender_faults[0]
            raise ValueError(
                f"{service} refused {len(sender_faults)} message(s):"
                f" {first.get('Code')}: {first.get('Message')}"
            )
        refused += sender_faults
        failed = [f for f in failed if not f.get("SenderFault")]
        if not failed:
            return refused
        entries = {f["Id"]: entries[f["Id"]] for f in failed}
        log.warning(
            "%s failed %d of a batch (attempt %d): %s",
            service,
            len(entries),
            attempt,
            failed[0].get("Code"),
        )
        time.sleep(min(0.1 * 2**attempt, 2.0))
    raise RuntimeError(f"{service} kept failing {len(entries)} message(s) of a batch")


def topic_arn(sns: Any, topic: str) -> str:
    """The ARN of ``topic`` (an ARN, used as is, or a name). A name is resolved
    with ``CreateTopic``, which is idempotent and returns the existing topic's
    ARN; it needs ``sns:CreateTopic``, so production settings should give ARNs."""
    if topic.startswith("arn:"):
        return topic
    return str(sns.create_topic(Name=topic)["TopicArn"])


def _batches(bodies: Sequence[str], sizes: Sequence[int], max_bytes: int) -> Iterator[list[str]]:
    """Groups of at most 10 bodies and ``max_bytes`` in all (SQS's batch limits)."""
    batch: list[str] = []
    total = 0
    for body, size in zip(bodies, sizes, strict=True):
        if batch and (len(batch) == MAX_BATCH or total + size > max_bytes):
            yield batch
            batch, total = [], 0
        batch.append(body)
        total += size
    if batch:
        yield batch
