"""``fanout cost``: the usage a run's own figures imply on AWS, its price, and
the command's output; and the attempt durations both ledgers keep for it."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.base import Backend, Output, RunRecord, RunState, TaskRecord, TaskState
from fanout.cost import (
    LAMBDA_PLATFORM_BYTES,
    Prices,
    Usage,
    measure,
    price,
    run_item_size,
    task_item_size,
    total,
)
from fanout.messages import ChunkMessage, encode
from fanout.metrics import ChunkMetrics, emf_document
from support.cli import cli
from support.helpers import TREE, drain

RUN = "tree-20261122T140000-abcdef"


def known_run() -> tuple[RunRecord, list[TaskRecord]]:
    """A plan that spawned two chunks; chunk 0/1 failed once, then committed."""
    run = RunRecord(
        run_id=RUN,
        job="/jobs/tree.py",
        job_name="tree",
        params={},
        settings={"max_attempts": 3},
        state=RunState.SUCCEEDED,
        tasks_total=3,
        tasks_done=3,
        records=15,
        bytes=1500,
        retries=1,
    )

    def task(
        chunk_id: str, attempts: int, history: list[dict[str, object]], out: int
    ) -> TaskRecord:
        kind = "plan" if chunk_id == "0" else "process"
        msg = ChunkMessage(run_id=RUN, chunk_id=chunk_id, kind=kind, payload={"name": chunk_id})
        output = Output(f"runs/{RUN}/data/{chunk_id}.avro", out, out * 100) if out else None
        return TaskRecord(
            RUN,
            chunk_id,
            0,
            TaskState.DONE,
            attempts,
            0,
            chunk_id.count("/"),
            encode(msg),
            output=output,
            history=history,
        )

    def done(at: float, records: int, took: float, attempt: int = 1) -> dict[str, object]:
        return {"outcome": "committed", "at": at, "records": records, "duration_s": took,
                "attempt": attempt}  # fmt: skip

    failed = {"outcome": "error", "at": 2.0, "error": "boom", "duration_s": 2.0, "attempt": 1}
    tasks = [
        task("0", 1, [done(1.0, 0, 0.5)], 0),
        task("0/0", 1, [done(2.0, 10, 1.0)], 10),
        task("0/1", 2, [failed, done(3.0, 5, 1.5, attempt=2)], 5),
    ]
    return run, tasks


def test_usage_of_a_known_run() -> None:
    run, tasks = known_run()
    # Every item is under 1 KB, so each write is one unit and each read one unit.
    assert run_item_size(run) <= 1024 and all(task_item_size(t) <= 1024 for t in tasks)
    u = measure(run, tasks)
    assert (u.deliveries, u.attempts, u.measured_attempts) == (4, 4, 4)
    assert u.measured_seconds == pytest.approx(0.5 + 1.0 + 2.0 + 1.5)
    assert u.compute_seconds == pytest.approx(5.0)
    # SQS: the root sent alone, the two children in one batch; a receive per
    # delivery; the retry hands its message back; the other three are deleted.
    assert (u.sqs_sends, u.sqs_receives, u.sqs_visibility, u.sqs_deletes) == (2, 4, 1, 3)
    assert u.sqs_requests == 10
    # S3: two output files and the manifest; no offloaded payloads.
    assert (u.s3_puts, u.s3_gets, u.s3_bytes) == (3, 0, 1500)
    # DynamoDB writes (transactions count twice, tasks on the parent index once more):
    wru = (
        2 * (1 + 1)  # submit: run + root in a transaction
        + 1 + 2 * (1 + 1)  # root: claim, commit transaction (task + run)
        + 2 * (1 + 1)  # root registers both children: lease check + counters
        + (2 + 1) + (1 + 1) + (2 * (1 + 1) + 1)  # 0/0: registered, claimed, committed
        + (2 + 1) + 2 * (1 + 1) + 2 * (2 * (1 + 1) + 1)  # 0/1: 2 claims, failure + commit
        + 2  # finalize: begin and finish
    )  # fmt: skip
    assert u.dynamodb_wru == wru == 42
    rru = (
        (1 + 1) + (1 + 1)  # root: claim reads task + run; commit reads lease + counter
        + (1 + 1 + 1) + (1 + 1)  # 0/0: claim also reads the parent's state
        + 2 * (1 + 1 + 1) + 1 + (1 + 1)  # 0/1: two claims, the failure's lease read, commit
        + (1 + 2 * 1)  # finalize: the run, and two queries of the tasks
    )  # fmt: skip
    assert u.dynamodb_rru == rru == 21
    sample = ChunkMetrics("tree", RUN, "0/0/0", 1, 1, "committed", 1.234, 1000, False)
    emf = len(json.dumps(emf_document(sample), separators=(",", ":"))) + 1
    assert u.log_bytes == 4 * emf + 4 * LAMBDA_PLATFORM_BYTES


def test_unmeasured_attempts_are_priced_at_the_mean() -> None:
    run, tasks = known_run()
    # A takeover of an expired lease: an attempt the ledger could not time.
    tasks[1].attempt = 2
    tasks[1].history.insert(0, {"outcome": "crashed", "at": 1.5, "attempt": 1})
    u = measure(run, tasks)
    assert (u.attempts, u.measured_attempts) == (5, 4)
    assert u.compute_seconds == pytest.approx(5.0 + 5.0 / 4)
    # The takeover's transaction: one more task write and two run writes, plus
    # the second claim's reads and update.
    assert u.dynamodb_wru == 42 + (1 + 2) + (1 + 1)
    assert u.deliveries == 5 and u.sqs_visibility == 1


def test_price_arithmetic() -> None:
    usage = Usage(
        deliveries=10,
        attempts=4,
        measured_attempts=2,
        measured_seconds=3.0,
        sqs_sends=1,
        sqs_receives=2,
        sqs_deletes=3,
        sqs_visibility=4,
        s3_puts=5,
        s3_gets=6,
        s3_bytes=2 * 1024**3,
        dynamodb_wru=7,
        dynamodb_rru=8,
        log_bytes=1024**3 // 2,
    )
    prices = Prices(
        lambda_gb_second=1.0,
        lambda_request=0.1,
        sqs_request=0.01,
        s3_put=2.0,
        s3_get=3.0,
        s3_gb_month=4.0,
        dynamodb_write_unit=5.0,
        dynamodb_read_unit=6.0,
        log_ingest_gb=7.0,
    )
    lines = price(usage, memory_mb=2048, prices=prices)
    costs = {(line.service, line.item): line.cost for line in lines}
    # 3 s measured over 2 attempts, 2 more at the 1.5 s mean = 6 s at 2 GB.
    assert costs["Lambda", "compute"] == pytest.approx(12.0)
    assert costs["Lambda", "requests"] == pytest.approx(1.0)
    assert costs["SQS", "requests (64 KiB units)"] == pytest.approx(0.1)
    assert costs["S3", "PUT requests"] == pytest.approx(10.0)
    assert costs["S3", "GET requests"] == pytest.approx(18.0)
    assert costs["S3", "storage, one month"] == pytest.approx(8.0)
    assert costs["DynamoDB", "write request units"] == pytest.approx(35.0)
    assert costs["DynamoDB", "read request units"] == pytest.approx(48.0)
    assert costs["CloudWatch", "log ingestion"] == pytest.approx(3.5)
    assert total(lines) == pytest.approx(12 + 1 + 0.1 + 10 + 18 + 8 + 35 + 48 + 3.5)
    assert all(line.cost == pytest.approx(line.quantity * line.unit_price) for line in lines)


# -- the command ---------------------------------------------------------------------


@pytest.fixture
def finished_run(home: Path) -> Iterator[str]:
    backend = open_backend("local", home=home)
    run_id = coordinator.submit(
        backend, TREE, {"chunks": 3, "rows": 20, "step": 8, "fail_chunks": [1], "fail_times": 1}
    ).run_id
    assert drain(backend, run_id).state == RunState.SUCCEEDED
    backend.close()
    yield run_id


def test_cost_output_shape(home: Path, finished_run: str) -> None:
    out = cli(home, "cost", finished_run)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"run {finished_run}: estimated AWS cost (us-east-1 list prices")
    assert lines[0].endswith("Lambda at 1024 MB)")
    assert lines[1].split() == ["service", "item", "quantity", "unit", "price", "cost"]
    rows = lines[2:11]
    assert [r.split()[0] for r in rows] == [
        "Lambda", "Lambda", "SQS", "S3", "S3", "S3", "DynamoDB", "DynamoDB", "CloudWatch",
    ]  # fmt: skip
    for row in rows:
        assert row.split()[-1].startswith("$") and " per " in row
    assert lines[11].startswith("total") and lines[11].split()[-1].startswith("$")
    assert lines[12].startswith("per million records: $")
    assert lines[13].startswith("measured: 13 attempts")  # 10 tasks, 3 failed slices
    assert lines[14].startswith("not counted:")


def test_cost_json_adds_up_and_scales_with_memory(home: Path, finished_run: str) -> None:
    small = json.loads(cli(home, "cost", finished_run, "--json").stdout)
    big = json.loads(cli(home, "cost", finished_run, "--json", "--memory", "2048").stdout)
    assert {"run_id", "region", "prices_as_of", "memory_mb", "usage", "lines", "total_usd"} <= set(
        small
    )
    assert small["total_usd"] == pytest.approx(sum(line["cost"] for line in small["lines"]))
    compute = next(line for line in small["lines"] if line["item"] == "compute")
    assert compute["quantity"] == pytest.approx(small["usage"]["compute_seconds"])
    assert small["usage"]["attempts"] == small["usage"]["measured_attempts"] == 13
    assert small["usage"]["sqs_visibility"] == 3  # the three retries
    big_compute = next(line for line in big["lines"] if line["item"] == "compute")
    assert big_compute["cost"] == pytest.approx(2 * compute["cost"])
    assert big["total_usd"] - small["total_usd"] == pytest.approx(compute["cost"])
    bad = cli(home, "cost", finished_run, "--memory", "64")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ")


# -- durations in both ledgers -------------------------------------------------------


@pytest.mark.parametrize("which", ["local", "aws"])
def test_both_ledgers_keep_each_attempts_duration(
    which: str, home: Path, request: pytest.FixtureRequest
) -> None:
    backend: Backend = (
        request.getfixturevalue("aws") if which == "aws" else open_backend("local", home=home)
    )
    try:
        run_id = coordinator.submit(
            backend, TREE, {"chunks": 1, "rows": 2, "fail_chunks": [0], "fail_times": 1}
        ).run_id
        run = drain(backend, run_id, chunk_timeout=5, limit=60)
        assert run.state == RunState.SUCCEEDED
        tasks = backend.ledger.list_tasks(run_id)
        events = [e for t in tasks for e in t.history]
        assert sorted(str(e["outcome"]) for e in events) == ["committed", "committed", "error"]
        for event in events:
            took = event["duration_s"]
            assert isinstance(took, int | float) and 0 <= took < 5
        usage = measure(run, tasks)
        assert usage.attempts == usage.measured_attempts == 3
        billed = [math.ceil(float(str(e["duration_s"])) * 1000) / 1000 for e in events]
        assert math.isclose(usage.measured_seconds, sum(billed))
    finally:
        if which == "local":
            backend.close()
