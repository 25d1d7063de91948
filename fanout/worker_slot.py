"""What a worker child and its supervisor share (:mod:`fanout.worker`): the
attempt in hand and its hard deadline, the receipts of messages received but
not started, the batch's unsettled attempts, the run being finalized. Shared
memory written without locks, so that a child killed at any moment cannot
wedge the supervisor; no pickle."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
from typing import Any

from fanout.failures import Attempt

__all__ = ["Slot"]

_CTX = mp.get_context("fork")
_SLOT_BYTES = 2048
#: Room for the attempts of a batch: 25 at ~200-600 bytes (long run and chunk ids);
#: those that do not fit are taken over when their leases expire.
_BATCH_BYTES = 16384


class Slot:
    """Shared memory between one child and the supervisor: the attempt in hand,
    and the receipts of the messages it received but has not started yet.
    Without locks (a child killed holding one would wedge the supervisor's
    next read for ever): the supervisor reads the texts only once the child
    is dead, and the deadline, written last, as one aligned double."""

    def __init__(self) -> None:
        self.deadline: Any = _CTX.Value(ctypes.c_double, 0.0, lock=False)
        self.attempt: Any = _CTX.Array(ctypes.c_char, _SLOT_BYTES, lock=False)
        self.prefetched: Any = _CTX.Array(ctypes.c_char, _SLOT_BYTES, lock=False)
        self.finalizing: Any = _CTX.Array(ctypes.c_char, 256, lock=False)
        #: The claimed, unsettled attempts of the batch in hand (fanout.batches).
        self.batch: Any = _CTX.Array(ctypes.c_char, _BATCH_BYTES, lock=False)
        self._lines: dict[Attempt, str] = {}  # the child's: attempt -> its JSON line

    def finalize(self, run_id: str) -> None:
        """The run whose manifest the child is writing ("" when done)."""
        self.finalizing.value = run_id.encode()[:255]

    def take_finalizing(self) -> str:
        """The run a dead child was finalizing, if any (and forget it)."""
        run_id: str = self.finalizing.value.decode()
        self.finalizing.value = b""
        return run_id

    def hold_batch(self, waiting: list[Attempt], finished: list[Attempt]) -> None:
        """Note a batch's claimed attempts not settled yet (not started, and
        finished but not committed), so that if this child dies the supervisor
        hands them back at once, not when their leases expire (as many as fit:
        the rest are taken over then). Told after every chunk of a batch: each
        attempt's line is made once."""
        known, lines = self._lines, {}
        text = ""
        for mark, attempts in (("w", waiting), ("f", finished)):
            for attempt in attempts:
                # (by the whole attempt: a claim's note before it and after it
                # share a token)
                line = known.get(attempt) or attempt.to_json() + "\n"
                lines[attempt] = line
                line = mark + line
                if len(text) + len(line) >= _BATCH_BYTES:
                    break
                text += line
        self._lines = lines  # only those told now: the cache does not grow chunk by chunk
        self.batch.value = text.encode()

    def take_batch(self) -> tuple[list[Attempt], list[Attempt]]:
        """The batch attempts a dead child left unsettled (and forget them):
        (not started, finished)."""
        lines = self.batch.value.decode().splitlines()
        self.batch.value = b""
        waiting = [Attempt.from_json(line[1:]) for line in lines if line[:1] == "w"]
        finished = [Attempt.from_json(line[1:]) for line in lines if line[:1] == "f"]
        return waiting, finished

    def hold(self, receipts: list[str]) -> None:
        """Note the receipts of prefetched messages (as many as fit), so that if this
        child dies the supervisor hands them back at once instead of leaving them
        invisible for a whole visibility timeout."""
        text = ""
        for receipt in receipts:
            if len(text) + len(receipt) + 1 >= _SLOT_BYTES:
                break  # the rest come back when their visibility expires
            text += receipt + ","
        self.prefetched.value = text.encode()

    def take_prefetched(self) -> list[str]:
        """The receipts a dead child left behind (and forget them)."""
        text = self.prefetched.value.decode()
        self.prefetched.value = b""
        return [r for r in text.split(",") if r]

    def start(self, attempt: Attempt) -> None:
        self.attempt.value = attempt.to_json().encode()[: _SLOT_BYTES - 1]
        self.deadline.value = attempt.deadline

    def end(self) -> None:
        self.deadline.value = 0.0

    def take(self) -> Attempt | None:
        """The attempt the child was running when it was stopped, if any."""
        if self.deadline.value == 0.0:
            return None
        self.deadline.value = 0.0
        return Attempt.from_json(self.attempt.value.decode())
