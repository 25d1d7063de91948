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

from fanout.backends import open_backend
from fanout.backends.base import RunState
from support.helpers import TREE
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
