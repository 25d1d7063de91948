"""Dashboard benchmarks (README: Dashboard). Not run by CI.

    python tests/bench/bench_ui.py runs [N]        # page times with N runs (10,000)
    python tests/bench/bench_ui.py throughput [C]  # a C-chunk run (5,000) with and
                                                   # without the dashboard open on it

``runs`` fills a local home with N runs (each with its root task), then times
the pages in process (Starlette's TestClient: server time, no network).

``throughput`` works five runs of the same C-chunk job in one home with two
worker processes: without the dashboard, with a headless chromium showing the
run's page (which polls once a second, as a user's would), without, with only
a poller doing what the page's script does (the server's share, without the
browser's rendering), and without again; it prints each run's chunks/s over
its attempts' span.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from fanout.backends import open_backend  # noqa: E402
from fanout.backends.base import Backend, NewTask, RunRecord, RunState  # noqa: E402

JOB = str(REPO / "tests" / "ui" / "broken_job.py")


def timed(fn: Any, repeat: int = 5) -> float:
    """Median seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fill(backend: Backend, n: int) -> None:
    states = [RunState.SUCCEEDED] * 8 + [RunState.FAILED, RunState.RUNNING]
    base = time.time() - n
    for i in range(n):
        run = RunRecord(
            f"job{i % 7}-20261203T{i:06d}-{i:06x}",
            "job.py",
            "rare" if i == 17 else f"job{i % 7}",
            {"i": i},
            {"max_attempts": 3},
            created_at=base + i,
        )
        backend.ledger.create_run(run, NewTask("0", 0, 0, '{"run": 1}'))
    # Their states, straight in the table (a benchmark's shortcut).
    db = backend.ledger.db  # type: ignore[attr-defined]
    with db.write() as conn:
        conn.execute(
            "UPDATE runs SET state = CASE CAST(substr(run_id, 15, 6) AS INTEGER) % 10"
            " WHEN 8 THEN 'failed' WHEN 9 THEN 'running' ELSE 'succeeded' END"
        )
    del states


def bench_runs(n: int) -> None:
    from starlette.testclient import TestClient

    from fanout.ui.app import UiConfig, create_app

    with tempfile.TemporaryDirectory() as tmp:
        backend = open_backend("local", home=Path(tmp))
        start = time.perf_counter()
        fill(backend, n)
        print(f"{n:,} runs created in {time.perf_counter() - start:.1f}s")
        from urllib.parse import quote

        from fanout.ui.views import cursor

        client = TestClient(create_app(UiConfig(backend)), base_url="http://127.0.0.1")
        every = backend.ledger.list_runs(n)
        one = every[0].run_id

        def page(i: int) -> str:  # the page that starts after the i-th newest run
            return "/?before=" + quote(cursor(every[i - 1]))

        cases = {
            "runs page 1": "/",
            "runs page 2": page(50),
            f"runs page {n // 100}": page(n // 2),
            f"runs page {n // 50} (last)": page(n - 50),
            "state=failed, page 1": "/?state=failed",
            "job=job3, page 1": "/?job=job3",
            "job=rare (one run: reads all)": "/?job=rare",
            "a run's page": f"/runs/{one}",
        }
        for label, path in cases.items():
            res = client.get(path)
            assert res.status_code == 200, (path, res.status_code)
            took = timed(lambda p=path: client.get(p))  # type: ignore[misc]
            print(f"  {label:<34} {took * 1000:8.1f} ms  ({len(res.content):,} bytes)")
        client.close()

        class Other:  # any other ledger: the page falls back to list_runs (as on DynamoDB)
            def __getattr__(self, name: str) -> Any:
                return getattr(backend_ledger, name)

        backend_ledger = backend.ledger
        other = Backend("other", backend.queue, backend.store, Other())  # type: ignore[arg-type]
        client = TestClient(create_app(UiConfig(other)), base_url="http://127.0.0.1")
        for label in ("runs page 1", f"runs page {n // 50} (last)"):
            took = timed(lambda p=cases[label]: client.get(p))  # type: ignore[misc]
            print(f"  list_runs fallback: {label:<22} {took * 1000:8.1f} ms")
        client.close()
        backend.close()


def fanout(home: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "fanout.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        **kw,
    )


def span_rate(backend: Backend, run_id: str) -> tuple[float, float, int]:
    """chunks/s and records/s over the span of the run's attempts; the chunks."""
    from fanout.ui.timeline import attempts

    bars, _ = attempts(backend.ledger.list_tasks(run_id))
    span = max(b.end for b in bars) - min(b.start for b in bars)
    run = backend.ledger.get_run(run_id)
    assert run is not None and run.state == RunState.SUCCEEDED, run
    return run.tasks_total / span, run.records / span, run.tasks_total


def poll(url: str, stop: Any, counts: dict[str, int]) -> None:
    """What the page's live.js does: ask for the live parts once a second."""
    import json
    import urllib.request

    version = ""
    while not stop.is_set():
        with urllib.request.urlopen(f"{url}&v={version}", timeout=60) as res:
            data = json.loads(res.read())
        counts["requests"] += 1
        counts["charts"] += "charts" in data["html"]
        version = data["v"]
        if data["done"]:
            return
        stop.wait(1.0)


def one_run(home: Path, chunks: int, dashboard: str) -> tuple[float, float, float, int]:
    import threading

    run_id = fanout(home, "submit", JOB, "-p", f"chunks={chunks}", "-p", "rows=20").stdout.strip()
    server = browser = pw = None
    stop = threading.Event()
    counts = {"requests": 0, "charts": 0}
    poller = None
    if dashboard == "poller":
        sys.path.insert(0, str(REPO / "tests" / "ui"))
        from conftest import Served

        server = Served(home)
        poller = threading.Thread(
            target=poll, args=(f"{server.url}/runs/{run_id}?live=1", stop, counts)
        )
        poller.start()
    if dashboard == "browser":
        sys.path.insert(0, str(REPO / "tests" / "ui"))
        from conftest import Served
        from playwright.sync_api import sync_playwright

        server = Served(home)
        pw = sync_playwright().start()
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
        page = browser.new_page()
        page.goto(f"{server.url}/runs/{run_id}")
    start = time.perf_counter()
    try:
        fanout(home, "worker", "--until-idle", "--workers", "2")
    except BaseException:
        if server is not None:
            server.stop()
        raise
    wall = time.perf_counter() - start
    if poller is not None and server is not None:
        poller.join(120)
        stop.set()
        server.stop()
        print(f"    (poller: {counts['requests']} requests, charts sent {counts['charts']} times)")
    if dashboard == "browser":
        assert browser is not None and pw is not None and server is not None
        from playwright.sync_api import expect

        # Updated by the page's own polling (the CSP forbids evaluating strings).
        expect(page.locator("#run-state")).to_have_text("succeeded", timeout=60_000)
        browser.close()
        pw.stop()
        server.stop()
    backend = open_backend("local", home=home)
    try:
        chunks_s, records_s, total = span_rate(backend, run_id)
    finally:
        backend.close()
    return chunks_s, records_s, wall, total


def bench_throughput(chunks: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        print(f"load average before: {os.getloadavg()}")
        modes = (
            ("without", ""),
            ("browser open", "browser"),
            ("without", ""),
            ("poller (no browser)", "poller"),
            ("without", ""),
        )
        for label, dashboard in modes:
            chunks_s, records_s, wall, total = one_run(home, chunks, dashboard)
            print(
                f"  {label:<20} {total:,} tasks: {chunks_s:7.1f} chunks/s, {records_s:9.1f}"
                f" records/s over the attempts' span; worker wall {wall:.1f}s;"
                f" load {os.getloadavg()[0]:.1f}"
            )


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "runs"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else (10_000 if what == "runs" else 5_000)
    if what == "runs":
        bench_runs(count)
    else:
        bench_throughput(count)
