"""A job that writes output fast: ``records`` records of ``size`` bytes, at
about ``rate`` MB/s, checkpointing on ``ctx.time_left()`` like any well-behaved
job. Record ``i`` carries its index, so a reader can check each comes once."""

from __future__ import annotations

import time

from pydantic import BaseModel

from fanout import Job

SCHEMA = {
    "type": "record",
    "name": "block",
    "fields": [{"name": "i", "type": "long"}, {"name": "data", "type": "bytes"}],
}


class Params(BaseModel):
    records: int = 200
    size: int = 1_000_000
    rate: float = 60.0  # MB/s


job = Job("fast-output", params=Params, schema=SCHEMA, max_attempts=2)


@job.process
def process(chunk: dict, ctx):  # type: ignore[no-untyped-def]
    p = ctx.params
    data = b"x" * p.size
    start = ctx.cursor or 0
    began = time.monotonic()
    for i in range(start, p.records):
        if ctx.time_left() <= 0.1:
            return ctx.resume_at(i)
        ctx.emit({"i": i, "data": data})
        # Paced: record n of this chunk goes out n * size / rate after it began.
        ahead = began + (i - start + 1) * p.size / (p.rate * 1e6) - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    return None
