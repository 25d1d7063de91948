"""The ledger contract: every backend's ledger keeps these promises."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from fanout.backends.base import (
    Backend,
    ClaimOutcome,
    Failure,
    FailureKind,
    NewTask,
    Output,
    RunRecord,
    RunState,
    TaskKey,
    TaskState,
)

RUN = "r1"
ROOT = TaskKey(RUN, "0", 0)


def _run(backend: Backend, run_id: str = RUN, created_at: float | None = None) -> RunRecord:
    record = RunRecord(
        run_id=run_id,
        job="/jobs/x.py",
        job_name="x",
        params={"a": 1},
        settings={"max_attempts": 3},
        created_at=created_at or time.time(),
    )
    backend.ledger.create_run(record, NewTask("0", 0, 0, '{"m": 0}'))
    return record


def _claim(
    backend: Backend,
    key: TaskKey = ROOT,
    token: str = "t1",
    lease: float = 30.0,
    max_attempts: int = 3,
    now: float | None = None,
):
    return backend.ledger.claim(key, token, lease, max_attempts, now or time.time())


def _children(n: int, parent: str = "0", depth: int = 1) -> list[NewTask]:
    return [NewTask(f"{parent}/{i}", 0, depth, f'{{"c": {i}}}') for i in range(n)]


def test_create_run_starts_with_one_outstanding_root(backend: Backend) -> None:
    _run(backend)
    run = backend.ledger.get_run(RUN)
    assert run is not None
    assert (run.state, run.outstanding, run.tasks_total, run.params) == (
        RunState.RUNNING,
        1,
        1,
        {"a": 1},
    )
    root = backend.ledger.get_task(ROOT)
    assert root is not None and root.state == TaskState.QUEUED and root.message == '{"m": 0}'
    with pytest.raises(KeyError):
        _run(backend)
    assert backend.ledger.get_run("nope") is None


def test_list_runs_newest_first_and_by_state(backend: Backend) -> None:
    _run(backend, "a", created_at=100.0)
    _run(backend, "b", created_at=200.0)
    assert [r.run_id for r in backend.ledger.list_runs()] == ["b", "a"]
    assert [r.run_id for r in backend.ledger.list_runs(limit=1)] == ["b"]
    assert backend.ledger.list_runs(states=(RunState.SUCCEEDED,)) == []


def test_register_is_idempotent_and_counts_exactly(backend: Backend) -> None:
    _run(backend)
    first = backend.ledger.register(RUN, _children(5), max_chunks=100)
    again = backend.ledger.register(RUN, _children(7), max_chunks=100)
    assert (first.created, again.created) == (5, 2)
    run = backend.ledger.get_run(RUN)
    assert run is not None and (run.outstanding, run.tasks_total, run.chunks_total) == (8, 8, 8)


def test_a_delayed_task_waits_until_its_not_before(backend: Backend) -> None:
    # ctx.spawn(delay=...) beyond what the queue can delay (SQS: 15 minutes).
    _run(backend)
    now = time.time()
    later = NewTask("0/0", 0, 1, "{}", not_before=now + 3600)
    backend.ledger.register(RUN, [later], max_chunks=100)
    key = TaskKey(RUN, "0/0", 0)
    wait = _claim(backend, key, now=now + 900)
    assert wait.outcome == ClaimOutcome.WAIT and wait.retry_after == pytest.approx(2700)
    assert _claim(backend, key, now=now + 3601).outcome == ClaimOutcome.CLAIMED


def test_register_over_max_chunks_registers_nothing(backend: Backend) -> None:
    _run(backend)
    result = backend.ledger.register(RUN, _children(5), max_chunks=5)
    assert result.over_limit and result.created == 0
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.outstanding == 1
    assert backend.ledger.get_task(TaskKey(RUN, "0/0")) is None


def test_continuations_do_not_count_against_max_chunks(backend: Backend) -> None:
    _run(backend)
    result = backend.ledger.register(RUN, [NewTask("0", 1, 0, "{}")], max_chunks=1)
    assert not result.over_limit and result.created == 1


def test_claim_then_duplicate_is_busy_then_finished_after_commit(backend: Backend) -> None:
    _run(backend)
    claim = _claim(backend)
    assert claim.outcome == ClaimOutcome.CLAIMED and claim.attempt == 1
    assert claim.takeover is None  # a first claim takes nothing over
    assert claim.task is not None and claim.task.message == '{"m": 0}'
    busy = _claim(backend, token="t2")
    assert busy.outcome == ClaimOutcome.BUSY and 0 < busy.retry_after <= 30
    settle = backend.ledger.commit(ROOT, "t1", Output("k.avro", 10, 99), "committed", time.time())
    assert settle.ok and settle.drained
    finished = _claim(backend, token="t3")
    # A duplicate delivery learns the task is finished, and sees the task as it ended.
    assert finished.outcome == ClaimOutcome.FINISHED and finished.task is not None
    assert (finished.task.state, finished.task.output) == (TaskState.DONE, Output("k.avro", 10, 99))
    run = backend.ledger.get_run(RUN)
    assert run is not None and (run.outstanding, run.records, run.bytes, run.tasks_done) == (
        0,
        10,
        99,
        1,
    )
    task = backend.ledger.get_task(ROOT)
    assert task is not None and task.output == Output("k.avro", 10, 99)


def test_a_commit_without_output_counts_no_records_or_bytes(backend: Backend) -> None:
    """A chunk that wrote nothing (a plan, a chunk that only spawned) commits
    with zeros: in the run's counters and in the event ``fanout logs`` shows."""
    _run(backend)
    _claim(backend)
    now = time.time()
    assert backend.ledger.commit(ROOT, "t1", None, "committed", now, duration=0.25).ok
    run = backend.ledger.get_run(RUN)
    assert run is not None and (run.records, run.bytes, run.tasks_done) == (0, 0, 1)
    task = backend.ledger.get_task(ROOT)
    assert task is not None and task.output is None
    (event,) = task.history
    assert event == {
        "outcome": "committed",
        "at": pytest.approx(now, abs=0.001),
        "records": 0,
        "duration_s": 0.25,
        "attempt": 1,
    }


def test_commit_with_a_lost_lease_is_refused(backend: Backend) -> None:
    _run(backend)
    _claim(backend, token="old", lease=0.01)
    time.sleep(0.02)
    takeover = _claim(backend, token="new")
    assert takeover.outcome == ClaimOutcome.CLAIMED and takeover.attempt == 2
    assert takeover.takeover == "crashed"
    assert not backend.ledger.commit(ROOT, "old", None, "committed", time.time()).ok
    assert not backend.ledger.retry(ROOT, "old", Failure("error", "x"), 0, time.time())
    assert not backend.ledger.bury(ROOT, "old", Failure("error", "x"), time.time()).ok
    assert backend.ledger.commit(ROOT, "new", None, "committed", time.time()).ok
    task = backend.ledger.get_task(ROOT)
    assert task is not None
    assert [e["outcome"] for e in task.history] == ["crashed", "committed"]
    assert task.history[0]["attempt"] == 1 and task.history[1]["attempt"] == 2


def test_retry_sets_back_off_and_counts(backend: Backend) -> None:
    _run(backend)
    now = time.time()
    _claim(backend, now=now)
    assert backend.ledger.retry(ROOT, "t1", Failure("error", "boom", "tb"), now + 100, now)
    wait = _claim(backend, token="t2", now=now + 1)
    assert wait.outcome == ClaimOutcome.WAIT and wait.retry_after == pytest.approx(99)
    again = _claim(backend, token="t3", now=now + 101)
    assert again.outcome == ClaimOutcome.CLAIMED and again.attempt == 2
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.retries == 1
    task = backend.ledger.get_task(ROOT)
    assert task is not None and task.error == "boom" and task.traceback == "tb"


def test_takeover_past_max_attempts_buries(backend: Backend) -> None:
    _run(backend)
    now = time.time()
    for attempt in (1, 2):
        claim = _claim(
            backend, token=f"t{attempt}", lease=1, max_attempts=2, now=now + 10 * attempt
        )
        assert claim.outcome == ClaimOutcome.CLAIMED and claim.attempt == attempt
    buried = _claim(backend, token="t3", lease=1, max_attempts=2, now=now + 30)
    assert buried.outcome == ClaimOutcome.BURIED and buried.drained
    assert buried.takeover == "crashed"
    task = backend.ledger.get_task(ROOT)
    assert task is not None and task.state == TaskState.DEAD
    assert task.error == "crashed: the worker died during the last attempt"
    assert [e["outcome"] for e in task.history] == ["crashed", "crashed", "dead"]
    run = backend.ledger.get_run(RUN)
    assert run is not None and (run.outstanding, run.tasks_dead) == (0, 1)


def test_bury_keeps_the_message_and_reopen_restores_the_budget(backend: Backend) -> None:
    _run(backend)
    _claim(backend)
    settle = backend.ledger.bury(ROOT, "t1", Failure("error", "boom", "tb"), time.time())
    assert settle.ok and settle.drained
    dead = backend.ledger.list_tasks(RUN, (TaskState.DEAD,))
    assert [t.chunk_id for t in dead] == ["0"] and dead[0].message == '{"m": 0}'
    assert backend.ledger.begin_finalize(RUN, time.time(), 60)
    backend.ledger.finish(RUN, RunState.FAILED, "runs/r1/_manifest.json", time.time())
    reopened = backend.ledger.reopen(RUN, None, time.time())
    assert [t.chunk_id for t in reopened] == ["0"]
    run = backend.ledger.get_run(RUN)
    assert run is not None and (run.state, run.outstanding, run.tasks_dead) == (
        RunState.RUNNING,
        1,
        0,
    )
    claim = _claim(backend, token="t9", lease=0.01, max_attempts=2)
    assert claim.outcome == ClaimOutcome.CLAIMED and claim.attempt == 1
    # The budget counts from the replay: a crashed attempt 1 is retried, not buried.
    time.sleep(0.02)
    again = _claim(backend, token="t10", max_attempts=2)
    assert again.outcome == ClaimOutcome.CLAIMED and again.attempt == 2


def test_reopen_only_named_chunks(backend: Backend) -> None:
    _run(backend)
    backend.ledger.register(RUN, _children(3), max_chunks=100)
    for i in range(3):
        key = TaskKey(RUN, f"0/{i}")
        _claim(backend, key=key, token=f"t{i}")
        backend.ledger.bury(key, f"t{i}", Failure("error", "x"), time.time())
    reopened = backend.ledger.reopen(RUN, {"0/1"}, time.time())
    assert [t.chunk_id for t in reopened] == ["0/1"]
    assert [t.chunk_id for t in backend.ledger.list_tasks(RUN, (TaskState.DEAD,))] == ["0/0", "0/2"]


def _stopped_run_with_a_dead_a_cancelled_and_an_orphan(backend: Backend, reason: str) -> None:
    """Root registers 0/0..0/2 in a first attempt and only 0/0, 0/1 in the
    attempt that commits, so 0/2 is an orphan (cancelled by that commit);
    0/0 dies, the run stops for ``reason``, and the claim of 0/1 cancels it."""
    _run(backend)
    now = time.time()
    _claim(backend, token="p1", lease=1.0, now=now)
    assert backend.ledger.register(RUN, _kids(3, "p1"), 100, spawned_by="p1").created == 3
    _claim(backend, token="p2", now=now + 2)  # p1's lease ran out: taken over
    backend.ledger.register(RUN, _kids(2, "p2"), 100, spawned_by="p2")
    backend.ledger.commit(ROOT, "p2", None, "committed", now + 3)
    dead = TaskKey(RUN, "0/0")
    _claim(backend, key=dead, token="a")
    backend.ledger.bury(dead, "a", Failure("permanent", "poison"), time.time())
    assert backend.ledger.stop(RUN, reason)
    assert _claim(backend, key=TaskKey(RUN, "0/1"), token="c").outcome == ClaimOutcome.CANCELLED
    for chunk, event in (("0/1", "cancelled"), ("0/2", "orphaned")):
        task = backend.ledger.get_task(TaskKey(RUN, chunk))
        assert task is not None and task.state == TaskState.CANCELLED
        assert task.history[-1]["outcome"] == event


def test_a_replay_of_a_stopped_run_revives_what_the_stop_cancelled(backend: Backend) -> None:
    # The replay clears the stop so the replayed chunk may run; the chunks the
    # stop cancelled used to stay cancelled, and the run ended "succeeded"
    # without them. They come back with it; an orphan does not.
    _stopped_run_with_a_dead_a_cancelled_and_an_orphan(backend, "tolerated failures exceeded")
    reopened = backend.ledger.reopen(RUN, None, time.time())
    assert [t.chunk_id for t in reopened] == ["0/0", "0/1"]
    assert all(t.state == TaskState.QUEUED for t in reopened)
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.stop_reason is None and run.state == RunState.RUNNING
    assert (run.outstanding, run.tasks_dead, run.tasks_cancelled) == (2, 0, 1)
    revived = _claim(backend, key=TaskKey(RUN, "0/1"), token="r")
    assert revived.outcome == ClaimOutcome.CLAIMED and revived.attempt == 1
    orphan = backend.ledger.get_task(TaskKey(RUN, "0/2"))
    assert orphan is not None and orphan.state == TaskState.CANCELLED


def test_a_replay_of_a_run_its_job_stopped_leaves_the_rest_cancelled(backend: Backend) -> None:
    # The job said the run was done (ctx.stop_run): what it cancelled stays so.
    _stopped_run_with_a_dead_a_cancelled_and_an_orphan(backend, "stopped by the job: enough")
    assert [t.chunk_id for t in backend.ledger.reopen(RUN, None, time.time())] == ["0/0"]
    run = backend.ledger.get_run(RUN)
    assert run is not None and (run.outstanding, run.tasks_cancelled) == (1, 2)
    task = backend.ledger.get_task(TaskKey(RUN, "0/1"))
    assert task is not None and task.state == TaskState.CANCELLED


def test_a_replay_revives_more_cancelled_tasks_than_one_transaction_holds(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DynamoDB writes 99 tasks a transaction: every task comes back, and the
    # counters are exact. Its transactions that went through counted against
    # its tries (here 1), and a large replay stopped half way, its stop kept.
    import fanout.backends.aws.ledger_reopen as aws_reopen
    from fanout.backends.runcontrols import controls_of

    monkeypatch.setattr(aws_reopen, "RETRIES", 1)

    _run(backend)
    _claim(backend, token="p")
    assert backend.ledger.register(RUN, _kids(150, "k"), 1000, spawned_by="p").created == 150
    backend.ledger.commit(ROOT, "p", None, "committed", time.time())
    assert backend.ledger.stop(RUN, "cancelled (fanout cancel)")
    assert controls_of(backend.ledger).cancel_queued(RUN, time.time()) == (150, True)
    reopened = backend.ledger.reopen(RUN, None, time.time())
    assert [t.chunk_id for t in reopened] == [f"0/{i}" for i in range(150)]
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.stop_reason is None
    assert (run.outstanding, run.tasks_cancelled, run.state) == (150, 0, RunState.RUNNING)
    assert backend.ledger.list_tasks(RUN, (TaskState.CANCELLED,)) == []


def test_what_a_jobs_own_stop_cancelled_stays_so_through_a_later_stop(backend: Backend) -> None:
    # The job stopped its run; a replay of its dead chunk cleared that stop,
    # and a cancel came after: the next replay went by the run's stop then
    # (a cancel) and revived what the job's stop had cancelled as well.
    _stopped_run_with_a_dead_a_cancelled_and_an_orphan(backend, "stopped by the job: enough")
    assert [t.chunk_id for t in backend.ledger.reopen(RUN, None, time.time())] == ["0/0"]
    assert backend.ledger.stop(RUN, "cancelled (fanout cancel)")
    assert _claim(backend, key=TaskKey(RUN, "0/0"), token="x").outcome == ClaimOutcome.CANCELLED
    assert [t.chunk_id for t in backend.ledger.reopen(RUN, None, time.time())] == ["0/0"]
    task = backend.ledger.get_task(TaskKey(RUN, "0/1"))
    assert task is not None and task.state == TaskState.CANCELLED


def test_a_cancel_that_comes_after_a_replay_cleared_the_stop_leaves_its_tasks(
    backend: Backend,
) -> None:
    # A cancel (or the recovery sweep) that saw the run stopped, then a
    # replay: its tasks were cancelled again with the stop gone, and the run
    # ended "succeeded" without them.
    from fanout.backends.runcontrols import controls_of

    _stopped_run_with_a_dead_a_cancelled_and_an_orphan(backend, "cancelled (fanout cancel)")
    assert [t.chunk_id for t in backend.ledger.reopen(RUN, None, time.time())] == ["0/0", "0/1"]
    cancelled, drained = controls_of(backend.ledger).cancel_queued(RUN, time.time())
    assert (cancelled, drained) == (0, False)
    queued = backend.ledger.list_tasks(RUN, (TaskState.QUEUED,))
    assert [t.chunk_id for t in queued] == ["0/0", "0/1"]


def test_fan_in_drains_exactly_once(backend: Backend) -> None:
    _run(backend)
    _claim(backend)
    backend.ledger.register(RUN, _children(3), max_chunks=100)
    assert not backend.ledger.commit(ROOT, "t1", None, "committed", time.time()).drained
    drained = []
    for i in range(3):
        key = TaskKey(RUN, f"0/{i}")
        _claim(backend, key=key, token=f"c{i}")
        drained.append(backend.ledger.commit(key, f"c{i}", None, "committed", time.time()).drained)
        # A duplicate commit of the same task changes nothing.
        assert not backend.ledger.commit(key, f"c{i}", None, "committed", time.time()).ok
    assert drained == [False, False, True]
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.outstanding == 0 and run.tasks_done == 4


def test_begin_finalize_is_granted_once_unless_stale(backend: Backend) -> None:
    _run(backend)
    now = time.time()
    assert not backend.ledger.begin_finalize(RUN, now, 60)  # not drained yet
    _claim(backend)
    backend.ledger.commit(ROOT, "t1", None, "committed", now)
    assert backend.ledger.begin_finalize(RUN, now, 60)
    assert not backend.ledger.begin_finalize(RUN, now + 1, 60)
    assert backend.ledger.begin_finalize(RUN, now + 120, 60)  # the first finalizer died
    backend.ledger.finish(RUN, RunState.SUCCEEDED, "m.json", now + 121)
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.state == RunState.SUCCEEDED and run.manifest_key == "m.json"
    assert not backend.ledger.begin_finalize(RUN, now + 500, 60)


def test_an_interrupted_attempt_is_not_counted(backend: Backend) -> None:
    """Ctrl-C or a stopped worker hands the chunk back as if never tried: not
    against its budget (the next claim is attempt 1 again), not a retry."""
    _run(backend)
    first = _claim(backend, token="t1")
    assert first.task is not None and first.task.attempt - first.task.attempt_floor == 1
    interrupted = Failure(FailureKind.INTERRUPTED, "the worker was stopped")
    assert backend.ledger.retry(ROOT, "t1", interrupted, 0, time.time())
    again = _claim(backend, token="t2")
    assert again.task is not None and again.task.attempt - again.task.attempt_floor == 1
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.retries == 0
    assert backend.ledger.retry(ROOT, "t2", Failure(FailureKind.ERROR, "boom"), 0, time.time())
    third = _claim(backend, token="t3")
    assert third.task is not None and third.task.attempt - third.task.attempt_floor == 2
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.retries == 1


def test_finish_is_refused_to_a_finalizer_another_took_over(backend: Backend) -> None:
    _run(backend)
    now = time.time()
    _claim(backend)
    backend.ledger.commit(ROOT, "t1", None, "committed", now)
    assert backend.ledger.begin_finalize(RUN, now, 60)
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.finalize_at == now  # who finalizes, exactly
    assert backend.ledger.begin_finalize(RUN, now + 120, 60)  # taken over
    assert not backend.ledger.finish(RUN, RunState.FAILED, "old.json", now + 121, began=now)
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.state == RunState.FINALIZING and run.manifest_key is None
    assert backend.ledger.finish(RUN, RunState.SUCCEEDED, "m.json", now + 122, began=now + 120)
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.state == RunState.SUCCEEDED and run.manifest_key == "m.json"
    assert not backend.ledger.finish(RUN, RunState.SUCCEEDED, "m.json", now + 123)  # done


def test_stop_cancels_queued_tasks_at_claim(backend: Backend) -> None:
    _run(backend)
    _claim(backend)
    backend.ledger.register(RUN, _children(2), max_chunks=100)
    backend.ledger.stop(RUN, "max_depth (1) reached")
    backend.ledger.stop(RUN, "a later reason")
    backend.ledger.commit(ROOT, "t1", None, "committed", time.time())
    first = _claim(backend, key=TaskKey(RUN, "0/0"))
    second = _claim(backend, key=TaskKey(RUN, "0/1"))
    assert first.outcome == second.outcome == ClaimOutcome.CANCELLED
    assert (first.drained, second.drained) == (False, True)
    cancelled = backend.ledger.get_task(TaskKey(RUN, "0/0"))
    assert cancelled is not None and cancelled.state == TaskState.CANCELLED
    assert [e["outcome"] for e in cancelled.history] == ["cancelled"]
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.stop_reason == "max_depth (1) reached"
    assert run.tasks_cancelled == 2


def test_missing_task(backend: Backend) -> None:
    _run(backend)
    assert _claim(backend, key=TaskKey(RUN, "9/9")).outcome == ClaimOutcome.MISSING


def test_list_tasks_in_chunk_order(backend: Backend) -> None:
    _run(backend)
    backend.ledger.register(RUN, _children(12), max_chunks=100)
    backend.ledger.register(RUN, [NewTask("0/2", 1, 1, "{}")], max_chunks=100)
    ids = [(t.chunk_id, t.seq) for t in backend.ledger.list_tasks(RUN)]
    assert ids[:5] == [("0", 0), ("0/0", 0), ("0/1", 0), ("0/2", 0), ("0/2", 1)]
    assert ids[-1] == ("0/11", 0)


def test_ledger_state_survives_reopen(backend: Backend, reopen: Callable[[], Backend]) -> None:
    _run(backend)
    _claim(backend)
    backend.ledger.register(RUN, _children(2), max_chunks=100)
    backend.ledger.commit(ROOT, "t1", Output("k", 3, 4), "committed", time.time())
    again = reopen()
    run = again.ledger.get_run(RUN)
    assert run is not None and (run.outstanding, run.records) == (2, 3)
    assert _claim(again, key=TaskKey(RUN, "0/1")).outcome == ClaimOutcome.CLAIMED
    assert _claim(again).outcome == ClaimOutcome.FINISHED


def test_list_tasks_without_history_is_the_same_tasks_with_none(backend: Backend) -> None:
    _run(backend)
    _claim(backend)
    backend.ledger.register(RUN, _children(3), max_chunks=100, spawned_by="t1")
    backend.ledger.commit(ROOT, "t1", Output("k", 3, 4), "committed", time.time())
    full = backend.ledger.list_tasks(RUN)
    lean = backend.ledger.list_tasks(RUN, history=False)
    assert full[0].history and all(t.history == [] for t in lean)
    for t in full:
        t.history = []
    assert lean == full
    done = backend.ledger.list_tasks(RUN, (TaskState.DONE,), history=False)
    assert [(t.chunk_id, t.output) for t in done] == [("0", Output("k", 3, 4))]


def test_commit_sums_stats_into_the_run(backend: Backend) -> None:
    _run(backend)
    _claim(backend)
    backend.ledger.register(RUN, _children(2), max_chunks=100)
    backend.ledger.commit(ROOT, "t1", None, "committed", time.time(), stats={"pages": 3})
    for i, stats in enumerate([{"pages": 4, "status/200": 4}, None]):
        key = TaskKey(RUN, f"0/{i}")
        _claim(backend, key=key, token=f"c{i}")
        backend.ledger.commit(key, f"c{i}", None, "committed", time.time(), stats=stats)
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.stats == {"pages": 7, "status/200": 4}


def _kids(n: int, tag: str) -> list[NewTask]:
    return [NewTask(f"0/{i}", 0, 1, f'{{"{tag}": {i}}}', "0", 0) for i in range(n)]


def test_children_wait_for_their_parent_to_commit(backend: Backend) -> None:
    _run(backend)
    now = time.time()
    _claim(backend, token="p1", lease=1.0, now=now)
    backend.ledger.register(RUN, _kids(1, "a"), max_chunks=100, spawned_by="p1")
    # Asked to come back when the parent's lease ends (at least 0.5 s, at most 30 s).
    early = _claim(backend, key=TaskKey(RUN, "0/0"), token="c", now=now)
    assert early.outcome == ClaimOutcome.WAIT and early.retry_after == pytest.approx(1.0)
    later = _claim(backend, key=TaskKey(RUN, "0/0"), token="c", now=now + 0.9)
    assert later.outcome == ClaimOutcome.WAIT and later.retry_after == pytest.approx(0.5)
    long_before = _claim(backend, key=TaskKey(RUN, "0/0"), token="c", now=now - 100)
    assert long_before.retry_after == pytest.approx(30.0)
    backend.ledger.commit(ROOT, "p1", None, "committed", time.time())
    assert _claim(backend, key=TaskKey(RUN, "0/0"), token="c").outcome == ClaimOutcome.CLAIMED


def test_a_retried_parent_replaces_its_children_and_orphans_the_rest(backend: Backend) -> None:
    _run(backend)
    now = time.time()
    _claim(backend, token="p1", lease=0.01, now=now)
    # Attempt 1 registers three children, then dies before committing.
    assert backend.ledger.register(RUN, _kids(3, "a"), 100, spawned_by="p1").created == 3
    # Attempt 2 takes over and registers two different ones under the same ids.
    assert _claim(backend, token="p2", now=now + 1).attempt == 2
    assert backend.ledger.register(RUN, _kids(2, "b"), 100, spawned_by="p2").created == 0
    assert [t.chunk_id for t in backend.ledger.queued_children(ROOT)] == ["0/0", "0/1", "0/2"]
    assert backend.ledger.commit(ROOT, "p2", None, "committed", now + 2).ok
    # The commit itself cancelled attempt 1's extra child: nothing waits on it.
    assert [t.chunk_id for t in backend.ledger.queued_children(ROOT)] == ["0/0", "0/1"]
    first = _claim(backend, key=TaskKey(RUN, "0/0"), token="c0", now=now + 3)
    assert first.outcome == ClaimOutcome.CLAIMED and first.task is not None
    assert first.task.message == '{"b": 0}'  # attempt 2's version
    orphan = _claim(backend, key=TaskKey(RUN, "0/2"), token="c2", now=now + 3)
    assert orphan.outcome == ClaimOutcome.FINISHED
    backend.ledger.commit(TaskKey(RUN, "0/0"), "c0", None, "committed", now + 4)
    _claim(backend, key=TaskKey(RUN, "0/1"), token="c1", now=now + 4)
    last = backend.ledger.commit(TaskKey(RUN, "0/1"), "c1", None, "committed", now + 5)
    assert last.drained  # exact: 1 root + 3 registered - 1 orphan
    run = backend.ledger.get_run(RUN)
    assert run is not None and (run.tasks_done, run.tasks_cancelled) == (3, 1)


def test_children_of_a_dead_parent_are_orphans_and_come_back_on_replay(backend: Backend) -> None:
    _run(backend)
    _claim(backend, token="p1")
    backend.ledger.register(RUN, _kids(1, "a"), 100, spawned_by="p1")
    backend.ledger.bury(ROOT, "p1", Failure("error", "boom"), time.time())
    orphan = _claim(backend, key=TaskKey(RUN, "0/0"), token="c")
    assert orphan.outcome == ClaimOutcome.CANCELLED and orphan.drained
    task = backend.ledger.get_task(TaskKey(RUN, "0/0"))
    assert task is not None and [e["outcome"] for e in task.history] == ["orphaned"]
    backend.ledger.reopen(RUN, None, time.time())
    _claim(backend, token="p2")
    assert backend.ledger.register(RUN, _kids(1, "b"), 100, spawned_by="p2").created == 1
    backend.ledger.commit(ROOT, "p2", None, "committed", time.time())
    revived = _claim(backend, key=TaskKey(RUN, "0/0"), token="c2")
    assert revived.outcome == ClaimOutcome.CLAIMED and revived.task is not None
    assert revived.task.message == '{"b": 0}'
    assert backend.ledger.commit(TaskKey(RUN, "0/0"), "c2", None, "committed", time.time()).drained


def test_only_the_lease_holder_registers_children(backend: Backend) -> None:
    _run(backend)
    now = time.time()
    _claim(backend, token="slow", lease=0.01, now=now)
    assert _claim(backend, token="winner", now=now + 1).attempt == 2
    assert backend.ledger.register(RUN, _kids(2, "w"), 100, spawned_by="winner").created == 2
    backend.ledger.commit(ROOT, "winner", None, "committed", now + 2)
    # The slow attempt wakes up late: it may not touch the winner's children.
    late = backend.ledger.register(RUN, _kids(3, "late"), 100, spawned_by="slow")
    assert late.lease_lost and late.created == 0
    claim = _claim(backend, key=TaskKey(RUN, "0/0"), token="c", now=now + 3)
    assert claim.outcome == ClaimOutcome.CLAIMED and claim.task is not None
    assert claim.task.message == '{"w": 0}'
    assert backend.ledger.get_task(TaskKey(RUN, "0/2")) is None


def test_reopen_refuses_a_run_that_is_finalizing(backend: Backend) -> None:
    # A finalizer lists the done tasks, then writes the manifest. A replay
    # reopening the run in between would let a second finalizer run beside
    # the first, and whichever wrote last decided the manifest: the replayed
    # chunk's records could be lost from it.
    from fanout.errors import RunFinalizingError

    _run(backend)
    backend.ledger.register(RUN, _children(2), max_chunks=100)
    _claim(backend)
    backend.ledger.commit(ROOT, "t1", None, "committed", time.time())
    for i in range(2):
        key = TaskKey(RUN, f"0/{i}")
        _claim(backend, key=key, token=f"c{i}")
        backend.ledger.bury(key, f"c{i}", Failure("error", "x"), time.time())
    assert backend.ledger.begin_finalize(RUN, time.time(), 60)
    with pytest.raises(RunFinalizingError, match="finalizing"):
        backend.ledger.reopen(RUN, None, time.time())
    run = backend.ledger.get_run(RUN)
    assert run is not None and (run.state, run.outstanding, run.tasks_dead) == (
        RunState.FINALIZING,
        0,
        2,
    )
    assert [t.state for t in backend.ledger.list_tasks(RUN)][1:] == [TaskState.DEAD] * 2
    # Once the finalizer recorded the final state, the replay goes through.
    backend.ledger.finish(RUN, RunState.FAILED, "m.json", time.time())
    assert [t.chunk_id for t in backend.ledger.reopen(RUN, None, time.time())] == ["0/0", "0/1"]


def test_stop_says_whether_it_recorded_the_reason(backend: Backend) -> None:
    # The first reason stays; a caller learns whether it was the one (a second
    # `fanout cancel` must not announce a second cancellation).
    _run(backend)
    assert backend.ledger.stop(RUN, "first") is True
    assert backend.ledger.stop(RUN, "second") is False
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.stop_reason == "first"


def test_a_run_that_is_finalizing_or_ended_is_not_stopped(backend: Backend) -> None:
    # A cancel that landed while the manifest was written ended the run
    # "succeeded" with a cancel's reason (its finalizer had read the run
    # first), or, its finalizer dead, "cancelled" with every chunk done.
    _run(backend)
    now = time.time()
    _claim(backend)
    backend.ledger.commit(ROOT, "t1", None, "committed", now)
    assert backend.ledger.begin_finalize(RUN, now, 60)
    assert backend.ledger.stop(RUN, "cancelled (fanout cancel)") is False
    backend.ledger.finish(RUN, RunState.SUCCEEDED, "m.json", now + 1)
    assert backend.ledger.stop(RUN, "cancelled (fanout cancel)") is False
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.state == RunState.SUCCEEDED and run.stop_reason is None


def test_a_commit_that_stops_the_run_records_it_in_the_same_step(backend: Backend) -> None:
    """A chunk's ``ctx.stop_run`` goes in with its commit: a worker that dies
    right after the commit cannot lose it, and the run's queued tasks are
    cancelled at their claims whoever claims them. A commit that is refused
    stops nothing; a later stop leaves the first reason, and says so."""
    _run(backend)
    _claim(backend)
    backend.ledger.register(RUN, _children(3), max_chunks=100)
    refused = backend.ledger.commit(ROOT, "other", None, "committed", time.time(), stop_reason="x")
    assert not refused.ok and not refused.stopped
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.stop_reason is None
    settle = backend.ledger.commit(ROOT, "t1", None, "committed", time.time(), stop_reason="found")
    assert settle.ok and settle.stopped and not settle.drained
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.stop_reason == "found" and run.tasks_done == 1
    assert _claim(backend, key=TaskKey(RUN, "0/0")).outcome == ClaimOutcome.CANCELLED
    # Every queued task is cancelled at its claim, and a later stop keeps the first reason.
    assert _claim(backend, key=TaskKey(RUN, "0/1")).outcome == ClaimOutcome.CANCELLED
    assert backend.ledger.stop(RUN, "later") is False
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.stop_reason == "found"


def test_a_commit_in_a_stopped_run_commits_and_says_it_did_not_stop_it(backend: Backend) -> None:
    _run(backend)
    _claim(backend)
    assert backend.ledger.stop(RUN, "cancelled by the user") is True
    settle = backend.ledger.commit(
        ROOT, "t1", Output("k.avro", 5, 50), "committed", time.time(), stop_reason="found"
    )
    assert settle.ok and settle.drained and not settle.stopped
    run = backend.ledger.get_run(RUN)
    assert run is not None and run.stop_reason == "cancelled by the user"
    assert (run.records, run.tasks_done, run.outstanding) == (5, 1, 0)
