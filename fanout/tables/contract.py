"""The schema contract of a table, checked when a run is submitted.

Every file a table holds must be readable with the table's current schema.
:func:`check_contract` is called by ``coordinator.submit`` before the run is
recorded, so a change is refused before anything is written:

- the job's schema is the table's current one: nothing to do;
- ``schema_evolution="freeze"``: any change is refused;
- ``"evolve"``: the job's schema must read the data of **every** schema version
  in the table's history (files of any of them may still be live), under
  Avro's resolution rules (:mod:`fanout.tables.compat`); if it does, it is
  appended to the history, in the same atomic catalog swap as the check, so two
  submits racing with different schemas are checked one after the other.

A version a submit appends is **pending** (``"pending": [run ids]``) until a
run joins the table with files of it (:func:`fanout.tables.commit.join_table`
confirms it). Readers and compaction take the last *confirmed* version as the
table's schema (:attr:`~fanout.tables.catalog.Catalog.schema`), and a run that
ends without a file in the table gives its pending version back
(:func:`release_schema`): a submitted run that was cancelled or failed must not
change the table's schema for good (a version dropping a column would hide it
from reads, compaction would then drop its values, and the table's own job
could no longer add it back). A new schema is still checked against pending
versions too, since their runs may yet write files with them. A replay holds
its run's version again (:func:`hold_for_replay`): the entry of its schema, or
one placed before the table's current schema, never after it, so that the
table does not go back to an older schema for it.

A refusal is a :class:`UserError`: one line naming the table, the field and the
rule, exit code 2 at the CLI.
"""

from __future__ import annotations

import time
from typing import Any

from fanout.backends.base import Store
from fanout.errors import UserError
from fanout.schema_diff import same_schema, schema_change
from fanout.tables.catalog import editable_snapshot, read_catalog, update_catalog
from fanout.tables.compat import why_unreadable
from fanout.tables.spec import TableSpec, field_logical_type

__all__ = [
    "check_contract",
    "confirm_version",
    "hold_for_replay",
    "hold_for_run",
    "release_schema",
    "same_schema",
    "schema_change",
]


def check_contract(
    store: Store,
    spec: TableSpec,
    schema_raw: Any,
    job_name: str,
    *,
    run_id: str | None = None,
    dry_run: bool = False,
) -> int:
    """Check the job's schema against the table's and record it if it is new, as
    pending for ``run_id`` (see the module docstring); returns the table's schema
    version the run writes with. ``dry_run`` (``fanout validate``): check only,
    record nothing.

    Raises:
        UserError: the change breaks the contract, or the job does not fit the
            table (no schema, partitioned differently, no partition field).
    """
    table = spec.table
    if not isinstance(schema_raw, dict):
        raise UserError(f"job {job_name} writes table {table} but has no schema")
    if spec.field is not None and field_logical_type(schema_raw, spec.field) is False:
        raise UserError(
            f"job {job_name}: partition_by field {spec.field!r} is not a field of its schema"
        )
    version = 0

    def change(snap: dict[str, Any]) -> dict[str, Any] | None:
        nonlocal version
        partitioning = spec.describe()
        if snap["partitioning"] is not None and snap["partitioning"] != partitioning:
            have, want = _show(snap["partitioning"]), _show(partitioning)
            raise UserError(f"table {table} is partitioned by {have}; job {job_name} by {want}")
        history = snap["schemas"]
        glue = bool(snap.get("glue")) or spec.glue  # once asked for, kept up to date
        if history and same_schema(history[-1]["schema"], schema_raw):
            last = history[-1]
            version = last["version"]
            # A pending version is held by each run that may write with it.
            joins = "pending" in last and run_id is not None and run_id not in last["pending"]
            if joins:
                last["pending"].append(run_id)
            if glue == bool(snap.get("glue")) and not joins:
                return None
            snap["glue"] = glue
            return snap
        if history and spec.evolution == "freeze":
            what = schema_change(history[-1]["schema"], schema_raw)
            raise UserError(
                f"table {table}: schema change refused: {what}"
                " (schema_evolution='freeze' allows none)"
            )
        for old in reversed(history):
            problem = why_unreadable(schema_raw, old["schema"])
            if problem is not None:
                raise UserError(
                    f"table {table}: schema change refused: {problem}"
                    f" (the new schema must read files written with version {old['version']})"
                )
        entry = _new_entry(history, schema_raw, job_name, run_id)
        version = entry["version"]
        history.append(entry)
        snap["partitioning"] = partitioning
        snap["glue"] = glue
        return snap

    if dry_run:
        change(editable_snapshot(read_catalog(store, table), table))
        return version
    update_catalog(store, table, change, f"schema of job {job_name}")
    return version


def _new_entry(
    history: list[dict[str, Any]], schema_raw: Any, job_name: str, run_id: str | None
) -> dict[str, Any]:
    """A new version of ``schema_raw``, pending for ``run_id`` (if any). Its
    number is one above the highest: a version given back leaves a gap amid the
    history, or frees the last number."""
    version = max((e["version"] for e in history), default=0) + 1
    entry = {"version": version, "schema": schema_raw, "job": job_name, "at": time.time()}
    return entry if run_id is None else {**entry, "pending": [run_id]}


def _let_go(snap: dict[str, Any], run_id: str, keep: dict[str, Any] | None = None) -> bool:
    """``run_id`` holds no pending version but ``keep`` any more, and the
    versions no run holds go (one amid the history too: no file was written
    with it, so it only held later schemas to reading it). Whether ``snap``
    changed."""
    history = snap["schemas"]
    held = False
    for entry in history:
        if entry is not keep and run_id in entry.get("pending", ()):
            entry["pending"].remove(run_id)
            held = True
    snap["schemas"] = [e for e in history if e.get("pending") != []]
    return held or len(snap["schemas"]) != len(history)


def release_schema(store: Store, table: str, run_id: str) -> None:
    """``run_id`` ended without a file in ``table``: it no longer holds a
    pending version, and the pending versions no run holds any more are taken
    back (see the module docstring and :func:`_let_go`)."""

    def change(snap: dict[str, Any]) -> dict[str, Any] | None:
        if not _let_go(snap, run_id):
            return None
        if not snap["schemas"]:
            snap["partitioning"] = None  # (no version: no file either) a new start
        return snap

    update_catalog(store, table, change, f"run {run_id} ended without files")


def confirm_version(snap: dict[str, Any], schema_raw: Any, job_name: str, run_id: str) -> bool:
    """``run_id`` joins the table with files of ``schema_raw``: the version it
    wrote with is confirmed (no longer pending) and the run holds no other, in
    ``snap``; returns whether ``snap`` changed. A version given back meanwhile
    (a replay raced with the run's end) is held again first (:func:`hold_for_run`).

    Raises:
        UserError: the table can no longer take files of that schema.
    """
    history = snap["schemas"]
    changed = False
    # The version it holds; else (it was submitted with the table's schema) the
    # confirmed one of its schema, not another run's pending one of the same
    # schema: its files must not confirm a version that run may give back.
    entry = _held_by(history, run_id) or _last_with(history, schema_raw, confirmed=True)
    if entry is None:
        changed = hold_for_run(snap, schema_raw, job_name, run_id)
        entry = _held_by(history, run_id)
        assert entry is not None  # (held just now)
    changed = _let_go(snap, run_id, keep=entry) or changed
    if "pending" in entry:
        del entry["pending"]
        changed = True
    return changed


def hold_for_run(snap: dict[str, Any], schema_raw: Any, job_name: str, run_id: str) -> bool:
    """A run whose files are (or will be) of ``schema_raw``, though the table's
    schema may have moved on since its submit (a replay; a join whose version
    was given back), holds the version of its schema, in ``snap``: the entry of
    that schema if the history has one (a holder of it while pending), else a
    new pending one: placed before the table's current schema if that can read
    the run's files, so that a replay does not take the table back to an older
    schema; else last, as its submit placed it, if it can read every version's.
    Returns whether ``snap`` changed.

    Raises:
        UserError: neither place will do: the table can no longer take its files.
    """
    history = snap["schemas"]
    if _last_with(history, schema_raw, confirmed=True) is not None:
        return False  # files of it are readable for good: nothing to hold
    entry = _last_with(history, schema_raw)
    if entry is not None:
        if run_id in entry["pending"]:
            return False
        entry["pending"].append(run_id)
        return True
    confirmed = [i for i, e in enumerate(history) if "pending" not in e]
    # Before the current schema if it (and what came after) can read the run's
    # files; else last, as at its submit, if it can read every version's.
    at = confirmed[-1] if confirmed else len(history)
    if any(why_unreadable(e["schema"], schema_raw) for e in history[at:]):
        at = len(history)
    for old in reversed(history[:at]) if at == len(history) else ():
        problem = why_unreadable(schema_raw, old["schema"])
        if problem is not None:
            raise UserError(
                f"table {snap['table']}: run {run_id}'s schema is no longer one the table can"
                f" take: {problem} (it must read files written with version {old['version']})"
            )
    history.insert(at, _new_entry(history, schema_raw, job_name, run_id))
    return True


def hold_for_replay(store: Store, spec: TableSpec, schema_raw: Any, run: str, job: str) -> bool:
    """:func:`hold_for_run` for a replay of ``run``, as one catalog change;
    returns whether it took a hold (to undo should the replay not go on).
    :class:`UserError` (one line) if the table can no longer take its files."""
    took = False

    def change(snap: dict[str, Any]) -> dict[str, Any] | None:
        nonlocal took
        if not snap["schemas"] and snap["partitioning"] is None:
            snap["partitioning"] = spec.describe()  # (every version given back)
        elif snap["partitioning"] != spec.describe():
            have, want = _show(snap["partitioning"]), _show(spec.describe())
            raise UserError(f"table {spec.table} is partitioned by {have}; run {run} by {want}")
        took = hold_for_run(snap, schema_raw, job, run)
        return snap if took else None

    update_catalog(store, spec.table, change, f"schema of replayed run {run}")
    return took


def _last_with(
    history: list[dict[str, Any]], schema_raw: Any, *, confirmed: bool = False
) -> dict[str, Any] | None:
    """The latest history entry of ``schema_raw`` (a confirmed one), or None."""
    return next(
        (
            e
            for e in reversed(history)
            if same_schema(e["schema"], schema_raw) and not (confirmed and "pending" in e)
        ),
        None,
    )


def _held_by(history: list[dict[str, Any]], run_id: str) -> dict[str, Any] | None:
    """The pending entry ``run_id`` holds, or None."""
    return next((e for e in reversed(history) if run_id in e.get("pending", ())), None)


def _show(partitioning: dict[str, Any]) -> str:
    if not partitioning.get("field"):
        return "nothing"
    granularity = partitioning.get("granularity")
    return f"{partitioning['field']}:{granularity}" if granularity else str(partitioning["field"])
