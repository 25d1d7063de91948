"""Helpers shared by the tests: the test job and an in-process drain loop."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from fanout.backends.base import TERMINAL_RUN_STATES, Backend, RunRecord
from fanout.dispatch import Dispatcher
from fanout.runner import Runner

JOBS = Path(__file__).resolve().parents[1] / "testjobs"
TREE = str(JOBS / "tree.py")


def drain(
    backend: Backend,
    run_id: str,
    chunk_timeout: float = 10.0,
    limit: float = 30.0,
    runner: Runner | None = None,
) -> RunRecord:
    """Work the queue in this process until the run finishes."""
    from fanout import runner as runner_mod

    dispatcher = Dispatcher(backend, runner)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        deliveries = backend.queue.receive(10, chunk_timeout + runner_mod.LEASE_GRACE)
        for delivery in deliveries:
            dispatcher.handle(delivery, chunk_timeout)
        run = backend.ledger.get_run(run_id)
        assert run is not None
        if run.state in TERMINAL_RUN_STATES:
            return run
        if not deliveries:
            time.sleep(0.005)
    raise AssertionError(f"run {run_id} did not finish within {limit}s")


#: The ``SenderId`` moto gives every SQS message (moto.sqs.models.DEFAULT_SENDER_ID).
MOTO_SENDER_ID = "AIDAIT2UOQQY3AUEKVGXU"


def fake_aws(monkeypatch: Any, **env: str) -> None:
    """Fake credentials and region for moto (never a user's real ones: profiles
    and endpoint overrides are cleared), plus any ``env`` a test needs."""
    for name in (
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_SQS",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL_DYNAMODB",
    ):
        monkeypatch.delenv(name, raising=False)
    # Names a CLI command may have exported from a stack's outputs
    # (fanout.backends.aws.stack.export_stage): set, then removed, so that
    # monkeypatch restores their absence after the test.
    for name in (
        "FANOUT_AWS_QUEUE",
        "FANOUT_AWS_BUCKET",
        "FANOUT_AWS_TABLE",
        "FANOUT_AWS_EVENTS_TOPIC",
        "FANOUT_AWS_SCHEDULE_ROLE",
    ):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        # The scheduler role's id that fire and sweep messages must come from
        # (fanout.schedules.guard): moto stamps every message with this SenderId.
        "FANOUT_AWS_SCHEDULER_SENDER": MOTO_SENDER_ID,
        **env,
    }.items():
        monkeypatch.setenv(name, value)


class FixedJitter(random.Random):
    """A random source whose ``uniform(a, b)`` is always ``a + fraction * (b - a)``,
    so a test can predict the back-off an attempt gets (set it as
    ``fanout.retry.JITTER``). Any fraction but 0 and 1 also tells a jittered delay
    from one without jitter."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + self.fraction * (b - a)


def add_from_another_thread(writer: Any, record: dict[str, Any]) -> list[BaseException]:
    """``writer.add(record)`` in a thread of its own, run to its end; what it
    raised (the one-thread rule of ``fanout.avro.OneThread``), if anything."""
    import threading

    raised: list[BaseException] = []

    def add() -> None:
        try:
            writer.add(record)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=add)
    thread.start()
    thread.join()
    return raised
