"""Cron schedules: run a job at the ticks of a cron or rate expression.

- :mod:`fanout.schedules.spec`: the expressions (standard cron, AWS ``cron(...)``
  and ``rate(...)``), their fire times, and the ranges refused when one is added;
- :mod:`fanout.schedules.model`: :class:`Schedule`, the :class:`ScheduleStore` seam
  and the deterministic run id of a tick;
- :mod:`fanout.schedules.local`: schedules in the local backend's SQLite database;
- :mod:`fanout.schedules.aws`: EventBridge Scheduler schedules sending to the work queue;
- :mod:`fanout.schedules.fire`: which ticks are due, firing one, the scheduler loop.
"""

from __future__ import annotations

from fanout.backends.base import Backend
from fanout.schedules.model import Schedule, ScheduleStore, run_id_for
from fanout.schedules.spec import Spec, check_ranges, parse_spec

__all__ = [
    "Schedule",
    "ScheduleStore",
    "Spec",
    "check_ranges",
    "open_store",
    "parse_spec",
    "run_id_for",
]


def open_store(backend: Backend) -> ScheduleStore:
    """The schedule store that goes with ``backend``: its SQLite database (local,
    memory) or EventBridge Scheduler (aws)."""
    if backend.name == "aws":
        from fanout.schedules.aws import EventBridgeScheduleStore

        # The backend's own resources (found from the stage's stack, maybe).
        return EventBridgeScheduleStore(getattr(backend.queue, "settings", None))
    from fanout.backends.local.ledger import SQLiteLedger
    from fanout.schedules.local import SQLiteScheduleStore

    if not isinstance(backend.ledger, SQLiteLedger):
        raise ValueError(f"backend {backend.name!r} has no schedule store")
    return SQLiteScheduleStore(backend.ledger.db)
