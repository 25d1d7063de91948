"""The correctness model, end to end in one process on the memory backend."""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fanout import coordinator
from fanout.backends.base import Backend, Failure, RunState, TaskKey, TaskState
from fanout.dispatch import Dispatcher
from fanout.errors import UserError
from fanout.failures import list_messages
from fanout.metrics import EmfMetrics
from fanout.runner import Attempt, Runner
from support.helpers import TREE, FixedJitter, drain
from support.procs import fanout
from testjobs.tree import SCHEMA, Params, expected_items


def _run(backend: Backend, settings: dict[str, Any] | None = None, **params: Any) -> str:
    return coordinator.submit(backend, TREE, params, settings).run_id


def _items(backend: Backend, run_id: str) -> Counter[str]:
    return Counter(r["item"] for r in coordinator.committed_records(backend, run_id))


def _x_job(tmp_path: Path, name: str, code: str) -> str:
    """Write a job ``name`` whose records are ``{"x": <long>}``, defined by
    ``code`` (its plan and process); its path."""
    path = tmp_path / f"{name}.py"
    path.write_text(
        "from fanout import Job\n"
        f"job = Job({name!r}, schema={{'type': 'record', 'name': 'r',"
        " 'fields': [{'name': 'x', 'type': 'long'}]})\n" + code
    )
    return str(path)


def _assert_exactly_once(backend: Backend, run_id: str, **params: Any) -> None:
    items = _items(backend, run_id)
    assert [i for i, n in items.items() if n > 1] == []
    assert set(items) == expected_items(Params(**params))


def test_plan_chunks_and_manifest(mem: Backend) -> None:
    run_id = _run(mem, chunks=4, rows=25)
    run = drain(mem, run_id)
    assert run.state == RunState.SUCCEEDED and run.records == 100
    _assert_exactly_once(mem, run_id, chunks=4, rows=25)
    manifest = coordinator.read_manifest(mem, run_id)
    assert manifest["state"] == "succeeded" and manifest["records"] == 100
    assert sorted(f["chunk_id"] for f in manifest["files"]) == ["0/0", "0/1", "0/2", "0/3"]
    assert all(f["records"] == 25 for f in manifest["files"])
    assert manifest["schema"]["name"] == "row"
    # Only committed files are listed, and every one exists.
    for entry in manifest["files"]:
        assert mem.store.exists(entry["key"])


class _Events:
    """An event sink that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def test_the_manifest_and_the_finished_event_describe_the_run(
    mem: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """Every field of the manifest and of ``run.finished``, for a run with a
    dead chunk: what readers of either (``fanout cat``, subscribers) rely on."""
    started = time.time()
    run_id = _run(mem, {"max_attempts": 1}, chunks=3, rows=2, fail_chunks=[1], fail_times=1)
    sink = _Events()
    with caplog.at_level("INFO", logger="fanout.runner"):
        run = drain(mem, run_id, runner=Runner(mem, events=sink))
    assert run.state == RunState.FAILED
    key = f"runs/{run_id}/_manifest.json"
    assert run.manifest_key == key
    manifest = json.loads(mem.store.get(key))
    assert started <= run.created_at <= manifest["finished_at"] <= time.time()
    done = {t.chunk_id: t for t in mem.ledger.list_tasks(run_id, (TaskState.DONE,))}
    files = [
        {
            "key": done[c].output.key,  # type: ignore[union-attr]
            "records": 2,
            "bytes": len(mem.store.get(done[c].output.key)),  # type: ignore[union-attr]
            "chunk_id": c,
            "seq": 0,
        }
        for c in ("0/0", "0/2")
    ]
    (dead,) = mem.ledger.list_tasks(run_id, (TaskState.DEAD,))
    # The plan committed no output: the run counts only the two files.
    assert (run.records, run.bytes) == (4, sum(f["bytes"] for f in files))
    assert manifest == {
        "version": 1,
        "run_id": run_id,
        "job": "tree",
        "state": "failed",
        "stop_reason": None,
        "created_at": run.created_at,
        "finished_at": manifest["finished_at"],
        "records": 4,
        "files": files,
        "dead_chunks": [{"chunk_id": "0/1", "seq": 0, "error": dead.error}],
        "schema": json.loads(json.dumps(SCHEMA)),
    }
    assert "RuntimeError: flaky chunk 1, attempt 1" in str(dead.error)
    (finished,) = [e for e in sink.events if e["type"] == "run.finished"]
    assert finished == {
        "type": "run.finished",
        "run_id": run_id,
        "time": finished["time"],
        "job": "tree",
        "state": "failed",
        "stop_reason": None,
        "records": 4,
        "files": 2,
        "dead_chunks": 1,
        "manifest": key,
    }
    assert [e["type"] for e in sink.events] == ["chunk.dead", "run.finished"]
    assert f"run {run_id} failed: 4 records in 2 files" in caplog.messages


def test_a_run_is_finalized_once(mem: Backend) -> None:
    """The finalizer that drained the run wrote the manifest; a second call (a
    late duplicate, the recovery sweep) does nothing and says so."""
    run_id = _run(mem, chunks=2, rows=1)
    assert drain(mem, run_id).state == RunState.SUCCEEDED
    manifest = mem.store.get(f"runs/{run_id}/_manifest.json")
    assert Runner(mem).finalize(run_id) is False
    assert mem.store.get(f"runs/{run_id}/_manifest.json") == manifest


def test_job_without_plan_gets_one_chunk_holding_the_params(mem: Backend, tmp_path: Path) -> None:
    job = tmp_path / "single.py"
    job.write_text(
        "from fanout import Job\n"
        "job = Job('single', schema={'type': 'record', 'name': 'r', 'fields':"
        " [{'name': 'x', 'type': 'long'}]})\n"
        "@job.process\n"
        "def process(payload, ctx):\n"
        "    ctx.emit({'x': payload['x'] * 2})\n"
    )
    run_id = coordinator.submit(mem, str(job), {"x": 21}).run_id
    assert drain(mem, run_id).state == RunState.SUCCEEDED
    assert list(coordinator.committed_records(mem, run_id)) == [{"x": 42}]


def test_continuations_bump_seq_and_write_each_slice_once(mem: Backend) -> None:
    run_id = _run(mem, chunks=2, rows=10, step=3)
    run = drain(mem, run_id)
    assert run.state == RunState.SUCCEEDED
    _assert_exactly_once(mem, run_id, chunks=2, rows=10, step=3)
    seqs = sorted((t.chunk_id, t.seq) for t in mem.ledger.list_tasks(run_id) if t.chunk_id != "0")
    assert seqs == [(c, s) for c in ("0/0", "0/1") for s in range(4)]
    first = mem.ledger.get_task(TaskKey(run_id, "0/0", 0))
    assert first is not None and first.history[-1]["outcome"] == "continued"
    # A continuation is not a failure.
    assert run.retries == 0 and all(t.attempt == 1 for t in mem.ledger.list_tasks(run_id))


def test_retries_with_back_off_then_success(mem: Backend) -> None:
    run_id = _run(mem, chunks=3, rows=5, fail_chunks=[1], fail_times=2)
    run = drain(mem, run_id)
    assert run.state == RunState.SUCCEEDED and run.retries == 2
    _assert_exactly_once(mem, run_id, chunks=3, rows=5)
    task = mem.ledger.get_task(TaskKey(run_id, "0/1"))
    assert task is not None
    assert [(e["attempt"], e["outcome"]) for e in task.history] == [
        (1, "error"),
        (2, "error"),
        (3, "committed"),
    ]
    assert "flaky chunk 1, attempt 2" in str(task.history[1]["error"])


def test_a_failed_chunk_waits_its_back_off_capped_by_the_run_settings(
    mem: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner hands the ledger and the queue the delay the settings give:
    base 0.2 s, cap 0.3 s, jitter fixed at 3/4 of the ceiling, so attempts 1-3
    wait 0.75 x min(0.3, 0.2 x 2^(n-1)) = 0.15, 0.225, 0.225 s. A runner that
    retries at once, ignores the cap, drops the jitter or counts attempts off
    by one gets other delays."""
    monkeypatch.setattr("fanout.retry.JITTER", FixedJitter(0.75))
    expected = [0.15, 0.225, 0.225]
    released: list[float] = []
    release = mem.queue.release

    def spy(receipt: str, delay: float = 0.0) -> None:
        released.append(delay)
        release(receipt, delay)

    monkeypatch.setattr(mem.queue, "release", spy)
    settings = {"max_attempts": 4, "backoff_base": 0.2, "backoff_cap": 0.3}
    run_id = _run(mem, settings, chunks=1, rows=2, fail_chunks=[0], fail_times=3)
    key = TaskKey(run_id, "0/0")
    runner = Runner(mem)
    outcomes: list[str] = []
    waits: list[float] = []  # not_before - the failure's time, after each failure
    deadline = time.monotonic() + 20
    while mem.ledger.get_run(run_id).state == RunState.RUNNING:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, outcomes
        for delivery in mem.queue.receive(10, 30):
            outcome = Dispatcher(mem, runner).handle(delivery, 10)
            if '"0/0"' in delivery.body:
                outcomes.append(outcome)
            if outcome == "retry":
                task = mem.ledger.get_task(key)
                assert task is not None
                waits.append(task.not_before - float(task.history[-1]["at"]))
    assert waits == pytest.approx(expected, abs=0.002)  # the ledger's not_before
    assert released == pytest.approx(expected, abs=1e-9)  # the queue's visibility
    # The queue hid each retry until the ledger allowed it: no early delivery
    # was handed back as "wait", and each attempt started after its back-off.
    assert outcomes == ["retry", "retry", "retry", "committed"]
    task = mem.ledger.get_task(key)
    assert task is not None and [e["outcome"] for e in task.history] == ["error"] * 3 + [
        "committed"
    ]
    for before, after, wait in zip(task.history, task.history[1:], expected, strict=False):
        started = float(after["at"]) - float(after["duration_s"])
        assert started >= float(before["at"]) + wait - 0.002, task.history
    assert _items(mem, run_id) == Counter({"0:0": 1, "0:1": 1})


def test_dead_letter_after_max_attempts(mem: Backend) -> None:
    run_id = _run(mem, {"max_attempts": 2}, chunks=3, rows=5, fail_chunks=[2], fail_times=9)
    metrics = io.StringIO()
    run = drain(mem, run_id, runner=Runner(mem, metrics=EmfMetrics(stream=metrics)))
    assert run.state == RunState.FAILED and run.tasks_dead == 1
    dead = mem.ledger.list_tasks(run_id, (TaskState.DEAD,))
    assert [t.chunk_id for t in dead] == ["0/2"]
    # Exactly max_attempts attempts ran: one retry, then dead (not one more, not one fewer).
    assert [(e["attempt"], e["outcome"]) for e in dead[0].history] == [
        (1, "error"),
        (2, "error"),
        (2, "dead"),
    ]
    assert dead[0].attempt == 2 and run.retries == 1
    assert "flaky chunk 2" in (dead[0].error or "") and "RuntimeError" in (dead[0].traceback or "")
    letter = json.loads(mem.store.get(f"runs/{run_id}/dead/0.2-s0.json"))
    assert letter["message"]["payload"] == {"name": "2", "level": 0}
    assert letter["error"] == "error: RuntimeError: flaky chunk 2, attempt 2"
    assert letter["traceback"] == dead[0].traceback and "flaky chunk 2" in letter["traceback"]
    # The dead attempt's metrics: no records, its measured duration.
    (doc,) = [d for d in map(json.loads, metrics.getvalue().splitlines()) if d["outcome"] == "dead"]
    assert (doc["job"], doc["chunk_id"], doc["attempt"], doc["Records"]) == ("tree", "0/2", 2, 0)
    assert doc["ChunkDuration"] == dead[0].history[1]["duration_s"]
    manifest = coordinator.read_manifest(mem, run_id)
    assert manifest["state"] == "failed"
    assert [d["chunk_id"] for d in manifest["dead_chunks"]] == ["0/2"]
    assert set(_items(mem, run_id)) == {f"{c}:{r}" for c in "01" for r in range(5)}


def test_handle_says_when_a_task_died_and_a_second_burial_is_refused(mem: Backend) -> None:
    run_id = _run(mem, {"max_attempts": 1}, chunks=1, rows=1, fail_chunks=[0], fail_times=1)
    drain_root(mem)
    (delivery,) = mem.queue.receive(1, 30)
    runner = Runner(mem)
    assert Dispatcher(mem, runner).handle(delivery, 10) == "dead"
    # A supervisor failing the same attempt again: the lease is gone, nothing changes.
    key = TaskKey(run_id, "0/0")
    attempt = Attempt(key, "stale-token", 1, delivery.receipt, time.time() + 10, time.time())
    assert runner.fail(attempt, Failure("permanent", "late")) == "lease lost"
    task = mem.ledger.get_task(key)
    assert task is not None and [e["outcome"] for e in task.history] == ["error", "dead"]


def test_an_interrupted_last_attempt_is_handed_back_at_once(mem: Backend) -> None:
    """Stopping a worker must not kill chunks: an interrupted attempt, even the
    last one the budget allows, goes back to the queue with no back-off."""
    run_id = _run(mem, {"max_attempts": 1}, chunks=1, rows=1)
    drain_root(mem)
    (delivery,) = mem.queue.receive(1, 30)
    key, now = TaskKey(run_id, "0/0"), time.time()
    claim = mem.ledger.claim(key, "w1", 30, 1, now)
    attempt = Attempt(key, "w1", claim.attempt, delivery.receipt, now + 10, now)
    assert Runner(mem).fail(attempt, Failure("interrupted", "the worker is stopping")) == "retry"
    task = mem.ledger.get_task(key)
    assert task is not None and task.state == TaskState.QUEUED
    assert [e["outcome"] for e in task.history] == ["interrupted"]
    assert task.not_before == pytest.approx(float(task.history[0]["at"]), abs=0.002)
    (again,) = mem.queue.receive(1, 30)  # visible again at once
    assert again.body == delivery.body
    mem.queue.release(again.receipt, 0)
    assert drain(mem, run_id).state == RunState.SUCCEEDED


def test_replay_after_fix_reopens_and_rewrites_manifest(mem: Backend, tmp_path: Path) -> None:
    flag = tmp_path / "broken"
    flag.touch()
    params = {"chunks": 3, "rows": 4, "broken_flag": str(flag)}
    run_id = _run(mem, {"max_attempts": 1}, **params)
    assert drain(mem, run_id).state == RunState.FAILED
    assert coordinator.read_manifest(mem, run_id)["records"] == 8
    with pytest.raises(Exception, match="no dead chunk '0/1'"):
        coordinator.replay(mem, run_id, ["0/1"])
    flag.unlink()  # "fix the code"
    reopened = coordinator.replay(mem, run_id)
    assert [t.chunk_id for t in reopened] == ["0/0"]
    run = drain(mem, run_id)
    assert run.state == RunState.SUCCEEDED and run.records == 12
    manifest = coordinator.read_manifest(mem, run_id)
    assert manifest["state"] == "succeeded" and manifest["dead_chunks"] == []
    _assert_exactly_once(mem, run_id, chunks=3, rows=4)
    with pytest.raises(Exception, match="no dead chunks"):
        coordinator.replay(mem, run_id)


def test_duplicate_deliveries_are_skipped(mem: Backend) -> None:
    sent: list[str] = []
    original = mem.queue.send

    def send_twice(bodies: Any, delay: float = 0.0) -> None:
        sent.extend(bodies)
        original(list(bodies) * 2, delay)

    mem.queue.send = send_twice  # type: ignore[method-assign]
    params = {"chunks": 3, "rows": 3, "children": 2, "depth": 2, "step": 2}
    run_id = _run(mem, **params)
    run = drain(mem, run_id)
    assert run.state == RunState.SUCCEEDED
    _assert_exactly_once(mem, run_id, **params)
    # Every task ran once: duplicates were acknowledged without running.
    tasks = mem.ledger.list_tasks(run_id)
    assert all(t.attempt == 1 for t in tasks) and run.tasks_done == len(tasks)
    # A late duplicate after the run finished changes nothing.
    original(sent[:3])
    drain(mem, run_id)
    assert mem.ledger.get_run(run_id).records == run.records  # type: ignore[union-attr]


def test_expired_lease_is_taken_over_as_crashed(mem: Backend, fast_leases: None) -> None:
    run_id = _run(mem, chunks=2, rows=3)
    drain_root(mem)
    # A worker claims chunk 0/0 and dies: its lease is never committed.
    mem.ledger.claim(TaskKey(run_id, "0/0"), "dead-worker", 0.01, 3, time.time())
    run = drain(mem, run_id, chunk_timeout=0.2)
    assert run.state == RunState.SUCCEEDED
    task = mem.ledger.get_task(TaskKey(run_id, "0/0"))
    assert task is not None and [e["outcome"] for e in task.history] == ["crashed", "committed"]
    _assert_exactly_once(mem, run_id, chunks=2, rows=3)


def drain_root(backend: Backend) -> None:
    """Run only the plan chunk."""
    (delivery,) = backend.queue.receive(1, 30)
    Dispatcher(backend).handle(delivery, 10)


class _Crash(BaseException):
    """Stands for the process dying between two steps."""


@pytest.mark.parametrize("step", ["send", "commit", "ack"])
def test_crash_between_commit_steps_keeps_fan_in_exact(
    mem: Backend, fast_leases: None, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Die after registering children (before or after sending them), after the
    ledger commit, or before the ack: the run still finishes, exactly once."""
    params = {"chunks": 2, "rows": 2, "children": 3, "depth": 1}
    run_id = _run(mem, **params)
    target = {"send": mem.queue, "commit": mem.ledger, "ack": mem.queue}[step]
    method = {"send": "send", "commit": "commit", "ack": "ack"}[step]
    original = getattr(target, method)
    crashed: list[bool] = []

    def dying(*args: Any, **kwargs: Any) -> Any:
        # Crash once, on the first parent chunk that has children.
        key = args[0] if step == "commit" else None
        if not crashed and (step != "commit" or key.chunk_id == "0/0"):
            if step == "send" and not any('"0/0/' in b for b in args[0]):
                return original(*args, **kwargs)
            crashed.append(True)
            if step in ("commit", "ack"):
                original(*args, **kwargs)  # the step happened; the process died after it
            raise _Crash
        return original(*args, **kwargs)

    monkeypatch.setattr(target, method, dying)
    runner = Runner(mem)
    with pytest.raises(_Crash):
        drain(mem, run_id, chunk_timeout=0.2, runner=runner)
    run = drain(mem, run_id, chunk_timeout=0.2, runner=Runner(mem), limit=20)
    assert crashed and run.state == RunState.SUCCEEDED and run.outstanding == 0
    _assert_exactly_once(mem, run_id, **params)
    assert run.tasks_done == len(mem.ledger.list_tasks(run_id)) == 1 + 2 + 6


def test_runaway_max_depth_stops_the_run(mem: Backend, caplog: pytest.LogCaptureFixture) -> None:
    run_id = _run(mem, {"max_depth": 2}, chunks=1, rows=1, children=2, depth=5)
    sink = _Events()
    run = drain(mem, run_id, runner=Runner(mem, events=sink))
    assert run.state == RunState.STOPPED
    # Depth 3 is one generation too deep: the first chunk at depth 2 that spawns stops the run.
    chunk = next(t.chunk_id for t in mem.ledger.list_tasks(run_id) if t.depth == 2)
    reason = f"max_depth (2) reached at chunk {chunk}"
    assert run.stop_reason == reason
    assert f"run {run_id} stopped: {reason}" in caplog.messages
    (stopped,) = [e for e in sink.events if e["type"] == "run.stopped"]
    assert stopped == {
        "type": "run.stopped",
        "run_id": run_id,
        "time": stopped["time"],
        "reason": reason,
        "chunk_id": chunk,
        "cancelled": run.tasks_cancelled,  # the queued ones, at once
    }
    manifest = coordinator.read_manifest(mem, run_id)
    assert manifest["state"] == "stopped" and manifest["records"] == run.records
    # 0/0 and the chunk that hit the bound committed their records; its sibling,
    # still queued when the run stopped, was cancelled rather than run.
    assert run.records + run.tasks_cancelled == 3 and run.records >= 2


def test_runaway_max_chunks_stops_the_run(mem: Backend) -> None:
    run_id = _run(mem, {"max_chunks": 10}, chunks=3, rows=1, children=3, depth=3)
    sink = _Events()
    run = drain(mem, run_id, runner=Runner(mem, events=sink))
    assert run.state == RunState.STOPPED
    # Subscribers learn why the run stopped, in the events and the manifest.
    (stop,) = [e for e in sink.events if e["type"] == "run.stopped"]
    (finished,) = [e for e in sink.events if e["type"] == "run.finished"]
    assert (stop["reason"], stop["chunk_id"]) == (run.stop_reason, "0/2")
    assert (finished["state"], finished["stop_reason"]) == ("stopped", run.stop_reason)
    manifest = json.loads(mem.store.get(f"runs/{run_id}/_manifest.json"))
    assert manifest["state"] == "stopped" and manifest["stop_reason"] == run.stop_reason
    # Chunks run in queue order here: the plan (4 tasks), 0/0 and 0/1 (3 children
    # each) fit in 10; 0/2's three would make 13, so none of them is registered.
    assert run.stop_reason == "max_chunks (10) reached at chunk 0/2"
    tasks = mem.ledger.list_tasks(run_id)
    assert run.chunks_total == len(tasks) == 10
    assert not [t.chunk_id for t in tasks if t.chunk_id.startswith("0/2/")]
    # The chunks that ran committed their records; the six children still queued
    # when the run stopped were cancelled, not run.
    assert (run.tasks_done, run.tasks_cancelled, run.records) == (4, 6, 3)


def test_a_plan_of_exactly_max_chunks_payloads_fits(mem: Backend) -> None:
    """max_chunks bounds the chunks a run creates; its root (the plan) is not one."""
    fits = drain(mem, _run(mem, {"max_chunks": 4}, chunks=4, rows=1))
    assert (fits.state, fits.records, fits.chunks_total) == (RunState.SUCCEEDED, 4, 5)
    over = drain(mem, _run(mem, {"max_chunks": 4}, chunks=5, rows=1))
    assert (over.state, over.records, over.chunks_total) == (RunState.FAILED, 0, 1)


def test_a_chunk_that_spawns_more_than_max_chunks_fails_at_once(mem: Backend) -> None:
    """A runaway plan (an endless generator) must not hold payloads until its
    hard timeout and be retried: its spawn past ``max_chunks`` fails it for good."""
    run_id = _run(mem, {"max_chunks": 25}, chunks=10**9, rows=1)
    started = time.monotonic()
    run = drain(mem, run_id)
    assert time.monotonic() - started < 30
    assert run.state == RunState.FAILED and run.tasks_dead == 1 and run.chunks_total == 1
    (task,) = mem.ledger.list_tasks(run_id)
    assert task.chunk_id == "0" and len(task.history) == 2  # one attempt, then dead
    assert "spawns more than max_chunks (25) children" in (task.error or "")


INT_KEYS = """
from fanout import Job
job = Job("int-keys")
@job.plan
def plan(params, ctx):
    yield {1: "JSON would make this key a string"}
@job.process
def process(chunk, ctx):
    return None
"""


def test_a_spawned_payload_that_is_no_message_fails_for_good_not_as_internal(
    mem: Backend, tmp_path: Path
) -> None:
    job = tmp_path / "int_keys.py"
    job.write_text(INT_KEYS)
    run = drain(mem, coordinator.submit(mem, str(job), {}).run_id)
    assert run.state == RunState.FAILED and run.tasks_dead == 1
    (task,) = mem.ledger.list_tasks(run.run_id)
    assert len(task.history) == 2  # one attempt, then dead: not retried
    assert (task.error or "").startswith(
        "permanent: PermanentError: ctx.spawn in chunk 0: the payload is not JSON"
    )


def test_runaway_max_continuations_stops_the_run(mem: Backend) -> None:
    run_id = _run(mem, {"max_continuations": 2}, chunks=1, rows=10, step=1)
    run = drain(mem, run_id)
    assert run.state == RunState.STOPPED and "max_continuations (2)" in (run.stop_reason or "")
    assert run.records == 3  # seq 0, 1, 2


def test_bad_record_fails_the_chunk_at_once_naming_the_field(mem: Backend) -> None:
    run_id = _run(mem, chunks=2, rows=2, bad_record_chunk=1)
    run = drain(mem, run_id)
    assert run.state == RunState.FAILED and run.retries == 0
    (dead,) = mem.ledger.list_tasks(run_id, (TaskState.DEAD,))
    assert dead.chunk_id == "0/1" and dead.attempt == 1
    assert "bad record" in (dead.error or "") and "n" in (dead.error or "")
    # The chunk wrote nothing: its good records before the bad one are not committed.
    assert set(_items(mem, run_id)) == {"0:0", "0:1"}


def test_a_delayed_child_waits_in_the_ledger_not_only_in_the_queue(mem: Backend) -> None:
    run_id = _run(mem, chunks=1, rows=1, children=1, depth=1, spawn_delay=3600)
    runner = Runner(mem)
    for _ in range(2):  # the plan, then chunk 0/0, which spawns 0/0/0 an hour out
        (delivery,) = mem.queue.receive(1, 30)
        assert Dispatcher(mem, runner).handle(delivery, 10) == "committed"
    child = mem.ledger.get_task(TaskKey(run_id, "0/0/0", 0))
    assert child is not None and child.state == TaskState.QUEUED
    # Delivered early (SQS delays stop at 15 minutes), it is only handed back.
    claim = mem.ledger.claim(child.key, "early", 30, 3, child.not_before - 2700)
    assert claim.outcome.value == "wait" and claim.retry_after == pytest.approx(2700)


@pytest.mark.parametrize("delay", ["nan", -1.0, 13 * 24 * 3600.0])
def test_a_spawn_delay_out_of_range_fails_the_chunk_at_once(
    mem: Backend, delay: float | str
) -> None:
    run_id = _run(mem, chunks=1, rows=1, children=1, depth=1, spawn_delay=delay)
    assert drain(mem, run_id).state == RunState.FAILED
    (dead,) = mem.ledger.list_tasks(run_id, (TaskState.DEAD,))
    assert dead.attempt == 1 and "spawn delay" in (dead.error or "")


def test_large_payloads_travel_through_the_store(mem: Backend) -> None:
    params = {"chunks": 1, "rows": 1, "children": 2, "depth": 1, "big_payload": 300_000}
    run_id = _run(mem, **params)
    assert drain(mem, run_id).state == RunState.SUCCEEDED
    _assert_exactly_once(mem, run_id, **params)
    assert list(mem.store.list(f"runs/{run_id}/payloads/"))


def test_invalid_and_foreign_messages_are_dropped(mem: Backend) -> None:
    mem.queue.send(["not json", '{"v": 1, "run_id": "x", "chunk_id": "../etc"}'])
    mem.queue.send(['{"v": 1, "run_id": "nosuchrun", "chunk_id": "0"}'])
    dispatcher = Dispatcher(mem)
    outcomes = [dispatcher.handle(d, 5) for d in mem.queue.receive(10, 30)]
    assert outcomes == ["invalid", "invalid", "unknown run"]
    assert mem.queue.pending() == 0
    # All three kept for `fanout dead-letters`: the unknown run's was only logged.
    letters = [json.loads(mem.store.get(k)) for k in mem.store.list("dead-letters/")]
    assert len(letters) == 3
    assert any("unknown run 'nosuchrun'" in str(letter) for letter in letters)


def test_forged_payload_is_ignored_in_favour_of_the_ledger(mem: Backend) -> None:
    run_id = _run(mem, chunks=1, rows=2)
    drain_root(mem)
    forged = json.dumps(
        {"v": 1, "run_id": run_id, "chunk_id": "0/0", "payload": {"name": "evil", "level": 0}}
    )
    # The real message for 0/0 is already queued; deliver the forged one first.
    for d in mem.queue.receive(10, 30):
        mem.queue.release(d.receipt, 0)
    mem.queue.send([forged])
    run = drain(mem, run_id)
    assert run.state == RunState.SUCCEEDED
    assert set(_items(mem, run_id)) == {"0:0", "0:1"}


def test_recover_resends_a_lost_first_message(mem: Backend) -> None:
    original = mem.queue.send
    mem.queue.send = lambda bodies, delay=0.0: None  # type: ignore[assignment,method-assign]
    run_id = _run(mem, chunks=2, rows=1)
    mem.queue.send = original  # type: ignore[method-assign]
    assert mem.queue.pending() == 0
    assert coordinator.recover(mem) == [f"re-sent 1 stranded tasks of {run_id}"]
    assert drain(mem, run_id).state == RunState.SUCCEEDED


def test_recover_finalizes_a_drained_run_whose_finalizer_died(mem: Backend) -> None:
    run_id = _run(mem, chunks=1, rows=1)
    runner = Runner(mem)
    runner.finalize = lambda run_id: False  # type: ignore[method-assign]
    for _ in range(2):
        for d in mem.queue.receive(10, 30):
            Dispatcher(mem, runner).handle(d, 10)
    run = mem.ledger.get_run(run_id)
    assert run is not None and run.outstanding == 0 and run.state == RunState.RUNNING
    assert coordinator.recover(mem) == [f"finalized {run_id}"]
    assert mem.ledger.get_run(run_id).state == RunState.SUCCEEDED  # type: ignore[union-attr]


def test_unknown_run_is_a_user_error(mem: Backend) -> None:
    from fanout.errors import UnknownRunError

    with pytest.raises(UnknownRunError, match="unknown run id 'nope'"):
        coordinator.status(mem, "nope")


@pytest.mark.parametrize("fix", ["edit", "copy keeping the mtime"])
def test_replay_runs_the_fixed_job_code_in_a_long_lived_worker(
    mem: Backend, tmp_path: Path, fix: str
) -> None:
    job = tmp_path / "fixme.py"
    source = (
        "from fanout import Job\n"
        "job = Job('fixme', max_attempts=1, schema={'type': 'record', 'name': 'r',"
        " 'fields': [{'name': 'x', 'type': 'long'}]})\n"
        "@job.plan\n"
        "def plan(params, ctx):\n"
        "    yield from ({'x': i} for i in range(3))\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    BUG\n"
        "    ctx.emit({'x': chunk['x']})\n"
    )
    job.write_text(source.replace("BUG", "if chunk['x'] == 1: raise ValueError('bug')"))
    run_id = coordinator.submit(mem, str(job)).run_id
    runner = Runner(mem)  # one worker process, alive across the fix
    assert drain(mem, run_id, runner=runner).state == RunState.FAILED
    stat = job.stat()
    job.write_text(source.replace("BUG", "pass"))
    if fix == "edit":
        os.utime(job, (stat.st_atime, stat.st_mtime + 2))  # whatever the clock's grain
    else:  # `cp -p fixed.py job.py` of a fix written in the same clock tick
        os.utime(job, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    coordinator.replay(mem, run_id)
    assert drain(mem, run_id, runner=runner).state == RunState.SUCCEEDED
    assert sorted(r["x"] for r in coordinator.committed_records(mem, run_id)) == [0, 1, 2]


def test_a_retry_that_spawns_differently_after_a_crash_loses_and_doubles_nothing(
    mem: Backend, tmp_path: Path, fast_leases: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attempt 1 registers its children and dies before committing; attempt 2
    spawns a different set (as a crawl does when its timing differs). Only
    attempt 2's children run; attempt 1's extras are cancelled as orphans."""
    job = tmp_path / "moody.py"
    job.write_text(
        "from fanout import Job\n"
        "job = Job('moody', schema={'type': 'record', 'name': 'r',"
        " 'fields': [{'name': 'x', 'type': 'string'}]})\n"
        "@job.process\n"
        "def process(payload, ctx):\n"
        "    if 'child' in payload:\n"
        "        ctx.emit({'x': payload['child']})\n"
        "        return\n"
        "    names = ['a1', 'a2', 'a3'] if ctx.attempt == 1 else ['b1', 'b2']\n"
        "    for name in names:\n"
        "        ctx.spawn({'child': name})\n"
    )
    run_id = coordinator.submit(mem, str(job)).run_id
    original = mem.ledger.commit

    def die_on_first_root_commit(key: TaskKey, *args: Any, **kwargs: Any) -> Any:
        if key.chunk_id == "0" and not died:
            died.append(True)
            raise _Crash
        return original(key, *args, **kwargs)

    died: list[bool] = []
    monkeypatch.setattr(mem.ledger, "commit", die_on_first_root_commit)
    with pytest.raises(_Crash):
        drain(mem, run_id, chunk_timeout=0.2)
    run = drain(mem, run_id, chunk_timeout=0.2)
    assert run.state == RunState.SUCCEEDED and run.outstanding == 0
    assert sorted(r["x"] for r in coordinator.committed_records(mem, run_id)) == ["b1", "b2"]
    assert (run.tasks_done, run.tasks_cancelled) == (3, 1)
    (orphan,) = mem.ledger.list_tasks(run_id, (TaskState.CANCELLED,))
    assert orphan.chunk_id == "0/2" and orphan.history[-1]["outcome"] == "orphaned"


def test_a_stalled_run_is_re_sent_even_while_the_queue_is_not_empty(mem: Backend) -> None:
    """The recovery sweep used to re-send a run's stranded tasks only once the
    queue looked empty (on SQS an approximate count): a message for another run
    kept it from ever doing so, and a run whose message was lost waited forever
    (issue 10, known risks)."""
    run_id = coordinator.submit(mem, TREE, {"chunks": 2, "rows": 3}).run_id
    (lost,) = mem.queue.receive(1, 30)
    mem.queue.ack(lost.receipt)  # the root's message is lost
    mem.queue.send(['{"unrelated": 1}'], delay=3600)  # the queue is never empty
    assert mem.queue.pending() == 1

    # Not yet stalled: no duplicate is sent for a run that may just be slow.
    assert coordinator.recover(mem) == []
    assert coordinator.recover(mem, stalled_after=0.0) == [f"re-sent 1 stranded tasks of {run_id}"]
    # A sweep that only checks for an empty queue (an idle worker's quick check)
    # leaves a stalled run to the periodic one.
    assert coordinator.recover(mem, redrive=False, stalled_after=0.0) == []
    assert drain(mem, run_id).state is RunState.SUCCEEDED


@pytest.mark.parametrize(
    ("returns", "error"),
    [
        ("{'a': 1, 'b': 2}", "the plan returned a dict value, not an iterable of chunk payloads"),
        ("'abc'", "the plan returned a str value, not an iterable of chunk payloads"),
        ("42", "the plan returned a int value, not an iterable of chunk payloads"),
        ("None", None),  # it spawned through ctx.spawn itself
        ("[{'x': 5}, {'x': 6}]", None),
    ],
)
def test_what_a_plan_may_return(
    mem: Backend, tmp_path: Path, returns: str, error: str | None
) -> None:
    """A plan that returns a dict or a string fails at once with one line; it
    used to make one chunk per key or per character."""
    job = _x_job(
        tmp_path,
        "planner",
        "@job.plan\n"
        "def plan(params, ctx):\n"
        "    ctx.spawn({'x': 1})\n"
        f"    return {returns}\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    ctx.emit({'x': chunk['x']})\n",
    )
    run_id = coordinator.submit(mem, job).run_id
    run = drain(mem, run_id)
    if error is None:
        assert run.state == RunState.SUCCEEDED
        want = {"None": [1], "[{'x': 5}, {'x': 6}]": [1, 5, 6]}[returns]
        assert sorted(r["x"] for r in coordinator.committed_records(mem, run_id)) == want
    else:
        assert run.state == RunState.FAILED and run.chunks_total == 1
        (task,) = mem.ledger.list_tasks(run_id)
        assert len(task.history) == 2  # one attempt, then dead: no retry can fix it
        assert error in (task.error or "")


@pytest.mark.parametrize("form", ["generator", "list"])
def test_a_plan_that_checkpoints_fails_instead_of_dropping_its_other_chunks(
    mem: Backend, tmp_path: Path, form: str
) -> None:
    # A plan that listed its inputs a page per slice (`return ctx.resume_at(...)`)
    # made its first page of chunks, and the run "succeeded" with 3 of 10 records:
    # the checkpoint was dropped in silence.
    body = {
        "generator": "    for i in range(3):\n        yield {'x': i}\n",
        "list": "    pass\n",
    }[form]
    tail = (
        "    return ctx.resume_at(3)\n"
        if form == "generator"
        else ("    ctx.resume_at(3)\n    return [{'x': 0}]\n")
    )
    job = _x_job(
        tmp_path,
        "pager",
        "@job.plan\n"
        "def plan(params, ctx):\n"
        f"{body}{tail}"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    ctx.emit({'x': chunk['x']})\n",
    )
    run = drain(mem, coordinator.submit(mem, job).run_id)
    assert run.state == RunState.FAILED and run.chunks_total == 1, run
    (task,) = mem.ledger.list_tasks(run_id=run.run_id)
    assert "ctx.resume_at() is for process, not plan" in (task.error or ""), task.error


@pytest.mark.parametrize(
    ("body", "error"),
    [
        # The run "succeeded" with 951 of 1,000 records: the return was ignored.
        ("    return 42", "process returned an int (42); it must return None"),
        # The continuation never ran, and the run succeeded.
        ("    ctx.resume_at(5)", "process called ctx.resume_at() but did not return its result"),
        ("    return", None),
        ("    return ctx.resume_at(5) if ctx.cursor is None else None", None),
        # Its continuation saw ctx.cursor None, as a first slice does: it could
        # not tell, and started the chunk over (a black-box helper's find).
        ("    return ctx.resume_at(None)", "ctx.resume_at(None): None is the cursor"),
    ],
)
def test_what_process_may_return(
    mem: Backend, tmp_path: Path, body: str, error: str | None
) -> None:
    job = _x_job(
        tmp_path,
        "returner",
        "@job.plan\n"
        "def plan(params, ctx):\n"
        "    return [{'x': 1}]\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    ctx.emit({'x': ctx.cursor or 0})\n"
        f"{body}\n",
    )
    run_id = coordinator.submit(mem, job).run_id
    run = drain(mem, run_id)
    if error is None:
        assert run.state == RunState.SUCCEEDED
    else:
        assert run.state == RunState.FAILED
        dead = [t for t in mem.ledger.list_tasks(run_id) if t.state == TaskState.DEAD]
        assert len(dead) == 1 and len(dead[0].history) == 2  # no retry can fix it
        assert error in (dead[0].error or "")


@pytest.mark.parametrize(
    ("count", "error"),
    [
        # One name per row: the run's DynamoDB record reached its 400 KB at
        # ~10,000 names, and then no chunk of the run could commit.
        ("for i in range(201): ctx.stats[f'row-{i}'] += 1", "201 counter names, over 200"),
        ("ctx.stats['kwh'] += 0.5", "ctx.stats['kwh'] is 0.5: counters count in whole numbers"),
        ("ctx.stats['x' * 201] += 1", "is over 200 characters"),
        ("for i in range(200): ctx.stats[f'row-{i}'] += 1", None),
        ("for i in range(500): ctx.stats[f'domain/d{i}/pages'] += 1", None),  # a crawl's
        ("ctx.stats['domain/' + 'h' * 250 + '.test/pages'] += 1", None),  # a long host
    ],
)
def test_what_a_chunk_may_count(
    mem: Backend, tmp_path: Path, count: str, error: str | None
) -> None:
    job = tmp_path / "counter.py"
    job.write_text(
        "from fanout import Job\n"
        "job = Job('counter')\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        f"    {count}\n"
    )
    run_id = coordinator.submit(mem, str(job), {"x": 1}).run_id
    run = drain(mem, run_id)
    if error is None:
        assert run.state == RunState.SUCCEEDED and run.stats
    else:
        assert run.state == RunState.FAILED and not run.stats
        (dead,) = mem.ledger.list_tasks(run_id)
        assert len(dead.history) == 2 and error in (dead.error or "")


def test_a_job_that_stops_its_run_ends_it_succeeded(mem: Backend, tmp_path: Path) -> None:
    job = _x_job(
        tmp_path,
        "finder",
        "@job.plan\n"
        "def plan(params, ctx):\n"
        "    return [{'x': x} for x in range(10)]\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    ctx.emit({'x': chunk['x']})\n"
        "    if chunk['x'] == 0:\n"
        "        ctx.spawn({'x': 100})  # dropped: the run ends with this chunk\n"
        "        ctx.stop_run('found it')\n",
    )
    run_id = coordinator.submit(mem, job).run_id
    run = drain(mem, run_id)
    assert run.state == RunState.SUCCEEDED
    assert run.stop_reason == "stopped by the job: found it"
    xs = [r["x"] for r in coordinator.committed_records(mem, run_id)]
    assert 0 in xs and 100 not in xs and len(xs) < 10  # the chunks queued after it: cancelled
    assert run.tasks_cancelled == 10 - len(xs)
    # Named to a replay, a chunk the job's stop cancelled is refused, saying why.
    cancelled = mem.ledger.list_tasks(run_id, (TaskState.CANCELLED,))
    with pytest.raises(UserError, match="cancelled by the job's own stop"):
        coordinator.replay(mem, run_id, [cancelled[0].chunk_id])
    with pytest.raises(UserError, match="has no dead chunk '0/77'"):
        coordinator.replay(mem, run_id, ["0/77"])
    # It did all it had to: its progress bar is full, the chunks left over named.
    from fanout.cli_observe import progress_bar

    bar = progress_bar(coordinator.status(mem, run_id))
    assert bar.startswith("[" + "#" * 24 + "] 100%"), bar
    assert f"({run.tasks_cancelled} cancelled)" in bar, bar


def test_a_stop_reason_is_kept_to_its_first_thousand_characters(
    mem: Backend, tmp_path: Path
) -> None:
    # Kept whole, a reason of megabytes went into the run's record with the
    # commit: past a DynamoDB item's 400 KB, the commit itself was refused.
    job = _x_job(
        tmp_path,
        "verbose",
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    ctx.emit({'x': 1})\n"
        "    ctx.stop_run('found it: ' + 'x' * 1_000_000)\n",
    )
    run = drain(mem, coordinator.submit(mem, job).run_id)
    assert run.state == RunState.SUCCEEDED and run.records == 1
    assert run.stop_reason is not None
    assert run.stop_reason.startswith("stopped by the job: found it: xxx")
    assert run.stop_reason.endswith("x [...]") and len(run.stop_reason) < 1100


def test_a_lone_surrogate_in_an_error_or_a_stop_reason_is_recorded_escaped(
    mem: Backend, tmp_path: Path
) -> None:
    # Bytes that are not UTF-8 (a file name) make lone surrogates, and an
    # exception carries them: the ledger's write of the failure raised
    # UnicodeEncodeError, the attempt counted as crashed a lease later, and
    # its error was lost; in ctx.stop_run, the batch's commit failed.
    job = _x_job(
        tmp_path,
        "surrogates",
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    if chunk['mode'] == 'raise':\n"
        "        raise ValueError('cannot open bad\\udcff.csv')\n"
        "    ctx.emit({'x': 1})\n"
        "    ctx.stop_run('found in bad\\udcff.csv')\n",
    )
    settings = {"max_attempts": 2, "backoff_base": 0.01}
    failing = coordinator.submit(mem, job, {"mode": "raise"}, settings).run_id
    run = drain(mem, failing, limit=20)
    assert run.state == RunState.FAILED and run.retries == 1
    (dead,) = mem.ledger.list_tasks(failing, (TaskState.DEAD,))
    assert dead.error == "error: ValueError: cannot open bad\\udcff.csv"
    assert [e["outcome"] for e in dead.history] == ["error", "error", "dead"]
    stopping = coordinator.submit(mem, job, {"mode": "stop"}, settings).run_id
    run = drain(mem, stopping, limit=20)
    assert run.state == RunState.SUCCEEDED and run.records == 1 and run.retries == 0
    assert run.stop_reason == "stopped by the job: found in bad\\udcff.csv"


def test_a_spawn_from_a_thread_after_its_chunk_ended_raises(mem: Backend, tmp_path: Path) -> None:
    # It was dropped in silence: the children it asked for never existed.
    said = tmp_path / "said.txt"
    job = _x_job(
        tmp_path,
        "late",
        "import threading, time\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    def late():\n"
        "        time.sleep(0.3)\n"
        "        try:\n"
        "            ctx.spawn({'x': 99})\n"
        "            said = 'spawned'\n"
        "        except RuntimeError as exc:\n"
        "            said = str(exc)\n"
        f"        open({str(said)!r}, 'w').write(said)\n"
        "    threading.Thread(target=late).start()\n"
        "    ctx.emit({'x': 1})\n",
    )
    run = drain(mem, coordinator.submit(mem, job).run_id)
    assert run.state == RunState.SUCCEEDED and run.tasks_total == 1
    deadline = time.monotonic() + 10
    while not said.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "ctx.spawn() called after chunk 0 ended" in said.read_text()


def test_a_queued_row_that_is_not_utf_8_is_dead_lettered_not_a_stalled_queue(
    ledger: Backend,
) -> None:
    local = ledger
    # Written into the queue's table by something other than send (a tool, a
    # damaged file): SQLite's decoding failed every receive, every run stalled.
    run_id = _run(local, chunks=2, rows=3)
    with local.queue.db.write() as conn:  # type: ignore[attr-defined]
        conn.execute(
            "INSERT INTO messages (queue, body, visible_at, receive_count, sent_at, grp)"
            " VALUES ('work', CAST(x'7b2276223a317dfffe' AS TEXT), 0, 0, 0, ?)",
            (run_id,),  # in the run's turn of the queue
        )
    run = drain(local, run_id)
    assert run.state == RunState.SUCCEEDED
    _assert_exactly_once(local, run_id, chunks=2, rows=3)
    (letter,) = list_messages(local.store)
    assert letter["body"] == '{"v":1}\ufffd\ufffd' and "not text" in letter["reason"], letter


def test_a_message_for_a_task_its_run_never_registered_is_kept_as_a_dead_letter(
    mem: Backend,
) -> None:
    # Only logged before: `fanout dead-letters` showed an unknown run's forged
    # message, and nothing of one naming a real run's unknown chunk.
    from fanout.messages import ChunkMessage, encode

    run_id = _run(mem, chunks=2, rows=2)
    mem.queue.send([encode(ChunkMessage(run_id=run_id, chunk_id="0/99", payload={"x": 1}))])
    run = drain(mem, run_id)
    assert run.state == RunState.SUCCEEDED
    _assert_exactly_once(mem, run_id, chunks=2, rows=2)
    (letter,) = list_messages(mem.store)
    assert letter["reason"] == f"run {run_id} has no task 0/99 seq 0", letter
    assert '"chunk_id":"0/99"' in letter["body"]


def test_a_worker_that_dies_right_after_the_stopping_commit_does_not_lose_the_stop(
    mem: Backend, tmp_path: Path, fast_leases: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stop was written after the commit: a worker that died in between left
    # the chunk committed and the run going on, every queued chunk run.
    job = _x_job(
        tmp_path,
        "finder",
        "@job.plan\n"
        "def plan(params, ctx):\n"
        "    return [{'x': x} for x in range(5)]\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    ctx.emit({'x': chunk['x']})\n"
        "    if chunk['x'] == 0:\n"
        "        ctx.stop_run('found it')\n",
    )
    commit = mem.ledger.commit
    crashed: list[TaskKey] = []

    def dies_after(key: TaskKey, *args: Any, **kwargs: Any) -> Any:
        settle = commit(key, *args, **kwargs)
        if key.chunk_id == "0/0" and not crashed:
            crashed.append(key)
            raise _Crash  # committed; the process died before the next step
        return settle

    monkeypatch.setattr(mem.ledger, "commit", dies_after)
    run_id = coordinator.submit(mem, job).run_id
    with pytest.raises(_Crash):
        drain(mem, run_id, chunk_timeout=0.2, runner=Runner(mem))
    run = drain(mem, run_id, chunk_timeout=0.2, runner=Runner(mem))
    assert crashed and run.state == RunState.SUCCEEDED
    assert run.stop_reason == "stopped by the job: found it"
    assert [r["x"] for r in coordinator.committed_records(mem, run_id)] == [0]
    assert (run.tasks_done, run.tasks_cancelled) == (2, 4)  # the plan and chunk 0


@pytest.mark.parametrize("first", ["stop", "spawn"])
def test_a_stopped_run_does_not_wait_for_its_delayed_chunks(
    home: Path, tmp_path: Path, first: str
) -> None:
    # Chunk 0 spawns a child delayed 60 s (as a crawl hands a throttled site's
    # pages on), chunk 1 stops the run; either may commit first. Queued chunks
    # were cancelled only when claimed: the run stayed "stopping", and
    # `fanout run` waited, until the delay was over.
    stop_wait, spawn_wait = (0.0, 1.0) if first == "stop" else (1.0, 0.0)
    job = _x_job(
        tmp_path,
        "delayed",
        "import time\n"
        "@job.plan\n"
        "def plan(params, ctx):\n"
        "    return [{'x': 0}, {'x': 1}]\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    if chunk['x'] == 0:\n"
        f"        time.sleep({spawn_wait})\n"
        "        ctx.spawn({'x': 100}, delay=60)\n"
        "    elif chunk['x'] == 1:\n"
        f"        time.sleep({stop_wait})\n"
        "        ctx.stop_run('found it')\n"
        "    ctx.emit({'x': chunk['x']})\n",
    )
    started = time.monotonic()
    result = fanout(home, "run", job, "-w", "2", "--json", timeout=50)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["state"] == "succeeded", outcome
    assert outcome["stop_reason"] == "stopped by the job: found it", outcome
    assert outcome["records"] == 2 and outcome["chunks"]["cancelled"] == 1, outcome
    assert took < 20, f"{took:.1f} s"


def test_a_job_that_catches_record_errors_does_not_commit_its_chunk_empty(
    mem: Backend, tmp_path: Path
) -> None:
    # The first record failed at its emit and was not counted; the job caught
    # that and every refusal after it, and the chunk committed with 0 records.
    job = _x_job(
        tmp_path,
        "catcher",
        "from fanout.errors import RecordError\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    for x in ['oops', 1, 2, 3]:\n"
        "        try:\n"
        "            ctx.emit({'x': x})\n"
        "        except RecordError:\n"
        "            ctx.stats['bad'] += 1\n",
    )
    run_id = coordinator.submit(mem, job, {"n": 1}).run_id
    run = drain(mem, run_id)
    assert run.state == RunState.FAILED and run.records == 0
    (dead,) = mem.ledger.list_tasks(run_id)
    assert "record 0 does not fit schema" in (dead.error or "")


def test_a_stopping_chunk_whose_commit_failed_is_retried_and_kept(
    mem: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stop was written before the commit: when the commit then failed,
    # the chunk's retry was cancelled at its claim and its records were lost,
    # the very ones it stopped the run for, while the run "succeeded".
    job = _x_job(
        tmp_path,
        "finder",
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    ctx.emit({'x': 42})\n"
        "    ctx.stop_run('found it')\n",
    )
    commit = mem.ledger.commit
    failed: list[bool] = []

    def fails_once(*args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(True)
            raise RuntimeError("the ledger was unreachable")
        return commit(*args, **kwargs)

    monkeypatch.setattr(mem.ledger, "commit", fails_once)
    run_id = coordinator.submit(mem, job, {"n": 1}).run_id
    run = drain(mem, run_id)
    assert failed and run.state == RunState.SUCCEEDED
    assert run.stop_reason == "stopped by the job: found it"
    assert [r["x"] for r in coordinator.committed_records(mem, run_id)] == [42]


PAGES_JOB = """
from fanout import Job

job = Job("pages", schema={"type": "record", "name": "r", "fields": [
    {"name": "chunk", "type": "string"}, {"name": "item", "type": "string"}]})


@job.process
def process(chunk, ctx):
    if "item" in chunk:
        ctx.emit({"chunk": ctx.chunk_id, "item": chunk["item"]})
        return None
    page = ctx.cursor or 0  # a listing: each page's items spawned, then the next page
    for n in range(3):
        ctx.spawn({"item": f"p{page}-{n}"})
    return ctx.resume_at(page + 1) if page < 3 else None
"""


@pytest.mark.parametrize("backend_name", ["mem", "ledger"])
def test_children_spawned_by_each_slice_of_a_chunk_are_all_run(
    backend_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # A continuation's children were numbered from 0 again, so slice 1's first
    # child was "0/0", slice 0's: dropped as a duplicate, and the run succeeded
    # with a quarter of its records (the README's listing pattern; a black-box
    # helper's find: a spawn tree lost half of each level).
    backend: Backend = request.getfixturevalue(backend_name)
    job = tmp_path / "pages.py"
    job.write_text(PAGES_JOB)
    run = drain(backend, coordinator.submit(backend, str(job)).run_id)
    assert run.state == RunState.SUCCEEDED, run
    items = sorted(r["item"] for r in coordinator.committed_records(backend, run.run_id))
    assert items == sorted(f"p{p}-{n}" for p in range(4) for n in range(3))
    chunks = sorted(r["chunk"] for r in coordinator.committed_records(backend, run.run_id))
    assert chunks == sorted(f"0/{i}" for i in range(12))
