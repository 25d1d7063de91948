"""What a job hands fanout that no message can carry (a cursor, a spawned
payload) fails its chunk for good, naming the job's call: no retry fixes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fanout import coordinator
from fanout.backends.base import Backend, RunState, TaskState
from support.helpers import drain

#: A job that hands fanout one value no message can carry, as its cursor
#: (``ctx.resume_at``) or as a spawned payload (``ctx.spawn``), by name.
BAD_VALUE_JOB = """
import datetime
from fanout import Job
job = Job("bad_value")

def bad(case):
    deep = []
    for _ in range(300):
        deep = [deep]
    return {
        "int keys": {1: "a"},
        "lone surrogate": "\\ud800",
        "deep": deep,
        "set": {1, 2},
        "bytes": b"x",
        "datetime": datetime.datetime(2030, 1, 1),
        "nan": float("nan"),
    }[case]

@job.process
def process(payload, ctx):
    if payload.get("child"):
        return None
    if payload["via"] == "cursor":
        if ctx.cursor is None:
            return ctx.resume_at(bad(payload["case"]))
        return None
    ctx.spawn({"child": True, "value": bad(payload["case"])})
    return None
"""


@pytest.mark.parametrize("via", ["cursor", "spawn"])
@pytest.mark.parametrize(
    "case", ["int keys", "lone surrogate", "deep", "set", "bytes", "datetime", "nan"]
)
def test_a_value_no_message_can_carry_fails_the_chunk_for_good(
    mem: Backend, tmp_path: Path, via: str, case: str
) -> None:
    # Such a cursor failed as an internal error or a TypeError, and was retried
    # max_attempts times though no retry could fix it; so was such a payload.
    job = tmp_path / "bad_value.py"
    job.write_text(BAD_VALUE_JOB)
    run_id = coordinator.submit(mem, str(job), {"via": via, "case": case}).run_id
    assert drain(mem, run_id).state == RunState.FAILED
    (dead,) = mem.ledger.list_tasks(run_id, (TaskState.DEAD,))
    assert dead.attempt == 1, dead.history
    error = dead.error or ""
    assert error.startswith("permanent: "), error
    what = "ctx.resume_at" if via == "cursor" else "ctx.spawn"
    assert what in error and "JSON" in error, error
    assert "internal" not in error, error
