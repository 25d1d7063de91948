"""A crawl's run-wide state in SQLite: the seen-set and the domain leases
(the :class:`~fanout.backends.crawlstate.CrawlState` of the local backend).

Each call is one write transaction; the rules themselves are in
:mod:`fanout.backends.crawlstate`, shared with DynamoDB. The seen-set reads the
ledger's ``tasks`` table (who owns a claim), in the same database.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from fanout.backends.crawlstate import (
    DomainAsk,
    DomainGrant,
    backoff_of,
    claim_is_live,
    dump_state,
    grant_domain,
)
from fanout.backends.local.db import Database

#: SQLite's limit on host parameters in one statement, with room to spare.
_BATCH = 400

_SCHEMA = """
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


class SQLiteCrawlState:
    """The seen-set and domain leases in the local backend's database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        #: A database file is shared by every process that opens it; an
        #: in-memory one (the memory backend) is not, even with a forked child.
        self.shared_across_processes = db.path != ":memory:"
        db.executescript(_SCHEMA)
        migrate(db)

    @property
    def usage(self) -> Mapping[str, int]:
        """Nothing is billed locally."""
        return {}

    def claim_urls(
        self, run_id: str, owner: str, token: str, fingerprints: Sequence[str]
    ) -> set[str]:
        """Claim fingerprints for attempt ``token`` of chunk ``owner``; the ones it
        holds now (see :mod:`fanout.backends.crawlstate`)."""
        return claim_fingerprints(self.db, run_id, owner, token, fingerprints)

    def lease_domain(self, run_id: str, domain: str, holder: str, ask: DomainAsk) -> DomainGrant:
        """Lease slots of ``domain`` for chunk ``holder`` (run-wide politeness)."""
        return lease_domain(self.db, run_id, domain, holder, ask)

    def backoffs(self, run_id: str, now: float) -> dict[str, float]:
        """The run's domains backed off at ``now``, with their back-off's end."""
        rows = self.db.conn.execute(
            "SELECT domain, state FROM domains WHERE run_id = ?", (run_id,)
        ).fetchall()
        return {d: until for d, raw in rows if (until := backoff_of(json.loads(raw), now))}


def migrate(db: Database) -> None:
    """Add the claim's attempt token to a seen-set made by an older fanout."""
    columns = {r[1] for r in db.conn.execute("PRAGMA table_info(seen)")}
    if "token" not in columns:
        with db.write() as conn:
            conn.execute("ALTER TABLE seen ADD COLUMN token TEXT")


def claim_fingerprints(
    db: Database, run_id: str, owner: str, token: str, fingerprints: Sequence[str]
) -> set[str]:
    """Claim each fingerprint for attempt ``token`` of chunk ``owner`` unless a
    live claim of another chunk holds it; the ones ``owner`` holds now. A claim
    of an earlier attempt of ``owner`` is re-stamped with ``token``; a stale
    claim of another chunk is taken over."""
    wanted = list(dict.fromkeys(fingerprints))
    if not wanted:
        return set()
    held: set[str] = set()
    with db.write() as conn:
        for start in range(0, len(wanted), _BATCH):
            part = wanted[start : start + _BATCH]
            marks = ",".join("?" * len(part))
            rows = conn.execute(
                "SELECT s.fingerprint, s.owner, s.token, t.state, t.lease_token, t.committed_by"
                " FROM seen s LEFT JOIN tasks t"
                " ON t.run_id = s.run_id AND t.chunk_id = s.owner AND t.seq = 0"
                f" WHERE s.run_id = ? AND s.fingerprint IN ({marks})",
                (run_id, *part),
            ).fetchall()
            claimed = {r[0]: r for r in rows}
            take: list[str] = []
            for fp in part:
                row = claimed.get(fp)
                if row is None:
                    take.append(fp)
                elif row[1] == owner:
                    if row[2] != token:
                        take.append(fp)
                    else:
                        held.add(fp)
                elif not claim_is_live(row[2], row[3], row[4], row[5]):
                    take.append(fp)
            conn.executemany(
                "INSERT INTO seen (run_id, fingerprint, owner, token) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (run_id, fingerprint) DO UPDATE"
                " SET owner = excluded.owner, token = excluded.token",
                [(run_id, fp, owner, token) for fp in take],
            )
            held.update(take)
    return held


def lease_domain(
    db: Database, run_id: str, domain: str, holder: str, ask: DomainAsk
) -> DomainGrant:
    """Apply :func:`~fanout.backends.crawlstate.grant_domain` to the stored lease."""
    with db.write() as conn:
        row = conn.execute(
            "SELECT state FROM domains WHERE run_id = ? AND domain = ?", (run_id, domain)
        ).fetchone()
        state = json.loads(row[0]) if row else {}
        grant = grant_domain(state, holder, ask)
        conn.execute(
            "INSERT INTO domains (run_id, domain, state) VALUES (?, ?, ?)"
            " ON CONFLICT (run_id, domain) DO UPDATE SET state = excluded.state",
            (run_id, domain, dump_state(state)),
        )
    return grant
