"""Quick chunks claimed and committed in batches (``fanout.batches``), driven
through the dispatcher in this process on the local backend."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.base import Backend, RunState, TaskKey
from fanout.dispatch import Dispatcher
from fanout.outcomes import Handled
from support.helpers import TREE
from support.procs import outcomes
from testjobs.tree import Params, expected_items


@pytest.fixture
def local(home: Path) -> Iterator[Backend]:
    backend = open_backend("local", home=home)
    yield backend
    backend.close()


def _planned(backend: Backend, **params: Any) -> tuple[str, Dispatcher]:
    """A tree run whose plan ran: its chunks' messages are queued."""
    run_id = coordinator.submit(backend, TREE, params).run_id
    dispatcher = Dispatcher(backend)
    [plan] = backend.queue.receive(1, 30)
    assert dispatcher.handle(plan, 20) == Handled.COMMITTED
    return run_id, dispatcher


def _exactly_once(backend: Backend, run_id: str, **params: Any) -> None:
    items = Counter(r["item"] for r in coordinator.committed_records(backend, run_id))
    assert [i for i, n in items.items() if n > 1] == []
    assert set(items) == expected_items(Params(**params))


@contextmanager
def _transactions(backend: Backend) -> Iterator[list[str]]:
    """The write transactions the ledger opens meanwhile."""
    db: Any = backend.ledger.db  # type: ignore[attr-defined]
    real, seen = db.write, []

    @contextmanager
    def counted() -> Iterator[Any]:
        seen.append("write")
        with real() as conn:
            yield conn

    db.write = counted
    try:
        yield seen
    finally:
        db.write = real


def test_ten_quick_chunks_take_one_transaction_to_claim_and_one_to_commit(
    local: Backend,
) -> None:
    run_id, dispatcher = _planned(local, chunks=12, rows=3)
    deliveries = local.queue.receive(10, 30)
    assert len(deliveries) == 10
    with _transactions(local) as seen:
        results = dispatcher.handle_many(deliveries, 20)
    assert results == [Handled.COMMITTED] * 10
    assert len(seen) == 2  # one claim_many, one commit_many
    run = local.ledger.get_run(run_id)
    assert run is not None and (run.tasks_done, run.records) == (11, 30)
    assert dispatcher.handle_many(local.queue.receive(10, 30), 20) == [Handled.COMMITTED] * 2
    run = local.ledger.get_run(run_id)
    assert run is not None and run.state == RunState.SUCCEEDED and run.records == 36
    _exactly_once(local, run_id, chunks=12, rows=3)


def test_a_long_chunk_hands_back_the_rest_of_its_batch_unstarted(local: Backend) -> None:
    """Chunk 0 sleeps 1.5 s on its first attempt, past START_SLACK: the five
    claimed after it are handed back at once, not run with leases counted from
    a claim long past; each then runs once."""
    params = {"chunks": 6, "rows": 2, "sleep_chunks": [0], "sleep": 1.5}
    run_id, dispatcher = _planned(local, **params)
    first = local.queue.receive(10, 30)
    assert len(first) == 6
    results = dispatcher.handle_many(first, 20)
    assert results == [Handled.COMMITTED] + [Handled.RETRY] * 5
    again = local.queue.receive(10, 30)  # visible again at once
    assert len(again) == 5
    assert dispatcher.handle_many(again, 20) == [Handled.COMMITTED] * 5
    run = local.ledger.get_run(run_id)
    assert run is not None and run.state == RunState.SUCCEEDED
    for i in range(1, 6):
        task = local.ledger.get_task(TaskKey(run_id, f"0/{i}"))
        assert task is not None and outcomes(task) == ["interrupted", "committed"]
        assert str(task.history[0]["error"]).startswith("handed back unstarted")
    _exactly_once(local, run_id, **params)


def test_a_chunk_that_spawns_is_committed_before_the_next_starts(local: Backend) -> None:
    """A child waits for its own parent's commit, not for the parent's batch:
    the parent's commit is written before the next chunk of the batch runs."""
    run_id, dispatcher = _planned(local, chunks=3, rows=1, children=2, depth=1)
    deliveries = local.queue.receive(10, 30)
    assert len(deliveries) == 3
    seen: list[str] = []
    real = dispatcher.runner.work

    def work(ask: Any, attempt: Any) -> Any:
        done = [
            t.chunk_id
            for t in local.ledger.list_tasks(run_id)
            if t.state == "done" and t.chunk_id.count("/") == 1
        ]
        seen.append(f"{ask.key.chunk_id} after {','.join(done)}")
        return real(ask, attempt)

    dispatcher.runner.work = work  # type: ignore[method-assign]
    assert dispatcher.handle_many(deliveries, 20) == [Handled.COMMITTED] * 3
    assert seen == ["0/0 after ", "0/1 after 0/0", "0/2 after 0/0,0/1"]
    children = local.queue.receive(10, 30)
    assert len(children) == 6
    assert dispatcher.handle_many(children, 20) == [Handled.COMMITTED] * 6
    _exactly_once(local, run_id, chunks=3, rows=1, children=2, depth=1)


def test_invalid_bodies_in_a_batch_are_dead_lettered_and_the_rest_run(local: Backend) -> None:
    run_id, dispatcher = _planned(local, chunks=2, rows=1)
    local.queue.send(['{"v": 1, "run_id": "x", "chunk_id": "../etc"}', "not json"])
    deliveries = local.queue.receive(10, 30)
    assert len(deliveries) == 4
    results = dispatcher.handle_many(deliveries, 20)
    assert sorted(results) == sorted(
        [Handled.COMMITTED, Handled.COMMITTED, Handled.INVALID, Handled.INVALID]
    )
    assert local.queue.pending() == 0
    _exactly_once(local, run_id, chunks=2, rows=1)
