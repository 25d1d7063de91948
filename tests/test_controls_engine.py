"""Run controls in the engine, in process (memory backend): the paths no
worker process is needed to reach."""

from __future__ import annotations

import json
import time

import pytest

from fanout import control_ops, coordinator
from fanout.backends.base import Backend, RunState, TaskKey, TaskState
from fanout.cli_controls import progress_line
from fanout.cli_observe import watch_run
from fanout.dispatch import Dispatcher
from fanout.events import events_for
from fanout.finalize import finalize_run
from fanout.runner import Runner
from support.helpers import JOBS, drain

JOB = str(JOBS / "controlled.py")


def test_a_chunk_buried_at_a_takeover_counts_against_the_tolerance(mem: Backend) -> None:
    run_id = coordinator.submit(
        mem, JOB, {"chunks": 6}, {"tolerated_failures": 0, "max_attempts": 1}
    ).run_id
    runner = Dispatcher(mem)
    (plan,) = mem.queue.receive(1, 30)
    assert runner.handle(plan, 10.0) == "committed"
    # A worker claims chunk 0/0 and dies: its lease lapses with its only attempt.
    claim = mem.ledger.claim(TaskKey(run_id, "0/0", 0), "dead-worker", 0.01, 1, time.time())
    assert claim.task is not None
    time.sleep(0.05)
    run = drain(mem, run_id, chunk_timeout=5)
    assert run.state == RunState.FAILED and run.tasks_dead == 1
    # The takeover buried it, and that went over the tolerance: the run stopped.
    assert run.stop_reason is not None and run.stop_reason.startswith("tolerated failures")


def test_a_checkpoint_at_the_same_cursor_is_no_failure_when_told_to_stop(mem: Backend) -> None:
    """A continuation told to stop at once (its run paused) checkpoints where it
    started: that is no lack of progress, and nothing is lost or repeated."""
    run_id = coordinator.submit(mem, JOB, {"chunks": 1, "steps": 3, "eager": True}).run_id
    runner = Runner(mem)
    dispatcher = Dispatcher(mem, runner)
    (plan,) = mem.queue.receive(1, 30)
    assert dispatcher.handle(plan, 10.0) == "committed"
    # Every chunk is told the run is paused at its first time_left().
    told = runner.gate.probe
    runner.gate.probe = lambda run_id: lambda: "paused"  # type: ignore[method-assign]
    for seq in (0, 1):
        (delivery,) = mem.queue.receive(1, 30)
        assert dispatcher.handle(delivery, 10.0) == "continued"
        task = mem.ledger.get_task(TaskKey(run_id, "0/0", seq))
        assert task is not None and task.state == TaskState.DONE
    runner.gate.probe = told  # type: ignore[method-assign]
    run = drain(mem, run_id, runner=runner)
    assert run.state == RunState.SUCCEEDED and run.records == 3


class _Stop(Exception):
    """Ends a watch loop after its first redraw."""


def _stop(_: float) -> None:
    raise _Stop


def _two_of_five_done(mem: Backend) -> str:
    """A run of four chunks whose plan and first chunk committed; its id."""
    run_id = coordinator.submit(mem, JOB, {"chunks": 4}).run_id
    dispatcher = Dispatcher(mem)
    for _ in range(2):
        (delivery,) = mem.queue.receive(1, 30)
        assert dispatcher.handle(delivery, 10.0) == "committed"
    return run_id


def test_status_watch_shows_a_paused_run_as_paused_without_an_eta(
    mem: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = _two_of_five_done(mem)  # an ETA exists
    assert control_ops.pause(mem, run_id).changed
    with pytest.raises(_Stop):
        watch_run(mem, run_id, 0.1, as_json=True, sleep=_stop)
    shown = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert shown["state"] == "paused" and shown["eta_s"] is None
    assert control_ops.resume(mem, run_id).changed
    with pytest.raises(_Stop):
        watch_run(mem, run_id, 0.1, as_json=True, sleep=_stop)
    shown = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert shown["state"] == "running" and shown["eta_s"] is not None


class _Events:
    """An event sink that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []

    def publish(self, event: dict[str, object]) -> None:
        self.events.append(event)


def test_a_second_cancel_says_already_cancelling_and_emits_nothing(mem: Backend) -> None:
    # It used to report "cancelling run ..." again and publish a second
    # run.stopped event, which a subscriber took for a second cancellation.
    run_id = coordinator.submit(mem, JOB, {"chunks": 3}).run_id
    (plan,) = mem.queue.receive(1, 30)
    assert Dispatcher(mem).handle(plan, 10.0) == "committed"
    # One chunk is running: the run stays cancelling until it checkpoints.
    assert mem.ledger.claim(TaskKey(run_id, "0/0", 0), "t", 60, 3, time.time()).task
    sink = _Events()
    first = control_ops.cancel(mem, run_id, sink)
    assert first.changed and first.message.startswith(f"cancelling run {run_id}")
    second = control_ops.cancel(mem, run_id, sink)
    assert not second.changed
    assert second.message == f"run {run_id} is already cancelling"
    assert [e["type"] for e in sink.events] == ["run.stopped"]


def test_the_progress_of_a_cancelled_run_counts_its_cancelled_chunks_apart(
    mem: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    # The bar of a cancelled run was full ("100%  chunks 5/5"): its cancelled
    # chunks were counted as finished work.
    run_id = _two_of_five_done(mem)
    assert control_ops.cancel(mem, run_id).changed
    run = drain(mem, run_id)
    assert run.state == RunState.CANCELLED and run.tasks_cancelled == 3, run
    assert watch_run(mem, run_id, 0.1, as_json=False, sleep=_stop) == 1
    bar = capsys.readouterr().out.splitlines()[0]
    filled = bar[1 : bar.index("]")]
    assert filled.count("#") == len(filled) * 2 // 5, bar  # 2 of 5 chunks ran
    assert "40%  chunks 2/5 (3 cancelled)" in bar and bar.endswith("cancelled"), bar
    line = progress_line(coordinator.status(mem, run_id))
    assert "chunks 2/5 (0 dead, 3 cancelled, 0 retries)" in line, line


def test_cancel_and_pause_of_a_finalizing_run_say_it_is_too_late(mem: Backend) -> None:
    # A cancel while the manifest was written answered "cancelling run ...: 0
    # queued chunks cancelled" and the run ended succeeded with a cancel's
    # reason shown (its finalizer dead: cancelled, with every chunk done).
    run_id = coordinator.submit(mem, JOB, {"chunks": 1}).run_id
    (plan,) = mem.queue.receive(1, 30)
    assert Dispatcher(mem).handle(plan, 10.0) == "committed"
    key = TaskKey(run_id, "0/0", 0)
    assert mem.ledger.claim(key, "t", 60, 3, time.time()).task
    assert mem.ledger.commit(key, "t", None, "committed", time.time()).drained
    # Drained, its finalizer not begun yet (or dead before it began): too late too.
    assert not control_ops.cancel(mem, run_id).changed
    assert mem.ledger.begin_finalize(run_id, time.time(), 60)  # a finalizer at work
    for op, verb in ((control_ops.cancel, "cancel"), (control_ops.pause, "pause")):
        outcome = op(mem, run_id)
        assert not outcome.changed
        assert outcome.message == (
            f"run {run_id} is finalizing: every chunk has ended, nothing is left to {verb}"
        )
    assert finalize_run(mem.ledger, mem.store, events_for(mem), run_id, 0.0)
    run = mem.ledger.get_run(run_id)
    assert run is not None and run.state == RunState.SUCCEEDED and run.stop_reason is None


def test_a_cancelling_run_is_not_paused_and_a_replay_clears_a_stale_pause(mem: Backend) -> None:
    # A pause beside a cancel outlived the run's end; `fanout replay --work`
    # then reopened the run paused and waited, showing nothing.
    from fanout.backends.runcontrols import controls_of
    from fanout.controls import set_paused

    run_id = coordinator.submit(mem, JOB, {"chunks": 2}).run_id
    (plan,) = mem.queue.receive(1, 30)
    assert Dispatcher(mem).handle(plan, 10.0) == "committed"
    assert mem.ledger.claim(TaskKey(run_id, "0/0", 0), "t", 60, 3, time.time()).task
    assert control_ops.cancel(mem, run_id).changed  # 0/0 runs on: the run is cancelling
    refused = control_ops.pause(mem, run_id)
    assert not refused.changed
    assert refused.message == f"run {run_id} is cancelling: no chunk of it starts anyway"
    # The pause that landed between the two (read before the cancel, written after).
    controls_of(mem.ledger).change_control(run_id, lambda s: set_paused(s, True, time.time()))
    assert mem.ledger.commit(TaskKey(run_id, "0/0", 0), "t", None, "committed", time.time()).drained
    assert finalize_run(mem.ledger, mem.store, events_for(mem), run_id, 0.0)
    assert coordinator.get_run(mem, run_id).state == RunState.CANCELLED
    assert [t.chunk_id for t in coordinator.replay(mem, run_id)] == ["0/1"]
    run = drain(mem, run_id)
    assert run.state == RunState.SUCCEEDED and run.records == 1  # 0/0 committed nothing


@pytest.mark.parametrize(("poison", "state"), [(7, "succeeded_with_failures"), (8, "failed")])
def test_a_tolerated_percentage_is_of_the_work_chunks_not_the_plan(
    mem: Backend, poison: int, state: str
) -> None:
    # The plan counted as a chunk: 8 dead of 8 work chunks passed at 89% ("8 of 9").
    run_id = coordinator.submit(
        mem,
        JOB,
        {"chunks": 8, "poison": list(range(poison))},
        {"tolerated_failure_percent": 89, "max_attempts": 1},
    ).run_id
    run = drain(mem, run_id, chunk_timeout=5)
    assert run.tasks_dead == poison and run.state.value == state
