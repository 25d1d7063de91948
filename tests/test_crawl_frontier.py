"""A crawl chunk given a frontier, in process (``fanout.crawl.chunk.run_chunk``
forks the chunk's Scrapy process): regression tests for issue 9.

A frontier is what a parent chunk hands on: requests serialized with
``fanout.crawl.codec.request_to_json`` (the tests leave the ledger empty: how
a parent's claims reach its children is the engine's business), among them
copies Scrapy made of a request (a retry: ``dont_filter``, ``retry_times`` in
its meta, a lower priority; a redirect). Such a copy is the same request as
its original: the page must be fetched and parsed once, whichever copy the
chunk meets first.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import scrapy
from scrapy.http import Response, TextResponse

from fanout.backends import open_backend
from fanout.backends.base import Backend
from fanout.crawl.chunk import run_chunk
from fanout.crawl.codec import request_to_json
from support.sites import HTML, NOT_FOUND, Reply, SiteServer

RUN = "frontier-run"
CHUNK = "0/0"


class TinySite:
    """``/a`` links to ``/b``; ``/b`` and ``/c`` are leaves; ``/old`` answers
    after ``slow_first`` s the first time (a client with a shorter timeout gives
    up), then 301 → ``/c``. Every page is an item page."""

    def __init__(self, slow_first: float = 0.0) -> None:
        self.slow_first = slow_first

    def respond(self, key: str, host: str, hit: int) -> Reply:
        if key == "/old":
            delay = self.slow_first if hit == 1 else 0.0
            return Reply(301, (("Location", f"http://{host}/c"),), b"moved", delay)
        links = {"/a": ["/b"], "/b": [], "/c": []}.get(key)
        if links is None:
            return NOT_FOUND
        hrefs = "".join(f'<a href="{href}">{href}</a>' for href in links)
        item = key.strip("/")
        body = f'<html><body><article data-id="{item}">{hrefs}</article></body></html>'
        return Reply(200, (("Content-Type", HTML),), body.encode())


class Follow(scrapy.Spider):
    """Yields ``{"id"}`` for every page and follows every link."""

    name = "follow"
    custom_settings = {"RETRY_TIMES": 3}

    def parse(self, response: Response, **kwargs: Any) -> Any:
        if not isinstance(response, TextResponse):
            return
        article = response.css("article")
        if article:
            yield {"id": article.attrib["data-id"]}
        yield from response.follow_all(css="a")


class ShortTimeout(Follow):
    """The same spider with a 1 s ``DOWNLOAD_TIMEOUT`` of its own."""

    name = "short-timeout"
    custom_settings = {"RETRY_TIMES": 3, "DOWNLOAD_TIMEOUT": 1}


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Backend]:
    backend = open_backend("local", home=tmp_path / "home")
    yield backend
    backend.close()


def frontier(spider_cls: type[scrapy.Spider], requests: list[scrapy.Request]) -> list[Any]:
    """The requests as a parent chunk hands them on."""
    spider = spider_cls()
    return [request_to_json(r, spider) for r in requests]


def crawl(backend: Backend, spider_cls: type[scrapy.Spider], entries: list[Any]) -> Counter[str]:
    result = run_chunk(
        spider_cls,
        {},
        entries,
        crawl=backend.crawl,
        run_id=RUN,
        chunk_id=CHUNK,
        pages_per_chunk=50,
        time_left=20.0,
    )
    assert result.errors == []
    assert result.pending == []  # 50 pages and 20 s are plenty: the chunk finished
    return Counter(item["id"] for item in result.items)


def test_a_retry_in_the_frontier_and_a_link_to_its_page_fetch_it_once(local: Backend) -> None:
    # B was fetched by the parent, failed, and Scrapy's retry copy of it (dont_filter,
    # retry_times 1, priority -1) was still queued when the parent closed.
    with SiteServer(TinySite()) as server:
        a, b = server.url + "a", server.url + "b"
        retry = scrapy.Request(b, dont_filter=True, meta={"retry_times": 1}, priority=-1)
        items = crawl(local, Follow, frontier(Follow, [scrapy.Request(a), retry]))
        hits = server.hits
    assert hits["/b"] == 1, dict(hits)
    assert items == Counter({"a": 1, "b": 1})


def test_a_timed_out_redirect_source_leads_once_to_a_frontier_page(local: Backend) -> None:
    # /old's first answer comes after the spider's 1 s DOWNLOAD_TIMEOUT: Scrapy
    # retries it (dont_filter), and its 301 leads to /c, which the frontier
    # also holds. /c is one page: fetched once, one item.
    with SiteServer(TinySite(slow_first=1.6)) as server:
        old, c = server.url + "old", server.url + "c"
        entries = frontier(ShortTimeout, [scrapy.Request(old), scrapy.Request(c)])
        items = crawl(local, ShortTimeout, entries)
        hits = server.hits
    assert hits["/old"] == 2, dict(hits)  # the timed-out answer, then the 301
    assert hits["/c"] == 1, dict(hits)
    assert items == Counter({"c": 1})


# -- Retry-After ---------------------------------------------------------------------


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    from fanout.crawl.backoff import MAX_RETRY_AFTER, parse_retry_after

    assert parse_retry_after(b"120") == 120.0
    assert parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT", now=1445412460.0) == 20.0
    assert parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT", now=1445412500.0) == 0.0  # past
    assert parse_retry_after(b"soon") == 0.0
    assert parse_retry_after(None) == 0.0
    assert parse_retry_after(b"nan") == 0.0
    assert parse_retry_after(b"99999999") == MAX_RETRY_AFTER


def test_a_retry_after_longer_than_the_back_off_delays_the_throttled_children() -> None:
    """Requests held back for a domain that answered 429 with ``Retry-After: 600``
    go to a child that starts no sooner; without the header, fanout's own
    back-off (at least ``throttle_base``, well under 600 s) applies."""
    import time

    from fanout.context import ChunkContext
    from fanout.crawl import CrawlJob

    job = CrawlJob(scrapy.Spider, schema=None, name="t", pages_per_chunk=10, throttle_base=5.0)

    def spawned(entries: list[dict[str, Any]]) -> list[float]:
        ctx = ChunkContext(
            params={}, run_id="r", chunk_id="0/1", seq=0, attempt=1, cursor=None,
            soft_deadline=time.monotonic() + 60, writer=None, job_name="t",
            settings=job.settings,
        )  # fmt: skip
        job._hand_on(entries, ctx)
        return sorted(s.delay for s in ctx.spawned)

    def entry(url: str, **extra: Any) -> dict[str, Any]:
        return {"request": {"url": url, "meta": {}}, "throttled": True, **extra}

    slow = spawned([entry("http://a.test/1", retry_after=600.0)])
    own = spawned([entry("http://a.test/1")])
    assert slow == [600.0]
    assert len(own) == 1 and 5.0 <= own[0] < 600.0


# -- run-wide back-off -------------------------------------------------------------


def test_a_back_off_is_told_to_the_run_once_and_marks_the_domain_in_this_chunk(
    tmp_path: Path,
) -> None:
    """The 429s of requests that were in flight together tell the run once;
    a longer Retry-After tells it again; the chunk holds the domain's requests."""
    from types import SimpleNamespace

    from scrapy.settings import Settings
    from scrapy.statscollectors import MemoryStatsCollector

    from fanout.backends import open_backend
    from fanout.crawl.politeness import DomainGate

    backend = open_backend("local", home=tmp_path)
    assert backend.crawl is not None
    scheduler = SimpleNamespace(throttled=set(), retry_after={})
    crawler = SimpleNamespace(
        settings=Settings({"CONCURRENT_REQUESTS_PER_DOMAIN": 4}),
        engine=SimpleNamespace(
            scheduler=scheduler,
            downloader=SimpleNamespace(slots={}, per_slot_settings={}),
        ),
    )
    crawler.stats = MemoryStatsCollector(crawler)
    now = time.time()
    chunk = {"crawl": backend.crawl, "run_id": "r", "chunk_id": "0/1", "expires": now + 60}
    gate = DomainGate(crawler, chunk)
    calls = lambda: crawler.stats.get_value("fanout/ledger_lease_calls", 0)  # noqa: E731
    gate.back_off("a.test", now + 5)
    assert calls() == 1 and "a.test" in scheduler.throttled
    assert 4 < scheduler.retry_after["a.test"] <= 5
    gate.back_off("a.test", now + 5.5)  # another answer of the same burst
    assert calls() == 1
    gate.back_off("a.test", now + 30)  # the site asked for longer
    assert calls() == 2 and scheduler.retry_after["a.test"] > 29
    assert backend.crawl.backoffs("r", time.time()) == {"a.test": now + 30}
    backend.close()


# -- a callback that raises --------------------------------------------------------


class YieldsThenRaises(Follow):
    """Follows ``/a``'s links, then raises: what it yielded first must count."""

    name = "yields-then-raises"

    def parse(self, response: Response, **kwargs: Any) -> Any:
        yield from super().parse(response, **kwargs)
        if response.url.endswith("/a"):
            raise ValueError("the page's layout changed")


class YieldsThenRaisesAsync(Follow):
    """The same, as an asynchronous generator callback."""

    name = "yields-then-raises-async"

    async def parse(self, response: Response, **kwargs: Any) -> Any:  # type: ignore[override]
        for thing in Follow.parse(self, response, **kwargs):
            yield thing
        if response.url.endswith("/a"):
            raise ValueError("the page's layout changed")


@pytest.mark.parametrize("spider_cls", [YieldsThenRaises, YieldsThenRaisesAsync])
def test_links_a_callback_yielded_before_it_raised_are_followed(
    local: Backend, spider_cls: type[scrapy.Spider]
) -> None:
    # /a yields its item and its link to /b, then raises. Scrapy itself keeps
    # what a callback yielded before its error (the error goes to the log and
    # the spider_error signal): the link to /b must be claimed and followed.
    with SiteServer(TinySite()) as server:
        items = crawl(local, spider_cls, frontier(spider_cls, [scrapy.Request(server.url + "a")]))
        hits = server.hits
    assert hits["/b"] == 1, dict(hits)
    assert items == Counter({"a": 1, "b": 1})


# -- an errback's requests ---------------------------------------------------------


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (connections are refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ErrbackFollows(Follow):
    """Starts at a dead host whose errback links to the site's pages (some twice,
    some also linked from ``/a``): a download error's errback output skips the
    spider middlewares, so its requests reach the scheduler one by one."""

    name = "errback-follows"

    def __init__(self, site: str = "", dead: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.site, self.dead = site, dead

    async def start(self) -> Any:
        yield scrapy.Request(self.dead, errback=self.failed, dont_filter=True)

    def failed(self, failure: Any) -> Any:
        for path in ("a", "b", "c", "b", "c#x"):
            yield scrapy.Request(self.site + path)
        yield {"id": "errback"}


def test_links_an_errback_yields_are_each_fetched_once(local: Backend) -> None:
    # Scrapy passes a download error's errback output straight to the engine,
    # past every spider middleware (ClaimBatch too): each request is claimed as
    # the scheduler takes it, one ledger call each. Nothing lost or fetched
    # twice: a repeat, or a link /a also has, is a duplicate of the chunk's.
    with SiteServer(TinySite()) as server:
        dead = f"http://127.0.0.1:{closed_port()}/"
        result = run_chunk(
            ErrbackFollows, {"site": server.url, "dead": dead}, None, crawl=local.crawl,
            run_id=RUN, chunk_id="0", pages_per_chunk=50, time_left=20.0,
        )  # fmt: skip
        hits = server.hits
    assert result.errors == [] and result.pending == []
    # Its errback handled the dead host's failure, as in Scrapy: not kept.
    assert result.given_up == []
    assert Counter(item["id"] for item in result.items) == Counter(
        {"errback": 1, "a": 1, "b": 1, "c": 1}
    )
    assert {k: hits[k] for k in ("/a", "/b", "/c")} == {"/a": 1, "/b": 1, "/c": 1}


# -- a page that redirects to itself -------------------------------------------------


class SelfRedirect(TinySite):
    """``/a`` links to ``/self`` and ``/b``; ``/self`` answers 301 → ``/self``."""

    def respond(self, key: str, host: str, hit: int) -> Reply:
        if key == "/self":
            return Reply(301, (("Location", f"http://{host}/self"),), b"moved")
        if key == "/a":
            hrefs = '<a href="/self">self</a><a href="/b">b</a>'
            body = f'<html><body><article data-id="a">{hrefs}</article></body></html>'
            return Reply(200, (("Content-Type", HTML),), body.encode())
        return super().respond(key, host, hit)


def test_a_page_redirecting_to_itself_is_fetched_once_as_in_scrapy(local: Backend) -> None:
    # Scrapy's dupe filter drops the redirect: its URL's fingerprint was seen
    # (the redirect keeps the source's dont_filter, here False). The redirect
    # carries its source's claim, which is its own fingerprint: it passed for a
    # retry of the page and was fetched again, up to REDIRECT_MAX_TIMES (21 hits).
    with SiteServer(SelfRedirect()) as server:
        items = crawl(local, Follow, frontier(Follow, [scrapy.Request(server.url + "a")]))
        hits = server.hits
    assert hits["/self"] == 1, dict(hits)
    assert items == Counter({"a": 1, "b": 1})
