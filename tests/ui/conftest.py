"""Fixtures of the dashboard's tests: a local backend with a failed run (two
chunks dead of an error whose text holds ``<script>``), a drain loop, and the
dashboard's app under Starlette's TestClient (HTTP requests, no socket)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.base import TERMINAL_RUN_STATES, Backend, RunRecord
from fanout.dispatch import Dispatcher
from fanout.runner import LEASE_GRACE

REPO = Path(__file__).resolve().parents[2]
BROKEN = str(Path(__file__).parent / "broken_job.py")
#: The markup a dead chunk's error carries: must never reach a page unescaped.
SCRIPT = "<script>alert('xss')</script>"


def drain(backend: Backend, run_id: str, limit: float = 60.0) -> RunRecord:
    """Work the queue in this process until ``run_id`` ends."""
    runner = Dispatcher(backend)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        deliveries = backend.queue.receive(10, 10 + LEASE_GRACE)
        for delivery in deliveries:
            runner.handle(delivery, 10.0)
        run = coordinator.get_run(backend, run_id)
        if run.state in TERMINAL_RUN_STATES:
            return run
        if not deliveries:
            time.sleep(0.005)
    raise AssertionError(f"run {run_id} did not end within {limit}s")


@dataclass
class Failed:
    """A run with dead chunks 0/1 and 0/2, and the flag file that breaks them."""

    backend: Backend
    run_id: str
    flag: Path
    home: Path


def submit_broken(backend: Backend, flag: Path, **params: Any) -> str:
    """Submit the test job with chunks 1 and 2 broken while ``flag`` exists."""
    params = {"fail": [1, 2], "flag": str(flag), "children": 2, **params}
    return coordinator.submit(backend, BROKEN, params).run_id


@pytest.fixture
def local_home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def local_backend(local_home: Path) -> Iterator[Backend]:
    backend = open_backend("local", home=local_home)
    yield backend
    backend.close()


@pytest.fixture
def failed(local_backend: Backend, local_home: Path, tmp_path: Path) -> Failed:
    flag = tmp_path / "broken"
    flag.write_text("")
    run_id = submit_broken(local_backend, flag)
    run = drain(local_backend, run_id)
    assert run.state.value == "failed" and run.tasks_dead == 2
    return Failed(local_backend, run_id, flag, local_home)


@pytest.fixture
def make_client() -> Iterator[Callable[..., Any]]:
    """A factory of TestClients of the dashboard (closed after the test)."""
    from starlette.testclient import TestClient

    from fanout.ui.app import UiConfig, create_app

    clients: list[TestClient] = []

    def make(backend: Backend, **config: Any) -> TestClient:
        client = TestClient(
            create_app(UiConfig(backend, **config)),
            base_url="http://127.0.0.1:8765",
            follow_redirects=False,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


class Served:
    """A ``fanout ui`` process and the URL it printed."""

    def __init__(self, home: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("FANOUT_UI_TOKEN", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fanout.cli", "--home", str(home), "ui", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.match(r"fanout ui: (http://127\.0\.0\.1:\d+)/", line)
        if not found:
            self.stop()
            raise AssertionError(f"no URL printed: {line!r} {self.proc.stderr.read()!r}")  # type: ignore[union-attr]
        self.url = found.group(1)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as res:
                return res.status, res.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
