"""The Lambda handler's own duties, driven like the SQS event source does
(``support.lambda_source``): what a job's code may throw at it."""

from __future__ import annotations

import time

import pytest

from fanout import coordinator
from fanout.backends.base import Backend, TaskState
from support.helpers import JOBS, TREE
from support.lambda_source import EventSource

EXITS = str(JOBS / "exits.py")


def _poll(aws: Backend, remaining_ms: int = 60_000, visibility: int = 30) -> tuple[int, int]:
    """One poll of the event source: (records, failures)."""
    queue = aws.queue
    source = EventSource(queue.sqs, queue.url, timeout_ms=remaining_ms, visibility=visibility)  # type: ignore[attr-defined]
    messages = source.receive()
    failed = source.invoke(messages) if messages else set()
    return len(messages), len(failed)


def test_a_keyboard_interrupt_of_the_job_is_its_failure_on_lambda(aws: Backend) -> None:
    # Nobody presses Ctrl-C on Lambda: a KeyboardInterrupt is the job's own, an
    # ordinary failure (here its last attempt: dead), not "stop the worker",
    # which handed the chunk back without spending an attempt, forever.
    run_id = coordinator.submit(aws, EXITS, {"mode": "keyboard"}).run_id
    try:
        assert _poll(aws) == (1, 0)
    except KeyboardInterrupt:
        pytest.fail("the handler let the job's KeyboardInterrupt out")
    (task,) = aws.ledger.list_tasks(run_id)
    assert task.state is TaskState.DEAD and "KeyboardInterrupt" in (task.error or "")


def test_records_the_invocation_has_no_time_for_are_handed_back_at_once(aws: Backend) -> None:
    # Not left to wait out the queue's visibility timeout (6 x the function's
    # timeout when deployed): released now, for the next invocation.
    for _ in range(3):
        coordinator.submit(aws, TREE, {"chunks": 1, "rows": 1})
    assert _poll(aws, remaining_ms=2_500, visibility=900) == (3, 3)
    assert len(aws.queue.receive(10, 30)) == 3


def test_an_error_over_dynamodbs_item_limit_is_recorded_clipped(aws: Backend) -> None:
    # The failure's text went whole into the task's item (error, traceback,
    # history), over DynamoDB's 400 KB: the write failed, the failure was lost.
    run_id = coordinator.submit(aws, EXITS, {"mode": "huge-error"}, {"max_attempts": 2}).run_id
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _poll(aws)
        (task,) = aws.ledger.list_tasks(run_id)
        if task.state is TaskState.DEAD:
            break
        time.sleep(0.2)  # the retry's back-off
    assert task.state is TaskState.DEAD, task
    error = task.error or ""
    assert error.startswith("error: RuntimeError: the start xxx") and error.endswith("the end")
    assert "clipped" in error and len(error) < 10_000
    assert [e["outcome"] for e in task.history] == ["error", "error", "dead"]
    assert all(len(e.get("error", "")) < 10_000 for e in task.history)
