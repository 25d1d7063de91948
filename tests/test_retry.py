"""Back-off: exponential, full jitter, capped."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest

from fanout.controls import contended
from fanout.retry import compute_backoff


def test_no_wait_before_the_first_failure() -> None:
    assert compute_backoff(0, base=1.0, cap=10.0) == 0.0


@pytest.mark.parametrize("attempt", range(1, 12))
def test_within_the_exponential_ceiling_and_the_cap(attempt: int) -> None:
    rng = random.Random(attempt)
    ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
    draws = [compute_backoff(attempt, base=0.5, cap=30.0, rng=rng) for _ in range(500)]
    assert all(0.0 <= d <= ceiling for d in draws)
    # Full jitter: the draws spread over the whole range, not bunched at the top.
    assert min(draws) < ceiling * 0.1 and max(draws) > ceiling * 0.9


def test_huge_attempt_numbers_stay_capped() -> None:
    assert compute_backoff(10_000, base=1.0, cap=900.0, rng=random.Random(1)) <= 900.0


def test_seeded_rng_is_reproducible() -> None:
    a = [compute_backoff(3, base=1, cap=60, rng=random.Random(7)) for _ in range(3)]
    b = [compute_backoff(3, base=1, cap=60, rng=random.Random(7)) for _ in range(3)]
    assert a == b


def _in_forked_children(draw: Callable[[], float], children: int = 3) -> list[float]:
    """``draw()`` in each of ``children`` processes forked from this one."""
    values = []
    for _ in range(children):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.write(write, repr(draw()).encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        values.append(float(os.read(read, 100)))
        os.close(read)
    return values


@pytest.mark.parametrize(
    "draw",
    [
        lambda: compute_backoff(8, base=1.0, cap=1000.0),
        lambda: contended(3).retry_after,
    ],
    ids=["chunk retry back-off", "capped admission wait"],
)
def test_forked_workers_draw_different_jitter(draw: Callable[[], float]) -> None:
    # Worker children are forked from one supervisor: with the parent's
    # generator state they drew the same delays, so chunks that failed
    # together came back together, the herd jitter exists to spread.
    draw()  # the parent's generator in use before the fork, as in a pool
    assert len(set(_in_forked_children(draw))) == 3
