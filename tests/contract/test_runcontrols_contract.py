"""The run controls contract (``fanout.backends.runcontrols.RunControls``):
every backend's ledger keeps a run's control state and cancels a run's queued
tasks with exact counters."""

from __future__ import annotations

import threading
import time
from typing import Any

from fanout.backends.base import Backend, NewTask, RunRecord, TaskKey, TaskState
from fanout.backends.runcontrols import RunControls, controls_of
from fanout.controls import admit, live_slots, release

RUN = "r1"


def _run(backend: Backend) -> None:
    record = RunRecord(
        run_id=RUN, job="/jobs/x.py", job_name="x", params={}, settings={}, created_at=time.time()
    )
    backend.ledger.create_run(record, NewTask("0", 0, 0, '{"m": 0}'))


def test_every_ledger_has_run_controls(backend: Backend) -> None:
    assert isinstance(backend.ledger, RunControls)


def test_control_state_round_trips_and_starts_empty(backend: Backend) -> None:
    controls = controls_of(backend.ledger)
    assert controls.read_control(RUN) == {}
    assert controls.change_control(RUN, lambda s: s.update(paused=True) or "done") == "done"
    assert controls.read_control(RUN) == {"paused": True}
    assert controls.read_control("other") == {}


def test_concurrent_admissions_never_exceed_the_cap(backend: Backend) -> None:
    """Eight threads race for three slots: the changes are atomic."""
    controls = controls_of(backend.ledger)
    granted: list[str] = []
    lock = threading.Lock()

    def ask(token: str) -> None:
        admission = controls.change_control(
            RUN, lambda s: admit(s, token, 3, time.time() + 60, time.time())
        )
        if admission.go:
            with lock:
                granted.append(token)

    threads = [threading.Thread(target=ask, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 3
    assert set(live_slots(controls.read_control(RUN), time.time())) == set(granted)
    controls.change_control(RUN, lambda s: release(s, granted[0]))
    assert len(live_slots(controls.read_control(RUN), time.time())) == 2


def test_changes_from_many_writers_at_once_are_none_of_them_lost(backend: Backend) -> None:
    """Six threads each add one to a counter 15 times at once: every change lands
    (on DynamoDB, optimistic rounds that lost a race read again and back off)."""
    controls = controls_of(backend.ledger)

    def bump(state: dict[str, Any]) -> None:
        state["n"] = state.get("n", 0) + 1

    def writer() -> None:
        for _ in range(15):
            controls.change_control(RUN, bump)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert controls.read_control(RUN) == {"n": 90}


def test_cancel_queued_cancels_only_queued_tasks_and_moves_the_counters(
    backend: Backend,
) -> None:
    _run(backend)
    ledger = backend.ledger
    now = time.time()
    root = ledger.claim(TaskKey(RUN, "0", 0), "t0", 30, 3, now)
    assert root.task is not None
    ledger.register(RUN, [NewTask(f"0/{i}", 0, 1, "{}", "0", 0) for i in range(5)], 100, "t0")
    ledger.commit(TaskKey(RUN, "0", 0), "t0", None, "committed", now)
    ledger.claim(TaskKey(RUN, "0/0", 0), "t1", 30, 3, now)  # one running
    # Not stopped: nothing is cancelled (a replay may have cleared the stop).
    assert controls_of(ledger).cancel_queued(RUN, time.time()) == (0, False)
    assert ledger.stop(RUN, "cancelled (fanout cancel)")
    cancelled, drained = controls_of(ledger).cancel_queued(RUN, time.time())
    assert (cancelled, drained) == (4, False)
    run = ledger.get_run(RUN)
    assert run is not None and (run.outstanding, run.tasks_cancelled) == (1, 4)
    states: dict[str, Any] = {t.chunk_id: t.state for t in ledger.list_tasks(RUN)}
    assert states["0/0"] == TaskState.RUNNING
    assert [c for c, s in states.items() if s == TaskState.CANCELLED] == [
        f"0/{i}" for i in range(1, 5)
    ]
    task = ledger.get_task(TaskKey(RUN, "0/1", 0))
    assert task is not None and task.history[-1]["outcome"] == "cancelled"
    # Again: nothing left to cancel. Once the running one commits, the run drains.
    assert controls_of(ledger).cancel_queued(RUN, time.time()) == (0, False)
    assert ledger.commit(TaskKey(RUN, "0/0", 0), "t1", None, "committed", time.time()).drained
