"""A plan whose first attempt is late: it spawns one child with a payload too big
for the queue (offloaded to the store), naming the attempt that spawned it, and
on attempt 1 waits for the file ``gate`` before returning, so a test can let a
second attempt take over and commit first. Each chunk emits the attempt its
payload names: the committed plan attempt's child must say 2."""

from __future__ import annotations

import os
import time
from typing import Any

from fanout import Job

SCHEMA = {
    "type": "record",
    "name": "late",
    "namespace": "tests",
    "fields": [{"name": "by", "type": "long"}],
}

job = Job("late_spawn", schema=SCHEMA)


@job.plan
def plan(params: dict[str, Any], ctx: Any) -> None:
    ctx.spawn({"by": ctx.attempt, "pad": "x" * int(params.get("pad", 300_000))})
    if ctx.attempt == 1:
        deadline = time.monotonic() + 60
        while not os.path.exists(params["gate"]) and time.monotonic() < deadline:
            time.sleep(0.02)


@job.process
def process(chunk: dict[str, Any], ctx: Any) -> None:
    ctx.emit({"by": chunk["by"]})
