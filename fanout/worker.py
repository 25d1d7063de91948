"""The local worker: N child processes polling the queue, under a supervisor
that enforces each chunk's hard timeout like Lambda does.

Each child tells the supervisor which attempt it is running (through shared
memory, no pickle) and when its hard deadline falls. A child past its deadline
is killed with SIGKILL, its attempt is failed as "timed out" (retried with
back-off, or dead-lettered), and a fresh child takes its place. A child that
dies on its own is recorded as "crashed" the same way.

SIGINT/SIGTERM stop the pool gracefully: children finish the chunk in hand
(their soft deadline makes that short) and exit; a second signal kills them and
hands their chunks back to the queue.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fanout.avro_blocks import share_cores_with
from fanout.backends import open_backend
from fanout.backends.base import BatchLedger, Delivery, Failure, FailureKind, RunState
from fanout.coordinator import recover
from fanout.dispatch import Dispatcher
from fanout.errors import UserError
from fanout.failures import Attempt, disk_full, exit_cause
from fanout.fairness import serve_run_only
from fanout.finalize import FINALIZE_STALE
from fanout.jobs import load_job
from fanout.logs import whole_lines
from fanout.outcomes import Handled
from fanout.processes import (
    SharedFlag,
    descendants,
    die_with_parent,
    exited_children,
    kill_all,
    mark_worker,
    orphans,
    reap,
    resident_mb,
    subreaper,
)
from fanout.retry import Failing
from fanout.runner import LEASE_GRACE, Runner
from fanout.worker_slot import Slot

log = logging.getLogger("fanout.worker")

_CTX = mp.get_context("fork")  # children inherit the loaded job; no pickling of state
#: How long an idle child sleeps between empty polls, at most (s).
MAX_POLL_SLEEP = 0.2
#: A pool told to stop once its work is done (``fanout run``, ``--until-idle``)
#: gives up after its checks failed this long in a row (s), raising the last
#: error: a backend that stays broken (a corrupt database, a table gone) must
#: not keep it waiting for ever. A plain ``fanout worker`` keeps trying.
GIVE_UP_AFTER = 60.0
#: A one-shot pool stops, saying so, once its local home's disk has been full
#: this long (s): its chunks could record nothing, and `fanout run` showed the
#: same progress line for ever. A plain ``fanout worker`` waits for space.
DISK_FULL_WAIT = 10.0
#: A prefetched message may wait this long in a child before it is started; one
#: that waited longer is handed back, so its visibility always covers a full chunk.
PREFETCH_SLACK = 5.0
#: A child prefetches (receives up to ``WorkerOptions.batch`` messages at a time)
#: only while its chunks take less than this on average (s); slower chunks are
#: received one at a time, so they spread over all the children instead of
#: queueing behind each other in the one child that happened to receive them.
QUICK_CHUNK = 0.05
#: How often the supervisor asks the backend whether its run is done or work is
#: left (s), by backend: a local SQLite read is cheap, but on AWS every check is
#: a billed request (SQS attributes, a DynamoDB read), 50 a second at 20 ms.
CHECK_EVERY = {"aws": 1.0}
#: How often a pool collects the exit of orphans it adopted that ended (s): a
#: process a chunk detached (``cmd &`` in a shell that exited) comes to the
#: supervisor, a subreaper, and would stay a zombie until the pool stops.
REAP_EVERY = 10.0
#: How often a pool moves dead-lettered messages back and looks for stalled
#: runs (see ``recover``), idle or not.
REDRIVE_EVERY = 60.0


@dataclass(frozen=True)
class WorkerOptions:
    """How a pool works."""

    backend: str = "local"
    home: Path | None = None
    workers: int = os.cpu_count() or 1
    chunk_timeout: float = 60.0
    batch: int = 25  # messages received at a time (see PREFETCH_SLACK)
    #: A child's resident memory while it runs a chunk may not exceed this (MB);
    #: over it, the child is killed and the attempt recorded as "out of memory",
    #: as Lambda does at its memory size. None: no limit.
    chunk_memory: int | None = None
    #: Be a child subreaper (Linux): what a chunk started and its worker process,
    #: dying on its own (a segfault, the OOM killer), left running comes to the
    #: supervisor, which ends it; so do processes chunks detach, ended when the
    #: pool stops and reaped when they end. Only for a process whose only
    #: children are the pool's (the CLI's): another's exit status would be lost.
    adopt_orphans: bool = False
    #: Work this run's messages only (and the group-less ones), where the queue
    #: can pick (the local one): ``fanout run`` leaves other runs in its home
    #: for ``fanout worker``. None: every run.
    only_run: str | None = None


def _child_main(opts: WorkerOptions, slot: Slot, stop: Any, wake: Any, parent: int) -> None:
    die_with_parent()
    mark_worker(parent)  # what its chunks start is known for its (see adopt_orphans)
    # What the child inherits (the supervisor's modules, the loaded job) lives
    # as long as it does: out of the collector's sight, each collection does
    # not walk (and copy, page by page) the parent's heap.
    gc.freeze()
    # Ctrl-C reaches the whole process group; the supervisor decides for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # What jobs print is no output of the command: `fanout run --json` prints
    # one JSON object on stdout, and a reader that closes it (`| head -1`) must
    # not fail a chunk with BrokenPipeError. Their prints join the logs on stderr.
    sys.stdout.flush()
    os.dup2(2, 1)
    whole_lines(sys.stdout, sys.stderr)
    share_cores_with(opts.workers)  # a core to spare for compressing? (avro_blocks)
    backend = open_backend(opts.backend, home=opts.home)
    if opts.only_run is not None:
        serve_run_only(backend.queue, opts.only_run)

    def on_finalize(run_id: str) -> None:
        slot.finalize(run_id)
        if not run_id:
            wake.set()  # a run may have ended: the supervisor looks now, not at its next poll

    runner = Runner(
        backend,
        on_start=slot.start,
        on_end=slot.end,
        on_finalize=on_finalize,
        on_claim=slot.hold_batch,
    )
    dispatcher = Dispatcher(backend, runner)
    visibility = opts.chunk_timeout + LEASE_GRACE + PREFETCH_SLACK
    batches = isinstance(backend.ledger, BatchLedger)
    sleep = 0.005
    receiving = Failing("queue receive")
    batch = 1
    try:
        while not stop.is_set() and os.getppid() == parent:
            try:
                deliveries = backend.queue.receive(batch, visibility)
            except Exception as e:
                stop.wait(receiving.failed(e))
                continue
            receiving.worked()
            if not deliveries:
                stop.wait(sleep)  # not time.sleep: a stopped child leaves at once
                sleep = min(sleep * 2, MAX_POLL_SLEEP)
                continue
            sleep = 0.005
            received = time.monotonic()
            receipts = [d.receipt for d in deliveries]
            if len(deliveries) > 1 and batches:
                # Quick chunks (see QUICK_CHUNK): claimed and committed in batches
                # (fanout.batches), each started within its START_SLACK of the claim.
                slot.hold(receipts)
                dispatcher.handle_many(
                    deliveries, opts.chunk_timeout, stop=stop.is_set, on_batch=slot.hold_batch
                )
                slot.hold([])
                deliveries_left: list[Delivery] = []
            else:
                deliveries_left = deliveries
            for i, delivery in enumerate(deliveries_left):
                slot.hold(receipts[i + 1 :])
                if stop.is_set() or time.monotonic() - received > PREFETCH_SLACK:
                    backend.queue.release(delivery.receipt, 0.0)
                else:
                    dispatcher.handle(delivery, opts.chunk_timeout)
            quick = (time.monotonic() - received) / len(deliveries) < QUICK_CHUNK
            batch = min(opts.batch, batch * 2) if quick else 1
            # What the chunks printed, out now: a child stopped at the pool's
            # end would take its buffer with it.
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
    finally:
        backend.close()
        # Processes a job started (and left running) end with the worker process
        # that ran its chunk, as they do with a Lambda sandbox.
        kill_all(descendants(os.getpid()))


class WorkerPool:
    """The supervisor of ``opts.workers`` child processes."""

    def __init__(self, opts: WorkerOptions) -> None:
        self.opts = opts
        self.backend = open_backend(opts.backend, home=opts.home)
        if opts.only_run is not None:
            # Its recovery and idle checks then look at its run only (coordinator.recover).
            serve_run_only(self.backend.queue, opts.only_run)
        self.runner = Runner(self.backend)
        # Not mp.Event: one a child was SIGKILLed in hung set() (SharedFlag).
        self.stop_event = SharedFlag()
        #: Set by a child that finished finalizing a run: ``run(until=...)``
        #: looks at once instead of at its next poll (a short run's exit).
        self.wake = SharedFlag()
        self.slots = [Slot() for _ in range(opts.workers)]
        self.procs: list[Any] = [None] * opts.workers
        self.timed_out = 0
        self.crashed = 0
        self.out_of_memory = 0
        self._signals = 0
        self._waited_for: set[str] = set()  # runs whose finalizer it said it waits for
        self._full_since = self._disk_looked = 0.0
        #: The subreaper attribute before run() set it (None: not set).
        self._was_subreaper: bool | None = None
        #: Worker processes whose death was handled (their orphans ended).
        self._buried: set[int] = set()
        #: Runs whose job this process loaded, for the children it forks (_warm).
        self._warmed: set[str] = set()

    def _spawn(self, i: int) -> None:
        proc = _CTX.Process(
            target=_child_main,
            args=(self.opts, self.slots[i], self.stop_event, self.wake, os.getpid()),
            name=f"fanout-worker-{i}",
            daemon=True,
        )
        proc.start()
        self.procs[i] = proc

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only a count, which the loop (every 20 ms) and _shutdown act on: a
        # handler calling stop_event.set() ran again, on a second signal, inside
        # that set()'s wait for the sleepers it woke, and hung on its semaphore.
        self._signals += 1

    def _stopping(self) -> bool:
        """Whether the pool is to stop (a signal came, or stop_event is set)."""
        return bool(self._signals) or self.stop_event.is_set()

    def run(
        self,
        until: Callable[[], bool] | None = None,
        until_idle: bool = False,
        tick: Callable[[], None] | None = None,
        tick_every: float = 0.5,
    ) -> None:
        """Supervise until ``until()`` is true, the queue is idle (``until_idle``),
        or a signal asks to stop."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        checks = Failing("the pool's queue and ledger checks")
        try:
            recover(self.backend)
            recovered = True
        except Exception as e:
            checks.failed(e)
            recovered = False
        # What the supervisor holds now (modules, the loaded job) lives as long as
        # it does. Frozen before the fork, as the gc docs advise: the children's
        # collections leave those pages uncopied, and the supervisor's own exit
        # does not walk them either (~0.1 s of a short `fanout run`).
        gc.freeze()
        if self.opts.adopt_orphans:
            self._was_subreaper = subreaper(True)
        for i in range(self.opts.workers):
            self._spawn(i)
        next_tick = idle_since = next_check = 0.0
        next_reap = time.time() + REAP_EVERY
        # recover() above just did one (unless it failed: then at the first chance)
        next_redrive = time.time() + REDRIVE_EVERY if recovered else 0.0
        check_every = CHECK_EVERY.get(self.opts.backend, 0.02)
        try:
            while not self._stopping():
                now = time.time()
                self._police(now)
                if tick is not None and now >= next_tick:
                    next_tick = now + tick_every
                    try:
                        tick()
                    except Exception as e:  # it reads the ledger too
                        checks.failed(e)
                if now < next_check or checks.waiting():
                    if self.wake.take(0.02):
                        next_check = 0.0
                    continue
                next_check = now + check_every
                if (until is not None or until_idle) and (full := self._disk_full(now)):
                    raise UserError(full)
                try:
                    if until is not None and until():
                        break
                    if until_idle or until is not None:
                        busy = any(s.deadline.value for s in self.slots)
                        if not busy and self.backend.queue.pending() == 0:
                            redrive = now >= next_redrive
                            if redrive:
                                next_redrive = now + REDRIVE_EVERY
                            if recover(self.backend, redrive=redrive):
                                idle_since = 0.0
                            elif until_idle and self._finalizing_elsewhere():
                                # Not done until its manifest is; looked at once
                                # a second, not at the queue's pace.
                                idle_since, next_check = 0.0, now + 1.0
                            elif until_idle:
                                # Idle twice in a row: nothing is in flight between checks.
                                if idle_since and now - idle_since > 0.2:
                                    break
                                idle_since = idle_since or now
                        else:
                            idle_since = 0.0
                    if now >= next_redrive:
                        # Busy or not: a run whose message was lost must not wait for
                        # the queue to empty (other runs may keep it busy for hours).
                        next_redrive = now + REDRIVE_EVERY
                        recover(self.backend)
                    checks.worked()
                except Exception as e:
                    checks.failed(e)
                    idle_since = 0.0  # not known to be idle
                    if (until is not None or until_idle) and checks.failing_for() > GIVE_UP_AFTER:
                        raise
                if self._was_subreaper is not None and now >= next_reap:
                    next_reap = now + REAP_EVERY
                    reap(exited_children(self._own_children()), within=0.0)
                if self.wake.take(0.02):
                    next_check = 0.0
        finally:
            self._shutdown()
            self._end_orphans(None)
            if self._was_subreaper is not None:
                subreaper(self._was_subreaper)
                self._was_subreaper = None
            for s, handler in previous.items():
                signal.signal(s, handler)
            if tick is not None:
                with contextlib.suppress(Exception):  # the last progress line, if it can
                    tick()

    def _disk_full(self, now: float) -> str | None:
        """One line if the local home's disk has been full for
        :data:`DISK_FULL_WAIT` (looked at once a second), else None."""
        root = getattr(self.backend.store, "root", None)
        if not isinstance(root, Path) or now < self._disk_looked + 1.0:
            return None
        self._disk_looked = now
        try:
            st = os.statvfs(root)
        except OSError:
            return None
        if not disk_full(st):
            self._full_since = 0.0
            return None
        self._full_since = self._full_since or now
        if now - self._full_since < DISK_FULL_WAIT:
            return None
        return (
            f"the disk of {root.parent} is full (no space left on the device): free some"
            " space, then `fanout worker --until-idle` finishes the work (nothing is lost)"
        )

    def _finalizing_elsewhere(self) -> bool:
        """Whether a run is being finalized by another process (or was, by one
        that died: the recovery sweep takes it over once it is stale, 60 s).
        An idle ``--until-idle`` pool waits for it, where it exited 0 with the
        run unfinished. Said once per run."""
        runs = self.backend.ledger.list_runs(limit=1, states=(RunState.FINALIZING,))
        for run in runs:
            if run.run_id not in self._waited_for:
                self._waited_for.add(run.run_id)
                log.warning(
                    "waiting for run %s's finalizer (taken over if silent %.0f s)",
                    run.run_id,
                    FINALIZE_STALE,
                )
        return bool(runs)

    def _release_prefetched(self, slot: Slot) -> None:
        """Hand back the messages a dead child had received but not started, and
        finish the run it was finalizing: left alone, the run would stay
        "finalizing" until the recovery sweep finds the finalizer stale (60 s).

        Claimed messages are made visible only after their claims are given back
        or failed (the attempt in hand is failed by the caller, with its cause):
        visible earlier, another child would find the dead attempt's lease held
        and put the message off for the whole lease."""
        waiting, finished = slot.take_batch()
        claimed = {a.receipt for a in waiting} | {a.receipt for a in finished}
        if slot.attempt.value:
            # The last attempt started, in hand or not: the note of it as waiting
            # (made before its claim) is older than its start. Given back, an
            # attempt that died between its end and its commit would not count,
            # and a chunk that kills its worker there would run for ever.
            started = Attempt.from_json(slot.attempt.value.decode())
            waiting = [a for a in waiting if a.token != started.token]
            if slot.deadline.value:  # in hand: the caller fails it, with its cause
                claimed.add(started.receipt)
                finished = [a for a in finished if a.token != started.token]
            elif all(a.token != started.token for a in finished):
                # Ended, and maybe not committed (the child died between the
                # two, likely of it): failed now and counted, not left to its
                # lease; a no-op if it committed. Once: the slot starts clean.
                slot.attempt.value = b""
                crashed = Failure(
                    FailureKind.CRASHED, "its worker died after it ran, before its commit"
                )
                with contextlib.suppress(Exception):
                    self._fail(started, crashed)
        if waiting and isinstance(self.backend.ledger, BatchLedger):
            # Never started: given back as if never claimed (a no-op for a claim
            # that never landed), and each message visible at once: one whose
            # claim was still to be made would otherwise stay hidden for its
            # whole visibility timeout (40 s and more).
            with contextlib.suppress(Exception):
                claims = [(a.key, a.token) for a in waiting]
                self.backend.ledger.give_back_many(claims, time.time())
            for attempt in waiting:
                with contextlib.suppress(Exception):
                    self.backend.queue.release(attempt.receipt, 0.0)
        for receipt in slot.take_prefetched():
            if receipt not in claimed:
                with contextlib.suppress(Exception):
                    self.backend.queue.release(receipt, 0.0)
        for attempt in finished:
            try:
                # Its work is lost with the child; a no-op if it committed meanwhile.
                self._fail(
                    attempt, Failure(FailureKind.INTERRUPTED, "its worker died before it committed")
                )
            except Exception:
                log.exception("could not hand back %s", attempt.key)
        run_id = slot.take_finalizing()
        if run_id:
            try:
                self.runner.finalize(run_id, stale_after=0.0)
            except Exception:
                log.exception("could not finalize %s after its finalizer died", run_id)

    def _fail(self, attempt: Attempt, failure: Failure) -> None:
        """Fail an attempt a dead child left, and make its message visible at
        once if the attempt had committed (or lost its lease) after all: the
        child's deferred ack died with it, and the message would stay hidden for
        a whole visibility timeout before the ledger found it finished."""
        if self.runner.fail(attempt, failure) == Handled.LEASE_LOST:
            with contextlib.suppress(Exception):
                self.backend.queue.release(attempt.receipt, 0.0)
        if not self._stopping():  # (a child is started in its place)
            self._warm(attempt.key.run_id)

    def _warm(self, run_id: str) -> None:
        """Load the run's job here, once, so that the child started in place of
        one that died (forked from this process) starts with the job's imports.
        A fresh child of ``fanout worker`` imported them in its chunk's time: a
        crawl chunk spent seconds importing Scrapy on a loaded machine, timed
        out, and its retry in the next fresh child did the same, until the
        chunk was dead. (``fanout run`` loads its job before it forks.)"""
        if run_id in self._warmed:
            return
        self._warmed.add(run_id)
        try:
            run = self.backend.ledger.get_run(run_id)
            if run is not None:
                load_job(run.job)
        except Exception as exc:  # the child will say why the job does not load
            log.debug("did not load the job of %s in the supervisor: %s", run_id, exc)

    def _police(self, now: float) -> None:
        """Kill children past their hard deadline; replace children that died."""
        for i, proc in enumerate(self.procs):
            slot = self.slots[i]
            deadline = slot.deadline.value
            if deadline and now > deadline and proc.is_alive():
                self._kill(proc)
                self._release_prefetched(slot)
                attempt = slot.take()
                if attempt is not None:
                    self.timed_out += 1
                    limit = self.opts.chunk_timeout
                    self._fail(
                        attempt,
                        Failure(
                            FailureKind.TIMED_OUT, f"chunk exceeded its {limit:g}s hard timeout"
                        ),
                    )
                if not self._stopping():
                    self._spawn(i)
            elif deadline and (used := self._over_memory(proc.pid)) is not None:
                self._kill(proc)
                self._release_prefetched(slot)
                attempt = slot.take()
                if attempt is not None:
                    self.out_of_memory += 1
                    self._fail(
                        attempt,
                        Failure(
                            FailureKind.OUT_OF_MEMORY,
                            f"chunk used {used} MB, over its {self.opts.chunk_memory} MB limit"
                            " (--chunk-memory)",
                        ),
                    )
                if not self._stopping():
                    self._spawn(i)
            elif not proc.is_alive():
                proc.join()
                if proc.pid not in self._buried:
                    self._buried.add(proc.pid)
                    self._end_orphans(proc.pid)
                self._release_prefetched(slot)
                attempt = slot.take()
                if attempt is not None:
                    self.crashed += 1
                    self._fail(attempt, Failure(FailureKind.CRASHED, exit_cause(proc.exitcode)))
                if not self._stopping():
                    self._spawn(i)

    def _end_orphans(self, worker: int | None) -> None:
        """Kill what chunks of the worker process ``worker`` (None: of any)
        left running, adopted once it died (see ``WorkerOptions.adopt_orphans``;
        it would have ended with the worker, see ``_child_main``). Only
        processes its mark names: not those other workers' live chunks
        detached, nor anything of the program running the pool."""
        if self._was_subreaper is None:
            return
        left = orphans(self._own_children(), worker)
        kill_all(left)
        reap(left)

    def _own_children(self) -> set[int]:
        """The pids of this process's multiprocessing children (workers, the
        scheduler's process): the children that are not adopted orphans."""
        return {p.pid for p in mp.active_children() if p.pid is not None}

    @staticmethod
    def _kill(proc: Any) -> None:
        """SIGKILL a child and the processes its chunk started (found first:
        once the child is gone, they are orphans no longer traced to it)."""
        left = descendants(proc.pid) if proc.pid is not None else []
        proc.kill()
        proc.join()
        kill_all(left)

    def _over_memory(self, pid: int | None) -> int | None:
        """The child's resident memory in MB if it is over ``chunk_memory``, else None."""
        limit = self.opts.chunk_memory
        if limit is None or pid is None:
            return None
        used = resident_mb(pid)
        return used if used is not None and used > limit else None

    def _shutdown(self) -> None:
        if self._signals:
            log.warning("stopping: finishing chunks in hand (signal again to force)")
        self.stop_event.set()
        deadline = max([s.deadline.value for s in self.slots] + [time.time()]) + 1.0
        for i, proc in enumerate(self.procs):
            if proc is None:
                continue
            while proc.is_alive() and time.time() < deadline and self._signals < 2:
                proc.join(0.05)
                self._police(time.time())
            if proc.is_alive():
                self._kill(proc)
            self._release_prefetched(self.slots[i])
            attempt = self.slots[i].take()
            if attempt is not None:
                # Forced stop: hand the chunk back so nothing is lost.
                self._fail(attempt, Failure(FailureKind.INTERRUPTED, "the worker was stopped"))
        self.backend.close()
        for flag in (self.stop_event, self.wake):
            flag.close()
