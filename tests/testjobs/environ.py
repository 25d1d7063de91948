"""A job that meddles with its process's environment: its module sets a
variable at import (as ``load_dotenv()`` would), and each chunk, the plan
included, adds, changes and deletes variables (that one too, and
``_X_AMZN_TRACE_ID``) after emitting what it found. Every process chunk of a
run should find the same: the environment its worker gave it, plus the
import's variable, whichever chunks ran before it in that process."""

from __future__ import annotations

import os
from typing import Any

from fanout import Job

#: Set at import: a worker imports the job once per run and process, then
#: caches it, so later chunks see it only if no chunk's restore removes it.
IMPORTED = "FANOUT_TEST_IMPORTED"
#: Added by each chunk.
ADDED = "FANOUT_TEST_ADDED"
#: Given by the test's environment; each chunk changes it, then deletes the other.
CHANGED = "FANOUT_TEST_CHANGED"
REMOVED = "FANOUT_TEST_REMOVED"
#: Set by the Lambda runtime before each invocation.
TRACE = "_X_AMZN_TRACE_ID"

os.environ[IMPORTED] = "at import"

SCHEMA = {
    "type": "record",
    "name": "environ",
    "namespace": "tests",
    "fields": [
        {"name": "i", "type": "long"},
        {"name": "pid", "type": "long"},
        *({"name": f, "type": ["null", "string"]} for f in ("imported", "added", "changed")),
        *({"name": f, "type": ["null", "string"]} for f in ("removed", "trace")),
    ],
}

job = Job("environ", schema=SCHEMA)


def _meddle(who: str) -> None:
    os.environ[ADDED] = who
    os.environ[CHANGED] = f"changed by {who}"
    os.environ[TRACE] = f"set by {who}"
    os.environ.pop(REMOVED, None)
    os.environ.pop(IMPORTED, None)


@job.plan
def plan(params: dict[str, Any], ctx: Any) -> Any:
    _meddle("the plan")
    return [{"i": i} for i in range(int(params.get("chunks", 6)))]


@job.process
def process(chunk: dict[str, Any], ctx: Any) -> None:
    env = os.environ
    ctx.emit(
        {
            "i": chunk["i"],
            "pid": os.getpid(),
            "imported": env.get(IMPORTED),
            "added": env.get(ADDED),
            "changed": env.get(CHANGED),
            "removed": env.get(REMOVED),
            "trace": env.get(TRACE),
        }
    )
    _meddle(f"chunk {chunk['i']}")
