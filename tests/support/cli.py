"""The ``fanout`` command line in this process, through click's CliRunner, for
commands that start no worker processes (``run``, ``worker`` and ``replay
--work`` go through ``support.procs.fanout``, a real process)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from fanout.cli import main


def cli(home: Path, *args: str) -> Result:
    """``fanout --home HOME ARGS`` in this process."""
    return CliRunner().invoke(main, ["--home", str(home), *args], prog_name="fanout")


def ok(result: Result) -> str:
    """The stdout of a command that must have exited 0."""
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def p(**params: Any) -> list[str]:
    """``-p KEY=VALUE`` arguments (lists and dicts as JSON)."""
    return [
        a
        for k, v in params.items()
        for a in ("-p", f"{k}={json.dumps(v) if isinstance(v, list | dict) else v}")
    ]


def assert_user_error(
    result: Result | subprocess.CompletedProcess[str], *needles: str, streamed: bool = False
) -> str:
    """Exit 2, one line on stderr starting ``error:`` (naming ``needles``), no traceback.

    ``streamed``: a command that streams records (``fanout cat``) may have
    printed whole JSON lines before it met the problem; nothing else.
    """
    if isinstance(result, Result):
        code, stdout, stderr = result.exit_code, result.stdout, result.stderr
        # Only the deliberate exit, no exception escaping the command.
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            result.exception
        )
    else:
        code, stdout, stderr = result.returncode, result.stdout, result.stderr
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if streamed:
        assert stdout == "" or stdout.endswith("\n"), stdout[-200:]
        for printed in stdout.splitlines():
            assert isinstance(json.loads(printed), dict), printed
    else:
        assert stdout == ""
    return lines[0]
