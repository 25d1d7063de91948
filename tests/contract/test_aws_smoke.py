"""The queue and store contracts on the AWS backend's SQS queue and S3 store,
under moto in this process (no network, no credentials).

The ledger is the local SQLite one until the DynamoDB ledger joins the shared
``conftest.py``; this module overrides the ``backend`` fixtures for its own
tests and collects the contract tests of ``test_queue_contract`` and
``test_store_contract`` again, so they run once more here, on AWS.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import test_queue_contract as queue_contract
import test_store_contract as store_contract

from fanout.backends.aws import AwsSettings
from fanout.backends.aws.clients import clear_cache
from fanout.backends.base import Backend
from fanout.backends.local.db import Database
from fanout.backends.local.ledger import SQLiteLedger
from helpers import fake_aws
from motopatch import patch_moto

moto = pytest.importorskip("moto")

Opener = Callable[[], Backend]

#: Contract tests that cannot run on in-process moto, and why.
NOT_HERE = {
    # Forked children get a copy of moto's in-process state, not a connection
    # to it (this one needs a moto server, or AWS).
    "test_concurrent_processes_never_share_a_message",
}

for _module in (queue_contract, store_contract):
    for _name, _test in vars(_module).items():
        if _name.startswith("test_") and callable(_test) and _name not in NOT_HERE:
            globals()[_name] = _test


@pytest.fixture
def aws_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[AwsSettings]:
    """Fake credentials, a region, and the stack's resources, under ``mock_aws``."""
    fake_aws(monkeypatch)
    patch_moto()
    clear_cache()
    settings = AwsSettings(
        queue="fanout-test-work",
        bucket="fanout-test-store",
        table="fanout-test-ledger",
        region="us-east-1",
    )
    with moto.mock_aws():
        from fanout.backends.aws.resources import create_bucket, create_queue

        create_queue(settings)
        create_bucket(settings)
        yield settings
    clear_cache()


def _open(settings: AwsSettings, ledger_path: Path) -> Backend:
    from fanout.backends.aws.queue import SqsQueue
    from fanout.backends.aws.store import S3Store

    return Backend(
        "aws",
        queue=SqsQueue(settings),
        store=S3Store(settings),
        ledger=SQLiteLedger(Database(ledger_path)),
    )


@pytest.fixture
def backend_name() -> str:
    return "aws"


@pytest.fixture
def backend(aws_settings: AwsSettings, tmp_path: Path) -> Iterator[Backend]:
    """SQS and S3 under moto, with a local ledger."""
    opened = _open(aws_settings, tmp_path / "ledger.db")
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def open_same(aws_settings: AwsSettings, tmp_path: Path) -> Iterator[Opener]:
    """Another backend on the same (moto) queue, bucket and ledger file."""
    opened: list[Backend] = []

    def opener() -> Backend:
        again = _open(aws_settings, tmp_path / "ledger.db")
        opened.append(again)
        return again

    yield opener
    for again in opened:
        again.close()


def test_not_run_here() -> None:
    """Lists the contract tests this module leaves out (see ``NOT_HERE``)."""
    pytest.skip(f"not on in-process moto: {', '.join(sorted(NOT_HERE))}")


# -- AWS-specific behaviour ------------------------------------------------------


def test_large_file_objects_go_in_parts(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import os

    from fanout.backends.aws import store as s3_store

    monkeypatch.setattr(s3_store, "SINGLE_PUT_BYTES", 1024 * 1024)
    monkeypatch.setattr(s3_store, "PART_BYTES", 5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024 + 3)
    store = backend.store
    assert store.put("runs/r1/big", io.BytesIO(data)) is True  # s3transfer
    assert store.get("runs/r1/big") == data
    assert store.put("runs/r1/once", io.BytesIO(data), if_absent=True) is True  # own parts
    assert store.put("runs/r1/once", io.BytesIO(data[::-1]), if_absent=True) is False
    assert store.get("runs/r1/once") == data
    assert list(store.list("runs/r1/")) == ["runs/r1/big", "runs/r1/once"]


def test_url_is_s3(backend: Backend, aws_settings: AwsSettings) -> None:
    assert backend.store.url("runs/r1/x") == f"s3://{aws_settings.bucket}/runs/r1/x"


def test_queue_by_url_and_long_delays(backend: Backend, aws_settings: AwsSettings) -> None:
    from fanout.backends.aws.queue import SqsQueue

    assert isinstance(backend.queue, SqsQueue)
    by_url = SqsQueue(AwsSettings(queue=backend.queue.url, region=aws_settings.region))
    by_url.send(["later"], delay=3600)  # sent delayed by SQS's maximum, 900 s
    assert backend.queue.pending() == 1
    assert backend.queue.receive(10, 60) == []


def test_settling_a_deleted_message_is_ignored(backend: Backend) -> None:
    q = backend.queue
    q.send(["m"])
    [d] = q.receive(1, 60)
    q.ack(d.receipt)
    q.ack(d.receipt)
    q.release(d.receipt, 0)
    assert q.pending() == 0


def test_resources_are_idempotent(aws_settings: AwsSettings) -> None:
    import json

    from fanout.backends.aws.clients import client
    from fanout.backends.aws.resources import create_resources

    made = create_resources(aws_settings)  # again: the fixture made them once
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


def _dead_letter_after_one_receive(backend: Backend) -> None:
    sqs, url = backend.queue.sqs, backend.queue.url  # type: ignore[attr-defined]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])
    policy = json.loads(attributes["Attributes"]["RedrivePolicy"])
    policy["maxReceiveCount"] = 1
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"RedrivePolicy": json.dumps(policy)})


def _poison(backend: Backend) -> None:
    """Receive and hand back everything; the next receive moves it to the DLQ."""
    for delivery in backend.queue.receive(10, 1):
        backend.queue.release(delivery.receipt, 0)
    assert backend.queue.receive(10, 1) == []


def test_redrive_moves_dead_lettered_messages_back(backend: Backend) -> None:
    _dead_letter_after_one_receive(backend)
    backend.queue.send(["poisoned-1", "poisoned-2", "fine"])
    assert backend.queue.redrive() == 0  # nothing dead-lettered yet
    for delivery in backend.queue.receive(10, 1):
        if delivery.body == "fine":
            backend.queue.ack(delivery.receipt)
        else:
            backend.queue.release(delivery.receipt, 0)
    # A second receive finds them over maxReceiveCount: SQS moves them to the DLQ.
    assert backend.queue.receive(10, 1) == []
    assert backend.queue.redrive() == 2
    back = sorted(d.body for d in backend.queue.receive(10, 30))
    assert back == ["poisoned-1", "poisoned-2"]


def test_a_message_redriven_too_often_stays_in_the_dead_letter_queue(backend: Backend) -> None:
    from fanout.backends.aws.queue import MAX_REDRIVES

    _dead_letter_after_one_receive(backend)
    backend.queue.send(["poison"])
    moved = []
    for _ in range(MAX_REDRIVES + 1):
        _poison(backend)
        moved.append(backend.queue.redrive())
    assert moved == [1] * MAX_REDRIVES + [0]
    assert backend.queue.receive(10, 1) == []
