"""robots.txt is fetched once per domain per run, even when two chunks meet a
site at the same moment (issue 9): the first claims the fetch in the run's
seen-set, the other waits for the file in the store.

Two chunks run at once (``fanout.crawl.chunk.run_chunk`` forks each one's
Scrapy process), on one run's ledger and store, each with its own frontier on
the same site. The site's robots.txt answers slowly, so the second chunk asks
for it while the first chunk's fetch is still on its way. With no
``DOWNLOAD_DELAY`` the domain's 4 slots are shared between them, and the chunk
with one page keeps only what it uses, so nothing else keeps the other chunk
from fetching the file again (on the code before the claim: 2 fetches).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
import scrapy
from scrapy.http import Response, TextResponse

from fanout.backends.base import Backend
from fanout.crawl import politeness
from fanout.crawl.chunk import ChunkResult, run_chunk
from fanout.crawl.codec import request_to_json
from support.sites import HTML, NOT_FOUND, Reply, SiteServer

RUN = "robots-run"
PAGES = ("a", "b", "c", "d")
#: Seconds robots.txt takes to answer: longer than a lease renewal (0.25 s), so
#: the second chunk is given its share of the domain while the fetch is out.
ROBOTS_DELAY = 1.0


class SlowRobots:
    """Four leaf item pages; robots.txt allows all but ``/d`` and answers late."""

    def respond(self, key: str, host: str, hit: int) -> Reply:
        if key == "/robots.txt":
            body = b"User-agent: *\nDisallow: /d\n"
            return Reply(200, (("Content-Type", "text/plain"),), body, ROBOTS_DELAY)
        name = key.strip("/")
        if name not in PAGES:
            return NOT_FOUND
        body = f'<html><body><article data-id="{name}"></article></body></html>'
        return Reply(200, (("Content-Type", HTML),), body.encode())


class Unanswered(SlowRobots):
    """robots.txt answers only after the spider's download timeout."""

    def respond(self, key: str, host: str, hit: int) -> Reply:
        reply = super().respond(key, host, hit)
        return reply._replace(delay=3.0) if key == "/robots.txt" else reply


class Obeys(scrapy.Spider):
    """Yields ``{"id"}`` for every page; obeys robots.txt; no delay."""

    name = "obeys"
    custom_settings = {"ROBOTSTXT_OBEY": True, "CONCURRENT_REQUESTS_PER_DOMAIN": 4}

    def parse(self, response: Response, **kwargs: Any) -> Any:
        if isinstance(response, TextResponse) and response.css("article"):
            yield {"id": response.css("article").attrib["data-id"]}


class Impatient(Obeys):
    """Gives up on a download after 1 s."""

    name = "impatient"
    custom_settings = {**Obeys.custom_settings, "DOWNLOAD_TIMEOUT": 1}


def run(
    backend: Backend,
    chunk_id: str,
    paths: tuple[str, ...],
    url: str,
    spider_cls: type[Obeys] = Obeys,
) -> ChunkResult:
    """One chunk of the run, its frontier ``paths`` on the site at ``url``."""
    spider = spider_cls()
    entries = [request_to_json(scrapy.Request(f"{url}{p}"), spider) for p in paths]
    return run_chunk(
        spider_cls,
        {},
        entries,
        crawl=backend.crawl,
        run_id=RUN,
        chunk_id=chunk_id,
        pages_per_chunk=50,
        time_left=20.0,
        store=backend.store,
    )


def test_two_chunks_meeting_a_site_at_once_fetch_its_robots_txt_once(ledger: Backend) -> None:
    results: dict[str, ChunkResult] = {}

    def chunk(chunk_id: str, paths: tuple[str, ...], url: str) -> None:
        results[chunk_id] = run(ledger, chunk_id, paths, url)

    with SiteServer(SlowRobots()) as server:
        url = server.url.rstrip("/")
        threads = [
            threading.Thread(target=chunk, args=("0/0", ("/a",), url)),
            threading.Thread(target=chunk, args=("0/1", ("/b", "/c", "/d"), url)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        hits = server.hits
    assert sorted(results) == ["0/0", "0/1"]
    assert all(r.errors == [] and r.pending == [] for r in results.values())
    items = Counter(item["id"] for r in results.values() for item in r.items)
    # /d is disallowed: the chunk that read robots.txt from the store obeys it too.
    assert items == Counter({"a": 1, "b": 1, "c": 1})
    # One chunk fetched it; the other waited and read it from the store.
    assert sorted(r.stats.get("robots_from_store", 0) for r in results.values()) == [0, 1]
    assert hits["/robots.txt"] == 1
    assert hits["/d"] == 0


def test_a_chunk_fetches_robots_txt_itself_when_the_claimed_fetch_never_lands(
    ledger: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A chunk that claimed the fetch and was cut off (or died) before the
    # answer: the file never reaches the store. The chunk forked below inherits
    # the shorter wait.
    monkeypatch.setattr(politeness, "ROBOTS_WAIT", 0.5)
    with SiteServer(SlowRobots()) as server:
        netloc = server.url.split("/")[2]
        fp = politeness.robots_fingerprint(netloc)
        assert ledger.crawl.claim_urls(RUN, "0/9", "gone", [fp]) == {fp}
        result = run(ledger, "0/0", ("/a", "/d"), server.url.rstrip("/"))
        hits = server.hits
    assert result.errors == [] and result.pending == []
    assert [item["id"] for item in result.items] == ["a"]  # /d: disallowed
    assert result.stats.get("robots_wait_gave_up") == 1
    assert hits["/robots.txt"] == 1 and hits["/d"] == 0


def test_a_robots_txt_that_could_not_be_fetched_is_not_waited_for_by_other_chunks(
    ledger: Backend,
) -> None:
    # Scrapy obeys nothing for the rest of its process when robots.txt cannot
    # be fetched; the run's later chunks do the same instead of each waiting
    # ROBOTS_WAIT for a file that will not come, then timing out again.
    with SiteServer(Unanswered()) as server:
        url = server.url.rstrip("/")
        first = run(ledger, "0/0", ("/a",), url, Impatient)
        tries = server.hits["/robots.txt"]  # Scrapy's retries included
        second = run(ledger, "0/1", ("/b", "/d"), url, Impatient)
        hits = server.hits
    assert tries >= 1 and first.stats.get("download_errors") == tries  # all timed out
    assert second.stats.get("robots_from_store") == 1
    assert "robots_wait_gave_up" not in second.stats
    assert hits["/robots.txt"] == tries  # none from the second chunk
    ids = sorted(item["id"] for r in (first, second) for item in r.items)
    assert ids == ["a", "b", "d"]  # nothing disallowed, as after Scrapy's own failure


class HangingRobots(SlowRobots):
    """robots.txt is read and never answered until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def respond(self, key: str, host: str, hit: int) -> Reply:
        if key == "/robots.txt":
            self.release.wait(60)
        return super().respond(key, host, hit)


@pytest.mark.parametrize("old_first", [True, False])
def test_a_robots_txt_pages_waited_for_across_chunks_gets_a_bounded_fetch(
    ledger: Backend, old_first: bool
) -> None:
    # /a was handed on twice while it waited for the site's robots.txt (it is
    # in the frontier with that mark); /b is a fresh link to the site. Whichever
    # of them the chunk sends first, the file must be fetched within the chunk's
    # time, so that a robots.txt that never answers ends as unavailable (both
    # pages fetched) rather than being waited for again in the next chunk.
    spider = Obeys()
    old = scrapy.Request("http://x/a", meta={politeness.IN_FLIGHT_META: [0, 2]})
    site = HangingRobots()
    with SiteServer(site) as server:
        url = server.url.rstrip("/")
        old = old.replace(url=f"{url}/a")
        fresh = scrapy.Request(f"{url}/b")
        requests = [old, fresh] if old_first else [fresh, old]
        try:
            result = run_chunk(
                Obeys, {}, [request_to_json(r, spider) for r in requests],
                crawl=ledger.crawl, run_id=RUN, chunk_id="0/0", pages_per_chunk=50,
                time_left=4.0, store=ledger.store,
            )  # fmt: skip
        finally:
            site.release.set()
    assert result.stats.get("robots_bounded") == 1, result.stats
    assert result.pending == []
    assert sorted(item["id"] for item in result.items) == ["a", "b"]


class RulesIn404(SlowRobots):
    """robots.txt answers 404, with rules in its body (Scrapy parses them)."""

    def respond(self, key: str, host: str, hit: int) -> Reply:
        reply = super().respond(key, host, hit)
        return reply._replace(status=404, delay=0.0) if key == "/robots.txt" else reply


def test_every_chunk_obeys_what_the_fetching_chunk_read_whatever_the_status(
    ledger: Backend,
) -> None:
    # The chunk that fetched a 404 robots.txt obeyed its body, as Scrapy does;
    # the others read "no rules" from the store and crawled what it forbade
    # (a black-box helper's find: 40 pages plain Scrapy did not fetch).
    with SiteServer(RulesIn404()) as server:
        url = server.url.rstrip("/")
        first = run(ledger, "0/0", ("/a",), url)
        second = run(ledger, "0/1", ("/b", "/c", "/d"), url)
        hits = server.hits
    assert second.stats.get("robots_from_store") == 1
    items = Counter(item["id"] for r in (first, second) for item in r.items)
    assert items == Counter({"a": 1, "b": 1, "c": 1})
    assert hits["/robots.txt"] == 1 and hits["/d"] == 0
