"""The machine's own parallel ceiling: how much faster two CPU-bound processes
finish two equal pieces of pure-Python work than one process finishes one.

On a dedicated 2-core machine this is close to 2.0. On a shared virtual
machine it is often far less (1.2 to 1.7 was measured on the 2-vCPU machines
these benchmarks run on, whose neighbours take CPU time that the guest cannot
see), and no 2-worker run can beat it: a 2-worker figure is only meaningful
next to the ceiling measured in the same run. Not a test: CI does not run it.

    python tests/bench/ceiling.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

#: Loop iterations of one piece of work: about 0.3-0.5 s of one core here.
WORK = 5_000_000


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def _one_round(pool: mp.pool.Pool, procs: int) -> float:
    start = time.perf_counter()
    _spin(WORK)
    alone = time.perf_counter() - start
    start = time.perf_counter()
    pool.map(_spin, [WORK] * procs, chunksize=1)
    together = time.perf_counter() - start
    return procs * alone / together


def parallel_ceiling(procs: int = 2, rounds: int = 5) -> tuple[float, list[float]]:
    """(median, all rounds) of the speedup ``procs`` processes get over one on
    equal CPU-bound work, alone and together measured back to back each round."""
    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(_spin, [1000] * procs)  # the pool's processes are up before timing
        speedups = [_one_round(pool, procs) for _ in range(rounds)]
    return statistics.median(speedups), speedups


def ceiling_line(procs: int = 2, rounds: int = 5) -> str:
    """One line for a benchmark's output: the ceiling and its spread."""
    median, runs = parallel_ceiling(procs, rounds)
    spread = ", ".join(f"{s:.2f}" for s in runs)
    return (
        f"machine's parallel ceiling, {procs} CPU-bound processes against 1:"
        f" {median:.2f}x (rounds {spread})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    print(ceiling_line(2, parser.parse_args().rounds))
