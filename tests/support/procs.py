"""Helpers of the process-level tests: run ``fanout`` commands and workers as
subprocesses, find their processes, poll with deadlines."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fanout.backends.base import Backend, RunRecord, TaskRecord
from support.lambda_source import checkout_pythonpath

CLI = [sys.executable, "-m", "fanout.cli"]


def fanout(
    home: Path, *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one ``fanout`` command to completion."""
    return subprocess.run(
        [*CLI, "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {}), "PYTHONPATH": checkout_pythonpath()},
    )


def run_id_of(result: subprocess.CompletedProcess[str]) -> str:
    first = result.stderr.splitlines()[0]
    assert first.startswith("run "), result.stderr
    return first.split()[1]


@contextlib.contextmanager
def worker(
    home: Path,
    tmp_path: Path,
    *args: str,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen[str]]:
    """A ``fanout worker`` in its own session; its whole group is killed on exit.
    ``command`` replaces ``python -m fanout.cli`` (e.g. ``hang_after_put.py``)."""
    log = open(tmp_path / f"worker-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [*(command or CLI), "--home", str(home), "worker", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {}), "PYTHONPATH": checkout_pythonpath()},
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()


def processes() -> dict[int, tuple[int, int]]:
    """Live (non-zombie) processes: pid → (parent pid, process group), from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X"):
            found[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))
    return found


def group_members(pgid: int) -> list[int]:
    return [pid for pid, (_, pgrp) in processes().items() if pgrp == pgid]


def crawl_processes(supervisor: int) -> list[int]:
    """The crawl chunks running under a worker: grandchildren of its supervisor."""
    procs = processes()
    children = {pid for pid, (ppid, _) in procs.items() if ppid == supervisor}
    return [pid for pid, (ppid, _) in procs.items() if ppid in children]


def alive(pid: int) -> bool:
    return pid in processes()


def wait_for(what: str, check: Callable[[], Any], limit: float, every: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``limit`` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {limit}s waiting for {what}")


def get_run(backend: Backend, run_id: str) -> RunRecord:
    run = backend.ledger.get_run(run_id)
    assert run is not None
    return run


def outcomes(task: TaskRecord) -> list[str]:
    return [str(e["outcome"]) for e in task.history]


def status(home: Path, run_id: str) -> dict[str, Any]:
    result = fanout(home, "status", run_id, "--json")
    assert result.returncode == 0, result.stderr
    st: dict[str, Any] = json.loads(result.stdout)
    return st


def kill_worker_mid_crawl(
    ledger: Backend,
    run_id: str,
    proc: subprocess.Popen[str],
    fetched: Callable[[], int],
    enough: int,
) -> list[int]:
    """Wait until the worker ``proc`` has committed some chunks of the crawl
    ``run_id`` (still running), the site has answered ``enough`` requests
    (``fetched()``) and crawl processes are in flight; then SIGKILL its whole
    process group and wait for every member to be gone. Returns the crawl
    processes that were in flight."""

    def midway() -> list[int]:
        run = get_run(ledger, run_id)
        if run.tasks_done < 3 or run.state.value != "running" or fetched() < enough:
            return []
        return crawl_processes(proc.pid)

    crawling: list[int] = wait_for("chunks committed and crawls in flight", midway, 40, 0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    # Workers and their forked crawl processes: nothing of the group is left.
    wait_for("the worker's group to be empty", lambda: not group_members(proc.pid), 5)
    return crawling
