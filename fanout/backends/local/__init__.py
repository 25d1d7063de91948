"""The local backend: a SQLite database (queue and ledger) and a directory (objects),
both under one home directory shared by every worker process on the machine."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from fanout.backends.base import Backend
from fanout.backends.local.crawlstate import SQLiteCrawlState
from fanout.backends.local.db import Database
from fanout.backends.local.ledger import SQLiteLedger
from fanout.backends.local.queue import SQLiteQueue
from fanout.backends.local.store import DirStore
from fanout.errors import UserError

#: The layout of a home's database this fanout writes (``PRAGMA user_version``;
#: 0 is a home made before it was stamped, of this layout). A later fanout that
#: changes the layout raises it, and this one refuses such a home.
HOME_FORMAT = 1


def open_local(home: Path) -> Backend:
    """Open (creating if needed) the local backend under ``home``:
    ``home/fanout.db`` and ``home/store/``.

    Raises:
        UserError: the home was made by a fanout with a newer layout.
    """
    home = Path(home)
    (home / "store").mkdir(parents=True, exist_ok=True)
    db = Database(home / "fanout.db")
    found = db.conn.execute("PRAGMA user_version").fetchone()[0]
    if found > HOME_FORMAT:
        # Used as it was, its rows were not this fanout's: a task insert that
        # broke a new column's NOT NULL was skipped, and `fanout run` waited for ever.
        raise UserError(
            f"cannot use {home} as fanout's home: a newer fanout made it (home format"
            f" {found}; this one knows {HOME_FORMAT}): upgrade fanout, or use another --home"
        )
    backend = Backend(
        "local",
        queue=SQLiteQueue(db),
        store=DirStore(home / "store"),
        ledger=SQLiteLedger(db),
        crawl=SQLiteCrawlState(db),
    )
    if found < HOME_FORMAT:
        with contextlib.suppress(sqlite3.OperationalError):  # (a read-only home stays 0)
            db.conn.execute(f"PRAGMA user_version = {HOME_FORMAT}")
    return backend
