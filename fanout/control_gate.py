"""Run controls on the worker's side: what the runner asks before it claims a
task, tells when an attempt ends, and what a chunk's ``ctx`` asks at its
checkpoints.

- **Admission**, before the claim: a paused run's delivery is acknowledged
  (``fanout resume`` sends its tasks again); with ``max_concurrency``, the
  attempt takes one of the run's slots, or its delivery is handed back with a
  delay and nothing is recorded against the task (no attempt, no failure).
- **Release**, when the attempt ends however it ends (a supervisor or the
  Lambda watchdog failing it included); a slot whose worker died lapses with
  the attempt's lease.
- **The probe**, behind ``ctx.time_left()`` and ``ctx.cancelled``: once the run
  is cancelled or paused, ``time_left()`` returns 0, so a chunk that checks it
  checkpoints at once. It reads the ledger at most every :data:`PROBE_EVERY`
  seconds, and not at all during a chunk's first :data:`PROBE_EVERY` seconds
  (its admission just read the same state).
- **Tolerated failures**, when a chunk is dead: past the run's tolerance the
  run is stopped and its queued tasks cancelled at once; so is a run a chunk
  stops: a runaway bound by :meth:`Gate.stop`, ``ctx.stop_run`` by the chunk's
  commit (which records it), then :meth:`Gate.stopped`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fanout.backends.base import Backend, Delivery, RunRecord
from fanout.backends.runcontrols import ControlContended, ControlState, controls_of
from fanout.controls import (
    Admission,
    admit,
    contended,
    is_cancelled,
    release,
    tolerance_chunks,
    tolerance_exceeded,
)
from fanout.events import EventSink, emit
from fanout.limits import RunLimits
from fanout.outcomes import Handled

log = logging.getLogger("fanout.runner")

#: Seconds between two reads of a run's controls by a running chunk.
PROBE_EVERY = 1.0


class Probe:
    """``ctx``'s view of the run's controls: ``"cancelled"``, ``"paused"`` or None."""

    def __init__(self, gate: Gate, run_id: str) -> None:
        self.gate = gate
        self.run_id = run_id
        self.state: str | None = None
        self._next = time.monotonic() + PROBE_EVERY

    def __call__(self) -> str | None:
        if self.state == "cancelled":
            return self.state  # final
        now = time.monotonic()
        if now < self._next:
            return self.state
        self._next = now + PROBE_EVERY
        try:
            run = self.gate.backend.ledger.get_run(self.run_id)
            if run is not None and is_cancelled(run):
                self.state = "cancelled"
            elif self.gate.controls.read_control(self.run_id).get("paused"):
                self.state = "paused"
            else:
                self.state = None
        except Exception as exc:
            # The chunk goes on as it was told last; the next probe asks again.
            log.warning("could not read the controls of run %s: %s", self.run_id, exc)
        return self.state

    def run(self) -> RunRecord | None:
        """The run's record as the ledger has it now (a read each call): what
        its committed chunks added up to so far."""
        return self.gate.backend.ledger.get_run(self.run_id)


class Gate:
    """The run controls one runner applies."""

    def __init__(self, backend: Backend, events: EventSink) -> None:
        self.backend = backend
        self.controls = controls_of(backend.ledger)
        self.events = events
        self._memo: dict[str, ControlState] | None = None

    def admit(
        self, run_id: str, settings: RunLimits, token: str, expires: float, receives: int
    ) -> Admission:
        """Whether attempt ``token`` may start now (see :func:`fanout.controls.admit`).
        A run with no cap costs one read; a capped one, one atomic change.

        A change that lost every round to other workers is a refusal like a
        full run's, not a failure: the delivery comes back later and nothing is
        counted against the task (as a failure, five of them would have
        dead-lettered a healthy chunk of a busy capped run)."""
        cap, now = settings.max_concurrency, time.time()
        if cap is None:
            return admit(self._read(run_id), token, None, expires, now)
        try:
            return self.controls.change_control(
                run_id, lambda state: admit(state, token, cap, expires, now, receives)
            )
        except ControlContended as exc:
            log.warning("%s; its delivery is handed back", exc)
            return contended(receives)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Within it, an uncapped run's controls are read once (the admissions of
        one batch of deliveries, ``fanout.batches``): one read, not ten."""
        self._memo = {}
        try:
            yield
        finally:
            self._memo = None

    def _read(self, run_id: str) -> ControlState:
        if self._memo is None:
            return self.controls.read_control(run_id)
        state = self._memo.get(run_id)
        if state is None:
            state = self._memo[run_id] = self.controls.read_control(run_id)
        return state

    def refuse(self, delivery: Delivery, admission: Admission) -> Handled:
        """Settle a delivery that was not admitted; returns the runner's outcome."""
        if admission.paused:
            # Dropped, not polled: `fanout resume` sends the run's tasks again.
            self.backend.queue.ack(delivery.receipt)
            return Handled.PAUSED
        self.backend.queue.release(delivery.receipt, admission.retry_after)
        return Handled.CAPPED

    def release(
        self, run_id: str, settings: RunLimits, token: str, took: float | None = None
    ) -> None:
        """Give back the slot of attempt ``token``, if its run is capped (idempotent)."""
        if settings.max_concurrency is None:
            return
        try:
            self.controls.change_control(run_id, lambda state: release(state, token, took))
        except Exception as exc:
            # The slot lapses with the attempt's lease; the attempt's own outcome stands.
            log.warning("could not release a slot of run %s: %s", run_id, exc)

    def probe(self, run_id: str) -> Probe:
        """A probe for one chunk of ``run_id``."""
        return Probe(self, run_id)

    def after_dead(self, run_id: str, settings: RunLimits) -> bool:
        """A chunk of the run just died: stop the run if that took it over its
        tolerated failures, cancelling its queued tasks at once. Returns whether
        the run drained (the caller finalizes it)."""
        if settings.tolerated_failures is None and settings.tolerated_failure_percent is None:
            return False
        run = self.backend.ledger.get_run(run_id)
        if run is None or run.stop_reason:
            return False
        reason = tolerance_exceeded(settings, run.tasks_dead, tolerance_chunks(run))
        if reason is None:
            return False
        return self.stop(run_id, reason)

    def after_delayed_children(self, run_id: str) -> bool:
        """A chunk just sent children with a delay: in a run stopped meanwhile
        (a chunk running when it stopped), they are cancelled now, not when
        their delay is over. Returns whether the run drained."""
        run = self.backend.ledger.get_run(run_id)
        if run is None or not run.stop_reason:
            return False
        return self.controls.cancel_queued(run_id, time.time())[1]

    def stop(self, run_id: str, reason: str, chunk_id: str | None = None) -> bool:
        """Stop the run for ``reason`` (a runaway bound, its tolerance exceeded;
        ``ctx.stop_run`` is recorded by the commit) and cancel its queued tasks
        at once, those waiting out a delay included: left for their claims, a crawl's throttled
        children kept a stopped run "stopping" for minutes. Running chunks
        finish. Returns whether the run drained (the caller finalizes it)."""
        if not self.backend.ledger.stop(run_id, reason):
            # Stopped already, its queued chunks cancelled then (what was queued
            # since is cancelled at its claim, or by after_delayed_children).
            return False
        return self.stopped(run_id, reason, chunk_id)

    def stopped(self, run_id: str, reason: str | None, chunk_id: str | None = None) -> bool:
        """The run was just stopped for ``reason`` (by :meth:`stop`, or by the
        commit of the chunk that called ``ctx.stop_run``): cancel its queued
        tasks and say so. Returns whether the run drained."""
        log.warning("run %s stopped: %s", run_id, reason)
        cancelled, drained = self.controls.cancel_queued(run_id, time.time())
        details = {"chunk_id": chunk_id} if chunk_id is not None else {}
        emit(self.events, "run.stopped", run_id, reason=reason, cancelled=cancelled, **details)
        return drained
