"""The AWS Glue table over a fanout table, so Athena queries it without a crawler.

:func:`sync_glue_table` creates (or updates) database ``fanout_<stage>`` and in
it the table, from the fanout catalog:

- the Avro SerDe, with the table's current schema as ``avro.schema.literal``
  and columns converted from it (``long`` → ``bigint``, ``timestamp-millis`` →
  ``timestamp``, records → ``struct<…>`` …);
- the partition column (``dt`` or the field) as a partition key: a time
  partition by **partition projection** (type ``date``, its format and unit, a
  range from the first partition to ``NOW``), so new days need no call; a value
  partition by **registered partitions** (``BatchCreatePartition`` for the
  values the catalog has and Glue has not).

Athena reads every object under a partition's prefix, not fanout's catalog:
the files of an attempt that never committed, and the files a compaction
replaced, are seen until ``fanout gc`` (or the compaction's own last step)
deletes them. ``fanout read`` reads through the catalog and never sees them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any

from fanout.errors import UserError
from fanout.tables.catalog import Catalog
from fanout.tables.spec import NULL_PARTITION, unescape

__all__ = ["database_name", "glue_name", "hive_type", "sync_glue_table", "table_input"]

_SERDE = "org.apache.hadoop.hive.serde2.avro.AvroSerDe"
_INPUT = "org.apache.hadoop.hive.ql.io.avro.AvroContainerInputFormat"
_OUTPUT = "org.apache.hadoop.hive.ql.io.avro.AvroContainerOutputFormat"
_PRIMITIVE = {
    "string": "string",
    "int": "int",
    "long": "bigint",
    "float": "float",
    "double": "double",
    "boolean": "boolean",
    "bytes": "binary",
    "null": "void",
}
_LOGICAL = {
    "timestamp-millis": "timestamp",
    "timestamp-micros": "timestamp",
    "date": "date",
}
#: Athena's projection formats (Java's) and interval units, per granularity
#: (the same spellings as ``fanout.tables.spec.GRANULARITIES``).
_PROJECTION = {
    "hour": ("yyyy-MM-dd-HH", "HOURS"),
    "day": ("yyyy-MM-dd", "DAYS"),
    "month": ("yyyy-MM", "MONTHS"),
}


def database_name() -> str:
    """``fanout_<stage>``: the stage verbatim, as in the template's Glue permissions."""
    return f"fanout_{os.environ.get('FANOUT_STAGE', 'dev')}"


def glue_name(name: str) -> str:
    """A Glue/Athena name: lower case, ``-`` and ``.`` as ``_``."""
    return re.sub(r"[^a-z0-9_]", "_", name.lower())


def hive_type(avro_type: Any) -> str:
    """The Hive column type of an Avro type (a nullable union is its branch's)."""
    if isinstance(avro_type, list):
        branches = [t for t in avro_type if t != "null"]
        if len(branches) == 1:
            return hive_type(branches[0])
        return "uniontype<" + ",".join(hive_type(t) for t in branches) + ">"
    if isinstance(avro_type, str):
        if avro_type in _PRIMITIVE:
            return _PRIMITIVE[avro_type]
        raise UserError(f"named type reference {avro_type!r} is not supported in a Glue column")
    kind = avro_type.get("type")
    logical = avro_type.get("logicalType")
    if logical in _LOGICAL:
        return _LOGICAL[logical]
    if logical == "decimal":
        return f"decimal({avro_type.get('precision')},{avro_type.get('scale', 0)})"
    if kind == "record":
        inner = ",".join(f"{f['name']}:{hive_type(f['type'])}" for f in avro_type["fields"])
        return f"struct<{inner}>"
    if kind == "array":
        return f"array<{hive_type(avro_type['items'])}>"
    if kind == "map":
        return f"map<string,{hive_type(avro_type['values'])}>"
    if kind == "enum":
        return "string"
    if kind == "fixed":
        return "binary"
    return hive_type(kind)


def table_input(catalog: Catalog, bucket: str) -> dict[str, Any]:
    """Glue's ``TableInput`` for the table (see the module docstring)."""
    if catalog.schema is None:
        raise UserError(f"table {catalog.table} has no data yet: no run has written to it")
    schema = dict(catalog.schema["schema"])
    part = catalog.data.get("partitioning") or {}
    column, field, granularity = part.get("column"), part.get("field"), part.get("granularity")
    if column and not granularity:
        # Hive allows no column named like a partition key: the value partition's
        # field is read from the key, and left out of the schema (Avro readers
        # ignore a field the writer has and they lack).
        schema["fields"] = [f for f in schema["fields"] if f["name"] != field]
    location = f"s3://{bucket}/tables/{catalog.table}/"
    params = {
        "classification": "avro",
        "EXTERNAL": "TRUE",
        "fanout.catalog_version": str(catalog.version),
    }
    if column and granularity:
        fmt, unit = _PROJECTION[granularity]
        days = sorted(
            f["partition"].split("=", 1)[1]
            for f in catalog.files
            if not f["partition"].endswith(NULL_PARTITION)
        )
        first = days[0] if days else None
        params.update(
            {
                "projection.enabled": "true",
                f"projection.{column}.type": "date",
                f"projection.{column}.format": fmt,
                f"projection.{column}.range": f"{first or 'NOW'},NOW",
                f"projection.{column}.interval": "1",
                f"projection.{column}.interval.unit": unit,
                "storage.location.template": f"{location}{column}=${{{column}}}",
            }
        )
    return {
        "Name": glue_name(catalog.table),
        "TableType": "EXTERNAL_TABLE",
        "Parameters": params,
        "PartitionKeys": [{"Name": column, "Type": "string"}] if column else [],
        "StorageDescriptor": {
            "Columns": [
                {"Name": f["name"], "Type": hive_type(f["type"])} for f in schema["fields"]
            ],
            "Location": location,
            "InputFormat": _INPUT,
            "OutputFormat": _OUTPUT,
            "SerdeInfo": {
                "SerializationLibrary": _SERDE,
                "Parameters": {"avro.schema.literal": json.dumps(schema)},
            },
        },
    }


def sync_glue_table(glue: Any, catalog: Catalog, bucket: str, database: str) -> dict[str, Any]:
    """Create or update the Glue database and table; returns what was done."""
    with contextlib.suppress(glue.exceptions.AlreadyExistsException):
        glue.create_database(DatabaseInput={"Name": database})
    table = table_input(catalog, bucket)
    try:
        glue.create_table(DatabaseName=database, TableInput=table)
        action = "created"
    except glue.exceptions.AlreadyExistsException:
        glue.update_table(DatabaseName=database, TableInput=table)
        action = "updated"
    registered = 0
    part = catalog.data.get("partitioning") or {}
    if part.get("column") and not part.get("granularity"):
        registered = _register_partitions(glue, catalog, table, database)
    return {
        "database": database,
        "table": table["Name"],
        "action": action,
        "partitions": registered,
    }


def _register_partitions(glue: Any, catalog: Catalog, table: dict[str, Any], database: str) -> int:
    have: set[tuple[str, ...]] = set()
    pages = glue.get_paginator("get_partitions").paginate(
        DatabaseName=database, TableName=table["Name"]
    )
    for page in pages:
        have.update(tuple(p["Values"]) for p in page["Partitions"])
    wanted = sorted({f["partition"] for f in catalog.files})
    new = []
    for partition in wanted:
        value = unescape(partition.split("=", 1)[1])
        if (value,) in have:
            continue
        sd = {
            **table["StorageDescriptor"],
            "Location": table["StorageDescriptor"]["Location"] + partition + "/",
        }
        new.append({"Values": [value], "StorageDescriptor": sd})
    for start in range(0, len(new), 100):  # BatchCreatePartition takes 100 at most
        glue.batch_create_partition(
            DatabaseName=database,
            TableName=table["Name"],
            PartitionInputList=new[start : start + 100],
        )
    return len(new)
