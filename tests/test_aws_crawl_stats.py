"""Counters on DynamoDB: a crawl's per-domain ones, any number of domains per
chunk and per run, and a job's own, any number of names per chunk. Summed
into the run item's commit update, they broke DynamoDB's limits: the commit's
update expression passed 4 KB at about 30 domains (or 70 names) in one chunk
(the commit failed, and with it the chunk), and the run item 400 KB after
some thousands of domains."""

from __future__ import annotations

import time
from typing import Any

import pytest

from fanout import coordinator
from fanout.backends.base import Backend, RunRecord, TaskEvent, TaskKey
from support.helpers import TREE

PAGES = {"pages": 3, "status/200": 3}


def _commit(aws: Backend, run: RunRecord, domains: int, start: int = 0) -> None:
    """The root task of ``run`` committed with the stats of ``domains`` domains."""
    key = TaskKey(run.run_id, "0", 0)
    assert aws.ledger.claim(key, "tok", 30, 3, time.time()).outcome.value == "claimed"
    stats = dict(PAGES)
    for i in range(start, start + domains):
        stats[f"domain/site{i}.example.com/pages"] = 1
        stats[f"domain/site{i}.example.com/status/200"] = 1
    settle = aws.ledger.commit(key, "tok", None, TaskEvent.COMMITTED, time.time(), stats)
    assert settle.ok


def test_a_chunk_of_fifty_domains_commits_with_its_stats(aws: Backend) -> None:
    run = coordinator.submit(aws, TREE, {"chunks": 1}).run_id
    _commit(aws, coordinator.get_run(aws, run), 50)
    stats = coordinator.get_run(aws, run).stats
    assert stats["pages"] == 3 and stats["status/200"] == 3
    assert stats["domain/site0.example.com/pages"] == 1
    assert stats["domain/site49.example.com/status/200"] == 1
    assert len([k for k in stats if k.startswith("domain/")]) == 100


def test_more_domains_than_a_transaction_holds_are_all_counted_once(aws: Backend) -> None:
    run = coordinator.submit(aws, TREE, {"chunks": 1}).run_id
    _commit(aws, coordinator.get_run(aws, run), 250)
    stats = coordinator.get_run(aws, run).stats
    domains = {k: v for k, v in stats.items() if k.startswith("domain/")}
    assert len(domains) == 500 and set(domains.values()) == {1}
    # The run's own item keeps the run's counters, not one per domain.
    raw = aws.ledger.get_run(run)
    assert raw is not None and not [k for k in raw.stats if k.startswith("domain/")]


def test_what_is_added_after_the_commit_is_only_the_committed_attempts(aws: Backend) -> None:
    from fanout.backends.aws.ledger import DynamoLedger

    run = coordinator.submit(aws, TREE, {"chunks": 1}).run_id
    _commit(aws, coordinator.get_run(aws, run), 1)
    ledger = aws.ledger
    assert isinstance(ledger, DynamoLedger)
    late = ledger._domain_entries(run, {"late.example.com": {"pages": 5}})
    ledger._add_after_commit(TaskKey(run, "0", 0), "another-attempt", [late])
    assert "domain/late.example.com/pages" not in coordinator.get_run(aws, run).stats
    ledger._add_after_commit(TaskKey(run, "0", 0), "tok", [late])
    assert coordinator.get_run(aws, run).stats["domain/late.example.com/pages"] == 5


def test_a_chunk_counting_by_two_hundred_names_commits_them_all(aws: Backend) -> None:
    # ctx.stats counts by any name (by country, by status code). Summed in the
    # commit's update of the run item, about 70 names passed DynamoDB's 4 KB
    # expression limit: the commit was refused on AWS, where the local
    # backend took it.
    run = coordinator.submit(aws, TREE, {"chunks": 1}).run_id
    key = TaskKey(run, "0", 0)
    assert aws.ledger.claim(key, "tok", 30, 3, time.time()).outcome.value == "claimed"
    stats = {f"country/{i:03d}": i + 1 for i in range(200)}
    assert aws.ledger.commit(key, "tok", None, TaskEvent.COMMITTED, time.time(), stats).ok
    assert coordinator.get_run(aws, run).stats == stats


def test_a_batch_whose_answer_was_lost_is_tried_again_under_the_same_token(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DynamoDB applies a ClientRequestToken once: the retry of a call that may
    # have landed must carry the same one, or it counts again. A cancelled
    # transaction wrote nothing: that one is tried under a new token.
    from botocore.exceptions import ClientError, ReadTimeoutError

    from fanout.backends.aws.ledger import DynamoLedger

    run = coordinator.submit(aws, TREE, {"chunks": 1}).run_id
    _commit(aws, coordinator.get_run(aws, run), 1)
    ledger = aws.ledger
    assert isinstance(ledger, DynamoLedger)
    tokens: list[str] = []
    failures = [
        ReadTimeoutError(endpoint_url="https://dynamodb"),
        ClientError(
            {
                "Error": {"Code": "TransactionCanceledException", "Message": "conflict"},
                "CancellationReasons": [{"Code": "None"}, {"Code": "TransactionConflict"}],
            },  # type: ignore[typeddict-unknown-key]
            "TransactWriteItems",
        ),
    ]
    transact = ledger.client.transact_write_items

    def flaky(**kwargs: Any) -> Any:
        tokens.append(kwargs["ClientRequestToken"])
        if failures:
            raise failures.pop(0)
        return transact(**kwargs)

    monkeypatch.setattr(ledger.client, "transact_write_items", flaky)
    late = ledger._domain_entries(run, {"late.example.com": {"pages": 5}})
    ledger._add_after_commit(TaskKey(run, "0", 0), "tok", [late])
    assert len(tokens) == 3
    assert tokens[0] == tokens[1]  # the answer was lost: the same token
    assert tokens[2] != tokens[1]  # cancelled: a new one
    assert coordinator.get_run(aws, run).stats["domain/late.example.com/pages"] == 5


def test_a_run_record_with_no_room_for_more_counters_still_commits_its_chunks(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At DynamoDB's 400 KB for the run's item (moto does not enforce it), the
    # commit's transaction was refused whole, retried, and refused again: no
    # chunk of the run could commit. The chunk now commits without its counters.
    ledger: Any = aws.ledger
    transact = ledger._transact

    def full_run_item(items: Any, token: str | None = None) -> Any:
        updates = [i.get("Update", {}) for i in items]
        if any("#stats" in u.get("ExpressionAttributeNames", {}) for u in updates):
            return ["ValidationError" if "#stats" in str(i) else "None" for i in items]
        return transact(items, token)

    monkeypatch.setattr(ledger, "_transact", full_run_item)
    run = coordinator.submit(aws, TREE, {"chunks": 1}).run_id
    key = TaskKey(run, "0", 0)
    assert ledger.claim(key, "tok", 30, 3, time.time()).outcome.value == "claimed"
    settle = ledger.commit(key, "tok", None, TaskEvent.COMMITTED, time.time(), {"pages": 3})
    assert settle.ok
    record = coordinator.get_run(aws, run)
    assert record.tasks_done == 1 and "pages" not in record.stats
