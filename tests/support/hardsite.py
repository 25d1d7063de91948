"""A hostile loopback site for the crawl tests of issue 9, and a server that
records how politely it was crawled.

``HardSite(pages=1200)`` is a site of ``pages`` item pages, 8 links a page, with
the traps a real crawl meets and a tutorial spider does not expect:

* the same page linked in several spellings: ``/p/N``, ``/p/N#top``,
  ``http://HOST/p/N#x``; query pages ``/q?id=N&view=full`` also linked as
  ``/q?view=full&id=N#c`` (one page under Scrapy's fingerprint);
* ``/old/N`` answering 301 → ``/p/N`` (both spellings are linked), a few
  ``/chain/N/a`` 302 → ``/chain/N/b`` 301 → ``/p/N`` chains;
* flaky pages (every 13th) answering 500 twice, then 200; a few ``/old/N``
  redirect sources answering 500 once before their 301 (a retried redirect
  source: Scrapy's retry copy carries ``dont_filter`` on to the target);
* every item page yields one item (``id``, ``title``); ``/`` is a hub with none.

The graph is a tree of fan-out 3 (page ``N``'s children are ``3N+3 .. 3N+5``,
``/`` links to pages 0-2), so every page is reachable from ``/`` within depth
~log3(pages) (7 for 1,200 pages, far under a ``DEPTH_LIMIT`` of 30), plus 5
links a page to pseudo-random other pages (a fixed seed): cross links and
cycles. No page links back to ``/``: a ``start_urls`` spider's start request
is ``dont_filter`` and Scrapy itself would fetch ``/`` again.

``HardSite(hosts=2)`` spreads the pages over host names: page ``N`` is linked
as ``http://<host N % hosts>:PORT/...``, with host 0 ``127.0.0.1`` and host 1
``localhost`` (one server, two domains to Scrapy: its download slots are per
host name). ``robots`` (``/robots.txt``) allows all, with an optional
``Crawl-delay``.

``/sitemap_index.xml`` lists ``/sitemaps/K.xml`` (``sitemaps`` of them), which
list every page between them (some twice, in another spelling, and some through
their ``/old/N`` redirect), for a ``SitemapSpider``.

Serve it with ``HardServer``: a ``SiteServer`` with a configurable listen
backlog (``backlog=5`` is the realistic hard case: a burst of new connections
overflows it and the kernel drops SYNs, retransmitted after 1 s) and a
``Politeness`` recorder (per host name: most requests in flight at once,
shortest gap between two request starts, per-path counts)::

    with HardServer(HardSite(300), backlog=5) as server:
        crawl(server.url)
        assert server.politeness.max_in_flight["127.0.0.1"] <= 2
"""

from __future__ import annotations

import contextlib
import html
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from random import Random
from typing import Any

from support.sites import HTML, NOT_FOUND, Reply, SiteServer, _Handler, _HTTPServer, canonical

HOSTS = ("127.0.0.1", "localhost")
#: Written where a link's origin goes; replaced by ``http://HOST:PORT`` when served.
ORIGIN = "@@ORIGIN{}@@"
LINKS_PER_PAGE = 8
FANOUT = 3  # tree children of a page; the other links are cross links


@dataclass(frozen=True)
class HardPage:
    """One item page: its canonical key, item id and title, and hrefs as written."""

    number: int
    key: str
    item_id: str
    title: str
    hrefs: tuple[str, ...]


class HardSite:
    """See the module docstring. Every expectation is computed from the graph."""

    FLAKY_EVERY = 13  # pages N with N % 13 == 7 answer 500 twice, then 200
    FLAKY_FAILURES = 2
    OLD_EVERY = 11  # pages N with N % 11 == 5 are also linked as /old/N (301)
    OLD_FLAKY_EVERY = 3  # of those, every 3rd /old/N answers 500 once first
    CHAIN_EVERY = 97  # pages N with N % 97 == 41 are also linked via a 2-hop chain
    QUERY_EVERY = 7  # pages N with N % 7 == 3 live at /q?id=N&view=full

    def __init__(
        self,
        pages: int = 1200,
        *,
        hosts: int = 1,
        crawl_delay: float | None = None,
        sitemaps: int = 6,
        delay: float = 0.0,
        traps: bool = True,
        seed: int = 9,
    ) -> None:
        if pages < FANOUT or not 1 <= hosts <= len(HOSTS):
            raise ValueError(f"need pages >= {FANOUT} and 1 <= hosts <= {len(HOSTS)}")
        self.size = pages
        self.hosts = hosts
        self.crawl_delay = crawl_delay
        self.sitemaps = sitemaps
        self.delay = delay  # seconds every reply waits: a real site is not instant
        self.traps = traps  # False: no 500s, redirects or alternative spellings
        self.rng = Random(seed)
        self.pages: dict[str, HardPage] = {}
        self.redirects: dict[str, str] = {}  # source key → target key (one hop)
        self.bodies: dict[str, bytes] = {}
        self._build()

    # -- the graph ------------------------------------------------------------------------

    def key_of(self, n: int) -> str:
        """Page ``n``'s canonical key (path and sorted query)."""
        if self.traps and n % self.QUERY_EVERY == 3:
            return f"/q?id={n}&view=full"
        return f"/p/{n}"

    def is_flaky(self, key: str) -> bool:
        """Answers 500 before 200 (or before its 301, for an ``/old/N``)."""
        return key in self._flaky

    def failures(self, key: str) -> int:
        """How many 500s ``key`` answers before its real reply."""
        return self._flaky.get(key, 0)

    def _host(self, n: int) -> int:
        return n % self.hosts

    def _href(self, target: int, spelling: int) -> str:
        """A link to page ``target``, in one of several spellings."""
        origin = ORIGIN.format(self._host(target))
        key = self.key_of(target)
        if not self.traps:
            return origin + key
        if key.startswith("/q?"):
            return origin + (key if spelling % 2 else f"/q?view=full&id={target}#c")
        if target % self.CHAIN_EVERY == 41 and spelling % 3 == 0:
            return f"{origin}/chain/{target}/a"
        if target % self.OLD_EVERY == 5 and spelling % 2 == 0:
            return f"{origin}/old/{target}"
        return origin + (key, f"{key}#top", f"{key}#x{spelling}")[spelling % 3]

    def _build(self) -> None:
        self._flaky: dict[str, int] = {}
        links: dict[int, list[int]] = {}
        for n in range(self.size):
            children = [c for c in range(FANOUT * n + 3, FANOUT * n + 3 + FANOUT) if c < self.size]
            cross = [self.rng.randrange(self.size) for _ in range(LINKS_PER_PAGE - len(children))]
            links[n] = children + cross
        home = [ORIGIN.format(self._host(n)) + self.key_of(n) for n in range(FANOUT)]
        home += [self._href(self.rng.randrange(self.size), s) for s in range(LINKS_PER_PAGE - 3)]
        self.bodies["/"] = self._render("Hard site home", home, None)
        for n in range(self.size):
            key = self.key_of(n)
            hrefs = tuple(self._href(t, n + i) for i, t in enumerate(links[n]))
            page = HardPage(n, key, f"p-{n}", f"Page {n}", hrefs)
            self.pages[key] = page
            self.bodies[key] = self._render(page.title, hrefs, page.item_id)
            if not self.traps:
                continue
            if n % self.FLAKY_EVERY == 7:
                self._flaky[key] = self.FLAKY_FAILURES
            if n % self.OLD_EVERY == 5:
                self.redirects[f"/old/{n}"] = key
                if (n // self.OLD_EVERY) % self.OLD_FLAKY_EVERY == 0:
                    self._flaky[f"/old/{n}"] = 1
            if n % self.CHAIN_EVERY == 41:
                self.redirects[f"/chain/{n}/a"] = f"/chain/{n}/b"
                self.redirects[f"/chain/{n}/b"] = key

    @staticmethod
    def _render(title: str, hrefs: Any, item_id: str | None) -> bytes:
        links = "\n".join(
            f'    <li><a href="{html.escape(h)}">link {i}</a></li>' for i, h in enumerate(hrefs)
        )
        inner = f"  <h1>{html.escape(title)}</h1>\n  <ul>\n{links}\n  </ul>"
        if item_id is None:
            body = f'<main class="hub">\n{inner}\n</main>'
        else:
            body = f'<article class="page" data-id="{item_id}">\n{inner}\n</article>'
        return (
            f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title></head>\n<body>\n{body}\n</body>\n</html>\n"
        ).encode()

    # -- expectations ---------------------------------------------------------------------

    def expected_items(self) -> set[str]:
        """The item ids a correct crawl from ``/`` (or of the sitemaps) yields: all."""
        return {page.item_id for page in self.pages.values()}

    @property
    def normal_paths(self) -> set[str]:
        """Keys a correct crawl requests exactly once: ``/`` and the pages that
        never answer 500 (redirect sources and flaky pages are not included)."""
        return {"/"} | {key for key in self.pages if key not in self._flaky}

    @property
    def flaky_pages(self) -> dict[str, int]:
        """Item pages answering 500 first → the requests a correct crawl makes
        (the 500s, retried, and the 200)."""
        return {k: n + 1 for k, n in self._flaky.items() if k in self.pages}

    def redirect_target(self, key: str) -> str:
        """Where a redirect source leads in the end (the item page)."""
        while key in self.redirects:
            key = self.redirects[key]
        return key

    def sitemap_locs(self, index: int) -> list[str]:
        """The ``<loc>`` values (with ``ORIGIN`` placeholders) of ``/sitemaps/<index>.xml``."""
        locs = []
        for n in range(index, self.size, self.sitemaps):
            locs.append(ORIGIN.format(self._host(n)) + self.key_of(n))
            if self.traps and n % 10 == 0:  # the same page again, spelt otherwise
                target = (n + 1) % self.size
                locs.append(self._href(target, target + 1))
        return locs

    # -- serving --------------------------------------------------------------------------

    def _origins(self, host: str) -> list[tuple[bytes, bytes]]:
        port = host.rpartition(":")[2]
        return [
            (ORIGIN.format(i).encode(), f"http://{name}:{port}".encode())
            for i, name in enumerate(HOSTS[: self.hosts])
        ]

    def _fill(self, body: bytes, host: str) -> bytes:
        for placeholder, origin in self._origins(host):
            body = body.replace(placeholder, origin)
        return body

    def robots(self) -> bytes:
        """``/robots.txt``: allow all, with ``Crawl-delay`` when set."""
        text = "User-agent: *\nAllow: /\n"
        if self.crawl_delay is not None:
            text += f"Crawl-delay: {self.crawl_delay:g}\n"
        return text.encode()

    def _sitemap_index(self, host: str) -> bytes:
        origin = f"http://{host}"
        entries = "".join(
            f"<sitemap><loc>{origin}/sitemaps/{i}.xml</loc></sitemap>" for i in range(self.sitemaps)
        )
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{entries}'
            "</sitemapindex>\n"
        ).encode()

    def _sitemap(self, index: int, host: str) -> bytes:
        urls = "".join(
            f"<url><loc>{html.escape(loc)}</loc></url>\n" for loc in self.sitemap_locs(index)
        )
        return self._fill(
            (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">\n{urls}</urlset>\n'
            ).encode(),
            host,
        )

    def respond(self, key: str, host: str, hit: int) -> Reply:
        """The reply for a canonical key (see ``sites.Site``)."""
        reply = self._respond(key, host, hit)
        return reply._replace(delay=self.delay) if self.delay else reply

    def _respond(self, key: str, host: str, hit: int) -> Reply:
        xml = (("Content-Type", "application/xml"),)
        if key == "/robots.txt":
            return Reply(200, (("Content-Type", "text/plain"),), self.robots())
        if key == "/sitemap_index.xml":
            return Reply(200, xml, self._sitemap_index(host))
        if key.startswith("/sitemaps/") and key.endswith(".xml"):
            number = key[len("/sitemaps/") : -len(".xml")]
            if number.isdigit() and int(number) < self.sitemaps:
                return Reply(200, xml, self._sitemap(int(number), host))
            return NOT_FOUND
        if hit <= self._flaky.get(key, 0):
            return Reply(500, (("Content-Type", HTML),), b"<p>Server error, try again</p>")
        if key in self.redirects:
            status = 302 if key.endswith("/a") else 301
            target = self.redirects[key]
            n = self.pages[self.redirect_target(key)].number
            location = f"http://{HOSTS[self._host(n)]}:{host.rpartition(':')[2]}{target}"
            return Reply(status, (("Content-Type", HTML), ("Location", location)), b"Moved")
        body = self.bodies.get(key)
        if body is None:
            return NOT_FOUND
        return Reply(200, (("Content-Type", HTML),), self._fill(body, host))


# --- the recording server ----------------------------------------------------------------


@dataclass
class Politeness:
    """Per host name (the Host header without its port): most requests in flight
    at once, shortest gap between the arrivals of two consecutive requests, and
    request counts per path (``/robots.txt`` included).

    A request's arrival is when its first byte reached this machine's kernel
    (``SO_TIMESTAMPNS``), not when a handler thread got round to reading it: on
    a loaded machine accepting a connection and starting its thread takes tens
    of milliseconds, which would show as gaps shorter than the client left."""

    max_in_flight: Counter[str] = field(default_factory=Counter)
    hits: dict[str, Counter[str]] = field(default_factory=dict)
    starts: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    _in_flight: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self, host: str, key: str, arrival: float | None = None) -> None:
        """A request for ``key`` on ``host`` has been read; it arrived at ``arrival``
        (``time.time()`` seconds; now if not known)."""
        arrived = time.time() if arrival is None else arrival
        with self._lock:
            self._in_flight[host] += 1
            self.max_in_flight[host] = max(self.max_in_flight[host], self._in_flight[host])
            self.starts.setdefault(host, []).append((arrived, key))
            self.hits.setdefault(host, Counter())[key] += 1

    def end(self, host: str) -> None:
        """The reply to a request on ``host`` is about to be written."""
        with self._lock:
            self._in_flight[host] -= 1

    def _arrivals(self, host: str, skip: str | None) -> list[float]:
        with self._lock:
            return sorted(t for t, key in self.starts.get(host, []) if key != skip)

    @property
    def min_gap(self) -> dict[str, float]:
        """Host → the shortest gap (s) between two consecutive arrivals."""
        return {
            host: min((b - a for a, b in pairwise(self._arrivals(host, None))), default=0.0)
            for host in list(self.starts)
        }

    def short_gaps(self, host: str, below: float, skip: str | None = None) -> list[float]:
        """Gaps (s) between consecutive request arrivals on ``host`` shorter than
        ``below``, leaving out requests for the path ``skip`` (e.g. ``/robots.txt``)."""
        arrivals = self._arrivals(host, skip)
        return [round(b - a, 4) for a, b in pairwise(arrivals) if b - a < below]


#: Linux's socket option (and control message) for a nanosecond receive
#: timestamp on each segment; Python's socket module does not name it.
SO_TIMESTAMPNS = 35


class _RecordingHandler(_Handler):
    """``sites._Handler`` that tells the server's ``Politeness`` when a request
    arrived and started, and when it ended (its reply is about to be written).

    Unbuffered reads (``rbufsize = 0``), so that before each request the
    handler can peek at the socket for the kernel's arrival stamp of its first
    byte: a buffered reader could already hold it (the clients here do not
    pipeline requests, so it never holds a whole next request)."""

    server: _BacklogServer
    rbufsize = 0
    arrival: float | None = None

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def handle_one_request(self) -> None:
        self.arrival = self._next_arrival()
        super().handle_one_request()

    def _next_arrival(self) -> float | None:
        """Wait for the next request's first byte; when the kernel received it
        (None at end of stream or on error: the base class then finds that too)."""
        try:
            data, ancillary, _, _ = self.connection.recvmsg(
                1, socket.CMSG_SPACE(16), socket.MSG_PEEK
            )
        except OSError:
            return None
        if not data:
            return None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= 16:
                seconds, nanoseconds = struct.unpack("qq", payload[:16])
                return float(seconds + nanoseconds / 1e9)
        return time.time()

    def _answer(self) -> Reply:
        # The request's end is recorded before its reply is written: once
        # written, the client may send its next request before this thread runs
        # again, and a late end would count one in flight too many.
        header = self.headers.get("Host", "")
        host = header.rpartition(":")[0] or header
        politeness = self.server.owner.politeness
        politeness.begin(host, canonical(self.path), self.arrival)
        try:
            return super()._answer()
        finally:
            politeness.end(host)


class _BacklogServer(_HTTPServer):
    owner: HardServer

    def __init__(self, address: tuple[str, int], owner: HardServer) -> None:
        # The listen backlog: socketserver passes it to listen() when it binds.
        self.request_queue_size = owner.backlog
        super().__init__(address, owner)
        self.RequestHandlerClass = _RecordingHandler


@dataclass
class HardServer(SiteServer):
    """A ``SiteServer`` with a listen ``backlog`` of its own and a ``politeness``
    recorder. ``url_for(i)`` is the root URL under host name ``HOSTS[i]``."""

    backlog: int = 128
    politeness: Politeness = field(default_factory=Politeness, init=False)

    def _bind(self) -> _BacklogServer:
        """The listening server, with this server's backlog and recorder."""
        return _BacklogServer((self.host, self.port), self)

    def start(self) -> HardServer:
        """Bind (with the backlog) and serve; returns self."""
        super().start()
        return self

    def __enter__(self) -> HardServer:
        return self.start()

    def url_for(self, host: int) -> str:
        """The root URL under host name ``HOSTS[host]`` (same server, same port)."""
        return f"http://{HOSTS[host]}:{self.port}/"
