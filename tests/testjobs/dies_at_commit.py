"""A job whose chunk 0/1 kills its worker process at its commit: after it ran
and ended, before the ledger took it (the window between a chunk's end and
its commit), at every attempt. ``max_attempts=2``: it is dead after two."""

import os
import time

from fanout import Job
from fanout.backends.local.ledger import SQLiteLedger

job = Job(
    "dies-at-commit",
    schema={"type": "record", "name": "r", "fields": [{"name": "c", "type": "long"}]},
    max_attempts=2,
    backoff_base=0.05,
    backoff_cap=0.1,
)

_commit = SQLiteLedger.commit


def _dying_commit(self, key, *args, **kwargs):  # type: ignore[no-untyped-def]
    if key.chunk_id == "0/1":
        os._exit(3)
    return _commit(self, key, *args, **kwargs)


SQLiteLedger.commit = _dying_commit  # type: ignore[method-assign]


@job.plan
def plan(params, ctx):
    return [{"c": c} for c in range(3)]


@job.process
def process(chunk, ctx):
    time.sleep(0.3)  # slow enough that the worker claims one at a time
    ctx.emit({"c": chunk["c"]})
