"""A job whose one chunk ends in the way ``mode`` names: each way a job's code
can end a chunk other than returning or raising an ``Exception`` (and an
``Exception`` whose message cannot be made)."""

from __future__ import annotations

import os
import signal
import sys
import time

from pydantic import BaseModel

from fanout import Job


class Params(BaseModel):
    mode: str


job = Job("exits", params=Params, max_attempts=1)


class Untraceable(Exception):
    """An exception whose traceback cannot be walked (its ``__traceback__`` raises)."""

    @property  # type: ignore[override]
    def __traceback__(self) -> None:
        raise RuntimeError("no traceback")


class Unspeakable(Exception):
    """An exception whose message cannot be made (its ``__str__`` raises)."""

    def __str__(self) -> str:
        raise RuntimeError("no message")


@job.process
def process(chunk: dict, ctx):  # type: ignore[no-untyped-def]
    mode = ctx.params.mode
    if mode == "sys.exit":
        sys.exit(3)
    if mode == "keyboard":
        raise KeyboardInterrupt
    if mode == "huge-error":  # one line of 500 KB: over DynamoDB's item limit
        raise RuntimeError("the start " + "x" * 500_000 + " the end")
    if mode == "unspeakable":  # the job's own error, not an internal one of fanout
        raise Unspeakable
    if mode == "untraceable":
        raise Untraceable("the job's words")
    if mode == "os._exit":
        os._exit(7)
    if mode == "signal":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "memory":
        hog = []
        for _ in range(150):  # up to 1.5 GB, 10 MB at a time (touched, so resident)
            hog.append(b"\x01" * (10 * 1024 * 1024))
            time.sleep(0.002)
        time.sleep(60)
    if mode == "sleep":
        time.sleep(60)
    if mode in ("recursion", "recursion-wrapped"):  # a runaway recursion, a raised limit

        def deeper(n: int) -> int:
            return deeper(n + 1)

        sys.setrecursionlimit(200_000)
        try:
            deeper(0)
        except RecursionError as exc:
            if mode == "recursion":
                raise
            raise ValueError("wrapped") from exc
    if mode == "no-progress":  # at once: the job's bug
        return ctx.resume_at(0)
    if mode == "no-progress-slow":  # after its whole budget: too short a timeout
        while ctx.time_left() > 0:
            time.sleep(0.05)
        return ctx.resume_at(0)
    return None
