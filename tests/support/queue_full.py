"""``python tests/support/queue_full.py ARGS...`` is ``fanout ARGS...`` whose local
queue fails every receive, and the supervisor's checks (``pending``, which
applies deferred acks, and ``redrive``), as SQLite does on a full disk
("database or disk is full"), while the file named by
``$FANOUT_TEST_QUEUE_FULL`` exists: removing it is freeing the disk. Files
that count the failed calls, one byte each, are kept beside it
(``<flag>.count`` for receives, ``<flag>.checks`` for the supervisor's), so a
test can tell a worker that backs off from one that spins.

Only the process-level tests use it: nothing in ``fanout`` knows about it.
"""

from __future__ import annotations

import os
import sqlite3

from fanout import worker
from fanout.backends.base import Delivery
from fanout.backends.local.queue import SQLiteQueue
from fanout.cli import main

_receive = SQLiteQueue.receive
_pending = SQLiteQueue.pending
_redrive = SQLiteQueue.redrive


def _fail_if_full(counter: str) -> None:
    flag = os.environ.get("FANOUT_TEST_QUEUE_FULL")
    if flag and os.path.exists(flag):
        with open(f"{flag}.{counter}", "ab") as count:
            count.write(b".")
        raise sqlite3.OperationalError("database or disk is full")


def _receive_unless_full(self: SQLiteQueue, max_messages: int, visibility: float) -> list[Delivery]:
    _fail_if_full("count")
    return _receive(self, max_messages, visibility)


def _pending_unless_full(self: SQLiteQueue) -> int:
    _fail_if_full("checks")
    return _pending(self)


def _redrive_unless_full(self: SQLiteQueue, limit: int = 1000) -> int:
    _fail_if_full("checks")
    return _redrive(self, limit)


SQLiteQueue.receive = _receive_unless_full  # type: ignore[method-assign]
# A pool that stops when its work is done gives up after its checks failed this
# long in a row (seconds): a test need not wait the minute a user would.
if os.environ.get("FANOUT_TEST_GIVE_UP_AFTER"):
    worker.GIVE_UP_AFTER = float(os.environ["FANOUT_TEST_GIVE_UP_AFTER"])
SQLiteQueue.pending = _pending_unless_full  # type: ignore[method-assign]
SQLiteQueue.redrive = _redrive_unless_full  # type: ignore[method-assign]

if __name__ == "__main__":
    main(prog_name="fanout")
