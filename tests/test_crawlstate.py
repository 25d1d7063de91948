"""The rules of a crawl's run-wide state (``fanout.backends.crawlstate``), pure:
which seen-set claims hold, and how a domain's slots are leased to chunks."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fanout.backends.crawlstate import DomainAsk, backoff_of, claim_is_live, grant_domain


def ask(now: float, *, want: int = 8, delay: float = 0.0, in_use: int = 0) -> DomainAsk:
    return DomainAsk(capacity=8, delay=delay, want=want, expires=now + 60, now=now, in_use=in_use)


def test_a_claim_holds_while_its_attempt_runs_or_once_it_committed() -> None:
    assert claim_is_live("t1", "running", "t1", None)
    assert claim_is_live("t1", "done", None, "t1")
    assert claim_is_live("t1", None, None, None)  # no such task: kept, to be safe
    assert not claim_is_live("t1", "running", "t2", None)  # a later attempt took over
    assert not claim_is_live("t1", "queued", "t1", None)  # failed, waiting for a retry
    assert not claim_is_live("t1", "done", None, "t2")  # committed by another attempt
    assert not claim_is_live("t1", "dead", None, None)


def test_shared_slots_never_exceed_the_capacity_and_a_newcomer_gets_its_share() -> None:
    state: dict[str, Any] = {}
    assert grant_domain(state, "a", ask(0)).slots == 8
    # b is told to wait, but now counts in the shares ...
    waiting = grant_domain(state, "b", ask(1))
    assert (waiting.slots, waiting.holders) == (0, 2)
    # ... so a, asking again with 8 still in flight, is trimmed to 4 but charged 8,
    trimmed = grant_domain(state, "a", ask(2, in_use=8))
    assert trimmed.slots == 4 and state["holders"]["a"][0] == 8
    assert grant_domain(state, "b", ask(3)).slots == 0  # 8 of 8 still in flight
    # and once its requests finished, b gets the other half.
    grant_domain(state, "a", ask(4, in_use=2))
    assert grant_domain(state, "b", ask(5)).slots == 4
    assert sum(v[0] for v in state["holders"].values()) <= 8
    # Letting go gives the slots back.
    grant_domain(state, "a", ask(6, want=0))
    assert grant_domain(state, "b", ask(7)).slots == 8


def test_with_a_delay_the_domain_is_leased_whole_and_spaced_after_the_last_holder() -> None:
    state: dict[str, Any] = {}
    first = grant_domain(state, "a", ask(0, delay=0.5))
    assert first.slots == 8 and first.start_after == 0.0
    refused = grant_domain(state, "b", ask(1, delay=0.5))
    assert refused.slots == 0 and refused.retry_after >= 0.5
    grant_domain(state, "a", ask(10, want=0, delay=0.5))  # let go at t=10
    granted = grant_domain(state, "b", ask(10.1, delay=0.5))
    assert granted.slots == 8 and granted.start_after == 10.5


def test_the_largest_delay_any_chunk_asked_with_holds_for_every_chunk() -> None:
    state: dict[str, Any] = {}
    grant_domain(state, "a", ask(0, delay=2.0))  # a read robots.txt: Crawl-delay 2
    grant_domain(state, "a", ask(5, want=0, delay=2.0))
    later = grant_domain(state, "b", ask(5.5))  # b has not read it yet
    assert (later.delay, later.slots, later.start_after) == (2.0, 8, 7.0)


def test_a_holder_that_never_let_go_frees_the_domain_a_delay_after_its_lease_lapsed() -> None:
    state: dict[str, Any] = {}
    grant_domain(state, "a", DomainAsk(capacity=2, delay=1.0, want=2, expires=30, now=0))
    assert grant_domain(state, "b", ask(29, delay=1.0)).slots == 0
    late = grant_domain(state, "b", ask(30.5, delay=1.0))  # a crashed; lapsed at 30
    assert (late.slots, late.start_after) == (8, 31.0)


def test_a_back_off_any_chunk_asks_for_is_told_to_every_chunk_until_it_ends() -> None:
    state: dict[str, Any] = {}
    grant_domain(state, "a", ask(0))
    grant_domain(state, "b", ask(0))
    # a got a 429 at t=1 and asks the run to leave the site alone until t=31.
    told = grant_domain(state, "a", replace(ask(1, in_use=2), backoff_until=31.0))
    assert told.backoff_until == 31.0 and told.slots > 0  # the lease itself is kept
    # b learns it at its next renewal; a shorter back-off asked later does not shorten it.
    assert grant_domain(state, "b", ask(2)).backoff_until == 31.0
    assert grant_domain(state, "b", replace(ask(3), backoff_until=10.0)).backoff_until == 31.0
    assert backoff_of(state, 30.0) == 31.0
    # Once it is over, nothing is left of it in the state, and grants carry none.
    assert grant_domain(state, "c", ask(31.5)).backoff_until == 0.0
    assert "backoff_until" not in state and backoff_of(state, 31.5) == 0.0


def test_slots_let_go_are_kept_a_moment_for_a_newcomer_not_for_the_other_holders() -> None:
    # a and b share 8 slots; a's chunk ends and lets its 4 go. b, asking again,
    # does not grow into them for a moment: c, the next chunk of a's worker,
    # gets them at once instead of waiting for b to trim itself.
    state: dict[str, Any] = {}
    assert grant_domain(state, "a", ask(0)).slots == 8
    assert grant_domain(state, "b", ask(0.1)).slots == 0
    assert grant_domain(state, "a", ask(0.2, in_use=4)).slots == 4
    assert grant_domain(state, "b", ask(0.3)).slots == 4
    grant_domain(state, "a", ask(1.0, want=0))
    assert grant_domain(state, "b", ask(1.1, in_use=4)).slots == 4  # held back
    assert grant_domain(state, "c", ask(1.3)).slots == 4
    assert sum(v[0] for v in state["holders"].values()) <= 8
    # Once the moment is over, a holder alone gets everything again.
    grant_domain(state, "c", ask(1.5, want=0))
    assert grant_domain(state, "b", ask(1.6, in_use=4)).slots == 4
    assert grant_domain(state, "b", ask(2.6, in_use=4)).slots == 8
