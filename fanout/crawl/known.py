"""A worker's memory of the fingerprints its crawl chunks claimed, carried from
chunk to chunk of the same run so that a link to a page taken long ago is not
asked of the ledger again.

A claim is forever only once its attempt committed: the claims of an attempt
that failed are stale, and the next chunk to find those links takes them over
(:mod:`fanout.backends.crawlstate`). So an attempt's claims are trusted here
only once this worker knows that very attempt committed. It learns that from
the chunks it runs: each child chunk's payload carries its *lineage*, the
attempt token that committed each of its ancestors (a child exists only once
its parent committed, and the ledger's copy of its message, the one that
runs, is the committed attempt's). Claims of an attempt not (yet) known to
have committed are kept aside and trusted when a later lineage names it.

The trusted set is handed to the next forked chunk for free (the fork shares
it) and grows with what each chunk sends back; one set per worker process,
for the run it works on now (another run's chunk starts it afresh).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: Fingerprints remembered at most (a 32-character hex string and its set
#: slot take ~120 bytes: ~60 MB); past it, the chunks ask the ledger as before.
LIMIT = 500_000
#: Ancestors a lineage names at most (a run's chunks are at most 63
#: generations deep; longer lineages are cut to the nearest ancestors).
MAX_LINEAGE = 64


def parse_lineage(value: Any) -> dict[str, str]:
    """A payload's lineage as ``{chunk_id: token}``; anything else (an older
    fanout's payload, a malformed one) is an empty lineage: nothing trusted."""
    if not isinstance(value, dict) or len(value) > MAX_LINEAGE:
        return {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return {}
    return dict(value)


class KnownTaken:
    """Fingerprints claimed by committed attempts of one run's chunks."""

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.run_id = ""
        self.trusted: set[str] = set()
        self.committed: dict[str, str] = {}  # chunk id -> the token that committed it
        self.waiting: dict[tuple[str, str], list[str]] = {}  # (chunk id, token) -> claims

    def _for_run(self, run_id: str) -> None:
        if run_id != self.run_id:
            self.run_id = run_id
            self.trusted = set()
            self.committed.clear()
            self.waiting.clear()

    def learn(self, run_id: str, lineage: Mapping[str, str]) -> None:
        """The attempts named by a chunk's ``lineage`` committed: trust their claims."""
        self._for_run(run_id)
        for chunk_id, token in lineage.items():
            self.committed[chunk_id] = token
            for key in [k for k in self.waiting if k[0] == chunk_id]:
                claims = self.waiting.pop(key)
                if key[1] == token:
                    self._trust(claims)

    def remember(self, run_id: str, chunk_id: str, token: str, claims: Iterable[str]) -> None:
        """What attempt ``token`` of ``chunk_id`` claimed (trusted once it is known
        to have committed)."""
        self._for_run(run_id)
        claims = list(claims)
        if self.committed.get(chunk_id) == token:
            self._trust(claims)
        elif len(self.trusted) + sum(map(len, self.waiting.values())) < self.limit:
            self.waiting[(chunk_id, token)] = claims

    def _trust(self, claims: list[str]) -> None:
        if len(self.trusted) + len(claims) <= self.limit:
            self.trusted.update(claims)

    def known(self, run_id: str) -> set[str]:
        """The fingerprints of run ``run_id`` held by committed attempts (a chunk
        must not change the set: it is shared with the worker)."""
        self._for_run(run_id)
        return self.trusted


#: The worker process's memory (each forked chunk reads its own copy).
KNOWN = KnownTaken()
