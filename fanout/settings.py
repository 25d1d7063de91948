"""What a run is and its limits: :class:`RunKind`, declared by the job's class,
and :class:`RunSettings`, defaulted from the job and overridable per run. Both
are recorded with the run at submit (``RunRecord.settings``, beside the
schema). Their own module because the job API (``fanout.jobs``), what a chunk
sees (``fanout.context``) and the engine all read them."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fanout.fairness import PRIORITY_PATTERN
from fanout.messages import MAX_SEQ


class RunSettings(BaseModel):
    """Per-run limits, defaulted from the job and overridable per run (``-S KEY=VALUE``)."""

    # defer_build: the validator is built when settings are first checked (a job
    # loads, a run is read), not at import: the Lambda handler imports this module.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True)

    max_attempts: int = Field(3, ge=1, le=100, description="attempts before a chunk is dead")
    backoff_base: float = Field(1.0, ge=0, description="first retry waits up to this (s)")
    backoff_cap: float = Field(300.0, ge=0, description="no retry waits longer (s)")
    max_chunks: int = Field(100_000, ge=1, description="distinct chunks a run may register")
    max_depth: int = Field(32, ge=0, le=63, description="spawn generations below the root")
    max_continuations: int = Field(
        10_000, ge=0, le=MAX_SEQ, description="continuations of one chunk (resume_at)"
    )
    codec: str = Field("deflate", pattern="^(null|deflate)$", description="Avro codec")
    pages_per_chunk: int = Field(
        250, ge=1, description="crawl jobs: responses a chunk fetches before handing on"
    )
    # Run controls (fanout.controls).
    max_concurrency: int | None = Field(
        None, ge=1, description="chunks of the run running at once, at most (all workers)"
    )
    tolerated_failures: int | None = Field(
        None, ge=0, description="dead chunks the run may end with and still succeed"
    )
    tolerated_failure_percent: float | None = Field(
        None, ge=0, le=100, description="the same, as a percentage of the run's chunks"
    )
    # Fair sharing of the queue between runs (fanout.fairness).
    priority: str = Field(
        "normal", pattern=PRIORITY_PATTERN, description="high, normal, low, or a weight"
    )
    # Tables (fanout.tables.commit): compaction as the run's last step.
    compact: bool = Field(False, description="table jobs: compact what the run wrote when it ends")


class RunKind(enum.StrEnum):
    """What kind of job a run runs, declared by the job's class (``Job.kind``)
    and recorded at submit: read, never guessed from what the tasks carry."""

    ETL = "etl"  # a job's own plan and process functions
    CRAWL = "crawl"  # a Scrapy spider, run by fanout.crawl.CrawlJob


#: What submit records in ``RunRecord.settings`` beside the :class:`RunSettings`.
KIND = "kind"
SCHEMA = "schema"


def recorded_settings(settings: RunSettings, kind: RunKind, schema: Any) -> dict[str, Any]:
    """A run's settings as submit records them: its limits, kind and schema."""
    return {**settings.model_dump(), KIND: kind.value, SCHEMA: schema}


def limits_of(recorded: Mapping[str, Any]) -> RunSettings:
    """The :class:`RunSettings` in a run record's settings."""
    return RunSettings.model_validate(
        {k: v for k, v in recorded.items() if k not in (KIND, SCHEMA)}
    )


def kind_of(recorded: Mapping[str, Any]) -> RunKind:
    """The kind a run record's settings declare; a run recorded before runs
    declared their kind counts as ETL."""
    try:
        return RunKind(recorded.get(KIND, RunKind.ETL))
    except ValueError:
        return RunKind.ETL
