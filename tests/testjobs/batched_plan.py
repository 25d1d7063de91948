"""A test job for batching: the plan spawns ``fanout.batched(range(n))`` as
chunks (with ``ctx.spawn_many``); each chunk emits one record with the count
and the sum of its items. ``big`` makes item ``big`` a long string."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

import fanout
from fanout import Job

SCHEMA = {
    "type": "record",
    "name": "batch",
    "namespace": "tests",
    "fields": [
        {"name": "first", "type": "long"},
        {"name": "count", "type": "long"},
        {"name": "total", "type": "long"},
    ],
}


class Params(BaseModel):
    n: int = 100
    max_items: int | None = None
    max_bytes: int | None = None
    big: int | None = None  # this item is a 1 MB string


job = Job("batched-plan", params=Params, schema=SCHEMA, max_attempts=1)


def _items(p: Params) -> Iterator[Any]:
    for i in range(p.n):
        yield "x" * 1_000_000 if i == p.big else i


@job.plan
def plan(params: Params, ctx: Any) -> Iterator[Any]:
    ctx.spawn_many(fanout.batched(_items(params), params.max_items, params.max_bytes))
    return iter(())


@job.process
def process(chunk: list[int], ctx: Any) -> None:
    ctx.emit({"first": chunk[0], "count": len(chunk), "total": sum(chunk)})
