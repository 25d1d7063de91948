"""The test sites themselves: their expectations hold under plain Scrapy.

The crawl engine's tests compare fanout against ``TrapSite.expected_items`` and
``BookSite.expected_books``; these tests check those expectations against the
sites' own graphs and against a plain Scrapy crawl (``tests/bench/plain_scrapy.py``).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from random import Random
from typing import Any
from urllib.parse import urlsplit

import fastavro
import pytest
from scrapy.http import HtmlResponse, Request

from bench.plain_scrapy import crawl_plain
from jobs.site_crawl import BooksSpider
from support import make_site
from support.sites import ROBOTS_PATH, BookSite, SiteServer, TrapSite, TrapSpider, expected_books

ROOT = Path(__file__).resolve().parents[1]
DEMO_SITE = ROOT / "jobs" / "site"
DEMO_LAYOUT = {"pages": 30, "per_page": 5, "pages_per_category": 2}  # see make_site.py


def _server_threads() -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith("site-server") or "process_request_thread" in t.name
    ]


@pytest.fixture(autouse=True)
def no_server_left() -> Iterator[None]:
    """Every server a test starts is stopped, its threads joined, by the end of the test."""
    before = set(_server_threads())
    yield
    assert set(_server_threads()) <= before


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET on a kept-alive connection: (status, headers, body)."""
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), response.read()


# --- the trap site: its graph ------------------------------------------------------------


def test_trap_site_size_and_shape() -> None:
    site = TrapSite()
    assert 60 <= len(site.pages) <= 120
    for limit in range(1, 8):
        model = site.model(limit)
        assert "orphan" not in model.items
        chain = {i for i in model.items if i.startswith("chain-")}
        assert chain == {f"chain-{n}" for n in range(1, limit + 1)}
        assert max(model.depth.values()) == limit
    # Every link leads to a page of the site, an intended 404 or the chain.
    for key in site.pages:
        for target in site.links(key):
            assert (site.page(target) is None) == (target in site.missing), (key, target)
    assert site.expected_items(2) < site.expected_items(3) < site.expected_items(4)


def test_trap_site_expectations_do_not_depend_on_crawl_order() -> None:
    site = TrapSite()
    for limit in range(1, 7):
        reference = site.model(limit)
        for seed in range(50):
            shuffled = site.model(limit, Random(seed))
            assert shuffled.items == reference.items, (limit, seed)
            assert shuffled.fetched == reference.fetched, (limit, seed)
            assert shuffled.depth == reference.depth, (limit, seed)


def test_trap_site_rejects_unlimited_depth() -> None:
    with pytest.raises(ValueError):
        TrapSite().expected_items(0)


# --- the trap site: the server -----------------------------------------------------------


def test_trap_server_replies() -> None:
    with SiteServer(TrapSite()) as server:
        assert server.url.startswith("http://127.0.0.1:")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            status, headers, body = get(conn, "/")
            assert status == 200 and headers["Content-Type"].startswith("text/html")
            assert int(headers["Content-Length"]) == len(body)
            assert get(conn, "/flaky")[0] == 500
            assert get(conn, "/flaky")[0] == 200
            status, headers, _ = get(conn, "/go/start")
            assert (status, headers["Location"]) == (301, "/go/next")
            status, headers, _ = get(conn, "/go/next")
            assert status == 302
            assert headers["Location"] == f"http://127.0.0.1:{server.port}/redirected/target"
            status, _, body = get(conn, "/missing/page")
            assert status == 404 and b"/orphan" in body
            assert get(conn, "/chain/12345")[2].count(b'href="12346"') == 1
            assert get(conn, "/chain/0")[0] == 404
            status, headers, body = get(conn, "/img/cover-1.png")
            assert headers["Content-Type"] == "image/png" and body.startswith(b"\x89PNG")
            assert get(conn, "/files/catalog.pdf")[2].startswith(b"%PDF")
            assert get(conn, "/notes.txt")[1]["Content-Type"].startswith("text/plain")
            assert get(conn, "/api/data.json")[1]["Content-Type"] == "application/json"
            get(conn, "/shared?view=full&id=1")
            get(conn, "/shared?id=1&view=full")
            start = time.monotonic()
            assert get(conn, "/slow")[0] == 200
            assert time.monotonic() - start >= TrapSite.SLOW_SECONDS
        finally:
            conn.close()
        hits = server.hits
        assert hits["/flaky"] == 2
        assert hits["/shared?id=1&view=full"] == 2  # one counter for both query orders
        assert hits["/never"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("depth_limit", [2, 4])
def test_trap_site_expectations_hold_under_plain_scrapy(depth_limit: int) -> None:
    site = TrapSite()
    stats: dict[str, Any] = {}
    with SiteServer(site) as server:
        pages, items, _ = crawl_plain(
            TrapSpider, server.url, 8, {"DEPTH_LIMIT": depth_limit}, stats=stats
        )
        hits = server.hits
    ids = Counter(item["id"] for item in items)
    assert set(ids) == site.expected_items(depth_limit)
    assert max(ids.values()) == 1, "an item yielded twice"
    assert {item["id"]: item["title"] for item in items} == site.expected_titles(depth_limit)
    del hits[ROBOTS_PATH]
    assert set(hits) == site.expected_fetches(depth_limit)
    assert hits.pop(TrapSite.FLAKY) == 2  # a 500, retried once
    assert set(hits.values()) == {1}, "a normal page fetched twice"
    assert set(hits) <= site.normal_paths | {f"/chain/{n}" for n in range(1, depth_limit + 1)}
    # response_received_count misses the responses a downloader middleware turned
    # into a new request: the retried 500 and the two redirect hops.
    assert pages == sum(hits.values()) + 2 - 3
    assert stats["retry/count"] == 1
    assert stats["request_depth_max"] == depth_limit


# --- the book site -----------------------------------------------------------------------


def test_book_site_serves_every_page() -> None:
    site = BookSite(pages=60)
    assert len(site.crawl_paths) == 60 == site.layout.pages
    with SiteServer(site) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            for path in sorted(site.crawl_paths):
                status, headers, body = get(conn, path)
                assert status == 200, path
                assert headers["Content-Type"] == "text/html; charset=utf-8"
                assert b"</html>" in body
            assert get(conn, "/index.html")[2] == get(conn, "/")[2]
            assert get(conn, "/catalogue/book_0/index.html")[0] == 404
        finally:
            conn.close()
        assert sum(server.hits.values()) == 60 + 3


def test_book_layout() -> None:
    for pages in (3, 30, 200, 5000):
        layout = make_site.layout(pages)
        assert layout.pages == pages
        assert sum(len(page.books) for page in layout.catalogue) == len(layout.books)
        assert max(page.number for page in layout.catalogue) <= 10  # depth stays <= 11
    assert {len(page.books) for page in make_site.layout(5000).catalogue} == {19, 20}
    assert len(expected_books(5000)) == 4760


def test_demo_site_is_the_generator_output() -> None:
    expected = make_site.render_site(make_site.layout(**DEMO_LAYOUT))
    files = {
        "/" + path.relative_to(DEMO_SITE).as_posix(): path.read_bytes()
        for path in DEMO_SITE.rglob("*")
        if path.is_file()
    }
    assert files == expected
    assert sum(map(len, files.values())) < 200_000


def test_example_spider_selectors_on_the_demo_site() -> None:
    """The spider's callbacks, offline, on the shipped HTML files."""
    spider = BooksSpider(start_url="http://127.0.0.1:8000/")
    base = "http://127.0.0.1:8000"
    home = HtmlResponse(f"{base}/", body=(DEMO_SITE / "index.html").read_bytes(), encoding="utf-8")
    to_visit = [home]
    books: dict[str, dict[str, Any]] = {}
    seen = {"/"}
    while to_visit:
        response = to_visit.pop()
        for request in spider.parse(response):
            assert isinstance(request, Request)
            path = urlsplit(request.url).path
            assert path not in seen
            seen.add(path)
            page = HtmlResponse(
                request.url, body=(DEMO_SITE / path.lstrip("/")).read_bytes(), encoding="utf-8"
            )
            if request.callback == spider.parse_book:
                (record,) = spider.parse_book(page)
                assert record.pop("url") == request.url
                books[path] = record
            else:
                to_visit.append(page)
    assert books == expected_books(**DEMO_LAYOUT)
    assert len(seen) == DEMO_LAYOUT["pages"]


def test_book_schema_accepts_the_records() -> None:
    raw = json.loads((ROOT / "schemas" / "book.avsc").read_text())
    assert f"{raw['namespace']}.{raw['name']}" == "fanout.examples.book"
    schema = fastavro.parse_schema(raw)
    for path, record in expected_books(200).items():
        fastavro.validation.validate({"url": f"http://127.0.0.1:8000{path}", **record}, schema)


@pytest.mark.slow
def test_example_spider_under_plain_scrapy() -> None:
    site = BookSite(pages=200)
    with SiteServer(site) as server:
        url = server.url
        pages, items, seconds = crawl_plain(BooksSpider, url, 16)
        hits = server.hits
    assert pages == 200
    assert seconds > 0
    by_path = {}
    for item in items:
        parts = urlsplit(item.pop("url"))
        assert f"{parts.scheme}://{parts.netloc}/" == url
        by_path[parts.path] = item
    assert len(by_path) == len(items)
    assert by_path == site.expected_books()
    assert set(hits) == site.crawl_paths
    assert set(hits.values()) == {1}
