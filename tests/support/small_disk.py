"""Run ``fanout`` commands against a home on a file system of its own that the
test makes read-only or full: a tmpfs mounted in a private mount namespace
(``unshare --user --mount``, no root needed and nothing seen outside), so a
root test process still meets ``EROFS`` and ``ENOSPC`` as a user would.

Only the process-level tests use it: nothing in ``fanout`` knows about it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from support.lambda_source import checkout_pythonpath


def namespaces_available() -> bool:
    """Whether this machine lets an unprivileged process mount a tmpfs of its own."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True
    )
    return probe.returncode == 0


def fanout_on_small_disk(
    tmp_path: Path, setup: list[list[str]], fault: str, commands: list[list[str]]
) -> list[subprocess.CompletedProcess[str]]:
    """Run the ``setup`` commands on a fresh home, make its file system ``fault``
    (``"read-only"`` or ``"full"``), then run each of ``commands``; their results.
    The mount lives as long as the one shell that runs them all."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    home = mount / "home"
    cli = [sys.executable, "-m", "fanout.cli", "--home", str(home)]
    lines = ["set -u", f"mount -t tmpfs -o size=4m tmpfs {mount}"]
    lines += [shlex.join([*cli, *c]) + " >/dev/null 2>&1 || exit 99" for c in setup]
    if fault == "read-only":
        lines.append(f"mount -o remount,ro {mount}")
    else:
        lines.append(f"dd if=/dev/zero of={mount}/filler bs=64k >/dev/null 2>&1")
    for i, command in enumerate(commands):
        out = tmp_path / f"out-{i}"
        lines.append(
            f"{shlex.join([*cli, *command])} >{out}.stdout 2>{out}.stderr; echo $? >{out}.rc"
        )
    env = {**os.environ, "PYTHONPATH": checkout_pythonpath()}
    script = "\n".join(lines)
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    results = []
    for i, command in enumerate(commands):
        out = tmp_path / f"out-{i}"
        results.append(
            subprocess.CompletedProcess(
                command,
                int(Path(f"{out}.rc").read_text()),
                Path(f"{out}.stdout").read_text(),
                Path(f"{out}.stderr").read_text(),
            )
        )
    return results
