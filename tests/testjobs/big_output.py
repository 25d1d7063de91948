"""A job whose one chunk emits more output than its worker may hold in memory:
``records`` records of ``size`` random bytes each (seeded by the record's index,
so a reader can check every byte), emitted one at a time and let go."""

from __future__ import annotations

import random

from pydantic import BaseModel

from fanout import Job

SCHEMA = {
    "type": "record",
    "name": "blob",
    "fields": [{"name": "i", "type": "long"}, {"name": "data", "type": "bytes"}],
}


class Params(BaseModel):
    records: int = 300
    size: int = 1_000_000


job = Job("big-output", params=Params, schema=SCHEMA, max_attempts=1)


def blob(i: int, size: int) -> bytes:
    """Record ``i``'s bytes: incompressible, and the same at every call."""
    return random.Random(i).randbytes(size)


@job.process
def process(chunk: dict, ctx):  # type: ignore[no-untyped-def]
    size = ctx.params.size
    for i in range(ctx.params.records):
        ctx.emit({"i": i, "data": blob(i, size)})
