"""Quick chunks claimed and committed in batches (``fanout.batches``), driven
through the dispatcher in this process on the local backend."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fanout import control_ops, coordinator
from fanout.backends import open_backend
from fanout.backends.base import Backend, Failure, FailureKind, RunState, TaskKey
from fanout.dispatch import Dispatcher
from fanout.failures import Attempt
from fanout.outcomes import Handled
from fanout.runner import Runner
from fanout.worker import WorkerOptions, WorkerPool
from support.helpers import TREE
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


def local_home(backend: Backend) -> Path:
    """The home directory of a local backend (its database's folder)."""
    return Path(backend.ledger.db.path).parent  # type: ignore[attr-defined]


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


def test_a_long_chunk_gives_back_the_rest_of_its_batch_unstarted(local: Backend) -> None:
    """Chunk 0 sleeps 1.5 s on its first attempt: while it runs, the watchdog
    gives back the five claims after it, as if never made (no attempt counted,
    nothing in their history), and their messages are visible again at once,
    for other workers, before chunk 0 is done."""
    params = {"chunks": 6, "rows": 2, "sleep_chunks": [0], "sleep": 1.5}
    run_id, dispatcher = _planned(local, **params)
    first = local.queue.receive(10, 30)
    assert len(first) == 6
    seen_meanwhile: list[int] = []
    real = dispatcher.runner.work

    def work(ask: Any, attempt: Any) -> Any:
        out = real(ask, attempt)
        if ask.key.chunk_id == "0/0":
            seen_meanwhile.append(len(other.queue.receive(10, 30)))
        return out

    other = open_backend("local", home=local_home(local))
    try:
        dispatcher.runner.work = work  # type: ignore[method-assign]
        results = dispatcher.handle_many(first, 20)
    finally:
        other.close()
    assert results == [Handled.COMMITTED] + [Handled.HANDED_BACK] * 5
    assert seen_meanwhile == [5]  # another worker could take them while 0/0 ran
    run = local.ledger.get_run(run_id)
    assert run is not None and run.retries == 0
    for i in range(1, 6):
        task = local.ledger.get_task(TaskKey(run_id, f"0/{i}"))
        assert task is not None and task.state == "queued"
        assert (task.attempt, task.history) == (0, [])


def test_a_chunk_that_runs_long_gets_the_finished_ones_before_it_committed(
    local: Backend,
) -> None:
    """Chunk 2 of the batch sleeps 1 s: the two quick chunks before it are
    committed while it runs, not after."""
    params = {"chunks": 3, "rows": 1, "sleep_chunks": [2], "sleep": 1.0}
    run_id, dispatcher = _planned(local, **params)
    deliveries = local.queue.receive(10, 30)
    done_while_sleeping: list[list[str]] = []
    real = dispatcher.runner.work

    def work(ask: Any, attempt: Any) -> Any:
        out = real(ask, attempt)
        if ask.key.chunk_id == "0/2":
            tasks = local.ledger.list_tasks(run_id)
            done_while_sleeping.append(sorted(t.chunk_id for t in tasks if t.state == "done"))
        return out

    dispatcher.runner.work = work  # type: ignore[method-assign]
    assert dispatcher.handle_many(deliveries, 20) == [Handled.COMMITTED] * 3
    assert done_while_sleeping == [["0", "0/0", "0/1"]]
    _exactly_once(local, run_id, **params)


@pytest.mark.parametrize("control", ["cancel", "pause"])
def test_a_run_stopped_or_paused_mid_batch_starts_no_more_of_its_chunks(
    local: Backend, control: str
) -> None:
    """Another worker cancels (or pauses) the run while the batch's first chunk
    runs: the claims after it were made before, but none of them starts; they
    are given back, then cancelled at their claim (or, paused, dropped for
    ``fanout resume``). They used to run and commit after the stop."""
    run_id, dispatcher = _planned(local, chunks=5, rows=1)
    deliveries = local.queue.receive(10, 30)
    assert len(deliveries) == 5
    started: list[str] = []
    real = dispatcher.runner.work

    def work(ask: Any, attempt: Any) -> Any:
        started.append(ask.key.chunk_id)
        if len(started) == 1:
            other = open_backend("local", home=local_home(local))
            try:
                getattr(control_ops, control)(other, run_id)
            finally:
                other.close()
        return real(ask, attempt)

    dispatcher.runner.work = work  # type: ignore[method-assign]
    results = dispatcher.handle_many(deliveries, 20)
    assert started == ["0/0"]
    assert results == [Handled.COMMITTED] + [Handled.HANDED_BACK] * 4
    # Their messages are back at once; claimed again, they are settled by the control.
    again = local.queue.receive(10, 30)
    assert len(again) == 4
    outcome = Handled.CANCELLED if control == "cancel" else Handled.PAUSED
    assert [dispatcher.handle(d, 20) for d in again] == [outcome] * 4
    assert started == ["0/0"]
    tasks = {t.chunk_id: t for t in local.ledger.list_tasks(run_id)}
    for i in range(1, 5):
        task = tasks[f"0/{i}"]
        assert task.attempt == 0  # never started: no attempt counted
        assert task.state == ("cancelled" if control == "cancel" else "queued")


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


# -- a child that dies in a batch -------------------------------------------------


class _ChildDied(BaseException):
    """Stands for os._exit in the chunk: nothing after it runs in the child."""


def test_a_duplicate_in_the_same_batch_is_settled_with_it_not_a_lease_later(
    local: Backend,
) -> None:
    # Two deliveries of one task in a batch: the second's claim met the
    # first's live lease and was handed back for the rest of that lease (the
    # chunk timeout and more), which `worker --until-idle` then waited out.
    run_id, dispatcher = _planned(local, chunks=3, rows=2)
    deliveries = local.queue.receive(3, 30)
    local.queue.send([deliveries[0].body])  # SQS delivers at least once
    [duplicate] = local.queue.receive(1, 30)
    results = dispatcher.handle_many([*deliveries, duplicate], 20)
    assert results == [Handled.COMMITTED] * 3 + [Handled.FINISHED]
    assert local.queue.pending() == 0  # nothing handed back to come again later
    assert local.ledger.get_run(run_id).state == RunState.SUCCEEDED  # type: ignore[union-attr]
    _exactly_once(local, run_id, chunks=3, rows=2)


def test_a_batch_child_that_died_leaves_its_chunk_hidden_until_failed(home: Path) -> None:
    """The supervisor hands back what a dead child held, and must not make the
    chunk in hand visible before it has recorded the crash: another child would
    get the message, find the dead attempt's lease still held, and put it off
    for the whole lease (timeout + grace)."""
    pool = WorkerPool(WorkerOptions(backend="local", home=home, workers=1, chunk_timeout=20))
    backend, slot = pool.backend, pool.slots[0]
    run_id, _ = _planned(backend, chunks=3, rows=3)
    deliveries = backend.queue.receive(10, 60)
    assert len(deliveries) == 3

    def start_and_die(attempt: Attempt) -> None:
        slot.start(attempt)
        raise _ChildDied

    child = Dispatcher(backend, Runner(backend, on_start=start_and_die))
    slot.hold([d.receipt for d in deliveries])  # as _child_main does around a batch
    with pytest.raises(_ChildDied):
        child.handle_many(deliveries, 20, on_batch=slot.hold_batch)
    in_hand = slot.attempt.value.decode()

    pool._release_prefetched(slot)
    # The two claims not started are given back and their messages are visible;
    # the chunk in hand is not, until the supervisor fails it.
    other = Dispatcher(backend)
    visible = backend.queue.receive(10, 60)
    assert len(visible) == 2 and all(d.receipt not in in_hand for d in visible)
    assert [other.handle(d, 20) for d in visible] == [Handled.COMMITTED] * 2

    attempt = slot.take()
    assert attempt is not None
    pool.runner.fail(attempt, Failure(FailureKind.CRASHED, "worker process exited with code 3"))
    deadline = time.monotonic() + 5  # the retry's back-off is at most 1 s
    while (run := backend.ledger.get_run(run_id)) is not None and run.state != RunState.SUCCEEDED:
        assert time.monotonic() < deadline, "the crashed chunk was not retried"
        for d in backend.queue.receive(10, 60):
            assert other.handle(d, 20) == Handled.COMMITTED
        time.sleep(0.05)
    _exactly_once(backend, run_id, chunks=3, rows=3)
    pool.backend.close()
