"""Fair sharing of one queue between runs, and ``-S priority``.

Every chunk message belongs to a **group**, its run (read from the message's
first field, so a queue needs no other hint and sends stay one call); other
messages (schedule fires, sweeps) share the group ``""``. A queue that shares
fairly serves its groups in weighted turns instead of one long line, so a run
submitted behind a 100,000-chunk run starts its chunks within seconds:

- **local** (:class:`fanout.backends.local.queue.SQLiteQueue`): each receive
  takes from the group that has been served least for its weight (weighted
  fair queueing by message count; a group that was idle starts level with the
  others, with no credit saved up); within a group, the old order (oldest
  visible first).
- **SQS**: each message carries its group as ``MessageGroupId`` on the standard
  queue, which is what SQS *fair queues* key on: while one group has a backlog,
  SQS keeps the other groups' messages from waiting behind it. It has no
  weights, so ``priority`` shifts nothing there.

``priority`` is ``high``, ``normal`` (the default) or ``low``, or a number: the
run's weight (:data:`WEIGHTS`), told to the queue when the run is submitted.
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

#: The weights of the named priorities: a ``high`` run gets four turns to a
#: ``low`` one's one, twice a ``normal`` one's.
WEIGHTS = {"high": 4.0, "normal": 2.0, "low": 1.0}
#: ``RunSettings.priority``: a name, or a weight.
PRIORITY_PATTERN = r"^(high|normal|low|[0-9]{1,4}(\.[0-9]{1,3})?)$"

# Chunk messages are compact JSON that starts so (fanout.messages.encode).
_GROUP = re.compile(r'^\{"v":1,"run_id":"([A-Za-z0-9][A-Za-z0-9_.:-]{0,200})"')


def group_of(body: str) -> str:
    """The group of a message body: its run id, or ``""``."""
    found = _GROUP.match(body)
    return found.group(1) if found else ""


def weight_of(priority: str) -> float:
    """The weight of a priority (a name or a number; at least 0.001)."""
    weight = WEIGHTS.get(priority)
    if weight is None:
        weight = float(priority)
    return max(weight, 0.001)


@runtime_checkable
class FairQueue(Protocol):
    """A queue that shares its turns between groups by weight."""

    def set_weight(self, group: str, weight: float) -> None:
        """The weight of ``group`` (a run id) from now on."""


@runtime_checkable
class GroupFilter(Protocol):
    """A queue that can serve some groups only (the local one: ``fanout run``'s
    workers take their own run's messages, not those of other runs in the home)."""

    def serve_only(self, groups: frozenset[str] | None) -> None:
        """Receive, and count as pending, only messages of ``groups`` from now
        on (None: every group)."""

    def serving(self) -> frozenset[str] | None:
        """The groups set by :meth:`serve_only` (None: every group)."""


def serve_run_only(queue: object, run_id: str) -> bool:
    """Have ``queue`` serve ``run_id``'s messages and the group-less ones
    (schedule fires, sweeps) only, if it can; False if it cannot."""
    if isinstance(queue, GroupFilter):
        queue.serve_only(frozenset({run_id, ""}))
        return True
    return False


def served_runs(queue: object) -> frozenset[str] | None:
    """The runs ``queue`` serves and counts as pending, if it serves some only
    (None: every run's)."""
    groups = queue.serving() if isinstance(queue, GroupFilter) else None
    return None if groups is None else groups - {""}


def register_run(queue: object, run_id: str, priority: str) -> None:
    """Tell ``queue`` the weight of a run's messages, if it weighs groups."""
    if isinstance(queue, FairQueue):
        queue.set_weight(run_id, weight_of(priority))
