"""The worker pool at process level, driven through the CLI as a user would:
hard timeouts, crashing children, ``kill -9`` of the whole worker, graceful
SIGTERM/SIGINT, ``--until-idle``.

Every process a test starts runs in its own session (so its process group can
be killed as a whole) and is killed in a ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fanout.backends.base import Backend, TaskKey, TaskState
from support.helpers import JOBS, TREE
from support.lambda_source import checkout_pythonpath
from support.procs import (
    alive,
    fanout,
    get_run,
    group_members,
    outcomes,
    run_id_of,
    status,
    wait_for,
    worker,
)
from testjobs.tree import Params, expected_items

HANG_AFTER_PUT = Path(__file__).parent / "support" / "hang_after_put.py"
DIE_AFTER_BATCH_COMMIT = Path(__file__).parent / "support" / "die_after_batch_commit.py"
QUEUE_FULL = Path(__file__).parent / "support" / "queue_full.py"

# -- helpers ---------------------------------------------------------------------


def _value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


def _params_args(params: dict[str, Any]) -> list[str]:
    return [a for k, v in params.items() for a in ("-p", f"{k}={_value(v)}")]


def submit(home: Path, **params: Any) -> str:
    result = fanout(home, "submit", TREE, *_params_args(params))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def assert_exact_output(home: Path, run_id: str, **params: Any) -> None:
    """``fanout cat`` holds every expected item exactly once, and nothing else."""
    result = fanout(home, "cat", run_id)
    assert result.returncode == 0, result.stderr
    items = Counter(json.loads(line)["item"] for line in result.stdout.splitlines())
    assert sorted(i for i, n in items.items() if n > 1) == []
    expected = expected_items(Params(**params))
    assert sorted(expected - set(items)) == []
    assert sorted(set(items) - expected) == []


# -- hard timeout and crashes ----------------------------------------------------


def test_a_full_disk_at_receive_is_logged_once_and_waited_out(home: Path, tmp_path: Path) -> None:
    # A receive that fails (SQLite: "database or disk is full") used to kill
    # the worker child with a traceback; the supervisor started another,
    # which died the same way: a crash loop, a traceback a few times a second.
    # The supervisor's own checks (its start-up recovery, the idle check of
    # --until-idle) died the same way, taking the whole worker down.
    run_id = submit(home, chunks=2, rows=3)
    full = tmp_path / "full"
    full.touch()
    env = {"FANOUT_TEST_QUEUE_FULL": str(full)}
    command = [sys.executable, str(QUEUE_FULL)]
    with worker(home, tmp_path, "-w", "1", "--until-idle", command=command, env=env) as proc:
        wait_for("a failed receive", (tmp_path / "full.count").exists, 20)
        wait_for("a failed check", (tmp_path / "full.checks").exists, 20)
        time.sleep(3)
        assert len((tmp_path / "full.count").read_bytes()) < 10  # backed off, not spinning
        assert len((tmp_path / "full.checks").read_bytes()) < 10
        assert proc.poll() is None  # --until-idle: not idle, not dead
        full.unlink()  # the disk has room again
        assert proc.wait(timeout=30) == 0
    assert status(home, run_id)["state"] == "succeeded"
    log = next(tmp_path.glob("worker-*.log")).read_text()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "disk is full" in line]
    assert len(lines) == 2, log
    assert any("receive" in line and "backing off" in line for line in lines), lines
    assert any("checks" in line and "backing off" in line for line in lines), lines
    assert_exact_output(home, run_id, chunks=2, rows=3)


def test_a_pool_told_to_finish_gives_up_on_a_backend_that_stays_broken(
    home: Path, tmp_path: Path
) -> None:
    # --until-idle (and `fanout run`) must end: a disk that never frees, a
    # database that stays corrupt, used to have the pool wait for ever once
    # its checks backed off instead of crashing. After GIVE_UP_AFTER (60 s;
    # 2 s here) it says why in one line.
    submit(home, chunks=2, rows=3)
    full = tmp_path / "full"
    full.touch()
    env = {"FANOUT_TEST_QUEUE_FULL": str(full), "FANOUT_TEST_GIVE_UP_AFTER": "2"}
    command = [sys.executable, str(QUEUE_FULL)]
    with worker(home, tmp_path, "-w", "1", "--until-idle", command=command, env=env) as proc:
        assert proc.wait(timeout=30) == 2
    log = next(tmp_path.glob("worker-*.log")).read_text()
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "disk is full" in errors[0], log


@pytest.mark.slow
def test_hard_timeout_kills_the_chunk_and_retries_it(home: Path, ledger: Backend) -> None:
    params = {"chunks": 3, "rows": 20, "sleep_chunks": [1], "sleep": 60.0}
    started = time.monotonic()
    result = fanout(home, "run", TREE, *_params_args(params), "-w", "2", "--chunk-timeout", "2")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    run_id = run_id_of(result)
    assert f"run {run_id} succeeded" in result.stdout
    # Killed at the 2 s hard timeout, not after the 60 s sleep.
    assert took < 20

    # Retried, so nothing is dead ...
    failed = fanout(home, "failed", run_id)
    assert failed.returncode == 0
    assert failed.stdout.strip() == f"run {run_id} has no dead chunks"
    # ... but the chunk's history says what happened.
    task = ledger.ledger.get_task(TaskKey(run_id, "0/1"))
    assert task is not None and task.state == TaskState.DONE
    assert outcomes(task) == ["timed out", "committed"]
    assert task.history[0]["error"] == "chunk exceeded its 2s hard timeout"
    others = [t for t in ledger.ledger.list_tasks(run_id) if t.chunk_id != "0/1"]
    assert [outcomes(t) for t in others] == [["committed"]] * 3
    st = status(home, run_id)
    assert st["state"] == "succeeded" and st["retries"] == 1 and st["records"] == 60
    assert st["chunks"]["done"] == 4 and st["chunks"]["dead"] == 0
    # The other chunks did not wait for the killed child's messages to come
    # back by visibility timeout (timeout + lease grace + prefetch slack = 12 s).
    assert st["elapsed_s"] < 8
    assert_exact_output(home, run_id, **params)


@pytest.mark.slow
def test_a_chunk_whose_job_imports_slowly_is_retried_in_a_warm_child(
    home: Path, ledger: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh child of `fanout worker` imported the job's libraries in its
    # chunk's time (Scrapy for a crawl, seconds on a loaded machine): the chunk
    # timed out, and its retry in the next fresh child did the same, until it
    # was dead (a crawl in CI beside other work). The supervisor now loads the
    # job of a chunk whose child died, and the child in its place starts warm.
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "heavylib.py").write_text("import time\ntime.sleep(3.5)  # a heavy import\n")
    job = tmp_path / "jobs" / "slowimport.py"
    job.parent.mkdir()
    job.write_text(
        "import heavylib  # noqa: F401\n"
        "from fanout import Job\n"
        "job = Job('slowimport', schema={'type': 'record', 'name': 'r',"
        " 'fields': [{'name': 'n', 'type': 'long'}]}, max_attempts=3)\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    ctx.emit({'n': 1})\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(lib))  # a library, not a module beside the job
    submitted = fanout(home, "submit", str(job), timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    done = fanout(home, "worker", "--until-idle", "-w", "1", "--chunk-timeout", "3", timeout=90)
    assert done.returncode == 0, done.stderr
    task = ledger.ledger.get_task(TaskKey(run_id, "0"))
    assert task is not None and outcomes(task) == ["timed out", "committed"], task.history
    assert get_run(ledger, run_id).state == "succeeded"


@pytest.mark.slow
def test_a_child_that_dies_is_recorded_as_crashed_and_retried(home: Path, ledger: Backend) -> None:
    params = {"chunks": 4, "rows": 15, "step": 5, "crash_chunks": [2]}
    result = fanout(home, "run", TREE, *_params_args(params), "-w", "2", "--chunk-timeout", "5")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    run_id = run_id_of(result)
    tasks = ledger.ledger.list_tasks(run_id)
    assert all(t.state == TaskState.DONE for t in tasks)
    # Each slice of chunk 2 crashes on its first attempt (the job's rule) and
    # is retried; every other task ran once.
    history = {(t.chunk_id, t.seq): outcomes(t) for t in tasks}
    assert history[("0/2", 0)] == ["crashed", "continued"]
    assert history[("0/2", 1)] == ["crashed", "continued"]
    assert history[("0/2", 2)] == ["crashed", "committed"]
    crashed = [t for t in tasks if t.chunk_id == "0/2"]
    assert {str(t.history[0]["error"]) for t in crashed} == {
        "worker process exited with code 3 (os._exit, or a crash in native code)"
    }
    # A quick chunk that finished in the crashing child's batch, its commit not
    # yet written, died with it: handed back as interrupted (no attempt spent)
    # and run again. That is timing; any other outcome is not.
    others = [
        [o for o in outcome if o != "interrupted"]
        for (chunk_id, _), outcome in history.items()
        if chunk_id != "0/2"
    ]
    assert all(o in (["committed"], ["continued"]) for o in others), history
    st = status(home, run_id)
    assert st["state"] == "succeeded" and st["retries"] == 3
    # 1 plan task + 4 chunks x 3 slices.
    assert st["chunks"]["done"] == 13
    # No chunk waited for a visibility timeout (5 + 5 + 5 s) after the crash.
    assert st["elapsed_s"] < 8
    assert_exact_output(home, run_id, **params)


@pytest.mark.slow
def test_a_child_killed_after_a_batch_commit_leaves_no_message_hidden(
    home: Path, tmp_path: Path, ledger: Backend
) -> None:
    """A child killed after its batch's commit and before its note of the batch
    says so: the supervisor found those attempts committed (so nothing to
    fail) and left their messages, whose acks died with the child, hidden for
    the visibility timeout (20 + 5 + 5 s), and ``--until-idle`` waited it out."""
    run_id = submit(home, chunks=40, rows=1)
    flag = tmp_path / "died"
    started = time.monotonic()
    with worker(
        home,
        tmp_path,
        "--until-idle", "-w", "1", "--chunk-timeout", "20",
        command=[sys.executable, str(DIE_AFTER_BATCH_COMMIT)],
        env={"FANOUT_TEST_DIE_FLAG": str(flag)},
    ) as proc:  # fmt: skip
        assert proc.wait(timeout=120) == 0
    took = time.monotonic() - started
    assert flag.exists(), "the child was not killed in a batch's commit"
    st = status(home, run_id)
    assert st["state"] == "succeeded" and st["records"] == 40
    assert took < 15, f"--until-idle took {took:.1f}s"
    assert_exact_output(home, run_id, chunks=40, rows=1)


@pytest.mark.slow
def test_slow_chunks_spread_over_all_children(home: Path) -> None:
    # Four chunks of about 1 s each on two children: about 2 s in parallel,
    # 4 s if one child prefetched them all and ran them one after the other.
    params = {"chunks": 4, "rows": 50, "row_sleep": 0.02}
    result = fanout(home, "run", TREE, *_params_args(params), "-w", "2", "--chunk-timeout", "10")
    assert result.returncode == 0, result.stderr
    st = status(home, run_id_of(result))
    assert st["state"] == "succeeded" and st["records"] == 200
    assert st["elapsed_s"] < 3.5


# -- kill -9 of the whole worker -------------------------------------------------


@pytest.mark.slow
def test_sigkill_of_the_worker_group_then_resume_gives_exact_output(
    home: Path, tmp_path: Path, ledger: Backend
) -> None:
    params = {"chunks": 20, "rows": 200, "step": 100, "row_sleep": 0.002}
    run_id = submit(home, **params)
    total_tasks = 1 + 20 * 2
    # The first slice of chunk 0/5 hangs between writing its output file and
    # committing it: the kill leaves an uncommitted file behind, as a kill
    # between those two steps of the commit protocol does.
    hang = {"FANOUT_TEST_HANG_AFTER_PUT": "/data/0.5-s0-a1-"}
    data = home / "store" / "runs" / run_id / "data"
    with worker(
        home,
        tmp_path,
        "--workers",
        "2",
        "--chunk-timeout",
        "3",
        command=[sys.executable, str(HANG_AFTER_PUT)],
        env=hang,
    ) as proc:

        def midway() -> bool:
            run = get_run(ledger, run_id)
            running = ledger.ledger.list_tasks(run_id, (TaskState.RUNNING,))
            hung = list(data.glob("0.5-s0-a1-*.avro"))
            return (
                run.tasks_done >= 8
                and bool(running)
                and bool(hung)
                and run.state.value == "running"
            )

        wait_for("some chunks committed, some in flight", midway, limit=30, every=0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        # The children die with the supervisor: nothing of the group is left.
        wait_for("the worker's group to be empty", lambda: not group_members(proc.pid), 5)

    run = get_run(ledger, run_id)
    assert run.state.value == "running" and 8 <= run.tasks_done < total_tasks
    running = ledger.ledger.list_tasks(run_id, (TaskState.RUNNING,))
    in_flight = {(t.chunk_id, t.seq) for t in running}
    assert in_flight, "the kill should have caught chunks in flight"

    # Resume. The dead worker's leases expire after 3 + 5 s and its messages
    # come back after their visibility timeout: allow for that.
    resume = fanout(
        home, "worker", "--until-idle", "--workers", "2", "--chunk-timeout", "3", timeout=90
    )
    assert resume.returncode == 0, resume.stderr
    assert "Traceback" not in resume.stderr

    st = status(home, run_id)
    assert st["state"] == "succeeded"
    assert st["chunks"]["done"] == total_tasks and st["chunks"]["dead"] == 0
    assert st["records"] == 20 * 200 and st["outstanding"] == 0
    # Every attempt the kill interrupted was taken over as crashed, then committed.
    for chunk_id, seq in in_flight:
        task = ledger.ledger.get_task(TaskKey(run_id, chunk_id, seq))
        assert task is not None and task.state == TaskState.DONE
        assert "crashed" in outcomes(task), (chunk_id, seq, task.history)
    assert_exact_output(home, run_id, **params)
    # The run's queue is empty: nothing left to redeliver.
    assert ledger.queue.pending() == 0
    # The manifest lists exactly the committed outputs, never the file of the
    # attempt killed before its commit (which is still on disk, as garbage).
    manifest = json.loads((home / "store" / "runs" / run_id / "_manifest.json").read_text())
    committed = {
        t.output.key
        for t in ledger.ledger.list_tasks(run_id, (TaskState.DONE,))
        if t.output is not None
    }
    assert len(committed) == 20 * 2
    assert {f["key"] for f in manifest["files"]} == committed
    (uncommitted,) = data.glob("0.5-s0-a1-*.avro")
    assert f"runs/{run_id}/data/{uncommitted.name}" not in committed
    written = {f"runs/{run_id}/data/{p.name}" for p in data.glob("*.avro")}
    assert committed < written


# -- graceful stop ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["sigterm-to-supervisor", "sigint-to-group"],
)
def test_graceful_stop_finishes_work_in_hand_then_resume_is_exact(
    home: Path, tmp_path: Path, ledger: Backend, signum: int, to_group: bool
) -> None:
    # Chunks of about 0.6 s: longer than the polling, well under the timeout.
    params = {"chunks": 8, "rows": 60, "row_sleep": 0.01}
    run_id = submit(home, **params)
    with worker(home, tmp_path, "--workers", "2", "--chunk-timeout", "3") as proc:

        def chunks_in_flight() -> set[tuple[str, int]]:
            return {
                (t.chunk_id, t.seq)
                for t in ledger.ledger.list_tasks(run_id, (TaskState.RUNNING,))
                if t.chunk_id != "0"
            }

        wait_for("a chunk in flight", chunks_in_flight, limit=30, every=0.02)
        in_hand = chunks_in_flight()
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        signalled = time.monotonic()
        rc = proc.wait(timeout=15)
        took = time.monotonic() - signalled
        assert rc == 0
        assert took < 6
        wait_for("the worker's group to be empty", lambda: not group_members(proc.pid), 5)

    run = get_run(ledger, run_id)
    tasks = ledger.ledger.list_tasks(run_id)
    # Stopped part way: work is left, and none of it is held by a dead lease.
    assert run.state.value == "running"
    assert [t.chunk_id for t in tasks if t.state == TaskState.RUNNING] == []
    assert any(t.state == TaskState.QUEUED for t in tasks)
    for t in tasks:
        # Nothing was killed: each attempt committed or was handed back.
        assert set(outcomes(t)) <= {"committed", "interrupted"}, (t.chunk_id, t.history)
    started = 0
    for chunk_id, seq in in_hand:
        task = ledger.ledger.get_task(TaskKey(run_id, chunk_id, seq))
        assert task is not None
        # A chunk claimed with its batch but not started yet is given back as if
        # never claimed (fanout.batches): queued, nothing in its history.
        assert task.state == TaskState.DONE or (
            task.state == TaskState.QUEUED and outcomes(task) in (["interrupted"], [])
        ), (chunk_id, task.state, task.history)
        started += task.state == TaskState.DONE or outcomes(task) == ["interrupted"]
    assert started, "no chunk in hand had started: the stop was not tested"

    resume = fanout(home, "worker", "--until-idle", "--workers", "2", "--chunk-timeout", "3")
    assert resume.returncode == 0, resume.stderr
    st = status(home, run_id)
    assert st["state"] == "succeeded" and st["chunks"]["done"] == 9
    for t in ledger.ledger.list_tasks(run_id):
        # No lease of the stopped worker had to expire to be taken over.
        assert "crashed" not in outcomes(t) and "timed out" not in outcomes(t), t.history
    assert_exact_output(home, run_id, **params)


# -- idle ------------------------------------------------------------------------


@pytest.mark.slow
def test_signals_that_come_together_stop_the_worker_not_hang_it(home: Path, tmp_path: Path) -> None:
    # `timeout` relays its own TERM, a group kill reaches the supervisor with
    # the rest: its handler ran again while the first was setting the stop
    # event, on the same semaphore, and the worker hung until SIGKILL (about
    # half the tries). Here, three at once, several times over.
    for round_ in range(5):
        with worker(home, tmp_path, "--workers", "2") as proc:
            wait_for("the worker's children", lambda: len(group_members(proc.pid)) >= 3, 30)
            time.sleep(1.0)  # the children idle, asleep on the stop event
            for _ in range(3):
                os.kill(proc.pid, signal.SIGTERM)
                time.sleep(0)  # apart by a few microseconds, as a relayed signal is
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pytest.fail(f"round {round_}: the worker hung after three SIGTERMs")
            wait_for("the worker's group to be empty", lambda: not group_members(proc.pid), 5)


def test_until_idle_exits_by_itself_on_an_empty_home(home: Path) -> None:
    started = time.monotonic()
    result = fanout(home, "worker", "--until-idle", "--workers", "2", timeout=30)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10
    assert "Traceback" not in result.stderr
    assert f"fanout worker: 2 processes on {home}" in result.stderr
    # And `fanout runs` on that home is empty, and says so to a person.
    runs = fanout(home, "runs", "--json")
    assert runs.returncode == 0 and runs.stdout == "" and runs.stderr == ""
    runs = fanout(home, "runs")
    assert runs.returncode == 0 and runs.stdout == "" and "no runs yet" in runs.stderr


def test_until_idle_waits_for_a_run_whose_finalizer_died(
    home: Path, ledger: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a SIGKILL of the process finalizing a run, `worker --until-idle`
    # exited 0 at once with the run still "finalizing"; the sweep would take
    # it over only once the finalizer was silent FINALIZE_STALE.
    from fanout import coordinator
    from fanout import runner as runner_mod
    from fanout.backends.base import RunState
    from fanout.finalize import FINALIZE_STALE
    from support.helpers import drain

    run_id = coordinator.submit(ledger, TREE, {"chunks": 2, "rows": 3}).run_id
    monkeypatch.setattr(runner_mod, "finalize_run", lambda *a, **k: False)  # it died first
    with pytest.raises(AssertionError, match="did not finish"):
        drain(ledger, run_id, limit=3.0)
    # The finalizer that died began FINALIZE_STALE - 3 s ago: stale in 3 s.
    assert ledger.ledger.begin_finalize(run_id, time.time() - FINALIZE_STALE + 3, FINALIZE_STALE)
    result = fanout(home, "worker", "--until-idle", "-w", "1", timeout=60)
    assert result.returncode == 0, result.stderr
    run = ledger.ledger.get_run(run_id)
    assert run is not None and run.state == RunState.SUCCEEDED, run
    assert f"waiting for run {run_id}'s finalizer" in result.stderr
    assert_exact_output(home, run_id, chunks=2, rows=3)


#: ``fanout run`` with the supervisor's poll of the ledger and an idle child's
#: longest sleep both stretched to 60 s: only being woken ends it soon.
SLOW_POLLS = (
    "import sys, fanout.worker as w; w.CHECK_EVERY['local'] = 60.0; w.MAX_POLL_SLEEP = 60.0;"
    " from fanout.cli import main; sys.argv[0] = 'fanout'; main()"
)


def test_run_exits_as_soon_as_its_run_ends_not_at_the_next_poll(
    home: Path, ledger: Backend
) -> None:
    # The child that finalizes the run wakes the supervisor, and a stopped idle
    # child leaves at once: with 60 s polls, a poll-bound exit takes 60 s (the
    # first look at the run comes before it ends), or 1 s more to kill a child
    # asleep in its poll.
    cmd = [sys.executable, "-c", SLOW_POLLS, "--home", str(home), "run", TREE]
    params = _params_args({"chunks": 6, "rows": 5})
    proc = subprocess.run(
        [*cmd, *params, "-w", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=50,
        env={**os.environ, "PYTHONPATH": checkout_pythonpath()},
    )
    exited = time.time()
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run["state"] == "succeeded"
    record = ledger.ledger.get_run(run["run_id"])
    assert record is not None and record.finished_at is not None
    assert exited - record.finished_at < 0.8, exited - record.finished_at


@pytest.mark.slow
def test_a_child_that_dies_mid_batch_hands_its_batch_back_at_once(
    home: Path, ledger: Backend
) -> None:
    """Quick chunks are claimed in batches (fanout.batches). When the child
    dies in the middle of a batch, the supervisor hands back the batch's other
    claimed attempts at once (those not started as if never claimed, those
    finished but not committed as interrupted): left alone they would wait
    for their leases (30 + 5 s) to expire."""
    params = {"chunks": 120, "rows": 1, "crash_chunks": [90]}
    args = _params_args(params)
    result = fanout(home, "run", TREE, *args, "-w", "1", "--chunk-timeout", "30")
    assert result.returncode == 0, result.stderr
    run_id = run_id_of(result)
    st = status(home, run_id)
    assert st["state"] == "succeeded" and st["records"] == 120
    assert st["elapsed_s"] < 20
    tasks = {t.chunk_id: t for t in ledger.ledger.list_tasks(run_id)}
    assert outcomes(tasks["0/90"]) == ["crashed", "committed"]
    interrupted = [t for t in tasks.values() if outcomes(t) == ["interrupted", "committed"]]
    assert {t.history[0]["error"] for t in interrupted} <= {"its worker died before it committed"}
    others = [t for t in tasks.values() if t not in interrupted and t.chunk_id != "0/90"]
    assert all(outcomes(t) == ["committed"] for t in others)
    assert_exact_output(home, run_id, **params)


# -- what a chunk changes in its process -------------------------------------------


def seen_job(name: str, fields: str, process: str) -> str:
    """A job ``name`` of 6 chunks, one after another on one worker, each
    emitting what it saw (``fields``: the schema's) by ``process`` (its body)."""
    return f"""
import os, signal, time
from fanout import Job

job = Job({name!r}, schema={{"type": "record", "name": "seen", "fields": [{fields}]}})


@job.plan
def plan(params, ctx):
    for i in range(6):
        yield {{"i": i}}


@job.process
def process(chunk, ctx):
{process}"""


CHDIR_JOB = seen_job(
    "chdir",
    '{"name": "cwd", "type": "string"}, {"name": "umask", "type": "int"}',
    """\
    mask = os.umask(0o077)
    ctx.emit({"cwd": os.getcwd(), "umask": mask})
    os.chdir("/")  # and leave the process so, as a careless job would
""",
)


def test_a_chunk_that_changes_directory_or_umask_does_not_change_them_for_the_next(
    home: Path, tmp_path: Path
) -> None:
    # One worker: its chunks follow one another in the same process.
    job = tmp_path / "chdir_job.py"
    job.write_text(CHDIR_JOB)
    start = tmp_path / "start"
    start.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "fanout.cli", "--home", str(home), "run", str(job), "-w", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=start,
        env={**os.environ, "PYTHONPATH": checkout_pythonpath()},
    )
    assert proc.returncode == 0, proc.stderr
    seen = [json.loads(line) for line in fanout(home, "cat").stdout.splitlines()]
    mask = os.umask(0o022)
    os.umask(mask)
    assert len(seen) == 6
    assert {(s["cwd"], s["umask"]) for s in seen} == {(str(start), mask)}


ALARM_JOB = seen_job(
    "alarm",
    '{"name": "i", "type": "long"}, {"name": "term", "type": "string"}',
    """\
    ctx.emit({"i": chunk["i"], "term": repr(signal.getsignal(signal.SIGTERM))})
    if not os.path.exists("@FIRST@"):  # the first chunk to run, as a careless job would:
        open("@FIRST@", "w").close()
        signal.alarm(1)  # forgotten, and
        signal.signal(signal.SIGTERM, lambda *_: None)  # its handler left behind
    time.sleep(0.3)
""",
)


def test_a_chunk_s_forgotten_alarm_and_signal_handler_do_not_outlive_it(
    home: Path, tmp_path: Path
) -> None:
    # One worker, chunks of 0.3 s one after another: the alarm went off in the
    # fourth, whose worker SIGALRM killed (that chunk retried, blamed for it).
    job = tmp_path / "alarm_job.py"
    job.write_text(ALARM_JOB.replace("@FIRST@", str(tmp_path / "first")))
    result = fanout(home, "run", str(job), "-w", "1")
    assert result.returncode == 0, result.stderr
    st = status(home, run_id_of(result))
    assert st["state"] == "succeeded" and st["retries"] == 0 and st["crashed"] == 0, st
    seen = [json.loads(line) for line in fanout(home, "cat").stdout.splitlines()]
    assert sorted(s["i"] for s in seen) == list(range(6))
    # The worker's own handling (SIGTERM is its supervisor's) in every chunk.
    assert {s["term"] for s in seen} == {repr(signal.SIG_IGN)}


CLOSES_STDERR_JOB = seen_job(
    "closes-stderr",
    '{"name": "i", "type": "long"}',
    """\
    ctx.log.warning("chunk %d says hello", chunk["i"])
    if not os.path.exists("@FIRST@"):  # the first chunk to run, as a careless job would:
        open("@FIRST@", "w").close()
        os.close(2)
        globals()["kept"] = open("@FILE@", "w")  # kept open: it takes fd 2
    ctx.emit({"i": chunk["i"]})
""",
)


def test_a_chunk_that_closes_stderr_does_not_take_later_chunks_logs_with_it(
    home: Path, tmp_path: Path
) -> None:
    # The later chunks' log lines went into the first file opened after the
    # close (fd 2 is the lowest free one): a job's file here, or fanout's own.
    job = tmp_path / "closes_job.py"
    opened = tmp_path / "opened.txt"
    text = CLOSES_STDERR_JOB.replace("@FIRST@", str(tmp_path / "first"))
    job.write_text(text.replace("@FILE@", str(opened)))
    result = fanout(home, "run", str(job), "-w", "1")
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "says hello" in line]
    assert len(said) == 6, result.stderr
    assert "says hello" not in opened.read_text()


CLOSES_STREAMS_JOB = seen_job(
    "closes-streams",
    '{"name": "i", "type": "long"}',
    """\
    import sys
    print("chunk", chunk["i"], "prints")
    ctx.log.warning("chunk %d says hello", chunk["i"])
    if not os.path.exists("@FIRST@"):  # the first chunk to run, as a careless job would:
        open("@FIRST@", "w").close()
        sys.stdout.close()  # (fds 1 and 2 stay open: only Python's objects close)
        sys.stderr.close()
        raise ValueError("closed")  # and fails, its retry logged with stderr closed
    elif not os.path.exists("@FAILED@"):  # a later one fails once, and is retried
        open("@FAILED@", "w").close()
        raise ValueError("once")
    ctx.emit({"i": chunk["i"]})
""",
)


def test_a_chunk_that_closes_sys_stdout_and_stderr_does_not_fail_later_chunks(
    home: Path, tmp_path: Path
) -> None:
    # Every later print raised "I/O operation on closed file": innocent chunks
    # died, and fanout's own log lines raised in the worker, its retries
    # waiting out a lease (70 s) instead of their back-off.
    job = tmp_path / "closes_streams.py"
    text = CLOSES_STREAMS_JOB.replace("@FIRST@", str(tmp_path / "first"))
    job.write_text(text.replace("@FAILED@", str(tmp_path / "failed")))
    started = time.monotonic()
    result = fanout(home, "run", str(job), "-w", "1", "-S", "backoff_base=0.1", timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    st = status(home, run_id_of(result))
    assert st["state"] == "succeeded" and st["retries"] == 2 and st["crashed"] == 0, st
    assert took < 30, f"{took:.1f} s"
    said = [line for line in result.stderr.splitlines() if "says hello" in line]
    printed = [line for line in result.stderr.splitlines() if line.endswith(" prints")]
    assert len(said) == len(printed) == 8, result.stderr  # six chunks, two of them twice
    assert "closed; retry in" in result.stderr and "once; retry in" in result.stderr


ENVIRON = str(JOBS / "environ.py")
#: What the worker's environment gives the environ job's chunks.
GIVEN = {
    "FANOUT_TEST_CHANGED": "given",
    "FANOUT_TEST_REMOVED": "given",
    "_X_AMZN_TRACE_ID": "given",
}


def _environ_seen(home: Path, run_id: str = "") -> list[dict[str, Any]]:
    result = fanout(home, "cat", *([run_id] if run_id else []))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_chunk_that_changes_environment_variables_does_not_change_them_for_the_next(
    home: Path,
) -> None:
    # One worker process runs the plan and all six chunks one after another;
    # each adds, changes and deletes variables after looking.
    result = fanout(home, "run", ENVIRON, "-p", "chunks=6", "-w", "1", env=GIVEN)
    assert result.returncode == 0, result.stderr
    seen = _environ_seen(home)
    assert sorted(s["i"] for s in seen) == list(range(6))
    assert len({s["pid"] for s in seen}) == 1
    assert {(s["added"], s["changed"], s["removed"], s["trace"]) for s in seen} == {
        (None, "given", "given", "given")
    }


def test_a_variable_the_job_module_sets_at_import_stays_for_its_later_chunks(
    home: Path, tmp_path: Path
) -> None:
    # The module is imported once in the worker process, by the plan's chunk,
    # then cached: that import is part of every chunk's starting environment
    # (as load_dotenv() at the top of a job is), though each chunk deletes it.
    result = fanout(home, "submit", ENVIRON, "-p", "chunks=6")
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    with worker(home, tmp_path, "-w", "1", "--until-idle", env=GIVEN) as proc:
        assert proc.wait(timeout=60) == 0
    seen = _environ_seen(home, run_id)
    assert len(seen) == 6 and len({s["pid"] for s in seen}) == 1
    assert {s["imported"] for s in seen} == {"at import"}


LEFTOVER_JOB = """
import os, subprocess, sys, time
from pathlib import Path
from fanout import Job

job = Job("leftover", max_attempts=1, schema={"type": "record", "name": "r", "fields": []})


@job.process
def process(params, ctx):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(params["pids"]).write_text(str(sleeper.pid))
    if params["then"] == "hang":
        time.sleep(600)  # past the hard timeout: the worker process is killed
    if params["then"] == "crash":
        os._exit(3)  # the worker process dies on its own, in the chunk
"""


@pytest.mark.parametrize("then", ["return", "hang", "crash"])
def test_a_process_a_chunk_left_running_ends_with_its_worker(
    home: Path, tmp_path: Path, then: str
) -> None:
    """A job's subprocess outlived its chunk, its worker and `fanout run`: one
    left running by a chunk that returned, by one killed at its hard timeout,
    or by one whose worker process died on its own (reparented, not to init,
    but to the supervisor, which ends it)."""
    job = tmp_path / "leftover.py"
    job.write_text(LEFTOVER_JOB)
    pids = tmp_path / "pids"
    run = fanout(
        home,
        "run", str(job), "-p", f"pids={pids}", "-p", f"then={then}",
        "-w", "1", "--chunk-timeout", "3",
        timeout=60,
    )  # fmt: skip
    assert run.returncode == (0 if then == "return" else 1), run.stderr
    sleeper = int(pids.read_text())
    wait_for("the chunk's subprocess to end", lambda: not alive(sleeper), 5)


DETACHING_JOB = """
import subprocess
from fanout import Job

job = Job("detach", schema={"type": "record", "name": "r", "fields": []})


@job.process
def process(params, ctx):
    # The shell exits at once; its sleep, orphaned, goes to the nearest subreaper.
    subprocess.run(["sh", "-c", "sleep 0.2 &"], check=True)
"""


def _zombies_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_processes_a_chunk_detached_are_not_left_zombies_of_the_worker(
    home: Path, tmp_path: Path, ledger: Backend
) -> None:
    """The supervisor adopts what a chunk's processes orphan (it is a subreaper,
    to end what a crashed worker process left): those that end must be reaped,
    or a long-lived worker fills the process table with zombies."""
    job = tmp_path / "detach.py"
    job.write_text(DETACHING_JOB)
    submitted = fanout(home, "submit", str(job), "-p", "x=1")
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    with worker(home, tmp_path, "-w", "1") as proc:
        wait_for("the run", lambda: get_run(ledger, run_id).state.value == "succeeded", 30)
        time.sleep(0.5)  # the detached sleep has ended
        wait_for("no zombie left", lambda: not _zombies_of(proc.pid), 15)
        assert proc.poll() is None  # still working


def test_a_child_killed_while_idle_does_not_hang_the_worker_s_stop(
    home: Path, tmp_path: Path
) -> None:
    # An idle child sleeps in the stop flag's wait(). As a multiprocessing
    # Event, the supervisor's set() at shutdown then waited for the killed
    # child to wake, for ever: `fanout run` never exited after its run ended,
    # nor `fanout worker` on SIGTERM (found with a crawl, kill -9 of a worker).
    with worker(home, tmp_path, "--workers", "2") as proc:
        wait_for("the worker's children", lambda: len(group_members(proc.pid)) >= 3, 30)
        time.sleep(1.0)  # the children idle, asleep on the stop flag
        child = next(pid for pid in group_members(proc.pid) if pid != proc.pid)
        os.kill(child, signal.SIGKILL)
        time.sleep(1.0)  # the supervisor replaces it
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker hung on SIGTERM after a child was killed while idle")
        assert proc.returncode == 0, proc.returncode
        wait_for("the worker's group to be empty", lambda: not group_members(proc.pid), 5)
