"""Replays and finalization: a replay never reopens a run while its manifest
is written (the ledger refuses it; ``coordinator.replay`` waits it out, and
takes over a finalizer that died), so no replayed record is lost from the
manifest."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fanout import coordinator
from fanout.backends.base import Backend, RunState
from fanout.dispatch import Dispatcher
from support.helpers import TREE, drain
from testjobs.tree import Params, expected_items


def _run(backend: Backend, settings: dict[str, Any] | None = None, **params: Any) -> str:
    return coordinator.submit(backend, TREE, params, settings).run_id


def _assert_exactly_once(backend: Backend, run_id: str, **params: Any) -> None:
    items = Counter(r["item"] for r in coordinator.committed_records(backend, run_id))
    assert [i for i, n in items.items() if n > 1] == []
    assert set(items) == expected_items(Params(**params))


def test_a_replay_while_the_run_finalizes_loses_no_records(mem: Backend, tmp_path: Path) -> None:
    # The replay comes between the finalizer's listing of the done tasks and
    # its write of the manifest. It used to reopen the run: the replayed
    # chunk ran and a second finalizer wrote the whole manifest, then the
    # first one's stale manifest (without the replayed records) replaced it.
    from fanout.backends.rules import finalizing_refusal
    from fanout.errors import UserError

    flag = tmp_path / "broken"
    flag.touch()
    run_id = _run(mem, {"max_attempts": 1}, chunks=3, rows=4, broken_flag=str(flag))
    put = mem.store.put
    refused: list[str] = []

    def put_then_replay(key: str, data: bytes, *args: Any, **kwargs: Any) -> None:
        if key.endswith("_manifest.json") and not refused:
            refused.append("")  # once: the replayed run's own finalizer comes back here
            flag.unlink()
            try:
                coordinator.replay(mem, run_id, wait=0.0)
                drain(mem, run_id)
            except UserError as e:
                refused[0] = str(e)
        put(key, data, *args, **kwargs)

    mem.store.put = put_then_replay  # type: ignore[method-assign]
    drain(mem, run_id)
    assert refused == [finalizing_refusal(run_id)]
    coordinator.replay(mem, run_id)
    run = drain(mem, run_id)
    assert run.state == RunState.SUCCEEDED and run.records == 12
    assert coordinator.read_manifest(mem, run_id)["records"] == 12
    _assert_exactly_once(mem, run_id, chunks=3, rows=4)


def test_a_replay_waits_out_a_finalizer(mem: Backend, tmp_path: Path) -> None:
    import threading

    flag = tmp_path / "broken"
    flag.touch()
    run_id = _run(mem, {"max_attempts": 1}, chunks=3, rows=4, broken_flag=str(flag))
    put = mem.store.put
    replays: list[threading.Thread] = []
    reopened: list[int] = []

    def put_slowly(key: str, data: bytes, *args: Any, **kwargs: Any) -> None:
        if key.endswith("_manifest.json") and not replays:
            flag.unlink()
            replay = threading.Thread(
                target=lambda: reopened.append(len(coordinator.replay(mem, run_id, wait=10.0)))
            )
            replays.append(replay)
            replay.start()
            time.sleep(0.5)  # the replay waits while the manifest is written
            assert reopened == []
        put(key, data, *args, **kwargs)

    mem.store.put = put_slowly  # type: ignore[method-assign]
    drain(mem, run_id)
    replays[0].join(10)
    assert reopened == [1]
    run = drain(mem, run_id)
    assert run.state == RunState.SUCCEEDED and run.records == 12
    assert coordinator.read_manifest(mem, run_id)["records"] == 12


def test_a_replay_takes_over_a_finalizer_that_died(
    mem: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No worker runs to sweep it: the replay itself finishes the dead
    # finalizer's work once it is stale, instead of refusing for ever.
    flag = tmp_path / "broken"
    flag.touch()
    run_id = _run(mem, {"max_attempts": 1}, chunks=2, rows=2, broken_flag=str(flag))
    finish = mem.ledger.finish
    mem.ledger.finish = lambda *args, **kwargs: None  # type: ignore[method-assign]  # died before it
    deadline = time.monotonic() + 10
    while mem.ledger.get_run(run_id).state != RunState.FINALIZING:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        for delivery in mem.queue.receive(10, 15):
            Dispatcher(mem).handle(delivery, 10)
    mem.ledger.finish = finish  # type: ignore[method-assign]
    flag.unlink()
    with pytest.raises(Exception, match="is finalizing"):
        coordinator.replay(mem, run_id, wait=0.0)  # a live finalizer, for all it knows
    monkeypatch.setattr(coordinator, "FINALIZE_STALE", 0.0)
    assert [t.chunk_id for t in coordinator.replay(mem, run_id, wait=1.0)] == ["0/0"]
    run = drain(mem, run_id)
    assert run.state == RunState.SUCCEEDED and run.records == 4
    assert coordinator.read_manifest(mem, run_id)["records"] == 4


def test_a_slow_finalizer_taken_over_leaves_the_manifest_to_the_newer_one(
    mem: Backend, tmp_path: Path
) -> None:
    # A finalizer lists the done tasks, then stalls past FINALIZE_STALE. The
    # sweep takes the run over and finishes it, a replay reopens it, and the
    # replayed run is finalized with every record. The slow one then wakes
    # up: it used to write its old listing over the newer manifest.
    from fanout.backends.base import TaskState
    from fanout.events import events_for
    from fanout.finalize import finalize_run

    flag = tmp_path / "broken"
    flag.touch()
    run_id = _run(mem, {"max_attempts": 1}, chunks=3, rows=4, broken_flag=str(flag))
    list_tasks = mem.ledger.list_tasks
    stalled: list[str] = []

    def list_then_stall(*args: Any, **kwargs: Any) -> Any:
        listed = list_tasks(*args, **kwargs)
        if not stalled and args[1:2] == ((TaskState.DONE,),):
            stalled.append(run_id)
            time.sleep(0.01)
            assert finalize_run(mem.ledger, mem.store, events_for(mem), run_id, stale_after=0.0)
            flag.unlink()
            coordinator.replay(mem, run_id, wait=0.0)
            assert drain(mem, run_id).records == 12
        return listed

    mem.ledger.list_tasks = list_then_stall  # type: ignore[method-assign]
    run = drain(mem, run_id)
    assert stalled == [run_id]
    assert run.state == RunState.SUCCEEDED and run.records == 12
    assert coordinator.read_manifest(mem, run_id)["records"] == 12
