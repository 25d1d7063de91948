"""The SQLite ledger's tables, and its rows as the records of
:mod:`fanout.backends.base`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection
from dataclasses import dataclass, field

from fanout.backends.base import (
    CommitRequest,
    Failure,
    FailureKind,
    Output,
    RunRecord,
    RunState,
    TaskEvent,
    TaskKey,
    TaskRecord,
    TaskState,
    took_field,
)
from fanout.backends.rules import (
    finalizing_refusal,
    history_event,
    is_drained,
    may_reopen,
    replay_revives,
)
from fanout.errors import RunFinalizingError

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
"""


def key_args(key: TaskKey) -> tuple[str, str, int]:
    """The primary key of a task, as statement arguments."""
    return key.run_id, key.chunk_id, key.seq


def run_record(row: sqlite3.Row) -> RunRecord:
    """A ``runs`` row as a record."""
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
        finalize_at=row["finalize_at"],
    )


#: A task's state by its stored value (a dict lookup: an enum call costs more,
#: and a large run's listing converts every row).
_STATES = {state.value: state for state in TaskState}


def task_record(row: sqlite3.Row, history: bool = True) -> TaskRecord:
    """A ``tasks`` row as a record (its history left empty unless ``history``)."""
    output = None
    if row["output_key"] is not None:
        output = Output(row["output_key"], row["records"] or 0, row["bytes"] or 0)
    return TaskRecord(
        run_id=row["run_id"],
        chunk_id=row["chunk_id"],
        seq=row["seq"],
        state=_STATES[row["state"]],
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
        history=json.loads(row["history"]) if history else [],
        updated_at=row["updated_at"],
    )


@dataclass
class RunSums:
    """What a batch of commits adds to one run's counters."""

    done: int = 0
    orphans: int = 0
    records: int = 0
    bytes: int = 0
    now: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)

    def add(self, r: CommitRequest, orphans: int) -> None:
        self.done += 1
        self.orphans += orphans
        if r.output:
            self.records += r.output.records
            self.bytes += r.output.bytes
        self.now = max(self.now, r.now)
        for name, value in (r.stats or {}).items():
            self.stats[name] = self.stats.get(name, 0) + value

    def apply(self, conn: sqlite3.Connection, run_id: str) -> bool:
        """Move the run's counters by these commits (in the caller's write
        transaction); whether the run drained."""
        run = conn.execute(
            "UPDATE runs SET outstanding = outstanding - ? - ?, tasks_done = tasks_done + ?,"
            " tasks_cancelled = tasks_cancelled + ?,"
            " records = records + ?, bytes = bytes + ?, updated_at = ? WHERE run_id = ?"
            " RETURNING outstanding, stats",
            (
                self.done,
                self.orphans,
                self.done,
                self.orphans,
                self.records,
                self.bytes,
                self.now,
                run_id,
            ),
        ).fetchone()
        if self.stats:
            # Summed here, under the same write lock, so no increment is lost.
            total = json.loads(run[1])
            for name, value in self.stats.items():
                total[name] = total.get(name, 0) + value
            conn.execute("UPDATE runs SET stats = ? WHERE run_id = ?", (json.dumps(total), run_id))
        return is_drained(run[0])


# Appends one JSON event to a task's history inside the UPDATE itself, stamped
# with the attempt it is about (the row's values before the UPDATE).
APPEND = (
    "history = json_insert(history, '$[#]',"
    " json_set(json(?), '$.attempt', attempt - attempt_floor))"
)

# One read for a claim: the task, its run's stop and its parent (if any).
CLAIM_READ = (
    "SELECT t.*, r.stop_reason AS run_stop, p.state AS p_state,"
    " p.committed_by AS p_committed_by, p.lease_expires AS p_lease_expires"
    " FROM tasks t JOIN runs r USING (run_id) LEFT JOIN tasks p"
    " ON p.run_id = t.run_id AND p.chunk_id = t.parent_chunk AND p.seq = t.parent_seq"
    " WHERE t.run_id = ? AND t.chunk_id = ? AND t.seq = ?"
)


def row_event(outcome: TaskEvent | FailureKind, now: float, **extra: object) -> str:
    """A history event as JSON, for :data:`APPEND` to stamp with the attempt."""
    return json.dumps(history_event(outcome, now, None, **extra))


def failure_event(failure: Failure, now: float) -> str:
    """The history event of a failed attempt, as JSON."""
    return row_event(failure.kind, now, error=failure.error, **took_field(failure.duration))


def commit_args(r: CommitRequest) -> tuple[object, ...]:
    """The parameters of one commit's task ``UPDATE``."""
    records, nbytes = (r.output.records, r.output.bytes) if r.output else (0, 0)
    return (
        r.output.key if r.output else None,
        records,
        nbytes,
        r.now,
        row_event(r.outcome, r.now, records=records, **took_field(r.duration)),
        *key_args(r.key),
        r.token,
    )


def stop_run(conn: sqlite3.Connection, run_id: str, reason: str) -> bool:
    """Record the run's first stop reason (in the caller's write transaction);
    whether this call recorded it. Not once the run is finalizing or ended: it
    has no chunk left to stop, and its finalizer may have read its state
    already (a cancel then ended a run "succeeded" with a cancel's reason)."""
    cur = conn.execute(
        "UPDATE runs SET stop_reason = ? WHERE run_id = ? AND stop_reason IS NULL"
        " AND state = 'running'",
        (reason, run_id),
    )
    return cur.rowcount == 1


def reopen_tasks(
    conn: sqlite3.Connection, run_id: str, chunk_ids: Collection[str] | None, now: float
) -> list[TaskRecord]:
    """A replay, in the caller's write transaction: the dead tasks (those of
    ``chunk_ids``, if given) and, if the run was stopped, the tasks its stop
    cancelled (:func:`~fanout.backends.rules.replay_revives`) back to queued
    with a fresh attempt budget; the run back to running, its stop cleared.
    Refused (:class:`RunFinalizingError`) while the run is finalizing."""
    run = conn.execute("SELECT state, stop_reason FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    # Read in the write transaction: no finalizer can begin between it and the update.
    if run is None:
        return []
    if not may_reopen(RunState(run[0])):
        raise RunFinalizingError(finalizing_refusal(run_id))
    rows = conn.execute(
        "SELECT * FROM tasks WHERE run_id = ? AND state IN ('dead', 'cancelled')", (run_id,)
    )
    todo = [
        t
        for t in map(task_record, rows)
        if replay_revives(run[1], t)
        and (t.state != TaskState.DEAD or chunk_ids is None or t.chunk_id in chunk_ids)
    ]
    reopened = []
    for t in todo:
        cur = conn.execute(
            "UPDATE tasks SET state = 'queued', attempt_floor = attempt, not_before = 0,"
            f" lease_token = NULL, lease_expires = 0, updated_at = ?, {APPEND}"
            " WHERE run_id = ? AND chunk_id = ? AND seq = ? RETURNING *",
            (now, row_event(TaskEvent.REPLAYED, now), *key_args(t.key)),
        )
        reopened.append(task_record(cur.fetchone()))
    if reopened:
        dead = sum(t.state == TaskState.DEAD for t in todo)
        # A replay runs what the user asked for, even in a run a bound had
        # stopped; the chunks the stop cancelled run with it.
        conn.execute(
            "UPDATE runs SET outstanding = outstanding + ?, tasks_dead = tasks_dead - ?,"
            " tasks_cancelled = tasks_cancelled - ?, state = 'running', stop_reason = NULL,"
            " finished_at = NULL, updated_at = ? WHERE run_id = ?",
            (len(reopened), dead, len(reopened) - dead, now, run_id),
        )
    return reopened
