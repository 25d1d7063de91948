"""Forged schedule ticks are refused (issue 15): a fire message runs only a tick
on the schedule's grid, at or after its start, close to now, once; on AWS,
fire and sweep messages are obeyed only from the scheduler role (SenderId).

Both backends: the local one (its queue, the dispatcher) and AWS under moto (the
Lambda handler, as the SQS event source drives it)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import fanout.schedules.fire as fire_mod
from fanout.backends import open_backend
from fanout.backends.base import Backend
from fanout.dispatch import Dispatcher
from fanout.messages import SWEEP_BODY
from fanout.schedules import Schedule, open_store
from fanout.schedules.guard import FIRE_LATE, SENDER_ENV
from fanout.schedules.spec import floor_minute
from support.helpers import MOTO_SENDER_ID
from support.lambda_source import Countdown, sqs_event

REPO = Path(__file__).resolve().parents[1]
JOB = "tests/testjobs/tree.py"
#: The receiver's clock in the forged-tick cases: 7 s after a daily 03:00 tick.
NOW = datetime(2031, 3, 4, 3, 0, 7, tzinfo=UTC)


@pytest.fixture(params=["local", "aws"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    monkeypatch.chdir(REPO)  # job refs relative to the project, as deployed
    if request.param == "aws":
        aws = request.getfixturevalue("aws")  # fake_aws clears FANOUT_AWS_*: set it after
        monkeypatch.setenv("FANOUT_AWS_SCHEDULE_ROLE", "arn:aws:iam::123456789012:role/s")
        yield aws
    else:
        local = open_backend("local", home=request.getfixturevalue("tmp_path") / "home")
        yield local
        local.close()


def add(backend: Backend, name: str, expression: str, start: datetime) -> None:
    store = open_store(backend)
    try:
        params = {"chunks": 1}
        schedule = Schedule(
            name=name, expression=expression, job=JOB, params=params, start=start, created_at=start
        )
        store.add(schedule)
    finally:
        store.close()


def fire_body(name: str, tick: str) -> str:
    return json.dumps({"v": 1, "kind": "schedule.fire", "schedule": name, "scheduled_time": tick})


def deliver(backend: Backend, body: str, sender: str = MOTO_SENDER_ID) -> None:
    """Send ``body`` to the work queue and handle it as a worker (local) or the
    Lambda handler (AWS, the message stamped as sent by ``sender``) would."""
    if backend.name == "aws":
        import fanout.aws_lambda as lambda_mod

        sqs, url = backend.queue.sqs, backend.queue.url  # type: ignore[attr-defined]
        sqs.send_message(QueueUrl=url, MessageBody=body)
        messages = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=30, AttributeNames=["All"]
        )["Messages"]
        for m in messages:
            m["Attributes"]["SenderId"] = sender
        response = lambda_mod.handler(sqs_event(messages), Countdown(60_000))
        assert response["batchItemFailures"] == []
        return
    backend.queue.send([body])
    dispatcher = Dispatcher(backend)
    for delivery in backend.queue.receive(10, 30):
        dispatcher.handle(delivery, 30)


def runs(backend: Backend) -> list[str]:
    return sorted(r.run_id for r in backend.ledger.list_runs())


@pytest.mark.parametrize(
    ("name", "tick", "reason"),
    [
        ("daily", "2031-03-04T03:01:00Z", "is not a tick of '0 3 * * *'"),  # off the grid
        ("later", "2031-03-04T03:00:00Z", "is before the schedule's start 2031-06-01T00:00:00Z"),
        ("daily", "2031-03-01T03:00:00Z", "more than 10 minutes before now"),  # far past
        ("daily", "2031-03-05T03:00:00Z", "more than 1 minute(s) after now"),  # far future
        ("daily", "2001-01-01T00:00:00Z", "is not a tick"),  # the review's forgeries
        ("daily", "2099-06-06T17:43:00Z", "is not a tick"),
        ("daily", "2099-06-06T03:00:00Z", "after now"),
    ],
)
def test_a_forged_tick_is_refused(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    name: str, tick: str, reason: str,
) -> None:  # fmt: skip
    add(backend, "daily", "0 3 * * *", datetime(2031, 1, 1, tzinfo=UTC))
    add(backend, "later", "0 3 * * *", datetime(2031, 6, 1, tzinfo=UTC))
    monkeypatch.setattr(fire_mod, "now_utc", lambda: NOW)
    with caplog.at_level(logging.ERROR, logger="fanout.scheduler"):
        deliver(backend, fire_body(name, tick))
    assert runs(backend) == []
    assert reason in caplog.text
    assert backend.queue.pending() == 0  # dropped, not left to circle


def test_the_real_tick_fires_once(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    add(backend, "daily", "0 3 * * *", datetime(2031, 1, 1, tzinfo=UTC))
    monkeypatch.setattr(fire_mod, "now_utc", lambda: NOW)
    with caplog.at_level(logging.INFO, logger="fanout.scheduler"):
        for _ in range(3):  # EventBridge's message, then two replays of it
            deliver(backend, fire_body("daily", "2031-03-04T03:00:00Z"))
    assert runs(backend) == ["daily-20310304T0300"]
    # The replays find the tick's claim settled: nothing to do.
    assert caplog.text.count("already fired") == 2
    # A tick still in the window but late fires too (a queue back-log).
    late = NOW + FIRE_LATE - timedelta(seconds=30)
    monkeypatch.setattr(fire_mod, "now_utc", lambda: late)
    add(backend, "other", "0 3 * * *", datetime(2031, 1, 1, tzinfo=UTC))
    deliver(backend, fire_body("other", "2031-03-04T03:00:00Z"))
    assert runs(backend) == ["daily-20310304T0300", "other-20310304T0300"]


def test_a_tick_whose_handler_died_after_its_claim_fires_on_redelivery(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler killed between claiming the tick and submitting its run: the
    message comes back, finds the claim unsettled and old, and fires it, once."""
    add(backend, "daily", "0 3 * * *", datetime(2031, 1, 1, tzinfo=UTC))
    monkeypatch.setattr(fire_mod, "now_utc", lambda: NOW)  # a minute after the claim, and more
    store = open_store(backend)
    try:
        assert store.claim_tick("daily", datetime(2031, 3, 4, 3, tzinfo=UTC))  # then it died
    finally:
        store.close()
    for _ in range(2):  # the redelivery, then one more
        deliver(backend, fire_body("daily", "2031-03-04T03:00:00Z"))
    assert runs(backend) == ["daily-20310304T0300"]


def test_a_tick_of_now_fires_on_the_real_clock(backend: Backend) -> None:
    add(backend, "minutely", "* * * * *", datetime(2020, 1, 1, tzinfo=UTC))
    tick = floor_minute(datetime.now(UTC))
    deliver(backend, fire_body("minutely", tick.strftime("%Y-%m-%dT%H:%M:%SZ")))
    assert runs(backend) == [f"minutely-{tick:%Y%m%dT%H%M}"]


# -- the sender, on AWS -------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "sender", "needle"),
    [
        (MOTO_SENDER_ID, "AIDAOTHERPRINCIPAL1", "from AIDAOTHERPRINCIPAL1, not the scheduler role"),
        (MOTO_SENDER_ID, "AROAOTHERROLE:session", "from AROAOTHERROLE:session"),
        ("", MOTO_SENDER_ID, f"{SENDER_ENV} is not set"),
    ],
)
def test_fire_and_sweep_only_from_the_scheduler_role(
    aws: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    env: str, sender: str, needle: str,
) -> None:  # fmt: skip
    from fanout import coordinator

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("FANOUT_AWS_SCHEDULE_ROLE", "arn:aws:iam::123456789012:role/s")
    monkeypatch.setenv(SENDER_ENV, env)
    add(aws, "minutely", "* * * * *", datetime(2020, 1, 1, tzinfo=UTC))
    tick = floor_minute(datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with caplog.at_level(logging.ERROR):
        deliver(aws, fire_body("minutely", tick), sender=sender)
    assert runs(aws) == []
    assert f"a fire message {needle}" in caplog.text or needle in caplog.text
    # A sweep from them does not run recovery: a lost task stays lost.
    run_id = coordinator.submit(aws, JOB, {"chunks": 1}).run_id
    aws.queue.sqs.purge_queue(QueueUrl=aws.queue.url)  # type: ignore[attr-defined]
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        deliver(aws, SWEEP_BODY, sender=sender)
    assert aws.queue.pending() == 0 and "sweep message" in caplog.text
    # From the scheduler role, the same sweep re-sends it.
    monkeypatch.setenv(SENDER_ENV, MOTO_SENDER_ID)
    deliver(aws, SWEEP_BODY, sender=MOTO_SENDER_ID + ":scheduler-session")
    assert aws.queue.pending() == 1, run_id


def test_on_lambda_a_schedule_of_a_job_outside_the_package_is_refused(
    aws: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:  # fmt: skip
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("FANOUT_AWS_SCHEDULE_ROLE", "arn:aws:iam::123456789012:role/s")
    add(aws, "minutely", "* * * * *", datetime(2020, 1, 1, tzinfo=UTC))
    (tmp_path / "jobs").mkdir()
    monkeypatch.setenv("LAMBDA_TASK_ROOT", str(tmp_path))  # a package without that job
    tick = floor_minute(datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with caplog.at_level(logging.ERROR):
        deliver(aws, fire_body("minutely", tick))
    assert runs(aws) == []
    assert f"job {JOB!r} is not a file under the deployed jobs/" in caplog.text
