"""Back-off: exponential, full jitter, capped."""

from __future__ import annotations

import random

import pytest

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
