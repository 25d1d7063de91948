"""A job for the dashboard's tests: ``chunks`` chunks of ``rows`` records; the
chunks in ``fail`` raise an error whose text holds markup (``<script>``) while
the file ``flag`` exists, so a test can kill them, then fix the job by
removing the flag, and replay them."""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import BaseModel

from fanout import Job, PermanentError


class Params(BaseModel):
    chunks: int = 4
    rows: int = 5
    fail: list[int] = []
    flag: str = ""
    sleep: float = 0.0  # seconds each chunk takes (for the timeline)
    children: int = 0  # chunk 0 spawns this many children


SCHEMA = {
    "type": "record",
    "name": "row",
    "namespace": "tests.ui",
    "fields": [{"name": "item", "type": "string"}],
}

job = Job("broken", params=Params, schema=SCHEMA, max_attempts=2, backoff_base=0.01)


@job.plan
def plan(params: Params, ctx: Any) -> Any:
    for i in range(params.chunks):
        yield {"i": i}


@job.process
def process(chunk: dict[str, Any], ctx: Any) -> Any:
    p: Params = ctx.params
    i = chunk["i"]
    if p.sleep:
        time.sleep(p.sleep)
    if i in p.fail and p.flag and os.path.exists(p.flag):
        # Retrying cannot fix it: dead at once (a plain error would be retried).
        raise PermanentError(f"<script>alert('xss')</script> bad row {i * 7}")
    if i == 0 and "child" not in chunk:
        for c in range(p.children):
            ctx.spawn({"i": 1000 + c, "child": True})
    for n in range(p.rows):
        ctx.emit({"item": f"{i}-{n}"})
    return None
