"""What the runner's phases hand each other (``fanout.runner``: ask → claim →
work → commit), on their own so the batch driver (``fanout.batches``) can hold
them between phases too."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fanout.backends.base import CommitRequest, Delivery, RunRecord, TaskKey
from fanout.failures import Attempt
from fanout.jobs import Job
from fanout.limits import SCHEMA, RunLimits, limits_of
from fanout.messages import ChunkMessage
from fanout.schema_diff import same_schema, schema_change

if TYPE_CHECKING:
    from pydantic import BaseModel

#: A lease outlives the hard timeout by this much, so a supervisor that kills an
#: overrunning attempt records it before any other worker may take the task over.
LEASE_GRACE = 5.0


@dataclass
class RunInfo:
    """What a worker caches about a run: its immutable parts."""

    job_ref: str
    job_name: str
    raw_params: dict[str, Any]
    settings: RunLimits
    schema: Any
    job: Job | None = None
    params: BaseModel | dict[str, Any] | None = None

    @classmethod
    def of(cls, record: RunRecord) -> RunInfo:
        """What a worker keeps of the run ``record``."""
        return cls(
            job_ref=record.job,
            job_name=record.job_name,
            raw_params=record.params,
            settings=limits_of(record.settings),
            schema=record.settings.get(SCHEMA),
        )

    def schema_drift(self, job: Job) -> str | None:
        """Why ``job`` (loaded anew: edited mid-run, or fixed before a replay)
        may not write this run's chunks, if its schema is no longer the one
        submit recorded; None otherwise. The run's manifest names that schema
        for every file, and a table reads every file by its catalog's: a run
        succeeded with files of two schemas (a replay after a field's type was
        changed: `qty` an int in some, a string in others) and a manifest that
        described only the first."""
        if job.schema is None or self.schema is None or same_schema(job.schema.raw, self.schema):
            return None
        spec = getattr(job, "table_spec", None)
        written = (
            f"its chunks write to table {spec.table}, whose contract was checked with the old one"
            if spec is not None
            else "its files and manifest are in the old one"
        )
        return (
            f"the job's schema changed since the run was submitted"
            f" ({schema_change(self.schema, job.schema.raw)}), and {written}:"
            " submit a new run (it takes the new schema), or put the schema back to"
            " finish this one"
        )


@dataclass
class Ask:
    """A delivery admitted and ready to be claimed (``Runner.ask``)."""

    delivery: Delivery
    msg: ChunkMessage
    run: RunInfo
    key: TaskKey
    timeout: float  # the chunk's hard timeout (s)
    now: float  # when it was asked for: its lease counts from here
    # 32 hex digits like uuid4().hex, at a third of its cost (a hot path).
    token: str = field(default_factory=lambda: os.urandom(16).hex())
    body: str = ""  # the ledger's copy of the message, once claimed

    @property
    def lease_seconds(self) -> float:
        """The lease outlives the hard timeout by LEASE_GRACE."""
        return self.timeout + LEASE_GRACE

    def unclaimed(self) -> Attempt:
        """The attempt its claim would start, as a supervisor needs it to give
        the claim back (no number, no deadline: it has not started)."""
        return Attempt(self.key, self.token, 0, self.delivery.receipt, 0.0)


@dataclass(frozen=True)
class Ready:
    """An attempt that ran, wrote its output and registered its children:
    ready for the ledger's commit (``Runner.work``)."""

    run: RunInfo
    attempt: Attempt
    request: CommitRequest
    children: list[tuple[str, float]]  # (message, delay), sent once committed

    def commit_args(self) -> tuple[Any, ...]:
        """The arguments of ``Ledger.commit``."""
        r = self.request
        return (r.key, r.token, r.output, r.outcome, r.now, r.stats, r.duration, r.stop_reason)
