"""Example job: a demonstration data stream, one pulse of readings every 5 minutes.

Each run replays the base readings (the Avro output of ``jobs/meter_readings.py``)
into one 5-minute slot, the slot holding ``scheduled_time``: every reading's
time moves into the slot (keeping its offset within its own 5 minutes) and its
kwh is scaled by a factor that follows a daily sine, phase-shifted per meter.
The output is a pure function of the base readings and the slot.

Idempotent per slot: a scheduled run's id is ``<schedule>-<yyyymmddThhmm>``,
so a slot fired twice (two ``fanout scheduler --at`` calls with the same time,
two racing schedulers, a redelivered EventBridge message) is one run, and its
readings are written once. Schedule it (after a meter-readings run)::

    fanout run jobs/meter_readings.py        # prints the manifest path
    fanout schedule add pulse --cron "rate(5 minutes)" jobs/meter_pulse.py \\
        -p base=.fanout/store/runs/<run id>/_manifest.json

``base`` is the ``_manifest.json`` of a succeeded meter-readings run (a local
path or an ``s3://`` URL: its committed files are read), or a directory or
``s3://`` prefix of Avro files of meter readings.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

from fanout import Job, PermanentError
from fanout.avro import read_records

SLOT_MS = 5 * 60 * 1000
DAY_MS = 24 * 3600 * 1000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
CHECK_EVERY = 1000  # records between time-budget checks
MIN_TIME_LEFT = 1.0  # seconds: checkpoint below this


class Params(BaseModel):
    base: str  # a meter-readings run's _manifest.json, or a directory / prefix of .avro
    scheduled_time: datetime | None = None  # set by the scheduler; default: now
    amplitude: float = Field(0.25, ge=0.0, le=1.0)  # of the daily sine

    @field_validator("scheduled_time")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        # A time without a timezone is UTC (as everywhere in fanout's schedules),
        # not the local time of whichever machine runs the chunk.
        return _as_utc(value) if value is not None else None

    @field_validator("base")
    @classmethod
    def _absolute(cls, value: str) -> str:
        # Validated where the schedule is added: a relative path means the
        # directory the user was in, not the scheduler's or a worker's.
        if value.startswith("s3://"):
            return value
        return str(Path(value.removeprefix("file://")).expanduser().resolve())


job = Job("meter-pulse", params=Params, schema="meter_pulse")


def slot_of(when: datetime) -> int:
    """The start of the 5-minute slot holding ``when`` (naive means UTC), in ms
    since the epoch."""
    ms = (_as_utc(when) - EPOCH) // timedelta(milliseconds=1)
    return ms // SLOT_MS * SLOT_MS


def _as_utc(when: datetime) -> datetime:
    """``when`` in UTC; a naive datetime is taken to be UTC, not local time."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def factor(slot_ms: int, meter_id: str, amplitude: float) -> float:
    """The slot's adjustment of one meter: ``1 + amplitude * sin(...)`` over a day,
    phase-shifted by a stable hash of the meter id (crc32: the same in every process)."""
    day = (slot_ms % DAY_MS) / DAY_MS
    phase = zlib.crc32(meter_id.encode()) / 2**32
    return 1.0 + amplitude * math.sin(2 * math.pi * (day + phase))


def base_files(base: str, ctx: Any) -> list[str]:
    """The Avro files of the base readings."""
    if not base.endswith(".json"):
        return [path for path in ctx.list(base) if path.endswith(".avro")]
    with ctx.open(base) as f:
        manifest = json.load(f)
    run_id = manifest.get("run_id", "")
    if manifest.get("state") != "succeeded":
        raise PermanentError(f"base run {run_id} did not succeed ({manifest.get('state')})")
    suffix = f"runs/{run_id}/_manifest.json"
    if not base.endswith(suffix):
        raise PermanentError(f"base {base} is not a run manifest (expected .../{suffix})")
    root = base[: -len(suffix)]  # the store: a directory, or s3://bucket/
    return [root + entry["key"] for entry in manifest["files"]]


@job.plan
def plan(params: Params, ctx: Any) -> Iterator[dict[str, Any]]:
    """One chunk per base file, all in the slot of ``scheduled_time``."""
    slot = slot_of(params.scheduled_time or datetime.now(UTC))
    for url in base_files(params.base, ctx):
        yield {"url": url, "slot": slot}


@job.process
def process(chunk: dict[str, Any], ctx: Any) -> Any:
    """Replay one base file into the slot, from record ``ctx.cursor`` if resuming."""
    slot: int = chunk["slot"]
    amplitude: float = ctx.params.amplitude
    start: int = ctx.cursor or 0
    slot_time = EPOCH + timedelta(milliseconds=slot)
    with ctx.open(chunk["url"]) as f:
        for i, record in enumerate(read_records(f)):
            if i < start:
                continue
            if not i % CHECK_EVERY and i != start and ctx.time_left() < MIN_TIME_LEFT:
                return ctx.resume_at(i)
            try:
                meter_id, read_at, kwh = record["meter_id"], record["read_at"], record["kwh"]
            except KeyError as exc:
                raise PermanentError(f"{chunk['url']}: not a meter reading (no {exc})") from None
            base_ms = (read_at - EPOCH) // timedelta(milliseconds=1)
            ctx.emit(
                {
                    "meter_id": meter_id,
                    "slot": slot_time,
                    "read_at": slot_time + timedelta(milliseconds=base_ms % SLOT_MS),
                    "kwh": kwh * factor(slot, meter_id, amplitude),
                    "base_kwh": kwh,
                    "base_read_at": read_at,
                }
            )
    return None
