"""The rules of a crawl's run-wide state, written once for every ledger.

**The seen-set.** Each request fingerprint of a crawl run is claimed by the
chunk that first finds it, stamped with that chunk's attempt (its lease token).
A claim holds while the attempt that made it can still count: it is running,
or it committed. An attempt that failed, timed out or was taken over never
committed, so none of its children exist and nothing will fetch what it
claimed: its claims are *stale*, and the next chunk that finds the same link
takes them over. Nothing is released eagerly, so the seen-set needs no index by
owner (on DynamoDB, an index would double the write units of every new URL).

**Domain slots.** Politeness is run-wide: every chunk that crawls a domain
leases some of the domain's ``CONCURRENT_REQUESTS_PER_DOMAIN`` slots, and with
a download delay the domain is leased whole, one chunk at a time, no sooner
than the delay after the previous holder let it go. A lease expires with its
holder's hard timeout, so a crashed chunk never blocks a domain for long.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

#: A task's state while an attempt holds its lease (``TaskState.RUNNING``; this
#: module sits below ``base`` and does not import it).
_RUNNING = "running"


def claim_is_live(
    claim_token: str | None,
    owner_state: str | None,
    owner_lease_token: str | None,
    owner_committed_by: str | None,
) -> bool:
    """Whether a seen-set claim made by attempt ``claim_token`` still holds,
    given its owner task (``owner_state`` None: no such task, which holds, to be
    safe: a claim is only taken over when its attempt provably never counts)."""
    if owner_state is None or claim_token is None:
        return True
    if owner_committed_by == claim_token:
        return True
    return owner_state == _RUNNING and owner_lease_token == claim_token


@dataclass(frozen=True, slots=True)
class DomainAsk:
    """A chunk's request for a domain's slots.

    ``capacity`` is the domain's run-wide ``CONCURRENT_REQUESTS_PER_DOMAIN``;
    ``delay`` its download delay (0: slots are shared between chunks; more: the
    domain is leased whole); ``want`` the slots asked for (0 lets the lease go);
    ``in_use`` the requests the holder still has in flight (a holder trimmed to
    a smaller share keeps counting those until they finish); ``expires`` when
    the lease lapses if never let go (the holder's hard timeout);
    ``backoff_until`` when a back-off the holder was asked for ends (the site
    answered 429/503: its ``Retry-After``, or fanout's own back-off), 0 for
    none; all times are wall-clock seconds.
    """

    capacity: int
    delay: float
    want: int
    expires: float
    now: float
    in_use: int = 0
    backoff_until: float = 0.0
    #: When the holder last had a good answer from the domain (0: never).
    answered_at: float = 0.0


@dataclass(frozen=True, slots=True)
class DomainGrant:
    """What a chunk may send to one domain: ``slots`` requests at once (0: none
    now, ask again after ``retry_after`` seconds); ``start_after`` is the
    earliest wall-clock time of its first request (the previous holder's
    release plus the delay); ``holders`` counts the chunks sharing the domain;
    ``delay`` is the domain's delay as the run knows it (the largest any chunk
    asked with: a robots.txt ``Crawl-delay`` one chunk read holds for all);
    ``backoff_until`` the end of the domain's back-off, run-wide (0: none now):
    until then no chunk sends it anything new, whichever chunk was told."""

    slots: int
    retry_after: float = 0.0
    start_after: float = 0.0
    holders: int = 1
    delay: float = 0.0
    backoff_until: float = 0.0
    #: The latest good answer from the domain any chunk of the run reported
    #: (0: none): a page failing after it is the page's, not the site's.
    answered_at: float = 0.0


def grant_domain(state: dict[str, Any], holder: str, ask: DomainAsk) -> DomainGrant:
    """Update a domain's lease ``state`` in place for ``holder``; returns the grant.

    ``state`` is ``{"holders": {holder: [slots, expires]}, "free_at": t}``. A
    holder with 0 slots is a chunk waiting for some: it counts in the shares,
    so the holders that have slots give some up when they ask again.
    With a delay (the largest any chunk asked with) the domain is exclusive
    (all slots to one holder, as one Scrapy process would crawl it). Without
    one, a holder gets at most an even share, ``ceil(capacity / holders)``, of
    what the others do not use.

    Without a delay, the slots a holder lets go while others share the domain
    are kept :data:`RESERVE_FOR` seconds for a newcomer (``state["reserved"]``):
    chunks follow one another on each worker, and a newcomer refused because
    another holder grew into them would wait for that holder to trim itself.

    ``state["backoff_until"]`` is the domain's run-wide back-off: the latest end
    any chunk asked for, kept while it lasts, returned with every grant; and
    ``state["answered_at"]`` the latest good answer any chunk reported.
    """
    backoff = max(ask.backoff_until, float(state.get("backoff_until", 0.0)))
    if backoff > ask.now:
        state["backoff_until"] = backoff
    else:
        state.pop("backoff_until", None)  # over: the state stays as small as before
        backoff = 0.0
    answered = max(ask.answered_at, float(state.get("answered_at", 0.0)))
    if answered:
        state["answered_at"] = answered
    grant = _grant_slots(state, holder, ask)
    return replace(grant, backoff_until=backoff, answered_at=answered)


def backoff_of(state: dict[str, Any], now: float) -> float:
    """The end of a domain's back-off in its lease ``state``, 0 when none lasts at ``now``."""
    until = float(state.get("backoff_until", 0.0))
    return until if until > now else 0.0


#: Seconds the slots a holder lets go of a shared domain are kept for a
#: newcomer (see :func:`grant_domain`).
RESERVE_FOR = 1.0


def _grant_slots(state: dict[str, Any], holder: str, ask: DomainAsk) -> DomainGrant:
    """The slots part of :func:`grant_domain` (its ``state`` without the back-off)."""
    now = ask.now
    delay = max(ask.delay, float(state.get("delay", 0.0)))
    state["delay"] = delay
    before: dict[str, list[float]] = state.get("holders", {})
    others = {h: v for h, v in before.items() if v[1] > now and h != holder}
    free_at = float(state.get("free_at", 0.0))
    for h, v in before.items():
        if v[1] <= now and v[0] > 0 and h != holder:
            # A holder that never let go (it crashed, or was cut off with
            # requests in flight): the domain is free a delay after it lapsed.
            free_at = max(free_at, v[1] + delay)
    state["free_at"] = free_at
    if ask.want <= 0:
        state["holders"] = others
        if holder in before:
            state["free_at"] = max(free_at, now + delay)
            let_go = int(before[holder][0])
            if let_go > 0 and others and delay <= 0:
                # Kept a moment for a newcomer: the chunk that follows on the
                # same worker is on its way, and another holder growing into
                # the slots now would make it wait for that holder's trim.
                state["reserved"] = [let_go, now + RESERVE_FOR]
        return DomainGrant(0, delay=delay)
    if delay > 0:
        busy = [v for v in others.values() if v[0] > 0]
        if busy:
            state["holders"] = {**others, holder: [0, ask.expires]}
            retry = min(v[1] for v in busy) - now
            retry_after = max(0.5, min(retry, 2.0))
            return DomainGrant(0, retry_after=retry_after, holders=len(busy) + 1, delay=delay)
        # Exclusive: waiting chunks stay listed, so a holder can see them.
        state["holders"] = {**others, holder: [ask.capacity, ask.expires]}
        return DomainGrant(ask.capacity, start_after=free_at, holders=len(others) + 1, delay=delay)
    used = sum(int(v[0]) for v in others.values())
    share = max(1, math.ceil(ask.capacity / (len(others) + 1)))
    mine = before.get(holder)
    newcomer = mine is None or mine[1] <= now or mine[0] <= 0
    reserved = state.pop("reserved", None)
    kept = int(reserved[0]) if reserved and reserved[1] > now else 0
    # Slots let go a moment ago are for a newcomer only (never more in flight:
    # a reservation only holds the other holders back).
    free = ask.capacity - used - (0 if newcomer else kept)
    slots = max(0, min(ask.want, share, free))
    if kept and newcomer:
        kept -= slots
    if kept > 0 and reserved:
        state["reserved"] = [kept, reserved[1]]
    # What the holder is charged: its grant, or more while a larger earlier
    # grant is still in flight.
    state["holders"] = {**others, holder: [max(slots, ask.in_use), ask.expires]}
    if slots == 0:
        # The holders trim themselves at their next renewal (every 0.25 s).
        return DomainGrant(0, retry_after=0.25, holders=len(others) + 1)
    return DomainGrant(slots, holders=len(others) + 1)


@runtime_checkable
class CrawlState(Protocol):
    """A crawl run's shared state, kept by the backend beside its ledger: the
    run-wide seen-set and the per-domain politeness leases. Each method is
    atomic. Crawl jobs get it from ``Backend.crawl``; the contract suite in
    ``tests/contract/test_crawlstate_contract.py`` runs against every backend."""

    #: Whether a forked process (every crawl chunk runs in one) sees this
    #: state's writes, and the parent its child's: false for a backend that
    #: lives in one process's memory, on which crawl jobs refuse to run.
    shared_across_processes: bool

    def claim_urls(
        self, run_id: str, owner: str, token: str, fingerprints: Sequence[str]
    ) -> set[str]:
        """The run-wide seen-set: claim each fingerprint for attempt ``token``
        of chunk ``owner`` unless another chunk's live claim holds it (one
        whose attempt is running or committed, :func:`claim_is_live`); return
        those ``owner`` holds now. Stale claims (of attempts that never
        committed) are taken over, so nothing needs releasing."""

    def lease_domain(self, run_id: str, domain: str, holder: str, ask: DomainAsk) -> DomainGrant:
        """Lease slots of ``domain`` to chunk ``holder`` (run-wide politeness,
        :func:`grant_domain`)."""

    def backoffs(self, run_id: str, now: float) -> dict[str, float]:
        """The run's domains backed off at wall-clock ``now``, each with its
        back-off's end (``fanout status``)."""

    @property
    def usage(self) -> Mapping[str, int]:
        """What this process's calls consumed where it is billed (DynamoDB's
        ``read_units``/``write_units``); empty where nothing is."""


def dump_state(state: dict[str, Any]) -> str:
    """A lease state as the ledger stores it (compact JSON)."""
    return json.dumps(state, separators=(",", ":"), sort_keys=True)
