"""One log line per chunk event (claimed, committed, continued, retried, dead),
with its fields under ``fanout`` for the JSON formatter (``fanout.logs``), on
the runner's logger ``fanout.runner``: what ``fanout logs`` and log queries
read."""

from __future__ import annotations

import logging
import time
from typing import Any

from fanout.failures import Attempt

log = logging.getLogger("fanout.runner")


def chunk_event(
    level: int, event: str, attempt: Attempt, msg: str, *args: object, **fields: Any
) -> None:
    """Log ``msg % args`` at ``level`` for ``attempt``, with the chunk's identity,
    ``event``, the time its attempt has left and ``fields`` (floats rounded to
    the millisecond; those that are None left out)."""
    if not log.isEnabledFor(level):
        return  # the hot path in production (WARNING): build nothing
    key = attempt.key
    extra: dict[str, Any] = {
        "run_id": key.run_id,
        "chunk_id": key.chunk_id,
        "seq": key.seq,
        "attempt": attempt.attempt,
        "event": event,
        "remaining_s": round(attempt.deadline - time.time(), 3),
    }
    extra.update((k, round(v, 3) if isinstance(v, float) else v) for k, v in fields.items())
    extra = {k: v for k, v in extra.items() if v is not None}
    log.log(level, msg, *args, extra={"fanout": extra})
