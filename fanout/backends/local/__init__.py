"""The local backend: a SQLite database (queue and ledger) and a directory (objects),
both under one home directory shared by every worker process on the machine."""

from __future__ import annotations

from pathlib import Path

from fanout.backends.base import Backend
from fanout.backends.local.crawlstate import SQLiteCrawlState
from fanout.backends.local.db import Database
from fanout.backends.local.ledger import SQLiteLedger
from fanout.backends.local.queue import SQLiteQueue
from fanout.backends.local.store import DirStore


def open_local(home: Path) -> Backend:
    """Open (creating if needed) the local backend under ``home``:
    ``home/fanout.db`` and ``home/store/``."""
    home = Path(home)
    (home / "store").mkdir(parents=True, exist_ok=True)
    db = Database(home / "fanout.db")
    return Backend(
        "local",
        queue=SQLiteQueue(db),
        store=DirStore(home / "store"),
        ledger=SQLiteLedger(db),
        crawl=SQLiteCrawlState(db),
    )
