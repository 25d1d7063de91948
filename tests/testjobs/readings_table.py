"""A table job for the tests of ``fanout.tables``: ``chunks`` chunks of ``rows``
meter readings spread over ``days`` days (January 2024), partitioned by day.
Every record's ``item`` is unique per ``tag``, so tests can check exactly-once
output across runs that add to the same table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import BaseModel

from fanout import Job

SCHEMA = {
    "type": "record",
    "name": "reading",
    "namespace": "tests",
    "fields": [
        {"name": "item", "type": "string"},
        {"name": "read_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "kwh", "type": "double"},
    ],
}


class Params(BaseModel):
    tag: str = "a"
    chunks: int = 4
    rows: int = 30
    days: int = 3
    step: int = 0  # rows per call; 0: all in one call
    no_time_at: int | None = None  # this record index of chunk 0 has no read_at
    bad_kwh_at: int | None = None  # this record index of chunk 0 has a kwh that is no number


job = Job(
    "readings",
    params=Params,
    schema=SCHEMA,
    partition_by="read_at:day",
    max_attempts=3,
    backoff_base=0.0,
)


@job.plan
def plan(params, ctx):
    for i in range(params.chunks):
        yield {"i": i}


@job.process
def process(chunk, ctx):
    p = ctx.params
    start = ctx.cursor or 0
    end = p.rows if not p.step else min(p.rows, start + p.step)
    for r in range(start, end):
        record = {
            "item": f"{p.tag}-{chunk['i']}-{r}",
            "read_at": datetime(2024, 1, 1, tzinfo=UTC) + timedelta(days=r % p.days, hours=r % 24),
            "kwh": r / 10,
        }
        if chunk["i"] == 0 and r == p.no_time_at:
            del record["read_at"]
        if chunk["i"] == 0 and r == p.bad_kwh_at:
            record["kwh"] = "lots"
        ctx.emit(record)
    if end < p.rows:
        return ctx.resume_at(end)
    return None
