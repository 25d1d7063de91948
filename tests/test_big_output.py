"""A chunk's output is bounded by disk, not by the worker's memory: a chunk that
emits three times its ``--chunk-memory`` in records commits, and every byte
reads back. Process level, through ``fanout run``: the worker's resident memory
is what ``--chunk-memory`` watches and what the kernel's OOM killer would."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import fastavro

from support.helpers import JOBS
from support.lambda_source import checkout_pythonpath
from support.procs import fanout
from testjobs.big_output import blob

BIG = str(JOBS / "big_output.py")


def test_a_chunk_emitting_more_than_its_memory_limit_commits_every_record(home: Path) -> None:
    records, size = 300, 1_000_000  # 300 MB of incompressible bytes
    result = fanout(
        home,
        *("run", BIG, "-p", f"records={records}", "-p", f"size={size}"),
        *("-S", "codec=null", "-w", "1", "--chunk-memory", "100", "--json"),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    status = json.loads(result.stdout.splitlines()[-1])
    assert status["state"] == "succeeded" and status["records"] == records, status
    run_id = status["run_id"]
    [avro] = (home / "store" / "runs" / run_id / "data").rglob("*.avro")
    seen = 0
    with avro.open("rb") as f:
        for record in fastavro.reader(f):
            i = record["i"]
            assert i == seen
            want = blob(i, size)
            assert hashlib.sha256(record["data"]).digest() == hashlib.sha256(want).digest()
            seen += 1
    assert seen == records


SLOW_STORE = Path(__file__).parent / "support" / "slow_store.py"


def test_a_chunk_writing_fast_keeps_time_to_commit_what_it_wrote(home: Path) -> None:
    # A chunk writing 60 MB/s ran to its soft deadline (1 s before the hard
    # one) with ~180 MB written; committing that to a 60 MB/s store took 3 s,
    # past the hard timeout: timed out, retried the same, dead (found by a
    # black-box helper with codec=null on a local disk). time_left() now keeps
    # back the commit's time for what was written.
    job = str(JOBS / "fast_output.py")
    args = ["-p", "records=200", "-w", "1", "--chunk-timeout", "4", "-S", "codec=null", "--json"]
    env = {**os.environ, "PYTHONPATH": checkout_pythonpath(), "FANOUT_TEST_STORE_MBPS": "60"}
    result = subprocess.run(
        [sys.executable, str(SLOW_STORE), "--home", str(home), "run", job, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "timed out" not in result.stderr, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["state"] == "succeeded" and summary["records"] == 200, summary
    store = home / "store"
    manifest = json.loads((store / "runs" / summary["run_id"] / "_manifest.json").read_text())
    assert len(manifest["files"]) > 1  # it checkpointed
    seen = []
    for entry in manifest["files"]:
        with (store / entry["key"]).open("rb") as f:
            seen += [record["i"] for record in fastavro.reader(f)]  # type: ignore[index]
    assert sorted(seen) == list(range(200))
