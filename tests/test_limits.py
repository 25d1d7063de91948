"""A run's limits as the engine reads them (``fanout.limits.RunLimits``, no
pydantic) against the settings a user gives (``fanout.settings.RunSettings``,
checked by pydantic at submit): the same fields, the same defaults, and the
values submit records are the values the engine reads back."""

from __future__ import annotations

import dataclasses

from fanout.limits import DEFAULTS, RunKind, RunLimits, kind_of, limits_of
from fanout.settings import RunSettings, recorded_settings


def test_limits_and_settings_have_the_same_fields_and_defaults() -> None:
    assert [f.name for f in dataclasses.fields(RunLimits)] == list(RunSettings.model_fields)
    assert dataclasses.asdict(DEFAULTS) == RunSettings().model_dump()


def test_the_engine_reads_back_what_submit_recorded() -> None:
    given = RunSettings(max_attempts=5, codec="null", max_concurrency=2, priority="7")
    recorded = recorded_settings(given, RunKind.CRAWL, {"type": "record"})
    assert dataclasses.asdict(limits_of(recorded)) == given.model_dump()
    assert kind_of(recorded) is RunKind.CRAWL
    # A run recorded before a setting existed reads that setting's default.
    older = {k: v for k, v in recorded.items() if k != "compact"}
    assert limits_of(older).compact is DEFAULTS.compact is False
    assert kind_of({}) is RunKind.ETL
