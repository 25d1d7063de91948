"""A table's schema changes when a run writes files with it, not when one is
submitted: a submitted run that ends without a file gives its schema version
back (``fanout.tables.contract``), and readers and compaction use the last
version files were written with.

Before, a submit appended its schema for good. A job submitted with a column
dropped and then cancelled hid that column from ``fanout read``, the next
compaction rewrote every file without its values, and the table's own job
could no longer submit (its column "added without a default").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from support.cli import assert_user_error, cli, ok

FIELDS = {
    "item": {"name": "item", "type": "string"},
    "n": {"name": "n", "type": "long"},  # no default: a schema without it cannot add it back
}

JOB = """
from fanout import Job, PermanentError

job = Job("meters", schema={schema}, table="meters")


@job.plan
def plan(params, ctx):
    for c in range(int(params.get("chunks", 1))):
        yield {{"c": c}}


@job.process
def process(chunk, ctx):
    if {fail}:
        raise PermanentError("the bug of the day")
    for i in range(3 * chunk["c"], 3 * chunk["c"] + 3):
        ctx.emit({record})
"""


def job_file(tmp: Path, name: str, fields: list[str], fail: bool | str = False) -> str:
    """A job writing ``fields`` (3 records a chunk, ``-p chunks=N``) that fails
    where ``fail`` (True, or an expression of ``chunk``) is true."""
    schema = {"type": "record", "name": "reading", "fields": [FIELDS[f] for f in fields]}
    values = {"item": f"'{name}-' + str(i)", "n": "i"}
    # (the other fields are left to their defaults)
    record = "{" + ", ".join(f"{f!r}: {values[f]}" for f in fields if f in values) + "}"
    path = tmp / f"{name}.py"
    path.write_text(JOB.format(schema=json.dumps(schema), record=record, fail=fail))
    return str(path)


def rows(home: Path) -> list[dict[str, object]]:
    return sorted(
        (json.loads(line) for line in ok(cli(home, "read", "meters")).splitlines()),
        key=lambda r: str(r["item"]),
    )


#: Fields later jobs add (each with a default, so older files read).
UNIT_AS_STRING = {"name": "unit", "type": "string", "default": "kWh"}
SITE = {"name": "site", "type": "string", "default": "x"}


def table_of_v1(tmp_path: Path) -> Path:
    """A home whose table ``meters`` holds one run of ``item, n`` (v1)."""
    home = tmp_path / "home"
    ok(cli(home, "run", job_file(tmp_path, "v1", ["item", "n"]), "-w", "1"))
    return home


def latest_run(home: Path) -> str:
    return str(json.loads(ok(cli(home, "runs", "--json")).splitlines()[0])["run_id"])


def state(home: Path, run_id: str) -> str:
    return str(json.loads(ok(cli(home, "status", run_id, "--json")))["state"])


def versions(home: Path) -> list[str]:
    return [line.split()[0] for line in ok(cli(home, "schema", "meters")).splitlines()]


def test_a_cancelled_run_leaves_the_tables_schema_and_its_columns_as_they_were(
    tmp_path: Path,
) -> None:
    home = table_of_v1(tmp_path)
    before = rows(home)
    assert [r["n"] for r in before] == [0, 1, 2]

    # A job that drops column n, submitted (checked, its version pending), then cancelled.
    dropped = job_file(tmp_path, "v2", ["item"])
    run_id = ok(cli(home, "submit", dropped)).strip()
    assert "pending" in ok(cli(home, "schema", "meters")).splitlines()[-1]
    ok(cli(home, "cancel", run_id))
    ok(cli(home, "worker", "--until-idle", "-w", "1"))
    assert state(home, run_id) == "cancelled"

    assert versions(home) == ["v1"]
    assert rows(home) == before  # column n still read
    ok(cli(home, "compact", "meters", "--target-mb", "1"))
    assert rows(home) == before  # and its values still in the compacted file
    # The table's own job still submits, and runs.
    ok(cli(home, "run", job_file(tmp_path, "v1", ["item", "n"]), "-w", "1"))
    assert len(rows(home)) == 6


def test_a_failed_run_gives_its_version_back_and_a_replay_after_the_fix_takes_it_again(
    tmp_path: Path,
) -> None:
    home = table_of_v1(tmp_path)
    broken = job_file(tmp_path, "v2", ["item"], fail=True)
    failed = cli(home, "run", broken, "-w", "1")
    assert failed.exit_code == 1, failed.output
    assert versions(home) == ["v1"]
    run_id = latest_run(home)

    # While the failed run holds nothing, another job's schema may not be checked
    # against it; its replay, after the fix, registers v2 again and writes with it.
    job_file(tmp_path, "v2", ["item"])  # the fix, in the same file
    ok(cli(home, "replay", run_id))
    ok(cli(home, "worker", "--until-idle", "-w", "1"))
    assert state(home, run_id) == "succeeded"
    lines = ok(cli(home, "schema", "meters")).splitlines()
    assert [line.split()[0] for line in lines] == ["v1", "v2"] and "pending" not in lines[-1]
    assert sorted(r["item"] for r in rows(home)) == [
        *(f"v1-{i}" for i in range(3)),
        *(f"v2-{i}" for i in range(3)),
    ]
    assert all("n" not in r for r in rows(home))  # read with v2, which has no n


def test_a_replay_the_table_now_refuses_is_one_line_and_reopens_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = table_of_v1(tmp_path)
    # A job adding `unit` as a string fails; then another adds it as a long, and
    # writes: the first one's schema can no longer read the table.
    monkeypatch.setitem(FIELDS, "unit", UNIT_AS_STRING)
    broken = job_file(tmp_path, "strings", ["item", "n", "unit"], fail=True)
    assert cli(home, "run", broken, "-w", "1").exit_code == 1
    run_id = latest_run(home)
    monkeypatch.setitem(FIELDS, "unit", {"name": "unit", "type": "long", "default": 0})
    ok(cli(home, "run", job_file(tmp_path, "longs", ["item", "n", "unit"]), "-w", "1"))
    assert versions(home) == ["v1", "v2"]

    monkeypatch.setitem(FIELDS, "unit", UNIT_AS_STRING)
    job_file(tmp_path, "strings", ["item", "n", "unit"])  # "fixed"
    assert_user_error(
        cli(home, "replay", run_id), f"run {run_id}'s schema is no longer one the table", "'unit'"
    )
    assert state(home, run_id) == "failed"
    assert versions(home) == ["v1", "v2"]


def test_a_version_given_back_amid_the_history_no_longer_binds_later_schemas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = table_of_v1(tmp_path)
    monkeypatch.setitem(FIELDS, "unit", UNIT_AS_STRING)
    monkeypatch.setitem(FIELDS, "site", SITE)
    with_unit = ok(cli(home, "submit", job_file(tmp_path, "unit", ["item", "n", "unit"])))
    ok(cli(home, "submit", job_file(tmp_path, "site", ["item", "n", "site"])))
    ok(cli(home, "cancel", with_unit.strip()))
    ok(cli(home, "worker", "--until-idle", "-w", "1"))
    # The unit version is gone, though a version came after it: a schema with
    # unit as a long, which could not read strings, is accepted now.
    monkeypatch.setitem(FIELDS, "unit", {"name": "unit", "type": "long", "default": 0})
    ok(cli(home, "submit", job_file(tmp_path, "both", ["item", "n", "site", "unit"])))
    assert versions(home) == ["v1", "v3", "v4"]


def test_a_replay_of_an_older_run_does_not_take_the_table_back_to_its_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A replay appended its run's schema as the table's newest version: the
    # column a later job added vanished from reads, and a compaction then
    # dropped its values (the review's and a black-box helper's find).
    home = tmp_path / "home"
    old = job_file(tmp_path, "old", ["item", "n"], fail="chunk['c'] == 1")
    assert cli(home, "run", old, "-p", "chunks=2", "-w", "1").exit_code == 1  # 3 records in
    run_id = latest_run(home)
    monkeypatch.setitem(FIELDS, "c", {"name": "c", "type": "string", "default": "dflt"})
    ok(cli(home, "run", job_file(tmp_path, "new", ["item", "n", "c"]), "-w", "1"))

    job_file(tmp_path, "old", ["item", "n"])  # the fix
    ok(cli(home, "replay", run_id))
    ok(cli(home, "worker", "--until-idle", "-w", "1"))
    assert state(home, run_id) == "succeeded"
    assert versions(home) == ["v1", "v2"]
    ok(cli(home, "compact", "meters", "--target-mb", "1"))
    got = {str(r["item"]): r.get("c") for r in rows(home)}
    assert got == {
        **{f"old-{i}": "dflt" for i in range(6)},
        **{f"new-{i}": "dflt" for i in range(3)},
    }


def test_files_of_the_tables_schema_do_not_confirm_another_runs_pending_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run submitted with the table's (confirmed) schema confirmed, at its
    # join, a later run's pending version of that same schema; that run then
    # failed, and the table had gone back to it for good (a helper's find).
    home = tmp_path / "home"
    ok(cli(home, "run", job_file(tmp_path, "x", ["item", "n"]), "-w", "1"))
    first = ok(cli(home, "submit", job_file(tmp_path, "x", ["item", "n"]))).strip()
    monkeypatch.setitem(FIELDS, "c", {"name": "c", "type": "string", "default": "dflt"})
    ok(cli(home, "run", job_file(tmp_path, "y", ["item", "n", "c"]), "-w", "1"))
    ok(cli(home, "submit", job_file(tmp_path, "failing", ["item", "n"], fail=True)))
    assert "pending" in ok(cli(home, "schema", "meters")).splitlines()[-1]  # v3, as x
    ok(cli(home, "worker", "--until-idle", "-w", "1"))
    assert state(home, first) == "succeeded"
    assert versions(home) == ["v1", "v2"]
    assert all("c" in r for r in rows(home)) and len(rows(home)) == 9


def test_a_run_its_table_can_no_longer_take_ends_failed_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its join raised in the finalizer, at every try: the run stayed
    # "finalizing" for good, its files never joined (review's find). Here its
    # hold is lost (as when a replay raced the run's end) and an incompatible
    # version comes meanwhile.
    from fanout.backends import open_backend
    from fanout.tables.catalog import update_catalog

    home = tmp_path / "home"
    ok(cli(home, "run", job_file(tmp_path, "x", ["item", "n"]), "-w", "1"))
    monkeypatch.setitem(FIELDS, "unit", UNIT_AS_STRING)
    run_id = ok(cli(home, "submit", job_file(tmp_path, "strings", ["item", "n", "unit"]))).strip()
    longs = {"name": "unit", "type": "long", "default": 0}
    fields = [FIELDS["item"], FIELDS["n"], longs]
    incompatible = {"type": "record", "name": "reading", "fields": fields}

    def lose_the_hold(snap: dict[str, Any]) -> dict[str, Any]:
        snap["schemas"] = [e for e in snap["schemas"] if "pending" not in e]
        snap["schemas"].append({"version": 9, "schema": incompatible, "job": "x", "at": 0.0})
        return snap

    backend = open_backend("local", home=home)
    try:
        update_catalog(backend.store, "meters", lose_the_hold, "test")
    finally:
        backend.close()
    ok(cli(home, "worker", "--until-idle", "-w", "1"))
    status = json.loads(ok(cli(home, "status", run_id, "--json")))
    assert status["state"] == "failed" and status["records"] == 3, status
    manifest = json.loads((home / "store" / status["manifest"]).read_text())
    assert "'unit': long cannot be read as string" in manifest["table_error"]
    assert not [r for r in rows(home) if str(r["item"]).startswith("strings")]


def test_a_replayed_run_whose_version_was_given_back_goes_before_the_current_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its version given back at its end, and the table moved on since with a
    # schema that reads its files: the replay's version goes before the
    # current one, which stays the table's (the review asked for this case).
    home = table_of_v1(tmp_path)
    monkeypatch.setitem(FIELDS, "unit", UNIT_AS_STRING)
    monkeypatch.setitem(FIELDS, "site", SITE)
    broken = job_file(tmp_path, "unit", ["item", "n", "unit"], fail=True)
    assert cli(home, "run", broken, "-w", "1").exit_code == 1
    run_id = latest_run(home)
    ok(cli(home, "run", job_file(tmp_path, "site", ["item", "n", "site"]), "-w", "1"))
    assert versions(home) == ["v1", "v2"]

    job_file(tmp_path, "unit", ["item", "n", "unit"])  # the fix
    ok(cli(home, "replay", run_id))
    ok(cli(home, "worker", "--until-idle", "-w", "1"))
    assert state(home, run_id) == "succeeded"
    assert versions(home) == ["v1", "v3", "v2"]  # v3 (unit) placed before v2 (site)
    got = rows(home)
    assert len(got) == 9 and all(r["site"] == "x" for r in got)
    assert all("unit" not in r for r in got)  # read with v2, the table's schema still
