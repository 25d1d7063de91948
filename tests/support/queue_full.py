"""``python tests/support/queue_full.py ARGS...`` is ``fanout ARGS...`` whose local
queue fails every receive, as SQLite does on a full disk ("database or disk is
full"), while the file named by ``$FANOUT_TEST_QUEUE_FULL`` exists: removing it
is freeing the disk. A file that counts the failed receives, one byte each, is
kept beside it (``<flag>.count``), so a test can tell a worker that backs off
from one that spins.

Only the process-level tests use it: nothing in ``fanout`` knows about it.
"""

from __future__ import annotations

import os
import sqlite3

from fanout.backends.base import Delivery
from fanout.backends.local.queue import SQLiteQueue
from fanout.cli import main

_receive = SQLiteQueue.receive


def _receive_unless_full(self: SQLiteQueue, max_messages: int, visibility: float) -> list[Delivery]:
    flag = os.environ.get("FANOUT_TEST_QUEUE_FULL")
    if flag and os.path.exists(flag):
        with open(f"{flag}.count", "ab") as count:
            count.write(b".")
        raise sqlite3.OperationalError("database or disk is full")
    return _receive(self, max_messages, visibility)


SQLiteQueue.receive = _receive_unless_full  # type: ignore[method-assign]

if __name__ == "__main__":
    main(prog_name="fanout")
