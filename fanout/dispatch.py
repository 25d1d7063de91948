"""The one door a delivery comes in by: its envelope is decoded once and routed
by kind (``fanout.messages.decode_envelope``):

- a chunk message → the runner (``fanout.runner``): claim, run, commit or fail;
- a schedule's tick, from EventBridge Scheduler → ``fanout.schedules.fire``;
- a recovery sweep, from the stack's schedule → ``fanout.coordinator.recover``.

Both hosts hand every delivery here: the local worker's children
(``fanout.worker``) and the Lambda handler (``fanout.aws_lambda``). Nothing
below this module imports it (``tests/test_layers.py``; docs/architecture.md,
"Layers").

Never raises for a message. A body that is not a valid envelope is kept as a
dead letter and acknowledged; anything else that goes wrong outside the job's
code (the runner first fails the attempt in hand, if any) hands the message
back to be tried again shortly, and dead-letters it once it failed
``fanout.failures.POISON_TRIES`` times: no message can crash-loop a worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import cast

from fanout.backends.base import Backend, BatchLedger, Delivery
from fanout.batches import BatchHook, run_batch
from fanout.failures import describe, drop_invalid, format_traceback, settle_poison
from fanout.messages import ChunkMessage, MessageError, ScheduleFire, decode_envelope
from fanout.outcomes import Handled
from fanout.runner import Runner

log = logging.getLogger("fanout.dispatch")


class Dispatcher:
    """Routes the deliveries of one backend; one per worker process."""

    def __init__(self, backend: Backend, runner: Runner | None = None) -> None:
        """``runner``: the one chunk messages go to (its hooks tell a supervisor
        which attempt is in hand); by default a plain :class:`Runner`."""
        self.backend = backend
        self.runner = runner if runner is not None else Runner(backend)

    def handle(self, delivery: Delivery, timeout: float) -> Handled:
        """Handle one delivery, a chunk under a hard ``timeout`` (s); returns what
        happened. The message was released back to the queue (not acknowledged)
        exactly when the result is in :data:`fanout.outcomes.RELEASED`."""
        envelope = None
        try:
            try:
                envelope = decode_envelope(delivery.body)
            except MessageError as exc:
                # Untrusted input that is not ours: drop it, loudly.
                return drop_invalid(self.backend.queue, self.backend.store, delivery, str(exc))
            if isinstance(envelope, ChunkMessage):
                return self.runner.handle(delivery, envelope, timeout)
            if isinstance(envelope, ScheduleFire):
                # Imported on the first tick: most processes never see one, and
                # the Lambda handler's cold start must not pay for schedules
                # (croniter) or the coordinator (tests/test_coldstart.py).
                from fanout.schedules.fire import handle_fire

                return handle_fire(self.backend, delivery, envelope)
            return self._sweep(delivery)
        except Exception as exc:
            reason, tb = describe(exc), format_traceback(exc)
            q, store = self.backend.queue, self.backend.store
            # Only a chunk message may come back as a copy (see settle_poison).
            checked = not isinstance(envelope, ChunkMessage)
            return settle_poison(q, store, delivery, reason, tb, sender_checked=checked)

    def handle_many(
        self,
        deliveries: Sequence[Delivery],
        timeout: float,
        *,
        stop: Callable[[], bool] | None = None,
        on_batch: BatchHook | None = None,
    ) -> list[Handled]:
        """Handle several deliveries received together, as :meth:`handle` would
        one by one, but with the chunk messages claimed and committed in
        batches (``fanout.batches``) when the ledger can (a ``BatchLedger``).
        ``stop`` and ``on_batch``: see :func:`fanout.batches.run_batch`."""
        if not isinstance(self.backend.ledger, BatchLedger):
            return [self.handle(d, timeout) for d in deliveries]
        results: list[Handled | None] = [None] * len(deliveries)
        chunks: list[tuple[int, Delivery, ChunkMessage]] = []
        for i, delivery in enumerate(deliveries):
            try:
                envelope = decode_envelope(delivery.body)
            except MessageError:
                envelope = None
            if isinstance(envelope, ChunkMessage):
                chunks.append((i, delivery, envelope))
            else:
                results[i] = self.handle(delivery, timeout)  # not a chunk: the usual door
        if chunks:
            items = [(d, m) for _, d, m in chunks]
            try:
                outcomes = run_batch(self.runner, items, timeout, stop=stop, on_batch=on_batch)
            except Exception as exc:  # run_batch settles each item itself; belt and braces
                outcomes = [exc] * len(items)
            for (i, delivery, _), outcome in zip(chunks, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    tb = format_traceback(outcome)
                    q, store = self.backend.queue, self.backend.store
                    outcome = settle_poison(q, store, delivery, describe(outcome), tb)
                results[i] = outcome
        assert all(r is not None for r in results)  # every branch above settles its item
        return cast(list[Handled], results)

    def _sweep(self, delivery: Delivery) -> Handled:
        from fanout.coordinator import recover  # on the first sweep, as above
        from fanout.schedules.guard import sender_refusal

        # Acknowledged first: recovery re-sends stranded tasks only when the
        # queue is empty, and this message must not count.
        self.backend.queue.ack(delivery.receipt)
        refused = sender_refusal(self.backend.name, delivery.sender, "sweep")
        if refused:
            log.error("dropping a sweep message: %s", refused)
            return Handled.REFUSED
        for action in recover(self.backend):
            log.warning("recovery sweep: %s", action)
        return Handled.SWEPT
