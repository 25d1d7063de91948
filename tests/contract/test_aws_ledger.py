"""The ledger contract against :class:`DynamoLedger`, on moto's in-process DynamoDB.

The fixtures here override the shared ones of ``conftest.py`` for this module
only: ``backend`` is a hybrid (a SQLite queue and a memory store around the
DynamoDB ledger, since only the ledger is under test), and ``open_same`` opens
a new ``DynamoLedger`` on the same moto table, so the reopen tests run too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from moto import mock_aws

# Collected again in this module, with the fixtures below. The directory has
# no __init__.py: pytest puts it on sys.path, so sibling test modules import
# by their plain names.
from test_ledger_contract import *  # noqa: F403
from test_ledger_contract import ROOT, RUN, _run

from fanout.backends.aws import AwsSettings
from fanout.backends.aws.ledger import DynamoLedger, create_table
from fanout.backends.base import Backend, NewTask
from fanout.backends.local.db import Database
from fanout.backends.local.queue import SQLiteQueue
from fanout.backends.memory import MemoryStore
from helpers import fake_aws

SETTINGS = AwsSettings(table="fanout-test-ledger", region="us-east-1")


@pytest.fixture
def backend_name() -> str:
    """Not parametrized: this module runs the contract on one backend."""
    return "aws-ledger"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fake credentials (never real ones) and moto's DynamoDB with the table."""
    fake_aws(monkeypatch)
    with mock_aws():
        create_table(SETTINGS)
        yield


def _open(home: Path) -> Backend:
    home.mkdir(parents=True, exist_ok=True)
    return Backend(
        "aws-ledger",
        queue=SQLiteQueue(Database(home / "queue.db")),
        store=MemoryStore(),
        ledger=DynamoLedger(SETTINGS),
    )


@pytest.fixture
def backend(aws: None, home: Path) -> Iterator[Backend]:
    """A hybrid backend whose ledger is DynamoDB (moto)."""
    opened = _open(home)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def open_same(aws: None, home: Path) -> Iterator[Callable[[], Backend]]:
    """Opens another backend on the same moto table (and queue file)."""
    opened: list[Backend] = []

    def opener() -> Backend:
        backend = _open(home)
        opened.append(backend)
        return backend

    yield opener
    for backend in opened:
        backend.close()


def test_the_table_is_on_demand_and_encrypted(aws: None) -> None:
    import boto3

    table = boto3.client("dynamodb", region_name="us-east-1").describe_table(
        TableName=SETTINGS.table
    )["Table"]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert table["SSEDescription"]["Status"] in ("ENABLED", "ENABLING")


def _many(n: int, tag: str) -> list[NewTask]:
    return [NewTask(f"0/{i}", 0, 1, f'{{"{tag}": {i}}}', "0", 0) for i in range(n)]


def test_a_registration_larger_than_a_transaction_counts_exactly(backend: Backend) -> None:
    """250 children: three transactions, one max_chunks check, exact counters."""
    ledger = backend.ledger
    _run(backend)
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
