"""Keyset pages of the local ledger's runs, newest first, for the dashboard's
runs page (read-only).

``Ledger.list_runs`` starts at the newest run, so its page *n* reads every
newer run; here a page starts right after the last run of the page before
(``created_at``, ``run_id``), on the ``runs_by_created`` index, and the job
filter is part of the query: with 10,000 runs the last page costs what the
first does.
"""

from __future__ import annotations

from collections.abc import Collection

from fanout.backends.base import RunRecord, RunState
from fanout.backends.local.ledger import SQLiteLedger
from fanout.backends.local.ledger_rows import run_record


def runs_before(
    ledger: SQLiteLedger,
    limit: int,
    before: tuple[float, str] | None = None,
    states: Collection[RunState] | None = None,
    job: str | None = None,
) -> list[RunRecord]:
    """Up to ``limit`` runs older than ``before`` (its created_at and run id;
    None: from the newest), optionally in ``states`` and of job ``job``."""
    where: list[str] = []
    args: list[object] = []
    if before is not None:
        # "<=" first so that SQLite walks the index from there.
        where.append("created_at <= ? AND (created_at < ? OR run_id < ?)")
        args += [before[0], before[0], before[1]]
    if states is not None:
        where.append(f"state IN ({','.join('?' * len(states))})")
        args += [s.value for s in states]
    if job is not None:
        where.append("job_name = ?")
        args.append(job)
    sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY created_at DESC, run_id DESC LIMIT ?"
    return [run_record(row) for row in ledger.db.conn.execute(sql, (*args, limit))]
