"""A chunk's output is bounded by disk, not by the worker's memory: a chunk that
emits three times its ``--chunk-memory`` in records commits, and every byte
reads back. Process level, through ``fanout run``: the worker's resident memory
is what ``--chunk-memory`` watches and what the kernel's OOM killer would."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fastavro

from support.helpers import JOBS
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
