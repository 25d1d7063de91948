"""The table commands: ``tables``, ``schema``, ``read``, ``compact``, ``gc``, ``catalog``.

Registered by :mod:`fanout.cli` (``TABLE_COMMANDS``); like the other command
modules this one imports :mod:`fanout.cli_common`, never ``fanout.cli``.
"""

from __future__ import annotations

import json
from typing import Any

import click

from fanout.backends.base import Store
from fanout.cli_common import FiniteFloat, bulk_stdout, group_backend, utc_time
from fanout.errors import UserError
from fanout.tables.catalog import Catalog, live_files, read_catalog, require_catalog
from fanout.tables.gc import collect, parse_age, table_names

__all__ = ["TABLE_COMMANDS", "register_tables"]


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def tables(ctx: click.Context, as_json: bool) -> None:
    """The tables in the store: partitions, files, records, schema version."""
    store = group_backend(ctx).store
    rows = []
    for name in table_names(store):
        catalog = read_catalog(store, name)
        if catalog is None:
            continue
        rows.append(
            {
                "table": name,
                "version": catalog.version,
                "partitions": len({f["partition"] for f in catalog.files}),
                "files": len(catalog.files),
                "records": sum(f["records"] for f in catalog.files),
                "bytes": sum(f["bytes"] for f in catalog.files),
                "schema_version": catalog.schema["version"] if catalog.schema else 0,
                "runs": len(catalog.data["runs"]),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:  # to a person, as `fanout runs` says "no runs yet"
        click.echo("no tables yet (a job with a table spec writes one)", err=True)
    for r in rows:
        click.echo(
            f"{r['table']}: {r['partitions']} partitions, {r['files']} files,"
            f" {r['records']:,} records, {r['bytes']:,} bytes from {r['runs']} runs"
            f" (schema v{r['schema_version']}, catalog v{r['version']})"
        )


def _type_name(kind: Any) -> str:
    if isinstance(kind, list):
        return "|".join(_type_name(k) for k in kind)
    if isinstance(kind, dict):
        logical = kind.get("logicalType")
        base = str(kind.get("type"))
        if base in ("record", "enum", "fixed"):
            base = str(kind.get("name"))
        return f"{base}({logical})" if logical else base
    return str(kind)


@click.command()
@click.argument("table")
@click.option("--json", "as_json", is_flag=True, help="The full schemas, as JSON.")
@click.pass_context
def schema(ctx: click.Context, table: str, as_json: bool) -> None:
    """The schema history of TABLE, oldest first (the last not pending is current)."""
    catalog = require_catalog(group_backend(ctx).store, table)
    if as_json:
        click.echo(json.dumps(catalog.schemas, indent=1))
        return
    for entry in catalog.schemas:
        fields = ", ".join(
            f"{f['name']}:{_type_name(f['type'])}"
            + (f"={json.dumps(f['default'])}" if "default" in f else "")
            for f in entry["schema"].get("fields", [])
        )
        pending = entry.get("pending")
        held = f"  (pending: no file yet; held by {', '.join(pending)})" if pending else ""
        click.echo(
            f"v{entry['version']}  {utc_time(entry['at'])}  job {entry['job']}  {fields}{held}"
        )


@click.command()
@click.argument("table")
@click.option("--partition", help="Only this partition (e.g. dt=2024-01-01).")
@click.option("-n", "--limit", type=click.IntRange(min=0), default=None)
@click.pass_context
def read(ctx: click.Context, table: str, partition: str | None, limit: int | None) -> None:
    """The records of TABLE as JSON lines, read through its catalog (each once)."""
    import fastavro

    from fanout.avro import read_records, to_json_safe

    store = group_backend(ctx).store
    catalog = require_catalog(store, table)
    files = live_files(catalog, partition)
    if partition is not None and not files:  # a typo is not an empty partition
        raise UserError(f"table {table} has no partition {partition!r}")
    if catalog.schema is None:  # only pending versions: no file yet
        return
    reader_schema = fastavro.parse_schema(catalog.schema["schema"])
    out = bulk_stdout()
    printed = 0
    for f in files:
        try:
            fo = store.open(f["key"])
        except KeyError:
            raise UserError(_gone(store, catalog, f["key"], printed)) from None
        with fo:
            for record in read_records(fo, f["key"], reader_schema):
                if limit is not None and printed >= limit:
                    return
                row = to_json_safe(record)
                out.write(json.dumps(row, separators=(",", ":")) + "\n")
                printed += 1


@click.command()
@click.argument("table")
@click.option("--partition", help="Only this partition (e.g. dt=2024-01-01).")
@click.option(
    "--target-mb",
    type=FiniteFloat(min=0.001, max=1024.0 * 1024),
    default=128.0,
    show_default=True,
    help="Size of the files to make (compressed).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def compact(
    ctx: click.Context, table: str, partition: str | None, target_mb: float, as_json: bool
) -> None:
    """Merge TABLE's small committed files into files near the target size (crash-safe)."""
    from fanout.tables.compact import compact as run_compaction

    store = group_backend(ctx).store
    result = run_compaction(store, table, partition, int(target_mb * 1024 * 1024))
    if as_json:
        click.echo(json.dumps(result.__dict__, indent=1))
        return
    if result.repaired:
        click.echo(f"repaired an interrupted compaction: {len(result.repaired)} objects removed")
    if not result.groups:
        click.echo(f"table {table}: nothing to compact")
        return
    click.echo(
        f"table {table}: {result.files_before} files -> {result.files_after}"
        f" ({result.records:,} records; catalog v{result.version})"
    )


@click.command()
@click.option("--older-than", help="Also remove whole runs that finished longer ago (e.g. 7d).")
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def gc(ctx: click.Context, older_than: str | None, dry_run: bool, as_json: bool) -> None:
    """Remove uncommitted attempt files, finished runs' payloads, old catalog
    versions and (with --older-than) old runs; never a committed table file."""
    try:
        age = parse_age(older_than) if older_than is not None else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    backend = group_backend(ctx)
    found = collect(backend.store, backend.ledger, age, dry_run)
    if as_json:
        click.echo(json.dumps([{"key": g.key, "reason": g.reason} for g in found], indent=1))
        return
    verb = "would remove" if dry_run else "removed"
    for g in found:
        click.echo(f"{verb} {g.key} ({g.reason})")
    click.echo(f"{verb} {len(found)} objects")


@click.command()
@click.argument("table")
@click.option("--database", help="Glue database (default: fanout_<stage>).")
@click.pass_context
def catalog(ctx: click.Context, table: str, database: str | None) -> None:
    """Create or update TABLE in the AWS Glue catalog (Avro SerDe, partition
    projection), so Athena can query it. Needs the AWS backend."""
    from fanout.tables.glue import database_name, sync_glue_table

    backend = group_backend(ctx)
    if backend.name != "aws":
        raise UserError("fanout catalog needs the AWS backend (--backend aws): Glue reads S3")
    from fanout.backends.aws.clients import client

    store: Any = backend.store
    current = require_catalog(store, table)
    database = database or database_name()
    done = sync_glue_table(client("glue", store.settings), current, store.bucket, database)
    extra = f", {done['partitions']} partitions registered" if done["partitions"] else ""
    click.echo(f"glue table {done['database']}.{done['table']} {done['action']}{extra}")


TABLE_COMMANDS = [tables, schema, read, compact, gc, catalog]


def register_tables(group: click.Group) -> None:
    """Add the table commands to ``group`` (the ``fanout`` command)."""
    for command in TABLE_COMMANDS:
        group.add_command(command)


def _gone(store: Store, catalog: Catalog, key: str, printed: int) -> str:
    """Why a file of the catalog read at the start is not in the store: a
    compaction swapped it out and deleted it meanwhile, or it was removed by hand."""
    now = read_catalog(store, catalog.table)
    if now is not None and now.version != catalog.version:
        return (
            f"table {catalog.table} changed while it was read (catalog version"
            f" {catalog.version} to {now.version}: {now.data.get('operation', 'an update')}),"
            f" after {printed} records: read it again"
        )
    return f"table {catalog.table}: its file {key} is in the catalog but not in the store"
