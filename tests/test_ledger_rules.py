"""The ledger's rules (``fanout.backends.rules``), pure: records in, decisions out.

Both ledgers (SQLite and DynamoDB) apply these decisions; the contract suite
in ``tests/contract/`` checks that they do. Here each rule is checked on its
own, over hand-made records.
"""

from __future__ import annotations

import json

import pytest

from fanout.backends.base import (
    ClaimOutcome,
    Failure,
    FailureKind,
    RunState,
    TaskEvent,
    TaskRecord,
    TaskState,
)
from fanout.backends.rules import (
    MAX_PARENT_WAIT,
    MIN_RETRY_AFTER,
    ClaimFacts,
    ClaimVerdict,
    FailureVerdict,
    ParentFacts,
    after_failure,
    attempt_in_budget,
    budget_spent,
    chunk_order,
    final_state,
    history_event,
    is_drained,
    lease_live,
    may_have_orphans,
    rule_claim,
)

NOW = 1_000.0


def task(
    state: TaskState = TaskState.QUEUED,
    *,
    attempt: int = 0,
    floor: int = 0,
    lease_expires: float = 0.0,
    not_before: float = 0.0,
    chunk_id: str = "0/1",
    seq: int = 0,
) -> TaskRecord:
    return TaskRecord(
        run_id="r",
        chunk_id=chunk_id,
        seq=seq,
        state=state,
        attempt=attempt,
        attempt_floor=floor,
        depth=1,
        message="{}",
        lease_token="t1" if state == TaskState.RUNNING else None,
        lease_expires=lease_expires,
        not_before=not_before,
    )


def committed_parent(by: str = "p1") -> ParentFacts:
    return ParentFacts(TaskState.DONE, by, 0.0)


# -- claims ----------------------------------------------------------------------


def test_a_queued_task_is_claimed() -> None:
    ruling = rule_claim(ClaimFacts(task()), max_attempts=3, now=NOW)
    assert ruling.verdict is ClaimVerdict.CLAIM


@pytest.mark.parametrize("state", [TaskState.DONE, TaskState.DEAD, TaskState.CANCELLED])
def test_a_finished_task_is_never_claimed(state: TaskState) -> None:
    # Even with a stopped run and an uncommitted parent: finished comes first.
    facts = ClaimFacts(task(state), "p1", ParentFacts(TaskState.RUNNING, None, NOW + 9), True)
    assert rule_claim(facts, 3, NOW).verdict is ClaimVerdict.FINISHED


def test_a_live_lease_is_busy_until_it_expires() -> None:
    ruling = rule_claim(
        ClaimFacts(task(TaskState.RUNNING, attempt=1, lease_expires=NOW + 7)), 3, NOW
    )
    assert ruling.verdict is ClaimVerdict.BUSY
    assert ruling.retry_after == pytest.approx(7.0)


def test_a_live_lease_is_busy_even_in_a_stopped_run() -> None:
    # A stop cancels queued tasks when claimed; it never breaks a live lease.
    facts = ClaimFacts(task(TaskState.RUNNING, attempt=1, lease_expires=NOW + 1), run_stopped=True)
    assert rule_claim(facts, 3, NOW).verdict is ClaimVerdict.BUSY


def test_a_child_waits_for_its_parent_until_the_parents_lease_runs_out() -> None:
    parent = ParentFacts(TaskState.RUNNING, None, NOW + 12)
    ruling = rule_claim(ClaimFacts(task(), "p1", parent), 3, NOW)
    assert ruling.verdict is ClaimVerdict.WAIT
    assert ruling.retry_after == pytest.approx(12.0)


def test_the_wait_for_a_parent_is_bounded_both_ways() -> None:
    long = ParentFacts(TaskState.RUNNING, None, NOW + 3600)
    assert rule_claim(ClaimFacts(task(), "p1", long), 3, NOW).retry_after == MAX_PARENT_WAIT
    expired = ParentFacts(TaskState.QUEUED, None, NOW - 5)
    assert rule_claim(ClaimFacts(task(), "p1", expired), 3, NOW).retry_after == MIN_RETRY_AFTER


def test_a_child_of_a_parent_that_committed_from_another_attempt_is_orphaned() -> None:
    facts = ClaimFacts(task(), spawned_by="p1", parent=committed_parent(by="p2"))
    assert rule_claim(facts, 3, NOW).verdict is ClaimVerdict.ORPHANED


def test_a_child_of_a_dead_parent_is_orphaned() -> None:
    facts = ClaimFacts(task(), "p1", ParentFacts(TaskState.DEAD, None, 0.0))
    assert rule_claim(facts, 3, NOW).verdict is ClaimVerdict.ORPHANED


def test_a_child_of_the_attempt_that_committed_is_claimed() -> None:
    facts = ClaimFacts(task(), spawned_by="p1", parent=committed_parent(by="p1"))
    assert rule_claim(facts, 3, NOW).verdict is ClaimVerdict.CLAIM


def test_a_queued_task_of_a_stopped_run_is_cancelled() -> None:
    facts = ClaimFacts(task(), run_stopped=True)
    assert rule_claim(facts, 3, NOW).verdict is ClaimVerdict.STOPPED


def test_an_orphan_is_cancelled_as_an_orphan_even_in_a_stopped_run() -> None:
    facts = ClaimFacts(task(), "p1", committed_parent(by="p2"), run_stopped=True)
    assert rule_claim(facts, 3, NOW).verdict is ClaimVerdict.ORPHANED


def test_a_task_in_back_off_waits_until_not_before() -> None:
    ruling = rule_claim(ClaimFacts(task(attempt=1, not_before=NOW + 4)), 3, NOW)
    assert ruling.verdict is ClaimVerdict.WAIT
    assert ruling.retry_after == pytest.approx(4.0)
    assert rule_claim(ClaimFacts(task(attempt=1, not_before=NOW)), 3, NOW).verdict is (
        ClaimVerdict.CLAIM
    )


def test_an_expired_lease_is_taken_over_while_attempts_remain() -> None:
    expired = task(TaskState.RUNNING, attempt=2, lease_expires=NOW - 1)
    assert rule_claim(ClaimFacts(expired), 3, NOW).verdict is ClaimVerdict.TAKE_OVER


def test_an_expired_lease_on_the_last_attempt_is_buried() -> None:
    expired = task(TaskState.RUNNING, attempt=3, lease_expires=NOW - 1)
    assert rule_claim(ClaimFacts(expired), 3, NOW).verdict is ClaimVerdict.BURY


def test_a_replay_gives_a_fresh_budget() -> None:
    # Three attempts before the replay (the floor), one since: two remain.
    replayed = task(TaskState.RUNNING, attempt=4, floor=3, lease_expires=NOW - 1)
    assert attempt_in_budget(replayed) == 1
    assert not budget_spent(replayed, 3)
    assert rule_claim(ClaimFacts(replayed), 3, NOW).verdict is ClaimVerdict.TAKE_OVER


def test_a_lease_is_live_only_while_running_and_unexpired() -> None:
    assert lease_live(task(TaskState.RUNNING, attempt=1, lease_expires=NOW + 0.1), NOW)
    assert not lease_live(task(TaskState.RUNNING, attempt=1, lease_expires=NOW), NOW)
    assert not lease_live(task(TaskState.QUEUED, lease_expires=NOW + 10), NOW)


# -- failures --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", [FailureKind.BAD_RECORD, FailureKind.PERMANENT, FailureKind.NO_PROGRESS]
)
def test_a_permanent_failure_is_dead_at_once(kind: FailureKind) -> None:
    assert after_failure(kind, attempt=1, max_attempts=5) is FailureVerdict.DEAD


@pytest.mark.parametrize(
    "kind",
    [
        FailureKind.ERROR,
        FailureKind.TIMED_OUT,
        FailureKind.CRASHED,
        FailureKind.OUT_OF_MEMORY,
        FailureKind.EXITED,
        FailureKind.INTERNAL,
    ],
)
def test_other_failures_retry_until_the_budget_is_spent(kind: FailureKind) -> None:
    assert after_failure(kind, 1, 3) is FailureVerdict.RETRY
    assert after_failure(kind, 2, 3) is FailureVerdict.RETRY
    assert after_failure(kind, 3, 3) is FailureVerdict.DEAD


def test_an_interrupted_attempt_goes_back_at_once_even_on_the_last_attempt() -> None:
    assert after_failure(FailureKind.INTERRUPTED, 3, 3) is FailureVerdict.RETRY_NOW


def test_a_failure_kind_read_back_as_a_plain_string_decides_the_same() -> None:
    # What a supervisor reads back from the ledger or a pipe is a str.
    assert after_failure(FailureKind("permanent"), 1, 3) is FailureVerdict.DEAD
    assert after_failure("interrupted", 3, 3) is FailureVerdict.RETRY_NOW  # type: ignore[arg-type]


# -- commits and runs ------------------------------------------------------------


def test_only_a_task_with_an_earlier_attempt_may_have_orphans() -> None:
    assert not may_have_orphans(1)
    assert may_have_orphans(2)


def test_a_drained_run_is_one_with_nothing_outstanding() -> None:
    assert is_drained(0)
    assert not is_drained(1)


@pytest.mark.parametrize(
    ("stop_reason", "dead", "state"),
    [
        (None, 0, RunState.SUCCEEDED),
        (None, 2, RunState.FAILED),
        ("max_chunks (10) reached at chunk 0", 0, RunState.STOPPED),
        ("max_depth (2) reached at chunk 0/1", 3, RunState.STOPPED),
    ],
)
def test_the_final_state_of_a_drained_run(
    stop_reason: str | None, dead: int, state: RunState
) -> None:
    assert final_state(stop_reason, dead) is state


def test_tasks_are_ordered_by_chunk_id_numerically_then_seq() -> None:
    ids = [("0/10", 0), ("0/2", 1), ("0", 0), ("0/2", 0), ("0/2/1", 0)]
    ordered = sorted((task(chunk_id=c, seq=s) for c, s in ids), key=chunk_order)
    assert [(t.chunk_id, t.seq) for t in ordered] == [
        ("0", 0),
        ("0/2", 0),
        ("0/2", 1),
        ("0/2/1", 0),
        ("0/10", 0),
    ]


# -- what is stored --------------------------------------------------------------


def test_history_events_store_the_same_strings_as_before_the_enums() -> None:
    event = history_event(FailureKind.TIMED_OUT, 12.34567, 2, error="x")
    assert json.loads(json.dumps(event)) == {
        "outcome": "timed out",
        "at": 12.346,
        "error": "x",
        "attempt": 2,
    }
    assert "attempt" not in history_event(TaskEvent.COMMITTED, NOW, None)


def test_the_enums_are_their_stored_strings() -> None:
    # Records written by an older fanout read back as members, and members
    # compare equal to the strings other processes send.
    assert FailureKind("crashed") is FailureKind.CRASHED
    assert TaskEvent("orphaned") is TaskEvent.ORPHANED
    assert f"{Failure(FailureKind.OUT_OF_MEMORY, 'x').kind}: x" == "out of memory: x"
    assert json.dumps({"o": TaskEvent.CONTINUED}) == '{"o": "continued"}'
    assert ClaimOutcome.BUSY == "busy"


def test_a_run_is_not_reopened_while_it_finalizes() -> None:
    from fanout.backends.rules import may_reopen

    assert not may_reopen(RunState.FINALIZING)
    assert all(may_reopen(s) for s in RunState if s != RunState.FINALIZING)


def _ended(state: TaskState, *events: TaskEvent, by_job: bool = False) -> TaskRecord:
    from fanout.backends.rules import cancel_event

    t = task(state, attempt=1)
    t.history = [history_event(e, NOW, 1) for e in events]
    if by_job:
        t.history[-1] = cancel_event("stopped by the job: done", NOW, 1)
    return t


@pytest.mark.parametrize(
    ("stop", "t", "revived"),
    [
        (None, _ended(TaskState.DEAD, TaskEvent.DEAD), True),
        ("cancelled (fanout cancel)", _ended(TaskState.DEAD, TaskEvent.DEAD), True),
        # What the stop cancelled comes back with the replay, which clears it...
        ("tolerated failures exceeded: 2", _ended(TaskState.CANCELLED, TaskEvent.CANCELLED), True),
        ("cancelled (fanout cancel)", _ended(TaskState.CANCELLED, TaskEvent.CANCELLED), True),
        # ...and with the next replay, if one cleared the stop and died half way...
        (None, _ended(TaskState.CANCELLED, TaskEvent.CANCELLED), True),
        # ...unless the job stopped the run (its event says so, or its stop
        # still in place does); an orphan never does.
        ("stopped by the job: enough", _ended(TaskState.CANCELLED, TaskEvent.CANCELLED), False),
        (
            "cancelled (fanout cancel)",
            _ended(TaskState.CANCELLED, TaskEvent.CANCELLED, by_job=True),
            False,
        ),
        (None, _ended(TaskState.CANCELLED, TaskEvent.CANCELLED, by_job=True), False),
        ("tolerated failures exceeded: 2", _ended(TaskState.CANCELLED, TaskEvent.ORPHANED), False),
        ("cancelled (fanout cancel)", _ended(TaskState.DONE, TaskEvent.COMMITTED), False),
        ("cancelled (fanout cancel)", task(TaskState.QUEUED), False),
    ],
)
def test_what_a_replay_puts_back_in_the_queue(
    stop: str | None, t: TaskRecord, revived: bool
) -> None:
    from fanout.backends.rules import replay_revives, was_cancelled

    assert replay_revives(stop, t) is revived
    replayed = _ended(TaskState.QUEUED, *(e["outcome"] for e in t.history), TaskEvent.REPLAYED)
    assert was_cancelled(replayed) is (
        t.state == TaskState.CANCELLED and t.history[-1]["outcome"] == "cancelled"
    )
