"""The tests' child processes (killed Lambda invocations, workers) import the
``fanout`` of this checkout, not whichever copy is installed: a process-level
test of another copy would pass or fail for the wrong code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support import lambda_source
from support.lambda_source import EventSource
from support.procs import wait_for, worker

REPO = Path(__file__).resolve().parent.parent
WHERE = "import fanout, sys; print(fanout.__file__, file=sys.stderr)"


def _imported_from(env: dict[str, str], cwd: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-c", WHERE], env=env, cwd=cwd, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return Path(result.stderr.strip()).resolve()


def test_a_killed_lambda_invocation_imports_this_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[dict[str, str]] = []

    class Recorder:
        def __init__(self, args: list[str], env: dict[str, str], **kwargs: Any) -> None:
            started.append(env)

    monkeypatch.setattr(lambda_source.subprocess, "Popen", Recorder)
    source = EventSource(sqs=None, queue_url="", env={"FANOUT_STAGE": "test"})
    source.invoke_killed([], tmp_path)
    monkeypatch.undo()  # the real Popen again, for the check below
    (env,) = started
    assert env["FANOUT_STAGE"] == "test"
    # Run from elsewhere, as the child's own directory is not the checkout.
    assert _imported_from(env, tmp_path) == REPO / "fanout" / "__init__.py"


def test_a_worker_started_by_the_tests_imports_this_checkout(tmp_path: Path) -> None:
    script = tmp_path / "where.py"
    script.write_text(WHERE + "\n")
    with worker(tmp_path / "home", tmp_path, command=[sys.executable, str(script)]) as proc:
        assert proc.wait(timeout=30) == 0
    (log,) = tmp_path.glob("worker-*.log")
    printed = wait_for("the child's report", lambda: log.read_text().strip(), 5)
    assert Path(printed).resolve() == REPO / "fanout" / "__init__.py"
