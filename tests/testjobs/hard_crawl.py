"""Crawl jobs for the hostile site of ``tests/support/hardsite.py`` (``tests/test_crawl_hard.py``),
one per attribute, loaded as ``hard_crawl.py:NAME``. Every spider is plain
Scrapy, nothing fanout-specific inside it; ``CrawlJob`` wraps it:

* ``tutorial``: a tutorial-style ``scrapy.Spider`` (``start_urls``, follow every
  link), ``CONCURRENT_REQUESTS`` 16, ``DEPTH_LIMIT`` 30, ``RETRY_TIMES`` 3;
* ``rules``: a ``CrawlSpider`` whose ``rules`` (a ``LinkExtractor``) follow the pages;
* ``sitemap``: a ``SitemapSpider`` reading ``/sitemap_index.xml``;
* ``polite``: ``CONCURRENT_REQUESTS_PER_DOMAIN`` 2, ``DOWNLOAD_DELAY`` 0.2 s
  (not randomized: plain Scrapy spreads it over 0.5-1.5x, so only a fixed delay
  can be asserted), ``ROBOTSTXT_OBEY``;
* ``crawl_delay``: like ``polite`` but with no ``DOWNLOAD_DELAY``: the site's
  robots.txt ``Crawl-delay`` is what must space the requests;
* ``limited``: ``tutorial`` with ``CLOSESPIDER_ITEMCOUNT``/``PAGECOUNT`` from
  the environment (``HARD_CLOSE_ITEMS``, ``HARD_CLOSE_PAGES``);
* ``held_start``: ``tutorial`` behind a downloader middleware that holds the
  start URL's answer until just past the chunk's cut-off.

Spiders get the site as a spider argument (``-p start_url=...``). Settings a
test varies come from the environment at import, as ``trap_crawl.py`` does:
``HARD_DELAY`` (``DOWNLOAD_DELAY`` of ``polite``), ``HARD_PER_DOMAIN``
(``CONCURRENT_REQUESTS_PER_DOMAIN`` of ``polite``/``crawl_delay``),
``HARD_PAGES_PER_CHUNK`` (every job; ``-S pages_per_chunk=N`` overrides it).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import scrapy
from scrapy.http import Response, TextResponse
from scrapy.linkextractors import LinkExtractor
from scrapy.spiders import CrawlSpider, Rule, SitemapSpider

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the CLI's workers: make fanout importable from a checkout
    sys.path.append(str(ROOT))

from fanout.crawl import CrawlJob  # noqa: E402

SCHEMA = {
    "type": "record",
    "name": "hard_item",
    "fields": [{"name": "id", "type": "string"}, {"name": "title", "type": ["null", "string"]}],
}
PAGES_PER_CHUNK = int(os.environ.get("HARD_PAGES_PER_CHUNK", "100"))
#: Quick retries: the tests wait for chunks, not for back-off.
FAST_RETRY = {"backoff_base": 0.05, "backoff_cap": 0.2}


def page_item(response: Response) -> Iterator[dict[str, Any]]:
    """The item of an item page (``<article class="page" data-id=...>``), if any."""
    article = response.css("article.page")
    if article:
        yield {"id": article.attrib["data-id"], "title": article.css("h1::text").get()}


class Tutorial(scrapy.Spider):
    """As the Scrapy tutorial writes a spider: ``start_urls``, ``parse`` yields
    the page's item and follows every link."""

    name = "tutorial"
    custom_settings = {"CONCURRENT_REQUESTS": 16, "DEPTH_LIMIT": 30, "RETRY_TIMES": 3}

    def __init__(self, start_url: str = "http://127.0.0.1:8000/", *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.start_urls = [start_url]

    def parse(self, response: Response, **kwargs: Any) -> Any:
        """The page's item, and a request for every link."""
        yield from page_item(response)
        if isinstance(response, TextResponse):
            yield from response.follow_all(css="a")


class Rules(CrawlSpider):
    """A ``CrawlSpider``: one rule follows every page link and parses it."""

    name = "rules"
    custom_settings = {"CONCURRENT_REQUESTS": 16, "DEPTH_LIMIT": 30, "RETRY_TIMES": 3}
    rules = (
        Rule(
            LinkExtractor(allow=(r"/p/\d+", r"/q\?", r"/old/\d+", r"/chain/\d+/")),
            callback="parse_page",
            follow=True,
        ),
    )

    def __init__(self, start_url: str = "http://127.0.0.1:8000/", *args: Any, **kwargs: Any):
        self.start_urls = [start_url]
        super().__init__(*args, **kwargs)

    def parse_page(self, response: Response) -> Iterator[dict[str, Any]]:
        """An item page: its item."""
        yield from page_item(response)


class Sitemap(SitemapSpider):
    """A ``SitemapSpider``: the sitemap index, its sitemaps, then every page listed."""

    name = "sitemap"
    custom_settings = {"CONCURRENT_REQUESTS": 16, "RETRY_TIMES": 3}
    sitemap_rules = [("", "parse_page")]

    def __init__(self, start_url: str = "http://127.0.0.1:8000/", *args: Any, **kwargs: Any):
        self.sitemap_urls = [start_url.rstrip("/") + "/sitemap_index.xml"]
        super().__init__(*args, **kwargs)

    def parse_page(self, response: Response) -> Iterator[dict[str, Any]]:
        """An item page: its item."""
        yield from page_item(response)


class Polite(Tutorial):
    """The tutorial spider with per-domain politeness set, as a careful user would."""

    name = "polite"
    custom_settings = {
        "CONCURRENT_REQUESTS": 16,
        "CONCURRENT_REQUESTS_PER_DOMAIN": int(os.environ.get("HARD_PER_DOMAIN", "2")),
        "DOWNLOAD_DELAY": float(os.environ.get("HARD_DELAY", "0.2")),
        "RANDOMIZE_DOWNLOAD_DELAY": False,
        "ROBOTSTXT_OBEY": True,
        "DEPTH_LIMIT": 30,
        "RETRY_TIMES": 3,
    }


class CrawlDelay(Tutorial):
    """Obeys robots.txt and sets no delay of its own: the site's ``Crawl-delay``
    is the only thing that spaces its requests."""

    name = "crawl-delay"
    custom_settings = {
        "CONCURRENT_REQUESTS": 16,
        "CONCURRENT_REQUESTS_PER_DOMAIN": int(os.environ.get("HARD_PER_DOMAIN", "2")),
        "ROBOTSTXT_OBEY": True,
        "DEPTH_LIMIT": 30,
    }


class Limited(Tutorial):
    """The tutorial spider with Scrapy's ``CLOSESPIDER_*`` limits, from the
    environment: ``HARD_CLOSE_ITEMS`` (ITEMCOUNT), ``HARD_CLOSE_PAGES`` (PAGECOUNT)."""

    name = "limited"
    custom_settings = {
        **Tutorial.custom_settings,
        "CLOSESPIDER_ITEMCOUNT": int(os.environ.get("HARD_CLOSE_ITEMS", "0")),
        "CLOSESPIDER_PAGECOUNT": int(os.environ.get("HARD_CLOSE_PAGES", "0")),
    }


class HoldStartAnswer:
    """A downloader middleware that answers asynchronously, as a user's may (a
    lookup, a rate limiter): it holds the start URL's answer until just past the
    chunk's cut-off (read from the chunk's settings, so the timing holds on a
    loaded machine), then lets it on to the spider."""

    def process_response(self, request: Any, response: Response, spider: Any = None) -> Any:
        if urlsplit(request.url).path not in ("", "/"):
            return response  # not the site's root
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        from fanout.crawl.channel import CHUNK

        wait = max(0.0, float(CHUNK["cut_at"]) + 0.3 - time.monotonic())
        return deferLater(reactor, wait, lambda: response)


class HeldStart(Tutorial):
    """The tutorial spider behind :class:`HoldStartAnswer`."""

    name = "held-start"
    custom_settings = {**Tutorial.custom_settings, "DOWNLOADER_MIDDLEWARES": {HoldStartAnswer: 543}}


#: The first pause before a site is asked again (a throttled site, a given-up
#: page's next round): short for tests, measurable (tests/test_crawl_given_up.py);
#: shorter still where a test only needs the pauses over (``HARD_THROTTLE_BASE``).
THROTTLE_BASE = float(os.environ.get("HARD_THROTTLE_BASE", "1.0"))


def _job(spider: type[Any], name: str) -> CrawlJob:
    return CrawlJob(
        spider, schema=SCHEMA, name=name, pages_per_chunk=PAGES_PER_CHUNK,
        throttle_base=THROTTLE_BASE, **FAST_RETRY,
    )  # fmt: skip


tutorial = _job(Tutorial, "hard-tutorial")
rules = _job(Rules, "hard-rules")
sitemap = _job(Sitemap, "hard-sitemap")
polite = _job(Polite, "hard-polite")
crawl_delay = _job(CrawlDelay, "hard-crawl-delay")
limited = _job(Limited, "hard-limited")
held_start = _job(HeldStart, "hard-held-start")
