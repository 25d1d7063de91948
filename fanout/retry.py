"""Back-off: one pure function, exponential with full jitter, capped."""

from __future__ import annotations

import os
import random

_rng = random.Random()
# A forked worker would otherwise draw the same "random" delays as its siblings
# (Python reseeds only the random module's own generator at fork): the herd
# that jitter is there to spread would come back in lockstep.
os.register_at_fork(after_in_child=_rng.seed)


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
    return (rng or _rng).uniform(0.0, ceiling)
