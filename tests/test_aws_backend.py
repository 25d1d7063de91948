"""The AWS backend's own behaviour, beyond the contracts every backend keeps
(``tests/contract/`` runs those against it too): multipart uploads, SQS's
long delays and dead-letter redrive, idempotent resources, the table's
settings and registrations larger than one DynamoDB transaction. On moto in
this process (the ``aws`` fixture of ``conftest.py``)."""

from __future__ import annotations

import json
import time

import pytest

from fanout.backends.aws import AwsSettings
from fanout.backends.base import Backend, NewTask, RunRecord, TaskKey

RUN = "r1"
ROOT = TaskKey(RUN, "0", 0)


@pytest.fixture
def aws_settings(aws: Backend) -> AwsSettings:
    """The settings the ``aws`` backend was opened with."""
    return AwsSettings.from_env()


def _run(backend: Backend) -> None:
    record = RunRecord(
        run_id=RUN,
        job="/jobs/x.py",
        job_name="x",
        params={},
        settings={"max_attempts": 3},
        created_at=time.time(),
    )
    backend.ledger.create_run(record, NewTask("0", 0, 0, '{"m": 0}'))


def test_large_file_objects_go_in_parts(aws: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import os

    from fanout.backends.aws import store as s3_store

    monkeypatch.setattr(s3_store, "SINGLE_PUT_BYTES", 1024 * 1024)
    monkeypatch.setattr(s3_store, "PART_BYTES", 5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024 + 3)
    store = aws.store
    assert store.put("runs/r1/big", io.BytesIO(data)) is True  # s3transfer
    assert store.get("runs/r1/big") == data
    assert store.put("runs/r1/once", io.BytesIO(data), if_absent=True) is True  # own parts
    assert store.put("runs/r1/once", io.BytesIO(data[::-1]), if_absent=True) is False
    assert store.get("runs/r1/once") == data
    assert list(store.list("runs/r1/")) == ["runs/r1/big", "runs/r1/once"]


def test_url_is_s3(aws: Backend, aws_settings: AwsSettings) -> None:
    assert aws.store.url("runs/r1/x") == f"s3://{aws_settings.bucket}/runs/r1/x"


def test_queue_by_url_and_long_delays(aws: Backend, aws_settings: AwsSettings) -> None:
    from fanout.backends.aws.queue import SqsQueue

    assert isinstance(aws.queue, SqsQueue)
    by_url = SqsQueue(AwsSettings(queue=aws.queue.url, region=aws_settings.region))
    by_url.send(["later"], delay=3600)  # sent delayed by SQS's maximum, 900 s
    assert aws.queue.pending() == 1
    assert aws.queue.receive(10, 60) == []


def test_resources_are_idempotent(aws_settings: AwsSettings) -> None:
    from fanout.backends.aws.clients import client
    from fanout.backends.aws.resources import create_resources

    made = create_resources(aws_settings)  # again: the fixture made them once
    assert made["table"] is False  # found, not made again (and no ResourceInUseException)
    sqs = client("sqs", aws_settings)
    attributes = sqs.get_queue_attributes(QueueUrl=made["queue_url"], AttributeNames=["All"])[
        "Attributes"
    ]
    assert json.loads(attributes["RedrivePolicy"])["maxReceiveCount"] == 50
    assert attributes["SqsManagedSseEnabled"] == "true"
    s3 = client("s3", aws_settings)
    block = s3.get_public_access_block(Bucket=aws_settings.bucket)
    assert all(block["PublicAccessBlockConfiguration"].values())
    rules = s3.get_bucket_encryption(Bucket=aws_settings.bucket)[
        "ServerSideEncryptionConfiguration"
    ]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"


def _dead_letter_after_one_receive(aws: Backend) -> None:
    sqs, url = aws.queue.sqs, aws.queue.url  # type: ignore[attr-defined]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
    policy = json.loads(attributes["Attributes"]["RedrivePolicy"])
    policy["maxReceiveCount"] = 1
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"RedrivePolicy": json.dumps(policy)})


def _poison(aws: Backend) -> None:
    """Receive and hand back everything; the next receive moves it to the DLQ."""
    for delivery in aws.queue.receive(10, 1):
        aws.queue.release(delivery.receipt, 0)
    assert aws.queue.receive(10, 1) == []


def test_redrive_moves_dead_lettered_messages_back(aws: Backend) -> None:
    _dead_letter_after_one_receive(aws)
    aws.queue.send(["poisoned-1", "poisoned-2", "fine"])
    assert aws.queue.redrive() == 0  # nothing dead-lettered yet
    for delivery in aws.queue.receive(10, 1):
        if delivery.body == "fine":
            aws.queue.ack(delivery.receipt)
        else:
            aws.queue.release(delivery.receipt, 0)
    # A second receive finds them over maxReceiveCount: SQS moves them to the DLQ.
    assert aws.queue.receive(10, 1) == []
    assert aws.queue.redrive() == 2
    back = sorted(d.body for d in aws.queue.receive(10, 30))
    assert back == ["poisoned-1", "poisoned-2"]


def test_a_message_redriven_too_often_stays_in_the_dead_letter_queue(aws: Backend) -> None:
    from fanout.backends.aws.queue import MAX_REDRIVES

    _dead_letter_after_one_receive(aws)
    aws.queue.send(["poison"])
    moved = []
    for _ in range(MAX_REDRIVES + 1):
        _poison(aws)
        moved.append(aws.queue.redrive())
    assert moved == [1] * MAX_REDRIVES + [0]
    assert aws.queue.receive(10, 1) == []


def test_the_table_is_on_demand_and_encrypted(aws_settings: AwsSettings) -> None:
    import boto3

    table = boto3.client("dynamodb", region_name="us-east-1").describe_table(
        TableName=aws_settings.table
    )["Table"]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert table["SSEDescription"]["Status"] in ("ENABLED", "ENABLING")


def _many(n: int, tag: str) -> list[NewTask]:
    return [NewTask(f"0/{i}", 0, 1, f'{{"{tag}": {i}}}', "0", 0) for i in range(n)]


def test_a_registration_larger_than_a_transaction_counts_exactly(aws: Backend) -> None:
    """250 children: three transactions, one max_chunks check, exact counters."""
    ledger = aws.ledger
    _run(aws)
    now = time.time()
    ledger.claim(ROOT, "p1", 0.01, 3, now)
    assert ledger.register(RUN, _many(250, "a"), 250, spawned_by="p1").over_limit
    assert ledger.register(RUN, _many(250, "a"), 251, spawned_by="p1").created == 250
    run = ledger.get_run(RUN)
    assert run is not None and (run.outstanding, run.chunks_total) == (251, 251)
    # Attempt 2 re-registers 120 of them; its commit cancels the other 130 (two transactions).
    ledger.claim(ROOT, "p2", 30, 3, now + 1)
    assert ledger.register(RUN, _many(120, "b"), 251, spawned_by="p2").created == 0
    assert ledger.commit(ROOT, "p2", None, "committed", now + 2).ok
    run = ledger.get_run(RUN)
    assert run is not None and (run.outstanding, run.tasks_cancelled) == (120, 130)
    assert len(ledger.queued_children(ROOT)) == 120


#: SQS's own limit on a message: its body and its attributes together.
SQS_LIMIT = 256 * 1024


def _sqs_size(entry: dict[str, object]) -> int:
    """What real SQS counts against its limit: the body and each attribute's
    name, type and value (moto counts the body only)."""
    size = len(str(entry["MessageBody"]).encode())
    attributes = entry.get("MessageAttributes") or {}
    assert isinstance(attributes, dict)
    for name, value in attributes.items():
        size += len(name.encode()) + len(value["DataType"]) + len(value["StringValue"].encode())
    return size


def _real_sqs_sizes(aws: Backend, monkeypatch: pytest.MonkeyPatch, refuse: str = "") -> None:
    """Make the queue's client refuse what real SQS refuses: a message over its
    limit, attributes included (a batch entry as the sender's fault), a batch
    over it in all (the whole batch); and a
    body starting with ``refuse``, to stand for any entry SQS refuses."""
    sqs = aws.queue.sqs  # type: ignore[attr-defined]
    send_message, send_batch = sqs.send_message, sqs.send_message_batch

    def too_big(entry: dict[str, object]) -> bool:
        body = str(entry["MessageBody"])
        return _sqs_size(entry) > SQS_LIMIT or (bool(refuse) and body.startswith(refuse))

    def one(**call: object) -> object:
        if too_big(call):
            raise ValueError("InvalidParameterValue: message too long")
        return send_message(**call)

    def batch(QueueUrl: str, Entries: list[dict[str, object]]) -> dict[str, object]:
        if sum(_sqs_size(e) for e in Entries) > SQS_LIMIT:
            raise ValueError("BatchRequestTooLong: batch requests cannot be longer than 262144")
        ok = [e for e in Entries if not too_big(e)]
        answer = dict(send_batch(QueueUrl=QueueUrl, Entries=ok)) if ok else {}
        answer["Failed"] = [
            {"Id": e["Id"], "SenderFault": True, "Code": "InvalidParameterValue", "Message": "long"}
            for e in Entries
            if too_big(e)
        ]
        return answer

    monkeypatch.setattr(sqs, "send_message", one)
    monkeypatch.setattr(sqs, "send_message_batch", batch)


def test_the_largest_message_sent_can_be_handed_back_with_its_failure_count(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine sends a body of up to ``max_message_bytes`` as it is (larger
    ones go to the store): its copy, with the failure count, must fit SQS's
    limit too, or its failures would never be counted (each copy refused, the
    message only released) and it would go round far past five."""
    _real_sqs_sizes(aws, monkeypatch)
    body = "x" * aws.queue.max_message_bytes
    aws.queue.send([body])
    for failures in range(3):
        (delivery,) = aws.queue.receive(1, 30)
        assert (len(delivery.body), delivery.failures) == (len(body), failures)
        aws.queue.release_failed(delivery, 0)


def test_a_message_sqs_will_not_take_back_stays_in_the_dlq_and_the_sweep_goes_on(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One dead-lettered message SQS refuses to take back made every recovery
    sweep raise at its first step, so a run whose message was lost was never
    re-sent. It is left in the DLQ (logged); the others are moved back."""
    from fanout import coordinator
    from fanout.backends.base import TaskState

    _dead_letter_after_one_receive(aws)
    aws.queue.send(["refused by SQS", "poisoned"])
    _poison(aws)
    _real_sqs_sizes(aws, monkeypatch, refuse="refused")
    assert aws.queue.redrive() == 1
    (back,) = aws.queue.receive(10, 30)
    assert back.body == "poisoned"
    aws.queue.ack(back.receipt)
    # A run whose only message was lost: the sweep re-sends it all the same.
    _run(aws)
    assert aws.ledger.get_task(ROOT).state is TaskState.QUEUED  # type: ignore[union-attr]
    actions = coordinator.recover(aws, redrive=True)
    assert any("re-sent" in a for a in actions), actions
    (resent,) = aws.queue.receive(10, 30)
    assert resent.body == '{"m": 0}'


def test_a_redrive_that_fails_does_not_keep_the_sweep_from_the_rest(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its error (a throttled DLQ read, say) escaped recover() at its first
    # step: no stranded task was re-sent, no dead finalizer replaced. It is
    # raised at the end now, for the caller to report as before.
    from fanout import coordinator

    def throttled(limit: int = 1000) -> int:
        raise RuntimeError("ThrottlingException")

    monkeypatch.setattr(aws.queue, "redrive", throttled)
    _run(aws)  # a run whose only message was lost
    with pytest.raises(RuntimeError, match="Throttling"):
        coordinator.recover(aws, redrive=True)
    (resent,) = aws.queue.receive(10, 30)
    assert resent.body == '{"m": 0}'


def test_large_dead_lettered_messages_are_moved_back_in_batches_sqs_takes(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ten at a time whatever their size: three of the largest the engine sends
    # made a batch SQS refuses whole, every sweep, none of them moved.
    _dead_letter_after_one_receive(aws)
    bodies = [str(n) * aws.queue.max_message_bytes for n in range(3)]
    aws.queue.send(bodies)
    _poison(aws)
    _real_sqs_sizes(aws, monkeypatch)
    assert aws.queue.redrive() == 3
    back = sorted(d.body for d in aws.queue.receive(10, 30))
    assert back == bodies
