"""A test job for the run controls: ``chunks`` chunks of ``steps`` steps each,
``step_s`` seconds a step, emitting one record per step and checkpointing when
``ctx.time_left()`` says so. Each slice appends ``start``/``end`` lines with
wall-clock times to ``log`` (one ``write`` per line, ``O_APPEND``), so a test
can see when chunks ran and whether they were told to stop. Chunks listed in
``poison`` raise :class:`fanout.PermanentError` while the file ``poison_flag``
exists (or always, without one). With ``eager``, a slice checkpoints even
before its first step when told to stop."""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from fanout import Job, PermanentError

SCHEMA = {
    "type": "record",
    "name": "step",
    "namespace": "tests",
    "fields": [{"name": "chunk", "type": "long"}, {"name": "step", "type": "long"}],
}


class Params(BaseModel):
    chunks: int = 10
    steps: int = 1
    step_s: float = 0.0
    log: str = ""
    poison: list[int] = []
    poison_flag: str = ""
    eager: bool = False  # checkpoint even before the slice's first step


job = Job("controlled", params=Params, schema=SCHEMA, backoff_base=0.01, backoff_cap=0.05)


def _log(path: str, *fields: object) -> None:
    if path:
        line = " ".join(str(f) for f in fields) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


@job.plan
def plan(params: Params, ctx: object) -> object:
    for i in range(params.chunks):
        yield {"i": i}


@job.process
def process(chunk: dict, ctx):  # type: ignore[no-untyped-def]
    p: Params = ctx.params
    i = chunk["i"]
    start = ctx.cursor or 0
    _log(p.log, "start", i, ctx.seq, f"{time.time():.6f}")
    if i in p.poison and (not p.poison_flag or os.path.exists(p.poison_flag)):
        raise PermanentError(f"poison chunk {i}")
    for step in range(start, p.steps):
        if (step > start or p.eager) and ctx.time_left() <= 0:
            told = ctx.told_to_stop or "deadline"
            _log(p.log, "end", i, ctx.seq, f"{time.time():.6f}", told, int(ctx.cancelled))
            return ctx.resume_at(step)
        time.sleep(p.step_s)
        ctx.emit({"chunk": i, "step": step})
    _log(p.log, "end", i, ctx.seq, f"{time.time():.6f}", "done", 0)
    return None
