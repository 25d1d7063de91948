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


def test_a_release_that_fails_leaves_the_rest_only_reported(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With SQS unreachable, each release spent botocore's retries (~70 s): an
    # invocation with 3 records to hand back answered after 274 s of its 60.
    import fanout.aws_lambda as lambda_mod
    from support.lambda_source import Countdown, sqs_event

    for _ in range(3):
        coordinator.submit(aws, TREE, {"chunks": 1, "rows": 1})
    messages = aws.queue.sqs.receive_message(  # type: ignore[attr-defined]
        QueueUrl=aws.queue.url,
        MaxNumberOfMessages=10,  # type: ignore[attr-defined]
    )["Messages"]
    assert len(messages) == 3
    lambda_mod._dispatcher()  # warm: its backend is the one to break
    calls: list[str] = []

    def unreachable(receipt: str, delay: float) -> None:
        calls.append(receipt)
        raise ConnectionError("SQS unreachable")

    monkeypatch.setattr(aws.queue, "release", unreachable)
    warm = lambda_mod._warm
    assert warm is not None
    monkeypatch.setattr(warm[0].queue, "release", unreachable)
    response = lambda_mod.handler(sqs_event(messages), Countdown(2_500))
    assert len(response["batchItemFailures"]) == 3  # all reported
    assert len(calls) == 1  # one release tried, not one per record


@pytest.mark.parametrize(
    "event",
    [
        {"Records": None},
        {},
        {"Records": ["not a record"]},
        {
            "Records": [
                {"messageId": "m1", "body": "{}", "attributes": {"ApproximateReceiveCount": "x"}}
            ]
        },
        {"Records": [{"messageId": "m1", "body": "{}", "attributes": {"SentTimestamp": "x"}}]},
    ],
    ids=["null records", "no records", "a string record", "a bad receive count", "a bad sent time"],
)
def test_events_sqs_never_sends_do_not_raise(aws: Backend, event: dict[str, object]) -> None:
    # They raised (TypeError, AttributeError, ValueError) and failed the batch.
    import fanout.aws_lambda as lambda_mod
    from support.lambda_source import Countdown

    response = lambda_mod.handler(event, Countdown(10_000))
    assert isinstance(response["batchItemFailures"], list)
