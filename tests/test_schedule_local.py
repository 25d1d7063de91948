"""Schedules on the local backend: ``fanout schedule`` and ``fanout scheduler --at``
(due, not due, overlap skip, catch-up, params), two scheduler processes racing,
the loop, and ``fanout worker --with-scheduler``."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import Result

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.base import Backend, NewTask, RunRecord, RunState
from fanout.backends.local.ledger import SQLiteLedger
from fanout.schedules import Schedule, open_store
from fanout.schedules.fire import Fired, due, next_wake, run_loop
from fanout.schedules.spec import parse_spec
from support.cli import cli, ok
from support.helpers import TREE, drain
from support.procs import CLI, wait_for, worker

START = "2030-01-01T00:00:00Z"

STAMP_JOB = """
from datetime import datetime
from pydantic import BaseModel
from fanout import Job

class Params(BaseModel):
    scheduled_time: datetime
    label: str = "x"

job = Job("stamp", params=Params, schema={"type": "record", "name": "stamp",
          "fields": [{"name": "at", "type": "string"}, {"name": "label", "type": "string"}]})

@job.process
def process(payload, ctx):
    ctx.emit({"at": ctx.params.scheduled_time.isoformat(), "label": ctx.params.label})
"""


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def user_error(result: Result, *needles: str) -> None:
    """Exit 2 with one ``error:`` line naming ``needles``, no traceback."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def add(home: Path, name: str, expression: str, job: str = TREE, *extra: str) -> None:
    args = ["schedule", "add", name, "--cron", expression, job, "--start", START, *extra]
    ok(cli(home, *args))


def at(home: Path, when: str) -> list[str]:
    """``fanout scheduler --at WHEN``: the lines it printed (one per tick)."""
    return ok(cli(home, "scheduler", "--at", when)).splitlines()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def ledger(home: Path) -> Iterator[Backend]:
    backend = open_backend("local", home=home)
    yield backend
    backend.close()


def schedule_runs(backend: Backend, name: str) -> list[str]:
    runs = backend.ledger.list_runs(limit=1000)
    return sorted(r.run_id for r in runs if r.run_id.startswith(f"{name}-"))


# -- which ticks are due ----------------------------------------------------------


def test_due_by_catch_up() -> None:
    spec = parse_spec("*/5 * * * *")
    last = t("2030-01-01T00:00")
    late = t("2030-01-01T00:17")  # three ticks missed, the last one 2 minutes ago
    assert due(spec, last, late, "all") == [t(f"2030-01-01T00:{m}") for m in ("05", "10", "15")]
    assert due(spec, last, late, "latest") == [t("2030-01-01T00:15")]
    assert due(spec, last, late, "none") == []
    on_time = t("2030-01-01T00:15:30")
    assert due(spec, last, on_time, "none") == [t("2030-01-01T00:15")]
    assert due(spec, last, t("2030-01-01T00:04:59"), "latest") == []
    assert due(spec, last, last, "all") == []


# -- fanout scheduler --at ----------------------------------------------------------


def test_at_fires_what_is_due_then_nothing(home: Path, ledger: Backend) -> None:
    add(home, "tree", "*/5 * * * *", TREE, "-p", "chunks=1", "-p", "rows=2")
    assert at(home, START) == [f"tree {START}: fired tree-20300101T0000"]
    run = ledger.ledger.get_run("tree-20300101T0000")
    assert run is not None and run.params["chunks"] == 1 and run.params["rows"] == 2
    assert "scheduled_time" not in run.params  # tree's Params has no such field
    again = cli(home, "scheduler", "--at", START)
    assert ok(again) == "" and "nothing due" in again.stderr
    assert at(home, "2030-01-01T00:03:00Z") == []  # not a tick
    assert at(home, "2030-01-01T00:05:00Z") == [
        "tree 2030-01-01T00:05:00Z: fired tree-20300101T0005"
    ]
    assert schedule_runs(ledger, "tree") == ["tree-20300101T0000", "tree-20300101T0005"]


def test_a_future_at_does_not_hold_back_the_present(home: Path, ledger: Backend) -> None:
    add(home, "tree", "*/5 * * * *", TREE, "--catch-up", "none")
    assert len(at(home, "2030-06-01T00:05:00Z")) == 1  # trying a tick months ahead
    assert at(home, "2030-01-01T00:10:00Z") == [
        "tree 2030-01-01T00:10:00Z: fired tree-20300101T0010"
    ]
    # ...and when its time comes, the tick tried ahead is claimed already.
    assert at(home, "2030-06-01T00:05:00Z") == []
    assert len(schedule_runs(ledger, "tree")) == 2


def test_nothing_fires_before_the_start(home: Path, ledger: Backend) -> None:
    add(home, "tree", "*/5 * * * *")
    assert at(home, "2029-12-31T23:55:00Z") == []
    assert schedule_runs(ledger, "tree") == []


def test_scheduled_time_reaches_a_job_that_declares_it(
    home: Path, ledger: Backend, tmp_path: Path
) -> None:
    job = tmp_path / "stamp.py"
    job.write_text(STAMP_JOB)
    add(home, "stamp", "rate(1 hour)", str(job), "-p", "label=hourly")
    assert at(home, "2030-01-01T02:00:30Z") == [
        "stamp 2030-01-01T02:00:00Z: fired stamp-20300101T0200"
    ]
    run = drain(ledger, "stamp-20300101T0200")
    assert run.state == RunState.SUCCEEDED
    records = list(coordinator.committed_records(ledger, run.run_id))
    assert records == [{"at": "2030-01-01T02:00:00+00:00", "label": "hourly"}]


def test_overlap_skip_waits_for_the_running_run(home: Path, ledger: Backend) -> None:
    add(home, "skip", "*/5 * * * *", TREE, "--overlap", "skip", "-p", "chunks=1")
    add(home, "allow", "*/5 * * * *", TREE, "-p", "chunks=1")
    assert len(at(home, START)) == 2
    # No worker: both runs are still going at the next tick.
    lines = at(home, "2030-01-01T00:05:00Z")
    assert "allow 2030-01-01T00:05:00Z: fired allow-20300101T0005" in lines
    assert (
        "skip 2030-01-01T00:05:00Z: skipped skip-20300101T0005"
        " (skip-20300101T0000 is still going)" in lines
    )
    assert drain(ledger, "skip-20300101T0000").state == RunState.SUCCEEDED
    lines = at(home, "2030-01-01T00:10:00Z")
    assert "skip 2030-01-01T00:10:00Z: fired skip-20300101T0010" in lines
    assert schedule_runs(ledger, "skip") == ["skip-20300101T0000", "skip-20300101T0010"]
    assert len(schedule_runs(ledger, "allow")) == 3


def test_overlap_skip_counts_a_tick_another_scheduler_claimed_but_not_settled(
    home: Path, ledger: Backend
) -> None:
    """Scheduler A claimed the 00:00 tick and is still submitting its run when
    scheduler B looks at 00:05: no run is going yet, but one is about to. B
    used to fire 00:05 too, and both runs went at once."""
    from fanout.schedules.fire import fire

    add(home, "skip", "*/5 * * * *", TREE, "--overlap", "skip", "-p", "chunks=1")
    store = open_store(ledger)
    try:
        assert store.claim_tick("skip", t(START))  # scheduler A, mid-submit
        assert at(home, "2030-01-01T00:05:00Z") == [
            "skip 2030-01-01T00:05:00Z: skipped skip-20300101T0005"
            " (the 2030-01-01T00:00:00Z tick is being fired)"
        ]
        schedule = store.get("skip")
        assert schedule is not None
        # A goes on: the later tick was settled (skipped), so nothing holds it back.
        assert fire(ledger, schedule, t(START), store).outcome == "fired"
        store.settle_tick("skip", t(START))
    finally:
        store.close()
    assert schedule_runs(ledger, "skip") == ["skip-20300101T0000"]


def test_catch_up_after_missed_ticks(home: Path, ledger: Backend) -> None:
    for mode in ("all", "latest", "none"):
        add(home, mode, "*/5 * * * *", TREE, "--catch-up", mode)
    assert len(at(home, START)) == 3
    # The scheduler was away for 00:05, 00:10 and 00:15.
    at(home, "2030-01-01T00:17:00Z")
    assert schedule_runs(ledger, "all") == [f"all-20300101T00{m}" for m in ("00", "05", "10", "15")]
    assert schedule_runs(ledger, "latest") == ["latest-20300101T0000", "latest-20300101T0015"]
    assert schedule_runs(ledger, "none") == ["none-20300101T0000"]
    # Back on time: every mode fires the next tick.
    at(home, "2030-01-01T00:20:10Z")
    for mode in ("all", "latest", "none"):
        assert schedule_runs(ledger, mode)[-1] == f"{mode}-20300101T0020"


def test_a_job_that_stopped_loading_fails_its_tick(home: Path, tmp_path: Path) -> None:
    job = tmp_path / "stamp.py"
    job.write_text(STAMP_JOB)
    add(home, "stamp", "*/5 * * * *", str(job))
    job.unlink()
    result = cli(home, "scheduler", "--at", START)
    assert result.exit_code == 1
    assert result.stdout.startswith(f"stamp {START}: failed stamp-20300101T0000 (job file")


def failing_create_run(monkeypatch: pytest.MonkeyPatch, prefix: str, error: Exception) -> list[str]:
    """Make the ledger's ``create_run`` raise ``error`` for run ids starting with
    ``prefix``; returns the run ids it refused."""
    refused: list[str] = []
    real = SQLiteLedger.create_run

    def create_run(self: SQLiteLedger, run: RunRecord, root: NewTask) -> None:
        if run.run_id.startswith(prefix):
            refused.append(run.run_id)
            raise error
        real(self, run, root)

    monkeypatch.setattr(SQLiteLedger, "create_run", create_run)
    return refused


def test_an_infrastructure_error_gives_the_tick_back(
    home: Path, ledger: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    add(home, "a", "*/5 * * * *", TREE, "-p", "chunks=1")
    add(home, "b", "*/5 * * * *", TREE, "-p", "chunks=1")
    refused = failing_create_run(monkeypatch, "a-", sqlite3.OperationalError("database is locked"))
    result = cli(home, "scheduler", "--at", START)
    # a fails (exit 1, one line, no traceback); b, after it, still fires.
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stdout.splitlines() == [
        f"a {START}: failed a-20300101T0000 (OperationalError: database is locked)",
        f"b {START}: fired b-20300101T0000",
    ]
    assert refused == ["a-20300101T0000"]
    monkeypatch.undo()
    # The claim was released: the next pass fires the tick.
    assert at(home, "2030-01-01T00:01:00Z") == [f"a {START}: fired a-20300101T0000"]
    assert schedule_runs(ledger, "a") == ["a-20300101T0000"]


def test_a_tick_claimed_by_a_scheduler_that_died_fires_on_a_later_pass(
    home: Path, ledger: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduler killed between claiming a tick and submitting its run leaves
    the claim and no run: once the claim is older than SETTLE, the next pass
    fires it (at least once), and the run id keeps it to one run."""
    from fanout.schedules import fire

    add(home, "a", "*/5 * * * *", TREE, "-p", "chunks=1")
    store = open_store(ledger)
    try:
        assert store.claim_tick("a", t(START))  # ... and the scheduler died here
    finally:
        store.close()
    assert at(home, "2030-01-01T00:01:00Z") == []  # a young claim: its owner may be busy
    assert schedule_runs(ledger, "a") == []
    monkeypatch.setattr(fire, "SETTLE", timedelta(0))  # the claim is old now
    assert at(home, "2030-01-01T00:01:00Z") == [f"a {START}: fired a-20300101T0000"]
    assert at(home, "2030-01-01T00:02:00Z") == []  # settled: not fired again
    assert schedule_runs(ledger, "a") == ["a-20300101T0000"]


def test_a_key_error_is_not_taken_for_a_tick_fired_already(
    home: Path, ledger: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the ledger refusing this very run id means "already fired".
    add(home, "a", "*/5 * * * *", TREE, "-p", "chunks=1")
    failing_create_run(monkeypatch, "a-", KeyError("runs/other/_manifest.json"))
    result = cli(home, "scheduler", "--at", START)
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stdout.startswith(f"a {START}: failed a-20300101T0000 (KeyError: ")
    monkeypatch.undo()
    assert at(home, START) == [f"a {START}: fired a-20300101T0000"]
    # And the real duplicate is still told apart: the run exists, the tick is claimed again.
    store = open_store(ledger)
    store.release_tick("a", t("2030-01-01T00:00"))
    assert at(home, START) == [f"a {START}: already fired a-20300101T0000"]


# -- two scheduler processes ------------------------------------------------------------


#: ``fanout ARGS...`` run by ``python -c AFTER_GO DIR ARGS...``: it imports what a
#: pass needs, says it is ready (the file DIR/ready-<pid>), then waits for DIR/go,
#: so that two racers begin their passes together.
AFTER_GO = """
import os, sys, time
from pathlib import Path
from fanout.cli import main
import fanout.cli_schedule, fanout.coordinator, fanout.schedules.fire, fanout.schedules.local
where = Path(sys.argv[1])
(where / f"ready-{os.getpid()}").touch()
deadline = time.monotonic() + 30
while not (where / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.001)
main(sys.argv[2:], prog_name="fanout")
"""


def test_two_schedulers_racing_fire_each_tick_once(
    home: Path, ledger: Backend, tmp_path: Path
) -> None:
    # 90 missed ticks, caught up by two processes at once: each tick is claimed
    # by one of them, so each run is submitted by exactly one process.
    add(home, "race", "* * * * *", TREE, "--catch-up", "all", "-p", "chunks=1")
    when = "2030-01-01T01:29:00Z"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    command = [sys.executable, "-c", AFTER_GO, str(barrier), "--home", str(home)]
    procs = [
        subprocess.Popen(
            [*command, "scheduler", "--at", when],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        wait_for("both schedulers to be ready", lambda: len(list(barrier.iterdir())) == 2, 30)
        (barrier / "go").touch()
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert [p.returncode for p in procs] == [0, 0], outputs
    fired = [
        {line.split()[-1] for line in out.splitlines() if ": fired " in line} for out, _ in outputs
    ]
    expected = {f"race-20300101T{h:02d}{m:02d}" for h in (0, 1) for m in range(60)}
    expected = {r for r in expected if r <= "race-20300101T0129"}
    assert len(expected) == 90
    assert fired[0] | fired[1] == expected
    assert fired[0] & fired[1] == set()
    # They did race: each one evaluated the ticks (fired some, or lost claims to
    # the other); one that ran after the other had finished would report none.
    for out, _ in outputs:
        lines = out.splitlines()
        assert any(": fired " in line or ": claimed elsewhere " in line for line in lines)
    # The claim settles each tick before any submit: a loser never even tries
    # (the ledger's refusal of a second run with the same id is the second guard).
    assert all("already fired" not in out for out, _ in outputs)
    assert set(schedule_runs(ledger, "race")) == expected


# -- the loop ---------------------------------------------------------------------------


def test_loop_fires_due_ticks_and_stops(ledger: Backend) -> None:
    store = open_store(ledger)
    from fanout.schedules import Schedule

    store.add(
        Schedule(
            name="loop",
            expression="*/5 * * * *",
            job=TREE,
            catch_up="none",
            start=t("2030-01-01T00:00"),
            created_at=t("2030-01-01T00:00"),
        )
    )
    reported: list[Fired] = []
    stop = threading.Event()
    clock = [t("2030-01-01T00:05:01")]
    thread = threading.Thread(
        target=run_loop, args=(ledger, store, stop, reported.append, lambda: clock[0])
    )
    thread.start()
    try:
        wait_for("the 00:05 tick", lambda: reported, 10)
        clock[0] = t("2030-01-01T00:10:00")
        stop.set()  # wakes the loop's sleep at once
        thread.join(timeout=5)
        assert not thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=5)
    # catch-up none: the 00:00 tick was 5 minutes late at 00:05:01, so only 00:05 fired.
    assert [(r.run_id, r.outcome) for r in reported] == [("loop-20300101T0005", "fired")]


def test_the_loop_wakes_at_a_tick_exactly_at_the_start(ledger: Backend) -> None:
    store = open_store(ledger)
    start = t("2030-01-01T00:00")
    for name, expression in (("rate", "rate(5 minutes)"), ("cron", "*/5 * * * *")):
        store.add(Schedule(name=name, expression=expression, job=TREE, start=start,
                           created_at=start))  # fmt: skip
    assert next_wake(store, t("2029-12-31T23:59:30")) == start  # not 00:05
    assert next_wake(store, start) == t("2030-01-01T00:05")  # strictly after now


def test_a_store_creates_its_tables_once(ledger: Backend) -> None:
    # A fire message opens a store each: no DDL for each one.
    open_store(ledger).close()
    statements: list[str] = []
    ledger.ledger.db.conn.set_trace_callback(statements.append)  # type: ignore[attr-defined]
    try:
        for _ in range(3):
            open_store(ledger).close()
    finally:
        ledger.ledger.db.conn.set_trace_callback(None)  # type: ignore[attr-defined]
    assert [s for s in statements if "CREATE" in s.upper()] == []
    assert [s.name for s in open_store(ledger).list()] == []  # the tables are there


def test_scheduler_process_stops_cleanly_on_sigint(home: Path, tmp_path: Path) -> None:
    add(home, "tree", "rate(1 day)")
    log = tmp_path / "scheduler.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*CLI, "--home", str(home), "scheduler"], stdout=out, stderr=subprocess.STDOUT
        )
        try:
            wait_for("the scheduler to start", lambda: "Ctrl-C stops" in log.read_text(), 30)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert "fanout scheduler: stopped" in text and "Traceback" not in text


def test_worker_with_scheduler_runs_scheduled_runs(
    home: Path, ledger: Backend, tmp_path: Path
) -> None:
    # Started in the past with catch-up latest: the current minute's tick is due at once.
    now = datetime.now(UTC)
    start = (now - timedelta(hours=1)).isoformat()
    ok(
        cli(
            home,
            "schedule",
            "add",
            "w",
            "--cron",
            "* * * * *",
            TREE,
            "--start",
            start,
            "-p",
            "chunks=1",
        )
    )
    with worker(home, tmp_path, "-w", "1", "--with-scheduler"):

        def succeeded() -> list[str]:
            runs = ledger.ledger.list_runs(limit=10, states=(RunState.SUCCEEDED,))
            return [r.run_id for r in runs if r.run_id.startswith("w-")]

        done = wait_for("a scheduled run to succeed", succeeded, 30)
    assert done[0] >= f"w-{now:%Y%m%dT%H%M}"


def test_a_scheduler_process_killed_while_idle_does_not_hang_its_stop(home: Path) -> None:
    # Its stop flag was a multiprocessing Event: the child killed in wait()
    # (the OOM killer, kill -9) made set() wait for it for ever, and with it
    # `fanout worker --with-scheduler` on SIGTERM (found in review).
    import multiprocessing
    import os
    import time

    from fanout.schedules.fire import start_process

    stop = start_process("local", home)
    (child,) = [p for p in multiprocessing.active_children() if p.name == "fanout-scheduler"]
    time.sleep(1.0)  # asleep on its stop flag
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    child.join(5)
    stopping = threading.Thread(target=stop, daemon=True)
    stopping.start()
    stopping.join(15)
    assert not stopping.is_alive(), "stopping the killed scheduler process hung"


# -- the schedule commands ------------------------------------------------------------


def test_list_show_remove(home: Path) -> None:
    add(home, "b", "rate(5 minutes)", TREE, "-p", "chunks=2", "--overlap", "skip")
    add(home, "a", "cron(0 12 ? * 6L *)", TREE)
    listed = ok(cli(home, "schedule", "list")).splitlines()
    assert [line.split()[0] for line in listed] == ["a", "b"]
    assert "rate(5 minutes)" in listed[1] and "overlap skip" in listed[1]
    # --start is inclusive: b's first tick is the one at its start, as add said.
    assert listed[1].endswith(f"next {START}")
    assert listed[0].endswith("next 2030-01-25T12:00:00Z")
    as_json = ok(cli(home, "schedule", "list", "--json")).splitlines()
    assert [json.loads(line)["next"] for line in as_json] == ["2030-01-25T12:00:00Z", START]
    shown = ok(cli(home, "schedule", "show", "a", "--after", "2030-01-01T00:00Z"))
    assert "schedule a: cron(0 12 ? * 6L *)" in shown
    assert (
        "next: 2030-01-25T12:00:00Z, 2030-02-22T12:00:00Z, 2030-03-29T12:00:00Z,"
        " 2030-04-26T12:00:00Z, 2030-05-31T12:00:00Z" in shown
    )
    shown = ok(cli(home, "schedule", "show", "b", "-n", "2", "--after", "2020-01-01T00:00Z"))
    assert '"chunks": 2' in shown
    assert "next: 2030-01-01T00:00:00Z, 2030-01-01T00:05:00Z" in shown  # not before --start
    assert ok(cli(home, "schedule", "remove", "b")) == "schedule b removed\n"
    assert [line.split()[0] for line in ok(cli(home, "schedule", "list")).splitlines()] == ["a"]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["schedule", "add", "x", "--cron", "61 * * * *", TREE], ["minute '61'"]),
        (["schedule", "add", "x", "--cron", "rate(5 minute)", TREE], ["rate(5 minutes)"]),
        (["schedule", "add", "x y", "--cron", "* * * * *", TREE], ["schedule name 'x y'"]),
        (["schedule", "add", "x", "--cron", "* * * * *", "nope.py"], ["nope.py does not exist"]),
        (["schedule", "add", "x", "--cron", "* * * * *", TREE, "-p", "chunk=1"], ["'chunk'"]),
        (["schedule", "add", "x", "--cron", "* * * * *", TREE, "-p", "chunks=two"], ["chunks"]),
        (
            ["schedule", "add", "x", "--cron", "* * * * *", TREE, "-p", "scheduled_time=1"],
            ["set by the scheduler"],
        ),
        (
            ["schedule", "add", "x", "--cron", "* * * * *", TREE, "--start", "soon"],
            ["--start 'soon'"],
        ),
        (
            ["schedule", "add", "x", "--cron", "cron(0 0 1 1 ? 2027)", TREE, "--start", START],
            ["never fires after 2030-01-01T00:00:00Z"],
        ),
        (["schedule", "show", "nope"], ["no schedule named 'nope'"]),
        (["schedule", "remove", "nope"], ["no schedule named 'nope'"]),
        (["scheduler", "--at", "noon"], ["--at 'noon'"]),
        (["--backend", "aws", "scheduler"], ["EventBridge"]),
        (["--backend", "aws", "worker", "--with-scheduler"], ["EventBridge"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(home: Path, args: list[str], needles: list[str]) -> None:
    user_error(cli(home, *args), *needles)


@pytest.mark.parametrize(
    ("expression", "needles"),
    [
        ("0 22-2 * * *", ["hour range '22-2' runs backwards", "write 22-23,0-2"]),
        ("50-10/5 * * * *", ["minute range '50-10/5' runs backwards", "write 50-59/5,0-10/5"]),
        ("0 0 20-3 * *", ["day-of-month range '20-3' runs backwards", "write 20-31,1-3"]),
        ("0 0 * DEC-FEB *", ["month range 'DEC-FEB' runs backwards", "write DEC,JAN-FEB"]),
        ("0 0 * * FRI-MON", ["day-of-week range 'FRI-MON' runs backwards", "FRI-SAT,SUN-MON"]),
        ("0 0 * * 5-1", ["day-of-week range '5-1' runs backwards", "write 5-6,0-1"]),
        ("cron(0 12 ? * SAT-SUN *)", ["day-of-week range 'SAT-SUN'", "write SAT,SUN"]),
        ("cron(0 0 1 1 ? 2031-2030)", ["year range '2031-2030'", "write 2030-2031"]),
        ("0 5-5 * * *", ["hour range '5-5' starts where it ends", "write 5"]),
        ("0 0 * * SUN-SUN", ["day-of-week range 'SUN-SUN' starts where it ends", "write SUN"]),
        # Accepted, and fired hourly: a step past the field matches its first value.
        ("*/61 * * * *", ["minute step '*/61' is longer than the field (0-59)", "write 0"]),
        ("0 3-9/30 * * *", ["hour step '3-9/30'", "matches 3 alone"]),
        ("cron(0 0 1/40 * ? *)", ["day-of-month step '1/40'", "write 1"]),
        # Vixie cron and cronie: both days must match (a field starting with *
        # counts as unrestricted); croniter: either (a black-box helper's find).
        ("0 0 */2 * 5", ["day-of-month '*/2' with a restricted day-of-week", "write 1-31/2"]),
        ("0 9 1,15 * */2", ["day-of-week '*/2' with a restricted day-of-month", "write 0-6/2"]),
    ],
)
def test_add_refuses_ranges_and_steps_that_cannot_mean_what_they_say(
    home: Path, expression: str, needles: list[str]
) -> None:
    """croniter wraps 22-2 round where EventBridge and other crons differ, so a
    new schedule says which field and what to write; nothing is stored."""
    args = ["schedule", "add", "x", "--cron", expression, TREE, "--start", START]
    user_error(cli(home, *args), f"schedule expression {expression!r}: ", *needles)
    assert ok(cli(home, "schedule", "list")) == ""


def jan(*days: int, at: str = "00:00") -> list[str]:
    return [f"2030-01-{day:02}T{at}:00Z" for day in days]


@pytest.mark.parametrize(
    ("expression", "fires"),
    [
        # Sunday (SUN or 0) ends a range as 7: forwards, through Sunday.
        # 2030-01-01 is a Tuesday; the 4th a Friday, the 6th a Sunday.
        ("0 0 * * MON-SUN", jan(2, 3, 4, 5, 6, 7, 8)),
        ("0 0 * * 1-0", jan(2, 3, 4, 5, 6, 7, 8)),
        ("0 0 * * FRI-SUN", jan(4, 5, 6, 11)),
        ("0 0 * * 5-0", jan(4, 5, 6, 11)),
        ("0 0 * * SAT-SUN", jan(5, 6, 12, 13)),
        ("0 0 * * 1-5", jan(2, 3, 4, 7, 8)),
        ("0 0 * * 0", jan(6, 13)),
        ("30 9 4 * *", [*jan(4, at="09:30"), "2030-02-04T09:30:00Z"]),
        ("*/5 * * * *", ["2030-01-01T00:05:00Z", "2030-01-01T00:10:00Z"]),
        ("cron(0 0 ? * MON-FRI *)", jan(2, 3, 4, 7)),
    ],
)
def test_add_accepts_forward_ranges(home: Path, expression: str, fires: list[str]) -> None:
    add(home, "s", expression)
    shown = ok(cli(home, "schedule", "show", "s", "-n", str(len(fires)), "--after", START))
    assert f"next: {', '.join(fires)}\n" in shown


def test_a_stored_backwards_range_still_fires(home: Path, ledger: Backend) -> None:
    """A schedule stored before add refused backwards ranges (put in the store
    here, below the check) still loads and fires, where croniter wraps 22-2:
    22, 23, 0, 1, 2. The check must not break the scheduler passes of a home
    holding one."""
    store = open_store(ledger)
    try:
        store.add(Schedule(name="old", expression="0 22-2 * * *", job=TREE, catch_up="none",
                           params={"chunks": 1}, start=t(START), created_at=t(START)))  # fmt: skip
        assert next_wake(store, t("2030-01-01T12:00")) == t("2030-01-01T22:00")
    finally:
        store.close()
    assert at(home, START) == [f"old {START}: fired old-20300101T0000"]
    assert at(home, "2030-01-01T12:00:00Z") == []
    assert at(home, "2030-01-01T23:00:00Z") == ["old 2030-01-01T23:00:00Z: fired old-20300101T2300"]
    assert ok(cli(home, "schedule", "list")).startswith("old ")
    shown = ok(cli(home, "schedule", "show", "old", "-n", "3", "--after", "2030-01-01T23:00Z"))
    assert "next: 2030-01-02T00:00:00Z, 2030-01-02T01:00:00Z, 2030-01-02T02:00:00Z" in shown
    assert schedule_runs(ledger, "old") == ["old-20300101T0000", "old-20300101T2300"]


def test_adding_a_taken_name_is_refused(home: Path) -> None:
    add(home, "x", "* * * * *")
    user_error(cli(home, "schedule", "add", "x", "--cron", "@daily", TREE), "'x' exists")
    assert "* * * * *" in ok(cli(home, "schedule", "show", "x"))
