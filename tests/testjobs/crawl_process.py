"""Crawl jobs for the process-level crawl tests (``tests/test_crawl_process.py``),
one per attribute, loaded as ``crawl_process.py:NAME``:

* ``books``: the example ``BooksSpider`` (``jobs/site_crawl.py``) as is, in
  chunks of 40 pages;
* ``stalling``: the same spider, but the callback of the book page at
  ``stall_path`` hangs while the file ``marker`` exists (it removes it first):
  the chunk overruns its hard timeout once;
* ``failing``: the same spider, but the callback of the book page at
  ``fail_path`` raises;
* ``unkeepable``: the same spider, but its book links (or only the one to
  ``-p only=<path>``) carry what a chunk cannot hand on (``-p how=callback``: a
  lambda callback; ``how=meta``: a set in meta);
* ``carrying``: the same spider, but each book link carries what the catalogue
  page knew as a Scrapy ``Item`` in ``meta`` and a dataclass in ``cb_kwargs``
  (Scrapy's "pass the item on" pattern), across chunk boundaries;
* ``half_start``: the same spider, but its ``start()`` raises after its first request;
* ``closing_start``: the same spider, but its ``start()`` raises ``CloseSpider``;
* ``throttled``: the trap spider with Scrapy's retries off, with a small
  ``throttle_base``, for a site that answers 503 for a while;
* ``reordering``: a spider that takes another path on a retry (see
  ``Reordering``), one request at a time, in chunks of 2 pages.

Spiders get their settings as spider arguments (``-p start_url=...``), as
``scrapy crawl -a`` passes them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scrapy import Field, Item, Request
from scrapy.exceptions import CloseSpider
from scrapy.http import Response

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "tests"):  # the CLI's workers: make jobs/ and tests/ importable
    if str(path) not in sys.path:
        sys.path.append(str(path))

from fanout.crawl import CrawlJob  # noqa: E402
from jobs.site_crawl import BooksSpider  # noqa: E402
from support.sites import TrapSpider  # noqa: E402

BOOK_SCHEMA = str(ROOT / "schemas" / "book.avsc")
ITEM_SCHEMA = {
    "type": "record",
    "name": "page_item",
    "fields": [{"name": "id", "type": "string"}, {"name": "title", "type": ["null", "string"]}],
}
#: Quick retries: the tests wait for chunks, not for back-off.
FAST_RETRY = {"backoff_base": 0.05, "backoff_cap": 0.2}


class StallingBooks(BooksSpider):
    """Hangs (blocking the reactor, as a buggy callback would) in the callback of
    the book page at ``stall_path`` while ``marker`` exists; removes it first, so
    only the first attempt hangs. Writes its pid to ``marker + ".pid"``."""

    name = "stalling-books"

    def __init__(
        self, marker: str = "", stall_path: str = "", stall: str = "60", *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.marker = marker
        self.stall_path = stall_path
        self.stall = float(stall)

    def parse_book(self, response: Response) -> Iterator[dict[str, Any]]:
        if self.marker and urlsplit(response.url).path == self.stall_path:
            try:
                os.remove(self.marker)
            except FileNotFoundError:
                pass
            else:
                Path(self.marker + ".pid").write_text(str(os.getpid()))
                time.sleep(self.stall)
        yield from super().parse_book(response)


class FailingBooks(BooksSpider):
    """Raises in the callback of the book page at ``fail_path``."""

    name = "failing-books"

    def __init__(self, fail_path: str = "", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_path = fail_path

    def parse_book(self, response: Response) -> Iterator[dict[str, Any]]:
        if urlsplit(response.url).path == self.fail_path:
            raise ValueError(f"a bug in the spider, on {self.fail_path}")
        yield from super().parse_book(response)


class ClosingBooks(BooksSpider):
    """Closes the spider (``CloseSpider("enough")``) in the callback of the book
    page at ``close_path``, as a spider that found what it came for does."""

    name = "closing-books"

    def __init__(self, close_path: str = "", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.close_path = close_path

    def parse_book(self, response: Response) -> Iterator[dict[str, Any]]:
        if urlsplit(response.url).path == self.close_path:
            raise CloseSpider("enough")
        yield from super().parse_book(response)


class UnkeepableBooks(BooksSpider):
    """Follows book links with what a chunk cannot hand on: ``how=callback``, a
    callback that is not a spider method (a lambda); ``how=meta``, a set in
    ``meta``. Scrapy fetches such requests in one process; a chunk boundary
    needs them as data."""

    name = "unkeepable-books"

    def __init__(self, how: str = "callback", only: str = "", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.how = how
        self.only = only  # a URL path: only the link to that book (default: every one)

    def parse(self, response: Response, **kwargs: Any) -> Iterator[Request]:
        for request in super().parse(response, **kwargs):
            mine = not self.only or urlsplit(request.url).path == self.only
            if request.callback == self.parse_book and mine:
                if self.how == "callback":
                    request = request.replace(callback=lambda r: self.parse_book(r))
                else:
                    request = request.replace(meta={**request.meta, "seen": {response.url}})
            yield request


class Listing(Item):
    """What a catalogue page knows of a book it links to."""

    listed_on = Field()
    position = Field()
    url = Field()  # filled on the book page
    title = Field()


@dataclass
class Seen:
    """Where the crawl was when it found the link."""

    depth: int
    listed_at: float


LISTING_SCHEMA = {
    "type": "record",
    "name": "listed_book",
    "fields": [
        {"name": "url", "type": "string"},
        {"name": "title", "type": "string"},
        {"name": "listed_on", "type": "string"},
        {"name": "position", "type": "int"},
        {"name": "depth", "type": "int"},
    ],
}


class CarryingBooks(BooksSpider):
    """Passes a ``Listing`` item in ``meta`` and a ``Seen`` dataclass in
    ``cb_kwargs`` from each catalogue page to its book pages, and yields the
    item, completed, from the book page."""

    name = "carrying-books"

    def parse(self, response: Response, **kwargs: Any) -> Iterator[Request]:
        position = 0
        for request in super().parse(response, **kwargs):
            if request.callback == self.parse_book:
                position += 1
                listing = Listing(listed_on=response.url, position=position)
                seen = Seen(depth=response.meta.get("depth", 0), listed_at=time.time())
                request = request.replace(
                    meta={**request.meta, "listing": listing}, cb_kwargs={"seen": seen}
                )
            yield request

    def parse_book(self, response: Response, seen: Seen | None = None) -> Iterator[Any]:  # type: ignore[override]
        listing = response.meta["listing"]
        assert isinstance(listing, Listing) and isinstance(seen, Seen), (listing, seen)
        for book in super().parse_book(response):
            listing["url"] = book["url"]
            listing["title"] = book["title"]
            yield {**dict(listing), "depth": seen.depth}


class HalfStart(BooksSpider):
    """Its start yields the home page, then raises (a bug after the first
    request): Scrapy logs the error and crawls what came before it."""

    name = "half-start"

    async def start(self) -> Any:
        yield Request(self.start_urls[0], callback=self.parse)
        raise ValueError("a bug in start(), after its first request")


class ClosingStart(BooksSpider):
    """Its start stops the crawl at once, the Scrapy way (``CloseSpider``)."""

    name = "closing-start"

    async def start(self) -> Any:
        raise CloseSpider("nothing to do today")
        yield  # an async generator, as start() is


class NoRetries(TrapSpider):
    """Follows every link; Scrapy's own retry is off, so a 503 reaches fanout."""

    name = "no-retries"
    custom_settings = {"RETRY_TIMES": 0, "DEPTH_LIMIT": 3}


books = CrawlJob(BooksSpider, schema=BOOK_SCHEMA, name="books", pages_per_chunk=40, **FAST_RETRY)
stalling = CrawlJob(
    StallingBooks, schema=BOOK_SCHEMA, name="stalling", pages_per_chunk=15, **FAST_RETRY
)
failing = CrawlJob(
    FailingBooks, schema=BOOK_SCHEMA, name="failing", pages_per_chunk=15, **FAST_RETRY
)
closing = CrawlJob(
    ClosingBooks, schema=BOOK_SCHEMA, name="closing-books", pages_per_chunk=15, **FAST_RETRY
)
unkeepable = CrawlJob(
    UnkeepableBooks, schema=BOOK_SCHEMA, name="unkeepable", pages_per_chunk=15, **FAST_RETRY
)


class PoliteUnkeepableBooks(UnkeepableBooks):
    """The same, with a download delay: a chunk's lease on the site is exclusive."""

    name = "polite-unkeepable-books"
    custom_settings = {**BooksSpider.custom_settings, "DOWNLOAD_DELAY": 0.02}


closing_start = CrawlJob(ClosingStart, schema=BOOK_SCHEMA, name="closing", pages_per_chunk=40)
half_start = CrawlJob(HalfStart, schema=BOOK_SCHEMA, name="half-start", pages_per_chunk=40)
polite_unkeepable = CrawlJob(
    PoliteUnkeepableBooks, schema=BOOK_SCHEMA, name="polite", pages_per_chunk=4, **FAST_RETRY
)
carrying = CrawlJob(
    CarryingBooks, schema=LISTING_SCHEMA, name="carrying", pages_per_chunk=15, **FAST_RETRY
)
throttled = CrawlJob(
    NoRetries,
    schema=ITEM_SCHEMA,
    name="throttled",
    pages_per_chunk=50,
    throttle_base=float(os.environ.get("THROTTLE_BASE", "0.5")),
    **FAST_RETRY,
)


class Reordering(TrapSpider):
    """Follows links one request at a time; ``/p`` first on the first attempt
    (while ``marker`` exists), last otherwise, as a change in timing or in the
    site could have it. The first attempt hangs as it closes (``closed``)."""

    name = "reordering"
    custom_settings = {"CONCURRENT_REQUESTS": 1, "DEPTH_LIMIT": 3}

    def __init__(self, marker: str = "", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.marker = marker

    def _first(self) -> bool:
        return bool(self.marker) and os.path.exists(self.marker)

    def parse(self, response: Response, **kwargs: Any) -> Any:
        for thing in super().parse(response, **kwargs):
            if isinstance(thing, Request) and urlsplit(thing.url).path == "/p":
                thing = thing.replace(priority=1 if self._first() else -1)
            yield thing

    def closed(self, reason: str) -> None:
        if self._first():
            os.remove(self.marker)
            time.sleep(60)


reordering = CrawlJob(Reordering, schema=ITEM_SCHEMA, name="reordering", pages_per_chunk=2)
