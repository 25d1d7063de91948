"""A job whose chunks ``c % 7 == 3`` leave a thread that ends the worker process
(``os._exit(3)``) a moment after the chunk returned, at its first attempt: the
process dies wherever it is then, often between its next claim and that
chunk's start."""

import os
import threading
import time

from pydantic import BaseModel

from fanout import Job


class Params(BaseModel):
    chunks: int = 40


job = Job(
    "late-exit",
    params=Params,
    schema={
        "type": "record",
        "name": "rec",
        "fields": [{"name": "c", "type": "long"}, {"name": "i", "type": "long"}],
    },
    max_attempts=5,
    backoff_base=0.05,
    backoff_cap=0.1,
)


@job.plan
def plan(params, ctx):
    return [{"c": c} for c in range(params.chunks)]


@job.process
def process(chunk, ctx):
    for i in range(3):
        ctx.emit({"c": chunk["c"], "i": i})
    if chunk["c"] % 7 == 3 and ctx.attempt == 1:

        def die():
            time.sleep(0.002)
            os._exit(3)

        threading.Thread(target=die, daemon=True).start()
