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
    ClaimRequest,
    CommitRequest,
    Failure,
    FailureKind,
    NewTask,
    Output,
    Registration,
    RunRecord,
    RunState,
    Settle,
    TaskEvent,
    TaskKey,
    TaskRecord,
    TaskState,
)
from fanout.backends.local.db import Database
from fanout.backends.local.ledger_rows import (
    APPEND,
    CLAIM_READ,
    SCHEMA,
    RunSums,
    commit_args,
    failure_event,
    key_args,
    reopen_tasks,
    row_event,
    run_record,
    stop_run,
    task_record,
)
from fanout.backends.local.runcontrols import SQLiteRunControls
from fanout.backends.rules import (
    CRASHED_LAST,
    ClaimFacts,
    ClaimVerdict,
    ParentFacts,
    attempt_in_budget,
    cancel_event,
    chunk_order,
    claim_without_write,
    history_event,
    is_drained,
    may_have_orphans,
    rule_claim,
    spends_attempt,
)


class _OverLimit(Exception):
    """Raised inside a transaction to roll it back."""


class SQLiteLedger(SQLiteRunControls):  # run controls: cancel, pause, max_concurrency
    """The :class:`~fanout.backends.base.Ledger` on a SQLite database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.executescript(SCHEMA)

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
        return run_record(row) if row else None

    def domain_stats(self, run_id: str) -> dict[str, int]:
        """None apart: the run's ``stats`` hold its per-domain counters too."""
        return {}

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
        return [run_record(r) for r in rows]

    def stop(self, run_id: str, reason: str) -> bool:
        """Record the first reason the run stopped; whether this call recorded it."""
        with self.db.write() as conn:
            return stop_run(conn, run_id, reason)

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

    def finish(
        self,
        run_id: str,
        state: RunState,
        manifest_key: str,
        now: float,
        began: float | None = None,
    ) -> bool:
        """Record the final state, unless the run was reopened meanwhile or
        another finalizer took it over (``began``)."""
        sql = (
            "UPDATE runs SET state = ?, manifest_key = ?, finished_at = ?, updated_at = ?"
            " WHERE run_id = ? AND state = 'finalizing' AND outstanding = 0"
        )
        args: tuple[object, ...] = (state.value, manifest_key, now, now, run_id)
        if began is not None:
            sql, args = sql + " AND finalize_at = ?", (*args, began)
        with self.db.write() as conn:
            return conn.execute(sql, args).rowcount == 1

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
            "INSERT INTO tasks (run_id, chunk_id, seq, state, depth, message,"
            " updated_at, parent_chunk, parent_seq, spawned_by, not_before)"
            " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)"
            # Only a task that exists is skipped (OR IGNORE skipped a row that
            # broke any constraint, NOT NULL included, without a word).
            " ON CONFLICT (run_id, chunk_id, seq) DO NOTHING"
        )
        before = conn.total_changes
        conn.executemany(insert, [r for r in rows if r[2] == 0])
        new_chunks = conn.total_changes - before
        conn.executemany(insert, [r for r in rows if r[2] != 0])
        created = conn.total_changes - before
        if spawned_by is None or created == len(rows):
            # Every task is new (the common case): none to take over or revive,
            # so the two passes below (20,000 statements for a 10,000-chunk
            # plan, a third of its registration) would change nothing.
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
            f" {APPEND} WHERE run_id = ? AND chunk_id = ? AND seq = ?"
            " AND state = 'cancelled' AND spawned_by IS NOT ?",
            [
                (m, sb, n, row_event(TaskEvent.REVIVED, n), r, c, q, sb2)
                for m, sb, n, r, c, q, sb2 in keyed
            ],
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
        """Lease the task for one attempt, or say why not (see :class:`ClaimOutcome`):
        one read of the task, its parent and its run, the decision of
        :func:`~fanout.backends.rules.rule_claim`, then the write it calls for."""
        with self.db.write() as conn:
            return self._claim(conn, key, token, lease_seconds, max_attempts, now)

    def claim_many(self, requests: Sequence[ClaimRequest], now: float) -> list[Claim]:
        """:meth:`claim` for each request, in one transaction (``BatchLedger``)."""
        with self.db.write() as conn:
            return [
                self._claim(conn, r.key, r.token, r.lease_seconds, r.max_attempts, now)
                for r in requests
            ]

    def _claim(
        self,
        conn: sqlite3.Connection,
        key: TaskKey,
        token: str,
        lease_seconds: float,
        max_attempts: int,
        now: float,
    ) -> Claim:
        row = conn.execute(CLAIM_READ, key_args(key)).fetchone()
        if row is None:
            return Claim(ClaimOutcome.MISSING)
        task = task_record(row)
        parent = None
        if row["p_state"] is not None:
            parent = ParentFacts(
                TaskState(row["p_state"]), row["p_committed_by"], row["p_lease_expires"]
            )
        facts = ClaimFacts(task, row["spawned_by"], parent, row["run_stop"] is not None)
        ruling = rule_claim(facts, max_attempts, now)
        answer = claim_without_write(ruling, task)
        if answer is not None:
            return answer
        verdict = ruling.verdict
        if verdict in (ClaimVerdict.ORPHANED, ClaimVerdict.STOPPED):
            event = (
                row_event(TaskEvent.ORPHANED, now)
                if verdict is ClaimVerdict.ORPHANED
                else json.dumps(cancel_event(row["run_stop"], now, None))
            )
            drained = self._settle(conn, key, TaskState.CANCELLED, now, event)
            return Claim(ClaimOutcome.CANCELLED, drained=drained)
        takeover = None
        if verdict in (ClaimVerdict.TAKE_OVER, ClaimVerdict.BURY):
            takeover = FailureKind.CRASHED
            conn.execute(
                f"UPDATE tasks SET {APPEND} WHERE run_id = ? AND chunk_id = ? AND seq = ?",
                (row_event(FailureKind.CRASHED, now), *key_args(key)),
            )
            conn.execute("UPDATE runs SET retries = retries + 1 WHERE run_id = ?", (key.run_id,))
            if verdict is ClaimVerdict.BURY:
                drained = self._bury(conn, key, CRASHED_LAST, now, log=False)
                return Claim(ClaimOutcome.BURIED, takeover=takeover, drained=drained)
            task.history.append(history_event(FailureKind.CRASHED, now, attempt_in_budget(task)))
        expires = now + lease_seconds
        conn.execute(
            "UPDATE tasks SET state = 'running', attempt = attempt + 1, lease_token = ?,"
            " lease_expires = ?, updated_at = ? WHERE run_id = ? AND chunk_id = ? AND seq = ?",
            (token, expires, now, *key_args(key)),
        )
        # The record as written, without reading it back.
        task.state, task.attempt, task.lease_token = TaskState.RUNNING, task.attempt + 1, token
        task.lease_expires, task.updated_at = expires, now
        return Claim(
            ClaimOutcome.CLAIMED,
            task=task,
            attempt=attempt_in_budget(task),
            takeover=takeover,
        )

    def commit(
        self,
        key: TaskKey,
        token: str,
        output: Output | None,
        outcome: TaskEvent,
        now: float,
        stats: Mapping[str, int] | None = None,
        duration: float | None = None,
        stop_reason: str | None = None,
    ) -> Settle:
        """Mark the task done with its output, if the lease is still ours (and
        stop the run for ``stop_reason``, if given and it was not stopped yet)."""
        request = CommitRequest(key, token, output, outcome, now, stats, duration, stop_reason)
        return self.commit_many([request])[0]

    def commit_many(self, requests: Sequence[CommitRequest]) -> list[Settle]:
        """:meth:`commit` for each request, in one transaction (``BatchLedger``).
        The runs' counters move once per run, by the batch's sum: the same
        totals, and the run drains on its last commit in the batch, as it would
        one commit at a time."""
        # Built before the write lock is taken: other workers wait while it is held.
        args = [commit_args(r) for r in requests]
        with self.db.write() as conn:
            committed = [self._commit(conn, r, a) for r, a in zip(requests, args, strict=True)]
            sums: dict[str, RunSums] = {}
            for r, orphans in zip(requests, committed, strict=True):
                if orphans is not None:
                    sums.setdefault(r.key.run_id, RunSums()).add(r, orphans)
            drained = {run_id: s.apply(conn, run_id) for run_id, s in sums.items()}
            # A chunk's ctx.stop_run, in the commit's transaction (the first
            # reason stands): the request that recorded it is told so.
            stopped = {
                i
                for i, (r, o) in enumerate(zip(requests, committed, strict=True))
                if o is not None and r.stop_reason and stop_run(conn, r.key.run_id, r.stop_reason)
            }
        last = {
            r.key.run_id: i
            for i, (r, o) in enumerate(zip(requests, committed, strict=True))
            if o is not None
        }
        return [
            Settle(
                ok=o is not None,
                drained=last.get(r.key.run_id) == i and drained[r.key.run_id],
                stopped=i in stopped,
            )
            for i, (r, o) in enumerate(zip(requests, committed, strict=True))
        ]

    def give_back_many(self, claims: Sequence[tuple[TaskKey, str]], now: float) -> list[bool]:
        """Undo never-started claims, in one transaction (``BatchLedger``)."""
        with self.db.write() as conn:
            return [
                conn.execute(
                    "UPDATE tasks SET state = 'queued', attempt = attempt - 1, lease_token = NULL,"
                    " lease_expires = 0, updated_at = ? WHERE run_id = ? AND chunk_id = ?"
                    " AND seq = ? AND state = 'running' AND lease_token = ?",
                    (now, *key_args(key), token),
                ).rowcount
                == 1
                for key, token in claims
            ]

    def _commit(
        self, conn: sqlite3.Connection, r: CommitRequest, args: tuple[object, ...]
    ) -> int | None:
        """Mark one task done: the orphans it cancelled, or None if the lease was lost."""
        row = conn.execute(
            "UPDATE tasks SET state = 'done', committed_by = lease_token, lease_token = NULL,"
            " output_key = ?, records = ?,"
            f" bytes = ?, updated_at = ?, {APPEND}"
            " WHERE run_id = ? AND chunk_id = ? AND seq = ? AND state = 'running'"
            " AND lease_token = ? RETURNING attempt",
            args,
        ).fetchone()
        if row is None:
            return None
        if not may_have_orphans(row[0]):
            return 0
        # Tasks an earlier, uncommitted attempt registered and this one did
        # not take over are orphans: cancelled here, so none is left waiting.
        return int(
            conn.execute(
                # INDEXED BY: without statistics SQLite would pick the primary
                # key's run_id prefix and scan the whole run on every commit.
                f"UPDATE tasks INDEXED BY tasks_by_parent SET state = 'cancelled',"
                f" updated_at = ?, {APPEND}"
                " WHERE run_id = ? AND parent_chunk = ? AND parent_seq = ? AND state = 'queued'"
                " AND spawned_by IS NOT ?",
                (r.now, row_event(TaskEvent.ORPHANED, r.now), *key_args(r.key), r.token),
            ).rowcount
        )

    def retry(
        self, key: TaskKey, token: str, failure: Failure, not_before: float, now: float
    ) -> bool:
        """Give the lease back after a failed attempt; no claim before ``not_before``."""
        spent = spends_attempt(failure.kind)
        with self.db.write() as conn:
            cur = conn.execute(
                "UPDATE tasks SET state = 'queued', lease_token = NULL, lease_expires = 0,"
                f" not_before = ?, error = ?, traceback = ?, updated_at = ?, {APPEND},"
                " attempt_floor = attempt_floor + ?"
                " WHERE run_id = ? AND chunk_id = ? AND seq = ? AND state = 'running'"
                " AND lease_token = ?",
                (
                    not_before,
                    failure.error,
                    failure.traceback,
                    now,
                    failure_event(failure, now),
                    0 if spent else 1,  # an interrupted attempt is not counted
                    *key_args(key),
                    token,
                ),
            )
            if cur.rowcount != 1:
                return False
            if spent:
                conn.execute(
                    "UPDATE runs SET retries = retries + 1 WHERE run_id = ?", (key.run_id,)
                )
            return True

    def bury(self, key: TaskKey, token: str, failure: Failure, now: float) -> Settle:
        """Dead-letter the task if the lease is still ours."""
        with self.db.write() as conn:
            row = conn.execute(
                "SELECT 1 FROM tasks WHERE run_id = ? AND chunk_id = ?"
                " AND seq = ? AND state = 'running' AND lease_token = ?",
                (*key_args(key), token),
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
            (f"{failure.kind}: {failure.error}", failure.traceback, *key_args(key)),
        )
        if log:
            conn.execute(
                f"UPDATE tasks SET {APPEND} WHERE run_id = ? AND chunk_id = ? AND seq = ?",
                (
                    failure_event(failure, now),
                    *key_args(key),
                ),
            )
        return self._settle(conn, key, TaskState.DEAD, now, row_event(TaskEvent.DEAD, now))

    @staticmethod
    def _settle(
        conn: sqlite3.Connection,
        key: TaskKey,
        state: TaskState,
        now: float,
        event: str,
    ) -> bool:
        """Finish a task without output (dead or cancelled), with its history
        ``event`` (:func:`row_event`); true if the run drained."""
        conn.execute(
            f"UPDATE tasks SET state = ?, lease_token = NULL, updated_at = ?, {APPEND}"
            " WHERE run_id = ? AND chunk_id = ? AND seq = ?",
            (state.value, now, event, *key_args(key)),
        )
        column = "tasks_dead" if state == TaskState.DEAD else "tasks_cancelled"
        row = conn.execute(
            f"UPDATE runs SET outstanding = outstanding - 1, {column} = {column} + 1,"
            " updated_at = ? WHERE run_id = ? RETURNING outstanding",
            (now, key.run_id),
        ).fetchone()
        return is_drained(row[0])

    def queued_children(self, key: TaskKey) -> list[TaskRecord]:
        """Still-queued tasks registered by ``key``."""
        rows = self.db.conn.execute(
            "SELECT * FROM tasks INDEXED BY tasks_by_parent"
            " WHERE run_id = ? AND parent_chunk = ? AND parent_seq = ? AND state = 'queued'",
            key_args(key),
        )
        return [task_record(r) for r in rows]

    def get_task(self, key: TaskKey) -> TaskRecord | None:
        """The task, or None."""
        row = self.db.conn.execute(
            "SELECT * FROM tasks WHERE run_id = ? AND chunk_id = ? AND seq = ?", key_args(key)
        ).fetchone()
        return task_record(row) if row else None

    def list_tasks(
        self, run_id: str, states: Collection[TaskState] | None = None, *, history: bool = True
    ) -> list[TaskRecord]:
        """The run's tasks in chunk order (without their history if ``history`` is false)."""
        sql, args = "SELECT * FROM tasks WHERE run_id = ?", [run_id]
        if states is not None:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += [s.value for s in states]
        rows = self.db.conn.execute(sql, args)
        tasks = [task_record(r, history) for r in rows]
        tasks.sort(key=chunk_order)
        return tasks

    def reopen(
        self, run_id: str, chunk_ids: Collection[str] | None, now: float
    ) -> list[TaskRecord]:
        """Dead tasks (and those a stop cancelled) back to queued with a fresh
        attempt budget; the run reopens (:func:`reopen_tasks`). Refused
        (:class:`RunFinalizingError`) while the run is finalizing."""
        with self.db.write() as conn:
            reopened = reopen_tasks(conn, run_id, chunk_ids, now)
        reopened.sort(key=chunk_order)
        return reopened

    def close(self) -> None:
        """Close the database (shared with the queue, which ``Backend.close`` closes first)."""
        self.db.close()
