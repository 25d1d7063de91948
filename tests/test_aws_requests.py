"""What the AWS backend costs in API calls (moto, in process): fanning out
1,000 children takes at most 110 SQS/SNS calls, and an ETL chunk makes a small,
fixed number of DynamoDB writes. Calls are counted, not timed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.aws import AwsSettings
from fanout.backends.aws.clients import clear_cache, client
from fanout.backends.aws.resources import create_resources
from fanout.backends.base import Backend
from fanout.dispatch import Dispatcher
from fanout.runner import LEASE_GRACE
from support.helpers import TREE, fake_aws

ETL = str(Path(__file__).resolve().parents[1] / "jobs" / "meter_readings.py")
WRITES = ("PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems")


class Calls:
    """Counts the API calls every fanout client makes, by ``service.Operation``."""

    def __init__(self, settings: AwsSettings, services: tuple[str, ...]) -> None:
        self.counts: Counter[str] = Counter()
        for service in services:
            client(service, settings).meta.events.register("before-call", self._count)

    def _count(self, event_name: str, **_: Any) -> None:
        _, service, operation = event_name.split(".")
        self.counts[f"{service}.{operation}"] += 1

    def of(self, *services: str) -> int:
        return sum(n for k, n in self.counts.items() if k.split(".")[0] in services)


@pytest.fixture(params=["sqs", "sns"])
def aws(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """The AWS backend, dispatching straight to SQS or through an SNS topic."""
    env = {"FANOUT_STAGE": "calls"}
    if request.param == "sns":
        env["FANOUT_AWS_DISPATCH_TOPIC"] = "fanout-calls-dispatch"
    fake_aws(monkeypatch, **env)
    clear_cache()
    with mock_aws():
        create_resources(AwsSettings.from_env())
        backend = open_backend("aws")
        yield backend
        backend.close()
    clear_cache()


def _handle_one(backend: Backend) -> str:
    (delivery,) = backend.queue.receive(1, 30 + LEASE_GRACE)
    return Dispatcher(backend).handle(delivery, 30)


def test_a_thousand_children_take_at_most_110_queue_calls(aws: Backend) -> None:
    calls = Calls(AwsSettings.from_env(), ("sqs", "sns", "dynamodb", "s3"))
    run_id = coordinator.submit(aws, TREE, {"chunks": 1000, "rows": 1}).run_id
    assert _handle_one(aws) == "committed"  # the plan: registers and sends 1,000 children
    run = aws.ledger.get_run(run_id)
    assert run is not None and run.tasks_total == 1001
    queue_calls = calls.of("sqs", "sns")
    print(f"\n1,000 children: {queue_calls} SQS/SNS calls {dict(sorted(calls.counts.items()))}")
    assert queue_calls <= 110
    # Everything sent arrived (10 a call, none lost).
    assert aws.queue.pending() == 1000


def test_dynamodb_writes_per_etl_chunk_are_counted(aws: Backend) -> None:
    run_id = coordinator.submit(aws, ETL).run_id
    assert _handle_one(aws) == "committed"  # the plan
    calls = Calls(AwsSettings.from_env(), ("dynamodb", "s3", "sqs", "sns"))
    assert _handle_one(aws) == "committed"  # one chunk: one CSV file of readings
    writes = {k: n for k, n in calls.counts.items() if k.split(".")[1] in WRITES}
    total = sum(writes.values())
    print(f"\nETL chunk: {total} DynamoDB writes {writes}; all calls {dict(calls.counts)}")
    # Claim (lease) and commit, one conditional write each; nothing per record.
    assert sum(writes.values()) <= 3, writes
    assert calls.counts["s3.PutObject"] == 1  # the chunk's Avro file
    assert coordinator.get_run(aws, run_id).records > 0
