"""A commit's counters on DynamoDB: a crawl's per-domain ones on an item per
run and domain, the others in the run item, past a budget after the commit.

A commit's stats are summed into the run item (``stats.<name>``), except the
per-domain ones (``domain/<domain>/<what>``, ``fanout.crawl.stats``): those go
to ``RUN#<run> / DSTAT#<domain>``, each counter a top-level number attribute
``c/<what>`` that the commit ``ADD``s to. Summed into the run item they broke
two of DynamoDB's limits: the commit's update expression passed 4 KB at about
30 domains in one chunk (the commit was refused, and the chunk with it), and
the run item passed 400 KB after some thousands of domains in a run. A domain
item stays small (a few counters), and one ``ADD`` of a domain is a short
expression.

The run's own counters are summed in the commit's update of the run item, up
to :data:`STATS_IN_COMMIT` names (each costs about 55 bytes of that update's
4 KB expression); a job's ``ctx.stats`` may count by name freely (by country,
by status code), so the names past that go to the run item right after, in
updates of at most :data:`STATS_PER_UPDATE` names.

The domain items of a commit go into its transaction while it has room (100
items, less the task, the run and the orphans it cancels); they and the run's
counters past the budget are added right after the commit, in transactions
guarded by the commit (the task done by this token), each with an idempotency
token kept across the tries of its batch, so a call that landed but whose
answer was lost counts nothing twice; only a transaction DynamoDB cancelled
(which wrote nothing) is tried under a new token. A worker that dies between
its commit and those leaves them uncounted: these are figures for ``fanout
status``, and they never count a page twice.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

from fanout.backends.aws.ledger_items import (
    DynamoTable,
    Item,
    _av,
    _key,
    _run_key,
    _run_pk,
    _sum_stats,
    _task_key,
)
from fanout.backends.base import DOMAIN_STATS, TaskKey, TaskState

log = logging.getLogger(__name__)

#: The sort key prefix of a run's domain stat items.
_DSTAT = "DSTAT#"
#: The prefix of a counter attribute of a domain stat item (apart from pk, sk).
_COUNTER = "c/"
#: A sort key is at most 1,024 bytes: a longer domain is cut and told by a digest.
_MAX_DOMAIN_BYTES = 900
#: Transactions tried per batch of domain items added after a commit.
_TRIES = 5
#: The run's own counter names summed in a commit's transaction (see above).
STATS_IN_COMMIT = 40
#: Counter names a follow-up update of the run item sums, at most.
STATS_PER_UPDATE = 60


def split_stats(stats: Mapping[str, int]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """``stats`` as (the run's own counters, ``{domain: {what: n}}``)."""
    own: dict[str, int] = {}
    domains: dict[str, dict[str, int]] = {}
    for name, value in stats.items():
        domain, slash, what = name[len(DOMAIN_STATS) :].partition("/")
        if name.startswith(DOMAIN_STATS) and slash and domain and what:
            domains.setdefault(domain, {})[what] = int(value)
        else:
            own[name] = int(value)
    return own, domains


def _domain_sk(domain: str) -> str:
    raw = domain.encode()
    if len(raw) <= _MAX_DOMAIN_BYTES:
        return _DSTAT + domain
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return f"{_DSTAT}{raw[:_MAX_DOMAIN_BYTES].decode(errors='ignore')}~{digest}"


class DomainStats(DynamoTable):
    """The domain stat items of a run: written with (and after) a commit, read
    for ``fanout status`` and the dashboard."""

    def _domain_entries(self, run_id: str, domains: Mapping[str, Mapping[str, int]]) -> list[Item]:
        """One transaction entry per domain: ``ADD`` its counters."""
        entries = []
        for domain, counters in domains.items():
            names = {f"#c{i}": _COUNTER + what for i, what in enumerate(counters)}
            values = {f":c{i}": _av(int(n)) for i, n in enumerate(counters.values())}
            names["#d"] = "domain"
            values[":d"] = _av(domain)
            adds = ", ".join(f"#c{i} :c{i}" for i in range(len(counters)))
            update = {
                "TableName": self.table,
                "Key": _key(_run_pk(run_id), _domain_sk(domain)),
                "UpdateExpression": f"SET #d = :d ADD {adds}",
                "ExpressionAttributeNames": names,
                "ExpressionAttributeValues": values,
            }
            entries.append({"Update": update})
        return entries

    def _run_stats_entries(self, run_id: str, stats: Mapping[str, int]) -> list[Item]:
        """Updates of the run item summing ``stats``, :data:`STATS_PER_UPDATE` names each."""
        names = list(stats)
        entries = []
        for start in range(0, len(names), STATS_PER_UPDATE):
            update: Item = {
                "TableName": self.table,
                "Key": _run_key(run_id),
                "UpdateExpression": "SET #u = #u",  # _sum_stats adds its clauses before it
                "ExpressionAttributeNames": {"#u": "updated_at"},
                "ExpressionAttributeValues": {},
            }
            _sum_stats(update, {n: stats[n] for n in names[start : start + STATS_PER_UPDATE]})
            entries.append({"Update": update})
        return entries

    def _add_after_commit(self, key: TaskKey, token: str, batches: list[list[Item]]) -> None:
        """Add what a commit had no room for (each batch one transaction; an item
        at most once in a batch), each batch only while the task is done by
        ``token`` (never for an attempt that lost)."""
        guard = {
            "ConditionCheck": {
                "TableName": self.table,
                "Key": _task_key(key),
                "ConditionExpression": "#s = :done AND #by = :t",
                "ExpressionAttributeNames": {"#s": "state", "#by": "committed_by"},
                "ExpressionAttributeValues": {
                    ":done": _av(TaskState.DONE.value),
                    ":t": _av(token),
                },
            }
        }
        for number, entries in enumerate(batches):
            cancelled = 0
            for attempt in range(_TRIES):
                # One token per batch, kept while a call may have landed (a lost
                # answer, a timeout): DynamoDB applies a token once. Only a
                # cancelled transaction, which wrote nothing, gets a new one.
                seed = f"{key.run_id}|{key.chunk_id}|{key.seq}|{token}|{number}|{cancelled}"
                request = hashlib.sha256(seed.encode()).hexdigest()[:36]
                try:
                    reasons = self._transact([guard, *entries], token=request)
                except Exception as exc:  # the answer lost: the same token again
                    why: object = exc
                else:
                    if reasons is None:
                        break
                    if reasons[0] == "ConditionalCheckFailed":
                        return  # the task is not ours any more (replayed): nothing to add
                    cancelled += 1
                    why = f"cancelled ({', '.join(reasons)})"
                if attempt == _TRIES - 1:
                    log.warning("task %s: stats not all counted: %s", key, why)
                    return

    def domain_stats(self, run_id: str) -> dict[str, int]:
        """The run's per-domain counters, as ``domain/<domain>/<what>``."""
        out: dict[str, int] = {}
        items = self._query(
            KeyConditionExpression="pk = :pk AND begins_with(sk, :dstat)",
            ExpressionAttributeValues={":pk": _av(_run_pk(run_id)), ":dstat": _av(_DSTAT)},
        )
        for item in items:
            domain = item.get("domain", {}).get("S", "")
            for name, value in item.items():
                if name.startswith(_COUNTER) and "N" in value:
                    out[f"{DOMAIN_STATS}{domain}/{name[len(_COUNTER) :]}"] = int(value["N"])
        return out
