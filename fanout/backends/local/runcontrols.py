"""Run controls in SQLite (mixed into :class:`~fanout.backends.local.ledger.SQLiteLedger`):
a run's control state in a table of its own, changed in one write transaction,
and the cancellation of a run's queued tasks with its counters.

The rules are in :mod:`fanout.controls`; the Protocol is
:class:`fanout.backends.runcontrols.RunControls`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from typing import TypeVar

from fanout.backends.local.db import Database
from fanout.backends.rules import cancel_event
from fanout.backends.runcontrols import ControlState

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run_controls (
    run_id TEXT PRIMARY KEY,
    state TEXT NOT NULL
) WITHOUT ROWID;
"""


class SQLiteRunControls:
    """The :class:`~fanout.backends.runcontrols.RunControls` of a SQLite ledger."""

    db: Database
    #: Whether this object created the table yet (once, on first use: the
    #: ledger's own schema stays the ledger's).
    _controls_ready = False

    def _controls(self) -> None:
        if not self._controls_ready:
            self.db.executescript(_SCHEMA)
            self._controls_ready = True

    def read_control(self, run_id: str) -> ControlState:
        """The run's control state (``{}`` if never set)."""
        self._controls()
        row = self.db.conn.execute(
            "SELECT state FROM run_controls WHERE run_id = ?", (run_id,)
        ).fetchone()
        state: ControlState = json.loads(row[0]) if row else {}
        return state

    def change_control(self, run_id: str, change: Callable[[ControlState], T]) -> T:
        """Apply ``change`` to the stored state under the write lock."""
        self._controls()
        with self.db.write() as conn:
            row = conn.execute(
                "SELECT state FROM run_controls WHERE run_id = ?", (run_id,)
            ).fetchone()
            state: ControlState = json.loads(row[0]) if row else {}
            result = change(state)
            conn.execute(
                "INSERT INTO run_controls (run_id, state) VALUES (?, ?)"
                " ON CONFLICT (run_id) DO UPDATE SET state = excluded.state",
                (run_id, json.dumps(state, separators=(",", ":"), sort_keys=True)),
            )
        return result

    def held_back(self, run_ids: Collection[str]) -> set[str]:
        """The runs of ``run_ids`` stopped or paused now (``BatchLedger``): one read."""
        self._controls()
        ids = list(run_ids)
        marks = ",".join("?" * len(ids))
        rows = self.db.conn.execute(
            "SELECT r.run_id FROM runs r LEFT JOIN run_controls c ON c.run_id = r.run_id"
            f" WHERE r.run_id IN ({marks}) AND (r.stop_reason IS NOT NULL"
            " OR coalesce(json_extract(c.state, '$.paused'), 0))",
            ids,
        ).fetchall()
        return {row[0] for row in rows}

    def cancel_queued(self, run_id: str, now: float) -> tuple[int, bool]:
        """Cancel the run's queued tasks and count them, in one transaction,
        if the run is stopped (a replay may have cleared the stop since the
        caller saw it: then its tasks are the replay's, and stay queued)."""
        with self.db.write() as conn:
            run = conn.execute(
                "SELECT stop_reason FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            stop = run[0] if run is not None else None
            cancelled = 0
            if stop is not None:
                cancelled = conn.execute(
                    "UPDATE tasks SET state = 'cancelled', lease_token = NULL, updated_at = ?,"
                    # The ledger's history event, stamped with the attempt it is about.
                    " history = json_insert(history, '$[#]',"
                    " json_set(json(?), '$.attempt', attempt - attempt_floor))"
                    " WHERE run_id = ? AND state = 'queued'",
                    (now, json.dumps(cancel_event(stop, now, None)), run_id),
                ).rowcount
            row = conn.execute(
                "UPDATE runs SET outstanding = outstanding - ?,"
                " tasks_cancelled = tasks_cancelled + ?, updated_at = ?"
                " WHERE run_id = ? RETURNING outstanding",
                (cancelled, cancelled, now, run_id),
            ).fetchone()
        return cancelled, row is not None and row[0] == 0
