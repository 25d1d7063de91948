"""Schedules in the local backend's SQLite database (beside the queue and ledger).

Two tables: ``schedules`` (one row per schedule, its definition as JSON) and
``schedule_ticks`` (one row per claimed tick). A claim is ``INSERT OR IGNORE``
on the primary key ``(name, tick)`` inside a write transaction, so of two
scheduler processes evaluating the same tick exactly one inserts the row and
fires it.
"""

from __future__ import annotations

import builtins
import sqlite3
import threading
import weakref
from datetime import UTC, datetime

from fanout.backends.local.db import Database
from fanout.errors import UserError
from fanout.schedules.model import KEEP_TICKS, Schedule, TickClaim
from fanout.schedules.spec import as_utc

#: One statement each: they run inside a write transaction (``executescript``
#: would commit whatever transaction is open on the connection first).
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS schedule_ticks (
    name TEXT NOT NULL,
    tick INTEGER NOT NULL,
    claimed_at REAL NOT NULL,
    settled INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, tick)
)""",
)


def _seconds(when: datetime) -> int:
    return int(as_utc(when).timestamp())


#: The databases (of this process) whose schedule tables exist: the DDL runs once
#: per database, not per store (a fire message opens a store each).
_READY: weakref.WeakSet[Database] = weakref.WeakSet()
_READY_LOCK = threading.Lock()


def _create_tables(db: Database) -> None:
    with _READY_LOCK:
        if db in _READY:
            return
        # Under the database's write lock, as one transaction: the memory
        # backend's connection is shared by all threads, and DDL outside the
        # lock would land in (or commit) another thread's transaction.
        with db.write() as conn:
            for statement in SCHEMA:
                conn.execute(statement)
            columns = {r[1] for r in conn.execute("PRAGMA table_info(schedule_ticks)")}
            if "settled" not in columns:  # a database of an older fanout: its claims stand
                conn.execute(
                    "ALTER TABLE schedule_ticks ADD COLUMN settled INTEGER NOT NULL DEFAULT 1"
                )
            # Tables of these names that are not fanout's (another tool's database)
            # fail here, when the store opens, not in the middle of a command.
            conn.execute("SELECT name, definition FROM schedules LIMIT 0")
            conn.execute("SELECT name, tick, claimed_at, settled FROM schedule_ticks LIMIT 0")
        _READY.add(db)


class SQLiteScheduleStore:
    """A :class:`~fanout.schedules.model.ScheduleStore` on the backend's database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        _create_tables(db)

    def add(self, schedule: Schedule) -> None:
        """Create the schedule; :class:`UserError` if the name is taken."""
        try:
            with self.db.write() as conn:
                conn.execute(
                    "INSERT INTO schedules (name, definition) VALUES (?, ?)",
                    (schedule.name, schedule.model_dump_json()),
                )
                # A schedule removed and added again starts with no claims.
                conn.execute("DELETE FROM schedule_ticks WHERE name = ?", (schedule.name,))
        except sqlite3.IntegrityError:
            raise UserError(
                f"schedule {schedule.name!r} exists (`fanout schedule remove {schedule.name}`"
                " first)"
            ) from None

    def get(self, name: str) -> Schedule | None:
        """The schedule, or None."""
        row = self.db.conn.execute(
            "SELECT definition FROM schedules WHERE name = ?", (name,)
        ).fetchone()
        return Schedule.model_validate_json(row["definition"]) if row else None

    def list(self) -> list[Schedule]:
        """Every schedule, by name."""
        rows = self.db.conn.execute("SELECT definition FROM schedules ORDER BY name").fetchall()
        return [Schedule.model_validate_json(r["definition"]) for r in rows]

    def remove(self, name: str) -> bool:
        """Delete the schedule and its claimed ticks; whether it existed."""
        with self.db.write() as conn:
            gone = conn.execute("DELETE FROM schedules WHERE name = ?", (name,)).rowcount
            conn.execute("DELETE FROM schedule_ticks WHERE name = ?", (name,))
        return bool(gone)

    def claim_tick(self, name: str, tick: datetime) -> bool:
        """True for exactly one caller per ``(name, tick)``."""
        seconds = _seconds(tick)
        with self.db.write() as conn:
            claimed = conn.execute(
                "INSERT OR IGNORE INTO schedule_ticks (name, tick, claimed_at, settled)"
                " VALUES (?, ?, ?, 0)",
                (name, seconds, datetime.now(UTC).timestamp()),
            ).rowcount
            if claimed:
                # Old claims go, but never the latest one up to now, nor the one
                # before this tick: the next pass counts missed ticks from there,
                # also when this claim is released (its submit failed).
                now = int(datetime.now(UTC).timestamp())
                conn.execute(
                    "DELETE FROM schedule_ticks WHERE name = ? AND tick < ? AND tick <"
                    " (SELECT MAX(tick) FROM schedule_ticks WHERE name = ? AND tick <= ?"
                    " AND tick < ?)",
                    (name, now - int(KEEP_TICKS.total_seconds()), name, now, seconds),
                )
        return bool(claimed)

    def release_tick(self, name: str, tick: datetime) -> None:
        """Forget the claim of ``tick``, so a later pass fires it again."""
        with self.db.write() as conn:
            conn.execute(
                "DELETE FROM schedule_ticks WHERE name = ? AND tick = ?", (name, _seconds(tick))
            )

    def last_tick(self, name: str, at_or_before: datetime | None = None) -> datetime | None:
        """The latest claimed tick (at or before ``at_or_before``), or None."""
        sql = "SELECT MAX(tick) AS tick FROM schedule_ticks WHERE name = ?"
        args: list[object] = [name]
        if at_or_before is not None:
            sql += " AND tick <= ?"
            args.append(_seconds(at_or_before))
        row = self.db.conn.execute(sql, args).fetchone()
        if row is None or row["tick"] is None:
            return None
        return datetime.fromtimestamp(row["tick"], UTC)

    def settle_tick(self, name: str, tick: datetime) -> None:
        """Mark the claimed ``tick`` as dealt with."""
        with self.db.write() as conn:
            conn.execute(
                "UPDATE schedule_ticks SET settled = 1 WHERE name = ? AND tick = ?",
                (name, _seconds(tick)),
            )

    def unsettled_ticks(self, name: str, claimed_before: datetime) -> builtins.list[datetime]:
        """Claimed, never settled, claimed before ``claimed_before``; oldest first."""
        rows = self.db.conn.execute(
            "SELECT tick FROM schedule_ticks WHERE name = ? AND settled = 0 AND claimed_at < ?"
            " ORDER BY tick",
            (name, as_utc(claimed_before).timestamp()),
        ).fetchall()
        return [datetime.fromtimestamp(r["tick"], UTC) for r in rows]

    def tick_claim(self, name: str, tick: datetime) -> TickClaim | None:
        """The claim of ``tick``, or None if unclaimed."""
        row = self.db.conn.execute(
            "SELECT claimed_at, settled FROM schedule_ticks WHERE name = ? AND tick = ?",
            (name, _seconds(tick)),
        ).fetchone()
        if row is None:
            return None
        return TickClaim(datetime.fromtimestamp(row["claimed_at"], UTC), bool(row["settled"]))

    def close(self) -> None:
        """Nothing to release: the database belongs to the backend."""
