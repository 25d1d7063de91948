"""A run's limits as the engine reads them, and what kind of run it is.

:class:`~fanout.settings.RunSettings` (pydantic) checks the settings a user
gives, at submit; the ledger then keeps the checked values with the run
(``RunRecord.settings``). The engine reads that copy back as a
:class:`RunLimits`: the ledger's own copy is trusted, so it is not validated
again, and the runner, the run controls and the Lambda handler need no pydantic
to read it (issue 11: pydantic and a validator cost more than the rest of the
handler's start; ``tests/test_coldstart.py``). ``RunSettings`` takes its
defaults from :data:`DEFAULTS`, so they are written once, here, and a test
checks that both have the same fields.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from fanout.backends.base import DOMAIN_STATS
from fanout.tables.spec import TableSpec


class RunKind(enum.StrEnum):
    """What kind of job a run runs, declared by the job's class (``Job.kind``)
    and recorded at submit: read, never guessed from what the tasks carry."""

    ETL = "etl"  # a job's own plan and process functions
    CRAWL = "crawl"  # a Scrapy spider, run by fanout.crawl.CrawlJob


#: The most distinct counter names (per-domain ones aside) a chunk's
#: ``ctx.stats`` may hold, and the longest name. A run's counters live in its
#: one ledger record, whose size DynamoDB caps at 400 KB: a job counting by an
#: unbounded key (a URL, a customer id) would fill it, and then no chunk of the
#: run could commit. Checked on every backend, so a job that runs locally
#: runs on AWS. A crawl's per-domain counters (kept apart, a host name long)
#: are not held to either bound.
MAX_STAT_NAMES = 200
MAX_STAT_NAME = 200


def stats_problem(stats: Mapping[str, Any]) -> str | None:
    """What is wrong with a chunk's ``ctx.stats``, or None."""
    own = 0
    for name, value in stats.items():
        if not isinstance(name, str) or not name:
            return f"ctx.stats: a counter name must be a non-empty string, not {name!r}"
        domain = name.startswith(DOMAIN_STATS)
        if len(name) > MAX_STAT_NAME and not domain:
            return f"ctx.stats: counter name {name[:40]!r}... is over {MAX_STAT_NAME} characters"
        if not isinstance(value, int) or isinstance(value, bool):
            return f"ctx.stats[{name!r}] is {value!r}: counters count in whole numbers"
        own += not domain
    if own > MAX_STAT_NAMES:
        return (
            f"ctx.stats has {own:,} counter names, over {MAX_STAT_NAMES} a chunk: count by"
            " a bounded set of names (a status, a country), not by an id or a URL"
        )
    return None


#: What submit records in ``RunRecord.settings`` beside the run's limits.
KIND = "kind"
SCHEMA = "schema"
#: Whether the run's first chunk is the job's plan (it makes the others).
PLANNED = "planned"
#: The job's table spec, for a job that writes a table (``fanout.tables.contract``).
TABLE = "table"


def table_setting(spec: TableSpec | None) -> dict[str, Any] | None:
    """A table spec as a run's settings record it (None: no table)."""
    return None if spec is None else dataclasses.asdict(spec)


def table_spec_of(settings: Mapping[str, Any]) -> TableSpec | None:
    """The table spec a run's settings recorded at submit (None: no table, or a
    run submitted before they recorded it)."""
    recorded = settings.get(TABLE)
    if not isinstance(recorded, dict):
        return None
    # (the fields this version knows: a run recorded by another keeps loading)
    known = {f.name for f in dataclasses.fields(TableSpec)}
    return TableSpec(**{k: v for k, v in recorded.items() if k in known})


@dataclasses.dataclass(frozen=True, slots=True)
class RunLimits:
    """A run's limits as recorded at submit (see :class:`~fanout.settings.RunSettings`
    for what each one means and its bounds)."""

    max_attempts: int = 3
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    max_chunks: int = 100_000
    max_depth: int = 32
    max_continuations: int = 10_000
    codec: str = "deflate"
    pages_per_chunk: int = 250
    max_concurrency: int | None = None
    tolerated_failures: int | None = None
    tolerated_failure_percent: float | None = None
    priority: str = "normal"
    compact: bool = False


#: The default of every run setting.
DEFAULTS = RunLimits()
_NAMES = frozenset(f.name for f in dataclasses.fields(RunLimits))


def limits_of(recorded: Mapping[str, Any]) -> RunLimits:
    """The limits in a run record's settings (written at submit from checked
    :class:`~fanout.settings.RunSettings`, so not checked again). A setting the
    record lacks (a run recorded before it existed) takes its default."""
    return RunLimits(**{k: v for k, v in recorded.items() if k in _NAMES})


def kind_of(recorded: Mapping[str, Any]) -> RunKind:
    """The kind a run record's settings declare; a run recorded before runs
    declared their kind counts as ETL."""
    try:
        return RunKind(recorded.get(KIND, RunKind.ETL))
    except ValueError:
        return RunKind.ETL
