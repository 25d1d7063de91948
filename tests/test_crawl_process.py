"""Crawl jobs at process level, driven through the CLI as a user would: each
crawl chunk is a process forked by a worker child, running the real Scrapy
engine. ``kill -9`` of the whole worker mid-crawl, a chunk that overruns its
hard timeout, a site that answers 503, a callback that raises.

The sites are served from this process (``tests/support/sites.py``); the jobs are in
``tests/testjobs/crawl_process.py``. Every process a test starts runs in its own
session and its whole group is killed in a ``finally``.
"""

from __future__ import annotations

import html
import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from scrapy import Request, Spider
from scrapy.exceptions import NotConfigured
from scrapy.http import HtmlResponse
from scrapy.utils.test import get_crawler

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.base import Backend, TaskState
from fanout.backends.crawlstate import DomainAsk
from fanout.crawl import THROTTLE_META, backoff, channel, components, politeness, throttle
from support.helpers import JOBS
from support.procs import (
    alive,
    fanout,
    get_run,
    kill_worker_mid_crawl,
    outcomes,
    run_id_of,
    status,
    wait_for,
    worker,
)
from support.sites import HTML, BookSite, Reply, Site, SiteServer, expected_books

JOB = str(JOBS / "crawl_process.py")


# -- helpers ---------------------------------------------------------------------


def job(name: str) -> str:
    return f"{JOB}:{name}"


def params(**values: Any) -> list[str]:
    return [a for k, v in values.items() for a in ("-p", f"{k}={v}")]


def records(home: Path, run_id: str) -> list[dict[str, Any]]:
    result = fanout(home, "cat", run_id)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def assert_books_exactly_once(home: Path, run_id: str, expected: dict[str, dict[str, Any]]) -> None:
    """``fanout cat`` holds each expected book once, as the site renders it, and nothing else."""
    got = records(home, run_id)
    paths = Counter(urlsplit(r["url"]).path for r in got)
    assert sorted(p for p, n in paths.items() if n > 1) == []
    assert sorted(set(expected) - set(paths)) == []
    assert sorted(set(paths) - set(expected)) == []
    for record in got:
        path = urlsplit(record.pop("url")).path
        assert record == expected[path], path


class Slow:
    """A site whose every reply waits ``delay`` s (a real site is not instant)."""

    def __init__(self, site: Site, delay: float) -> None:
        self.site = site
        self.delay = delay

    def respond(self, key: str, host: str, hit: int) -> Reply:
        return self.site.respond(key, host, hit)._replace(delay=self.delay)


# -- kill -9 mid-crawl -----------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_crawl_then_resume_gives_every_book_once(
    home: Path, tmp_path: Path, ledger: Backend
) -> None:
    pages = 600
    with SiteServer(Slow(BookSite(pages), 0.03)) as site:
        submitted = fanout(home, "submit", job("books"), *params(start_url=site.url))
        assert submitted.returncode == 0, submitted.stderr
        run_id = submitted.stdout.strip()
        args = ("--workers", "2", "--chunk-timeout", "6")
        with worker(home, tmp_path, *args) as proc:
            crawling = kill_worker_mid_crawl(
                ledger, run_id, proc, lambda: sum(site.hits.values()), pages // 3
            )
            assert [pid for pid in crawling if alive(pid)] == []

        run = get_run(ledger, run_id)
        assert run.state.value == "running", "the kill came too late: the crawl had finished"
        done_before = run.tasks_done
        interrupted = ledger.ledger.list_tasks(run_id, (TaskState.RUNNING,))
        assert interrupted, "the kill should have caught chunks in flight"

        # The dead worker's leases expire after 6 + 5 s, its messages come back
        # after their visibility timeout (6 + 5 + 5 s): allow for that.
        resume = fanout(home, "worker", "--until-idle", *args, timeout=120)
        assert resume.returncode == 0, resume.stderr
        assert "Traceback" not in resume.stderr

    st = status(home, run_id)
    assert st["state"] == "succeeded", st
    assert st["chunks"]["dead"] == 0 and st["outstanding"] == 0
    assert st["chunks"]["done"] > done_before
    assert st["records"] == len(expected_books(pages))
    caught = {(t.chunk_id, t.seq) for t in interrupted}
    for task in ledger.ledger.list_tasks(run_id):
        # Every attempt the kill interrupted was taken over as crashed, then committed.
        if (task.chunk_id, task.seq) in caught:
            assert "crashed" in outcomes(task), (task.chunk_id, task.history)
        assert outcomes(task)[-1] == "committed", (task.chunk_id, task.history)
    assert_books_exactly_once(home, run_id, expected_books(pages))


# -- hard timeout ----------------------------------------------------------------


@pytest.mark.slow
def test_a_crawl_chunk_past_its_hard_timeout_is_killed_and_retried(
    home: Path, tmp_path: Path, ledger: Backend
) -> None:
    pages = 60
    stall_path = "/catalogue/book_30/index.html"
    assert stall_path in expected_books(pages)
    marker = tmp_path / "stall-once"
    marker.touch()
    with SiteServer(BookSite(pages)) as site:
        started = time.monotonic()
        result = fanout(
            home,
            "run",
            job("stalling"),
            *params(start_url=site.url, marker=marker, stall_path=stall_path, stall=60),
            "-w",
            "2",
            "--chunk-timeout",
            "4",
        )
        took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    run_id = run_id_of(result)
    assert f"run {run_id} succeeded" in result.stdout
    assert took < 20  # killed at the 4 s hard timeout, not after the 60 s stall
    assert not marker.exists()  # the callback did stall once
    assert site.hits[stall_path] == 2  # by the killed attempt, then by the retry

    # The crawl process that hung was forked by the worker child the supervisor
    # killed: it died with its parent (PR_SET_PDEATHSIG), it was not left hanging.
    stalled = int(Path(f"{marker}.pid").read_text())
    wait_for("the hung crawl process to be gone", lambda: not alive(stalled), 5)

    tasks = ledger.ledger.list_tasks(run_id)
    killed = [t for t in tasks if "timed out" in outcomes(t)]
    assert [outcomes(t) for t in killed] == [["timed out", "committed"]], [
        (t.chunk_id, t.history) for t in tasks
    ]
    assert killed[0].history[0]["error"] == "chunk exceeded its 4s hard timeout"
    assert all(outcomes(t) == ["committed"] for t in tasks if t not in killed)
    st = status(home, run_id)
    assert st["state"] == "succeeded" and st["retries"] == 1 and st["chunks"]["dead"] == 0
    assert_books_exactly_once(home, run_id, expected_books(pages))


# -- 429/503 back-off ------------------------------------------------------------


class BusySite:
    """One server, two host names: ``127.0.0.1`` answers at once; ``localhost``
    answers 503 to its first ``busy`` requests, then 200.

    The home page (``/``) links to ``items`` item pages on each host; item
    pages have no links. Every request is recorded with its time and status.
    """

    def __init__(self, items: int = 12, busy: int = 3) -> None:
        self.items = items
        self.busy = busy
        self.log: list[tuple[float, str, str, int]] = []  # (time, host name, key, status)
        self._lock = threading.Lock()

    def expected(self) -> set[str]:
        return {f"{h}-{i}" for h in ("a", "b") for i in range(self.items)}

    def _page(self, title: str, body: str) -> bytes:
        return (
            f"<!DOCTYPE html><html><head><title>{html.escape(title)}</title></head>"
            f"<body>{body}</body></html>"
        ).encode()

    def respond(self, key: str, host: str, hit: int) -> Reply:
        hostname, _, port = host.partition(":")
        with self._lock:
            busy_so_far = sum(1 for _, h, _, _ in self.log if h == "localhost")
            if hostname == "localhost" and busy_so_far < self.busy:
                reply = Reply(503, (("Content-Type", HTML),), b"busy")
            else:
                reply = self._reply(key, hostname, port)
            self.log.append((time.time(), hostname, key, reply.status))
        return reply

    def _reply(self, key: str, hostname: str, port: str) -> Reply:
        headers = (("Content-Type", HTML),)
        if key == "/" and hostname == "127.0.0.1":
            links = [f"http://127.0.0.1:{port}/a/{i}" for i in range(self.items)]
            links += [f"http://localhost:{port}/b/{i}" for i in range(self.items)]
            body = "".join(f'<a href="{href}">{href}</a>' for href in links)
            return Reply(200, headers, self._page("Home", body))
        section, _, number = key.strip("/").partition("/")
        if (section, hostname) in (("a", "127.0.0.1"), ("b", "localhost")) and number.isdigit():
            item = f"{section}-{number}"
            body = f'<article class="item" data-id="{item}"><h1>Item {item}</h1></article>'
            return Reply(200, headers, self._page(item, body))
        return Reply(404, headers, self._page("Not found", "no such page"))


@pytest.mark.slow
def run_throttled(home: Path, site: BusySite, throttle_base: float, code: int = 0) -> str:
    """``fanout run`` of the ``throttled`` job on ``site`` (two host names, so
    skipped where localhost is not 127.0.0.1), 2 workers, exiting ``code``; its
    run id."""
    if socket.gethostbyname("localhost") != "127.0.0.1":
        pytest.skip("the second host name of the site, localhost, is not 127.0.0.1 here")
    with SiteServer(site) as server:
        result = fanout(
            home,
            "run",
            job("throttled"),
            *params(start_url=server.url),
            "-w",
            "2",
            "--chunk-timeout",
            "10",
            env={"THROTTLE_BASE": str(throttle_base)},
        )
    assert result.returncode == code, result.stderr
    return run_id_of(result)


def test_a_busy_host_is_left_alone_for_throttle_base_then_fetched(home: Path) -> None:
    throttle_base = 0.5
    site = BusySite(items=12, busy=3)
    run_id = run_throttled(home, site, throttle_base)
    st = status(home, run_id)
    assert st["state"] == "succeeded", st
    assert st["stats"].get("throttled", 0) > 0, st["stats"]
    assert st["stats"].get("status/503", 0) == site.busy

    # Every item once, those of the busy host included (its 503s were fetched again).
    ids = Counter(r["id"] for r in records(home, run_id))
    assert sorted(i for i, n in ids.items() if n > 1) == []
    assert set(ids) == site.expected()

    log = sorted(site.log)
    busy = [(t, key) for t, h, key, code in log if h == "localhost" and code == 503]
    assert len(busy) == site.busy
    first_503 = busy[0][0]
    # A page that got a 503 was asked for again only after the back-off ...
    for t, key in busy:
        again = [u for u, h, k, code in log if h == "localhost" and k == key and u > t]
        assert again and again[0] - t >= throttle_base, (key, t, again)
    # ... and after the first 503, the host saw no request until the back-off,
    # but for those already in flight when it came.
    in_flight_slack = 0.2
    early = [
        (round(t - first_503, 3), key)
        for t, h, key, _ in log
        if h == "localhost" and first_503 + in_flight_slack < t < first_503 + throttle_base
    ]
    assert early == []

    # Only the pages answered 503 climbed a throttle level: the others held back
    # with them (their host was backed off) kept theirs, or their back-off would
    # grow at every hand-on although the site never refused them.
    refused = {key for _, h, key, code in log if h == "localhost" and code == 503}
    levels = handed_on_levels(home, run_id)
    assert any(h == "localhost" for h, _, _ in levels), levels
    climbed = {path for host, path, level in levels if level > 0}
    assert climbed and climbed <= refused, (climbed, refused)


class BrokenPageSite(BusySite):
    """:class:`BusySite` whose ``localhost`` page ``/b/0`` answers 503, always."""

    def respond(self, key: str, host: str, hit: int) -> Reply:
        if host.partition(":")[0] == "localhost" and key == "/b/0":
            with self._lock:
                self.log.append((time.time(), "localhost", key, 503))
            return Reply(503, (("Content-Type", HTML),), b"broken")
        return super().respond(key, host, hit)


def test_a_page_that_always_answers_503_is_kept_dead_and_holds_its_host_back_briefly(
    home: Path,
) -> None:
    # Its back-off climbed 8 levels and held the whole host back longer at
    # each: the run went on for 20 minutes (at throttle_base 5 s), where Scrapy
    # gives the page up after 3 tries in seconds. Given up, it was then lost
    # while the run succeeded: now it has its rounds (fanout.crawl.givenup)
    # and ends in a dead chunk, for `fanout replay`.
    throttle_base = 0.5
    site = BrokenPageSite(items=12, busy=0)
    started = time.monotonic()
    run_id = run_throttled(home, site, throttle_base, code=1)
    took = time.monotonic() - started
    st = status(home, run_id)
    assert st["state"] == "failed" and st["chunks"]["dead"] == 1, st
    ids = Counter(r["id"] for r in records(home, run_id))
    assert sorted(i for i, n in ids.items() if n > 1) == []
    assert set(ids) == site.expected() - {"b-0"}  # every other page's item
    failed = fanout(home, "failed", run_id)
    assert "/b/0: HTTP 503" in failed.stdout, failed.stdout
    broken = [t for t, h, key, _ in site.log if h == "localhost" and key == "/b/0"]
    # The throttle rescue's tries (RETRY_TIMES 0: one each), then one per round
    # of its own (max_attempts 3: 2 more), not another climb of back-offs each.
    assert len(broken) == 1 + backoff.MAX_THROTTLE_LEVEL + 2, broken
    # The host's other pages waited one back-off at most, not the broken page's.
    others = [t for t, h, key, _ in site.log if h == "localhost" and key != "/b/0"]
    assert max(others) - broken[0] < 6 * throttle_base + 2.0, (others, broken)
    assert took < 30, f"{took:.1f}s"


def handed_on_levels(home: Path, run_id: str) -> list[tuple[str, str, int]]:
    """(host name, path, throttle level) of every request the run's chunks were
    handed (their messages in the ledger)."""
    backend = open_backend("local", home=home)
    try:
        tasks = backend.ledger.list_tasks(run_id, history=False)
    finally:
        backend.close()
    out = []
    for task in tasks:
        payload = json.loads(task.message).get("payload") or {}
        for request in payload.get("requests", []):
            url = urlsplit(request["url"])
            out.append((url.hostname or "", url.path, int(request["meta"].get(THROTTLE_META, 0))))
    return out


class RetryAfterSite(BusySite):
    """:class:`BusySite` whose ``localhost`` answers every page after ``delay``
    seconds, and its ``nth`` request with 429 and ``Retry-After: wait``: slow
    pages keep several chunks crawling the host at once when the 429 comes."""

    def __init__(self, items: int, nth: int, wait: int, delay: float) -> None:
        super().__init__(items=items, busy=0)
        self.nth, self.wait, self.delay = nth, wait, delay

    def respond(self, key: str, host: str, hit: int) -> Reply:
        hostname, _, port = host.partition(":")
        with self._lock:
            seen = sum(1 for _, h, _, _ in self.log if h == "localhost")
            throttle = hostname == "localhost" and seen + 1 == self.nth
            status = 429 if throttle else 200
            self.log.append((time.time(), hostname, key, status))  # when it arrived
        if throttle:
            headers = (("Content-Type", HTML), ("Retry-After", str(self.wait)))
            return Reply(429, headers, b"slow down")
        if hostname == "localhost":
            time.sleep(self.delay)
        return self._reply(key, hostname, port)


@pytest.mark.slow
def test_a_retry_after_backs_the_host_off_for_every_chunk_on_every_worker(home: Path) -> None:
    """One chunk gets the 429; the others, on the other worker too, learn it from
    the domain's lease and send the host nothing until its Retry-After is over."""
    if socket.gethostbyname("localhost") != "127.0.0.1":
        pytest.skip("the second host name of the site, localhost, is not 127.0.0.1 here")
    wait = 3
    site = RetryAfterSite(items=24, nth=8, wait=wait, delay=0.3)
    with SiteServer(site) as server:
        result = fanout(
            home,
            "run",
            job("throttled"),
            *params(start_url=server.url),
            "-S",
            "pages_per_chunk=4",
            "-w",
            "2",
            "--chunk-timeout",
            "20",
        )
    assert result.returncode == 0, result.stderr
    run_id = run_id_of(result)
    ids = Counter(r["id"] for r in records(home, run_id))
    assert sorted(i for i, n in ids.items() if n > 1) == []
    assert set(ids) == site.expected()
    log = sorted(site.log)
    (told,) = [t for t, h, _, code in log if h == "localhost" and code == 429]
    # Chunks that held the host learn of the back-off at their next lease
    # renewal (every 0.5 s) and had requests in flight (0.3 s each): after that,
    # nothing until the Retry-After is over.
    learnt = told + politeness.RENEW_EVERY + site.delay + 0.2
    early = [
        round(t - told, 2) for t, h, _, _ in log if h == "localhost" and learnt < t < told + wait
    ]
    assert early == [], f"requests to the backed-off host at +{early} s (Retry-After {wait} s)"
    assert any(t >= told + wait for t, h, _, code in log if h == "localhost" and code == 200)


# -- an exception in a callback --------------------------------------------------


@pytest.mark.slow
def test_an_exception_in_a_callback_loses_that_page_only(home: Path, ledger: Backend) -> None:
    pages = 60
    bad = "/catalogue/book_7/index.html"
    expected = expected_books(pages)
    assert bad in expected
    with SiteServer(BookSite(pages)) as site:
        result = fanout(
            home,
            "run",
            job("failing"),
            *params(start_url=site.url, fail_path=bad),
            "-w",
            "2",
            "--chunk-timeout",
            "10",
        )
        assert site.hits[bad] == 1
    assert result.returncode == 0, result.stderr
    run_id = run_id_of(result)
    st = status(home, run_id)
    assert st["state"] == "succeeded" and st["retries"] == 0, st
    # Once: Scrapy counts the exception under its type and under "count" too.
    assert st["stats"].get("callback_errors", 0) == 1, st["stats"]
    # Scrapy logged the error and went on: no chunk failed.
    assert all(outcomes(t) == ["committed"] for t in ledger.ledger.list_tasks(run_id))
    del expected[bad]
    assert_books_exactly_once(home, run_id, expected)


def test_close_spider_in_a_callback_ends_the_crawl_as_scrapy_does(home: Path) -> None:
    # It closed its own chunk only: the other chunks crawled on, every page was
    # fetched, and nothing said the spider had closed.
    pages = 200
    close_path = "/catalogue/book_3/index.html"
    with SiteServer(Slow(BookSite(pages), 0.02)) as site:
        result = fanout(
            home,
            "run",
            job("closing"),
            *params(start_url=site.url, close_path=close_path),
            "-w",
            "2",
            "--chunk-timeout",
            "10",
        )
        fetched = sum(site.hits.values())
    assert result.returncode == 0, result.stderr
    run_id = run_id_of(result)
    st = status(home, run_id)
    assert st["state"] == "succeeded", st
    assert st["stop_reason"] == "stopped by the job: the spider closed (enough)", st
    assert "the spider closed (enough)" in result.stdout
    got = records(home, run_id)
    assert len(got) == len({r["url"] for r in got}) < pages  # each once, not all
    assert fetched < pages, fetched


# -- a page that never answers ------------------------------------------------------


class Hanging:
    """``site``, but its page at ``path`` never answers (the server accepted the
    connection and stalls) until ``release`` is set."""

    def __init__(self, site: Site, path: str) -> None:
        self.site, self.path = site, path
        self.release = threading.Event()

    def respond(self, key: str, host: str, hit: int) -> Reply:
        if key == self.path:
            self.release.wait(300)
        return self.site.respond(key, host, hit)


@pytest.mark.slow
def test_a_page_that_never_answers_times_out_as_in_scrapy_not_handed_on_for_ever(
    home: Path,
) -> None:
    """A request still waiting at a chunk's cut-off is handed on, and the next
    chunk sends it again. For a page that never answers (or answers slower than
    a chunk), that would go on until the run's max_depth stopped it. After two
    hand-ons in a row the request must answer before the cut-off or time out:
    Scrapy's retry then retries it, or gives it up; given up in each of its
    rounds (fanout.crawl.givenup), it ends in a dead chunk, and the run ends."""
    pages = 60
    stuck = "/catalogue/book_3/index.html"
    expected = expected_books(pages)
    assert stuck in expected
    hanging = Hanging(BookSite(pages), stuck)
    with SiteServer(hanging) as site:
        try:
            result = fanout(
                home,
                "run",
                job("books"),
                *params(start_url=site.url),
                "-w",
                "2",
                "--chunk-timeout",
                "4",
                "-S",
                "max_attempts=2",  # 2 rounds of Scrapy's retries for the page
                timeout=240,
            )
            stuck_hits = site.hits[stuck]
        finally:
            hanging.release.set()
    assert result.returncode == 1, result.stderr[-2000:]
    run_id = run_id_of(result)
    st = status(home, run_id)
    assert st["state"] == "failed" and st["chunks"]["dead"] == 1, st
    # Scrapy's 3 attempts (RETRY_TIMES 2) per round, 2 rounds (max_attempts);
    # each attempt sent in at most 3 chunks in a row.
    assert 2 * 3 <= stuck_hits <= 2 * 3 * 3, stuck_hits
    assert st["stats"].get("in_flight_timeouts", 0) >= 1, st["stats"]
    assert f"{stuck} has not answered within a chunk's time budget" in result.stderr
    failed = fanout(home, "failed", run_id)
    assert f"{stuck}: DownloadTimeoutError" in failed.stdout, failed.stdout
    del expected[stuck]
    assert_books_exactly_once(home, run_id, expected)


# -- a retried chunk that takes another path ---------------------------------------


class ForkSite:
    """``/`` links to ``/p`` (a hub linking to the item ``/p/item``) and to the
    item ``/q``."""

    LINKS = {"/": ["/p", "/q"], "/p": ["/p/item"], "/p/item": [], "/q": []}

    def respond(self, key: str, host: str, hit: int) -> Reply:
        if key not in self.LINKS:
            return Reply(404, (("Content-Type", HTML),), b"not found")
        links = "".join(f'<a href="{href}">{href}</a>' for href in self.LINKS[key])
        item = key.strip("/").replace("/", "-")
        body = f'<article class="item" data-id="{item}"><h1>{item}</h1>{links}</article>'
        if not item or key == "/p":
            body = links
        page = f"<!DOCTYPE html><html><head><title>{key}</title></head><body>{body}</body></html>"
        return Reply(200, (("Content-Type", HTML),), page.encode())


@pytest.mark.slow
def test_links_followed_by_a_killed_attempt_are_not_lost(home: Path, tmp_path: Path) -> None:
    # Chunk 0, first attempt: /, then /p, whose links it follows (claiming /p/item
    # for chunk 0), then it hangs and is killed. Second attempt: /, then /q, and
    # its page budget (2) is spent: /p goes to chunk 0/0, which finds /p/item
    # again: claimed by chunk 0, but by an attempt that never committed, and
    # chunk 0's second attempt released those claims before it started.
    marker = tmp_path / "reorder-once"
    marker.touch()
    with SiteServer(ForkSite()) as site:
        result = fanout(
            home,
            "run",
            job("reordering"),
            *params(start_url=site.url, marker=marker),
            "-w",
            "1",
            "--chunk-timeout",
            "3",
        )
        hits = dict(site.hits)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    run_id = run_id_of(result)
    assert status(home, run_id)["state"] == "succeeded"
    ids = Counter(r["id"] for r in records(home, run_id))
    assert hits.get("/p/item", 0) >= 1, hits
    assert sorted(ids) == ["p-item", "q"]


# -- the throttle middleware, unit -------------------------------------------------


def chunk_context(monkeypatch: pytest.MonkeyPatch, chunk: dict[str, Any]) -> None:
    """Run the components as inside a chunk whose context is ``chunk`` (empty:
    outside one), where both the components and their base read it."""
    monkeypatch.setattr(channel, "CHUNK", chunk)
    for module in (components, throttle):
        monkeypatch.setattr(module, "CHUNK", chunk)


def test_a_503_is_kept_for_later_unless_the_spider_asked_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunk_context(monkeypatch, {"chunk_id": "0"})  # inside a chunk
    crawler = get_crawler(Spider)
    rescue = throttle.ThrottleRescue(crawler)

    def answer(status: int, **meta: Any) -> tuple[Request, Any]:
        request = Request("http://busy.test/page", meta=meta)
        response = HtmlResponse(request.url, status=status, request=request, body=b"")
        return request, rescue.process_response(request, response)

    request, kept = answer(503)
    assert isinstance(kept, Request) and kept.dont_filter
    assert (kept.url, kept.meta) == (request.url, request.meta)
    _, kept = answer(429, depth=2)
    assert isinstance(kept, Request) and kept.meta["depth"] == 2
    for code in (200, 404, 500):
        _, response = answer(code)
        assert not isinstance(response, Request)
    # The spider handles 503s itself: it gets them.
    _, response = answer(503, handle_httpstatus_list=[503])
    assert not isinstance(response, Request)
    _, response = answer(503, handle_httpstatus_all=True)
    assert not isinstance(response, Request)
    # Held back too often: given up, as Scrapy would give up.
    _, response = answer(503, **{THROTTLE_META: backoff.MAX_THROTTLE_LEVEL})
    assert not isinstance(response, Request)
    assert crawler.stats.get_value("fanout/throttle_gave_up") == 1
    # Outside a chunk the middleware is not there at all.
    chunk_context(monkeypatch, {})
    with pytest.raises(NotConfigured):
        throttle.ThrottleRescue(crawler)


def test_a_host_that_cannot_be_reached_is_held_back_but_a_broken_page_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused, unresolvable, connect timed out: the host's fault, the request is
    scheduled again (held back with its domain). A reset or a timeout after the
    connection was made may be the page's: left to the given-up rounds."""
    from types import SimpleNamespace

    from twisted.internet import error
    from twisted.web._newclient import ResponseNeverReceived

    chunk_context(monkeypatch, {"chunk_id": "0"})
    crawler = get_crawler(Spider)
    held: set[str] = set()  # the domains the chunk holds back
    crawler.engine = SimpleNamespace(scheduler=SimpleNamespace(throttled=held))  # type: ignore[assignment]
    rescue = throttle.ThrottleRescue(crawler)

    def failed(exc: Exception, **meta: Any) -> Any:
        return rescue.process_exception(Request("http://down.test/p", meta=meta), exc)

    for host_fault in (
        error.ConnectionRefusedError(),
        error.DNSLookupError(),
        error.TCPTimedOutError(),
    ):
        kept = failed(host_fault, depth=3)
        assert isinstance(kept, Request) and kept.dont_filter and kept.meta["depth"] == 3
    for page_fault in (ResponseNeverReceived([]), error.ConnectionLost(), TimeoutError()):
        assert failed(page_fault) is None
    # ... unless its site is held back as away (pages failed in a row): then kept.
    held.add("down.test")
    assert isinstance(failed(error.ConnectionLost()), Request)
    held.clear()
    assert failed(error.ConnectionRefusedError(), dont_retry=True) is None
    # The spider handles this request's failures itself: its errback gets them.
    with_errback = Request("http://down.test/p", errback=lambda failure: None)
    assert rescue.process_exception(with_errback, error.ConnectionRefusedError()) is None
    assert (
        failed(error.ConnectionRefusedError(), **{THROTTLE_META: backoff.MAX_THROTTLE_LEVEL})
        is None
    )


def test_pages_failing_in_a_row_hold_their_site_back_but_one_broken_page_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Five pages failing with no good answer between them are the site's; so is
    a failure of a page held back with its site before, until the site answers
    (this chunk, or any chunk after the hold); a page that failed while its
    site answered is broken, its failures its own."""
    from types import SimpleNamespace

    from twisted.internet import error

    chunk_context(monkeypatch, {"chunk_id": "0"})
    backed_off: list[str] = []
    answered_at: list[float] = [0.0]  # the run's latest good answer, as the gate heard

    def site_answered(request: Request) -> None:
        answered_at[0] = time.time()

    gate = SimpleNamespace(
        key=lambda r: "site.test",
        back_off=lambda k, t: backed_off.append(k),
        site_answered=site_answered,
        answered_since=lambda r, since: answered_at[0] > since,
    )
    monkeypatch.setattr(throttle, "gate_of", lambda crawler: gate)

    def watch() -> tuple[throttle.ThrottleWatch, set[str]]:
        crawler = get_crawler(Spider)
        held: set[str] = set()
        scheduler = SimpleNamespace(throttled=held, away=set(), retry_after={})
        crawler.engine = SimpleNamespace(scheduler=scheduler)  # type: ignore[assignment]
        return throttle.ThrottleWatch(crawler), held

    def answer(w: throttle.ThrottleWatch, path: str, status: int, **meta: Any) -> None:
        request = Request(f"http://site.test/{path}", meta=meta)
        w.process_response(request, HtmlResponse(request.url, status=status, request=request))

    w, held = watch()
    for n in range(throttle.DOWN_AFTER - 1):
        answer(w, f"p{n}", 502)
        answer(w, f"p{n}", 502)  # the same page again is no new evidence
    assert not held
    answer(w, "ok", 200)  # a good answer: the run of failures starts again
    for n in range(throttle.DOWN_AFTER - 1):
        answer(w, f"q{n}", 502)
    assert not held
    answer(w, "q-last", 502)
    assert held == {"site.test"} and backed_off == ["site.test"]

    # Held back with its site before, and the site has not answered: away.
    w, held = watch()
    w.process_exception(
        Request("http://site.test/r", meta={THROTTLE_META: 0}), error.ConnectionLost()
    )
    assert held == {"site.test"}
    # The site answered this chunk: a broken page among the held ones is one page.
    w, held = watch()
    answer(w, "fine", 200)
    w.process_exception(
        Request("http://site.test/r", meta={THROTTLE_META: 0}), error.ConnectionLost()
    )
    assert not held

    # Held back as away at `held_at`; the site answered another chunk since:
    # the page is broken (held back together, broken pages kept their site
    # "away" until the run's max_depth), and is marked so from now on.
    w, held = watch()
    held_at = time.time() - 5
    answered_at[0] = held_at - 1  # before the hold: no news of the site since
    probe = {THROTTLE_META: 0, backoff.AWAY_META: 3, backoff.AWAY_AT_META: held_at}
    w.process_exception(Request("http://site.test/s", meta=dict(probe)), error.ConnectionLost())
    assert held == {"site.test"}
    w, held = watch()
    answered_at[0] = held_at + 1  # another chunk had a good answer after the hold
    broken = Request("http://site.test/s", meta=dict(probe))
    w.process_exception(broken, error.ConnectionLost())
    assert not held and broken.meta[backoff.OWN_FAILURE_META] is True

    # A page that failed, then the site answered (in this chunk): broken, for
    # good; its failure does not make the fifth of a run of failures.
    answered_at[0] = 0.0
    w, held = watch()
    answer(w, "t", 502)
    answer(w, "fine", 200)
    for n in range(throttle.DOWN_AFTER - 1):
        answer(w, f"u{n}", 502)
    answer(w, "t", 502)
    assert not held
    answer(w, "u-last", 502)  # the fifth that may be the site's
    assert held == {"site.test"}


def test_an_attempt_handed_on_in_flight_twice_must_answer_before_the_cut_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its download timeout ends before this chunk's cut-off; Scrapy's retry of
    it (a copy, meta and all) gets the request's own timeout back."""
    from types import SimpleNamespace

    cut_at = time.monotonic() + 2.0
    chunk_context(monkeypatch, {"chunk_id": "0", "budget": SimpleNamespace(cut_at=cut_at)})
    park = components.ParkHandedOn(get_crawler(Spider))

    def sent(attempt: int, handed_on: int) -> Request:
        request = Request("http://slow.test/page", meta={"download_timeout": 180.0})
        if attempt:
            request.meta["retry_times"] = attempt
        request.meta[components.IN_FLIGHT_META] = [0, handed_on]
        park.process_request(request)
        return request

    assert sent(0, 1).meta["download_timeout"] == 180.0  # handed on once: its own
    capped = sent(0, 2)
    assert 0 < capped.meta["download_timeout"] <= 2.0 - components.CUT_MARGIN
    assert capped.meta[components.OWN_TIMEOUT_META] == 180.0
    retry = capped.copy()
    retry.meta["retry_times"] = 1
    park.process_request(retry)
    assert retry.meta["download_timeout"] == 180.0
    assert components.OWN_TIMEOUT_META not in retry.meta
    assert sent(1, 2).meta["download_timeout"] == 180.0  # the mark is of another attempt


def test_status_shows_each_backed_off_domain_with_the_time_left(home: Path) -> None:
    """``fanout status`` of a running crawl lists the domains the run is backing
    off now, read from their leases, and stops listing one once it is over."""
    backend = open_backend("local", home=home)
    run_id = coordinator.submit(backend, job("throttled"), {"start_url": "http://a.test/"}).run_id
    crawl = backend.crawl
    assert crawl is not None
    now = time.time()
    for domain, wait in (("slow.test", 60.0), ("done.test", -1.0)):
        ask = DomainAsk(4, 0.0, 1, expires=now + 60, now=now - 2, backoff_until=now + wait)
        crawl.lease_domain(run_id, domain, "0", ask)
    result = fanout(home, "status", run_id)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "slow.test" in line]
    left = float(line.split("backed off ")[1].split("s more")[0])
    assert 50 < left <= 60, line
    assert "done.test" not in result.stdout  # its back-off is over
    assert status(home, run_id)["backoffs"].keys() == {"slow.test"}


# -- requests that cannot cross a chunk boundary ---------------------------------------


@pytest.mark.parametrize("how", ["callback", "meta"])
def test_a_request_that_cannot_be_handed_on_fails_the_run_clearly(
    home: Path, ledger: Backend, how: str
) -> None:
    """A request whose callback is not a spider method, or whose meta holds a
    value JSON has no type for, cannot cross a chunk boundary. It used to be
    claimed, then dropped with an error line when its chunk handed it on: its
    page was never fetched and the run succeeded without it. Now its chunk is
    buried as a permanent error naming the request and what cannot travel."""
    pages = 60
    with SiteServer(BookSite(pages)) as site:
        result = fanout(
            home, "run", job("unkeepable"), *params(start_url=site.url, how=how),
            "-w", "2", "--chunk-timeout", "10",
        )  # fmt: skip
    run_id = run_id_of(result)
    st = status(home, run_id)
    assert st["state"] != "succeeded", st
    dead = [t for t in ledger.ledger.list_tasks(run_id) if t.state == "dead"]
    assert dead, st
    errors = " ".join(str(e.get("error", "")) for t in dead for e in t.history)
    reason = "is not a spider method" if how == "callback" else "set cannot travel"
    assert "cannot be handed on" in errors and reason in errors, errors
    # Buried at once (a permanent error), not retried to its last attempt.
    assert [outcomes(t) for t in dead] == [["permanent", "dead"]] * len(dead)
    assert result.returncode != 0 and "cannot be handed on" in result.stderr, result.stderr


def test_a_start_that_raises_before_any_request_fails_the_run_saying_why(home: Path) -> None:
    """``-p start_url=notaurl``: Scrapy logs the error and the crawl used to
    "succeed" with no records. Nothing can ever be crawled: the run fails,
    naming the error."""
    result = fanout(home, "run", job("books"), *params(start_url="notaurl"), "-w", "1")
    assert result.returncode == 1, result.stderr
    st = status(home, run_id_of(result))
    assert st["state"] == "failed" and st["chunks"]["dead"] == 1, st
    shown = fanout(home, "failed", run_id_of(result)).stdout
    assert "start raised before it yielded anything" in shown and "Missing scheme" in shown, shown
    # An ordinary failure, retried: the service a start() asks may be down for a moment.
    backend = open_backend("local", home=home)
    try:
        (dead,) = backend.ledger.list_tasks(run_id_of(result), (TaskState.DEAD,))
    finally:
        backend.close()
    assert outcomes(dead) == ["error", "error", "error", "dead"], dead.history


def test_a_start_that_closes_the_spider_ends_the_crawl_as_scrapy_does(home: Path) -> None:
    result = fanout(home, "run", job("closing_start"), *params(start_url="http://x.test/"))
    assert result.returncode == 0, result.stderr
    assert status(home, run_id_of(result))["state"] == "succeeded"


def test_what_a_start_yielded_before_it_raised_is_crawled(home: Path) -> None:
    """As in Scrapy: the requests a spider's start yielded before an error are
    crawled (they were dropped with the error)."""
    site = BookSite(40)
    with SiteServer(site) as server:
        result = fanout(home, "run", job("half_start"), *params(start_url=server.url), "-w", "1")
    assert result.returncode == 0, result.stderr
    assert_books_exactly_once(home, run_id_of(result), site.expected_books())


def test_a_chunk_that_gives_up_lets_go_of_its_sites_at_once(home: Path) -> None:
    """A chunk buried for a request it cannot hand on used to leave with its
    domain leases held: on a polite site (a download delay makes a lease
    exclusive) every other chunk then waited for the site until the lease
    lapsed, a chunk timeout (30 s here), for a chunk that was long gone."""
    site = BookSite(80)
    with SiteServer(site) as server:
        started = time.monotonic()
        result = fanout(
            home, "run", job("polite_unkeepable"),
            *params(start_url=server.url, how="meta", only=site.layout.books[-1].path),
            "-w", "2", "--chunk-timeout", "30", timeout=120,
        )  # fmt: skip
        took = time.monotonic() - started
    st = status(home, run_id_of(result))
    assert st["chunks"]["dead"] == 1 and st["chunks"]["done"] > 5, st["chunks"]
    assert took < 15, f"the run took {took:.1f}s: the dead chunk's site lease held it back"


def test_items_passed_on_in_meta_and_cb_kwargs_cross_chunk_boundaries(home: Path) -> None:
    """Scrapy's "pass the item on" pattern: a catalogue page puts an ``Item`` in
    each book request's ``meta`` and a dataclass in its ``cb_kwargs``. Chunks of
    15 pages hand most of those requests on, as data: each book page gets back
    the same classes with the catalogue page's values, and yields once."""
    site = BookSite(80)
    with SiteServer(site) as server:
        result = fanout(
            home, "run", job("carrying"), *params(start_url=server.url),
            "-w", "2", "--chunk-timeout", "20",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_id = run_id_of(result)
    assert status(home, run_id)["chunks"]["done"] > 3  # requests did cross boundaries
    got = records(home, run_id)
    assert sorted(urlsplit(r["url"]).path for r in got) == sorted(site.expected_books())
    lists = {page.path: page for page in site.layout.catalogue}
    book_paths = {book.number: book.path for book in site.layout.books}
    for record in got:
        listed_on = urlsplit(record["listed_on"]).path
        assert listed_on in lists, record
        links = [book_paths[n] for n in lists[listed_on].books]
        assert links[record["position"] - 1] == urlsplit(record["url"]).path, record
        assert record["depth"] >= 1 and record["title"], record
