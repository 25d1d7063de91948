"""A lost lease on the memory and local backends: an attempt that outlives its
lease writes its output file, another attempt takes the task over and commits,
and the first attempt's late commit must be refused. Its file stays in the
store (uncommitted files are garbage) and the manifest never lists it.

The interleaving is forced, not raced: the first attempt's ``store.put`` of its
output runs the takeover before returning, so the commit that follows it is
always late. (On AWS the same is checked with the Lambda watchdog, in
``test_aws_engine.py``.)
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.base import Backend, RunState, TaskKey, TaskState
from fanout.dispatch import Dispatcher
from support.helpers import TREE, drain

TIMEOUT = 0.2  # the hard timeout: with fast_leases a lease lasts 0.25 s


@pytest.fixture(params=["memory", "local"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    opened = open_backend(request.param, home=tmp_path / "home")
    yield opened
    opened.close()


def _body_is(body: str, chunk_id: str) -> bool:
    return f'"chunk_id":"{chunk_id}"' in body.replace(" ", "")


def test_a_late_commit_is_refused_and_its_file_never_reaches_the_manifest(
    backend: Backend,
    fast_leases: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run_id = coordinator.submit(backend, TREE, {"chunks": 2, "rows": 3}).run_id
    (plan,) = backend.queue.receive(1, 30)
    assert Dispatcher(backend).handle(plan, TIMEOUT) == "committed"
    key = TaskKey(run_id, "0/0")
    late_file: list[str] = []
    takeover: list[str] = []
    put = backend.store.put

    def put_then_lose_the_lease(
        okey: str, data: bytes | BinaryIO, *, if_absent: bool = False
    ) -> bool:
        wrote = put(okey, data, if_absent=if_absent)
        if "/data/0.0-s0-a1-" in okey:
            late_file.append(okey)
            # The first attempt stalls after writing its file (a long GC pause,
            # a stuck network call) until its lease and its message's
            # visibility have run out; another worker then takes 0/0 over.
            time.sleep(TIMEOUT + 0.15)
            for delivery in backend.queue.receive(10, 30):
                if _body_is(delivery.body, "0/0"):
                    takeover.append(Dispatcher(backend).handle(delivery, 10))
                else:
                    backend.queue.release(delivery.receipt, 0)
        return wrote

    monkeypatch.setattr(backend.store, "put", put_then_lose_the_lease)
    first = [d for d in backend.queue.receive(10, TIMEOUT + 0.05) if _body_is(d.body, "0/0")]
    assert len(first) == 1
    assert Dispatcher(backend).handle(first[0], TIMEOUT) == "lease lost"
    assert takeover == ["committed"] and len(late_file) == 1
    assert f"task {key}: lease lost before commit; output discarded" in caplog.messages

    # The ledger kept the takeover's commit, not the late one.
    task = backend.ledger.get_task(key)
    assert task is not None and task.state == TaskState.DONE and task.attempt == 2
    assert [(e["attempt"], e["outcome"]) for e in task.history] == [
        (1, "crashed"),
        (2, "committed"),
    ]
    assert task.output is not None and "/data/0.0-s0-a2-" in task.output.key
    # The late file was written, and is garbage.
    assert backend.store.exists(late_file[0])

    run = drain(backend, run_id, chunk_timeout=10)
    assert run.state == RunState.SUCCEEDED and run.outstanding == 0
    assert (run.records, run.tasks_done, run.retries) == (6, 3, 1)
    manifest = coordinator.read_manifest(backend, run_id)
    committed = {
        t.output.key: t.output.records
        for t in backend.ledger.list_tasks(run_id, (TaskState.DONE,))
        if t.output is not None
    }
    assert {f["key"]: f["records"] for f in manifest["files"]} == committed
    assert late_file[0] not in committed and manifest["records"] == 6
    # Written files: the two committed ones and the late one, which nothing reads.
    data = set(backend.store.list(f"runs/{run_id}/data/"))
    assert data == {*committed, late_file[0]}
    items = Counter(r["item"] for r in coordinator.committed_records(backend, run_id))
    assert items == Counter(f"{c}:{r}" for c in "01" for r in range(3))


def test_a_failure_reported_after_the_lease_was_lost_changes_nothing(
    backend: Backend, fast_leases: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for an attempt that fails late: its retry is refused, so it
    cannot put a task that another attempt committed back in the queue."""
    run_id = coordinator.submit(
        backend, TREE, {"chunks": 1, "rows": 2, "fail_chunks": [0], "fail_times": 1}
    ).run_id
    (plan,) = backend.queue.receive(1, 30)
    assert Dispatcher(backend).handle(plan, TIMEOUT) == "committed"
    takeover: list[str] = []
    retry = backend.ledger.retry

    def retry_late(key: TaskKey, token: str, *args: Any) -> bool:
        if not takeover:
            time.sleep(TIMEOUT + 0.15)  # stalled until its lease ran out
            (again,) = backend.queue.receive(1, 30)
            takeover.append(Dispatcher(backend).handle(again, 10))  # attempt 2 succeeds
        return retry(key, token, *args)

    monkeypatch.setattr(backend.ledger, "retry", retry_late)
    (delivery,) = backend.queue.receive(1, TIMEOUT + 0.05)
    assert Dispatcher(backend).handle(delivery, TIMEOUT) == "lease lost"
    assert takeover == ["committed"]
    task = backend.ledger.get_task(TaskKey(run_id, "0/0"))
    assert task is not None and task.state == TaskState.DONE
    assert [(e["attempt"], e["outcome"]) for e in task.history] == [
        (1, "crashed"),
        (2, "committed"),
    ]
    run = backend.ledger.get_run(run_id)
    assert run is not None and run.state == RunState.SUCCEEDED
    assert (run.records, run.retries, run.outstanding) == (2, 1, 0)
