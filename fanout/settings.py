"""What a user may set for a run: :class:`RunSettings`, defaulted from the job and
overridable per run, checked by pydantic, and recorded with the run at submit
(``RunRecord.settings``, beside its kind and schema). The engine reads that
record back without pydantic, as :class:`fanout.limits.RunLimits` (where the
defaults are written, and :class:`RunKind`, re-exported here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fanout.errors import UserError
from fanout.fairness import PRIORITY_PATTERN, WEIGHTS
from fanout.limits import DEFAULTS as D  # the defaults, written once
from fanout.limits import KIND, PLANNED, SCHEMA, TABLE, RunKind, kind_of
from fanout.messages import MAX_SEQ

__all__ = ["KIND", "SCHEMA", "RunKind", "RunSettings", "kind_of", "recorded_settings"]


#: The most a count setting may be: far past any run, and exact as a JSON and a
#: DynamoDB number (an unbounded -S max_concurrency=1e23 was taken as given).
MAX_COUNT = 10**9


class RunSettings(BaseModel):
    """Per-run limits, defaulted from the job and overridable per run (``-S KEY=VALUE``)."""

    # defer_build: the validator is built when settings are first checked (a job
    # that sets some loads, a run is submitted), not when a command imports this.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True)

    max_attempts: int = Field(
        D.max_attempts, ge=1, le=100, description="attempts before a chunk is dead"
    )
    # At most a day, and finite: a retry that waits for ever is a chunk lost.
    backoff_base: float = Field(
        D.backoff_base,
        ge=0,
        le=86400,
        allow_inf_nan=False,
        description="first retry waits up to this (s)",
    )
    backoff_cap: float = Field(
        D.backoff_cap, ge=0, le=86400, allow_inf_nan=False, description="no retry waits longer (s)"
    )
    max_chunks: int = Field(
        D.max_chunks,
        ge=1,
        le=MAX_COUNT,
        description="distinct chunks a run may register besides its root",
    )
    max_depth: int = Field(D.max_depth, ge=0, le=63, description="spawn generations below the root")
    max_continuations: int = Field(
        D.max_continuations, ge=0, le=MAX_SEQ, description="continuations of one chunk (resume_at)"
    )
    codec: str = Field(D.codec, pattern="^(null|deflate)$", description="Avro codec")
    pages_per_chunk: int = Field(
        D.pages_per_chunk,
        ge=1,
        le=MAX_COUNT,
        description="crawl jobs: responses a chunk fetches before handing on",
    )
    # Run controls (fanout.controls).
    max_concurrency: int | None = Field(
        D.max_concurrency,
        ge=1,
        le=MAX_COUNT,
        description="chunks of the run running at once, at most (all workers)",
    )
    tolerated_failures: int | None = Field(
        D.tolerated_failures,
        ge=0,
        le=MAX_COUNT,
        description="dead chunks the run may end with and still succeed",
    )
    tolerated_failure_percent: float | None = Field(
        D.tolerated_failure_percent,
        ge=0,
        le=100,
        description="the same, as a percentage of the run's chunks",
    )
    # Fair sharing of the queue between runs (fanout.fairness).
    priority: str = Field(
        D.priority, pattern=PRIORITY_PATTERN, description="high, normal, low, or a weight"
    )

    @field_validator("priority")
    @classmethod
    def _a_weight_above_zero(cls, priority: str) -> str:
        # A weight of 0 would never be served (fairness.weight_of made it 0.001).
        if priority not in WEIGHTS and float(priority) <= 0:
            raise ValueError(f"priority {priority}: a weight must be more than 0")
        return priority

    # Tables (fanout.tables.commit): compaction as the run's last step.
    compact: bool = Field(
        D.compact, description="table jobs: compact what the run wrote when it ends"
    )

    def overridden(self, overrides: Mapping[str, Any]) -> RunSettings:
        """These settings (a job's), with ``overrides`` (``-S KEY=VALUE``);
        :class:`UserError` (one line) names a setting out of range."""
        try:
            return RunSettings.model_validate({**self.model_dump(), **overrides})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            raise UserError(f"setting {where}: {err['msg']}") from None


def recorded_settings(
    settings: RunSettings,
    kind: RunKind,
    schema: Any,
    table: dict[str, Any] | None = None,
    *,
    planned: bool = False,
) -> dict[str, Any]:
    """A run's settings as submit records them: its limits, kind, schema,
    whether it starts with a plan and (a job that writes a table) its table spec."""
    recorded = {**settings.model_dump(), KIND: kind.value, SCHEMA: schema, PLANNED: planned}
    return recorded if table is None else {**recorded, TABLE: table}
