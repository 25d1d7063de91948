"""The batch ledger contract (``BatchLedger``): a batch of claims or commits
answers each item exactly as the single call would have, in order, and moves
the run's counters by exactly the same amounts. Run against every backend
whose ledger is one (memory and local; DynamoDB's is not)."""

from __future__ import annotations

import time

import pytest

from fanout.backends.base import (
    Backend,
    BatchLedger,
    ClaimOutcome,
    ClaimRequest,
    CommitRequest,
    NewTask,
    Output,
    RunRecord,
    TaskEvent,
    TaskKey,
    TaskState,
)

RUN = "b1"
ROOT = TaskKey(RUN, "0", 0)


def _key(i: int) -> TaskKey:
    return TaskKey(RUN, f"0/{i}", 0)


def _batch_ledger(backend: Backend) -> BatchLedger:
    if not isinstance(backend.ledger, BatchLedger):
        pytest.skip(f"the {backend.name} ledger does not batch")
    return backend.ledger


def _run_with_children(backend: Backend, n: int) -> None:
    """A run whose root committed after registering ``n`` children."""
    now = time.time()
    record = RunRecord(RUN, "/jobs/x.py", "x", {}, {"max_attempts": 3}, created_at=now)
    backend.ledger.create_run(record, NewTask("0", 0, 0, '{"m": 0}'))
    assert backend.ledger.claim(ROOT, "root", 30.0, 3, now).outcome is ClaimOutcome.CLAIMED
    children = [NewTask(f"0/{i}", 0, 1, f'{{"c": {i}}}', "0", 0) for i in range(n)]
    assert backend.ledger.register(RUN, children, 100, spawned_by="root").created == n
    assert backend.ledger.commit(ROOT, "root", None, TaskEvent.COMMITTED, now).ok


def _claimed(backend: Backend, children: int, claimed: int) -> tuple[BatchLedger, float]:
    """A run of ``children`` children, the first ``claimed`` claimed in one batch
    (tokens ``t0``, ``t1``...): its ledger, and the time of the claims."""
    ledger = _batch_ledger(backend)
    _run_with_children(backend, children)
    now = time.time()
    asks = [ClaimRequest(_key(i), f"t{i}", 30.0, 3) for i in range(claimed)]
    assert all(c.outcome is ClaimOutcome.CLAIMED for c in ledger.claim_many(asks, now))
    return ledger, now


def test_a_batch_of_claims_answers_each_as_a_claim_would(backend: Backend) -> None:
    ledger = _batch_ledger(backend)
    _run_with_children(backend, 4)
    now = time.time()
    # 0/0 is held by a live lease; 0/1 is finished.
    assert backend.ledger.claim(_key(0), "other", 30.0, 3, now).outcome is ClaimOutcome.CLAIMED
    assert backend.ledger.claim(_key(1), "c1", 30.0, 3, now).outcome is ClaimOutcome.CLAIMED
    assert backend.ledger.commit(_key(1), "c1", None, TaskEvent.COMMITTED, now).ok

    asks = [ClaimRequest(_key(i), f"t{i}", 30.0, 3) for i in (0, 1, 2, 3)]
    asks.append(ClaimRequest(_key(9), "t9", 30.0, 3))  # never registered
    asks.append(ClaimRequest(_key(2), "again", 30.0, 3))  # claimed earlier in this batch
    claims = ledger.claim_many(asks, now)

    assert [c.outcome for c in claims] == [
        ClaimOutcome.BUSY,
        ClaimOutcome.FINISHED,
        ClaimOutcome.CLAIMED,
        ClaimOutcome.CLAIMED,
        ClaimOutcome.MISSING,
        ClaimOutcome.BUSY,
    ]
    assert claims[0].retry_after == pytest.approx(30.0, abs=1.0)
    for i in (2, 3):
        task = backend.ledger.get_task(_key(i))
        assert task is not None and task.state == TaskState.RUNNING
        assert (task.lease_token, task.attempt) == (f"t{i}", 1)
        assert claims[i].attempt == 1 and claims[i].task is not None
        assert claims[i].task.message == f'{{"c": {i}}}'


def test_a_batch_of_commits_moves_the_counters_exactly_and_drains_once(backend: Backend) -> None:
    ledger, now = _claimed(backend, children=4, claimed=4)

    def commit(i: int, token: str, records: int) -> CommitRequest:
        output = Output(f"runs/{RUN}/data/{i}.avro", records, 10 * records)
        return CommitRequest(
            _key(i), token, output, TaskEvent.COMMITTED, now, {"pages": records}, 0.5
        )

    # 0/1 with a token that does not hold its lease: refused, nothing counted.
    first = ledger.commit_many([commit(0, "t0", 2), commit(1, "stolen", 5)])
    assert [(s.ok, s.drained) for s in first] == [(True, False), (False, False)]
    run = backend.ledger.get_run(RUN)
    assert run is not None
    assert (run.outstanding, run.tasks_done, run.records, run.bytes) == (3, 2, 2, 20)
    assert run.stats == {"pages": 2}

    # The rest in one batch: the run drains on its last commit, and only there.
    rest = ledger.commit_many([commit(1, "t1", 3), commit(2, "t2", 4), commit(3, "t3", 1)])
    assert [(s.ok, s.drained) for s in rest] == [(True, False), (True, False), (True, True)]
    run = backend.ledger.get_run(RUN)
    assert run is not None
    assert (run.outstanding, run.tasks_done, run.records, run.bytes) == (0, 5, 10, 100)
    assert run.stats == {"pages": 10}
    done = backend.ledger.list_tasks(RUN, (TaskState.DONE,))
    assert sorted(t.chunk_id for t in done) == ["0", "0/0", "0/1", "0/2", "0/3"]
    task = backend.ledger.get_task(_key(2))
    assert task is not None and task.output is not None and task.output.records == 4
    assert task.history[-1]["outcome"] == "committed" and task.history[-1]["records"] == 4
    # A commit repeated after it counted is refused, and counts nothing again.
    assert [s.ok for s in ledger.commit_many([commit(3, "t3", 1)])] == [False]
    run = backend.ledger.get_run(RUN)
    assert run is not None and (run.outstanding, run.records) == (0, 10)


def test_a_claim_given_back_is_as_if_never_made(backend: Backend) -> None:
    ledger, now = _claimed(backend, children=3, claimed=3)
    assert backend.ledger.commit(_key(2), "t2", None, TaskEvent.COMMITTED, now).ok
    # 0/0 by its own token; 0/1 by a token that does not hold it; 0/2 committed.
    given = ledger.give_back_many([(_key(0), "t0"), (_key(1), "nope"), (_key(2), "t2")], now)
    assert given == [True, False, False]
    task = backend.ledger.get_task(_key(0))
    assert task is not None and task.state == TaskState.QUEUED
    assert (task.attempt, task.lease_token, task.history) == (0, None, [])
    held = backend.ledger.get_task(_key(1))
    assert held is not None and (held.state, held.lease_token) == (TaskState.RUNNING, "t1")
    # Claimed again, it is the first attempt; nothing was counted against the run.
    again = backend.ledger.claim(_key(0), "t0b", 30.0, 3, now)
    assert again.outcome is ClaimOutcome.CLAIMED and again.attempt == 1
    run = backend.ledger.get_run(RUN)
    assert run is not None and (run.retries, run.outstanding) == (0, 2)


def test_a_batch_of_commits_records_the_first_stop_of_the_batch(backend: Backend) -> None:
    """Two chunks of one batch that both stop the run: the first committed
    stops it, the other is told it did not; a refused commit stops nothing."""
    ledger, now = _claimed(backend, children=3, claimed=2)

    def commit(i: int, token: str, stop: str) -> CommitRequest:
        return CommitRequest(_key(i), token, None, TaskEvent.COMMITTED, now, None, 0.1, stop)

    settles = ledger.commit_many(
        [commit(0, "stolen", "refused"), commit(0, "t0", "first"), commit(1, "t1", "second")]
    )
    assert [(s.ok, s.stopped) for s in settles] == [(False, False), (True, True), (True, False)]
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.stop_reason == "first" and run.tasks_done == 3
    assert backend.ledger.claim(_key(2), "t2", 30.0, 3, now).outcome is ClaimOutcome.CANCELLED


def test_held_back_names_the_runs_stopped_or_paused_now(backend: Backend) -> None:
    """What a batch asks before each start past its first."""
    from fanout.backends.runcontrols import controls_of

    ledger, now = _claimed(backend, children=2, claimed=0)
    other = RunRecord("b2", "/jobs/x.py", "x", {}, {"max_attempts": 3}, created_at=now)
    backend.ledger.create_run(other, NewTask("0", 0, 0, "{}"))
    assert ledger.held_back([RUN, "b2", "no-such-run"]) == set()
    controls = controls_of(backend.ledger)
    controls.change_control("b2", lambda state: state.update(paused=True))
    assert ledger.held_back([RUN, "b2"]) == {"b2"}
    controls.change_control("b2", lambda state: state.update(paused=False))
    assert ledger.held_back([RUN, "b2"]) == set()
    assert backend.ledger.stop(RUN, "cancelled")
    assert ledger.held_back([RUN, "b2"]) == {RUN}
    assert ledger.held_back([]) == set()
