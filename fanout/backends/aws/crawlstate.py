"""A crawl's run-wide state on DynamoDB: the seen-set and the domain leases.

Seen items are ``RUN#<run> / SEEN#<fingerprint>`` with the claiming chunk and
its attempt token, and nothing else: no index, so a new URL costs one write
unit (a conditional put of an item under 1 KB). A claim is checked in bulk
first (one consistent ``BatchGetItem`` per 100 fingerprints, half a read unit
each), so fingerprints another chunk already holds cost no write at all; only
the free ones, and stale claims of attempts that never committed (rare: a
chunk that crashed), are written. Who owns a claim is looked up on the owner's
task item, once per owner and chunk process (:mod:`fanout.backends.crawlstate`).

A domain lease is one item, ``RUN#<run> / DOMAIN#<domain>``, read and then
written back conditional on its version.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.exceptions import ClientError

from fanout.backends.aws.ledger_items import DynamoTable, _key, _run_pk, _task_sk
from fanout.backends.crawlstate import (
    DomainAsk,
    DomainGrant,
    backoff_of,
    claim_is_live,
    dump_state,
    grant_domain,
)

#: Conditional writes to a domain lease retried when another chunk wrote first.
_LEASE_TRIES = 8
#: The sort key prefix of a run's domain lease items.
_DOMAIN = "DOMAIN#"


def _conflict(exc: ClientError) -> bool:
    code: str = exc.response.get("Error", {}).get("Code", "")
    return code == "ConditionalCheckFailedException"


class DynamoCrawlState(DynamoTable):
    """The :class:`~fanout.backends.crawlstate.CrawlState` in the ledger's table.

    ``usage`` counts the capacity units these calls consume (every item
    here is under 1 KB: a write is 1 unit, a failed conditional write too; a
    strongly consistent read of an item is 1 read unit), so a crawl reports
    what its seen-set and leases cost."""

    #: Forked crawl chunks see these writes (it is a remote service).
    shared_across_processes = True

    #: Claims, per (run, owner, token), known to hold without asking again:
    #: those whose attempt committed (a running one may still fail).
    _live_owners: dict[tuple[str, str, str], float]

    @property
    def crawl_usage(self) -> Counter[str]:
        """Capacity units consumed by the crawl state's calls so far."""
        usage: Counter[str] = self.__dict__.setdefault("_crawl_usage", Counter())
        return usage

    @property
    def usage(self) -> Mapping[str, int]:
        """Capacity units consumed by this process's calls so far."""
        return dict(self.crawl_usage)

    def claim_urls(
        self, run_id: str, owner: str, token: str, fingerprints: Sequence[str]
    ) -> set[str]:
        """Claim fingerprints for attempt ``token`` of chunk ``owner``; the ones
        it holds now."""
        wanted = list(dict.fromkeys(fingerprints))
        if not wanted:
            return set()
        pk = _run_pk(run_id)
        usage = self.crawl_usage
        usage["read_units"] += len(wanted)
        seen = self._batch_get([_key(pk, f"SEEN#{fp}") for fp in wanted], ["owner", "token"])
        held: set[str] = set()
        free: list[str] = []
        stale: dict[str, tuple[str, str | None]] = {}
        foreign: dict[str, tuple[str, str | None]] = {}
        for fp in wanted:
            item = seen.get(f"SEEN#{fp}")
            if item is None:
                free.append(fp)
                continue
            by, by_token = item["owner"]["S"], item.get("token", {}).get("S")
            if by == owner:
                if by_token == token:
                    held.add(fp)
                else:  # an earlier attempt of this chunk: stamp it with this one
                    stale[fp] = (by, by_token)
            else:
                foreign[fp] = (by, by_token)
        live = self._owners_live(run_id, set(foreign.values()))
        stale.update({fp: claim for fp, claim in foreign.items() if not live[claim]})
        writes = [(fp, None) for fp in free] + list(stale.items())
        usage["write_units"] += len(writes)
        if len(writes) <= 1:
            won = [fp for fp, prior in writes if self._claim_url(run_id, owner, token, fp, prior)]
        else:
            # boto3 clients are thread-safe; a few threads hide the round trips.
            with ThreadPoolExecutor(max_workers=min(8, len(writes))) as pool:
                flags = pool.map(lambda w: self._claim_url(run_id, owner, token, *w), writes)
                won = [w[0] for w, ok in zip(writes, flags, strict=True) if ok]
        held.update(won)
        return held

    def _owners_live(
        self, run_id: str, claims: set[tuple[str, str | None]]
    ) -> dict[tuple[str, str | None], bool]:
        """Whether each (owner, token) claim holds, from the owners' task items."""
        cache: dict[tuple[str, str, str], float] = self.__dict__.setdefault("_live_owners", {})
        out: dict[tuple[str, str | None], bool] = {}
        ask: set[str] = set()
        now = time.monotonic()
        for owner, token in claims:
            if cache.get((run_id, owner, token or ""), 0.0) > now:
                out[(owner, token)] = True
            else:
                ask.add(owner)
        if ask:
            pk = _run_pk(run_id)
            self.crawl_usage["read_units"] += len(ask)
            tasks = self._batch_get(
                [_key(pk, _task_sk(o, 0)) for o in sorted(ask)],
                ["state", "lease_token", "committed_by"],
            )
            for owner, token in claims:
                if (owner, token) in out:
                    continue
                task = tasks.get(_task_sk(owner, 0)) or {}
                committed_by = task.get("committed_by", {}).get("S")
                alive = claim_is_live(
                    token,
                    task["state"]["S"] if task else None,
                    task.get("lease_token", {}).get("S"),
                    committed_by,
                )
                out[(owner, token)] = alive
                if committed_by == token:  # final: a committed task never changes
                    cache[(run_id, owner, token or "")] = math.inf
        return out

    def _claim_url(
        self,
        run_id: str,
        owner: str,
        token: str,
        fingerprint: str,
        prior: tuple[str, str | None] | None,
    ) -> bool:
        """Write the claim: new (no item), or over the ``prior`` claim seen."""
        params: dict[str, Any] = {
            "TableName": self.table,
            "Item": {
                **_key(_run_pk(run_id), f"SEEN#{fingerprint}"),
                "owner": {"S": owner},
                "token": {"S": token},
            },
            "ConditionExpression": "attribute_not_exists(pk)",
        }
        if prior is not None:
            # Over a stale claim: only if it is still the claim that was judged.
            was_token = prior[1]
            params["ConditionExpression"] = "#owner = :was AND " + (
                "#token = :was_token" if was_token is not None else "attribute_not_exists(#token)"
            )
            params["ExpressionAttributeNames"] = {"#owner": "owner", "#token": "token"}
            params["ExpressionAttributeValues"] = {":was": {"S": prior[0]}}
            if was_token is not None:
                params["ExpressionAttributeValues"][":was_token"] = {"S": was_token}
        try:
            self.client.put_item(**params)
        except ClientError as exc:
            if _conflict(exc):
                return False
            raise
        return True

    def backoffs(self, run_id: str, now: float) -> dict[str, float]:
        """The run's domains backed off at ``now``, with their back-off's end
        (one query of the run's domain items; eventually consistent: for display)."""
        items = self._query(
            KeyConditionExpression="pk = :pk AND begins_with(sk, :domain)",
            ExpressionAttributeValues={
                ":pk": {"S": _run_pk(run_id)},
                ":domain": {"S": _DOMAIN},
            },
            ProjectionExpression="sk, lease",
        )
        found: dict[str, float] = {}
        for item in items:
            until = backoff_of(json.loads(item["lease"]["S"]), now)
            if until:
                found[item["sk"]["S"].removeprefix(_DOMAIN)] = until
        return found

    def lease_domain(self, run_id: str, domain: str, holder: str, ask: DomainAsk) -> DomainGrant:
        """Lease slots of ``domain`` to chunk ``holder``: read, decide, write back
        conditional on the version read (again when another chunk wrote first)."""
        key = _key(_run_pk(run_id), f"{_DOMAIN}{domain}")
        for _ in range(_LEASE_TRIES):
            self.crawl_usage["read_units"] += 1
            self.crawl_usage["write_units"] += 1
            item = self._get(key, ["lease", "ver"])
            state = json.loads(item["lease"]["S"]) if item else {}
            version = int(item["ver"]["N"]) if item else 0
            grant = grant_domain(state, holder, ask)
            try:
                self.client.put_item(
                    TableName=self.table,
                    Item={**key, "lease": {"S": dump_state(state)}, "ver": {"N": str(version + 1)}},
                    ConditionExpression="attribute_not_exists(pk)" if item is None else "ver = :v",
                    **(
                        {}
                        if item is None
                        else {"ExpressionAttributeValues": {":v": {"N": str(version)}}}
                    ),
                )
            except ClientError as exc:
                if _conflict(exc):
                    continue
                raise
            return grant
        return DomainGrant(0, retry_after=0.5)
