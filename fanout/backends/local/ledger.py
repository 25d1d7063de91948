"""The ledger in SQLite: runs, tasks and the fan-in counter.

Each public method is one ``BEGIN IMMEDIATE`` transaction, the SQLite twin of
a DynamoDB conditional write: the ``WHERE`` clause of each ``UPDATE`` is the
condition (``state = 'running' AND lease_token = ?``), and the counter moves in
the same transaction as the task it counts, so the outstanding counter is exact
under duplicate deliveries and crashes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Collection, Mapping, Sequence

from fanout.backends.base import (
    Claim,
    ClaimOutcome,
    Failure,
    NewTask,
    Output,
    Registration,
    RunRecord,
    RunState,
    Settle,
    TaskKey,
    TaskRecord,
    TaskState,
    took_field,
)
from fanout.backends.crawlstate import DomainAsk, DomainGrant
from fanout.backends.local.crawlstate import claim_fingerprints, lease_domain, migrate
from fanout.backends.local.db import Database
from fanout.backends.local.runcontrols import SQLiteRunControls

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    job_name TEXT NOT NULL,
    params TEXT NOT NULL,
    settings TEXT NOT NULL,
    state TEXT NOT NULL,
    stop_reason TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    finalize_at REAL,
    outstanding INTEGER NOT NULL DEFAULT 0,
    tasks_total INTEGER NOT NULL DEFAULT 0,
    chunks_total INTEGER NOT NULL DEFAULT 0,
    tasks_done INTEGER NOT NULL DEFAULT 0,
    tasks_dead INTEGER NOT NULL DEFAULT 0,
    tasks_cancelled INTEGER NOT NULL DEFAULT 0,
    records INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    manifest_key TEXT,
    stats TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at);
CREATE TABLE IF NOT EXISTS tasks (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    chunk_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    attempt_floor INTEGER NOT NULL DEFAULT 0,
    depth INTEGER NOT NULL,
    message TEXT NOT NULL,
    lease_token TEXT,
    lease_expires REAL NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    output_key TEXT,
    records INTEGER,
    bytes INTEGER,
    error TEXT,
    traceback TEXT,
    history TEXT NOT NULL DEFAULT '[]',
    updated_at REAL NOT NULL,
    parent_chunk TEXT,
    parent_seq INTEGER NOT NULL DEFAULT 0,
    spawned_by TEXT,
    committed_by TEXT,
    PRIMARY KEY (run_id, chunk_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (run_id, state);
CREATE INDEX IF NOT EXISTS tasks_by_parent ON tasks (run_id, parent_chunk, parent_seq);
CREATE TABLE IF NOT EXISTS seen (
    run_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    owner TEXT NOT NULL,
    token TEXT,
    PRIMARY KEY (run_id, fingerprint)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS domains (
    run_id TEXT NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (run_id, domain)
) WITHOUT ROWID;
"""

# Appends one JSON event to a task's history inside the UPDATE itself, stamped
# with the attempt it is about (the row's values before the UPDATE).
_APPEND = (
    "history = json_insert(history, '$[#]',"
    " json_set(json(?), '$.attempt', attempt - attempt_floor))"
)

_FINISHED = (TaskState.DONE.value, TaskState.DEAD.value, TaskState.CANCELLED.value)


class _OverLimit(Exception):
    """Raised inside a transaction to roll it back."""


def _event(outcome: str, now: float, **extra: object) -> str:
    return json.dumps({"outcome": outcome, "at": round(now, 3), **extra})


def _chunk_sort_key(task: TaskRecord) -> tuple[tuple[int, ...], int]:
    return tuple(int(p) for p in task.chunk_id.split("/")), task.seq


class SQLiteLedger(SQLiteRunControls):  # run controls: cancel, pause, max_concurrency
    """The :class:`~fanout.backends.base.Ledger` on a SQLite database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        #: Whether another process (a forked crawl chunk) sees this ledger's writes.
        self.shared_across_processes = db.path != ":memory:"
        db.executescript(SCHEMA)
        migrate(db)

    # -- runs -----------------------------------------------------------------

    def create_run(self, run: RunRecord, root: NewTask) -> None:
        """Create the run and its root task, ``outstanding == 1``."""
        try:
            with self.db.write() as conn:
                conn.execute(
                    "INSERT INTO runs (run_id, job, job_name, params, settings, state, created_at,"
                    " updated_at, outstanding, tasks_total, chunks_total)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, 1, 1)",
                    (
                        run.run_id,
                        run.job,
                        run.job_name,
                        json.dumps(run.params),
                        json.dumps(run.settings),
                        RunState.RUNNING.value,
                        run.created_at,
                        run.created_at,
                    ),
                )
                self._insert_tasks(conn, run.run_id, [root], run.created_at, None)
        except sqlite3.IntegrityError:
            raise KeyError(run.run_id) from None

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run, or None."""
        row = self.db.conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _run(row) if row else None

    def list_runs(
        self, limit: int = 50, states: Collection[RunState] | None = None
    ) -> list[RunRecord]:
        """Newest first."""
        sql, args = "SELECT * FROM runs", []
        if states is not None:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args = [s.value for s in states]
        sql += " ORDER BY created_at DESC, run_id DESC LIMIT ?"
        rows = self.db.conn.execute(sql, (*args, limit)).fetchall()
        return [_run(r) for r in rows]

    def stop(self, run_id: str, reason: str) -> None:
        """Record the first runaway bound that stopped the run."""
        with self.db.write() as conn:
            conn.execute(
                "UPDATE runs SET stop_reason = COALESCE(stop_reason, ?) WHERE run_id = ?",
                (reason, run_id),
            )

    def begin_finalize(self, run_id: str, now: float, stale_after: float) -> bool:
        """Move a drained run to ``finalizing``; true for the one caller that did."""
        with self.db.write() as conn:
            cur = conn.execute(
                "UPDATE runs SET state = 'finalizing', finalize_at = ?, updated_at = ?"
                " WHERE run_id = ? AND outstanding = 0 AND (state = 'running'"
                " OR (state = 'finalizing' AND finalize_at < ?))",
                (now, now, run_id, now - stale_after),
            )
            return cur.rowcount == 1

    def finish(self, run_id: str, state: RunState, manifest_key: str, now: float) -> None:
        """Record the final state, unless the run was reopened meanwhile."""
        with self.db.write() as conn:
            conn.execute(
                "UPDATE runs SET state = ?, manifest_key = ?, finished_at = ?, updated_at = ?"
                " WHERE run_id = ? AND state = 'finalizing' AND outstanding = 0",
                (state.value, manifest_key, now, now, run_id),
            )

    # -- tasks ----------------------------------------------------------------

    def register(
        self,
        run_id: str,
        tasks: Sequence[NewTask],
        max_chunks: int,
        spawned_by: str | None = None,
    ) -> Registration:
        """Create the tasks not yet registered and count them, all or nothing."""
        if not tasks:
            return Registration(created=0)
        now = time.time()
        try:
            with self.db.write() as conn:
                if spawned_by is not None:
                    parents = {(t.parent_chunk, t.parent_seq) for t in tasks}
                    for parent_chunk, parent_seq in parents:
                        held = conn.execute(
                            "SELECT 1 FROM tasks WHERE run_id = ? AND chunk_id = ? AND seq = ?"
                            " AND state = 'running' AND lease_token = ?",
                            (run_id, parent_chunk, parent_seq, spawned_by),
                        ).fetchone()
                        if held is None:
                            return Registration(created=0, lease_lost=True)
                created, new_chunks = self._insert_tasks(conn, run_id, tasks, now, spawned_by)
                row = conn.execute(
                    "UPDATE runs SET outstanding = outstanding + ?, tasks_total = tasks_total + ?,"
                    " chunks_total = chunks_total + ?, updated_at = ? WHERE run_id = ?"
                    " RETURNING chunks_total",
                    (created, created, new_chunks, now, run_id),
                ).fetchone()
                if row is None:
                    raise KeyError(run_id)
                if row[0] > max_chunks:
                    raise _OverLimit
        except _OverLimit:
            return Registration(created=0, over_limit=True)
        return Registration(created=created)

    @staticmethod
    def _insert_tasks(
        conn: sqlite3.Connection,
        run_id: str,
        tasks: Sequence[NewTask],
        now: float,
        spawned_by: str | None,
    ) -> tuple[int, int]:
        """Insert tasks (or take over an earlier attempt's); returns (tasks counted
        as new, new seq-0 chunks)."""
        rows = [
            (
                run_id,
                t.chunk_id,
                t.seq,
                t.depth,
                t.message,
                now,
                t.parent_chunk,
                t.parent_seq,
                spawned_by,
                t.not_before,
            )
            for t in tasks
        ]
        insert = (
            "INSERT OR IGNORE INTO tasks (run_id, chunk_id, seq, state, depth, message,"
            " updated_at, parent_chunk, parent_seq, spawned_by, not_before)"
            " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)"
        )
        before = conn.total_changes
        conn.executemany(insert, [r for r in rows if r[2] == 0])
        new_chunks = conn.total_changes - before
        conn.executemany(insert, [r for r in rows if r[2] != 0])
        created = conn.total_changes - before
        if spawned_by is None:
            return created, new_chunks
        keyed = [(t.message, spawned_by, now, run_id, t.chunk_id, t.seq, spawned_by) for t in tasks]
        # An earlier attempt of the parent registered these and never committed:
        # this attempt's version replaces theirs while they wait...
        conn.executemany(
            "UPDATE tasks SET message = ?, spawned_by = ?, updated_at = ?"
            " WHERE run_id = ? AND chunk_id = ? AND seq = ? AND state = 'queued'"
            " AND spawned_by IS NOT ?",
            keyed,
        )
        # ...and comes back if it was cancelled as an orphan meanwhile.
        before = conn.total_changes
        conn.executemany(
            f"UPDATE tasks SET state = 'queued', message = ?, spawned_by = ?, updated_at = ?,"
            f" {_APPEND} WHERE run_id = ? AND chunk_id = ? AND seq = ?"
            " AND state = 'cancelled' AND spawned_by IS NOT ?",
            [(m, sb, n, _event("revived", n), r, c, q, sb2) for m, sb, n, r, c, q, sb2 in keyed],
        )
        revived = conn.total_changes - before
        if revived:
            conn.execute(
                "UPDATE runs SET tasks_cancelled = tasks_cancelled - ? WHERE run_id = ?",
                (revived, run_id),
            )
        return created + revived, new_chunks

    def claim(
        self, key: TaskKey, token: str, lease_seconds: float, max_attempts: int, now: float
    ) -> Claim:
        """Lease the task for one attempt, or say why not (see :class:`ClaimOutcome`)."""
        with self.db.write() as conn:
            row = conn.execute(
                "SELECT t.*, r.stop_reason AS run_stop FROM tasks t JOIN runs r USING (run_id)"
                " WHERE t.run_id = ? AND t.chunk_id = ? AND t.seq = ?",
                (key.run_id, key.chunk_id, key.seq),
            ).fetchone()
            if row is None:
                return Claim(ClaimOutcome.MISSING)
            state = row["state"]
            if state in _FINISHED:
                return Claim(ClaimOutcome.FINISHED, task=_task(row))
            live = state == TaskState.RUNNING and row["lease_expires"] > now
            if live:
                return Claim(ClaimOutcome.BUSY, retry_after=row["lease_expires"] - now)
            if row["parent_chunk"] is not None:
                parent = conn.execute(
                    "SELECT state, committed_by, lease_expires FROM tasks"
                    " WHERE run_id = ? AND chunk_id = ? AND seq = ?",
                    (key.run_id, row["parent_chunk"], row["parent_seq"]),
                ).fetchone()
                if parent is not None and parent["state"] not in _FINISHED:
                    # Registered by a parent attempt that has not committed (yet).
                    wait = max(0.5, parent["lease_expires"] - now)
                    return Claim(ClaimOutcome.WAIT, retry_after=min(wait, 30.0))
                if parent is not None and parent["committed_by"] != row["spawned_by"]:
                    # Its parent committed from another attempt, or died: the
                    # attempt that registered this task never counted.
                    drained = self._settle(conn, key, TaskState.CANCELLED, now, "orphaned")
                    return Claim(ClaimOutcome.CANCELLED, drained=drained)
            if row["run_stop"] is not None:
                drained = self._settle(conn, key, TaskState.CANCELLED, now, "cancelled")
                return Claim(ClaimOutcome.CANCELLED, drained=drained)
            if state == TaskState.QUEUED and row["not_before"] > now:
                return Claim(ClaimOutcome.WAIT, retry_after=row["not_before"] - now)
            attempt = row["attempt"]
            takeover = None
            if state == TaskState.RUNNING:
                # The lease expired with no word from its holder: it died
                # (killed, out of memory, machine lost) mid-attempt.
                takeover = "crashed"
                conn.execute(
                    f"UPDATE tasks SET {_APPEND} WHERE run_id = ? AND chunk_id = ? AND seq = ?",
                    (_event("crashed", now), *_key(key)),
                )
                conn.execute(
                    "UPDATE runs SET retries = retries + 1 WHERE run_id = ?", (key.run_id,)
                )
                if attempt - row["attempt_floor"] >= max_attempts:
                    failure = Failure("crashed", "the worker died during the last attempt")
                    drained = self._bury(conn, key, failure, now, log=False)
                    return Claim(ClaimOutcome.BURIED, takeover=takeover, drained=drained)
            cur = conn.execute(
                "UPDATE tasks SET state = 'running', attempt = attempt + 1, lease_token = ?,"
                " lease_expires = ?, updated_at = ? WHERE run_id = ? AND chunk_id = ? AND seq = ?"
                " RETURNING *",
                (token, now + lease_seconds, now, *_key(key)),
            )
            task = _task(cur.fetchone())
            return Claim(
                ClaimOutcome.CLAIMED,
                task=task,
                attempt=task.attempt - task.attempt_floor,
                takeover=takeover,
            )

    def commit(
        self,
        key: TaskKey,
        token: str,
        output: Output | None,
        outcome: str,
        now: float,
        stats: Mapping[str, int] | None = None,
        duration: float | None = None,
    ) -> Settle:
        """Mark the task done with its output, if the lease is still ours."""
        with self.db.write() as conn:
            cur = conn.execute(
                "UPDATE tasks SET state = 'done', committed_by = lease_token, lease_token = NULL,"
                " output_key = ?, records = ?,"
                f" bytes = ?, updated_at = ?, {_APPEND}"
                " WHERE run_id = ? AND chunk_id = ? AND seq = ? AND state = 'running'"
                " AND lease_token = ? RETURNING 1",
                (
                    output.key if output else None,
                    output.records if output else 0,
                    output.bytes if output else 0,
                    now,
                    _event(
                        outcome,
                        now,
                        records=output.records if output else 0,
                        **took_field(duration),
                    ),
                    *_key(key),
                    token,
                ),
            )
            if cur.fetchone() is None:
                return Settle(ok=False)
            # Tasks an earlier, uncommitted attempt registered and this one did
            # not take over are orphans: cancelled here, so none is left waiting.
            orphans = conn.execute(
                # INDEXED BY: without statistics SQLite would pick the primary
                # key's run_id prefix and scan the whole run on every commit.
                f"UPDATE tasks INDEXED BY tasks_by_parent SET state = 'cancelled',"
                f" updated_at = ?, {_APPEND}"
                " WHERE run_id = ? AND parent_chunk = ? AND parent_seq = ? AND state = 'queued'"
                " AND spawned_by IS NOT ?",
                (now, _event("orphaned", now), *_key(key), token),
            ).rowcount
            row = conn.execute(
                "UPDATE runs SET outstanding = outstanding - 1 - ?, tasks_done = tasks_done + 1,"
                " tasks_cancelled = tasks_cancelled + ?,"
                " records = records + ?, bytes = bytes + ?, updated_at = ? WHERE run_id = ?"
                " RETURNING outstanding, stats",
                (
                    orphans,
                    orphans,
                    output.records if output else 0,
                    output.bytes if output else 0,
                    now,
                    key.run_id,
                ),
            ).fetchone()
            if stats:
                # Summed here, under the same write lock, so no increment is lost.
                total = json.loads(row[1])
                for name, value in stats.items():
                    total[name] = total.get(name, 0) + value
                conn.execute(
                    "UPDATE runs SET stats = ? WHERE run_id = ?", (json.dumps(total), key.run_id)
                )
            return Settle(ok=True, drained=row[0] == 0)

    def retry(
        self, key: TaskKey, token: str, failure: Failure, not_before: float, now: float
    ) -> bool:
        """Give the lease back after a failed attempt; no claim before ``not_before``."""
        with self.db.write() as conn:
            cur = conn.execute(
                "UPDATE tasks SET state = 'queued', lease_token = NULL, lease_expires = 0,"
                f" not_before = ?, error = ?, traceback = ?, updated_at = ?, {_APPEND}"
                " WHERE run_id = ? AND chunk_id = ? AND seq = ? AND state = 'running'"
                " AND lease_token = ?",
                (
                    not_before,
                    failure.error,
                    failure.traceback,
                    now,
                    _event(failure.kind, now, error=failure.error, **took_field(failure.duration)),
                    *_key(key),
                    token,
                ),
            )
            if cur.rowcount != 1:
                return False
            conn.execute("UPDATE runs SET retries = retries + 1 WHERE run_id = ?", (key.run_id,))
            return True

    def bury(self, key: TaskKey, token: str, failure: Failure, now: float) -> Settle:
        """Dead-letter the task if the lease is still ours."""
        with self.db.write() as conn:
            row = conn.execute(
                "SELECT 1 FROM tasks WHERE run_id = ? AND chunk_id = ?"
                " AND seq = ? AND state = 'running' AND lease_token = ?",
                (*_key(key), token),
            ).fetchone()
            if row is None:
                return Settle(ok=False)
            return Settle(ok=True, drained=self._bury(conn, key, failure, now))

    def _bury(
        self,
        conn: sqlite3.Connection,
        key: TaskKey,
        failure: Failure,
        now: float,
        log: bool = True,
    ) -> bool:
        conn.execute(
            "UPDATE tasks SET error = ?, traceback = ?"
            " WHERE run_id = ? AND chunk_id = ? AND seq = ?",
            (f"{failure.kind}: {failure.error}", failure.traceback, *_key(key)),
        )
        if log:
            conn.execute(
                f"UPDATE tasks SET {_APPEND} WHERE run_id = ? AND chunk_id = ? AND seq = ?",
                (
                    _event(failure.kind, now, error=failure.error, **took_field(failure.duration)),
                    *_key(key),
                ),
            )
        return self._settle(conn, key, TaskState.DEAD, now, "dead")

    @staticmethod
    def _settle(
        conn: sqlite3.Connection,
        key: TaskKey,
        state: TaskState,
        now: float,
        outcome: str,
    ) -> bool:
        """Finish a task without output (dead or cancelled); true if the run drained."""
        conn.execute(
            f"UPDATE tasks SET state = ?, lease_token = NULL, updated_at = ?, {_APPEND}"
            " WHERE run_id = ? AND chunk_id = ? AND seq = ?",
            (state.value, now, _event(outcome, now), *_key(key)),
        )
        column = "tasks_dead" if state == TaskState.DEAD else "tasks_cancelled"
        row = conn.execute(
            f"UPDATE runs SET outstanding = outstanding - 1, {column} = {column} + 1,"
            " updated_at = ? WHERE run_id = ? RETURNING outstanding",
            (now, key.run_id),
        ).fetchone()
        return bool(row[0] == 0)

    def queued_children(self, key: TaskKey) -> list[TaskRecord]:
        """Still-queued tasks registered by ``key``."""
        rows = self.db.conn.execute(
            "SELECT * FROM tasks INDEXED BY tasks_by_parent"
            " WHERE run_id = ? AND parent_chunk = ? AND parent_seq = ? AND state = 'queued'",
            _key(key),
        )
        return [_task(r) for r in rows]

    def claim_urls(
        self, run_id: str, owner: str, token: str, fingerprints: Sequence[str]
    ) -> set[str]:
        """Claim fingerprints for attempt ``token`` of chunk ``owner``; the ones it
        holds now (see :mod:`fanout.backends.crawlstate`)."""
        return claim_fingerprints(self.db, run_id, owner, token, fingerprints)

    def lease_domain(self, run_id: str, domain: str, holder: str, ask: DomainAsk) -> DomainGrant:
        """Lease slots of ``domain`` for chunk ``holder`` (run-wide politeness)."""
        return lease_domain(self.db, run_id, domain, holder, ask)

    def get_task(self, key: TaskKey) -> TaskRecord | None:
        """The task, or None."""
        row = self.db.conn.execute(
            "SELECT * FROM tasks WHERE run_id = ? AND chunk_id = ? AND seq = ?", _key(key)
        ).fetchone()
        return _task(row) if row else None

    def list_tasks(
        self, run_id: str, states: Collection[TaskState] | None = None
    ) -> list[TaskRecord]:
        """The run's tasks in chunk order."""
        sql, args = "SELECT * FROM tasks WHERE run_id = ?", [run_id]
        if states is not None:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += [s.value for s in states]
        tasks = [_task(r) for r in self.db.conn.execute(sql, args)]
        tasks.sort(key=_chunk_sort_key)
        return tasks

    def reopen(
        self, run_id: str, chunk_ids: Collection[str] | None, now: float
    ) -> list[TaskRecord]:
        """Dead tasks back to queued with a fresh attempt budget; the run reopens."""
        with self.db.write() as conn:
            sql = "SELECT chunk_id, seq FROM tasks WHERE run_id = ? AND state = 'dead'"
            keys = [
                (r[0], r[1])
                for r in conn.execute(sql, (run_id,))
                if chunk_ids is None or r[0] in chunk_ids
            ]
            reopened = []
            for chunk_id, seq in keys:
                cur = conn.execute(
                    "UPDATE tasks SET state = 'queued', attempt_floor = attempt, not_before = 0,"
                    f" lease_token = NULL, lease_expires = 0, updated_at = ?, {_APPEND}"
                    " WHERE run_id = ? AND chunk_id = ? AND seq = ? RETURNING *",
                    (now, _event("replayed", now), run_id, chunk_id, seq),
                )
                reopened.append(_task(cur.fetchone()))
            if reopened:
                # A replay runs what the user asked for, even in a run a bound had stopped.
                conn.execute(
                    "UPDATE runs SET outstanding = outstanding + ?, tasks_dead = tasks_dead - ?,"
                    " state = 'running', stop_reason = NULL, finished_at = NULL, updated_at = ?"
                    " WHERE run_id = ?",
                    (len(reopened), len(reopened), now, run_id),
                )
        reopened.sort(key=_chunk_sort_key)
        return reopened

    def close(self) -> None:
        """Close the database (shared with the queue, which ``Backend.close`` closes first)."""
        self.db.close()


def _key(key: TaskKey) -> tuple[str, str, int]:
    return key.run_id, key.chunk_id, key.seq


def _run(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        run_id=row["run_id"],
        job=row["job"],
        job_name=row["job_name"],
        params=json.loads(row["params"]),
        settings=json.loads(row["settings"]),
        state=RunState(row["state"]),
        stop_reason=row["stop_reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        outstanding=row["outstanding"],
        tasks_total=row["tasks_total"],
        chunks_total=row["chunks_total"],
        tasks_done=row["tasks_done"],
        tasks_dead=row["tasks_dead"],
        tasks_cancelled=row["tasks_cancelled"],
        records=row["records"],
        bytes=row["bytes"],
        retries=row["retries"],
        manifest_key=row["manifest_key"],
        stats=json.loads(row["stats"]),
    )


def _task(row: sqlite3.Row) -> TaskRecord:
    output = None
    if row["output_key"] is not None:
        output = Output(row["output_key"], row["records"] or 0, row["bytes"] or 0)
    return TaskRecord(
        run_id=row["run_id"],
        chunk_id=row["chunk_id"],
        seq=row["seq"],
        state=TaskState(row["state"]),
        attempt=row["attempt"],
        attempt_floor=row["attempt_floor"],
        depth=row["depth"],
        message=row["message"],
        lease_token=row["lease_token"],
        lease_expires=row["lease_expires"],
        not_before=row["not_before"],
        output=output,
        error=row["error"],
        traceback=row["traceback"],
        history=json.loads(row["history"]),
        updated_at=row["updated_at"],
    )
