"""The dashboard is an optional extra: the Lambda zip leaves it out, and
without its libraries ``fanout`` still works and ``fanout ui``/``report``
say what to install."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

from fanout.deploy_files import zip_entries

#: Runs ``fanout report`` with the ui extra's libraries made unimportable.
WITHOUT_EXTRA = """
import sys
for name in ("starlette", "jinja2", "markupsafe", "uvicorn", "multipart"):
    sys.modules[name] = None  # import raises ImportError
from fanout.cli import main
main(["--home", sys.argv[1], sys.argv[2], *sys.argv[3:]])
"""


def test_the_lambda_zip_leaves_the_dashboard_out() -> None:
    names = [name for name, _ in zip_entries(REPO)]
    assert "fanout/cli_ui.py" in names and "fanout/runner.py" in names
    assert not [n for n in names if n.startswith("fanout/ui/")]


def test_without_the_extra_the_commands_say_what_to_install(tmp_path: object) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args in (["report", "some-run", "-o", "x.html"], ["ui", "--port", "0"]):
        res = subprocess.run(
            [sys.executable, "-c", WITHOUT_EXTRA, str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert res.returncode == 2, res.stderr
        assert res.stderr.startswith("error: the dashboard needs the ui extra: pip install")
        assert "Traceback" not in res.stderr
    runs = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRA, str(tmp_path), "runs"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert runs.returncode == 0, runs.stderr
