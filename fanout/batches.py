"""Quick chunks in batches: one ledger transaction claims a batch of
deliveries, one commits the attempts that finished.

On the local backend every ledger step is a SQLite write transaction, and all
workers queue for the one write lock: a no-op chunk spent most of its time
claiming and committing (two transactions), not running. The local worker
receives several messages at once while its chunks are quick
(``fanout.worker.QUICK_CHUNK``) and hands them here, so 25 quick chunks cost
two transactions instead of fifty (``tests/bench/bench_engine.py``).

Nothing about a chunk changes but when its claim and its commit are written:

- each attempt's answer is what the single claim or commit would have given
  (:class:`~fanout.backends.base.BatchLedger`), and each attempt runs with its
  own hard deadline and time budget, counted from when it starts;
- when one chunk of a batch runs long (:data:`LONG_CHUNK`), a watchdog thread
  commits the attempts that finished before it and gives back the claims not
  started yet (as if never made: no attempt counted, nothing in the history),
  so a slow chunk neither holds finished work uncommitted nor keeps the rest
  of its batch from other workers;
- a claim waits at most :data:`START_SLACK` to start, well inside the lease's
  grace, so its lease (counted from the claim) outlives its hard deadline;
- an attempt that spawned children is committed before the next one starts;
- a supervisor is told the batch's unsettled attempts (``on_batch``), so if the
  process dies they are handed back at once, not when their leases expire.

Each outcome is the runner's (``fanout.outcomes.Handled``), or the exception
that left a delivery unsettled, for the dispatcher to hand back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from fanout.backends.base import BatchLedger, ClaimRequest, Delivery, Failure, FailureKind
from fanout.failures import Attempt, describe
from fanout.messages import ChunkMessage
from fanout.outcomes import Handled
from fanout.phases import Ask, Ready
from fanout.runner import Runner

log = logging.getLogger("fanout.batches")

#: A chunk running this long (s) is not quick: the watchdog settles what its
#: batch can settle without it.
LONG_CHUNK = 0.25
#: The longest a claimed attempt of a batch waits to start (s): well inside
#: ``fanout.phases.LEASE_GRACE``.
START_SLACK = 1.0

#: What became of one delivery: the runner's outcome, or what left it unsettled.
Outcome = Handled | Exception
#: Told the batch's claimed attempts not yet settled: (not started, finished).
BatchHook = Callable[[list[Attempt], list[Attempt]], None]


def run_batch(
    runner: Runner,
    items: Sequence[tuple[Delivery, ChunkMessage]],
    timeout: float,
    *,
    stop: Callable[[], bool] | None = None,
    on_batch: BatchHook | None = None,
) -> list[Outcome]:
    """Run the chunks ``items`` (deliveries with their decoded messages) under a
    hard ``timeout`` (s) each, claiming and committing them in batches; one
    outcome per item, in order. ``stop``: asked before each start; once true,
    the claims not started are given back. ``on_batch``: told the attempts
    claimed and not yet settled, whenever that changes."""
    ledger = runner.ledger
    assert isinstance(ledger, BatchLedger)
    results: list[Outcome | None] = [None] * len(items)
    asks: list[tuple[int, Ask]] = []
    # A second delivery of a task in the batch (SQS delivers at least once)
    # is handled after it: claimed beside it, it met its live lease and was
    # handed back for the rest of that lease.
    tasks: set[tuple[str, str, int]] = set()
    again: list[int] = []
    now = time.time()
    with runner.gate.batch():
        for i, (delivery, msg) in enumerate(items):
            task = (msg.run_id, msg.chunk_id, msg.seq)
            if task in tasks:
                again.append(i)
                continue
            tasks.add(task)
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
    for i in again:
        delivery, msg = items[i]
        try:
            if stop is not None and stop():
                runner.queue.release(delivery.receipt, 0.0)
                results[i] = Handled.HANDED_BACK
            else:
                results[i] = runner.handle(delivery, msg, timeout)
        except Exception as exc:
            results[i] = exc
    return [r if r is not None else RuntimeError("left unsettled") for r in results]


class _Batch:
    """The claimed part of one batch. The watchdog thread may settle some of it
    while the worker's thread runs a chunk: the lists are shared under a lock."""

    def __init__(
        self,
        runner: Runner,
        ledger: BatchLedger,
        results: list[Outcome | None],
        on_batch: BatchHook | None,
    ) -> None:
        self.runner = runner
        self.ledger = ledger
        self.results = results
        self.on_batch = on_batch
        self._lock = threading.Lock()
        self.waiting: list[tuple[int, Ask, Attempt]] = []  # claimed, not started
        self.ready: list[tuple[int, Ready]] = []  # finished, not committed

    def run(self, asks: list[tuple[int, Ask]], now: float, stop: Callable[[], bool] | None) -> None:
        runner = self.runner
        requests = [
            ClaimRequest(a.key, a.token, a.lease_seconds, a.run.settings.max_attempts)
            for _, a in asks
        ]
        if self.on_batch is not None:  # (a child dying amid the claims leaves none held)
            self.on_batch([a.unclaimed() for _, a in asks], [])
        try:
            claims = self.ledger.claim_many(requests, now)
        except Exception as exc:
            for i, _ in asks:  # one transaction: nothing was claimed
                self.results[i] = exc
            return
        for (i, ask), claim in zip(asks, claims, strict=True):
            try:
                got = runner.claimed(ask, claim, in_hand=False)
            except Exception as exc:
                self.results[i] = exc
                continue
            if isinstance(got, Handled):
                self.results[i] = got
            else:
                self.waiting.append((i, ask, got))
        self._tell()
        began = time.monotonic()
        watchdog = _watchdog()
        first = True
        while True:
            with self._lock:
                if not self.waiting:
                    break
                late = time.monotonic() - began > START_SLACK or (stop is not None and stop())
                if late:
                    rest, self.waiting = self.waiting, []
                else:
                    i, ask, attempt = self.waiting.pop(0)
            if late:
                self._give_back(rest)
                break
            if not first and self._held_back(ask.key.run_id):
                # Stopped or paused since the batch's claim: no chunk starts
                # after that. Given back, it is cancelled at its next claim (or
                # dropped by a paused run's admission, for `fanout resume`).
                self._give_back([(i, ask, attempt)])
                continue
            first = False
            watchdog.arm(self)
            try:
                self._start(i, ask, attempt)
            finally:
                watchdog.disarm()
        self._flush()

    def _held_back(self, run_id: str) -> bool:
        """Whether the run was stopped or paused (one read; the first start of a
        batch goes by its admission, just made). A failed read starts it: the
        claim stands, as a chunk in flight at a stop does."""
        try:
            return run_id in self.ledger.held_back((run_id,))
        except Exception as exc:
            log.warning("could not read whether run %s was stopped: %s", run_id, exc)
            return False

    def _start(self, i: int, ask: Ask, attempt: Attempt) -> None:
        runner = self.runner
        try:
            out = runner.work(ask, attempt)
        except Exception as exc:
            self.results[i] = _guard(runner.fail_in_hand, exc)
            self._tell()
            return
        runner.forget_in_hand()  # settled below, with its batch: no longer the runner's
        if isinstance(out, Handled):
            self.results[i] = out
            self._tell()
            return
        with self._lock:
            self.ready.append((i, out))
        if out.children:
            self._flush()  # its children wait for this commit, not for the batch's
        else:
            self._tell()

    def on_long_chunk(self) -> None:
        """The chunk in hand is running long (the watchdog's thread): commit what
        finished before it, and give back what has not started."""
        with self._lock:
            rest, self.waiting = self.waiting, []
        self._flush()
        if rest:
            self._give_back(rest)

    def _flush(self) -> None:
        with self._lock:
            ready, self.ready = self.ready, []
        if not ready:
            return
        try:
            settles = self.ledger.commit_many([r.request for _, r in ready])
        except Exception as exc:
            failure = Failure(FailureKind.INTERNAL, describe(exc))
            for i, r in ready:
                self.results[i] = _guard(self.runner.fail, r.attempt, failure)
        else:
            for (i, r), settle in zip(ready, settles, strict=True):
                self.results[i] = _guard(self.runner.settled, r, settle)
        self._tell()

    def _give_back(self, rest: list[tuple[int, Ask, Attempt]]) -> None:
        """Undo claims not started, and put their messages back at once."""
        try:
            given = self.ledger.give_back_many([(a.key, a.token) for _, a, _ in rest], time.time())
        except Exception as exc:
            for i, _, _ in rest:
                self.results[i] = exc  # the dispatcher hands the message back
            self._tell()
            return
        for (i, ask, _), ok in zip(rest, given, strict=True):
            self.results[i] = _guard(self._release, ask) if ok else Handled.LEASE_LOST
        self._tell()

    def _release(self, ask: Ask) -> Handled:
        self.runner.queue.release(ask.delivery.receipt, 0.0)
        return Handled.HANDED_BACK

    def _tell(self) -> None:
        if self.on_batch is not None:
            with self._lock:
                waiting = [a for _, _, a in self.waiting]
                ready = [r.attempt for _, r in self.ready]
            self.on_batch(waiting, ready)


def _guard(step: Callable[..., Handled], *args: Any) -> Outcome:
    """``step(*args)``, or the exception it raised."""
    try:
        return step(*args)
    except Exception as exc:
        return exc


class _Watchdog:
    """One thread per process that looks, every half :data:`LONG_CHUNK`, whether
    the batch chunk in hand has run :data:`LONG_CHUNK`, and if so settles the
    rest of its batch. Arming costs an assignment: no wake-up per chunk."""

    def __init__(self) -> None:
        self._armed: tuple[_Batch, float] | None = None
        self._acting = threading.Lock()
        threading.Thread(target=self._loop, name="fanout-batch-watchdog", daemon=True).start()

    def arm(self, batch: _Batch) -> None:
        self._armed = (batch, time.monotonic())

    def disarm(self) -> None:
        """Stand down; if it is settling the batch right now, wait until it is done."""
        self._armed = None
        with self._acting:
            pass

    def _loop(self) -> None:
        while True:
            time.sleep(LONG_CHUNK / 2)
            armed = self._armed
            if armed is None or time.monotonic() - armed[1] < LONG_CHUNK:
                continue
            with self._acting:
                if self._armed is not armed:
                    continue  # disarmed meanwhile: the chunk ended
                self._armed = None
                try:
                    armed[0].on_long_chunk()
                except Exception:
                    log.exception("could not settle a batch behind a long chunk")


_watchdogs: dict[int, _Watchdog] = {}


def _watchdog() -> _Watchdog:
    """This process's watchdog (a thread does not survive a fork: one per pid)."""
    pid = os.getpid()
    watchdog = _watchdogs.get(pid)
    if watchdog is None:
        watchdog = _watchdogs[pid] = _Watchdog()
    return watchdog
