"""The backend seam of run controls (``fanout cancel``/``pause``/``resume``,
``max_concurrency``): a Protocol of its own beside the
:class:`~fanout.backends.base.Ledger`, implemented by each ledger through a
mixin (``fanout.backends.local.runcontrols``, ``fanout.backends.aws.runcontrols``).

The rules live in :mod:`fanout.controls` as pure functions on a run's control
state; a backend only stores that state and applies a change atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from fanout.backends.base import Ledger

T = TypeVar("T")

#: A run's control state as stored (see :mod:`fanout.controls`).
ControlState = dict[str, Any]


class ControlContended(RuntimeError):
    """A change to a run's control state lost every optimistic round to other
    writers (many workers admitting one capped run at once). Nothing changed:
    the caller may simply try again later."""


@runtime_checkable
class RunControls(Protocol):
    """A run's control state, and cancelling its queued tasks. Every method is atomic."""

    def read_control(self, run_id: str) -> ControlState:
        """The run's control state (``{}`` if never set)."""

    def change_control(self, run_id: str, change: Callable[[ControlState], T]) -> T:
        """Apply ``change`` to the run's control state (in place) and store the
        result, atomically; returns what ``change`` returned. ``change`` may be
        called more than once (an optimistic write that lost a race is retried
        on a fresh read), so it must depend on the state alone. Raises
        :class:`ControlContended` if it could not get its write in."""

    def cancel_queued(self, run_id: str, now: float) -> tuple[int, bool]:
        """Cancel every queued task of the run, moving its counters with them:
        ``(tasks cancelled, whether the run's outstanding counter is now zero)``."""


def controls_of(ledger: Ledger) -> RunControls:
    """The run controls of ``ledger`` (every ledger of fanout's backends has them)."""
    if not isinstance(ledger, RunControls):
        raise TypeError(f"{type(ledger).__name__} has no run controls")
    return ledger
