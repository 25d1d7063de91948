"""Requests Scrapy gives up on are kept, not lost (``fanout/crawl/givenup.py``),
through the CLI as a user runs a crawl:

* a page failing past Scrapy's ``RETRY_TIMES`` is fetched again by a chunk of
  its own, and the run succeeds with every item once;
* a page that never answers right ends the run ``failed`` (exit 1) with one
  dead chunk naming it, every other item kept; fixed, ``fanout replay`` fetches
  it and the run succeeds;
* a start URL nothing listens on fails the run, where it "succeeded" with no
  records; once the site is up, ``fanout replay`` crawls it;
* an answer the spider asked to see (``handle_httpstatus_list``) is the
  spider's, not a failure;
* a site with many pages that always fail is not taken for a site that is
  away: its broken pages end dead, its good pages are all kept.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

from support.helpers import JOBS
from support.procs import fanout, run_id_of, status
from support.sites import HTML, NOT_FOUND, Reply, SiteServer
from testjobs.hard_crawl import THROTTLE_BASE

JOB = str(JOBS / "hard_crawl.py")
#: ``hard_crawl.py:tutorial`` sets RETRY_TIMES 3: each round is 4 requests.
ROUND = 4
PAGE = (("Content-Type", HTML),)


def page(item: str | None, links: list[str]) -> bytes:
    """An item page (``article.page``, as ``hard_crawl.py`` reads it) or a hub."""
    hrefs = "".join(f'<a href="{href}">{href}</a>' for href in links)
    if item is None:
        return f"<html><body>{hrefs}</body></html>".encode()
    article = f'<article class="page" data-id="{item}"><h1>{item}</h1>{hrefs}</article>'
    return f"<html><body>{article}</body></html>".encode()


class FailingPage:
    """``/`` links to ``/p/0`` .. ``/p/5``; ``/p/2`` answers ``status`` to its
    first ``failures`` requests (and links to ``/p/6``, reached only through it)."""

    def __init__(self, failures: float, status: int = 500) -> None:
        self.failures = failures
        self.status = status
        self.asked: list[float] = []  # when /p/2 was asked for (monotonic)

    def expected(self) -> set[str]:
        return {f"p{n}" for n in range(7)}

    def respond(self, key: str, host: str, hit: int) -> Reply:
        if key == "/":
            return Reply(200, PAGE, page(None, [f"/p/{n}" for n in range(6)]))
        if key == "/p/2":
            self.asked.append(time.monotonic())
        if key == "/p/2" and hit <= self.failures:
            return Reply(self.status, PAGE, b"<p>not now</p>")
        if key.startswith("/p/") and key[3:].isdigit() and int(key[3:]) <= 6:
            n = int(key[3:])
            return Reply(200, PAGE, page(f"p{n}", ["/p/6"] if n == 2 else []))
        return NOT_FOUND


def crawl(home: Path, url: str, *extra: str, env: dict[str, str] | None = None) -> Any:
    return fanout(
        home, "run", f"{JOB}:tutorial", "-p", f"start_url={url}", "-w", "2",
        "-S", "pages_per_chunk=3", *extra, timeout=120, env=env,
    )  # fmt: skip


def items(home: Path, run_id: str) -> Counter[str]:
    result = fanout(home, "cat", run_id)
    assert result.returncode == 0, result.stderr
    return Counter(json.loads(line)["id"] for line in result.stdout.splitlines())


def test_a_page_failing_past_scrapy_s_retries_is_fetched_by_a_chunk_of_its_own(
    home: Path,
) -> None:
    site = FailingPage(failures=ROUND + 1)  # its own chunk's first request fails too
    with SiteServer(site) as server:
        result = crawl(home, server.url)
        hits = server.hits
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = run_id_of(result)
    st = status(home, run_id)
    assert st["state"] == "succeeded" and st["chunks"]["dead"] == 0, st
    assert items(home, run_id) == Counter(dict.fromkeys(site.expected(), 1))
    assert hits["/p/2"] == ROUND + 2, dict(hits)  # given up once, then 500, 200
    assert st["stats"]["given_up"] == 1, st["stats"]
    assert "/p/2 given up (HTTP 500): it gets a chunk of its own" in result.stderr


def test_a_page_that_never_answers_fails_the_run_and_replay_fetches_it_once_fixed(
    home: Path,
) -> None:
    site = FailingPage(failures=float("inf"), status=502)
    with SiteServer(site) as server:
        result = crawl(home, server.url)
        assert result.returncode == 1, result.stderr[-3000:]
        assert "-S tolerated_failures=N" in result.stdout  # how to accept such a page
        run_id = run_id_of(result)
        st = status(home, run_id)
        assert st["state"] == "failed" and st["chunks"]["dead"] == 1, st
        # Every other page's item is kept; the failing page's, and what only
        # it links to, are not there yet.
        assert items(home, run_id) == Counter(dict.fromkeys(site.expected() - {"p2", "p6"}, 1))
        # max_attempts (3) rounds of Scrapy's retries: its chunk's, then two of its own,
        # each after the crawl's first pause for a site at least (its throttle_base).
        assert server.hits["/p/2"] == ROUND * 3, dict(server.hits)
        pauses = [site.asked[n * ROUND] - site.asked[n * ROUND - 1] for n in (1, 2)]
        assert min(pauses) >= THROTTLE_BASE, pauses
        failed = fanout(home, "failed", run_id)
        assert failed.returncode == 0, failed.stderr
        assert "GET " + server.url + "p/2: HTTP 502" in failed.stdout, failed.stdout
        assert "given up again" in failed.stdout, failed.stdout

        site.failures = 0  # the site is fixed
        replay = fanout(home, "replay", run_id, "--work", "-w", "2", timeout=120)
        assert replay.returncode == 0, replay.stderr[-3000:]
    assert status(home, run_id)["state"] == "succeeded"
    assert items(home, run_id) == Counter(dict.fromkeys(site.expected(), 1))


def test_a_crawl_that_tolerates_a_failure_succeeds_with_the_page_kept_dead(home: Path) -> None:
    # What the failed run's summary suggests, for a site that always has a few
    # broken pages: the run succeeds, and the page is still there to replay.
    site = FailingPage(failures=float("inf"), status=500)
    with SiteServer(site) as server:
        result = crawl(home, server.url, "-S", "tolerated_failures=1")
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = run_id_of(result)
    st = status(home, run_id)
    assert st["state"] == "succeeded_with_failures" and st["chunks"]["dead"] == 1, st
    assert items(home, run_id) == Counter(dict.fromkeys(site.expected() - {"p2", "p6"}, 1))
    assert "p/2: HTTP 500" in fanout(home, "failed", run_id).stdout


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_start_url_fails_the_run_and_replay_crawls_it_once_up(
    home: Path,
) -> None:
    port = free_port()
    # A site that is away is tried five times, then given up in rounds: the
    # pauses between are not what this test is about (shortened: 40 s to ~15 s).
    result = crawl(home, f"http://127.0.0.1:{port}/", env={"HARD_THROTTLE_BASE": "0.2"})
    assert result.returncode == 1, result.stderr[-3000:]
    # Waited for first, as a site that is away (fanout.crawl.throttle), and said so.
    assert f"127.0.0.1:{port} away (refused" in result.stderr, result.stderr[-3000:]
    run_id = run_id_of(result)
    st = status(home, run_id)
    assert st["state"] == "failed" and st["chunks"]["dead"] == 1, st
    assert "Connection refused" in fanout(home, "failed", run_id).stdout
    site = FailingPage(failures=0)
    with SiteServer(site, port=port):
        replay = fanout(home, "replay", run_id, "--work", "-w", "2", timeout=120)
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert items(home, run_id) == Counter(dict.fromkeys(site.expected(), 1))


SEES_500 = f"""
import sys
sys.path.insert(0, {str(JOBS)!r})
from hard_crawl import FAST_RETRY, SCHEMA, Tutorial
from fanout.crawl import CrawlJob

class Sees500(Tutorial):
    name = "sees-500"
    handle_httpstatus_list = [500]  # the spider's own: Scrapy lets them through

job = CrawlJob(Sees500, schema=SCHEMA, **FAST_RETRY)
"""


def test_an_answer_the_spider_asked_to_see_is_not_kept_as_a_failure(
    home: Path, tmp_path: Path
) -> None:
    job = tmp_path / "sees_500.py"
    job.write_text(SEES_500)
    site = FailingPage(failures=float("inf"))
    with SiteServer(site) as server:
        result = fanout(home, "run", str(job), "-p", f"start_url={server.url}", timeout=120)
        hits = server.hits
    assert result.returncode == 0, result.stderr[-3000:]
    st = status(home, run_id_of(result))
    assert st["state"] == "succeeded" and "given_up" not in st["stats"], st
    assert hits["/p/2"] == ROUND, dict(hits)  # Scrapy's retries, then the spider's


class ManyBrokenPages:
    """A tree of ``pages`` item pages (``/p/n`` links to ``/p/4n+1`` .. ``/p/4n+4``);
    every eighth also links to ``/broken/n``, which answers 502 to every request."""

    def __init__(self, pages: int) -> None:
        self.pages = pages

    def expected(self) -> set[str]:
        return {f"p{n}" for n in range(self.pages)}

    def broken(self) -> int:
        return len(range(0, self.pages, 8))

    def respond(self, key: str, host: str, hit: int) -> Reply:
        if key == "/":
            return Reply(200, PAGE, page(None, ["/p/0"]))
        if key.startswith("/broken/"):
            return Reply(502, PAGE, b"<p>bad gateway</p>")
        if key.startswith("/p/") and key[3:].isdigit() and int(key[3:]) < self.pages:
            n = int(key[3:])
            links = [f"/p/{c}" for c in range(4 * n + 1, 4 * n + 5) if c < self.pages]
            return Reply(200, PAGE, page(f"p{n}", links + ([f"/broken/{n}"] if n % 8 == 0 else [])))
        return NOT_FOUND


def test_a_site_with_many_broken_pages_is_not_taken_for_a_site_that_is_away(
    home: Path,
) -> None:
    """One page in nine always fails: each is a broken page, dead after its
    rounds, and the site's good pages are all kept. The broken pages, held back
    together, used to fail "in a row" in the next chunk and mark the site away
    run-wide, again and again: the good pages were handed on generation after
    generation until the run stopped at max_depth, some never fetched."""
    site = ManyBrokenPages(200)
    with SiteServer(site) as server:
        started = time.monotonic()
        result = fanout(
            home, "run", f"{JOB}:tutorial", "-p", f"start_url={server.url}", "-w", "2",
            "-S", "pages_per_chunk=20", timeout=300,
        )  # fmt: skip
        took = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    run_id = run_id_of(result)
    st = status(home, run_id)
    assert st["state"] == "failed" and st["chunks"]["dead"] == site.broken(), st
    assert st["chunks"]["cancelled"] == 0, st
    assert items(home, run_id) == Counter(dict.fromkeys(site.expected(), 1))
    assert took < 120, took
