"""Back-off: one pure function, exponential with full jitter, capped; and
:class:`Failing`, the back-off of a loop whose backend calls fail."""

from __future__ import annotations

import logging
import os
import random
import time

log = logging.getLogger("fanout.worker")

#: The generator of every jittered delay in fanout (retry back-off, capped
#: admissions, DynamoDB control rounds). Reseeded in a forked child: a forked
#: worker would otherwise draw the same "random" delays as its siblings (Python
#: reseeds only the random module's own generator at fork), and the herd that
#: jitter is there to spread would come back in lockstep.
JITTER = random.Random()
os.register_at_fork(after_in_child=JITTER.seed)

#: After a failed call (:class:`Failing`) a loop waits this long before it
#: tries again, doubling up to ``MAX_FAIL_BACKOFF`` (s).
FAIL_BACKOFF = 0.5
MAX_FAIL_BACKOFF = 5.0


def compute_backoff(
    attempt: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before attempt ``attempt + 1``, after ``attempt`` failures.

    Full jitter (a uniform draw in ``[0, min(cap, base * 2**(attempt-1))]``)
    spreads retries of many chunks that failed together, so they do not come
    back as one thundering herd (AWS Architecture Blog, "Exponential Backoff
    And Jitter").
    """
    if attempt < 1:
        return 0.0
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 62))
    return (rng or JITTER).uniform(0.0, ceiling)


class Failing:
    """The failures of one loop's backend calls (a full disk, a locked or
    unreachable queue): dying there would only have the pool start a process
    that dies the same way, a traceback each time. Nothing was taken, so
    nothing is lost by waiting: say so once, back off (doubling), retry."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.wait = 0.0  # the current back-off (0: the last call worked)
        self.until = 0.0
        self.since = 0.0  # when the failures began (monotonic)

    def failed(self, exc: Exception) -> float:
        """Note a failure; returns how long to wait before trying again."""
        if not self.wait:
            self.since = time.monotonic()
            log.warning("%s failed, backing off: %s: %s", self.what, type(exc).__name__, exc)
        self.wait = min(max(self.wait * 2, FAIL_BACKOFF), MAX_FAIL_BACKOFF)
        self.until = time.monotonic() + self.wait
        return self.wait

    def worked(self) -> None:
        """Note a call that worked."""
        if self.wait:
            log.warning("%s works again", self.what)
            self.wait = 0.0

    def waiting(self) -> bool:
        """Whether the back-off after a failure is still running."""
        return bool(self.wait) and time.monotonic() < self.until

    def failing_for(self) -> float:
        """How long the calls have failed in a row (s; 0 if the last one worked)."""
        return time.monotonic() - self.since if self.wait else 0.0
