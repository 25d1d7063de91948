"""The crawl-state contract: every backend's ``Backend.crawl`` (the seen-set and
domain leases of crawl runs, :class:`fanout.backends.crawlstate.CrawlState`)
keeps these promises."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from fanout.backends.base import (
    Backend,
    ClaimOutcome,
    Failure,
    FailureKind,
    NewTask,
    RunRecord,
    TaskEvent,
    TaskKey,
)
from fanout.backends.crawlstate import CrawlState, DomainAsk

RUN = "r1"
ROOT = TaskKey(RUN, "0", 0)


def _run(backend: Backend, run_id: str = RUN) -> None:
    record = RunRecord(run_id, "/jobs/x.py", "x", {}, {}, created_at=time.time())
    backend.ledger.create_run(record, NewTask("0", 0, 0, "{}"))


def _crawl(backend: Backend) -> CrawlState:
    assert backend.crawl is not None, f"the {backend.name} backend has no crawl state"
    return backend.crawl


def _claim_root(backend: Backend, token: str) -> ClaimOutcome:
    return backend.ledger.claim(ROOT, token, 30.0, 3, time.time()).outcome


def _ask(want: int, delay: float = 0.0, capacity: int = 4, in_use: int = 0) -> DomainAsk:
    now = time.time()
    return DomainAsk(capacity, delay, want, expires=now + 60, now=now, in_use=in_use)


def test_the_crawl_state_is_the_protocol_and_says_whether_processes_share_it(
    backend: Backend,
) -> None:
    crawl = _crawl(backend)
    assert isinstance(crawl, CrawlState)
    # Crawl chunks are forked processes: only the memory backend keeps its
    # state in one process (crawl jobs refuse to run on it).
    assert crawl.shared_across_processes is (backend.name != "memory")
    assert all(isinstance(v, int) for v in crawl.usage.values())


def test_claim_urls_gives_each_fingerprint_one_owner(backend: Backend) -> None:
    _run(backend)
    claim = _crawl(backend).claim_urls
    assert claim(RUN, "0/1", "t1", ["a", "b"]) == {"a", "b"}
    assert claim(RUN, "0/2", "t1", ["b", "c"]) == {"c"}
    # The same chunk asking again holds what it had, and nothing another holds.
    assert claim(RUN, "0/1", "t1", ["a", "b", "c", "d"]) == {"a", "b", "d"}
    _run(backend, "other")
    assert claim("other", "0/9", "t1", ["a"]) == {"a"}  # per run
    many = [f"fp{i}" for i in range(1200)]
    assert claim(RUN, "0/3", "t1", many) == set(many)
    assert claim(RUN, "0/4", "t1", many[::7]) == set()
    assert claim(RUN, "0/1", "t1", []) == set()
    assert claim(RUN, "0/5", "t1", ["e", "e"]) == {"e"}  # a batch may repeat one


def test_claims_of_an_attempt_that_never_committed_are_taken_over(backend: Backend) -> None:
    """A claim holds while its attempt runs or once it committed; a failed
    attempt's claims go to the next chunk that finds the same links, and a later
    attempt of the same chunk re-stamps what it finds again."""
    _run(backend)
    claim = _crawl(backend).claim_urls
    assert _claim_root(backend, "t1") == ClaimOutcome.CLAIMED
    assert claim(RUN, "0", "t1", ["a", "b", "c"]) == {"a", "b", "c"}
    assert claim(RUN, "0/9", "x", ["a"]) == set()  # the attempt is running: a holds
    assert backend.ledger.retry(ROOT, "t1", Failure(FailureKind.ERROR, "boom"), 0, time.time())
    # Attempt t1 failed: its claims are stale and another chunk takes a over...
    assert claim(RUN, "0/9", "x", ["a"]) == {"a"}
    assert _claim_root(backend, "t2") == ClaimOutcome.CLAIMED
    # ... while attempt t2 of the same chunk takes back b (a is 0/9's now).
    assert claim(RUN, "0", "t2", ["a", "b"]) == {"b"}
    assert claim(RUN, "0/8", "y", ["b"]) == set()  # re-stamped: t2 is running
    settle = backend.ledger.commit(ROOT, "t2", None, TaskEvent.COMMITTED, time.time())
    assert settle.ok
    # Committed by t2: b holds for good; c, claimed by t1 only, does not.
    assert claim(RUN, "0/8", "y", ["b", "c"]) == {"c"}


def test_a_domain_without_delay_is_shared_evenly_between_chunks(backend: Backend) -> None:
    _run(backend)
    lease = _crawl(backend).lease_domain
    assert lease(RUN, "a.test", "0/1", _ask(4)).slots == 4
    # A second chunk finds every slot in use: it waits, and counts in the shares.
    second = lease(RUN, "a.test", "0/2", _ask(4))
    assert (second.slots, second.holders) == (0, 2) and second.retry_after > 0
    assert lease(RUN, "a.test", "0/1", _ask(4)).slots == 2  # the first gives half back
    assert lease(RUN, "a.test", "0/2", _ask(4)).slots == 2
    # Another domain, and another run, are leased on their own.
    assert lease(RUN, "b.test", "0/2", _ask(4)).slots == 4
    _run(backend, "other")
    assert lease("other", "a.test", "0/7", _ask(4)).slots == 4


def test_a_domain_with_a_delay_is_leased_whole_and_freed_a_delay_after_release(
    backend: Backend,
) -> None:
    _run(backend)
    lease = _crawl(backend).lease_domain
    # Leased whole: every slot to one chunk, as one Scrapy process would crawl it.
    first = lease(RUN, "a.test", "0/1", _ask(1, delay=1.0))
    assert (first.slots, first.delay) == (4, 1.0)
    assert lease(RUN, "a.test", "0/2", _ask(1, delay=1.0)).slots == 0
    released = time.time()
    assert lease(RUN, "a.test", "0/1", _ask(0, delay=1.0)).slots == 0  # lets it go
    second = lease(RUN, "a.test", "0/2", _ask(1))
    # The run keeps the largest delay any chunk asked with, and the next holder
    # starts no sooner than a delay after the previous one let go.
    assert (second.slots, second.delay) == (4, 1.0)
    assert second.start_after >= released + 1.0 - 0.01


def test_a_domain_back_off_is_kept_for_every_chunk_and_listed_until_it_ends(
    backend: Backend,
) -> None:
    _run(backend)
    crawl = _crawl(backend)
    crawl.lease_domain(RUN, "b.test", "0/2", _ask(2))
    now = time.time()
    until = now + 30.0
    ask = _ask(2)
    told = crawl.lease_domain(
        RUN,
        "a.test",
        "0/1",
        DomainAsk(ask.capacity, ask.delay, ask.want, ask.expires, ask.now, backoff_until=until),
    )
    assert told.backoff_until == until
    # Another chunk asking for the domain is told the same back-off.
    assert crawl.lease_domain(RUN, "a.test", "0/3", _ask(2)).backoff_until == until
    assert crawl.backoffs(RUN, time.time()) == {"a.test": until}
    assert crawl.backoffs(RUN, until + 1) == {}
    assert crawl.backoffs("another-run", time.time()) == {}


def test_the_latest_good_answer_any_chunk_reported_is_told_to_every_chunk(
    backend: Backend,
) -> None:
    """What tells a broken page from a site that is away (fanout.crawl.throttle)."""
    _run(backend)
    crawl = _crawl(backend)
    assert crawl.lease_domain(RUN, "a.test", "0/1", _ask(2)).answered_at == 0.0
    now = time.time()
    crawl.lease_domain(RUN, "a.test", "0/1", replace(_ask(2), answered_at=now - 5))
    crawl.lease_domain(RUN, "a.test", "0/2", replace(_ask(2), answered_at=now))
    # An older report does not move it back; another domain has its own.
    crawl.lease_domain(RUN, "a.test", "0/1", replace(_ask(2), answered_at=now - 5))
    assert crawl.lease_domain(RUN, "a.test", "0/3", _ask(2)).answered_at == now
    assert crawl.lease_domain(RUN, "b.test", "0/3", _ask(2)).answered_at == 0.0
    # Letting a domain go keeps it too.
    assert crawl.lease_domain(RUN, "a.test", "0/2", _ask(0)).answered_at == now


def test_another_process_sees_the_claims_and_leases(
    backend: Backend, open_same: Callable[[], Backend]
) -> None:
    _run(backend)
    crawl = _crawl(backend)
    assert crawl.claim_urls(RUN, "0/1", "t1", ["a"]) == {"a"}
    assert crawl.lease_domain(RUN, "a.test", "0/1", _ask(4)).slots == 4
    other = _crawl(open_same())
    assert other.claim_urls(RUN, "0/2", "t1", ["a", "b"]) == {"b"}
    assert other.lease_domain(RUN, "a.test", "0/2", _ask(4)).slots == 0
