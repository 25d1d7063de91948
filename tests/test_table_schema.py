"""Schema contracts: Avro's resolution rules (``fanout.tables.compat``) and their
use at submit (``fanout submit`` exits 2 naming the field and the rule)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from fanout.tables.compat import why_unreadable
from support.cli import cli


def record(*fields: dict[str, Any], name: str = "reading") -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields)}


def f(name: str, kind: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, **extra}


BASE = record(f("item", "string"), f("n", "int"))


# -- the rules -----------------------------------------------------------------------


def test_identical_schemas_resolve() -> None:
    assert why_unreadable(BASE, BASE) is None


def test_an_added_field_needs_a_default() -> None:
    with_default = record(f("item", "string"), f("n", "int"), f("unit", "string", default="kWh"))
    assert why_unreadable(with_default, BASE) is None
    without = record(f("item", "string"), f("n", "int"), f("unit", "string"))
    problem = why_unreadable(without, BASE)
    assert problem is not None and "'unit'" in problem and "default" in problem


def test_a_removed_field_is_ignored_by_the_reader() -> None:
    assert why_unreadable(record(f("item", "string")), BASE) is None


@pytest.mark.parametrize(
    ("writer", "reader"),
    [
        ("int", "long"),
        ("int", "float"),
        ("int", "double"),
        ("long", "float"),
        ("long", "double"),
        ("float", "double"),
        ("string", "bytes"),
        ("bytes", "string"),
    ],
)
def test_the_promotions_of_the_spec_resolve(writer: str, reader: str) -> None:
    assert why_unreadable(record(f("x", reader)), record(f("x", writer))) is None


@pytest.mark.parametrize(
    ("writer", "reader"),
    [("long", "int"), ("double", "float"), ("string", "int"), ("int", "string"), ("float", "long")],
)
def test_other_type_changes_are_refused_naming_the_field(writer: str, reader: str) -> None:
    problem = why_unreadable(record(f("x", reader)), record(f("x", writer)))
    assert problem == (
        f"field 'x': {writer} cannot be read as {reader} (type changed; no such promotion in Avro)"
    )


def test_unions() -> None:
    nullable = record(f("x", ["null", "long"], default=None))
    assert why_unreadable(nullable, record(f("x", "int"))) is None  # int promotes to a branch
    assert why_unreadable(nullable, record(f("x", ["null", "int"]))) is None
    problem = why_unreadable(record(f("x", "long")), record(f("x", ["null", "long"])))
    assert problem is not None and "'x'" in problem  # the writer's null has nowhere to go


def test_enums_fixed_and_nested_records_name_the_path() -> None:
    colour = {"type": "enum", "name": "colour", "symbols": ["red", "green"]}
    wider = {"type": "enum", "name": "colour", "symbols": ["red", "green", "blue"]}
    assert why_unreadable(record(f("c", wider)), record(f("c", colour))) is None
    problem = why_unreadable(record(f("c", colour)), record(f("c", wider)))
    assert problem is not None and "'blue'" in problem
    with_default = {**colour, "default": "red"}
    assert why_unreadable(record(f("c", with_default)), record(f("c", wider))) is None

    md5 = {"type": "fixed", "name": "md5", "size": 16}
    assert why_unreadable(record(f("h", {**md5, "size": 20})), record(f("h", md5))) is not None

    inner_w = record(f("lat", "float"), name="point")
    inner_r = record(f("lat", "int"), name="point")
    problem = why_unreadable(record(f("at", inner_r)), record(f("at", inner_w)))
    assert problem is not None and problem.startswith("field 'at.lat': float cannot be read as int")
    arrays = why_unreadable(
        record(f("xs", {"type": "array", "items": "int"})),
        record(f("xs", {"type": "array", "items": "long"})),
    )
    assert arrays is not None and "'xs[]'" in arrays


def test_logical_types_do_not_take_part_and_renames_need_an_alias() -> None:
    ts = {"type": "long", "logicalType": "timestamp-millis"}
    assert why_unreadable(record(f("t", "long")), record(f("t", ts))) is None
    assert why_unreadable(record(f("x", "int"), name="other"), record(f("x", "int"))) is not None
    aliased = {**record(f("x", "int"), name="other"), "aliases": ["reading"]}
    assert why_unreadable(aliased, record(f("x", "int"))) is None


# -- the contract at submit ------------------------------------------------------------


JOB_TEMPLATE = """
from fanout import Job

job = Job("meters", schema={schema}, partition_by="read_at:day"{extra})


@job.process
def process(payload, ctx):
    return None
"""

V1 = record(f("item", "string"), f("read_at", "long"), f("kwh", "float"))


def write_job(tmp: Path, name: str, schema: dict[str, Any], **kw: str) -> str:
    extra = "".join(f", {k}={v!r}" for k, v in kw.items())
    path = tmp / f"{name}.py"
    path.write_text(JOB_TEMPLATE.format(schema=json.dumps(schema), extra=extra))
    return str(path)


def refused(result: Result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_evolve_accepts_an_added_default_and_refuses_a_type_change(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert cli(home, "submit", write_job(tmp_path, "v1", V1)).exit_code == 0
    v2 = {**V1, "fields": [*V1["fields"], f("unit", "string", default="kWh")]}
    assert cli(home, "submit", write_job(tmp_path, "v2", v2)).exit_code == 0
    # Dropping a field (readers ignore it) and a promotion (float -> double) evolve too.
    narrowed = {**v2, "fields": [f("item", "string"), f("read_at", "long"), f("kwh", "double")]}
    assert cli(home, "submit", write_job(tmp_path, "v3", narrowed)).exit_code == 0  # float->double

    changed = {**V1, "fields": [f("item", "string"), f("read_at", "long"), f("kwh", "long")]}
    line = refused(cli(home, "submit", write_job(tmp_path, "bad", changed)))
    assert line == (
        "error: table meters: schema change refused: field 'kwh': double cannot be read as long"
        " (type changed; no such promotion in Avro) (the new schema must read files written"
        " with version 3)"
    )
    no_default = {**narrowed, "fields": [*narrowed["fields"], f("site", "string")]}
    line = refused(cli(home, "submit", write_job(tmp_path, "bad2", no_default)))
    assert "field 'site': added without a default" in line

    history = cli(home, "schema", "meters")
    assert history.exit_code == 0, history.output
    lines = history.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["v1", "v2", "v3"]
    # A field's default is shown, as JSON (a null default printed as nothing).
    assert 'unit:string="kWh"' in lines[1] and "kwh:double" in lines[2]
    assert len(json.loads(cli(home, "schema", "meters", "--json").stdout)) == 3


def test_freeze_refuses_any_change_and_checks_partitioning(tmp_path: Path) -> None:
    home = tmp_path / "home"
    frozen = write_job(tmp_path, "v1", V1, schema_evolution="freeze")
    assert cli(home, "submit", frozen).exit_code == 0
    assert cli(home, "submit", frozen).exit_code == 0  # the same schema is no change
    v2 = {**V1, "fields": [*V1["fields"], f("unit", "string", default="kWh")]}
    line = refused(cli(home, "submit", write_job(tmp_path, "v2", v2, schema_evolution="freeze")))
    assert line == (
        "error: table meters: schema change refused: field 'unit' added"
        " (schema_evolution='freeze' allows none)"
    )
    by_month = tmp_path / "month.py"
    by_month.write_text(Path(frozen).read_text().replace("read_at:day", "read_at:month"))
    line = refused(cli(home, "submit", str(by_month)))
    assert line == "error: table meters is partitioned by read_at:day; job meters by read_at:month"
    missing = tmp_path / "missing.py"
    missing.write_text(Path(frozen).read_text().replace("read_at:day", "taken_at:day"))
    line = refused(cli(home, "submit", str(missing)))
    assert "partition_by field 'taken_at' is not a field of its schema" in line


def test_unknown_table_and_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert refused(cli(home, "schema", "nope")).startswith("error: unknown table 'nope'")
    assert refused(cli(home, "compact", "nope")).startswith("error: unknown table 'nope'")
    assert "age '7x'" in refused(cli(home, "gc", "--older-than", "7x"))
    bad = write_job(tmp_path, "bad", V1, schema_evolution="sometimes")
    assert "schema_evolution must be 'evolve' or 'freeze'" in refused(cli(home, "submit", bad))


def test_validate_checks_a_table_job_against_its_table_and_records_nothing(tmp_path: Path) -> None:
    # `fanout validate` said ok of a job whose submit then refused its schema
    # change (a black-box helper's find).
    from support.cli import assert_user_error, cli, ok
    from support.procs import fanout

    home = tmp_path / "home"
    (tmp_path / "schemas").mkdir()
    avsc = tmp_path / "schemas" / "rec.avsc"
    schema = '{"type":"record","name":"rec","fields":[{"name":"item","type":"string"}%s]}'
    avsc.write_text(schema % "")
    job = tmp_path / "tj.py"
    job.write_text(
        "from fanout import Job\n"
        "job = Job('tj', schema='rec', table='tj')\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    ctx.emit({'item': 'x'})\n"
    )
    # No home yet: nothing to check against, and validate makes none (the review).
    first = fanout(home, "validate", str(job))
    assert first.returncode == 0 and not home.exists(), first.stderr
    ok(cli(home, "run", str(job), "-w", "1"))
    versions = sorted((home / "store" / "tables" / "tj" / "_catalog").iterdir())
    avsc.write_text(schema % ',{"name":"n","type":"long"}')  # no default: refused
    # (As processes: a job loaded in this one would keep the schema it read.)
    assert_user_error(fanout(home, "validate", str(job)), "schema change refused", "'n'")
    avsc.write_text(schema % ',{"name":"n","type":"long","default":0}')  # accepted
    accepted = fanout(home, "validate", str(job))
    assert accepted.returncode == 0 and "job tj: ok" in accepted.stdout, accepted.stderr
    assert sorted((home / "store" / "tables" / "tj" / "_catalog").iterdir()) == versions


def test_a_partition_is_named_by_its_value_as_written_or_as_stored(tmp_path: Path) -> None:
    # `fanout read --partition site=a/b` said the table had no such partition:
    # only the escaped name (site=a%2Fb) was found, and nothing said so.
    from support.cli import assert_user_error, cli, ok

    home = tmp_path / "home"
    job = tmp_path / "sites.py"
    job.write_text(
        "from fanout import Job\n"
        "job = Job('sites', schema={'type': 'record', 'name': 's', 'fields': [\n"
        "    {'name': 'site', 'type': 'string'}, {'name': 'n', 'type': 'long'}]},\n"
        "    table='sites', partition_by='site')\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    for site in ('a/b', 'ünï', 'plain'):\n"
        "        for n in range(2):\n"
        "            ctx.emit({'site': site, 'n': n})\n"
    )
    ok(cli(home, "run", str(job), "-w", "1"))
    for name, site in (("site=a/b", "a/b"), ("site=a%2Fb", "a/b"), ("site=ünï", "ünï")):
        rows = [
            json.loads(line)
            for line in ok(cli(home, "read", "sites", "--partition", name)).splitlines()
        ]
        assert sorted((r["site"], r["n"]) for r in rows) == [(site, 0), (site, 1)], name
    assert_user_error(
        cli(home, "read", "sites", "--partition", "site=a/c"), "no partition 'site=a/c'"
    )
