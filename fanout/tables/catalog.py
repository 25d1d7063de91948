"""A table's catalog: numbered, immutable versions, swapped in atomically.

Version N of table T is the object ``tables/T/_catalog/v<N>.json`` (see
:mod:`fanout.backends.keys`). Each version is a whole snapshot: the table's
partitioning, its schema history and its **live files** (each with its
partition, record and byte counts and the run that wrote it), plus, per run, the
files that run ever added (so a run committed twice, or replayed, adds only what
is new, and never re-adds a file that compaction has since replaced).

A change is made by writing version N+1 with the store's write-if-absent
(``If-None-Match: *`` on S3, ``link()`` locally): of two writers that read
version N, exactly one writes N+1; the other reads N+1 and applies its change
again (:func:`update_catalog`). Readers take the highest version. gc prunes
old versions, which makes their numbers free again: a writer that read N, and
wrote N+1 only after ten more changes and a gc had pruned the first N+1, would
win a version no reader takes. Each version names the one it was made from
(``id``, ``parent``), and a writer that finds a higher version not made from
its own writes its change again on the head (:func:`_superseded`). That check
can take a writer's own version for a stale one (it paused after its write
while ten more changes and a gc went by), so every change must be one that,
made again on a snapshot that has it, changes nothing. So every
change — a run joining the table, a schema version, a compaction's swap — is
one atomic step, and a crash before it leaves the previous version in force.

Cost: a version holds every live file and each run's list of the keys it added:
measured ~280 bytes a file (200 files: a 56.7 kB version), so a table of
100,000 files writes ~28 MB a change. Compaction keeps the live files few; the
runs' key lists are not compacted (a known limit: see the README).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fanout.backends.base import Store
from fanout.backends.keys import table_catalog_key, table_catalog_prefix
from fanout.errors import UserError
from fanout.tables.spec import TABLE_NAME, escape_partition

__all__ = ["Catalog", "CatalogConflict", "live_files", "read_catalog", "update_catalog"]

FORMAT = "fanout.table"
#: Attempts at writing the next version when other writers keep winning.
SWAP_ATTEMPTS = 50


class CatalogConflict(RuntimeError):
    """Other writers won the next version :data:`SWAP_ATTEMPTS` times in a row."""


@dataclass(frozen=True)
class Catalog:
    """One version of a table's catalog."""

    table: str
    version: int
    data: dict[str, Any]

    @property
    def files(self) -> list[dict[str, Any]]:
        """The live files: what the table holds."""
        files: list[dict[str, Any]] = self.data["files"]
        return files

    @property
    def schemas(self) -> list[dict[str, Any]]:
        """The schema history, oldest first, pending versions included."""
        schemas: list[dict[str, Any]] = self.data["schemas"]
        return schemas

    @property
    def schema(self) -> dict[str, Any] | None:
        """The table's schema: the last version files were written with (a
        pending one, which no run has written with yet, is not; see
        ``fanout.tables.contract``), as its history entry; None before any."""
        runs = self.data["runs"]
        # (held by a run with files in the table: one an older fanout joined,
        # which did not confirm it)
        return next(
            (
                e
                for e in reversed(self.schemas)
                if "pending" not in e or any(r in runs for r in e["pending"])
            ),
            None,
        )


def empty_snapshot(table: str) -> dict[str, Any]:
    """The contents of a table before its first version."""
    return {
        "format": FORMAT,
        "table": table,
        "partitioning": None,
        "schemas": [],
        "files": [],
        "runs": {},
    }


def editable_snapshot(current: Catalog | None, table: str) -> dict[str, Any]:
    """A copy of ``current``'s contents for a change to modify (the empty
    table's, before its first version)."""
    return json.loads(json.dumps(current.data)) if current else empty_snapshot(table)


def versions(store: Store, table: str) -> list[int]:
    """The catalog's versions present in the store, ascending."""
    out = []
    for key in store.list(table_catalog_prefix(table)):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("v") and name.endswith(".json") and name[1:-5].isdigit():
            out.append(int(name[1:-5]))
    return sorted(out)


def read_catalog(store: Store, table: str) -> Catalog | None:
    """The table's current catalog, None if the table has none yet."""
    for _ in range(5):
        found = versions(store, table)
        if not found:
            return None
        try:
            raw = store.get(table_catalog_key(table, found[-1]))
        except KeyError:
            continue  # pruned by gc between the listing and the read: list again
        try:
            data = json.loads(raw)
        except ValueError:  # (UnicodeDecodeError too)
            data = None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"table {table}: catalog version {found[-1]} is not a fanout catalog")
        return Catalog(table, found[-1], data)
    raise CatalogConflict(f"table {table}: its catalog keeps changing under the reader")


def check_table_name(table: str) -> None:
    """:class:`UserError` for a name no table can have (``..``, ``a/b``, ""):
    such a name is not looked up in the store at all."""
    if not TABLE_NAME.fullmatch(table):
        raise UserError(f"{table!r} is no table name: use letters, digits, '.', '_' or '-'")


def require_catalog(store: Store, table: str) -> Catalog:
    """The table's current catalog; :class:`UserError` if there is no such table
    (nor could be: a name like ``..`` is not looked up in the store at all)."""
    check_table_name(table)
    catalog = read_catalog(store, table)
    if catalog is None:
        raise UserError(f"unknown table {table!r} (no catalog under {table_catalog_prefix(table)})")
    return catalog


def update_catalog(
    store: Store,
    table: str,
    change: Callable[[dict[str, Any]], dict[str, Any] | None],
    operation: str,
) -> Catalog:
    """Apply ``change`` to the current snapshot and swap the result in as the next
    version. ``change`` gets a copy it may modify and returns the new snapshot,
    or None for "nothing to change" (the current catalog is returned). It may be
    called several times (once per lost race), so it must only compute, and
    made again on a snapshot that has its change already it must return None.

    Raises:
        CatalogConflict: other writers won :data:`SWAP_ATTEMPTS` times in a row.
    """
    for attempt in range(SWAP_ATTEMPTS):
        current = read_catalog(store, table)
        new = change(editable_snapshot(current, table))
        if new is None:
            if current is not None:
                return current
            return Catalog(table, 0, empty_snapshot(table))
        version = (current.version if current else 0) + 1
        new = {
            **new,
            "version": version,
            "operation": operation,
            "updated_at": time.time(),
            "id": secrets.token_hex(8),
            "parent": current.data.get("id") if current else None,
        }
        body = json.dumps(new, separators=(",", ":")).encode()
        key = table_catalog_key(table, version)
        if store.put(key, body, if_absent=True):
            if not _superseded(store, table, version, new["id"]):
                return Catalog(table, version, new)
            store.delete(key)  # below the head: no reader takes it; write the change again
            continue
        time.sleep(min(0.5, 0.01 * 2**attempt))  # another writer won: read it, retry
    raise CatalogConflict(f"table {table}: could not swap the catalog in {SWAP_ATTEMPTS} tries")


def _superseded(store: Store, table: str, version: int, vid: str) -> bool:
    """Whether ``version``, just written (as ``vid``), came after gc had pruned
    an earlier version of that number: then higher versions were there before
    it, and the next one was not made from it. Pruning keeps the highest
    versions, so with none higher it is the head. The next one gone too means
    gc pruned it, which it does only with ten versions above it: written in
    the moment since ours, if ours were the real one, so it is taken for the
    pruned case."""
    if not any(v > version for v in versions(store, table)):
        return False
    try:
        following = json.loads(store.get(table_catalog_key(table, version + 1)))
    except KeyError:
        return True
    # Made from ours: it names ours as its parent; or it was written by an older
    # fanout, which copied the snapshot it read, our id with it (or named none).
    return vid not in (following.get("parent", vid), following.get("id"))


def live_files(catalog: Catalog, partition: str | None = None) -> list[dict[str, Any]]:
    """The live files of the table (or of one partition), sorted by key. The
    partition may be named as stored (``site=a%2Fb``) or by its value as
    written (``site=a/b``, ``site=ünï``), which is escaped to find it."""
    files = catalog.files
    if partition is not None:
        named = {partition, _escaped(partition)}
        files = [f for f in files if f["partition"] in named]
    return sorted(files, key=lambda f: f["key"])


def _escaped(partition: str) -> str:
    """``column=value`` with the value escaped as partition names are."""
    column, sep, value = partition.partition("=")
    return f"{column}{sep}{escape_partition(value)}" if sep and value else partition
