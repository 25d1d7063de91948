"""A spider that closes itself (``CloseSpider``) ends the crawl, as in Scrapy,
and so the whole run: the chunk notes it and tells its parent, which stops
the run (``CrawlJob``), and hands nothing on (``ChunkScheduler.close``).
Only a ``CloseSpider`` the spider raised does: Scrapy's other closes
(``CLOSESPIDER_*`` settings, its memory limit, an error in ``start()``) and
fanout's own (a chunk's share fetched, its time up) are one chunk's."""

from __future__ import annotations

from typing import Any

from scrapy import Spider
from scrapy.exceptions import CloseSpider

from fanout.crawl.channel import CHUNK, InChunk, send

#: Where the chunk notes the reason of a ``CloseSpider`` its spider raised.
SPIDER_CLOSED = "spider_closed"


def spider_closed_itself(reason: str) -> None:
    """The spider raised ``CloseSpider(reason)``: the crawl ends, and the run
    with it (the parent's ``CrawlJob`` stops it). Said once, at once: the
    chunk may be closing already (its share fetched), and Scrapy then drops
    the spider's own close."""
    if SPIDER_CLOSED not in CHUNK:
        CHUNK[SPIDER_CLOSED] = reason
        send("closed", reason)


class CloseWatch(InChunk):
    """Spider middleware nearest the spider: sees a ``CloseSpider`` a callback
    raised (:func:`spider_closed_itself`), then lets Scrapy close as it does."""

    def process_spider_exception(
        self, response: Any, exception: Exception, spider: Spider | None = None
    ) -> None:
        if isinstance(exception, CloseSpider):
            spider_closed_itself(str(exception.reason))
