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

from fanout.backends import open_backend
from fanout.backends.base import RunState
from helpers import TREE
from procs import fanout, get_run

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
