"""Example job: meter-reading CSV files to Avro, one chunk per file.

Every ``.csv`` file under ``source`` (a local directory or an ``s3://`` prefix)
becomes a chunk. A chunk reads ``meter_id,read_at,kwh`` rows and emits one
``meter_reading`` record per row, with ``adjusted_kwh = kwh * scale + offset``.
When its time budget runs low it checkpoints at the next row, and a
continuation picks up from there.

Run it on the shipped sample (5 files, 4,000 rows)::

    fanout run jobs/meter_readings.py
    fanout run jobs/meter_readings.py -p scale=1.02 -p offset=0.1
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

from pydantic import BaseModel, field_validator

from fanout import Job, PermanentError

HEADER = ["meter_id", "read_at", "kwh"]
CHECK_EVERY = 1000  # rows between time-budget checks
MIN_TIME_LEFT = 1.0  # seconds: checkpoint below this


class Params(BaseModel):
    source: str = str(Path(__file__).parent / "data" / "readings")
    scale: float = 1.0  # adjustment factor applied to kwh
    offset: float = 0.0  # added after scaling

    @field_validator("source")
    @classmethod
    def _a_directory(cls, source: str) -> str:
        # A typo is told at submit, in one line, not found by a dead plan chunk.
        # (An s3:// prefix is listed when the run plans.)
        if not source or (not source.startswith("s3://") and not Path(source).is_dir()):
            raise ValueError(f"{source!r} is not a directory (nor an s3:// prefix)")
        # Made absolute here, where it was given: a `fanout worker` started in
        # another directory found no `data` and failed every chunk.
        return source if source.startswith("s3://") else str(Path(source).resolve())


job = Job("meter-readings", params=Params, schema="meter_reading")


@job.plan
def plan(params: Params, ctx: Any) -> Iterator[dict[str, str]]:
    """One chunk per CSV file under ``params.source``."""
    for path in ctx.list(params.source):
        if path.endswith(".csv"):
            yield {"path": path}


@job.process
def process(chunk: dict[str, Any], ctx: Any) -> Any:
    """Convert one CSV file, from the cursor ``[row, lines]`` if resuming: the
    first data row not yet emitted (1-based) and the text lines read before it."""
    path: str = chunk["path"]
    params: Params = ctx.params
    scale = params.scale
    offset = params.offset
    start, skip = ctx.cursor or (1, 0)
    emit = ctx.emit
    time_left = ctx.time_left
    parse_time = datetime.fromisoformat

    with io.TextIOWrapper(ctx.open(path), encoding="utf-8", newline="") as text:
        reader = csv.reader(text)
        lines_before = 0  # (told in an error: the lines skipped by a continuation)
        try:
            header = next(reader, None)
            if header is None:
                return None  # an empty file: nothing to emit
            if [h.strip().lstrip("\ufeff") for h in header] != HEADER:
                raise ValueError(f"{path}: header is {header}, expected {','.join(HEADER)}")
            # A continuation skips the lines read before it as lines, not as rows:
            # parsing them again cost each slice more than the last, until slices
            # of a big file made a thousand rows each. (A quoted field's line
            # breaks count as lines too, as the reader counted them.)
            if skip:
                lines_before = skip - reader.line_num
            if lines_before:
                next(islice(text, lines_before - 1, None), None)
            for line, row in enumerate(reader, start):
                try:
                    meter_id, read_at, kwh_text = row
                    kwh = float(kwh_text)
                    when = parse_time(read_at)
                except ValueError:
                    if not row:
                        continue  # a blank line
                    raise ValueError(f"{path} line {line}: {_row_problem(row)}") from None
                if when.tzinfo is not UTC:
                    try:
                        when = when.replace(tzinfo=UTC) if not when.tzinfo else when.astimezone(UTC)
                    except OverflowError:  # 9999-12-31T23:30-01:00 is past year 9999 in UTC
                        raise ValueError(
                            f"{path} line {line}: read_at {read_at!r} is out of range in UTC"
                        ) from None
                emit(
                    {
                        "meter_id": meter_id,
                        "read_at": when,
                        "kwh": kwh,
                        "adjusted_kwh": kwh * scale + offset,
                        "source": path,
                        "line": line,
                    }
                )
                if not line % CHECK_EVERY and time_left() < MIN_TIME_LEFT:
                    return ctx.resume_at([line + 1, lines_before + reader.line_num])
        except (UnicodeDecodeError, csv.Error) as exc:
            # The file's own fault, the same at every attempt: named, and not retried.
            at = lines_before + reader.line_num
            raise PermanentError(f"{path} line {at}: {type(exc).__name__}: {exc}") from None
    return None


def _row_problem(row: list[str]) -> str:
    """Why a data row does not parse (the slow path, for the error message)."""
    if len(row) != len(HEADER):
        return f"expected {len(HEADER)} columns ({','.join(HEADER)}), got {len(row)}: {row}"
    _, read_at, kwh = row
    try:
        float(kwh)
    except ValueError:
        return f"kwh {kwh!r} is not a number"
    try:
        datetime.fromisoformat(read_at)
    except ValueError:
        return f"read_at {read_at!r} is not an ISO 8601 timestamp"
    return f"cannot parse {row}"
