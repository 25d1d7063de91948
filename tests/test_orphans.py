"""What the supervisor, a child subreaper under the CLI (``WorkerOptions.
adopt_orphans``), kills and reaps of the processes it adopts: only what chunks
of a dead worker process left (named by the mark in their environment), never
what other workers' live chunks detached or what the program running the pool
started; and it leaves the program's subreaper attribute as it found it.

The embedded cases run a WorkerPool inside a program of the user's (a script
run as a subprocess, so the test process never becomes a subreaper itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.lambda_source import checkout_pythonpath
from support.procs import alive, fanout

# A program that embeds a pool: it has a child process of its own (started the
# ordinary way, not by multiprocessing), runs a pool on an empty home until it
# is idle, and reports what became of its child.
EMBEDDING = """
import ctypes, json, os, subprocess, sys, time
from pathlib import Path
import fanout.worker as worker
from fanout.worker import WorkerOptions, WorkerPool

home, case = Path(sys.argv[1]), sys.argv[2]
libc = ctypes.CDLL("libc.so.6", use_errno=True)
out = {}
if case == "subprocess":
    mine = subprocess.Popen(["sleep", "30"])
    pid = mine.pid
elif case == "resource_tracker":
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()
    pid = resource_tracker._resource_tracker._pid
elif case == "exit_status":
    worker.REAP_EVERY = 0.2  # the 10 s period, shortened for the test
    mine = subprocess.Popen(["sh", "-c", "exit 3"])
    pid = mine.pid
elif case == "subreaper_kept":
    # The program is itself a subreaper (an init-like supervisor, a test harness).
    assert libc.prctl(36, 1, 0, 0, 0) == 0
    pid = 0
# A program that has children of its own must not let the pool adopt (and reap)
# orphans; the cases that check what is killed let it, to show the mark decides.
adopt = case != "exit_status"
pool = WorkerPool(WorkerOptions(backend="local", home=home, workers=1, adopt_orphans=adopt))
if case == "exit_status":
    until = time.monotonic() + 1.5
    pool.run(until=lambda: time.monotonic() > until)
else:
    pool.run(until_idle=True)
if case in ("subprocess", "resource_tracker"):
    stat = Path(f"/proc/{pid}/stat")
    out["alive"] = stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    if case == "subprocess":
        mine.kill()
elif case == "exit_status":
    out["returncode"] = mine.wait(timeout=10)
elif case == "subreaper_kept":
    flag = ctypes.c_int(-1)
    libc.prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
    out["subreaper"] = flag.value
print(json.dumps(out))
"""


def _embedded(tmp_path: Path, case: str) -> dict:
    script = tmp_path / "embedding.py"
    script.write_text(EMBEDDING)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "home"), case],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": checkout_pythonpath()},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_pool_does_not_kill_a_process_the_embedding_program_started(tmp_path: Path) -> None:
    """The supervisor's children that are not multiprocessing's are not all
    orphans: a program that runs a pool may have started its own (a helper
    server, a subprocess it waits on). The pool's end must not SIGKILL them:
    they do not carry a worker's mark."""
    assert _embedded(tmp_path, "subprocess") == {"alive": True}


def test_a_pool_does_not_kill_multiprocessing_s_resource_tracker(tmp_path: Path) -> None:
    """multiprocessing's own helper process (started by spawnv, not a
    Process, so not in active_children()) is a child of the program that uses
    shared_memory / spawn-context semaphores; a pool ending in that program
    must leave it running."""
    assert _embedded(tmp_path, "resource_tracker") == {"alive": True}


def test_a_pool_does_not_steal_the_exit_status_of_the_program_s_own_child(
    tmp_path: Path,
) -> None:
    """A pool that adopts orphans reaps any exited child that is not its own
    (an exited process's mark cannot be read): by default a pool does not, so
    a subprocess of the program that failed (exit 3) does not read as a
    success (Popen would get ECHILD: 0)."""
    assert _embedded(tmp_path, "exit_status") == {"returncode": 3}


def test_a_pool_leaves_its_program_a_subreaper_if_it_was_one(tmp_path: Path) -> None:
    """The pool's end puts the subreaper attribute back as it was: a program
    that was a subreaper itself stays one."""
    assert _embedded(tmp_path, "subreaper_kept") == {"subreaper": 1}


# A chunk that detaches a helper it still uses, while another worker process
# crashes: only what the dead worker's chunks left is killed.
TWO_WORKERS_JOB = """
import os, subprocess, time
from pathlib import Path
from fanout import Job

job = Job("detach-and-crash")


@job.plan
def plan(params, ctx):
    time.sleep(0.3)  # slow: the next receive takes one message per worker
    yield {"role": "keeper", "dir": params["dir"]}
    yield {"role": "crasher", "dir": params["dir"]}


@job.process
def process(payload, ctx):
    d = Path(payload["dir"])
    if payload["role"] == "crasher":
        if ctx.attempt > 1:
            return
        deadline = time.monotonic() + 10
        while not (d / "helper").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (d / "crashed").write_text("1")
        os._exit(3)  # this worker process dies on its own
    # The keeper: a daemonizing helper (ssh -f, a local server) it uses meanwhile.
    out = subprocess.run(
        ["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, check=True,
    )
    helper = int(out.stdout)
    (d / "helper").write_text(str(helper))
    deadline = time.monotonic() + 10
    while not (d / "crashed").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the supervisor has handled the other worker's death
    stat = Path(f"/proc/{helper}/stat")
    state = stat.read_text().rsplit(")", 1)[1].split()[0] if stat.exists() else "gone"
    (d / "helper_state").write_text(state)
"""


@pytest.mark.slow
def test_another_worker_s_crash_does_not_kill_what_a_live_chunk_detached(
    home: Path, tmp_path: Path
) -> None:
    job = tmp_path / "detach_crash.py"
    job.write_text(TWO_WORKERS_JOB)
    d = tmp_path / "marks"
    d.mkdir()
    run = fanout(
        home, "run", str(job), "-p", f"dir={d}", "-w", "2", "--chunk-timeout", "30", timeout=90
    )
    helper = int((d / "helper").read_text()) if (d / "helper").exists() else None
    try:
        assert (d / "crashed").exists(), run.stderr
        state = (d / "helper_state").read_text()
        assert state not in ("Z", "X", "gone"), (
            f"the live chunk's helper was killed when the other worker crashed ({state})"
        )
    finally:
        if helper is not None and alive(helper):
            os.kill(helper, 9)


# A graceful stop with one long chunk in hand: the supervisor waits for it,
# calling _police every 50 ms, which sees each child that already left again
# and again; it must scan /proc for a dead child's orphans once.
SHUTDOWN_SCAN = """
import json, sys, time
from pathlib import Path
import fanout.worker as worker
from fanout.backends import open_backend
from fanout.coordinator import submit
from fanout.worker import WorkerOptions, WorkerPool

home, job, mark = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
backend = open_backend("local", home=home)
submit(backend, job, {"mark": str(mark)})
backend.close()
scans = [0]
real = worker.orphans
def counted(keep, which):
    scans[0] += 1
    return real(keep, which)
worker.orphans = counted
opts = WorkerOptions(backend="local", home=home, workers=4, chunk_timeout=30, adopt_orphans=True)
pool = WorkerPool(opts)
pool.run(until=lambda: mark.exists())  # stop once the long chunk runs
print(json.dumps({"scans": scans[0]}))
"""

LONG_CHUNK_JOB = """
import time
from pathlib import Path
from fanout import Job

job = Job("long-one")


@job.process
def process(payload, ctx):
    Path(payload["mark"]).write_text("1")
    time.sleep(2.0)
"""


def test_a_graceful_stop_does_not_scan_proc_over_and_over(tmp_path: Path) -> None:
    """Three idle children leave at once; the fourth finishes its 2 s chunk.
    One scan per child that left (and one at the end) is what ending their
    orphans needs; a scan per child per 50 ms poll is a /proc walk storm (on a
    host with thousands of processes, 10-30 ms each, per dead child)."""
    script = tmp_path / "shutdown_scan.py"
    script.write_text(SHUTDOWN_SCAN)
    job = tmp_path / "long_one.py"
    job.write_text(LONG_CHUNK_JOB)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "home"), str(job), str(tmp_path / "mark")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": checkout_pythonpath()},
    )
    assert done.returncode == 0, done.stderr
    scans = json.loads(done.stdout.strip().splitlines()[-1])["scans"]
    assert scans <= 4 + 1, f"{scans} /proc scans during a 2 s graceful stop"


# Two worker processes die at the same moment: handling the first one runs
# _end_orphans, whose mp.active_children() reaps the second. Its exit code must
# still reach its attempt's failure.
TWIN_CRASH_JOB = """
import os, time
from pathlib import Path
from fanout import Job

job = Job("twin-crash")


@job.plan
def plan(params, ctx):
    time.sleep(0.3)
    yield {"code": 7, "dir": params["dir"]}
    yield {"code": 9, "dir": params["dir"]}


@job.process
def process(payload, ctx):
    if ctx.attempt > 1:
        return
    d = Path(payload["dir"])
    (d / str(payload["code"])).write_text("1")
    deadline = time.monotonic() + 10
    while len(list(d.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    os._exit(payload["code"])
"""


@pytest.mark.slow
def test_twin_crashes_each_keep_their_exit_code(home: Path, tmp_path: Path) -> None:
    from fanout.backends import open_backend

    job = tmp_path / "twin.py"
    job.write_text(TWIN_CRASH_JOB)
    d = tmp_path / "marks"
    d.mkdir()
    run = fanout(home, "run", str(job), "-p", f"dir={d}", "-w", "2", timeout=60)
    assert run.returncode == 0, run.stderr
    backend = open_backend("local", home=home)
    try:
        (run_id,) = [r.run_id for r in backend.ledger.list_runs(limit=10)]
        errors = sorted(
            str(t.history[0]["error"])
            for t in backend.ledger.list_tasks(run_id)
            if t.history and t.history[0]["outcome"] == "crashed"
        )
    finally:
        backend.close()
    assert errors == [
        "worker process exited with code 7 (os._exit, or a crash in native code)",
        "worker process exited with code 9 (os._exit, or a crash in native code)",
    ]
