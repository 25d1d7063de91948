"""The dashboard in a real browser: Debian's chromium, headless, driven by
Playwright's Python API (``executable_path``: Playwright downloads no browser
here). Opens the runs page, a run with dead chunks, sees the timeline's bars,
presses Replay and watches the run go back to running and then succeed, with
no reload. Screenshots go to ``tests/artifacts/ui/`` (ignored by git); the
README's two come from there (docs/).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BROKEN, REPO, Failed, Served

ARTIFACTS = REPO / "tests" / "artifacts" / "ui"


def chromium() -> str:
    """Debian's chromium (``.ci/run`` installs it when it is missing)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium on PATH (.ci/run installs it with apt-get as root; not root here?)")


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev extra")
    executable = chromium()
    with sync_api.sync_playwright() as pw:
        # As root chromium needs --no-sandbox (Playwright passes it unless asked for one).
        launched = pw.chromium.launch(executable_path=executable, headless=True)
        yield launched
        launched.close()


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "fanout.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture
def failed(tmp_path: Path) -> Failed:
    """A succeeded run, then a run of 30 chunks worked by two processes (two
    lanes on the timeline) in which chunks 0/3 and 0/17 die."""
    home, flag = tmp_path / "home", tmp_path / "broken"
    flag.write_text("")
    run_cli(home, "run", BROKEN, "-p", "chunks=6", "-p", "sleep=0.02")
    res = run_cli(
        home,
        *("run", BROKEN, "-p", "chunks=30", "-p", "sleep=0.05", "-p", "fail=[3,17]"),
        *("-p", f"flag={flag}", "--workers", "2"),
    )
    assert res.returncode == 1, res.stderr
    run_id = res.stderr.split()[1]
    return Failed(None, run_id, flag, home)  # type: ignore[arg-type]  # no backend needed


@pytest.fixture
def worker(failed: Failed) -> Iterator[Any]:
    """Starts ``fanout worker`` on the run's home when called; stopped after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "fanout.cli", "--home", str(failed.home), "worker"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_replay_from_the_browser(failed: Failed, browser: Any, worker: Any) -> None:
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = Served(failed.home)
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("dialog", lambda dialog: errors.append(f"a dialog opened: {dialog.message}"))
        page.goto(server.url + "/")
        link = page.get_by_role("link", name=failed.run_id)
        expect(link).to_be_visible()
        expect(page.locator("span.state.failed")).to_have_count(1)
        expect(page.locator("span.state.succeeded")).to_have_count(1)
        page.locator("main").screenshot(path=str(ARTIFACTS / "runs.png"))

        link.click()
        expect(page.locator("#run-state")).to_have_text("failed")
        bars = page.locator("svg.timeline rect.bar")
        expect(bars.first).to_be_visible()
        assert bars.count() == 31  # the plan and 30 chunks
        lanes = page.locator("svg.timeline rect.bar").evaluate_all(
            "bars => new Set(bars.map(b => b.getAttribute('y'))).size"
        )
        assert lanes == 2  # two worker processes
        expect(page.locator('svg.timeline rect.bar[data-outcome="dead"]')).to_have_count(2)
        # The job's <script> is text on the page, never run (no dialog opened).
        expect(page.get_by_text("alert('xss')").first).to_be_attached()
        page.screenshot(path=str(ARTIFACTS / "run-failed.png"))

        page.get_by_role("link", name="failures (2)").click()
        expect(page.get_by_role("button", name="Replay this group")).to_have_count(1)
        page.locator("main").screenshot(path=str(ARTIFACTS / "failures.png"))
        page.go_back()
        expect(page.locator("#run-state")).to_have_text("failed")

        failed.flag.unlink()  # the job is fixed
        page.get_by_role("button", name="Replay 2 dead chunks").click()
        expect(page.locator("#run-state")).to_have_text("running")
        page.evaluate("window.__sameDocument = true")
        worker()  # only now: the page must have seen the run running
        expect(page.locator("#run-state")).to_have_text("succeeded", timeout=90_000)
        # Updated in place by the live script, not by a reload.
        assert page.evaluate("window.__sameDocument === true")
        expect(page.locator('svg.timeline rect.bar[data-outcome="dead"]')).to_have_count(2)
        expect(page.locator('svg.timeline rect.bar[data-outcome="committed"]')).to_have_count(31)
        page.screenshot(path=str(ARTIFACTS / "run-replayed.png"), full_page=True)
        assert errors == []
    finally:
        server.stop()
