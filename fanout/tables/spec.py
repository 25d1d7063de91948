"""The table options of a job and the partition a record belongs to.

``Job(..., partition_by="read_at:day", table="readings", schema_evolution="evolve")``:

- ``partition_by``: ``FIELD:hour``, ``FIELD:day`` or ``FIELD:month`` partitions by
  the UTC time in FIELD, as column ``dt`` (``dt=2024-01-01-13``, ``dt=2024-01-01``,
  ``dt=2024-01``); a plain ``FIELD`` partitions by the field's value, as column
  FIELD (``region=eu``);
- ``table``: the table's name, by default the job's (several jobs may share one);
- ``schema_evolution``: ``evolve`` (the default: a compatible schema change
  becomes the table's new schema) or ``freeze`` (any change is refused);
- ``glue_catalog=True``: on AWS, each run that finishes creates or updates the
  table in the Glue catalog (``fanout.tables.glue``).

The options are taken out of the Job's keywords before the run settings are
checked (:func:`pop_table_spec`), so they are the job's, fixed in its code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote

from fanout.errors import RecordError

__all__ = [
    "EVOLUTIONS",
    "GRANULARITIES",
    "TableSpec",
    "partition_value",
    "pop_table_spec",
]

#: Time granularities and how their value is spelled (also the Athena projection format).
GRANULARITIES: dict[str, str] = {"hour": "%Y-%m-%d-%H", "day": "%Y-%m-%d", "month": "%Y-%m"}
#: The partition column of a time granularity.
TIME_COLUMN = "dt"
EVOLUTIONS = ("evolve", "freeze")
#: Hive's name for the partition of a missing (null) value.
NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"

#: What a table may be named (it is a directory of the store).
TABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class TableSpec:
    """Where a job's records go: a table, partitioned by a field (or not)."""

    table: str
    field: str | None = None
    granularity: str | None = None  # None: the field's own value
    evolution: str = "evolve"
    glue: bool = False  # keep the Glue table up to date at the end of each run

    @property
    def column(self) -> str | None:
        """The partition column (``dt`` for a time granularity), None if unpartitioned."""
        if self.field is None:
            return None
        return TIME_COLUMN if self.granularity else self.field

    def describe(self) -> dict[str, Any]:
        """As JSON, for the table's catalog."""
        return {
            "field": self.field,
            "granularity": self.granularity,
            "column": self.column,
        }


def pop_table_spec(job_name: str, settings: dict[str, Any]) -> TableSpec | None:
    """Take ``partition_by``, ``table`` and ``schema_evolution`` out of a Job's
    keyword arguments; None for a job that writes no table. ``ValueError``
    (one line) for a bad option."""
    partition_by = settings.pop("partition_by", None)
    table = settings.pop("table", None)
    evolution = settings.pop("schema_evolution", None)
    glue = settings.pop("glue_catalog", False)
    if not isinstance(glue, bool):
        raise ValueError(f"job {job_name}: glue_catalog must be True or False")
    if partition_by is None and table is None:
        if glue:
            raise ValueError(f"job {job_name}: glue_catalog needs a table (partition_by=...)")
        if evolution is not None:
            raise ValueError(f"job {job_name}: schema_evolution needs a table (partition_by=...)")
        return None
    name = job_name if table is None else table
    if not isinstance(name, str) or not TABLE_NAME.fullmatch(name):
        raise ValueError(f"job {job_name}: table {name!r}: use letters, digits, '.', '_' or '-'")
    evolution = "evolve" if evolution is None else evolution
    if evolution not in EVOLUTIONS:
        raise ValueError(f"job {job_name}: schema_evolution must be 'evolve' or 'freeze'")
    if partition_by is None:
        return TableSpec(name, evolution=evolution, glue=glue)
    if not isinstance(partition_by, str):
        raise ValueError(f"job {job_name}: partition_by must be 'FIELD' or 'FIELD:day' etc.")
    field, sep, granularity = partition_by.partition(":")
    if not _FIELD.match(field):
        raise ValueError(f"job {job_name}: partition_by field {field!r} is not a field name")
    if sep and granularity not in GRANULARITIES:
        raise ValueError(
            f"job {job_name}: partition_by granularity {granularity!r}:"
            f" use {', '.join(GRANULARITIES)}"
        )
    return TableSpec(name, field, granularity or None, evolution, glue)


def field_logical_type(schema_raw: dict[str, Any], field: str) -> str | bool | None:
    """The logical type of ``field`` in a record schema (its non-null branch),
    None if it has none, False if the schema has no such field."""
    for f in schema_raw.get("fields", []):
        if f.get("name") != field:
            continue
        kind = f.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), None)
        if isinstance(kind, dict):
            logical = kind.get("logicalType")
            return str(logical) if logical else None
        return None
    return False


#: The longest partition path segment (``field=value``, escaped, in bytes):
#: a file name on most local disks is at most 255 bytes.
MAX_SEGMENT = 200


def partition_value(spec: TableSpec, record: Any, index: int, logical: str | None) -> str:
    """The partition path segment of ``record`` (``dt=2024-01-01``), "" for an
    unpartitioned table. ``index`` numbers the record in its chunk and
    ``logical`` is the field's Avro logical type, for error messages and ints.

    Raises:
        RecordError: the record has no such field, or its value is not a time
            (for a time granularity).
    """
    if spec.field is None:
        return ""
    if not isinstance(record, dict):
        raise RecordError(f"record {index} is not a dict (got {type(record).__name__})")
    if spec.field not in record:
        raise RecordError(
            f"record {index} has no field {spec.field!r} to partition by (partition_by)"
        )
    value = record[spec.field]
    if spec.granularity is None:
        segment = f"{spec.field}={escape_partition(value)}"
        if len(segment.encode()) > MAX_SEGMENT:
            # A file name on most disks is at most 255 bytes: past that the
            # put failed as an internal error, retried until the chunk died.
            raise RecordError(
                f"record {index}: field {spec.field!r} is too long to partition by"
                f" ({len(segment.encode())} bytes escaped, at most {MAX_SEGMENT})"
            )
        return segment
    if value is None:
        return f"{TIME_COLUMN}={NULL_PARTITION}"
    try:
        moment = _as_utc(value, logical)
    except (OverflowError, ValueError):  # past year 9999 in UTC, or before year 1
        moment = None
    if moment is None:
        raise RecordError(
            f"record {index}: field {spec.field!r} is not a time to partition by"
            f" (got {type(value).__name__} {str(value)[:40]!r})"
        )
    # The year always 4 digits: strftime writes year 1 as "1" (dt=1-01-01, out
    # of the yyyy-MM-dd format Athena's projection reads).
    spelled = GRANULARITIES[spec.granularity].replace("%Y", f"{moment.year:04d}")
    return f"{TIME_COLUMN}={moment.strftime(spelled)}"


def escape_partition(value: Any) -> str:
    """A partition value as its path segment spells it (a record's, or one
    typed by a person to name the partition)."""
    if value is None or value == "":
        return NULL_PARTITION
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str | int | float):
        text = str(value)
    else:
        text = str(getattr(value, "value", value))
    # Hive escapes such characters as %XX too; '/' must never open a new level.
    return quote(text, safe="-_.~ ")


def unescape(text: str) -> str:
    """A partition value as it was written (undoes the ``%XX`` escaping)."""
    return unquote(text)


def _as_utc(value: Any, logical: str | None) -> datetime | None:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str):
        try:
            return _as_utc(datetime.fromisoformat(value), None)
        except ValueError:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        # An int is a time only through its Avro logical type.
        if logical in ("timestamp-millis", "local-timestamp-millis"):
            return _EPOCH + timedelta(milliseconds=value)
        if logical in ("timestamp-micros", "local-timestamp-micros"):
            return _EPOCH + timedelta(microseconds=value)
        if logical == "date":
            return _EPOCH + timedelta(days=value)
    return None
