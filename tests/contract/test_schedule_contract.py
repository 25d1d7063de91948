"""The ScheduleStore contract: the same tests against the local database (and
the memory backend's) and EventBridge Scheduler + DynamoDB under moto (the
``backend`` fixture of ``conftest.py``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from fanout.backends.base import Backend
from fanout.errors import UserError
from fanout.schedules import Schedule, ScheduleStore, open_store
from support.helpers import TREE

NOW = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(backend: Backend) -> Iterator[ScheduleStore]:
    opened = open_store(backend)
    yield opened
    opened.close()


def make(name: str = "pulse", **fields: object) -> Schedule:
    values: dict[str, object] = {
        "name": name,
        "expression": "*/5 * * * *",
        "job": TREE,
        "params": {"chunks": 2, "fail_chunks": [1]},
        "start": NOW,
        "created_at": NOW,
        **fields,
    }
    return Schedule.model_validate(values)


def test_add_get_list_remove(store: ScheduleStore) -> None:
    assert store.get("pulse") is None
    assert store.list() == []
    first = make(overlap="skip", catch_up="all")
    second = make("daily", expression="cron(0 6 ? * MON-FRI *)")
    store.add(first)
    store.add(second)
    assert store.get("pulse") == first
    assert [s.name for s in store.list()] == ["daily", "pulse"]
    assert store.list() == [second, first]
    assert store.remove("pulse") is True
    assert store.get("pulse") is None
    assert store.remove("pulse") is False
    assert [s.name for s in store.list()] == ["daily"]


def test_adding_a_taken_name_is_a_user_error(store: ScheduleStore) -> None:
    store.add(make())
    with pytest.raises(UserError, match="'pulse' exists"):
        store.add(make(expression="rate(1 hour)"))
    stored = store.get("pulse")
    assert stored is not None and stored.expression == "*/5 * * * *"


def test_a_tick_is_claimed_once(store: ScheduleStore) -> None:
    store.add(make())
    tick = NOW + timedelta(minutes=5)
    assert store.last_tick("pulse") is None
    assert store.claim_tick("pulse", tick) is True
    assert store.claim_tick("pulse", tick) is False
    assert store.claim_tick("pulse", tick + timedelta(minutes=5)) is True
    assert store.claim_tick("other", tick) is True  # claims are per schedule
    assert store.last_tick("pulse") == tick + timedelta(minutes=5)
    assert store.last_tick("pulse", tick + timedelta(minutes=4)) == tick
    assert store.last_tick("pulse", tick) == tick
    assert store.last_tick("pulse", tick - timedelta(seconds=1)) is None


def test_recent_claims_are_kept_so_a_tick_never_fires_twice(store: ScheduleStore) -> None:
    """Claiming a tick may forget old claims, never recent ones: a tick fired
    again hours later (a second scheduler, a redelivery) is still refused."""
    store.add(make())
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    ticks = [now - timedelta(hours=hours) for hours in (3, 2, 1)]
    assert [store.claim_tick("pulse", tick) for tick in ticks] == [True] * 3
    assert [store.claim_tick("pulse", tick) for tick in ticks] == [False] * 3
    assert [store.last_tick("pulse", tick) for tick in ticks] == ticks


def test_claims_race_one_winner_per_tick(store: ScheduleStore, backend: Backend) -> None:
    if backend.name == "aws":
        pytest.skip("moto's in-process backend is not a concurrency test")
    store.add(make())
    ticks = [NOW + timedelta(minutes=5 * i) for i in range(20)]
    wins: list[datetime] = []
    lock = threading.Lock()

    def claim_all() -> None:
        mine = open_store(backend)
        for tick in ticks:
            if mine.claim_tick("pulse", tick):
                with lock:
                    wins.append(tick)

    threads = [threading.Thread(target=claim_all) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == ticks


def test_removing_forgets_claims(store: ScheduleStore) -> None:
    store.add(make())
    store.claim_tick("pulse", NOW)
    store.remove("pulse")
    store.add(make())
    assert store.last_tick("pulse") is None
    assert store.claim_tick("pulse", NOW) is True


def test_a_released_tick_is_claimed_again(store: ScheduleStore) -> None:
    store.add(make())
    first, second = NOW + timedelta(minutes=5), NOW + timedelta(minutes=10)
    assert store.claim_tick("pulse", first) is True
    assert store.claim_tick("pulse", second) is True
    store.release_tick("pulse", second)  # its submit failed
    assert store.last_tick("pulse") == first  # the next pass counts from here
    assert store.claim_tick("pulse", second) is True
    assert store.claim_tick("pulse", second) is False
    store.release_tick("pulse", NOW)  # never claimed: nothing happens
    assert store.last_tick("pulse") == second


def test_releasing_the_latest_claim_keeps_the_one_before(store: ScheduleStore) -> None:
    # Old claims may be forgotten, but not the one a released claim falls back
    # to: the next pass counts missed ticks from it.
    store.add(make(expression="@monthly"))
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    old, latest = now - timedelta(days=40), now - timedelta(minutes=1)
    assert store.claim_tick("pulse", old) is True
    assert store.claim_tick("pulse", latest) is True
    store.release_tick("pulse", latest)
    assert store.last_tick("pulse") == old


def test_claims_a_week_old_are_forgotten_but_the_latest_before_a_new_one(
    store: ScheduleStore,
) -> None:
    """A schedule that fires for years keeps about a week of claims, not every
    tick it ever fired (a store read per fire must not grow with its age)."""
    store.add(make(expression="@daily"))
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    old = [today - timedelta(days=days) for days in (40, 30, 20, 10)]
    for tick in old:
        assert store.claim_tick("pulse", tick)
        store.settle_tick("pulse", tick)
    assert store.claim_tick("pulse", today)
    assert store.last_tick("pulse", old[-1]) == old[-1]  # the latest one before today's
    assert store.last_tick("pulse", old[-2]) is None  # the older ones are gone
    store.release_tick("pulse", today)
    assert store.last_tick("pulse") == old[-1]
    assert store.claim_tick("pulse", old[0]) is True  # forgotten: claimable again


def test_a_forgotten_claim_is_not_fired_again(store: ScheduleStore) -> None:
    """An old claim whose scheduler died unsettled is forgotten with the rest;
    it must not stay listed as unsettled (it would fire at every pass, and
    under ``overlap skip`` hold every later tick back)."""
    store.add(make(expression="@daily"))
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    dead, kept = today - timedelta(days=40), today - timedelta(days=30)
    assert store.claim_tick("pulse", dead)  # never settled
    assert store.claim_tick("pulse", kept)
    store.settle_tick("pulse", kept)
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert store.unsettled_ticks("pulse", later) == [dead]
    assert store.claim_tick("pulse", today)
    assert store.unsettled_ticks("pulse", later) == [today]
    store.settle_tick("pulse", dead)  # a late settle of the forgotten one: nothing comes back
    store.settle_tick("pulse", today)
    assert store.unsettled_ticks("pulse", later) == []
    assert store.last_tick("pulse", kept) == kept


def test_claimed_ticks_stay_unsettled_until_settled(store: ScheduleStore) -> None:
    """What a scheduler killed between a claim and its submit leaves behind:
    a claimed tick never settled, found by ``unsettled_ticks`` once old enough."""
    store.add(make())
    first, second = datetime(2030, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, 0, 5, tzinfo=UTC)
    assert store.claim_tick("pulse", first) and store.claim_tick("pulse", second)
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert store.unsettled_ticks("pulse", later) == [first, second]
    assert store.unsettled_ticks("pulse", datetime.now(UTC) - timedelta(hours=1)) == []
    store.settle_tick("pulse", first)
    assert store.unsettled_ticks("pulse", later) == [second]
    store.settle_tick("pulse", datetime(2031, 1, 1, tzinfo=UTC))  # never claimed: nothing
    assert store.unsettled_ticks("pulse", later) == [second]
    assert store.last_tick("pulse") == second


def test_a_tick_claim_says_when_it_was_made_and_whether_it_settled(store: ScheduleStore) -> None:
    store.add(make())
    tick = NOW + timedelta(minutes=5)
    assert store.tick_claim("pulse", tick) is None
    before = datetime.now(UTC)
    assert store.claim_tick("pulse", tick)
    claim = store.tick_claim("pulse", tick)
    assert claim is not None and not claim.settled
    assert before - timedelta(seconds=1) <= claim.claimed_at <= datetime.now(UTC)
    store.settle_tick("pulse", tick)
    settled = store.tick_claim("pulse", tick)
    assert settled is not None and settled.settled
    assert store.tick_claim("pulse", tick + timedelta(minutes=5)) is None
