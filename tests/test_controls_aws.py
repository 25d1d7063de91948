"""Run controls on the AWS backend (SQS, S3, DynamoDB under moto, in process):
``fanout --backend aws cancel|pause|resume`` with the Lambda handler driven
like the SQS event source, ``max_concurrency`` across concurrent "Lambda
containers" (threads, each with its own runner and clients), and tolerated
failures."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from click.testing import CliRunner, Result

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.base import Backend, RunState, TaskKey, TaskState
from fanout.cli import main
from fanout.dispatch import Dispatcher
from fanout.runner import LEASE_GRACE
from support.helpers import JOBS, drain
from support.lambda_source import EventSource
from support.procs import wait_for

JOB = str(JOBS / "controlled.py")


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, ["--backend", "aws", *args], prog_name="fanout")


def _source(aws: Backend) -> EventSource:
    queue = aws.queue
    return EventSource(queue.sqs, queue.url, timeout_ms=60_000, visibility=30)  # type: ignore[attr-defined]


def _poll(source: EventSource) -> int:
    messages = source.receive()
    if messages:
        source.invoke(messages)
    return len(messages)


def _lines(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def test_cancel_on_aws_stops_the_running_chunk_and_cancels_the_rest(
    aws: Backend, tmp_path: Path
) -> None:
    log = tmp_path / "slices.log"
    params = {"chunks": 20, "steps": 100, "step_s": 0.1, "log": str(log)}
    run_id = coordinator.submit(aws, JOB, params).run_id
    source = _source(aws)
    source.batch = 1
    assert _poll(source) == 1  # the plan: 20 chunks queued
    # One invocation runs a 10 s chunk in the background; cancel it meanwhile.
    invocation = threading.Thread(target=_poll, args=(source,))
    invocation.start()
    try:
        wait_for("a chunk running", lambda: aws.ledger.list_tasks(run_id, (TaskState.RUNNING,)), 30)
        time.sleep(0.3)  # a few steps committed to the chunk's writer
        result = cli("cancel", run_id)
        assert result.exit_code == 0, result.output
        assert "19 queued chunks cancelled, 1 running chunks stop" in result.stdout
    finally:
        invocation.join(60)
    assert not invocation.is_alive()
    # The running chunk checkpointed at its next time_left(), told it was cancelled.
    ends = [line for line in _lines(log) if line[0] == "end"]
    assert ends and ends[0][4:] == ["cancelled", "1"], ends
    # Its continuation, registered after the cancel, is cancelled at its claim
    # (behind the messages of the 19 cancelled at once, acknowledged as finished).
    source.batch = 10
    for _ in range(5):
        if aws.ledger.get_run(run_id).state != RunState.RUNNING:  # type: ignore[union-attr]
            break
        _poll(source)
    run = aws.ledger.get_run(run_id)
    assert run is not None and run.state == RunState.CANCELLED and run.outstanding == 0
    states = Counter(t.state for t in aws.ledger.list_tasks(run_id))
    assert states == {TaskState.DONE: 2, TaskState.CANCELLED: 20}  # plan + 1 slice; 19 + 1
    manifest = coordinator.read_manifest(aws, run_id)
    assert manifest["state"] == "cancelled" and manifest["records"] == run.records > 0
    rows = list(coordinator.committed_records(aws, run_id))
    assert [r["step"] for r in rows] == list(range(len(rows)))  # the committed slice, kept
    again = cli("cancel", run_id)
    assert again.exit_code == 0 and "already ended: cancelled" in again.stdout
    watched = cli("status", run_id, "--watch", "--interval", "0.1")
    assert watched.exit_code == 1


def test_pause_and_resume_on_aws(aws: Backend, tmp_path: Path) -> None:
    log = tmp_path / "slices.log"
    run_id = coordinator.submit(aws, JOB, {"chunks": 6, "steps": 2, "log": str(log)}).run_id
    source = _source(aws)
    assert _poll(source) == 1  # the plan
    paused = cli("pause", run_id)
    assert paused.exit_code == 0 and "paused run" in paused.stdout
    assert "already paused" in cli("pause", run_id).stdout
    assert _poll(source) == 6
    # Dropped, not polled: the queue is empty and nothing ran.
    assert aws.queue.pending() == 0 and _lines(log) == []
    # The recovery sweep does not send a paused run's tasks again.
    assert coordinator.recover(aws) == [] and aws.queue.pending() == 0
    shown = json.loads(cli("status", run_id, "--json").stdout)
    assert shown["controls"]["state"] == "paused" and shown["controls"]["waiting"] == 6
    resumed = cli("resume", run_id)
    assert resumed.exit_code == 0 and "6 chunks sent again" in resumed.stdout
    for _ in range(10):
        if aws.ledger.get_run(run_id).state != RunState.RUNNING:  # type: ignore[union-attr]
            break
        _poll(source)
    run = aws.ledger.get_run(run_id)
    assert run is not None and run.state == RunState.SUCCEEDED and run.records == 12


def test_an_admission_that_loses_every_race_hands_the_delivery_back_without_a_failure(
    aws: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Many containers admitting one capped run at once: a delivery whose slot
    write never gets in is refused like one over the cap (no attempt, no
    failure), not failed: five such deliveries would have dead-lettered it."""
    params = {"chunks": 1, "steps": 1, "step_s": 0.0, "log": str(tmp_path / "slices.log")}
    run_id = coordinator.submit(aws, JOB, params, {"max_concurrency": 2}).run_id
    client = aws.ledger.client  # type: ignore[attr-defined]
    put = client.put_item

    def always_beaten(**kwargs: object) -> object:
        item = kwargs.get("Item")
        if isinstance(item, dict) and item.get("sk", {}).get("S") == "CONTROL":
            raise ClientError(
                {"Error": {"Code": "ConditionalCheckFailedException", "Message": "beaten"}},
                "PutItem",
            )
        return put(**kwargs)

    monkeypatch.setattr(client, "put_item", always_beaten)
    (delivery,) = aws.queue.receive(1, 30)
    assert Dispatcher(aws).handle(delivery, 10.0) == "capped"
    task = aws.ledger.get_task(TaskKey(run_id, "0", 0))
    assert task is not None and task.state == TaskState.QUEUED and task.attempt == 0
    assert "failed (delivery" not in caplog.text and "changed under every one" in caplog.text
    monkeypatch.setattr(client, "put_item", put)  # the crowd moves on: it runs
    run = drain(aws, run_id)
    assert run.state == RunState.SUCCEEDED and run.retries == 0 and run.records == 1


def _overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    most = now = 0
    for _, delta in points:
        now += delta
        most = max(most, now)
    return most


def test_max_concurrency_holds_across_concurrent_invocations_on_aws(
    aws: Backend, tmp_path: Path
) -> None:
    log = tmp_path / "slices.log"
    params = {"chunks": 16, "steps": 1, "step_s": 0.3, "log": str(log)}
    run_id = coordinator.submit(aws, JOB, params, {"max_concurrency": 2}).run_id
    stop = threading.Event()
    outcomes: Counter[str] = Counter()

    def container() -> None:
        backend = open_backend("aws")  # a container of its own: runner, clients
        runner = Dispatcher(backend)
        try:
            while not stop.is_set():
                deliveries = backend.queue.receive(1, 10 + LEASE_GRACE)
                if not deliveries:
                    # As the SQS event source long-polls: containers spinning on
                    # an empty queue would starve the one working (one GIL).
                    stop.wait(0.05)
                for delivery in deliveries:
                    outcomes[runner.handle(delivery, 10.0)] += 1
        finally:
            backend.close()

    threads = [threading.Thread(target=container) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(
            "the run to finish",
            lambda: aws.ledger.get_run(run_id).state != RunState.RUNNING,  # type: ignore[union-attr]
            120,
            every=0.2,
        )
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    run = aws.ledger.get_run(run_id)
    assert run is not None and run.state == RunState.SUCCEEDED and run.retries == 0
    starts = {(a[1], a[2]): float(a[3]) for a in _lines(log) if a[0] == "start"}
    intervals = [(starts[(e[1], e[2])], float(e[3])) for e in _lines(log) if e[0] == "end"]
    assert len(intervals) == 16
    assert _overlap(intervals) == 2, intervals
    assert outcomes["capped"] > 0, outcomes  # the other containers were turned away


@pytest.mark.parametrize(
    ("poison", "state"), [([4], "succeeded_with_failures"), ([0, 1], "failed")]
)
def test_tolerated_failures_on_aws(aws: Backend, poison: list[int], state: str) -> None:
    run_id = coordinator.submit(
        aws, JOB, {"chunks": 20, "poison": poison}, {"tolerated_failures": 1}
    ).run_id
    run = drain(aws, run_id, chunk_timeout=5, limit=120)
    assert run.state == state and run.tasks_dead == len(poison)
    if state == "failed":
        assert run.stop_reason is not None and run.stop_reason.startswith("tolerated failures")
        assert run.tasks_cancelled > 0
    manifest = coordinator.read_manifest(aws, run_id)
    assert sorted(d["chunk_id"] for d in manifest["dead_chunks"]) == [f"0/{i}" for i in poison]
