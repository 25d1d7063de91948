"""The dispatcher (issue 11): every delivery's envelope is decoded once, by
its declared ``kind``, and routed: chunk → runner, schedule tick → schedules,
sweep → recovery. Nothing is routed by searching the body's text."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fanout import coordinator
from fanout.backends.base import Backend, Delivery, RunState, TaskKey, sqs_sent_at
from fanout.dispatch import Dispatcher
from fanout.failures import keep_message, list_messages
from fanout.messages import (
    SWEEP_BODY,
    ChunkMessage,
    MessageError,
    ScheduleFire,
    Sweep,
    decode_envelope,
    encode,
)

TREE = str(Path(__file__).resolve().parent / "testjobs" / "tree.py")


def deliver(backend: Backend, body: str) -> str:
    backend.queue.send([body])
    (delivery,) = backend.queue.receive(1, 30)
    return Dispatcher(backend).handle(delivery, 10)


def test_each_kind_decodes_to_its_own_envelope() -> None:
    chunk = encode(ChunkMessage(run_id="r-1", chunk_id="0/2", payload={"a": 1}))
    assert decode_envelope(chunk) == ChunkMessage(run_id="r-1", chunk_id="0/2", payload={"a": 1})
    tick = json.dumps(
        {"v": 1, "kind": "schedule.fire", "schedule": "p", "scheduled_time": "2030-01-01T00:00Z"}
    )
    fire = decode_envelope(tick)
    assert isinstance(fire, ScheduleFire)
    assert fire.scheduled_time == datetime(2030, 1, 1, tzinfo=UTC)
    assert decode_envelope(SWEEP_BODY) == Sweep(v=1, kind="fanout.sweep")
    # A chunk message may leave its kind out (it defaults to "process").
    bare = decode_envelope('{"v": 1, "run_id": "r-1", "chunk_id": "0"}')
    assert isinstance(bare, ChunkMessage) and bare.kind == "process"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        # Each error names the field at fault of the kind the body claims to be.
        ('{"v":1,"kind":"schedule.fire","schedule":"p","scheduled_time":"x"}', "scheduled_time:"),
        ('{"v":1,"kind":"fanout.sweep","extra":1}', "extra: Extra inputs are not permitted"),
        ('{"kind":"fanout.sweep"}', "v: Field required"),
        ('{"run_id":"r","chunk_id":"0","seq":1000001}', "seq: Input should be less than or equal"),
        ('{"v":1,"kind":"nonsense"}', "run_id: Field required"),  # no such kind: a chunk's
        ("[" * 60_000 + "]" * 60_000, "message: Invalid JSON: recursion limit exceeded"),
        ('"text"', "message: Input should be an object"),
    ],
)
def test_an_invalid_envelope_names_the_field_of_the_kind_it_claims(body: str, error: str) -> None:
    with pytest.raises(MessageError, match=r"^invalid message: ") as raised:
        decode_envelope(body)
    assert error in str(raised.value)


def test_a_body_that_is_not_text_is_refused() -> None:
    with pytest.raises(MessageError, match="the body is a bytes, not text"):
        decode_envelope(b'{"v":1,"kind":"fanout.sweep"}')


def test_a_body_that_merely_mentions_a_tick_is_kept_as_an_invalid_message(mem: Backend) -> None:
    """Routed by its text, this broken chunk message went to the schedule code,
    which dropped it without keeping it; decoded as what it is, it is an
    invalid chunk message, kept with its reason like any other."""
    body = json.dumps({"v": 1, "run_id": "r-1", "chunk_id": "../x", "payload": "schedule.fire"})
    assert deliver(mem, body) == "invalid"
    (letter,) = list_messages(mem.store)
    assert letter["reason"].startswith("invalid message: chunk_id: String should match pattern")
    assert letter["body"] == body
    assert mem.queue.pending() == 0


def test_an_invalid_message_delivered_again_is_kept_once(mem: Backend) -> None:
    """Its worker killed before the deferred ack reached the queue, an invalid
    message comes back and is dropped again: its second letter, a second
    later, was a second dead letter of one message."""
    mem.queue.send(['{"v": 1, "kind": "nonsense"}'])
    (first,) = mem.queue.receive(1, 30)
    assert Dispatcher(mem).handle(first, 10) == "invalid"
    time.sleep(1.1)  # a letter's name has the time to the second
    again = dataclasses.replace(first, receive_count=2)  # the ack never arrived
    assert Dispatcher(mem).handle(again, 10) == "invalid"
    (letter,) = list_messages(mem.store)
    assert letter["deliveries"] == 2


def test_dead_letters_of_ids_alike_once_made_safe_are_both_kept(mem: Backend) -> None:
    # Ids are made safe for a key by replacing what is not a letter or digit:
    # "a.b" and "a_b" named one letter, and the second overwrote the first.
    sent = time.time()
    for mid in ("a.b", "a_b", "x" * 100 + "1", "x" * 100 + "2"):
        keep_message(mem.store, Delivery(f"body of {mid}", "r", 1, mid, sent_at=sent), "bad")
    letters = list_messages(mem.store)
    assert sorted(letter["message_id"] for letter in letters) == sorted(
        ["a.b", "a_b", "x" * 100 + "1", "x" * 100 + "2"]
    )


@pytest.mark.parametrize(
    ("attributes", "sent"),
    [
        ({"SentTimestamp": "1700000000123"}, 1_700_000_000.123),
        ({}, None),
        ({"SentTimestamp": "soon"}, None),
        ({"SentTimestamp": "nan"}, None),
        ({"SentTimestamp": "-5"}, None),
        ({"SentTimestamp": "9" * 30}, None),  # a dead letter could not be named by it
        ({"SentTimestamp": "inf"}, None),
    ],
)
def test_sqs_sent_timestamp_is_read_in_seconds(
    attributes: dict[str, str], sent: float | None
) -> None:
    assert sqs_sent_at(attributes) == sent


def test_a_malformed_tick_is_kept_with_the_field_at_fault(mem: Backend) -> None:
    body = json.dumps(
        {"v": 1, "kind": "schedule.fire", "schedule": "p", "scheduled_time": "not a time"}
    )
    assert deliver(mem, body) == "invalid"
    (letter,) = list_messages(mem.store)
    assert letter["reason"].startswith("invalid message: scheduled_time: ")
    assert mem.queue.pending() == 0


def test_chunks_ticks_and_sweeps_each_reach_their_handler(mem: Backend) -> None:
    # A tick reaches the schedules, which know no schedule of that name.
    tick = {"v": 1, "kind": "schedule.fire", "schedule": "none"}
    tick["scheduled_time"] = "2030-01-01T00:00:00Z"
    assert deliver(mem, json.dumps(tick)) == "unknown schedule"
    run = coordinator.submit(mem, TREE, {"chunks": 1, "rows": 1})
    (plan,) = mem.queue.receive(1, 30)
    assert Dispatcher(mem).handle(plan, 10) == "committed"  # the runner ran the plan
    # The chunk the plan spawned is lost from the queue: a sweep re-sends it.
    (child,) = mem.queue.receive(1, 30)
    mem.queue.ack(child.receipt)
    assert deliver(mem, SWEEP_BODY) == "swept"
    (again,) = mem.queue.receive(1, 30)
    assert again.body == child.body
    assert Dispatcher(mem).handle(again, 10) == "committed"
    finished = mem.ledger.get_run(run.run_id)
    assert finished is not None and finished.state is RunState.SUCCEEDED
    assert list_messages(mem.store) == []


def test_a_failure_outside_the_job_hands_the_message_back(
    mem: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What breaks before a claim (here the ledger's read of the run) is the
    message's problem: handed back with back-off, never raised to the host."""
    run = coordinator.submit(mem, TREE, {"chunks": 1, "rows": 1})

    def broken(run_id: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(mem.ledger, "get_run", broken)
    (plan,) = mem.queue.receive(1, 30)
    assert Dispatcher(mem).handle(plan, 10) == "requeued"
    monkeypatch.undo()
    task = mem.ledger.get_task(TaskKey(run.run_id, "0", 0))
    assert task is not None and task.attempt == 0  # never claimed
    assert mem.queue.pending() == 1  # handed back, not acknowledged


def test_every_claim_and_tick_outcome_is_a_handled_outcome() -> None:
    """The runner answers a claim that is not ``claimed`` with the claim's own
    word, and a tick with ``schedule <what the fire did>``: each must be one of
    :class:`Handled` (a new word would raise at the first such delivery)."""
    from fanout.backends.base import ClaimOutcome
    from fanout.outcomes import RELEASED, Handled

    for outcome in ClaimOutcome:
        if outcome is not ClaimOutcome.CLAIMED:
            assert Handled(outcome.value) == outcome.value
    for fired in ("fired", "skipped", "already fired", "claimed elsewhere", "failed"):
        assert Handled(f"schedule {fired}")
    assert set(Handled) > RELEASED
    assert Handled.BUSY == "busy" and f"{Handled.LEASE_LOST}" == "lease lost"
