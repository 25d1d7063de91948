"""``fanout ui`` as a process (bound to 127.0.0.1, stopped by each test) and
``fanout report``: bad input is one line and exit 2; the report is one file
that needs no network."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, SCRIPT, Failed, Served


def fanout(home: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FANOUT_UI_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "fanout.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def served(failed: Failed) -> Iterator[Served]:
    server = Served(failed.home)
    yield server
    server.stop()


def test_ui_serves_on_loopback_and_answers_only_loopback_names(
    served: Served, failed: Failed
) -> None:
    status, body = served.get("/")
    assert status == 200 and failed.run_id in body
    status, body = served.get(f"/runs/{failed.run_id}/failures")
    assert status == 200 and SCRIPT not in body and "&lt;script&gt;" in body
    port = served.url.rsplit(":", 1)[1]
    assert served.get("/", {"Host": f"attacker.example:{port}"})[0] == 400


def test_ui_with_a_token_wants_it_on_every_request(failed: Failed) -> None:
    secret = "t0k3n-" + "x" * 20
    server = Served(failed.home, "--token", secret)
    try:
        assert server.get("/")[0] == 401
        assert server.get(f"/runs/{failed.run_id}")[0] == 401
        status, body = server.get("/", {"Authorization": f"Bearer {secret}"})
        assert status == 200 and failed.run_id in body
    finally:
        server.stop()


def test_ui_refuses_bad_binds_in_one_line(failed: Failed) -> None:
    # Refused before anything is bound: no server listens on 0.0.0.0 here.
    res = fanout(failed.home, "ui", "--host", "0.0.0.0")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: binding 0.0.0.0 (not loopback) needs a token: --token or $FANOUT_UI_TOKEN"
    ]
    res = fanout(failed.home, "ui", "--token", "short")
    assert res.returncode == 2 and "at least 16 characters" in res.stderr
    # An empty one (`--token "$UNSET"`) served an open dashboard, without a word.
    res = fanout(failed.home, "ui", "--token", "")
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "error: --token is empty (an unset variable?): give the token, or leave it out"
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        res = fanout(failed.home, "ui", "--port", str(busy.getsockname()[1]))
    assert res.returncode == 2 and res.stderr.startswith("error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in res.stderr


def test_report_is_one_self_contained_file(failed: Failed, tmp_path: Path) -> None:
    out = tmp_path / "run.html"
    res = fanout(failed.home, "report", failed.run_id, "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"wrote {out} (")
    page = out.read_text()
    assert '<svg class="timeline"' in page and page.count('data-outcome="dead"') == 2
    assert "<style>" in page and "Chunk tree" in page and "Estimated AWS cost" in page
    # Nothing to fetch, nothing to run: no script, stylesheet link, image source or URL.
    for needle in ("<script", "<link", "src=", "http://", "https://", "<form"):
        assert needle not in page, needle
    assert SCRIPT not in page and "&lt;script&gt;alert(" in page
    res = fanout(failed.home, "report", "no-such-run", "-o", str(tmp_path / "x.html"))
    assert res.returncode == 2
    assert res.stderr.strip() == "error: unknown run id 'no-such-run' (see `fanout runs`)"
