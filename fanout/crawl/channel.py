"""What a crawl chunk's process shares between its Scrapy components: the
chunk's context and the pipe to the worker (one JSON line per event)."""

from __future__ import annotations

import json
from typing import IO, Any, Self

from scrapy.exceptions import NotConfigured

#: The pipe to the parent process, set by the chunk's entry point.
CHANNEL: IO[str] | None = None
#: The chunk's context: run id, chunk id, attempt token, deadlines, ledger,
#: store, and the components that other components need (book, gate).
CHUNK: dict[str, Any] = {}


def send(kind: str, value: Any) -> None:
    """One event to the parent."""
    assert CHANNEL is not None, "not inside a fanout crawl chunk"
    CHANNEL.write(json.dumps({kind: value}, separators=(",", ":")) + "\n")


class InChunk:
    """Base of fanout's Scrapy components: built from the crawler, as Scrapy
    builds its own, and only inside a crawl chunk (``NotConfigured`` anywhere
    else: the same spider under plain Scrapy runs without them)."""

    def __init__(self, crawler: Any) -> None:
        if not CHUNK:
            raise NotConfigured
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Any) -> Self:
        return cls(crawler)
