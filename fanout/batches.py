"""Quick chunks in batches: one ledger transaction claims a batch of
deliveries, one commits the attempts that finished.

On the local backend every ledger step is a SQLite write transaction, and all
workers queue for the one write lock: a no-op chunk spent most of its time
claiming and committing (two transactions), not running. The local worker
receives several messages at once while its chunks are quick
(``fanout.worker.QUICK_CHUNK``) and hands them here, so ten quick chunks cost
two transactions instead of twenty (``tests/bench/bench_engine.py``).

Nothing about a chunk changes but when its claim and its commit are written:

- each attempt's answer is what the single claim or commit would have given
  (:class:`~fanout.backends.base.BatchLedger`), and each attempt runs with its
  own hard deadline and time budget, counted from when it starts;
- a claimed attempt waits at most :data:`START_SLACK` to start: past that (a
  chunk before it ran long) the ones not started are handed back at once, as
  interrupted, with lease time to spare;
- an attempt that spawned children is committed at once, before the next one
  starts: a child waits only for its own parent's commit;
- a supervisor is told the batch's unsettled attempts (``on_batch``), so if the
  process dies they are handed back at once, not when their leases expire.

Each outcome is the runner's (``fanout.outcomes.Handled``), or the exception
that left a delivery unsettled, for the dispatcher to hand back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from fanout.backends.base import (
    BatchLedger,
    ClaimRequest,
    Delivery,
    Failure,
    FailureKind,
)
from fanout.failures import Attempt, describe
from fanout.messages import ChunkMessage
from fanout.outcomes import Handled
from fanout.runner import Ask, Ready, Runner

#: The longest a claimed attempt of a batch waits to start (s): well inside
#: ``fanout.runner.LEASE_GRACE``, so its lease (counted from the claim) still
#: outlives its hard deadline (counted from its start).
START_SLACK = 1.0

#: What became of one delivery: the runner's outcome, or what left it unsettled.
Outcome = Handled | Exception


def run_batch(
    runner: Runner,
    items: Sequence[tuple[Delivery, ChunkMessage]],
    timeout: float,
    *,
    stop: Callable[[], bool] | None = None,
    on_batch: Callable[[list[Attempt]], None] | None = None,
) -> list[Outcome]:
    """Run the chunks ``items`` (deliveries with their decoded messages) under a
    hard ``timeout`` (s) each, claiming and committing them in batches; one
    outcome per item, in order. ``stop``: asked before each start; once true,
    the attempts not started are handed back. ``on_batch``: told the attempts
    claimed and not yet settled, whenever that changes."""
    ledger = runner.ledger
    assert isinstance(ledger, BatchLedger)
    results: list[Outcome | None] = [None] * len(items)
    asks: list[tuple[int, Ask]] = []
    now = time.time()
    with runner.gate.batch():
        for i, (delivery, msg) in enumerate(items):
            try:
                if not runner.batchable(msg):
                    results[i] = runner.handle(delivery, msg, timeout)
                    continue
                ask = runner.ask(delivery, msg, timeout, now)
            except Exception as exc:
                results[i] = exc
                continue
            if isinstance(ask, Handled):
                results[i] = ask
            else:
                asks.append((i, ask))
    if asks:
        _Batch(runner, ledger, results, on_batch).run(asks, now, stop)
    return [r if r is not None else RuntimeError("unsettled") for r in results]


class _Batch:
    """The claimed part of one batch."""

    def __init__(
        self,
        runner: Runner,
        ledger: BatchLedger,
        results: list[Outcome | None],
        on_batch: Callable[[list[Attempt]], None] | None,
    ) -> None:
        self.runner = runner
        self.ledger = ledger
        self.results = results
        self.on_batch = on_batch
        self.unsettled: dict[str, Attempt] = {}  # by token
        self.ready: list[tuple[int, Ready]] = []

    def run(self, asks: list[tuple[int, Ask]], now: float, stop: Callable[[], bool] | None) -> None:
        runner = self.runner
        requests = [
            ClaimRequest(a.key, a.token, a.lease_seconds, a.run.settings.max_attempts)
            for _, a in asks
        ]
        try:
            claims = self.ledger.claim_many(requests, now)
        except Exception as exc:
            for i, _ in asks:  # one transaction: nothing was claimed
                self.results[i] = exc
            return
        claimed: list[tuple[int, Ask, Attempt]] = []
        for (i, ask), claim in zip(asks, claims, strict=True):
            try:
                got = runner.claimed(ask, claim, in_hand=False)
            except Exception as exc:
                self.results[i] = exc
                continue
            if isinstance(got, Handled):
                self.results[i] = got
            else:
                claimed.append((i, ask, got))
                self.unsettled[got.token] = got
        self._tell()
        began = time.monotonic()
        for n, (i, ask, attempt) in enumerate(claimed):
            if time.monotonic() - began > START_SLACK or (stop is not None and stop()):
                self._flush()
                for j, _, later in claimed[n:]:
                    self._hand_back(j, later)
                break
            self._start(i, ask, attempt)
        self._flush()
        self._tell()

    def _start(self, i: int, ask: Ask, attempt: Attempt) -> None:
        runner = self.runner
        try:
            out = runner.work(ask, attempt)
        except Exception as exc:
            self.unsettled.pop(attempt.token, None)
            self.results[i] = _guard(runner.fail_in_hand, exc)
            return
        runner.forget_in_hand()  # settled below, with its batch: no longer the runner's
        if isinstance(out, Handled):
            self.unsettled.pop(attempt.token, None)
            self.results[i] = out
            return
        self.ready.append((i, out))
        if out.children:
            self._flush()  # its children wait for this commit, not for the batch's

    def _flush(self) -> None:
        if not self.ready:
            return
        ready, self.ready = self.ready, []
        try:
            settles = self.ledger.commit_many([r.request for _, r in ready])
        except Exception as exc:
            reason = describe(exc)
            for i, r in ready:
                self.unsettled.pop(r.attempt.token, None)
                failure = Failure(FailureKind.INTERNAL, reason)
                self.results[i] = _guard(self.runner.fail, r.attempt, failure)
            self._tell()
            return
        for (i, r), settle in zip(ready, settles, strict=True):
            self.unsettled.pop(r.attempt.token, None)
            self.results[i] = _guard(self.runner.settled, r, settle)
        self._tell()

    def _hand_back(self, i: int, attempt: Attempt) -> None:
        """Give back a claimed attempt that never started (retried at once)."""
        self.unsettled.pop(attempt.token, None)
        failure = Failure(
            FailureKind.INTERRUPTED,
            f"handed back unstarted: the chunks before it in its batch took over {START_SLACK:g}s",
        )
        self.results[i] = _guard(self.runner.fail, attempt, failure)

    def _tell(self) -> None:
        if self.on_batch is not None:
            self.on_batch(list(self.unsettled.values()))


def _guard(step: Callable[..., Handled], *args: Any) -> Outcome:
    """``step(*args)``, or the exception it raised."""
    try:
        return step(*args)
    except Exception as exc:
        return exc
