"""The trap site's plain spider (no fanout code inside it) as a crawl job of
small chunks, so a crawl of ~100 pages crosses many chunk boundaries."""

from __future__ import annotations

import os

from fanout.crawl import CrawlJob
from support.sites import TrapSpider

SCHEMA = {
    "type": "record",
    "name": "trap_item",
    "fields": [{"name": "id", "type": "string"}, {"name": "title", "type": ["null", "string"]}],
}


class DepthLimited(TrapSpider):
    """The trap spider with its depth limit set, as a user would in custom_settings."""

    custom_settings = {"DEPTH_LIMIT": int(os.environ.get("TRAP_DEPTH", "3"))}


job = CrawlJob(
    DepthLimited,
    schema=SCHEMA,
    name="trap",
    pages_per_chunk=int(os.environ.get("TRAP_PAGES_PER_CHUNK", "7")),
    backoff_base=0.05,
    backoff_cap=0.2,
)
