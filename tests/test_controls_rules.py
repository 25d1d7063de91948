"""The pure rules of the run controls (``fanout.controls``): admission under a
cap and a pause, releasing slots, tolerated failures and a run's final state."""

from __future__ import annotations

from typing import Any

import pytest

from fanout.backends.base import RunRecord, RunState
from fanout.controls import (
    CANCEL_REASON,
    MAX_WAIT,
    admit,
    display_state,
    final_state,
    live_slots,
    paused_seconds,
    release,
    set_paused,
    tolerance,
    tolerance_exceeded,
)
from fanout.jobs import RunSettings


def test_a_cap_admits_up_to_n_live_slots_and_lapsed_ones_free_theirs() -> None:
    state: dict[str, Any] = {}
    assert admit(state, "a", 2, expires=10.0, now=0.0).held
    assert admit(state, "b", 2, expires=5.0, now=0.0).go
    refused = admit(state, "c", 2, expires=10.0, now=1.0)
    assert not refused.go and not refused.paused and refused.retry_after > 0
    assert set(live_slots(state, 1.0)) == {"a", "b"}
    # b's attempt lapsed (its worker died): its slot is free again.
    assert admit(state, "c", 2, expires=20.0, now=6.0).go
    assert set(live_slots(state, 6.0)) == {"a", "c"}
    # The same attempt asking again keeps its one slot.
    assert admit(state, "a", 2, expires=12.0, now=6.0).go
    assert live_slots(state, 6.0) == {"a": 12.0, "c": 20.0}


def test_release_frees_the_slot_once_and_learns_the_duration() -> None:
    state: dict[str, Any] = {}
    admit(state, "a", 1, expires=100.0, now=0.0)
    assert release(state, "a", took=2.0) is True
    assert release(state, "a", took=2.0) is False  # idempotent
    assert state["avg"] == 2.0 and admit(state, "b", 1, expires=100.0, now=1.0).go


def test_a_refused_delivery_waits_longer_the_more_often_it_came() -> None:
    state: dict[str, Any] = {"avg": 1.0}
    admit(state, "a", 1, expires=100.0, now=0.0)
    first = admit(state, "b", 1, expires=100.0, now=0.0, receives=1).retry_after
    tenth = admit(state, "b", 1, expires=100.0, now=0.0, receives=10).retry_after
    assert 0.5 <= first <= 1.0 and 5.0 <= tenth <= 10.0
    assert admit(state, "b", 1, 100.0, 0.0, receives=10_000).retry_after <= MAX_WAIT


def test_a_paused_run_admits_nothing_capped_or_not() -> None:
    state: dict[str, Any] = {}
    assert set_paused(state, True, 0.0) is True and set_paused(state, True, 0.0) is False
    for cap in (None, 5):
        admission = admit(state, "a", cap, expires=10.0, now=0.0)
        assert admission.paused and not admission.go
    assert live_slots(state, 0.0) == {}
    set_paused(state, False, 0.0)
    assert admit(state, "a", None, expires=10.0, now=0.0).go


def test_the_time_a_run_was_paused_is_summed_over_its_pauses() -> None:
    state: dict[str, Any] = {}
    assert paused_seconds(state, 50.0) == 0.0
    set_paused(state, True, 100.0)
    assert paused_seconds(state, 130.0) == 30.0  # the pause in hand, so far
    set_paused(state, True, 120.0)  # paused again: the pause began at 100 still
    set_paused(state, False, 160.0)
    assert paused_seconds(state, 1000.0) == 60.0  # over: no longer growing
    set_paused(state, True, 200.0)
    set_paused(state, False, 205.5)
    assert paused_seconds(state, 1000.0) == 65.5


@pytest.mark.parametrize(
    ("settings", "chunks", "allowed"),
    [
        ({}, 20, None),
        ({"tolerated_failures": 1}, 20, 1),
        ({"tolerated_failure_percent": 10}, 20, 2),
        ({"tolerated_failure_percent": 10}, 19, 1),  # floor: 1.9 dead chunks is 1
        ({"tolerated_failures": 3, "tolerated_failure_percent": 5}, 20, 3),  # the larger
    ],
)
def test_tolerance(settings: dict[str, Any], chunks: int, allowed: int | None) -> None:
    assert tolerance(RunSettings(**settings), chunks) == allowed


def test_tolerance_exceeded_only_past_the_tolerance() -> None:
    settings = RunSettings(tolerated_failures=1)
    assert tolerance_exceeded(settings, 1, 20) is None
    reason = tolerance_exceeded(settings, 2, 20)
    assert reason == "tolerated failures exceeded: 2 dead chunks of 20, 1 tolerated"
    assert tolerance_exceeded(RunSettings(), 5, 20) is None  # no tolerance: runs on


def _run(**fields: Any) -> RunRecord:
    settings = {**RunSettings().model_dump(), "schema": None, **fields.pop("settings", {})}
    return RunRecord(run_id="r", job="j", job_name="j", params={}, settings=settings, **fields)


def test_final_state() -> None:
    tolerant = {"tolerated_failures": 1}
    assert final_state(_run(chunks_total=20), 0) == RunState.SUCCEEDED
    assert final_state(_run(chunks_total=20), 1) == RunState.FAILED
    assert final_state(_run(settings=tolerant, chunks_total=20), 1) == (
        RunState.SUCCEEDED_WITH_FAILURES
    )
    assert final_state(_run(settings=tolerant, chunks_total=20), 2) == RunState.FAILED
    assert final_state(_run(stop_reason=CANCEL_REASON), 0) == RunState.CANCELLED
    assert final_state(_run(stop_reason="max_chunks (3) reached"), 0) == RunState.STOPPED


def test_display_state() -> None:
    assert display_state(_run(), paused=True) == "paused"
    assert display_state(_run(stop_reason=CANCEL_REASON), paused=True) == "cancelling"
    assert display_state(_run(state=RunState.CANCELLED), paused=False) == "cancelled"
