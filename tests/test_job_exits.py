"""Every way a job's chunk can end is recorded with its cause, within a second
or two (issue 10, point 2), and the CLI prints no traceback.

Process level: ``fanout run`` of a one-chunk job (``testjobs/exits.py``) whose
chunk ends by ``sys.exit(3)``, ``KeyboardInterrupt``, ``os._exit``, a SIGKILL,
a memory hog over ``--chunk-memory``, a sleep past its hard timeout, or a
continuation that makes no progress. The ledger's history says when the
attempt was claimed and when its failure was recorded.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fanout.backends import open_backend
from fanout.backends.base import TaskKey, TaskState
from support.helpers import JOBS
from support.procs import fanout, run_id_of

EXITS = str(JOBS / "exits.py")

CASES = [
    # mode, extra CLI args, recorded failure kind, words of the recorded error
    ("sys.exit", [], "exited", "sys.exit(3)"),
    ("keyboard", [], "error", "KeyboardInterrupt"),
    ("os._exit", [], "crashed", "exited with code 7"),
    ("signal", [], "crashed", "killed by SIGKILL"),
    ("memory", ["--chunk-memory", "200"], "out of memory", "over its 200 MB limit"),
    ("sleep", ["--chunk-timeout", "1"], "timed out", "1s hard timeout"),
    # Formatting its 200,000 frames took longer than the recursion (a million,
    # 23 s: "timed out", the cause lost): a deep stack is told by its ends.
    ("recursion", [], "error", "RecursionError: maximum recursion depth exceeded"),
    # As long when the job raised another exception from it (a review's find).
    ("recursion-wrapped", [], "error", "ValueError: wrapped"),
    # Its __str__ raises: was fanout's "internal error: RuntimeError: no message".
    ("unspeakable", [], "error", "Unspeakable: (its message could not be made"),
    # Its __traceback__ raises: formatting it killed the worker, and the attempt
    # showed only as "crashed" once its lease ran out (a black-box helper's find).
    ("untraceable", [], "error", "Untraceable: the job's words"),
]


@pytest.mark.parametrize(("mode", "args", "kind", "words"), CASES, ids=[c[0] for c in CASES])
def test_each_end_of_a_chunk_is_recorded_with_its_cause_at_once(
    home: Path, mode: str, args: list[str], kind: str, words: str
) -> None:
    # --chunk-timeout 5 unless the case sets it: an unrecorded end would show as
    # a lease expiring 10 s later ("crashed", no cause), well past the bound.
    timeout = [] if "--chunk-timeout" in args else ["--chunk-timeout", "5"]
    result = fanout(home, "run", EXITS, "-p", f"mode={mode}", "-w", "1", *timeout, *args)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    run_id = run_id_of(result)

    backend = open_backend("local", home=home)
    try:
        task = backend.ledger.get_task(TaskKey(run_id, "0", 0))
    finally:
        backend.close()
    assert task is not None
    assert task.state is TaskState.DEAD
    events = task.history
    failed = next(e for e in events if e["outcome"] != "dead")
    assert failed["outcome"] == kind, events
    assert words in str(failed["error"]), events
    # From the claim to the record of the failure (the sleeper's hard timeout is
    # 1 s: recorded within a second of it).
    assert float(failed["duration_s"]) < 2.0, events

    shown = fanout(home, "failed", run_id)
    assert shown.returncode == 0, shown.stderr
    assert f"{kind}: " in shown.stdout and words in shown.stdout, shown.stdout


@pytest.mark.parametrize(
    ("mode", "timeout", "words"),
    [
        # It returned at once with the cursor it was given, never asking
        # time_left(): the advice to raise --chunk-timeout pointed away from
        # the job's bug. One that asked may have had too little time.
        ("no-progress", "5", "the job resumed at the cursor it was given without asking"),
        (
            "no-progress-slow",
            "3",
            "chunk timeout too short for this job (3s; raise --chunk-timeout",
        ),
    ],
)
def test_a_continuation_that_makes_no_progress_fails_saying_why(
    home: Path, mode: str, timeout: str, words: str
) -> None:
    result = fanout(home, "run", EXITS, "-p", f"mode={mode}", "-w", "1", "--chunk-timeout", timeout)
    assert result.returncode == 1, result.stderr
    run_id = run_id_of(result)
    backend = open_backend("local", home=home)
    try:
        tasks = backend.ledger.list_tasks(run_id)
    finally:
        backend.close()
    # seq 0 resumes from no cursor; seq 1 resumes from the same cursor again: dead.
    assert [(t.seq, t.state) for t in tasks] == [(0, TaskState.DONE), (1, TaskState.DEAD)]
    shown = fanout(home, "failed", run_id)
    assert "no progress: resume_at(0) made no progress since the previous slice" in shown.stdout
    assert words in shown.stdout, shown.stdout


def test_a_job_that_calls_os_exit_at_import_is_refused_with_one_line(
    home: Path, tmp_path: Path
) -> None:
    job = tmp_path / "quits.py"
    job.write_text("import os\n\nos._exit(0)\n")
    for command in ("validate", "run", "submit"):
        result = fanout(home, command, str(job))
        assert result.returncode == 2, (command, result)
        assert result.stderr.strip() == (
            f"error: job file {job} calls os._exit(0) at import: a job must not end the process"
        )


DIES_FINALIZING = """
import os

from fanout import Job
from fanout.backends.local.store import DirStore

job = Job("dies-finalizing")
_put = DirStore.put


def put(self, key, data, **kwargs):
    # Fault injection: this worker process dies while it writes the manifest,
    # after it took the run to "finalizing".
    if key.endswith("_manifest.json"):
        os._exit(9)
    return _put(self, key, data, **kwargs)


@job.process
def process(chunk, ctx):
    DirStore.put = put
"""


def test_a_finalizer_that_dies_is_taken_over_at_once(home: Path, tmp_path: Path) -> None:
    """Its run does not stay "finalizing" until the recovery sweep finds it stale
    (60 s): the supervisor saw the process die and finishes the run itself."""
    job = tmp_path / "dies_finalizing.py"
    job.write_text(DIES_FINALIZING)
    started = time.monotonic()
    result = fanout(home, "run", str(job), "-w", "1", "--chunk-timeout", "5", timeout=50)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "succeeded" in result.stdout
    assert took < 15, took


def test_a_deep_stack_in_a_chain_is_told_by_its_ends_with_the_chain_kept() -> None:
    # The first bounded formatter printed only the outer exception of a deep
    # stack: the KeyError it came from, and the "direct cause" line, were gone.
    from fanout.failures import TRACEBACK_FRAMES, format_traceback

    def deeper(n: int) -> None:
        if n == 0:
            raise KeyError("the root cause")
        deeper(n - 1)

    try:
        try:
            deeper(TRACEBACK_FRAMES * 3)
        except KeyError as exc:
            raise RuntimeError("the job's own words") from exc
    except RuntimeError as exc:
        told = format_traceback(exc)
        assert exc.__cause__ is not None  # the exception is left as it was
    assert "frames not shown" in told
    root, cause_line, outer = (
        told.index("KeyError: 'the root cause'"),
        told.index("The above exception was the direct cause"),
        told.index("RuntimeError: the job's own words"),
    )
    assert root < cause_line < outer
    assert told.count("\n") < 3 * TRACEBACK_FRAMES  # not one line per frame


def test_a_worker_process_dying_amid_its_claims_gives_them_back_at_once(home: Path) -> None:
    # The claims a child made and had not started yet (a batch's, or the next
    # chunk's) were known to its supervisor only once noted after the claim: a
    # child dying in between left them to their leases, the run stalled for the
    # chunk timeout (70 s at the default; a black-box helper's find).
    for _ in range(4):
        began = time.monotonic()
        result = fanout(home, "run", str(JOBS / "late_exit.py"), "-w", "2", "--chunk-timeout", "30")
        assert result.returncode == 0, result.stderr
        assert "succeeded: 120 records" in result.stdout, result.stdout
        assert time.monotonic() - began < 15, "a claim waited for its lease"


def test_a_file_system_that_takes_no_write_is_logged_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A full disk repeats its failure at every try: each was logged with a
    # whole traceback, and stderr filled with them (a black-box helper's find).
    import errno
    import logging
    import sqlite3

    from fanout.failures import cannot_write, log_failure

    full = OSError(errno.ENOSPC, "No space left on device")
    assert cannot_write(full) and cannot_write(sqlite3.OperationalError("database or disk is full"))
    assert not cannot_write(ValueError("a bug")) and not cannot_write(OSError(errno.ENOENT, "x"))
    with caplog.at_level(logging.ERROR, logger="fanout.runner"):
        log_failure("could not record the failure of %s", "run:0/1#0", exc=full)
        try:
            raise ValueError("a bug")
        except ValueError as bug:
            log_failure("could not record the failure of %s", "run:0/2#0", exc=bug)
    quiet, loud = caplog.records
    assert quiet.exc_info is None and "No space left on device" in quiet.getMessage()
    assert loud.exc_info is not None  # anything else keeps its traceback


def test_fanout_run_stops_saying_so_when_its_homes_disk_stays_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the home's disk full, `fanout run` showed the same progress line
    # for ever (5 minutes, until killed; a black-box helper's find).
    import json
    import os

    from fanout import worker
    from support.cli import cli, ok

    home = tmp_path / "home"
    job = tmp_path / "slow.py"
    job.write_text(
        "import time\nfrom fanout import Job\n"
        "job = Job('slow', schema={'type': 'record', 'name': 'r',"
        " 'fields': [{'name': 'n', 'type': 'long'}]})\n"
        "@job.process\ndef process(payload, ctx):\n"
        "    time.sleep(2)\n    ctx.emit({'n': 1})\n"
    )
    real = os.statvfs

    def full(path: object) -> os.statvfs_result:
        st = real(path)  # type: ignore[arg-type]
        if str(path).startswith(str(home)):
            return os.statvfs_result((*st[:3], 0, 0, *st[5:]))  # f_bfree, f_bavail: none
        return st

    monkeypatch.setattr(worker, "DISK_FULL_WAIT", 0.5)
    monkeypatch.setattr(os, "statvfs", full)
    began = time.monotonic()
    stopped = cli(home, "run", str(job), "-w", "1")
    assert stopped.exit_code == 2 and "Traceback" not in stopped.output, stopped.output
    started, said = stopped.stderr.splitlines()  # the run's id, then why it stopped
    assert started.startswith("run slow-"), stopped.stderr
    assert said.startswith("error: the disk of") and "is full" in said and "--until-idle" in said
    assert time.monotonic() - began < 10
    monkeypatch.setattr(os, "statvfs", real)  # space freed
    ok(cli(home, "worker", "--until-idle", "-w", "1"))
    run = json.loads(ok(cli(home, "runs", "--json")).splitlines()[0])
    assert run["state"] == "succeeded" and run["records"] == 1, run


def test_a_chunk_that_kills_its_worker_between_its_end_and_its_commit_dies_in_the_end(
    home: Path,
) -> None:
    # The note made before a claim was taken, once the chunk had ended and
    # before its commit, for one never started: its claim was given back
    # uncounted, and the chunk ran for ever (131 worker deaths in 45 s; the
    # review's find). It counts, and is dead after its max_attempts.
    began = time.monotonic()
    job = str(JOBS / "dies_at_commit.py")
    result = fanout(home, "run", job, "-w", "1", "--chunk-timeout", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "succeeded" not in result.stdout and "2 records" in result.stdout, result.stdout
    # Each death recorded at once ("its worker died after it ran, before its
    # commit"), not when the attempt's lease ran out (5 s and more, each).
    assert time.monotonic() - began < 8
