"""A run's chunk attempts as bars on a timeline, and its throughput over time,
computed from the tasks' ledger history (what ``fanout logs`` reads).

The ledger keeps, per attempt, when it ended and how long it ran
(``duration_s``), so each attempt is a bar from ``at - duration_s`` to ``at``.
It does not record which worker process or Lambda invocation ran an attempt,
so lanes are *concurrency slots*: each bar goes to the lowest lane free when
it starts. With N workers busy all the time that gives N lanes, one bar after
another per worker, which is what a lane per worker would show; an idle worker
shows as a gap in the lanes.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fanout.backends.base import TaskRecord, TaskState

#: Outcomes a bar is coloured by (the legend's order).
OUTCOMES = ("committed", "continued", "retried", "timed out", "dead", "running")
#: The ledger keeps times and durations to the millisecond, so a bar's start
#: (``at - duration_s``) may be up to 2 ms early: a lane is free that long
#: before its last bar's end (else one worker's next attempt could look
#: concurrent with its last, and open a lane no worker had).
SLACK = 0.002
#: History outcomes that are not an attempt of the job (no bar).
_NOT_ATTEMPTS = frozenset({"dead", "replayed", "orphaned", "cancelled", "revived"})


@dataclass(frozen=True, slots=True)
class Bar:
    """One chunk attempt: when it ran and how it ended."""

    chunk_id: str
    seq: int
    attempt: int
    start: float
    end: float
    outcome: str  # one of OUTCOMES
    records: int = 0
    error: str = ""
    lane: int = 0


@dataclass(frozen=True, slots=True)
class Timeline:
    """The bars of a run, laid out in lanes."""

    bars: list[Bar]
    lanes: int
    start: float
    end: float
    unmeasured: int  # attempts with no known duration (a dead worker's, taken over)


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def attempts(tasks: Sequence[TaskRecord], now: float | None = None) -> tuple[list[Bar], int]:
    """Every attempt of ``tasks`` with a known start, and how many had none."""
    now = time.time() if now is None else now
    bars: list[Bar] = []
    unmeasured = 0
    for t in tasks:
        history = t.history
        for i, event in enumerate(history):
            outcome = event.get("outcome")
            if not isinstance(outcome, str) or outcome in _NOT_ATTEMPTS:
                continue
            at, took = _float(event.get("at")), _float(event.get("duration_s"))
            if at is None or took is None:
                unmeasured += 1
                continue
            if outcome not in ("committed", "continued"):
                # A failure: the attempt was buried if a "dead" event follows it.
                after = history[i + 1].get("outcome") if i + 1 < len(history) else None
                outcome = (
                    "dead"
                    if after == "dead"
                    else ("timed out" if outcome == "timed out" else "retried")
                )
            attempt = event.get("attempt")
            records = event.get("records")
            bars.append(
                Bar(
                    t.chunk_id,
                    t.seq,
                    attempt if isinstance(attempt, int) else 0,
                    at - took,
                    at,
                    outcome,
                    records if isinstance(records, int) else 0,
                    str(event.get("error") or ""),
                )
            )
        if t.state == TaskState.RUNNING:
            # In flight: claimed at its last update (the claim writes it).
            bars.append(
                Bar(t.chunk_id, t.seq, t.attempt - t.attempt_floor, t.updated_at, now, "running")
            )
    return bars, unmeasured


def lay_out(bars: Sequence[Bar]) -> tuple[list[Bar], int]:
    """The bars, each given the lowest lane free at its start (ordered by start);
    and the number of lanes used."""
    placed: list[Bar] = []
    busy: list[tuple[float, int]] = []  # (end, lane) of bars still running
    free: list[int] = []  # lanes free now, lowest first
    lanes = 0
    for bar in sorted(bars, key=lambda b: (b.start, b.end)):
        while busy and busy[0][0] <= bar.start + SLACK:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            lane = heapq.heappop(free)
        else:
            lane, lanes = lanes, lanes + 1
        heapq.heappush(busy, (bar.end, lane))
        placed.append(
            Bar(
                bar.chunk_id,
                bar.seq,
                bar.attempt,
                bar.start,
                bar.end,
                bar.outcome,
                bar.records,
                bar.error,
                lane,
            )
        )
    return placed, lanes


def timeline(tasks: Sequence[TaskRecord], now: float | None = None) -> Timeline:
    """The run's attempts laid out in lanes."""
    bars, unmeasured = attempts(tasks, now)
    placed, lanes = lay_out(bars)
    start = min((b.start for b in placed), default=0.0)
    end = max((b.end for b in placed), default=start)
    return Timeline(placed, lanes, start, end, unmeasured)


@dataclass(frozen=True, slots=True)
class Throughput:
    """Records and chunk attempts finished per second, in equal time buckets."""

    start: float
    width: float  # seconds per bucket
    records_per_s: list[float]
    chunks_per_s: list[float]


def throughput(bars: Sequence[Bar], buckets: int = 60) -> Throughput:
    """What finished in each of ``buckets`` equal slices of the run's span,
    as rates (a committed or continued attempt counts as a chunk finished)."""
    done = [b for b in bars if b.outcome in ("committed", "continued")]
    if not done:
        return Throughput(0.0, 1.0, [], [])
    start = min(b.start for b in bars)
    end = max(b.end for b in done)
    span = max(end - start, 1e-3)
    # A short run gets fewer, wider buckets (about four attempts to a bucket).
    n = max(1, min(buckets, len(done) // 4))
    width = span / n
    records = [0.0] * n
    chunks = [0.0] * n
    for b in done:
        i = min(n - 1, int((b.end - start) / width))
        records[i] += b.records
        chunks[i] += 1
    return Throughput(start, width, [r / width for r in records], [c / width for c in chunks])
