"""The Glue table over a fanout table (``fanout.tables.glue``), on moto's Glue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_tables import drain  # the one place the table tests reach the engine

from fanout import coordinator
from fanout.backends.base import Backend
from fanout.cli import main
from fanout.tables.catalog import read_catalog
from fanout.tables.glue import hive_type, sync_glue_table

JOB = str(Path(__file__).parent / "testjobs" / "readings_table.py")

BY_SITE = """
from fanout import Job

job = Job("sites", schema={schema}, partition_by="site")


@job.plan
def plan(params, ctx):
    for site in ["north", "south/east", "west"]:
        yield {{"site": site}}


@job.process
def process(payload, ctx):
    for n in range(3):
        ctx.emit({{"site": payload["site"], "n": n}})
"""


def glue_client() -> Any:
    import boto3

    return boto3.client("glue", region_name="us-east-1")


def test_a_day_partitioned_table_gets_columns_and_projection(aws: Backend) -> None:
    run = coordinator.submit(aws, JOB, {"chunks": 2, "rows": 6, "days": 3})
    assert drain(aws, run.run_id).state == "succeeded"
    catalog = read_catalog(aws.store, "readings")
    assert catalog is not None
    bucket: str = aws.store.bucket  # type: ignore[attr-defined]
    glue = glue_client()
    done = sync_glue_table(glue, catalog, bucket, "fanout_test")
    assert done["action"] == "created"
    table = glue.get_table(DatabaseName="fanout_test", Name="readings")["Table"]
    sd = table["StorageDescriptor"]
    assert [(c["Name"], c["Type"]) for c in sd["Columns"]] == [
        ("item", "string"),
        ("read_at", "timestamp"),
        ("kwh", "double"),
    ]
    assert table["PartitionKeys"] == [{"Name": "dt", "Type": "string"}]
    assert sd["Location"] == f"s3://{bucket}/tables/readings/"
    assert sd["SerdeInfo"]["SerializationLibrary"] == "org.apache.hadoop.hive.serde2.avro.AvroSerDe"
    literal = json.loads(sd["SerdeInfo"]["Parameters"]["avro.schema.literal"])
    assert literal == catalog.schemas[-1]["schema"]
    params = table["Parameters"]
    assert params["projection.enabled"] == "true"
    assert params["projection.dt.type"] == "date"
    assert params["projection.dt.format"] == "yyyy-MM-dd"
    assert params["projection.dt.range"] == "2024-01-01,NOW"
    assert params["projection.dt.interval.unit"] == "DAYS"
    assert params["storage.location.template"] == f"s3://{bucket}/tables/readings/dt=${{dt}}"
    # Again: the same table, updated in place.
    assert sync_glue_table(glue, catalog, bucket, "fanout_test")["action"] == "updated"


def test_a_value_partitioned_table_registers_its_partitions(aws: Backend, tmp_path: Path) -> None:
    schema = {
        "type": "record",
        "name": "site_count",
        "fields": [{"name": "site", "type": "string"}, {"name": "n", "type": "long"}],
    }
    job = tmp_path / "sites.py"
    job.write_text(BY_SITE.format(schema=json.dumps(schema)))
    run = coordinator.submit(aws, str(job), {})
    assert drain(aws, run.run_id).state == "succeeded"
    catalog = read_catalog(aws.store, "sites")
    assert catalog is not None
    assert sorted({f["partition"] for f in catalog.files}) == [
        "site=north",
        "site=south%2Feast",  # a '/' in a value never opens a new level
        "site=west",
    ]
    bucket: str = aws.store.bucket  # type: ignore[attr-defined]
    glue = glue_client()
    assert sync_glue_table(glue, catalog, bucket, "fanout_test")["partitions"] == 3
    table = glue.get_table(DatabaseName="fanout_test", Name="sites")["Table"]
    # The partition field is a partition key, not also a column.
    assert [c["Name"] for c in table["StorageDescriptor"]["Columns"]] == ["n"]
    assert table["PartitionKeys"] == [{"Name": "site", "Type": "string"}]
    parts = glue.get_partitions(DatabaseName="fanout_test", TableName="sites")["Partitions"]
    located = {p["Values"][0]: p["StorageDescriptor"]["Location"] for p in parts}
    assert located == {
        "north": f"s3://{bucket}/tables/sites/site=north/",
        "south/east": f"s3://{bucket}/tables/sites/site=south%2Feast/",
        "west": f"s3://{bucket}/tables/sites/site=west/",
    }
    assert sync_glue_table(glue, catalog, bucket, "fanout_test")["partitions"] == 0


@pytest.mark.parametrize(
    ("avro_type", "hive"),
    [
        (["null", "long"], "bigint"),
        ({"type": "int", "logicalType": "date"}, "date"),
        ({"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}, "decimal(9,2)"),
        ({"type": "array", "items": "string"}, "array<string>"),
        ({"type": "map", "values": "int"}, "map<string,int>"),
        (
            {"type": "record", "name": "p", "fields": [{"name": "x", "type": "float"}]},
            "struct<x:float>",
        ),
        ({"type": "enum", "name": "e", "symbols": ["a"]}, "string"),
    ],
)
def test_hive_types(avro_type: Any, hive: str) -> None:
    assert hive_type(avro_type) == hive


def test_catalog_needs_the_aws_backend(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["--home", str(tmp_path / "home"), "catalog", "readings"], prog_name="fanout"
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: fanout catalog needs the AWS backend (--backend aws): Glue reads S3"
    )
