"""A configurable test job: a plan of ``chunks`` chunks, each emitting ``rows``
records (``step`` at a time, with continuations), optionally spawning children,
failing, sleeping or crashing on chosen chunks. Every record's ``item`` is
unique in the run, so tests can check exactly-once output."""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from fanout import Job

SCHEMA = {
    "type": "record",
    "name": "row",
    "namespace": "tests",
    "fields": [{"name": "item", "type": "string"}, {"name": "n", "type": "long"}],
}


class Params(BaseModel):
    chunks: int = 3
    rows: int = 10
    step: int = 0  # rows per call; 0: all in one call
    children: int = 0  # each chunk above ``depth`` spawns this many children
    depth: int = 0
    fail_chunks: list[int] = []
    fail_times: int = 0  # the first N attempts of fail_chunks raise
    broken_flag: str | None = None  # while this file exists, chunk 0 raises
    bad_record_chunk: int | None = None
    sleep_chunks: list[int] = []
    sleep: float = 0.0  # seconds slept by sleep_chunks on their first attempt
    crash_chunks: list[int] = []  # os._exit on the first attempt
    row_sleep: float = 0.0
    big_payload: int = 0  # bytes of padding in each child payload
    # ctx.spawn(..., delay=) of every child; "nan" as text, as params cannot hold NaN.
    spawn_delay: float | str = 0.0
    stat_names: int = 0  # each call counts 1 under each of ctx.stats["kind/000"...]


job = Job("tree", params=Params, schema=SCHEMA, backoff_base=0.01, backoff_cap=0.05)


@job.plan
def plan(params: Params, ctx: object) -> object:
    for i in range(params.chunks):
        yield {"name": str(i), "level": 0}


@job.process
def process(chunk: dict, ctx):  # type: ignore[no-untyped-def]
    p: Params = ctx.params
    name = chunk["name"]
    top = int(name.split(".")[0])
    if top in p.fail_chunks and ctx.attempt <= p.fail_times:
        raise RuntimeError(f"flaky chunk {name}, attempt {ctx.attempt}")
    if p.broken_flag and top == 0 and os.path.exists(p.broken_flag):
        raise RuntimeError("broken until the flag file is removed")
    if top in p.crash_chunks and ctx.attempt == 1:
        os._exit(3)
    if top in p.sleep_chunks and ctx.attempt == 1:
        time.sleep(p.sleep)
    for i in range(p.stat_names):
        ctx.stats[f"kind/{i:03d}"] += 1
    start = ctx.cursor or 0
    end = min(p.rows, start + p.step) if p.step else p.rows
    for n in range(start, end):
        if p.row_sleep:
            time.sleep(p.row_sleep)
        ctx.emit({"item": f"{name}:{n}", "n": n})
    if p.bad_record_chunk == top:
        ctx.emit({"item": name, "n": "not a number"})
    if end < p.rows:
        return ctx.resume_at(end)
    if chunk["level"] < p.depth:
        for c in range(p.children):
            ctx.spawn(
                {"name": f"{name}.{c}", "level": chunk["level"] + 1, "pad": "x" * p.big_payload},
                delay=float(p.spawn_delay),
            )
    return None


def expected_items(p: Params) -> set[str]:
    """Every item a full run of these params emits."""
    names = [str(i) for i in range(p.chunks)]
    frontier = list(names)
    for _ in range(p.depth):
        frontier = [f"{n}.{c}" for n in frontier for c in range(p.children)]
        names += frontier
    return {f"{n}:{r}" for n in names for r in range(p.rows)}
