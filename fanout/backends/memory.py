"""The memory backend: everything inside this process, for tests.

The queue and ledger are the local backend's SQLite classes on an in-memory
database, so tests exercise the same SQL as production; only the object store
is a dict.
"""

from __future__ import annotations

import io
import shutil
import threading
from collections.abc import Iterator
from typing import BinaryIO

from fanout.backends.base import Backend
from fanout.backends.keys import check_key, check_prefix
from fanout.backends.local.crawlstate import SQLiteCrawlState
from fanout.backends.local.db import Database
from fanout.backends.local.ledger import SQLiteLedger
from fanout.backends.local.queue import SQLiteQueue


class MemoryStore:
    """A :class:`~fanout.backends.base.Store` in a dict, safe to share between threads."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes | BinaryIO, *, if_absent: bool = False) -> bool:
        """Store the object; with ``if_absent``, only if the key does not exist yet.
        Returns whether it wrote."""
        check_key(key)
        if isinstance(data, bytes | bytearray | memoryview):
            blob = bytes(data)
        else:
            # Read outside the lock: the source may be slow (a pipe, a big file).
            buffer = io.BytesIO()
            shutil.copyfileobj(data, buffer)
            blob = buffer.getvalue()
        with self._lock:
            if if_absent and key in self._objects:
                return False
            self._objects[key] = blob
            return True

    def get(self, key: str) -> bytes:
        """The object's bytes; ``KeyError`` if missing."""
        check_key(key)
        with self._lock:
            return self._objects[key]

    def open(self, key: str) -> BinaryIO:
        """A binary file object over a snapshot of the object; ``KeyError`` if missing."""
        return io.BytesIO(self.get(key))

    def exists(self, key: str) -> bool:
        """Whether the key exists."""
        check_key(key)
        with self._lock:
            return key in self._objects

    def list(self, prefix: str) -> Iterator[str]:
        """Keys starting with ``prefix`` (a plain string prefix, as in S3), sorted."""
        check_prefix(prefix)
        with self._lock:
            # A snapshot: callers may put or delete while they iterate.
            keys = sorted(key for key in self._objects if key.startswith(prefix))
        return iter(keys)

    def delete(self, key: str) -> None:
        """Remove the key if present."""
        check_key(key)
        with self._lock:
            self._objects.pop(key, None)

    def url(self, key: str) -> str:
        """A ``memory://`` URL naming the key (for messages only)."""
        return f"memory://{check_key(key)}"

    def close(self) -> None:
        """Nothing to release: the objects live as long as the store does."""


def open_memory() -> Backend:
    """A fresh backend whose queue, store and ledger live in this process only."""
    db = Database(":memory:")
    return Backend(
        "memory",
        queue=SQLiteQueue(db),
        store=MemoryStore(),
        ledger=SQLiteLedger(db),
        # Not shared across processes: crawl jobs refuse it, but its calls work.
        crawl=SQLiteCrawlState(db),
    )
