"""A finished run joins its table.

``finalize_run`` (``fanout.finalize``) calls two hooks:

1. :func:`expand_parts` before it writes the run's manifest: each committed
   output of a table job is a parts list (``fanout.tables.writer``); the manifest
   lists the Avro files those name instead, each with its partition, and adds
   ``table`` and ``partitions`` (files and records by partition);
2. :func:`join_table` after the manifest is written and before the run is
   marked finished: the run's files are added to the table's catalog in one
   atomic swap, which confirms the schema version they were written with
   (``fanout.tables.contract``); a run that wrote no file to its table gives
   its pending version back instead (``release_schema``). It is idempotent (a
   run adds only the files it has not added before), so a finalizer that dies
   between the two steps, and the one that takes over, or a replay that
   finalizes the run again, add each file once.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fanout.backends.base import Store
from fanout.tables.catalog import Catalog, update_catalog
from fanout.tables.contract import confirm_version

__all__ = [
    "PARTS_KIND",
    "PARTS_VERSION",
    "compact_run_partitions",
    "expand_parts",
    "join_table",
    "update_glue",
]

#: The ``kind`` a parts list carries (``fanout.tables.writer``), checked when read.
PARTS_KIND = "fanout.parts"
PARTS_VERSION = 1

log = logging.getLogger("fanout.tables")

#: Parts lists read at once when a run is finalized (one GET each on S3).
READ_THREADS = 8


def expand_parts(store: Store, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with every parts list replaced by the files it names (see
    the module docstring); unchanged for a run that wrote no table."""
    files = manifest["files"]
    is_parts = [f["key"].endswith(".json") and "/parts/" in f["key"] for f in files]
    if not any(is_parts):
        return manifest
    wanted = [f for f, p in zip(files, is_parts, strict=True) if p]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        lists = list(pool.map(lambda f: json.loads(store.get(f["key"])), wanted))
    expanded: list[dict[str, Any]] = [f for f, p in zip(files, is_parts, strict=True) if not p]
    tables = set()
    for entry, parts in zip(wanted, lists, strict=True):
        if parts.get("kind") != PARTS_KIND:
            raise ValueError(f"{entry['key']} is not a parts list")
        tables.add(parts["table"])
        for f in parts["files"]:
            expanded.append(
                {
                    "key": f["key"],
                    "records": f["records"],
                    "bytes": f["bytes"],
                    "chunk_id": entry["chunk_id"],
                    "seq": entry["seq"],
                    "partition": f["partition"],
                    "table": parts["table"],
                }
            )
    partitions: dict[str, dict[str, Any]] = defaultdict(lambda: {"files": [], "records": 0})
    for f in expanded:
        if "partition" in f:
            p = partitions[f["partition"]]
            p["files"].append(f["key"])
            p["records"] += f["records"]
    return {
        **manifest,
        "table": sorted(tables)[0] if len(tables) == 1 else sorted(tables),
        "files": expanded,
        "partitions": dict(sorted(partitions.items())),
    }


def join_table(store: Store, manifest: dict[str, Any]) -> list[Catalog]:
    """Add the run's table files to their table's catalog (once each); returns
    the catalog versions in force afterwards (none for a run with no table)."""
    run_id = manifest["run_id"]
    by_table: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in manifest["files"]:
        if "table" in f:
            by_table[f["table"]].append(f)
    out = []
    for table, files in sorted(by_table.items()):

        def change(snap: dict[str, Any], files: list[dict[str, Any]] = files) -> Any:
            # The version its files were written with now holds data: confirmed.
            confirmed = confirm_version(snap, manifest.get("schema"), manifest["job"], run_id)
            seen = set(snap["runs"].get(run_id, []))
            new = [f for f in files if f["key"] not in seen]
            if not new:
                return snap if confirmed else None
            snap["files"].extend(
                {
                    "key": f["key"],
                    "partition": f["partition"],
                    "records": f["records"],
                    "bytes": f["bytes"],
                    "run_id": run_id,
                }
                for f in new
            )
            snap["runs"][run_id] = sorted(seen | {f["key"] for f in new})
            return snap

        out.append(update_catalog(store, table, change, f"run {run_id}"))
    return out


def compact_run_partitions(store: Store, manifest: dict[str, Any]) -> int:
    """Compact each partition the run wrote to (``-S compact=true``), after it
    joined its table; returns how many files were replaced. A compaction that
    fails is logged, not raised: the run's files are committed either way, and
    ``fanout compact`` can be run later (it repairs what a crash left)."""
    # Imported here: fastavro is not loaded by a worker that never compacts.
    from fanout.tables.compact import compact

    replaced = 0
    for table, partition in sorted(
        {(f["table"], f["partition"]) for f in manifest["files"] if "table" in f}
    ):
        try:
            replaced += compact(store, table, partition).files_before
        except Exception:
            log.exception("run %s: compacting %s %s failed", manifest["run_id"], table, partition)
    return replaced


def update_glue(store: Store, catalogs: list[Catalog]) -> list[str]:
    """Create or update the Glue table of each catalog whose job asked for it
    (``glue_catalog=True``), when the store is S3; returns the tables updated.
    A Glue call that fails is logged, not raised: the run's files are committed
    either way, and ``fanout catalog TABLE`` can be run later."""
    bucket = getattr(store, "bucket", None)
    settings = getattr(store, "settings", None)
    wanted = [c for c in catalogs if c.data.get("glue")]
    if not wanted or bucket is None or settings is None:
        return []  # the local store: no Glue
    # Imported here: only a worker on AWS with such a table needs them.
    from fanout.backends.aws.clients import client
    from fanout.tables.glue import database_name, sync_glue_table

    done = []
    for catalog in wanted:
        try:
            sync_glue_table(client("glue", settings), catalog, bucket, database_name())
            done.append(catalog.table)
        except Exception:
            log.exception("table %s: updating its Glue table failed", catalog.table)
    return done
