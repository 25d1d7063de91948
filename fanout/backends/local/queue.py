"""A work queue in SQLite with SQS semantics: visibility timeouts, at-least-once.

Every receive hides the messages it returns for ``visibility`` seconds by moving
their ``visible_at`` into the future, in the same statement that picks them, so
two processes can never both hold a message while it is invisible. A message
that is not acknowledged in time becomes visible again and is redelivered with
a higher ``receive_count``; the receipt carries that count, so the first
receiver's late ``ack`` or ``release`` cannot touch the redelivered copy.

Acks are deferred: they are applied inside this process's next receive (or
``pending``/``close``), saving one write transaction per message on the hot
path. That keeps at-least-once delivery: an ack lost with its process only means
a redelivery, which the ledger recognises as a finished task.

**Fair sharing** (:mod:`fanout.fairness`): each message belongs to a group
(its run), and a receive takes from the group served least for its weight
(``queue_groups.served`` counts messages received, divided by the weight), so
a run submitted behind a long one is not stuck behind it. Within a group, the
oldest visible message comes first, as in one plain line.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from fanout.backends.base import Delivery
from fanout.backends.local.db import Database
from fanout.fairness import group_of

# AUTOINCREMENT (not just INTEGER PRIMARY KEY): a plain rowid can be reused
# after the newest row is deleted, and a stale receipt "id:count" could then
# acknowledge a different message that happens to get the same id and count.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body TEXT NOT NULL,
    visible_at REAL NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    sent_at REAL NOT NULL,
    grp TEXT NOT NULL DEFAULT '',
    failures INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_queue_visible ON messages (queue, visible_at);
CREATE TABLE IF NOT EXISTS queue_groups (
    queue TEXT NOT NULL,
    grp TEXT NOT NULL,
    weight REAL NOT NULL DEFAULT 2.0,
    served REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, grp)
) WITHOUT ROWID;
"""
# After the migration below (an older database has no grp column yet).
_GROUP_INDEX = """
CREATE INDEX IF NOT EXISTS messages_group_visible ON messages (queue, grp, visible_at);
"""

_INSERT = (
    "INSERT INTO messages (queue, body, visible_at, receive_count, sent_at, grp)"
    " VALUES (?, ?, ?, 0, ?, ?)"
)
# A group new to the queue starts level with the least served one: no credit
# for having been idle.
_NEW_GROUP = (
    "INSERT OR IGNORE INTO queue_groups (queue, grp, served) VALUES"
    " (?, ?, (SELECT coalesce(min(served), 0) FROM queue_groups WHERE queue = ?))"
)
_GROUPS = "SELECT grp, weight FROM queue_groups WHERE queue = ? ORDER BY served, grp"

# One statement picks and hides: no window between choosing a row and claiming it.
# The (queue, grp, visible_at) index yields a group's rows in (visible_at, id) order.
_RECEIVE = """
UPDATE messages SET visible_at = ?, receive_count = receive_count + 1
WHERE id IN (
    SELECT id FROM messages WHERE queue = ? AND grp = ? AND visible_at <= ?
    ORDER BY visible_at, id LIMIT ?
)
RETURNING id, CAST(body AS BLOB), typeof(body) = 'text', receive_count, sent_at, failures
"""
_SERVED = "UPDATE queue_groups SET served = served + ? WHERE queue = ? AND grp = ?"
# A group with no message left (in flight included) leaves the rota.
_DROP_GROUP = (
    "DELETE FROM queue_groups WHERE queue = ? AND grp = ?"
    " AND NOT EXISTS (SELECT 1 FROM messages WHERE queue = ? AND grp = ?)"
)

_ACK = "DELETE FROM messages WHERE id = ? AND receive_count = ? AND queue = ?"
_RELEASE = "UPDATE messages SET visible_at = ? WHERE id = ? AND receive_count = ? AND queue = ?"
_RELEASE_FAILED = (
    "UPDATE messages SET visible_at = ?, failures = failures + 1"
    " WHERE id = ? AND receive_count = ? AND queue = ?"
)
_PENDING = "SELECT count(*) FROM messages WHERE queue = ?"


class SQLiteQueue:
    """The :class:`~fanout.backends.base.Queue` of the local and memory backends.

    Several logical queues (``name``) can share the one ``messages`` table.
    """

    #: The SQS limit, so the engine's offload-large-messages-to-the-store path
    #: runs locally too.
    max_message_bytes: int = 256 * 1024

    #: Deferred acks are flushed at the latest once this many have built up.
    max_deferred_acks: int = 256

    def __init__(self, db: Database, name: str = "work") -> None:
        self.db = db
        self.name = name
        self._acks: list[tuple[int, int, str]] = []
        self._only: frozenset[str] | None = None
        db.executescript(_SCHEMA)
        _migrate(db)
        db.executescript(_GROUP_INDEX)
        _rejoin_orphans(db)

    def send(self, bodies: Sequence[str], delay: float = 0.0) -> None:
        """Enqueue ``bodies`` in one transaction, visible after ``delay`` seconds.

        Raises ``ValueError`` (and sends nothing) if a body is larger than
        :attr:`max_message_bytes` in UTF-8, as SQS would refuse it.
        """
        if not bodies:
            return
        limit = self.max_message_bytes
        for body in bodies:
            # A str of n characters is at most 4n UTF-8 bytes: only encode the
            # few bodies that could be over the limit (keeps 10k sends cheap).
            if len(body) * 4 > limit and len(body.encode()) > limit:
                raise ValueError(f"message of {len(body.encode())} bytes exceeds {limit} bytes")
        now = time.time()
        visible_at = now + max(delay, 0.0)
        name = self.name
        rows = [(name, body, visible_at, now, group_of(body)) for body in bodies]
        with self.db.write() as conn:
            for group in {row[4] for row in rows}:
                conn.execute(_NEW_GROUP, (name, group, name))
            conn.executemany(_INSERT, rows)

    def set_weight(self, group: str, weight: float) -> None:
        """The weight of ``group`` (a run) in the fair share (:mod:`fanout.fairness`)."""
        name = self.name
        with self.db.write() as conn:
            conn.execute(_NEW_GROUP, (name, group, name))
            conn.execute(
                "UPDATE queue_groups SET weight = ? WHERE queue = ? AND grp = ?",
                (weight, name, group),
            )

    def serve_only(self, groups: frozenset[str] | None) -> None:
        """Receive, and count in :meth:`pending`, only the messages of ``groups``
        (runs; ``""`` for the others) from now on; None: every group
        (:class:`fanout.fairness.GroupFilter`)."""
        self._only = groups

    def serving(self) -> frozenset[str] | None:
        """The groups set by :meth:`serve_only` (None: every group)."""
        return self._only

    def receive(self, max_messages: int, visibility: float) -> list[Delivery]:
        """Up to ``max_messages`` visible messages, hidden for ``visibility``
        seconds: from the group served least for its weight first, oldest first
        within a group. Within one batch, messages come in send order."""
        if max_messages <= 0:
            return []
        now = time.time()
        hidden, name = now + max(visibility, 0.0), self.name
        rows: list[tuple[int, bytes, int, int, float, int]] = []
        with self.db.write() as conn:
            self._flush(conn)
            for group, weight in conn.execute(_GROUPS, (name,)).fetchall():
                if self._only is not None and group not in self._only:
                    continue
                got = conn.execute(
                    _RECEIVE, (hidden, name, group, now, max_messages - len(rows))
                ).fetchall()
                if got:
                    conn.execute(_SERVED, (len(got) / weight, name, group))
                    rows += got
                    if len(rows) >= max_messages:
                        break
                else:
                    conn.execute(_DROP_GROUP, (name, group, name, group))
        # RETURNING has no defined order; the ids are the send order.
        rows.sort(key=lambda row: row[0])
        return [
            Delivery(
                _text(body, is_text),
                f"{id_}:{count}",
                count,
                str(id_),
                sent_at=sent,
                failures=failed,
            )
            for id_, body, is_text, count, sent, failed in rows
        ]

    def ack(self, receipt: str) -> None:
        """Delete the message, unless it was redelivered since ``receipt`` was issued."""
        id_, count = _parse_receipt(receipt)
        self._acks.append((id_, count, self.name))
        if len(self._acks) >= self.max_deferred_acks:
            self.flush()

    def flush(self) -> None:
        """Apply the deferred acks now."""
        if self._acks:
            with self.db.write() as conn:
                self._flush(conn)

    def _flush(self, conn: sqlite3.Connection) -> None:
        if self._acks:
            # Take the list before writing: threads share this queue object, and an
            # ack appended while executemany runs must not be wiped by a clear().
            acks, self._acks = self._acks, []
            try:
                conn.executemany(_ACK, acks)
            except sqlite3.Error:
                # Rolled back (a full disk): kept for the next try, not redelivered.
                self._acks[:0] = acks
                raise

    def release(self, receipt: str, delay: float) -> None:
        """Make the message visible again after ``delay`` seconds, unless it was
        redelivered since ``receipt`` was issued."""
        id_, count = _parse_receipt(receipt)
        visible_at = time.time() + max(delay, 0.0)
        with self.db.write() as conn:
            conn.execute(_RELEASE, (visible_at, id_, count, self.name))

    def release_failed(self, delivery: Delivery, delay: float) -> bool:
        """As :meth:`release`, counting one more failed delivery of the message
        (in place: False)."""
        id_, count = _parse_receipt(delivery.receipt)
        visible_at = time.time() + max(delay, 0.0)
        with self.db.write() as conn:
            conn.execute(_RELEASE_FAILED, (visible_at, id_, count, self.name))
        return False

    def pending(self) -> int:
        """Messages of this queue not yet deleted (visible, delayed or in flight),
        of the groups it serves (see :meth:`serve_only`)."""
        self.flush()
        if self._only is None:
            row = self.db.conn.execute(_PENDING, (self.name,)).fetchone()
        else:
            groups = sorted(self._only)
            marks = ",".join("?" * len(groups))
            sql = f"{_PENDING} AND grp IN ({marks})"  # the (queue, grp, ...) index
            row = self.db.conn.execute(sql, (self.name, *groups)).fetchone()
        return int(row[0])

    def redrive(self, limit: int = 1000) -> int:
        """Nothing to move: this queue never dead-letters (the ledger does)."""
        return 0

    def close(self) -> None:
        """Apply deferred acks; the shared :class:`Database` is closed by the backend."""
        # If the database was closed first, those messages will just be redelivered.
        with contextlib.suppress(sqlite3.ProgrammingError):
            self.flush()


def _migrate(db: Database) -> None:
    """Bring the messages table of an older database up to date: their group
    (made before fair sharing) and their count of failed deliveries (made
    before it was kept apart from the receive count)."""

    def has(conn: sqlite3.Connection, column: str) -> bool:
        return column in {r[1] for r in conn.execute("PRAGMA table_info(messages)")}

    if not has(db.conn, "grp"):
        with db.write() as conn:
            if not has(conn, "grp"):  # else another process migrated it meanwhile
                conn.execute("ALTER TABLE messages ADD COLUMN grp TEXT NOT NULL DEFAULT ''")
                conn.execute(
                    "INSERT OR IGNORE INTO queue_groups (queue, grp)"
                    " SELECT DISTINCT queue, '' FROM messages"
                )
    if not has(db.conn, "failures"):
        with db.write() as conn:
            if not has(conn, "failures"):
                conn.execute("ALTER TABLE messages ADD COLUMN failures INTEGER NOT NULL DEFAULT 0")


# Messages whose group is not in the rota: receive() would never serve them while
# pending() counts them, so a worker told to stop when idle would wait for ever.
# Looked for at every open, so by skip-scan: one index seek per queue and per
# group with messages, not a walk of every message (85 ms at a million).
_FIRST_QUEUE = "SELECT queue FROM messages ORDER BY queue LIMIT 1"
_NEXT_QUEUE = "SELECT queue FROM messages WHERE queue > ? ORDER BY queue LIMIT 1"
_FIRST_GROUP = "SELECT grp FROM messages WHERE queue = ? ORDER BY grp LIMIT 1"
_NEXT_GROUP = "SELECT grp FROM messages WHERE queue = ? AND grp > ? ORDER BY grp LIMIT 1"


def _skip_scan(conn: sqlite3.Connection, first: str, after: str, *key: str) -> list[str]:
    """The distinct values an index yields, one seek each."""
    values: list[str] = []
    row = conn.execute(first, key).fetchone()
    while row is not None:
        values.append(row[0])
        row = conn.execute(after, (*key, row[0])).fetchone()
    return values


def _rejoin_orphans(db: Database) -> None:
    """Put the groups of messages that have none (a database edited by hand, or
    left by a version that dropped a group too early) back in the rota."""
    conn = db.conn
    orphans = []
    for queue in _skip_scan(conn, _FIRST_QUEUE, _NEXT_QUEUE):
        known = {
            g for (g,) in conn.execute("SELECT grp FROM queue_groups WHERE queue = ?", (queue,))
        }
        groups = _skip_scan(conn, _FIRST_GROUP, _NEXT_GROUP, queue)
        orphans += [(queue, group) for group in groups if group not in known]
    if orphans:
        with db.write() as conn:
            conn.executemany(_NEW_GROUP, [(queue, group, queue) for queue, group in orphans])


def _text(body: bytes, is_text: int) -> Any:
    """A message's body as the dispatcher takes it: text, or the bytes of a row
    that is not (written into the table by something other than ``send``: a
    tool, a damaged file), which it dead-letters as "not text". Read as bytes
    and decoded here: SQLite's own decoding of a row that is not UTF-8 failed
    the whole receive, for every message of every run, for ever."""
    if is_text:
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return body


def _parse_receipt(receipt: str) -> tuple[int, int]:
    id_, sep, count = receipt.partition(":")
    if not sep:
        raise ValueError(f"bad receipt {receipt!r}")
    try:
        return int(id_), int(count)
    except ValueError:
        raise ValueError(f"bad receipt {receipt!r}") from None
