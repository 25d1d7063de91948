"""Poison messages: no message can crash-loop a worker (issue 10, point 1).

Four messages that pass the queue and once killed the worker child on every
delivery: a ``seq`` beyond SQLite's integer range, JSON nested 60,000 deep, a
body that is not text, and a schedule tick whose time is out of range. Each
must be dead-lettered with its reason, while the worker goes on working a real
run beside them and ``--until-idle`` exits. Process level on the local backend;
the same messages through the Lambda handler against moto in
``test_poison_aws``.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.base import Backend, RunState
from fanout.dispatch import Dispatcher
from fanout.failures import POISON_TRIES, list_messages
from fanout.outcomes import Handled
from support.helpers import TREE, drain
from support.procs import fanout, get_run

#: A tick that cannot be converted to UTC (past year 9999): OverflowError in the engine.
FIRE_OUT_OF_RANGE = json.dumps(
    {
        "v": 1,
        "kind": "schedule.fire",
        "schedule": "pulse",
        "scheduled_time": "9999-12-31T23:59:00-14:00",
    }
)
DEEP = "[" * 60_000 + "]" * 60_000


def poison_bodies(run_id: str) -> list[str]:
    """The text poison messages (the non-text one is written raw)."""
    return [json.dumps({"run_id": run_id, "chunk_id": "0", "seq": 2**70}), DEEP, FIRE_OUT_OF_RANGE]


def test_poison_messages_are_dead_lettered_and_the_worker_keeps_working(home: Path) -> None:
    submitted = fanout(home, "submit", TREE, "-p", "chunks=4", "-p", "rows=20")
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    added = fanout(home, "schedule", "add", "pulse", "--cron", "rate(5 minutes)", TREE)
    assert added.returncode == 0, added.stderr
    backend = open_backend("local", home=home)
    try:
        backend.queue.send(poison_bodies(run_id))
    finally:
        backend.close()
    with sqlite3.connect(home / "fanout.db") as conn:
        conn.execute(
            "INSERT INTO messages (queue, body, visible_at, receive_count, sent_at)"
            " VALUES ('work', ?, 0, 0, 0)",
            (b"\xff\xfe\x00 not text",),
        )

    started = time.monotonic()
    try:
        worked = fanout(home, "worker", "-w", "2", "--until-idle", timeout=90)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"--until-idle never exited: {exc.stderr!r}") from None
    took = time.monotonic() - started
    assert worked.returncode == 0, worked.stderr
    assert "Traceback" not in worked.stderr
    # The worker children survived: none died (a death would print "crashed").
    assert "crashed" not in worked.stderr

    backend = open_backend("local", home=home)
    try:
        run = get_run(backend, run_id)
        assert run.state is RunState.SUCCEEDED, run
        assert run.records == 4 * 20
        assert backend.queue.pending() == 0
    finally:
        backend.close()

    listed = fanout(home, "dead-letters", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines()]
    reasons = sorted(letter["reason"] for letter in letters)
    assert len(reasons) == 4, reasons
    assert any("seq" in r and "less than or equal" in r for r in reasons), reasons
    assert any("recursion limit" in r for r in reasons), reasons
    assert any("not text" in r for r in reasons), reasons
    fire = [letter for letter in letters if "OverflowError" in letter["reason"]]
    assert len(fire) == 1, reasons
    # Tried a bounded number of times, shortly apart, then kept.
    assert fire[0]["deliveries"] == 5
    assert "schedule.fire" in fire[0]["body"]
    assert took < 60, took

    plain = fanout(home, "dead-letters")
    assert plain.returncode == 0
    assert len(plain.stdout.splitlines()) == 4
    assert "OverflowError: date value out of range" in plain.stdout
    (fired,) = [line for line in plain.stdout.splitlines() if "OverflowError" in line]
    assert "after 5 deliveries" in fired  # a tick: its receives, not counted failures
    assert plain.stdout.count("dropped at once") == 3, plain.stdout


def test_poison_messages_on_lambda_are_dead_lettered_not_redelivered_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same four through the Lambda handler on moto, driven like the SQS
    event source, beside a real run: each is dead-lettered after a bounded number
    of deliveries (not left to SQS's redrive after 50), and the run succeeds."""
    from moto import mock_aws

    import fanout.aws_lambda as lambda_mod
    from fanout import coordinator
    from fanout.backends.aws import AwsSettings
    from fanout.backends.aws.resources import create_resources
    from support.helpers import fake_aws
    from support.lambda_source import EventSource

    repo = Path(__file__).resolve().parents[1]
    role = "arn:aws:iam::123456789012:role/fanout-test-scheduler"
    fake_aws(monkeypatch, FANOUT_STAGE="test", FANOUT_AWS_SCHEDULE_ROLE=role)
    monkeypatch.setattr(lambda_mod, "_warm", None)
    monkeypatch.chdir(repo)  # schedules keep job files relative to the project
    with mock_aws():
        create_resources(AwsSettings.from_env())
        backend = open_backend("aws")
        try:
            from click.testing import CliRunner

            from fanout.cli import main

            added = CliRunner().invoke(
                main,
                [
                    "--backend",
                    "aws",
                    "schedule",
                    "add",
                    "pulse",
                    "--cron",
                    "rate(5 minutes)",
                    "tests/testjobs/tree.py",
                ],
            )
            assert added.exit_code == 0, added.output
            run_id = coordinator.submit(backend, TREE, {"chunks": 3, "rows": 5}).run_id
            queue = backend.queue
            queue.send([*poison_bodies(run_id), "marker: not textx"])
            source = EventSource(queue.sqs, queue.url, timeout_ms=30_000, visibility=30)  # type: ignore[attr-defined]
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                messages = source.receive()
                for m in messages:
                    if m["Body"].endswith(" not textx"):
                        m["Body"] = b"\xff\xfe not text"  # what no SQS body can be
                if messages:
                    source.invoke(messages)
                elif queue.pending() == 0:
                    break
                else:
                    time.sleep(0.2)
            assert queue.pending() == 0, "a message is still being redelivered"
            run = backend.ledger.get_run(run_id)
            assert run is not None and run.state is RunState.SUCCEEDED, run
            from fanout.failures import list_messages

            letters = list_messages(backend.store)
            reasons = sorted(letter["reason"] for letter in letters)
            assert len(reasons) == 4, reasons
            assert any("recursion limit" in r for r in reasons), reasons
            assert any("not text" in r for r in reasons), reasons
            assert any("seq" in r for r in reasons), reasons
            (fire,) = [letter for letter in letters if "OverflowError" in letter["reason"]]
            # Far below the redrive policy's 50: the handler's own guard did it.
            assert fire["deliveries"] == 5
        finally:
            backend.close()


def test_clip_keeps_head_and_tail_within_the_byte_limit() -> None:
    from fanout.failures import clip

    assert clip("short", 100) == "short"
    for char in ("x", "é", "\U0001f600"):  # 1, 2 and 4 UTF-8 bytes
        text = "HEAD" + char * 10_000 + "TAIL"
        clipped = clip(text, 1000)
        assert len(clipped.encode()) <= 1000
        assert clipped.startswith("HEAD" + char) and clipped.endswith(char + "TAIL")
        assert "characters clipped" in clipped


@pytest.fixture(params=["mem", "aws"])
def engine(request: pytest.FixtureRequest) -> Backend:
    """A backend driven in this process: memory, or AWS under moto (the
    ``mem`` and ``aws`` fixtures of conftest.py)."""
    backend: Backend = request.getfixturevalue(request.param)
    return backend


def _handed_back(backend: Backend) -> Handled:
    """What a failure outside the job's code comes to: released in place, or
    (SQS, which cannot change a message) settled, a copy sent in its place."""
    return Handled.COPIED if backend.name == "aws" else Handled.REQUEUED


def _broken(run_id: str) -> None:
    raise OSError("ledger unreachable")


def test_hand_backs_that_are_no_failure_do_not_bring_a_message_near_its_dead_letter(
    engine: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk message handed back without a failure (its task busy, its parent
    running, its run capped: each only a ``release``) more times than
    ``POISON_TRIES``, then failing once outside the job's code (the ledger
    unreachable), is tried again, not dead-lettered; the run then succeeds.
    Counted by receives, that one passing error dead-lettered it."""
    monkeypatch.setattr("fanout.failures.poison_delay", lambda deliveries: 0.0)
    run = coordinator.submit(engine, TREE, {"chunks": 2, "rows": 3})
    queue = engine.queue
    for _ in range(POISON_TRIES + 2):
        (delivery,) = queue.receive(1, 30)
        queue.release(delivery.receipt, 0.0)
    (delivery,) = queue.receive(1, 30)
    assert delivery.receive_count > POISON_TRIES
    with monkeypatch.context() as broken:
        broken.setattr(engine.ledger, "get_run", _broken)
        assert Dispatcher(engine).handle(delivery, 10) is _handed_back(engine)
    assert list_messages(engine.store) == []
    done = drain(engine, run.run_id)
    assert done.state is RunState.SUCCEEDED and done.records == 2 * 3, done


def test_a_message_that_fails_every_delivery_is_dead_lettered_at_its_last_failure(
    engine: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting failures still bounds a poison message: harmless hand-backs
    between its failures change nothing, and its ``POISON_TRIES``-th failure
    keeps it as a dead letter that says how many there were."""
    monkeypatch.setattr("fanout.failures.poison_delay", lambda deliveries: 0.0)
    coordinator.submit(engine, TREE, {"chunks": 1, "rows": 1})
    queue = engine.queue
    monkeypatch.setattr(engine.ledger, "get_run", _broken)
    outcomes = []
    for failure in range(POISON_TRIES):
        (delivery,) = queue.receive(1, 30)
        assert delivery.failures == failure
        queue.release(delivery.receipt, 0.0)  # a harmless hand-back in between
        (delivery,) = queue.receive(1, 30)
        outcomes.append(Dispatcher(engine).handle(delivery, 10))
    assert outcomes == [_handed_back(engine)] * (POISON_TRIES - 1) + [Handled.DEAD_LETTERED]
    assert queue.receive(1, 30) == []
    (letter,) = list_messages(engine.store)
    assert "ledger unreachable" in letter["reason"]
    assert letter["failures"] == POISON_TRIES


def test_on_lambda_a_chunk_message_failing_outside_the_job_is_dead_lettered_at_its_last_failure(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the Lambda handler, driven like the SQS event source: the failure
    count travels with the message (its copy's attribute, in the record's
    ``messageAttributes``), so a chunk message that fails every delivery is
    kept after ``POISON_TRIES`` of them, not left to the queue's redrive after
    50; hand-backs that are no failure in between do not count."""
    from fanout.backends.aws.ledger import DynamoLedger
    from support.lambda_source import EventSource

    monkeypatch.setattr("fanout.failures.poison_delay", lambda deliveries: 0.0)
    coordinator.submit(aws, TREE, {"chunks": 1, "rows": 1})
    monkeypatch.setattr(DynamoLedger, "get_run", lambda self, run_id: _broken(run_id))
    queue = aws.queue
    source = EventSource(queue.sqs, queue.url, timeout_ms=30_000, visibility=30)  # type: ignore[attr-defined]
    seen = []
    for _ in range(3 * POISON_TRIES):
        messages = source.receive()
        if not messages:
            break
        (message,) = messages
        seen.append(message["Attributes"]["ApproximateReceiveCount"])
        # A harmless hand-back first (as a busy task's), then a delivery.
        queue.release(message["ReceiptHandle"], 0.0)
        source.invoke(source.receive())
    assert queue.pending() == 0
    (letter,) = list_messages(aws.store)
    assert "ledger unreachable" in letter["reason"]
    assert letter["failures"] == POISON_TRIES
    assert seen == ["1"] * POISON_TRIES  # each failure handed back a fresh copy


def test_on_lambda_a_copy_whose_original_could_not_be_deleted_forks_nothing(
    aws: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed message is handed back as a copy, then deleted. When that
    delete failed, the handler reported the record failed, so the event source
    kept the original too: two lineages of one poison message, each
    dead-lettered on its own (found by a black-box helper under injected SQS
    faults). Now the record is not reported, and the event source deletes it."""
    from fanout.backends.aws.ledger import DynamoLedger
    from fanout.backends.aws.queue import SqsQueue
    from support.lambda_source import EventSource

    monkeypatch.setattr("fanout.failures.poison_delay", lambda deliveries: 0.0)
    coordinator.submit(aws, TREE, {"chunks": 1, "rows": 1})
    monkeypatch.setattr(DynamoLedger, "get_run", lambda self, run_id: _broken(run_id))
    queue = aws.queue
    # On the class: the handler's backend has a queue (and client) of its own.
    delete, deletes = SqsQueue.ack, []

    def flaky_delete(self: SqsQueue, receipt: str) -> None:
        deletes.append(receipt)
        if len(deletes) == 1:
            raise RuntimeError("InternalError: we encountered an internal error")
        delete(self, receipt)

    monkeypatch.setattr(SqsQueue, "ack", flaky_delete)
    source = EventSource(queue.sqs, queue.url, timeout_ms=30_000, visibility=1)  # type: ignore[attr-defined]
    for _ in range(4 * POISON_TRIES):
        messages = source.receive()
        if messages:
            source.invoke(messages)
        elif queue.pending() == 0:
            break
        else:
            time.sleep(0.3)
    assert queue.pending() == 0
    assert deletes, "no delete was made to fail"
    assert len(list_messages(aws.store)) == 1  # one lineage, one letter
