"""A late attempt (its lease expired while it still ran, and a newer attempt
took over and committed) must change nothing the committed attempt left: not
its children's messages, nor the payloads they offloaded to the store."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fanout import coordinator
from fanout.backends.base import Backend, RunState, TaskKey
from fanout.dispatch import Dispatcher
from support.helpers import JOBS, drain

LATE_SPAWN = str(JOBS / "late_spawn.py")


def test_a_late_attempt_does_not_overwrite_the_offloaded_payload(
    aws: Backend, tmp_path: Path, fast_leases: None
) -> None:
    gate = tmp_path / "go"
    run_id = coordinator.submit(aws, LATE_SPAWN, {"gate": str(gate)}).run_id
    (first,) = aws.queue.receive(1, 1.0)
    # Attempt 1 of the plan, in its own runner: it spawns, then waits at the gate
    # while its 1 s lease runs out.
    late = threading.Thread(target=Dispatcher(aws).handle, args=(first, 1.0), daemon=True)
    late.start()
    deadline = time.monotonic() + 30
    outcome = None
    while outcome != "committed" and time.monotonic() < deadline:
        for delivery in aws.queue.receive(1, 5.0):
            # The redelivery: attempt 2 takes over and commits its own child.
            outcome = Dispatcher(aws).handle(delivery, 5.0)
        time.sleep(0.1)
    assert outcome == "committed"
    root = aws.ledger.get_task(TaskKey(run_id, "0", 0))
    assert root is not None and root.attempt == 2
    gate.touch()  # the late attempt wakes up, writes its child's payload, is refused
    late.join(30)
    assert not late.is_alive()
    run = drain(aws, run_id, chunk_timeout=5, limit=60)
    assert run.state == RunState.SUCCEEDED
    assert [r["by"] for r in coordinator.committed_records(aws, run_id)] == [2]
