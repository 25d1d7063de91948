"""Test web sites for the crawl engine, served on 127.0.0.1 by a background thread.

Two sites, each a plain object that answers requests from precomputed bodies:

* ``TrapSite``: ~100 pages made to trip a crawler up (link cycles, duplicate
  links written differently, redirects, 404s, a flaky 500, a slow page, binary
  and non-HTML files, an endless link chain). ``expected_items(depth_limit)``
  is the exact set of item ids a correct crawl from ``/`` yields.
* ``BookSite``: a books.toscrape-like catalogue of ``pages`` pages for the crawl
  benchmark and the example spider (``jobs/site_crawl.py``); the same HTML as
  the shipped demo site ``jobs/site/``.

Serve one with ``SiteServer``::

    with SiteServer(TrapSite()) as server:       # or SiteServer(site).start() ... .stop()
        crawl(server.url)                        # http://127.0.0.1:PORT/
        assert server.hits["/flaky"] == 2        # per-path request counts

From the command line (127.0.0.1 only), for demos::

    python -m tests.support.sites --site books --pages 5000 --port 8000
    python tests/support/sites.py --site trap --port 8001
"""

from __future__ import annotations

import argparse
import contextlib
import html
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from random import Random
from socketserver import BaseServer
from types import TracebackType
from typing import Any, NamedTuple, Protocol
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

import scrapy
from scrapy.http import HtmlResponse, Response

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # run as a script: make the support package importable
    sys.path.append(str(TESTS))

from support import make_site  # noqa: E402

HTML = "text/html; charset=utf-8"
ROBOTS_PATH = "/robots.txt"  # served (allow all) by both sites; not part of any expectation
ROBOTS_TXT = b"User-agent: *\nAllow: /\n"


def canonical(url: str) -> str:
    """A URL's path and query as a hit-counter key: fragment dropped, query sorted.

    ``/p?b=2&a=1#x`` → ``/p?a=1&b=2``: the same page under Scrapy's request
    fingerprint (which canonicalizes URLs the same way).
    """
    parts = urlsplit(url)
    path = parts.path or "/"
    if not parts.query:
        return path
    query = urlencode(sorted(parse_qsl(parts.query, keep_blank_values=True)))
    return f"{path}?{query}" if query else path


class Reply(NamedTuple):
    """A response: status, headers (Content-Length is added), body, delay before sending."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    delay: float = 0.0


class Site(Protocol):
    """What ``SiteServer`` serves: a reply for a canonical path, given its hit number."""

    def respond(self, key: str, host: str, hit: int) -> Reply:
        """The reply to the ``hit``-th request (1-based) for ``key``, with the Host header."""
        ...


def _page(title: str, body: str) -> bytes:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n  <meta charset="utf-8">\n'
        f"  <title>{html.escape(title)}</title>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    ).encode()


def _not_found_body() -> bytes:
    # A crawler must not parse error pages: the only link to /orphan is in them.
    return _page(
        "Not found",
        '<h1>Not found</h1>\n<p>Try the <a href="/orphan">orphan page</a> instead.</p>',
    )


NOT_FOUND = Reply(404, (("Content-Type", HTML),), _not_found_body())


# --- the trap site -----------------------------------------------------------------------


@dataclass
class TrapPage:
    """One fixed resource of the trap site."""

    key: str  # canonical path (and query)
    status: int = 200
    content_type: str = HTML
    body: bytes = b""
    hrefs: tuple[str, ...] = ()  # <a href> values as written in the HTML (200 HTML pages)
    item: tuple[str, str] | None = None  # (id, title) for item pages
    location: str | None = None  # redirect target as written (may be "//HOST/..." absolute)
    redirect_to: str | None = None  # canonical key of the redirect target
    delay: float = 0.0


def _png() -> bytes:
    """A valid 2x2 grey PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0)  # 2x2, 8-bit greyscale
    pixels = zlib.compress(b"\x00\x80\x80" * 2)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


PDF = (
    b"%PDF-1.4\n1 0 obj <</Type /Catalog /Pages 2 0 R>> endobj\n"
    b"2 0 obj <</Type /Pages /Kids [3 0 R] /Count 1>> endobj\n"
    b"3 0 obj <</Type /Page /Parent 2 0 R /MediaBox [0 0 200 200]>> endobj\n"
    b"trailer <</Root 1 0 R>>\n%%EOF\n"
)


@dataclass(frozen=True)
class CrawlModel:
    """What a correct crawl of the trap site does, for one ``DEPTH_LIMIT``."""

    items: dict[str, str]  # item id → title
    fetched: frozenset[str]  # canonical keys requested (each once, /flaky twice)
    depth: dict[str, int]  # canonical key → the depth it is requested at


class TrapSite:
    """A ~100-page site that trips crawlers up; every expectation is computed from its graph.

    Traps, by path (depth from ``/`` in brackets):

    * ``/`` [0] a hub (no item) linking to everything below, to itself (``#main``,
      ``/?``) and in four spellings to the four sections ``/section/<k>/`` [1].
    * ``/section/<k>/`` [1] hubs: 12 items ``/section/<k>/item/<j>`` [2] each
      linked twice, in different spellings (``item/j``, ``./item/j``, an absolute
      path, ``#fragment`` suffixes, whitespace around the href); shared pages
      ``/shared?id=S&view=full`` [2], each linked from two sections with its query
      reordered (``&`` written ``&amp;``); a 404 ``item/99`` [2]; a PDF [2].
    * items link back to their section and home (cycles), to a PNG cover [3],
      and every third one to ``reviews`` [3]; items 6 and 12 of each section have
      a second review page ``reviews?page=2&sort=new`` [4], linked back to itself
      as ``?sort=new&page=2``.
    * ``/cycle/a`` [1] → ``b`` [2] → ``c`` [3] → ``a``, ``b``: a link cycle.
    * ``/go/start`` [1] 301 → ``/go/next`` 302 → ``http://HOST/redirected/target``
      (an item, also linked directly from home, so fetched once in all) → its child.
      A redirect keeps the request's depth (Scrapy semantics).
    * ``/flaky`` [1]: 500 on its first request, 200 after (Scrapy retries 500);
      ``/slow`` [1]: 0.5 s; each has a child item only reachable through it.
    * ``/notes.txt`` (text/plain), ``/api/data.json`` (application/json),
      ``/files/catalog.pdf``, ``/img/cover-<k>.png``: fetched, no item, no links.
    * ``/missing/page``, ``/section/<k>/item/99``: 404. Error pages, the flaky
      500 and the redirect bodies link to ``/orphan``, an item page nothing else
      links to: a crawler that parses them yields ``orphan``.
    * ``/chain/<n>`` [n]: item ``chain-<n>`` linking to ``/chain/<n+1>``, forever;
      only ``DEPTH_LIMIT`` stops it.

    The graph is *graded*: every link leads either one level down or to a page
    already requested on every route to the linking page, so each page has one
    depth whatever order a crawler visits pages in, and the expectations do not
    depend on crawl order or concurrency (``model(..., rng=...)`` checks that).

    Item pages are ``<article class="item" data-id="ID"><h1>TITLE</h1>``; hubs,
    redirects, errors and non-HTML files have none. A start request must be
    filterable (recorded as seen) for ``/`` to be fetched once: Scrapy's default
    ``start()`` yields ``start_urls`` with ``dont_filter=True``, so a spider using
    ``start_urls`` fetches ``/`` again from the first link back to it (see
    ``TrapSpider.start``).
    """

    SECTIONS = 4
    ITEMS_PER_SECTION = 12
    SLOW_SECONDS = 0.5
    FLAKY = "/flaky"
    CHAIN = "/chain/"

    def __init__(self) -> None:
        self.pages: dict[str, TrapPage] = {}
        self.missing: set[str] = {"/missing/page"}  # linked paths that answer 404
        self._build()

    # -- construction ---------------------------------------------------------------------

    def _html(
        self, key: str, title: str, hrefs: Iterable[str], item_id: str | None = None, text: str = ""
    ) -> None:
        hrefs = tuple(hrefs)
        links = "\n".join(
            f'    <li><a href="{html.escape(href)}">link {n}</a></li>'
            for n, href in enumerate(hrefs)
        )
        paragraph = f"  <p>{html.escape(text)}</p>\n" if text else ""
        inner = f"  <h1>{html.escape(title)}</h1>\n{paragraph}  <ul>\n{links}\n  </ul>"
        if item_id is None:
            body = f'<main id="main" class="hub">\n{inner}\n</main>'
        else:
            body = f'<article class="item" data-id="{html.escape(item_id)}">\n{inner}\n</article>'
        self.pages[key] = TrapPage(
            key,
            body=_page(title, body),
            hrefs=hrefs,
            item=(item_id, title) if item_id is not None else None,
        )

    def _file(self, key: str, content_type: str, body: bytes) -> None:
        self.pages[key] = TrapPage(key, content_type=content_type, body=body)

    def _redirect(self, key: str, status: int, location: str) -> None:
        target = canonical(urljoin(key, location.replace("//HOST", "")))
        body = _page("Moved", '<p>Moved; see also the <a href="/orphan">orphan page</a>.</p>')
        self.pages[key] = TrapPage(
            key, status=status, body=body, location=location, redirect_to=target
        )

    def _build(self) -> None:
        n = self.ITEMS_PER_SECTION
        self._html(
            "/",
            "Trap site home",
            [
                "section/1/",
                "/section/2/",
                "./section/3/",
                "section/4/#top",
                "cycle/a",
                "chain/1",
                "go/start",
                "redirected/target",
                "flaky",
                "slow",
                "notes.txt",
                "api/data.json",
                "missing/page",
                "#main",
                "/?",
            ],
            text="Sections, cycles, redirects and other traps.",
        )
        spellings: list[Callable[[int, int], str]] = [
            lambda k, j: f"item/{j}",
            lambda k, j: f"./item/{j}",
            lambda k, j: f"/section/{k}/item/{j}",
            lambda k, j: f"  item/{j}#details\n",
        ]
        for k in range(1, self.SECTIONS + 1):
            previous = (k - 2) % self.SECTIONS + 1  # shared page of the previous section
            hrefs = ["/", "../../", "#list"]
            hrefs += [spellings[j % 4](k, j) for j in range(1, n + 1)]
            hrefs += [f"item/{j}#top" for j in range(1, 4)]  # featured: linked a second time
            hrefs += [f"item/{j}" for j in range(4, n + 1)]
            hrefs += [
                "item/99",
                f"/shared?id={k}&view=full",
                f"/shared?view=full&id={previous}",
                "/files/catalog.pdf",
            ]
            self._html(f"/section/{k}/", f"Section {k}", hrefs)
            self.missing.add(f"/section/{k}/item/99")
            for j in range(1, n + 1):
                base = f"/section/{k}/item/{j}"
                item_hrefs = ["../", "/", f"/img/cover-{k}.png", f"{j}#self"]
                if j % 3 == 0:
                    item_hrefs.append(f"./{j}/reviews")
                self._html(
                    base,
                    f"Section {k} · item {j}",
                    item_hrefs,
                    f"s{k}-i{j}",
                    text=f"Item {j} of section {k}: a stable title and an id.",
                )
                if j % 3 == 0:
                    review_hrefs = [f"../{j}", "/"]
                    if j % 6 == 0:
                        review_hrefs.append("reviews?page=2&sort=new")
                        self._html(
                            f"{base}/reviews?page=2&sort=new",
                            f"Reviews of s{k}-i{j}, page 2",
                            ["reviews", "?sort=new&page=2", "/"],
                            f"s{k}-i{j}-reviews-p2",
                        )
                    self._html(
                        f"{base}/reviews",
                        f"Reviews of s{k}-i{j}",
                        review_hrefs,
                        f"s{k}-i{j}-reviews",
                    )
            self._file(f"/img/cover-{k}.png", "image/png", _png())
            self._html(
                f"/shared?id={k}&view=full",
                f"Shared page {k}: fish & chips",
                ["/", f"/shared?view=full&id={k}#comments"],
                f"shared-{k}",
            )
        self._html("/cycle/a", "Cycle A", ["b", "#self", "/"], "cycle-a")
        self._html("/cycle/b", "Cycle B", ["a", "c"], "cycle-b")
        self._html("/cycle/c", "Cycle C", ["a", "b", "/"], "cycle-c")
        self._redirect("/go/start", 301, "/go/next")
        self._redirect("/go/next", 302, "//HOST/redirected/target")
        self._html("/redirected/target", "Redirect target", ["child", "/"], "redirect-target")
        self._html("/redirected/child", "Redirect child", ["/"], "redirect-child")
        self._html(self.FLAKY, "Flaky page", ["flaky/child", "/"], "flaky")
        self._html("/flaky/child", "Flaky child", ["/"], "flaky-child")
        self._html("/slow", "Slow page", ["slow/child", "/"], "slow")
        self.pages["/slow"].delay = self.SLOW_SECONDS
        self._html("/slow/child", "Slow child", ["/"], "slow-child")
        self._html("/orphan", "Orphan", ["/"], "orphan", text="Only error pages link here.")
        self._file("/notes.txt", "text/plain; charset=utf-8", b"Plain notes; see /orphan.\n")
        self._file(
            "/api/data.json", "application/json", b'{"id": "api-data", "links": ["/orphan"]}\n'
        )
        self._file("/files/catalog.pdf", "application/pdf", PDF)

    # -- the graph ------------------------------------------------------------------------

    @staticmethod
    def _chain_number(key: str) -> int | None:
        rest = key.removeprefix(TrapSite.CHAIN)
        if rest == key or not rest.isdigit() or rest.startswith("0"):
            return None
        return int(rest)

    def _chain_page(self, number: int) -> TrapPage:
        key = f"{self.CHAIN}{number}"
        hrefs = (str(number + 1), f"./{number + 1}#more", "/")
        title = f"Chain link {number}"
        links = "".join(f'<li><a href="{href}">next</a></li>' for href in hrefs)
        body = (
            f'<article class="item" data-id="chain-{number}">'
            f"<h1>{title}</h1><ul>{links}</ul></article>"
        )
        return TrapPage(key, body=_page(title, body), hrefs=hrefs, item=(f"chain-{number}", title))

    def page(self, key: str) -> TrapPage | None:
        """The resource at a canonical key, or None (a 404)."""
        number = self._chain_number(key)
        if number is not None:
            return self._chain_page(number)
        return self.pages.get(key)

    def links(self, key: str) -> list[str]:
        """Canonical keys of the links on a page (empty unless a 200 HTML page)."""
        page = self.page(key)
        if page is None or page.status != 200 or page.content_type != HTML:
            return []
        return [canonical(urljoin(key, href.strip())) for href in page.hrefs]

    def model(self, depth_limit: int, rng: Random | None = None) -> CrawlModel:
        """Simulate a correct crawl from ``/`` with Scrapy's depth and duplicate rules.

        Start request depth 0; a link on a depth-d page is depth d + 1 and dropped
        if deeper than ``depth_limit``; a request already seen is dropped; a
        redirect keeps its request's depth and is itself subject to the seen
        check. Pages are visited breadth-first, or in a random order with ``rng``.
        """
        if depth_limit < 1:
            raise ValueError("depth_limit must be >= 1 (DEPTH_LIMIT=0 means no limit: endless)")
        seen = {"/"}
        depth = {"/": 0}
        frontier: deque[str] = deque(["/"])
        items: dict[str, str] = {}
        fetched: set[str] = set()
        while frontier:
            if rng is None:
                key = frontier.popleft()
            else:
                index = rng.randrange(len(frontier))
                frontier.rotate(-index)
                key = frontier.popleft()
            fetched.add(key)
            page = self.page(key)
            if page is None:
                continue
            if page.redirect_to is not None:
                targets, next_depth = [page.redirect_to], depth[key]
            else:
                if page.item is not None:
                    item_id, title = page.item
                    assert item_id not in items, f"{item_id} yielded twice"
                    items[item_id] = title
                targets, next_depth = self.links(key), depth[key] + 1
            if next_depth > depth_limit:
                continue
            for target in targets:
                if target not in seen:
                    seen.add(target)
                    depth[target] = next_depth
                    frontier.append(target)
        return CrawlModel(items, frozenset(fetched), depth)

    def expected_items(self, depth_limit: int) -> set[str]:
        """Item ids a correct crawl from ``/`` with this ``DEPTH_LIMIT`` yields."""
        return set(self.model(depth_limit).items)

    def expected_titles(self, depth_limit: int) -> dict[str, str]:
        """Item id → title, for the items of ``expected_items(depth_limit)``."""
        return self.model(depth_limit).items

    def expected_fetches(self, depth_limit: int) -> set[str]:
        """Canonical keys (as in ``SiteServer.hits``) such a crawl requests.

        Assumes the spider follows every ``<a href>`` of every 200 HTML page (as
        ``TrapSpider`` does). Each is requested once, except ``/flaky`` (twice: a
        500, retried). ``/robots.txt`` is not included.
        """
        return set(self.model(depth_limit).fetched)

    @property
    def normal_paths(self) -> set[str]:
        """Every fixed path a correct crawler requests at most once: the site's pages
        and linked 404s, all but ``/flaky`` (``/chain/<n>`` pages are not included)."""
        return (set(self.pages) | self.missing) - {self.FLAKY}

    # -- serving --------------------------------------------------------------------------

    def respond(self, key: str, host: str, hit: int) -> Reply:
        """The reply for a canonical key (see ``Site``)."""
        if key == ROBOTS_PATH:
            return Reply(200, (("Content-Type", "text/plain"),), ROBOTS_TXT)
        page = self.page(key)
        if page is None:
            return NOT_FOUND
        if key == self.FLAKY and hit == 1:
            body = _page("Oops", '<p>Server error. Meanwhile: <a href="/orphan">orphan</a>.</p>')
            return Reply(500, (("Content-Type", HTML),), body)
        headers: tuple[tuple[str, str], ...] = (("Content-Type", page.content_type),)
        if page.location is not None:
            headers += (("Location", page.location.replace("//HOST", f"http://{host}")),)
        return Reply(page.status, headers, page.body, page.delay)


class TrapSpider(scrapy.Spider):
    """Follows every link of every HTML page; yields ``{"id", "title"}`` for item pages.

    ``start()`` yields a *filterable* start request (Scrapy's default marks
    ``start_urls`` requests ``dont_filter=True``, which would fetch ``/`` twice).
    """

    name = "trap"

    def __init__(self, start_url: str = "http://127.0.0.1:8001/", *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.start_url = start_url

    async def start(self) -> Any:
        """The start request, subject to the duplicate filter like any other."""
        yield scrapy.Request(self.start_url)

    def parse(self, response: Response, **kwargs: Any) -> Any:
        """An item for an item page, and a request for every link."""
        if not isinstance(response, HtmlResponse):
            return  # binary, text/plain, JSON: fetched, nothing to extract
        item = response.css("article.item")
        if item:
            yield {"id": item.attrib["data-id"], "title": item.css("h1::text").get()}
        yield from response.follow_all(css="a")


# --- the book site -----------------------------------------------------------------------


class HubSite:
    """``/`` links to ``/p/0`` .. ``/p/N-1``, each an item page (``article.page``,
    as ``testjobs/hard_crawl.py`` reads it), a little slow; while ``away``, a
    proxy's 502 for every page (the application behind it restarting)."""

    def __init__(self, pages: int, delay: float = 0.05) -> None:
        self.pages = pages
        self.delay = delay
        self.away = False

    def respond(self, key: str, host: str, hit: int) -> Reply:
        html = (("Content-Type", HTML),)
        if self.away:
            return Reply(502, html, b"<html><body>502 Bad Gateway</body></html>")
        if key == "/":
            links = "".join(f'<a href="/p/{n}">{n}</a>' for n in range(self.pages))
            return Reply(200, html, f"<html><body>{links}</body></html>".encode())
        n = key.rsplit("/", 1)[-1]
        body = f'<html><body><article class="page" data-id="p{n}"><h1>{n}</h1></article>'
        return Reply(200, html, (body + "</body></html>").encode(), delay=self.delay)


class BookSite:
    """A books.toscrape-like site of exactly ``pages`` HTML pages (see ``support.make_site``).

    ``/`` and ``/index.html`` are the home page (the list of categories);
    ``/catalogue/category/<slug>/page-<n>.html`` list ~``per_page`` books and
    link to the next page; ``/catalogue/book_<n>/index.html`` are the books.
    Bodies are rendered once, up front (about 4.6 KB a page on average).
    """

    def __init__(self, pages: int = 5000, per_page: int = 20, pages_per_category: int = 10):
        self.pages = pages
        self.layout = make_site.layout(pages, per_page, pages_per_category)
        headers = (("Content-Type", HTML),)
        self.replies: dict[str, Reply] = {
            path: Reply(200, headers, body)
            for path, body in make_site.render_site(self.layout).items()
        }
        self.replies["/"] = self.replies["/index.html"]
        self.replies[ROBOTS_PATH] = Reply(200, (("Content-Type", "text/plain"),), ROBOTS_TXT)

    @property
    def crawl_paths(self) -> set[str]:
        """The paths a full crawl from ``/`` fetches (``/index.html`` is linked, not followed)."""
        return (
            {"/"}
            | {page.path for page in self.layout.catalogue}
            | {book.path for book in self.layout.books}
        )

    def expected_books(self) -> dict[str, dict[str, Any]]:
        """URL path → the book record the example spider yields (less ``url``)."""
        return {book.path: book.record() for book in self.layout.books}

    def respond(self, key: str, host: str, hit: int) -> Reply:
        """The reply for a canonical key (see ``Site``)."""
        return self.replies.get(key, NOT_FOUND)


def expected_books(
    pages: int, per_page: int = 20, pages_per_category: int = 10
) -> dict[str, dict[str, Any]]:
    """URL path → book record, for ``BookSite(pages, per_page, pages_per_category)``."""
    return make_site.expected_books(pages, per_page, pages_per_category)


# --- the server --------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, Content-Length always set, no logging."""

    protocol_version = "HTTP/1.1"
    server_version = "fanout-test-site/1.0"
    disable_nagle_algorithm = True
    timeout = 120  # seconds an idle keep-alive connection is kept

    server: _HTTPServer

    def do_GET(self) -> None:
        self._reply(send_body=True)

    def do_HEAD(self) -> None:
        self._reply(send_body=False)

    def _reply(self, send_body: bool) -> None:
        self._write(self._answer(), send_body)

    def _answer(self) -> Reply:
        """The site's reply to this request, after its delay."""
        owner = self.server.owner
        key = canonical(self.path)
        reply = owner.site.respond(key, self.headers.get("Host", ""), owner.count(key))
        if reply.delay:
            time.sleep(reply.delay)
        return reply

    def _write(self, reply: Reply, send_body: bool) -> None:
        """Send ``reply``: status, headers, Content-Length, and the body unless HEAD."""
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if send_body:
            self.wfile.write(reply.body)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HTTPServer(ThreadingHTTPServer):
    """Tracks open connections so ``close_connections`` can end keep-alive handlers."""

    daemon_threads = True
    block_on_close = True  # server_close() joins the handler threads
    request_queue_size = 128  # listen backlog: a crawler opens its connections all at once

    def __init__(self, address: tuple[str, int], owner: SiteServer) -> None:
        self.owner = owner
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError | ValueError):  # client went away, or closed at stop
            return
        BaseServer.handle_error(self, request, client_address)


@dataclass
class SiteServer:
    """Serves a site on ``127.0.0.1`` (port 0: the OS picks one) from a background thread.

    ``hits`` counts requests per canonical path (fragment dropped, query sorted).
    ``stop()`` closes open keep-alive connections and joins every thread.
    """

    site: Site
    port: int = 0
    host: str = field(default="127.0.0.1", init=False)
    _hits: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _httpd: _HTTPServer | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def start(self) -> SiteServer:
        """Bind and start serving; returns self."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._httpd = self._bind()
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def _bind(self) -> _HTTPServer:
        """The listening server (a subclass may bind another kind)."""
        return _HTTPServer((self.host, self.port), self)

    def stop(self) -> None:
        """Stop serving, end open connections, join the serving and handler threads."""
        if self._httpd is None:
            return
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> SiteServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The site's root URL, ``http://127.0.0.1:PORT/``."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}/"

    def count(self, key: str) -> int:
        """Record a request for ``key``; returns its hit number (1 for the first)."""
        with self._lock:
            self._hits[key] += 1
            return self._hits[key]

    @property
    def hits(self) -> Counter[str]:
        """A snapshot of the per-path request counts (missing paths count 0)."""
        with self._lock:
            return Counter(self._hits)

    def reset_hits(self) -> None:
        """Forget all counts (the trap site's ``/flaky`` fails again on its next request)."""
        with self._lock:
            self._hits.clear()


def main(argv: list[str] | None = None) -> None:
    """Serve a site on 127.0.0.1 until interrupted."""
    parser = argparse.ArgumentParser(description="Serve a fanout test site on 127.0.0.1.")
    parser.add_argument("--site", choices=["books", "trap"], default="books")
    parser.add_argument("--pages", type=int, default=5000, help="book site: HTML pages in all")
    parser.add_argument("--per-page", type=int, default=20, help="book site: books per page")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    args = parser.parse_args(argv)
    site: Site = BookSite(args.pages, args.per_page) if args.site == "books" else TrapSite()
    server = SiteServer(site, port=args.port).start()
    print(f"serving the {args.site} site at {server.url} (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        print(f"stopped; {sum(server.hits.values()):,} requests served")


if __name__ == "__main__":
    main()
