"""What a crawl chunk's process shares between its Scrapy components: the
chunk's context and the pipe to the worker (one JSON line per event)."""

from __future__ import annotations

import json
from typing import IO, Any

#: The pipe to the parent process, set by the chunk's entry point.
CHANNEL: IO[str] | None = None
#: The chunk's context: run id, chunk id, attempt token, deadlines, ledger,
#: store, and the components that other components need (book, gate).
CHUNK: dict[str, Any] = {}


def send(kind: str, value: Any) -> None:
    """One event to the parent."""
    assert CHANNEL is not None, "not inside a fanout crawl chunk"
    CHANNEL.write(json.dumps({kind: value}, separators=(",", ":")) + "\n")
