"""Compaction: many small committed files of a partition become a few large ones.

The steps, each safe to be killed after (``fanout compact`` again repairs it):

1. **intent**: ``tables/T/_compactions/<id>.json`` names the files to replace
   and the files to write, so a later run (or gc) knows them;
2. **new files**: each group of small files is read with the table's current
   schema (Avro resolution: files of older schema versions are converted) and
   written as one file, ``compact-<id>-<n>.avro``, in the same partition; none
   of them is in the catalog yet, so readers do not see them;
3. **swap**: one catalog version (a write-if-absent, see
   :mod:`fanout.tables.catalog`) drops the old files and adds the new ones,
   provided every old file is still live (else another compaction took them,
   and this one gives up);
4. **delete** the old files, then the intent.

Recovery (:func:`recover`, run first by every compaction and by gc): an intent
none of whose old files is live any more was swapped in: the files it names
that are not live are deleted. An intent whose swap never happened is rolled
back (its new files deleted) only once it is older than ``stale_after``, since
it may belong to a compaction still running. A live file is never deleted.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import fastavro

from fanout.avro import read_records
from fanout.backends.base import Store
from fanout.backends.keys import compaction_key, table_file_key, table_prefix
from fanout.errors import UserError
from fanout.tables.catalog import (
    Catalog,
    check_table_name,
    live_files,
    require_catalog,
    update_catalog,
)

__all__ = ["CompactionResult", "compact", "recover"]

#: An intent whose swap has not happened after this long belongs to a dead compaction.
STALE_AFTER = 3600.0
#: A file at least this share of the target is left as it is.
BIG_ENOUGH = 0.75
#: In-memory buffer of a new file before it spills to a temporary file.
SPOOL_BYTES = 32 * 1024 * 1024


@dataclass
class CompactionResult:
    """What one compaction did."""

    compaction_id: str
    groups: list[dict[str, Any]] = field(default_factory=list)  # old keys, new key, partition
    files_before: int = 0
    files_after: int = 0
    records: int = 0
    repaired: list[str] = field(default_factory=list)  # what recovery cleaned up
    version: int | None = None  # the catalog version of the swap


def _intents(store: Store, table: str) -> list[str]:
    prefix = f"{table_prefix(table)}_compactions/"
    return [k for k in store.list(prefix) if k.endswith(".json")]


def recover(
    store: Store, table: str, stale_after: float = STALE_AFTER, *, dry_run: bool = False
) -> list[str]:
    """Finish or roll back the compactions a crash left (module docstring);
    returns the keys it deleted (with ``dry_run``, would delete)."""
    deleted: list[str] = []
    intents = _intents(store, table)
    if not intents:
        return deleted
    catalog = require_catalog(store, table)
    live = {f["key"] for f in catalog.files}
    for ikey in intents:
        try:
            intent = json.loads(store.get(ikey))
        except KeyError:
            continue  # another process finished it
        old = [k for g in intent["groups"] for k in g["old"]]
        new = [g["new"] for g in intent["groups"]]
        swapped = not any(k in live for k in old)
        stale = time.time() - float(intent["started_at"]) > stale_after
        if not swapped and not stale:
            continue  # may still be running
        for key in [*old, *new, ikey]:
            if key not in live:
                if not dry_run:
                    store.delete(key)
                deleted.append(key)
    return deleted


def plan_groups(
    catalog: Catalog, partition: str | None, target_bytes: int
) -> list[tuple[str, list[dict[str, Any]]]]:
    """Groups of small live files, each to become one file: per partition, in key
    order, up to ``target_bytes`` each; a group of one file is left alone."""
    by_partition: dict[str, list[dict[str, Any]]] = {}
    for f in live_files(catalog, partition):
        if f["bytes"] < BIG_ENOUGH * target_bytes:
            by_partition.setdefault(f["partition"], []).append(f)
    groups = []
    for part, files in sorted(by_partition.items()):
        current: list[dict[str, Any]] = []
        size = 0
        for f in files:
            if current and size + f["bytes"] > target_bytes:
                groups.append((part, current))
                current, size = [], 0
            current.append(f)
            size += f["bytes"]
        groups.append((part, current))
    return [(p, g) for p, g in groups if len(g) > 1]


def compact(
    store: Store,
    table: str,
    partition: str | None = None,
    target_bytes: int = 128 * 1024 * 1024,
    codec: str = "deflate",
    stale_after: float = STALE_AFTER,
) -> CompactionResult:
    """Compact the table (or one partition); see the module docstring.

    Raises:
        UserError: no such table, or the partition holds no file.
    """
    check_table_name(table)
    result = CompactionResult(secrets.token_hex(6))
    result.repaired = recover(store, table, stale_after)
    catalog = require_catalog(store, table)
    if partition is not None and not live_files(catalog, partition):
        raise UserError(f"table {table} has no partition {partition!r}")
    if catalog.schema is None:
        return result  # no version written with yet: no file either
    # The confirmed schema: its files stay readable should a pending one be given back.
    schema = fastavro.parse_schema(catalog.schema["schema"])
    plan = plan_groups(catalog, partition, target_bytes)
    if not plan:
        return result
    groups: list[dict[str, Any]] = [
        {
            "partition": part,
            "old": [f["key"] for f in files],
            "new": table_file_key(table, part, f"compact-{result.compaction_id}-{n}.avro"),
        }
        for n, (part, files) in enumerate(plan)
    ]
    intent = {"table": table, "started_at": time.time(), "groups": groups}
    store.put(compaction_key(table, result.compaction_id), json.dumps(intent).encode())
    new_entries = []
    for group in groups:
        try:
            records, nbytes = _merge(store, group["old"], group["new"], schema, codec)
        except _Gone:
            # A file to merge is gone: another compaction swapped these files
            # out and deleted them while this one read them.
            _superseded(store, table, result.compaction_id, groups)
        new_entries.append(
            {
                "key": group["new"],
                "partition": group["partition"],
                "records": records,
                "bytes": nbytes,
                "run_id": f"compaction {result.compaction_id}",
            }
        )
        result.records += records
    old_keys = {k for g in groups for k in g["old"]}

    new_keys = {e["key"] for e in new_entries}

    def swap(snap: dict[str, Any]) -> dict[str, Any] | None:
        live = {f["key"] for f in snap["files"]}
        if new_keys <= live:
            # Swapped in already: this change again (update_catalog may take
            # its own version for a stale one) changes nothing. Deleting these
            # files as a lost race's would delete what the catalog reads.
            return None
        if not old_keys <= live:
            raise _Superseded()
        snap["files"] = [f for f in snap["files"] if f["key"] not in old_keys] + new_entries
        return snap

    try:
        swapped = update_catalog(store, table, swap, f"compaction {result.compaction_id}")
    except _Superseded:
        _superseded(store, table, result.compaction_id, groups)
    result.version = swapped.version
    for key in sorted(old_keys):
        store.delete(key)
    store.delete(compaction_key(table, result.compaction_id))
    result.groups = groups
    result.files_before = len(old_keys)
    result.files_after = len(groups)
    return result


class _Superseded(Exception):
    """The swap found an old file no longer live."""


class _Gone(Exception):
    """A file to merge is no longer in the store."""


def _superseded(
    store: Store, table: str, compaction_id: str, groups: list[dict[str, Any]]
) -> NoReturn:
    """Another compaction replaced some of these files first: this one's files
    and intent are garbage, removed now (not left for the next to "repair")."""
    for group in groups:
        store.delete(group["new"])
    store.delete(compaction_key(table, compaction_id))
    raise UserError(f"table {table}: another compaction replaced these files first; run it again")


def _merge(store: Store, old: list[str], new: str, schema: Any, codec: str) -> tuple[int, int]:
    """Write the records of ``old`` (read with ``schema``) as one file ``new``."""
    count = 0

    def records() -> Any:
        nonlocal count
        for key in old:
            try:
                opened = store.open(key)
            except KeyError:
                raise _Gone(key) from None
            with opened as f:
                # A file no reader can take is one line naming it, not a traceback.
                for record in read_records(f, key, schema):
                    count += 1
                    yield record

    with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as buf:
        fastavro.writer(buf, schema, records(), codec=codec)
        size = buf.tell()
        buf.seek(0)
        store.put(new, buf)  # type: ignore[arg-type]
    return count, size
