"""Batching: ``fanout.batched`` and ``ctx.spawn_many``, alone and in a plan over
a million inputs."""

from __future__ import annotations

import itertools
import json

import pytest

import fanout
from fanout import coordinator
from fanout.backends.base import Backend, RunState, TaskState
from support.helpers import JOBS, drain

JOB = str(JOBS / "batched_plan.py")


def _size(batch: list[object]) -> int:
    return len(json.dumps(batch, separators=(",", ":")).encode())


def test_batched_by_count_keeps_every_item_in_order() -> None:
    batches = list(fanout.batched(range(10), max_items=4))
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_batched_by_bytes_fills_each_batch_up_to_the_limit() -> None:
    items = [{"path": f"s3://bucket/{i:05d}.csv"} for i in range(1000)]
    batches = list(fanout.batched(items, max_bytes=1000))
    assert [x for b in batches for x in b] == items
    assert all(_size(b) <= 1000 for b in batches)
    # Full: one more item would not have fitted.
    for batch, following in itertools.pairwise(batches):
        assert _size([*batch, following[0]]) > 1000


def test_batched_by_both_and_lazily() -> None:
    first = next(fanout.batched(itertools.count(), max_items=3, max_bytes=100))
    assert first == [0, 1, 2]  # from an endless iterator: nothing read ahead
    assert list(fanout.batched(["aaaa", "bbbb", "cccc"], max_items=5, max_bytes=15)) == [
        ["aaaa", "bbbb"],  # ["aaaa","bbbb"] is 15 bytes
        ["cccc"],
    ]


def test_batched_refuses_an_item_too_big_for_any_batch() -> None:
    with pytest.raises(fanout.PermanentError, match=r"item 2 is 12 bytes as JSON, over max_bytes"):
        list(fanout.batched(["a", "b", "x" * 10, "c"], max_bytes=10))
    with pytest.raises(ValueError, match="give max_items, max_bytes or both"):
        list(fanout.batched([1]))
    with pytest.raises(TypeError, match="must be JSON"):
        list(fanout.batched([object()], max_bytes=100))


def test_a_plan_over_a_million_inputs_makes_chunks_of_a_useful_size(mem: Backend) -> None:
    params = {"n": 1_000_000, "max_items": 100_000}
    run_id = coordinator.submit(mem, JOB, params).run_id
    run = drain(mem, run_id, limit=120)
    assert run.state == RunState.SUCCEEDED and run.chunks_total == 11  # the plan + 10
    rows = list(coordinator.committed_records(mem, run_id))
    assert sorted(r["count"] for r in rows) == [100_000] * 10
    assert sum(r["total"] for r in rows) == sum(range(1_000_000))


def test_max_bytes_keeps_payloads_in_the_message(mem: Backend) -> None:
    limit = mem.queue.max_message_bytes
    run_id = coordinator.submit(mem, JOB, {"n": 200_000, "max_bytes": limit - 200}).run_id
    run = drain(mem, run_id, limit=120)
    assert run.state == RunState.SUCCEEDED and run.records > 1
    assert list(mem.store.list(f"runs/{run_id}/payloads/")) == []  # none offloaded
    assert sum(r["count"] for r in coordinator.committed_records(mem, run_id)) == 200_000


def test_an_input_too_big_fails_the_plan_at_once_with_the_reason(mem: Backend) -> None:
    run_id = coordinator.submit(mem, JOB, {"n": 10, "max_bytes": 10_000, "big": 3}).run_id
    run = drain(mem, run_id)
    assert run.state == RunState.FAILED and run.chunks_total == 1
    (dead,) = mem.ledger.list_tasks(run_id, (TaskState.DEAD,))
    assert dead.chunk_id == "0" and dead.attempt == 1
    assert "batched: item 3 is 1,000,002 bytes as JSON, over max_bytes (10,000)" in (
        dead.error or ""
    )
