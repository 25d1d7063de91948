"""The Queue contract: SQS-like at-least-once delivery with visibility timeouts.

Only Protocol methods are used, so the same tests hold for every backend.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pytest

from fanout.backends.base import Backend, Delivery, Queue

Opener = Callable[[], Backend]


class Barrier(Protocol):
    """``threading.Barrier`` or a multiprocessing one."""

    def wait(self, timeout: float | None = None) -> int: ...


#: A visibility timeout or delay short enough for tests ...
SHORT = 0.2
#: ... and how long to sleep for it to pass (with a margin for slow machines).
PAST_SHORT = 0.35
#: A delay after which a test checks at once that the message is NOT visible yet:
#: longer, so a descheduled test process on a loaded machine cannot outlive it.
HIDE = 0.6
PAST_HIDE = 0.8
#: A visibility timeout no test outlives.
LONG = 60.0
#: Messages in the one-call send test; fewer on backends emulated in-process
#: (moto's SQS scans its whole backlog on every send and delete).
BIG_SEND = {"aws": 1_000}
#: Messages shared by the concurrent consumers (fewer on moto, as above).
CONCURRENT_SEND = {"aws": 300}


def timing(queue: Queue) -> tuple[float, float, float, float]:
    """``SHORT, PAST_SHORT, HIDE, PAST_HIDE`` for ``queue``. A queue whose
    visibility timeouts and delays are whole seconds (SQS) says so with a
    ``min_visibility`` attribute: its times are rounded up to that unit."""
    unit = float(getattr(queue, "min_visibility", 0.0))
    if unit <= SHORT:
        return SHORT, PAST_SHORT, HIDE, PAST_HIDE
    short = math.ceil(SHORT / unit) * unit
    hide = math.ceil(HIDE / unit) * unit
    return short, short + 0.4, hide, hide + 0.4


def require(queue: Queue, capability: str, why: str) -> None:
    """Skip unless ``queue`` has ``capability`` (an attribute, true unless a queue
    sets it false: SQS's standard queues keep no order and honour stale receipts)."""
    if not getattr(queue, capability, True):
        pytest.skip(f"{type(queue).__name__}: {why}")


def receive_all(queue: Queue, expected: int, visibility: float = LONG) -> list[Delivery]:
    """Receive until ``expected`` messages arrived (a receive may return fewer than are
    visible), failing if they do not all come within a few seconds."""
    got: list[Delivery] = []
    deadline = time.monotonic() + 30
    while len(got) < expected and time.monotonic() < deadline:
        got.extend(queue.receive(1000, visibility))
    return got


def test_send_receive_ack(backend: Backend) -> None:
    q = backend.queue
    q.send(["hello"])
    [d] = q.receive(10, LONG)
    assert d.body == "hello"
    assert d.receive_count == 1
    q.ack(d.receipt)
    assert q.pending() == 0
    assert q.receive(10, LONG) == []


def test_receive_on_empty_queue(backend: Backend) -> None:
    assert backend.queue.receive(10, LONG) == []
    assert backend.queue.pending() == 0


def test_send_nothing_is_a_no_op(backend: Backend) -> None:
    backend.queue.send([])
    assert backend.queue.pending() == 0


def test_bodies_round_trip_unchanged(backend: Backend) -> None:
    bodies = ['{"a": [1, 2]}', "héllo ✓ 日本", "  spaces  ", "line\nbreak", "x" * 10_000]
    backend.queue.send(bodies)
    got = receive_all(backend.queue, len(bodies))
    assert sorted(d.body for d in got) == sorted(bodies)


def test_receive_returns_at_most_max_messages(backend: Backend) -> None:
    backend.queue.send([f"m{i}" for i in range(5)])
    assert len(backend.queue.receive(2, LONG)) == 2
    assert len(backend.queue.receive(10, LONG)) == 3


def test_invisible_during_visibility_then_redelivered(backend: Backend) -> None:
    q = backend.queue
    _, _, hide, past_hide = timing(q)
    q.send(["m"])
    [first] = q.receive(10, hide)
    assert q.receive(10, hide) == [], "an in-flight message must be invisible"
    time.sleep(past_hide)
    [second] = q.receive(10, LONG)
    assert second.body == "m"
    assert second.receipt != first.receipt


def test_receive_count_increments_on_each_delivery(backend: Backend) -> None:
    q = backend.queue
    short, past_short, _, _ = timing(q)
    q.send(["m"])
    counts = []
    for _ in range(3):
        [d] = q.receive(10, short)
        counts.append(d.receive_count)
        time.sleep(past_short)
    assert counts == [1, 2, 3]


def test_each_delivery_says_when_its_message_was_sent(backend: Backend) -> None:
    # The same time on every delivery of one message: its dead letter is named
    # by it, so a message dead-lettered twice (its ack lost) is kept once.
    q = backend.queue
    short, past_short, _, _ = timing(q)
    before = time.time()
    q.send(["m"])
    [first] = q.receive(10, short)
    time.sleep(past_short)
    [second] = q.receive(10, LONG)
    assert first.sent_at is not None and before - 1.0 <= first.sent_at <= time.time() + 1.0
    assert second.sent_at == first.sent_at


def test_ack_with_stale_receipt_is_ignored(backend: Backend) -> None:
    q = backend.queue
    require(q, "exact_receipts", "a stale receipt may still act on the message")
    short, past_short, _, _ = timing(q)
    q.send(["m"])
    [stale] = q.receive(10, short)
    time.sleep(past_short)
    [current] = q.receive(10, LONG)
    q.ack(stale.receipt)  # the first receiver finishing late: must not delete the redelivery
    assert q.pending() == 1
    q.ack(current.receipt)
    assert q.pending() == 0


def test_release_with_stale_receipt_is_ignored(backend: Backend) -> None:
    q = backend.queue
    require(q, "exact_receipts", "a stale receipt may still act on the message")
    short, past_short, _, _ = timing(q)
    q.send(["m"])
    [stale] = q.receive(10, short)
    time.sleep(past_short)
    [current] = q.receive(10, LONG)
    q.release(stale.receipt, 0)  # must not make the redelivered copy visible
    assert q.receive(10, LONG) == []
    q.ack(current.receipt)
    assert q.pending() == 0


def test_settling_an_acknowledged_message_again_is_ignored(backend: Backend) -> None:
    """A worker that settles twice (an ack retried after a lost reply, a release
    after the ack) neither fails nor brings the message back."""
    q = backend.queue
    q.send(["m"])
    [d] = q.receive(1, LONG)
    q.ack(d.receipt)
    q.ack(d.receipt)
    q.release(d.receipt, 0)
    assert q.pending() == 0
    assert q.receive(10, LONG) == []


def test_redrive_leaves_messages_that_were_not_dead_lettered_alone(backend: Backend) -> None:
    """Redelivered (below the queue's own dead-letter limit), in flight or
    waiting: a redrive moves none of them, and loses or copies none."""
    q = backend.queue
    q.send(["a", "b", "c"])
    for _ in range(2):  # every message delivered twice, handed back each time
        for delivery in receive_all(q, 3):
            q.release(delivery.receipt, 0)
    [in_flight] = q.receive(1, LONG)
    assert q.redrive() == 0
    assert q.pending() == 3
    rest = receive_all(q, 2)
    assert sorted(d.body for d in [in_flight, *rest]) == ["a", "b", "c"]
    assert q.receive(10, LONG) == []


def test_release_makes_message_visible_again(backend: Backend) -> None:
    q = backend.queue
    q.send(["m"])
    [first] = q.receive(10, LONG)
    q.release(first.receipt, 0)
    [again] = q.receive(10, LONG)
    assert again.body == "m"
    assert again.receive_count == 2


def test_release_with_delay(backend: Backend) -> None:
    q = backend.queue
    q.send(["m"])
    _, _, hide, past_hide = timing(q)
    [first] = q.receive(10, LONG)
    q.release(first.receipt, hide)
    assert q.receive(10, LONG) == [], "released with a delay: not visible yet"
    time.sleep(past_hide)
    [again] = q.receive(10, LONG)
    assert again.body == "m"


def test_release_failed_counts_failures_and_a_plain_release_does_not(backend: Backend) -> None:
    """What the poison guard counts (``fanout.failures.settle_poison``): a
    harmless hand-back raises the receive count only; a failed one, the
    delivery's ``failures`` too, whichever copy of the message comes back."""
    q = backend.queue
    q.send(["m"])
    [first] = q.receive(10, LONG)
    assert first.failures == 0
    q.release(first.receipt, 0)
    [second] = q.receive(10, LONG)
    assert (second.body, second.failures, second.receive_count) == ("m", 0, 2)
    q.release_failed(second, 0)
    [third] = q.receive(10, LONG)
    assert (third.body, third.failures) == ("m", 1)
    q.release(third.receipt, 0)
    [fourth] = q.receive(10, LONG)
    assert fourth.failures == 1
    q.release_failed(fourth, 0)
    [fifth] = q.receive(10, LONG)
    assert (fifth.body, fifth.failures) == ("m", 2)
    q.ack(fifth.receipt)
    assert q.receive(10, LONG) == []
    assert q.pending() == 0, "handed back as a copy: the original is gone"


def test_release_failed_with_delay(backend: Backend) -> None:
    q = backend.queue
    q.send(["m"])
    _, _, hide, past_hide = timing(q)
    [first] = q.receive(10, LONG)
    q.release_failed(first, hide)
    assert q.receive(10, LONG) == [], "handed back with a delay: not visible yet"
    time.sleep(past_hide)
    [again] = q.receive(10, LONG)
    assert (again.body, again.failures) == ("m", 1)


def test_send_with_delay(backend: Backend) -> None:
    q = backend.queue
    _, _, hide, past_hide = timing(q)
    q.send(["later"], delay=hide)
    assert q.receive(10, LONG) == []
    assert q.pending() == 1, "a delayed message is pending"
    time.sleep(past_hide)
    [d] = q.receive(10, LONG)
    assert d.body == "later"
    assert d.receive_count == 1


def test_oldest_visible_first(backend: Backend) -> None:
    q = backend.queue
    require(q, "ordered", "no delivery order")
    for body in ["a", "b", "c"]:
        q.send([body])
    assert [q.receive(1, LONG)[0].body for _ in range(3)] == ["a", "b", "c"]


def test_batch_keeps_send_order(backend: Backend) -> None:
    require(backend.queue, "ordered", "no delivery order")
    bodies = [f"m{i}" for i in range(10)]
    backend.queue.send(bodies)
    assert [d.body for d in backend.queue.receive(10, LONG)] == bodies


def test_delayed_message_queues_behind_visible_ones(backend: Backend) -> None:
    q = backend.queue
    _, _, hide, past_hide = timing(q)
    q.send(["late"], delay=hide)
    q.send(["now"])
    assert [d.body for d in q.receive(10, LONG)] == ["now"]
    time.sleep(past_hide)
    assert [d.body for d in q.receive(10, LONG)] == ["late"]


def test_released_message_goes_behind_waiting_ones(backend: Backend) -> None:
    q = backend.queue
    require(q, "ordered", "no delivery order")
    q.send(["first"])
    q.send(["second"])
    [d] = q.receive(1, LONG)
    assert d.body == "first"
    q.release(d.receipt, 0)
    # "first" became visible again only now, after "second" was already waiting.
    assert [q.receive(1, LONG)[0].body for _ in range(2)] == ["second", "first"]


def test_pending_counts_visible_delayed_and_in_flight(backend: Backend) -> None:
    q = backend.queue
    q.send(["a", "b", "c"])
    assert q.pending() == 3
    got = q.receive(2, LONG)
    assert q.pending() == 3, "in-flight messages are pending"
    q.ack(got[0].receipt)
    assert q.pending() == 2
    q.send(["d"], delay=LONG)
    assert q.pending() == 3
    q.ack(got[1].receipt)
    assert q.pending() == 2


def test_message_size_limit(backend: Backend) -> None:
    q = backend.queue
    limit = q.max_message_bytes
    assert limit >= 64 * 1024
    with pytest.raises(ValueError):
        q.send(["ok", "x" * (limit + 1)])
    assert q.pending() == 0, "a rejected batch sends nothing"
    # The limit counts UTF-8 bytes, not characters.
    with pytest.raises(ValueError):
        q.send(["é" * (limit // 2 + 1)])
    q.send(["x" * limit])
    [d] = q.receive(1, LONG)
    assert len(d.body) == limit


def test_send_10000_in_one_call(backend: Backend) -> None:
    q = backend.queue
    bodies = [f"message-{i}" for i in range(BIG_SEND.get(backend.name, 10_000))]
    started = time.perf_counter()
    q.send(bodies)
    elapsed = time.perf_counter() - started
    if backend.name in ("memory", "local"):
        # One transaction; the target is well under 0.1 s, the bound is loose for CI.
        assert elapsed < 1.0, f"sending 10,000 messages took {elapsed:.3f}s"
    assert q.pending() == len(bodies)
    got = receive_all(q, len(bodies))
    assert sorted(d.body for d in got) == sorted(bodies)
    assert q.receive(10, LONG) == []
    for d in got:
        q.ack(d.receipt)
    assert q.pending() == 0


def _consume(queue: Queue, start: Barrier, holding: Barrier) -> list[str]:
    """Wait for ``start``, receive a first batch and hold it un-acknowledged until
    every consumer has one (``holding``), then receive and acknowledge until the
    queue is empty; return the bodies seen.

    Holding the first batches makes the test independent of scheduling: however
    slowly a consumer starts, the others cannot drain the queue before it got
    work, and the batches in hand at the same moment must be disjoint.
    """
    start.wait(30)  # a consumer that died before this must not hang the test
    bodies: list[str] = []
    receipts: list[str] = []
    deadline = time.monotonic() + 30
    while not receipts:  # an SQS receive may come back empty with messages left
        assert time.monotonic() < deadline, "no first batch"
        for d in queue.receive(10, LONG):
            bodies.append(d.body)
            receipts.append(d.receipt)
    holding.wait(30)
    for receipt in receipts:
        queue.ack(receipt)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        batch = queue.receive(10, LONG)
        if not batch:
            # Empty can mean "another consumer holds the rest": done only when
            # nothing at all is left.
            if queue.pending() == 0:
                break
            time.sleep(0.005)
            continue
        for d in batch:
            bodies.append(d.body)
            queue.ack(d.receipt)
    return bodies


def _assert_each_once(results: list[list[str]], sent: list[str]) -> None:
    seen = [body for bodies in results for body in bodies]
    assert len(seen) == len(set(seen)), "a message was delivered to two consumers"
    assert sorted(seen) == sorted(sent), "a message was lost"
    # Guaranteed by the holding barrier unless the queue handed one consumer
    # everything (or a consumer failed): each got a first batch of its own.
    assert all(results), "a consumer got no work"


def test_concurrent_threads_never_share_a_message(backend: Backend) -> None:
    sent = [f"m{i}" for i in range(CONCURRENT_SEND.get(backend.name, 2000))]
    backend.queue.send(sent)
    results: list[list[str]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(results))
    holding = threading.Barrier(len(results))

    def work(slot: int) -> None:
        try:
            results[slot] = _consume(backend.queue, start, holding)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    _assert_each_once(results, sent)


def _consume_in_child(open_same: Opener, out: Path, start: Barrier, holding: Barrier) -> None:
    # A child process opens its own backend, as a worker process would.
    backend = open_same()
    try:
        out.write_text(json.dumps(_consume(backend.queue, start, holding)))
    finally:
        backend.close()


@pytest.mark.slow
def test_concurrent_processes_never_share_a_message(
    backend: Backend, open_same: Opener, tmp_path: Path
) -> None:
    if backend.name == "aws":
        pytest.skip("moto runs in this process: a forked child gets a copy of its state")
    sent = [f"m{i}" for i in range(3000)]
    backend.queue.send(sent)
    ctx = multiprocessing.get_context("fork")
    outs = [tmp_path / f"out-{i}.json" for i in range(3)]
    start = ctx.Barrier(len(outs))
    holding = ctx.Barrier(len(outs))
    procs = [
        ctx.Process(target=_consume_in_child, args=(open_same, out, start, holding)) for out in outs
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    results: list[list[str]] = [json.loads(out.read_text()) for out in outs]
    _assert_each_once(results, sent)
    assert backend.queue.pending() == 0


def test_messages_survive_reopen(backend: Backend, reopen: Opener) -> None:
    backend.queue.send(["a", "b", "c"])
    [in_flight] = backend.queue.receive(1, LONG)
    again = reopen()
    assert again.queue.pending() == 3
    got = receive_all(again.queue, 2)
    assert sorted(d.body for d in got) == ["b", "c"], "in flight stays invisible"
    # Receipts are plain strings: they stay valid on a reopened backend.
    again.queue.ack(in_flight.receipt)
    assert again.queue.pending() == 2
