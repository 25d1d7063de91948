"""Fair sharing of the queue between runs, and ``-S priority``: in process on
the local queue (the order it serves runs in), at process level (a small run
behind a large one finishes first), and the group SQS fair queues key on."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.base import TERMINAL_RUN_STATES, Backend, RunState
from fanout.dispatch import Dispatcher
from fanout.fairness import group_of, serve_run_only, weight_of
from fanout.messages import SWEEP_BODY
from fanout.outcomes import Handled
from support.helpers import JOBS
from support.procs import fanout, get_run, status, wait_for, worker

JOB = str(JOBS / "controlled.py")


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Backend]:
    backend = open_backend("local", home=tmp_path / "home")
    yield backend
    backend.close()


def _serve(backend: Backend, runs: list[str], until: str) -> dict[str, int]:
    """Handle deliveries one at a time until run ``until`` ends; the chunks of
    each run done by then."""
    runner = Dispatcher(backend)
    while True:
        for delivery in backend.queue.receive(1, 30):
            runner.handle(delivery, 10.0)
        run = backend.ledger.get_run(until)
        assert run is not None
        if run.state != RunState.RUNNING:
            break
    return {r: get_run(backend, r).tasks_done for r in runs}


def test_a_run_submitted_behind_a_long_one_is_served_in_turns(local: Backend) -> None:
    big = coordinator.submit(local, JOB, {"chunks": 300}).run_id
    runner = Dispatcher(local)
    (plan,) = local.queue.receive(1, 30)
    assert runner.handle(plan, 10.0) == "committed"  # 300 chunks queued
    small = coordinator.submit(local, JOB, {"chunks": 5}).run_id
    done = _serve(local, [big, small], until=small)
    # Plan + 5 chunks of the small run, one turn each, against about as many
    # of the big run's: not the 300 queued ahead of it.
    assert done[small] == 6 and done[big] <= 12, done


def test_priority_shifts_the_share(local: Backend) -> None:
    low = coordinator.submit(local, JOB, {"chunks": 100}, {"priority": "low"}).run_id
    high = coordinator.submit(local, JOB, {"chunks": 100}, {"priority": "high"}).run_id
    done = _serve(local, [low, high], until=high)
    # Weights 4 : 1 while both have work: the low run did about a quarter as much.
    assert done[high] == 101 and 15 <= done[low] <= 40, done


def test_group_of_a_body_and_weights() -> None:
    assert group_of('{"v":1,"run_id":"job-20260101T000000-abc123","chunk_id":"0"}') == (
        "job-20260101T000000-abc123"
    )
    assert group_of('{"kind":"schedule.fire"}') == "" and group_of("garbage") == ""
    assert weight_of("high") == 4 * weight_of("low") == 2 * weight_of("normal")
    assert weight_of("3.5") == 3.5


def test_a_bad_priority_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = fanout(tmp_path / "home", "submit", JOB, "-S", "priority=urgent")
    assert result.returncode == 2
    assert result.stderr.startswith("error: setting priority: String should match pattern")


def test_a_small_run_behind_a_large_one_finishes_first(tmp_path: Path, local: Backend) -> None:
    home = tmp_path / "home"
    # 400 chunks of 0.05 s: about 10 s of work for 2 workers.
    big = fanout(home, "submit", JOB, "-p", "chunks=400", "-p", "step_s=0.05")
    assert big.returncode == 0, big.stderr
    big_id = big.stdout.strip()
    with worker(home, tmp_path, "-w", "2"):
        wait_for("the big run under way", lambda: get_run(local, big_id).tasks_done >= 20, 60)
        small = fanout(home, "submit", JOB, "-p", "chunks=5", "-p", "step_s=0.05")
        submitted = time.time()
        small_id = small.stdout.strip()
        wait_for(
            "both runs to end",
            lambda: (
                get_run(local, big_id).state in TERMINAL_RUN_STATES
                and get_run(local, small_id).state in TERMINAL_RUN_STATES
            ),
            180,
        )
    big_run, small_run = get_run(local, big_id), get_run(local, small_id)
    assert big_run.state == small_run.state == RunState.SUCCEEDED
    assert small_run.finished_at is not None and big_run.finished_at is not None
    took = small_run.finished_at - submitted
    print(
        f"\nsmall run behind a 400-chunk run: done in {took:.2f}s,"
        f" {big_run.finished_at - small_run.finished_at:.2f}s before the big one"
    )
    assert small_run.finished_at < big_run.finished_at - 2.0
    assert took < 5.0


def test_sqs_messages_carry_their_run_as_message_group(aws: Backend) -> None:
    run_id = coordinator.submit(aws, JOB, {"chunks": 2}).run_id
    reply = aws.queue.sqs.receive_message(  # type: ignore[attr-defined]
        QueueUrl=aws.queue.url,  # type: ignore[attr-defined]
        MessageSystemAttributeNames=["MessageGroupId"],
    )
    (message,) = reply["Messages"]
    assert message["Attributes"]["MessageGroupId"] == run_id


def test_the_copy_of_a_failed_sqs_message_keeps_its_group(aws: Backend) -> None:
    """A message that failed is handed back as a copy (``release_failed``): in
    its run's group still, or SQS's fair queue would serve it as no run's."""
    run_id = coordinator.submit(aws, JOB, {"chunks": 2}).run_id
    (delivery,) = aws.queue.receive(1, 30)
    aws.queue.release_failed(delivery, 0)
    reply = aws.queue.sqs.receive_message(  # type: ignore[attr-defined]
        QueueUrl=aws.queue.url,  # type: ignore[attr-defined]
        MessageSystemAttributeNames=["MessageGroupId"],
        MessageAttributeNames=["All"],
    )
    (message,) = reply["Messages"]
    assert message["Attributes"]["MessageGroupId"] == run_id
    assert message["MessageAttributes"]["fanout-failures"]["StringValue"] == "1"


def test_a_queue_made_before_failures_were_counted_is_brought_up_to_date(tmp_path: Path) -> None:
    """A messages table with neither a group nor a failure count (an older
    database) gains both when opened, its messages kept."""
    home = tmp_path / "home"
    home.mkdir()
    with sqlite3.connect(home / "fanout.db") as conn:
        conn.execute(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL,"
            " body TEXT NOT NULL, visible_at REAL NOT NULL,"
            " receive_count INTEGER NOT NULL DEFAULT 0, sent_at REAL NOT NULL)"
        )
        conn.execute(
            "INSERT INTO messages (queue, body, visible_at, sent_at) VALUES ('work', 'old', 0, 0)"
        )
    backend = open_backend("local", home=home)
    try:
        (delivery,) = backend.queue.receive(5, 30)
        assert (delivery.body, delivery.failures) == ("old", 0)
        backend.queue.release_failed(delivery, 0)
        (again,) = backend.queue.receive(5, 30)
        assert (again.body, again.failures, again.receive_count) == ("old", 1, 2)
    finally:
        backend.close()


def test_messages_whose_group_left_the_rota_are_still_served(tmp_path: Path) -> None:
    """A message with no row in the rota (a database edited by hand) was never
    received while ``pending()`` counted it: ``worker --until-idle`` waited for ever."""
    home = tmp_path / "home"
    submitted = fanout(home, "submit", JOB, "-p", "chunks=3")
    assert submitted.returncode == 0, submitted.stderr
    with sqlite3.connect(home / "fanout.db") as conn:
        conn.execute("DELETE FROM queue_groups")
    done = fanout(home, "worker", "--until-idle", "-w", "1", timeout=60)
    assert done.returncode == 0, done.stderr
    assert status(home, submitted.stdout.strip())["state"] == "succeeded"


def test_fanout_run_works_its_own_run_only(tmp_path: Path, local: Backend) -> None:
    """A run submitted earlier in the same home (for ``fanout worker``, later)
    is left alone by ``fanout run``'s workers; a worker then does it."""
    home = tmp_path / "home"
    waiting = fanout(home, "submit", JOB, "-p", "chunks=5")
    assert waiting.returncode == 0, waiting.stderr
    waiting_id = waiting.stdout.strip()
    ran = fanout(home, "run", JOB, "-p", "chunks=5", "-w", "2", "--json", timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout.splitlines()[-1])["state"] == "succeeded"
    untouched = get_run(local, waiting_id)
    assert (untouched.state, untouched.tasks_done, untouched.retries) == (RunState.RUNNING, 0, 0)
    done = fanout(home, "worker", "--until-idle", "-w", "1", timeout=120)
    assert done.returncode == 0, done.stderr
    assert get_run(local, waiting_id).state == RunState.SUCCEEDED


def test_a_run_served_alone_is_recovered_without_waiting_for_other_runs(local: Backend) -> None:
    """``fanout run``'s workers serve their run only, so other runs' messages stay
    in the queue: counted as pending, they made a lost message of its own wait
    for the stalled-run rule (20 minutes) instead of being re-sent at once."""
    other = coordinator.submit(local, JOB, {"chunks": 3}).run_id
    mine = coordinator.submit(local, JOB, {"chunks": 3}).run_id
    assert serve_run_only(local.queue, mine)
    (lost,) = local.queue.receive(10, 30)
    assert group_of(lost.body) == mine
    local.queue.ack(lost.receipt)  # its root's message is lost
    assert local.queue.pending() == 0  # the other run's message is not this queue's to count
    assert coordinator.recover(local, redrive=False) == [f"re-sent 1 stranded tasks of {mine}"]
    assert _serve(local, [mine], until=mine) == {mine: 4}
    # The other run was neither served nor re-sent.
    local.queue.serve_only(None)
    assert local.queue.pending() == 1
    assert get_run(local, other).tasks_done == 0


def test_a_sweep_taken_by_a_fanout_run_child_leaves_other_runs_alone(
    tmp_path: Path, local: Backend
) -> None:
    """A ``fanout run`` child serves group-less messages too, sweeps among them;
    its queue counts only its own run as pending, so the sweep took every other
    run in the home for stranded and re-sent their tasks, once per sweep."""
    other = coordinator.submit(local, JOB, {"chunks": 3}).run_id
    mine = coordinator.submit(local, JOB, {"chunks": 2}).run_id
    child = open_backend("local", home=tmp_path / "home")
    try:
        assert serve_run_only(child.queue, mine)
        assert _serve(child, [mine], until=mine) == {mine: 3}
        for _ in range(3):
            child.queue.send([SWEEP_BODY])
            (sweep,) = child.queue.receive(10, 30)
            assert Dispatcher(child).handle(sweep, 10.0) == Handled.SWEPT
    finally:
        child.close()
    bodies = local.queue.db.conn.execute("SELECT body FROM messages").fetchall()  # type: ignore[attr-defined]
    assert [group_of(body) for (body,) in bodies] == [other]  # its root, not one more per sweep
