"""A crawl's run-wide state in SQLite: the seen-set and the domain leases.

Each call is one write transaction; the rules themselves are in
:mod:`fanout.backends.crawlstate`, shared with the DynamoDB ledger.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from fanout.backends.crawlstate import (
    DomainAsk,
    DomainGrant,
    claim_is_live,
    dump_state,
    grant_domain,
)
from fanout.backends.local.db import Database

#: SQLite's limit on host parameters in one statement, with room to spare.
_BATCH = 400


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
