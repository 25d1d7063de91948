"""fanout.avro: schema loading, RecordWriter checks and output, JSON-safe records."""

from __future__ import annotations

import base64
import io
import json
import os
import uuid
from collections import OrderedDict
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import fastavro
import pytest

from fanout.avro import RecordWriter, Schema, load_schema, read_records, to_json_safe
from fanout.errors import RecordError, SchemaError

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "schemas"
METER = "fanout.examples.meter_reading"
T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def meter() -> Schema:
    return load_schema("meter_reading", [SCHEMAS])


def reading(i: int = 0, **changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "meter_id": f"M{i % 50 + 1:04d}",
        "read_at": T0 + timedelta(minutes=15 * (i // 50)),
        "kwh": round(0.1 + (i % 97) / 100, 3),
        "adjusted_kwh": 0.2 + (i % 97) / 100,
        "source": "readings-00.csv",
        "line": i + 1,
    }
    record.update(changes)
    return record


def write(schema: Schema, records: list[Any], **kwargs: Any) -> bytes:
    writer = RecordWriter(schema, **kwargs)
    for record in records:
        writer.add(record)
    return writer.finish()


def record_error(schema: Schema, records: list[Any], **kwargs: Any) -> str:
    with pytest.raises(RecordError) as info:
        write(schema, records, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def schema_error(*args: Any) -> str:
    with pytest.raises(SchemaError) as info:
        load_schema(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def write_avsc(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = content if isinstance(content, str) else json.dumps(content, indent=2)
    path.write_text(text, encoding="utf-8")
    return path


def small(name: str, namespace: str = "t") -> dict[str, Any]:
    return {
        "type": "record",
        "name": name,
        "namespace": namespace,
        "fields": [{"name": "a", "type": "string"}],
    }


# -- schemas -----------------------------------------------------------------


def test_meter_reading_schema_by_name(meter: Schema) -> None:
    assert meter.name == METER
    assert meter.raw == json.loads((SCHEMAS / "meter_reading.avsc").read_text())
    assert meter.path is not None and meter.path.name == "meter_reading.avsc"
    fields = {f["name"]: f for f in meter.raw["fields"]}
    assert list(fields) == ["meter_id", "read_at", "kwh", "adjusted_kwh", "source", "line"]
    assert fields["read_at"]["type"] == {"type": "long", "logicalType": "timestamp-millis"}
    assert all(f.get("doc") for f in fields.values())
    assert meter.parsed["name"] == METER
    json.dumps(meter.raw)  # JSON-able, for the run manifest


def test_by_name_searches_dirs_in_order(tmp_path: Path) -> None:
    write_avsc(tmp_path / "b" / "thing.avsc", small("thing", "second"))
    write_avsc(tmp_path / "c" / "thing.avsc", small("thing", "third"))
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    assert load_schema("thing", dirs).name == "second.thing"
    assert load_schema("thing", [str(tmp_path / "c")]).name == "third.thing"


def test_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_avsc(tmp_path / "sub" / "x.avsc", small("x"))
    assert load_schema(path).name == "t.x"
    assert load_schema(str(path)).name == "t.x"
    monkeypatch.chdir(tmp_path)
    assert load_schema("sub/x.avsc").name == "t.x"
    monkeypatch.chdir(tmp_path / "sub")
    assert load_schema("x.avsc").name == "t.x"  # ends with .avsc: a path, not a name


def test_inline_dict_is_copied() -> None:
    spec = small("inline")
    schema = load_schema(spec)
    assert schema.name == "t.inline"
    assert schema.path is None
    spec["fields"].append({"name": "b", "type": "long"})
    assert [f["name"] for f in schema.raw["fields"]] == ["a"]


def test_not_found_names_the_dirs() -> None:
    message = schema_error("x", [Path("a/schemas"), Path("b/schemas")])
    assert message == "schema 'x' not found (looked in: a/schemas, b/schemas)"


def test_not_found_without_dirs() -> None:
    assert "schema 'x' not found" in schema_error("x")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.avsc"
    assert schema_error(str(path)) == f"schema file {path} not found"


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = write_avsc(tmp_path / "schemas" / "x.avsc", '{\n  "type": "record",\n}\n')
    message = schema_error("x", [tmp_path / "schemas"])
    assert message.startswith(f"schema file {path} is not valid JSON: ")
    assert message.endswith("(line 3)")


def test_does_not_parse(tmp_path: Path) -> None:
    bad = {"type": "record", "name": "x", "fields": [{"name": "a", "type": "strin"}]}
    path = write_avsc(tmp_path / "x.avsc", bad)
    message = schema_error(path)
    assert message.startswith(f"schema file {path} does not parse: ")
    assert "strin" in message


def test_does_not_parse_bad_default(tmp_path: Path) -> None:
    bad = {"type": "record", "name": "x", "fields": [{"name": "a", "type": "long", "default": "z"}]}
    message = schema_error(write_avsc(tmp_path / "x.avsc", bad))
    assert "does not parse" in message and "default" in message.lower()


def test_inline_does_not_parse() -> None:
    message = schema_error({"type": "record", "fields": []})
    assert message.startswith("inline schema does not parse: ")
    assert "name" in message


@pytest.mark.parametrize("raw", ['"string"', '["null", "string"]', '{"type": "enum"}'])
def test_top_level_must_be_a_record(tmp_path: Path, raw: str) -> None:
    path = write_avsc(tmp_path / "x.avsc", raw)
    assert schema_error(path).startswith(f"schema file {path} must be an Avro record, not ")


def test_cache_by_path_and_mtime(tmp_path: Path) -> None:
    path = write_avsc(tmp_path / "x.avsc", small("first"))
    one = load_schema(path)
    assert load_schema(str(path)) is one
    assert load_schema("x", [tmp_path]) is one
    write_avsc(path, small("second"))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    two = load_schema(path)
    assert two is not one
    assert two.name == "t.second"
    # The same size and the mtime kept, as `cp -p` of a fix does: still reloaded.
    write_avsc(path, small("sec0nd"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert load_schema(path).name == "t.sec0nd"


# -- writing and reading --------------------------------------------------------


@pytest.mark.parametrize("codec", ["deflate", "null"])
def test_round_trip_meter_readings(meter: Schema, codec: str) -> None:
    records = [reading(i) for i in range(20_000)]  # more than two default batches
    writer = RecordWriter(meter, codec=codec)
    for n, record in enumerate(records, 1):
        writer.add(record)
        assert writer.count == n
    data = writer.finish()
    reader = fastavro.reader(io.BytesIO(data))
    writer_schema: Any = reader.writer_schema
    assert writer_schema["name"] == METER
    assert reader.metadata["avro.codec"] == codec
    back = list(read_records(io.BytesIO(data)))
    assert back == records
    assert back[123]["read_at"] == records[123]["read_at"]
    assert back[123]["read_at"].utcoffset() == timedelta(0)
    assert writer.count == len(records)


def test_blocks_are_avros_64_kb_not_fastavros_16(meter: Schema) -> None:
    """Fewer, larger blocks compress better; each block is one deflate stream."""
    data = write(meter, [reading(i) for i in range(20_000)])
    blocks = list(fastavro.block_reader(io.BytesIO(data)))
    assert sum(b.num_records for b in blocks) == 20_000
    # A reading is about 45 bytes in Avro: some 1,400 to a 64,000-byte block, 350 to 16,000.
    full = [b.num_records for b in blocks[:-1]]
    assert len(full) >= 3 and min(full) > 1000, full
    plain = io.BytesIO()
    fastavro.writer(plain, meter.parsed, [reading(i) for i in range(20_000)], codec="deflate")
    assert len(data) < 0.95 * len(plain.getvalue())


def test_output_matches_plain_fastavro(meter: Schema) -> None:
    records = [reading(i) for i in range(3000)]
    ours = write(meter, records, batch_size=1000)
    plain = io.BytesIO()
    fastavro.writer(plain, meter.parsed, records, codec="deflate")
    plain.seek(0)
    assert list(read_records(io.BytesIO(ours))) == list(fastavro.reader(plain))


def test_aware_non_utc_timestamps_come_back_as_the_same_instant(meter: Schema) -> None:
    local = datetime(2024, 6, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    [back] = read_records(io.BytesIO(write(meter, [reading(read_at=local)])))
    assert back["read_at"] == local
    assert back["read_at"] == datetime(2024, 6, 1, 10, 30, tzinfo=UTC)


def test_empty_writer_returns_empty_bytes(meter: Schema) -> None:
    writer = RecordWriter(meter)
    assert writer.count == 0
    assert writer.finish() == b""


def test_finish_is_idempotent_and_closes(meter: Schema) -> None:
    writer = RecordWriter(meter)
    writer.add(reading())
    data = writer.finish()
    assert data and writer.finish() == data
    with pytest.raises(RuntimeError):
        writer.add(reading())
        writer.finish()


def test_unknown_codec(meter: Schema) -> None:
    with pytest.raises(ValueError):
        RecordWriter(meter, codec="nope")


def test_ints_and_nan_are_fine_for_doubles(meter: Schema) -> None:
    records = [reading(kwh=3, adjusted_kwh=float("nan")), reading(kwh=float("inf"))]
    back = list(read_records(io.BytesIO(write(meter, records))))
    assert back[0]["kwh"] == 3.0
    assert back[0]["adjusted_kwh"] != back[0]["adjusted_kwh"]
    assert back[1]["kwh"] == float("inf")


class Kwh(float):
    pass


def test_dict_subclasses_and_mappings_are_fine(meter: Schema) -> None:
    records: list[Any] = [OrderedDict(reading(i)) for i in range(10)]
    records[3] = MappingProxyType(reading(3))
    records[5] = reading(5, kwh=Kwh(0.5))  # not exactly a float: the slow path, which passes
    assert not meter.checker().batch_ok(records)
    back = list(read_records(io.BytesIO(write(meter, records, batch_size=4))))
    assert [r["line"] for r in back] == list(range(1, 11))
    assert back[3] == reading(3)


# -- record errors: the meter schema ---------------------------------------------


def test_wrong_type_names_record_and_field(meter: Schema) -> None:
    records = [reading(i) for i in range(30)]
    records[17]["kwh"] = "abc"
    message = record_error(meter, records)
    assert message == f"record 17 does not fit schema {METER}: field kwh: 'abc' is not a double"


def test_index_counts_across_batches(meter: Schema) -> None:
    records = [reading(i) for i in range(30)]
    records[21]["line"] = "22"
    message = record_error(meter, records, batch_size=8)
    assert message == f"record 21 does not fit schema {METER}: field line: '22' is not a long"


def test_first_offender_in_the_batch_is_named(meter: Schema) -> None:
    records = [reading(i) for i in range(10)]
    records[3]["kwh"] = "1.5"  # silently coerced by fastavro
    records[6]["meter_id"] = 7  # fastavro raises
    assert "record 3 " in record_error(meter, records)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        # fastavro alone raises for these
        ("meter_id", None, "None is not a string"),
        ("meter_id", b"M1", "b'M1' is not a string"),
        ("line", "7", "'7' is not a long"),
        ("read_at", "2024-01-01T00:00:00Z", "is not a timestamp-millis"),
        ("line", 2**64, "is out of range for long"),
        ("source", "a\udc80", "cannot be encoded as UTF-8"),
        # fastavro alone silently writes these (coerced or wrong)
        ("kwh", "1.5", "'1.5' is not a double"),
        ("kwh", True, "True is not a double"),
        ("kwh", Decimal("1.5"), "Decimal('1.5') is not a double"),
        ("line", 1.7, "1.7 is not a long"),
        ("line", False, "False is not a long"),
        ("read_at", 1.5e12, "is not a timestamp-millis"),
        ("read_at", datetime(2024, 1, 1), "is a naive datetime"),
        ("read_at", 2**62, "is out of range for timestamp-millis"),
    ],
)
def test_field_errors(meter: Schema, field: str, value: Any, problem: str) -> None:
    records = [reading(i) for i in range(5)]
    records[2][field] = value
    message = record_error(meter, records)
    assert message.startswith(f"record 2 does not fit schema {METER}: field {field}: ")
    assert problem in message


def test_the_last_instant_of_year_9999_is_in_range_as_an_int_as_it_is_as_a_datetime(
    meter: Schema,
) -> None:
    # As an int, the range ended at 9999-12-31T00:00 (a black-box helper's find):
    # the aware datetime of the same instant was accepted, its millis refused.
    last = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    as_int = {**reading(0), "read_at": 253_402_300_799_999}
    back = list(read_records(io.BytesIO(write(meter, [as_int, {**reading(1), "read_at": last}]))))
    assert [r["read_at"] for r in back] == [last, last]
    past = {**reading(0), "read_at": 253_402_300_800_000}  # year 10000
    assert "is out of range for timestamp-millis" in record_error(meter, [past])


def test_missing_required_field(meter: Schema) -> None:
    records = [reading(i) for i in range(5)]
    del records[4]["adjusted_kwh"]
    message = record_error(meter, records)
    assert message == (
        f"record 4 does not fit schema {METER}: "
        "field adjusted_kwh: missing (the schema gives no default)"
    )


def test_extra_field(meter: Schema) -> None:
    records = [reading(i) for i in range(5)]
    records[1]["kwhh"] = 1.0
    message = record_error(meter, records)
    assert message.startswith(
        f"record 1 does not fit schema {METER}: field kwhh is not in the schema"
    )


def test_missing_union_field_without_default() -> None:
    schema = load_schema(
        {
            "type": "record",
            "name": "r",
            "fields": [
                {"name": "a", "type": ["null", "string"]},
                {"name": "b", "type": ["null", "string"], "default": None},
            ],
        }
    )
    [back] = read_records(io.BytesIO(write(schema, [{"a": None}])))
    assert back == {"a": None, "b": None}
    message = record_error(schema, [{"a": "x"}, {"b": "y"}])
    assert (
        message == "record 1 does not fit schema r: field a: missing (the schema gives no default)"
    )


def test_extra_field_with_a_missing_one(meter: Schema) -> None:
    records = [reading(i) for i in range(5)]
    records[1]["adjusted"] = records[1].pop("adjusted_kwh")
    assert "record 1 " in record_error(meter, records)


@pytest.mark.parametrize("value", [None, 5, [1, 2], "meter", ("M1", T0), reading])
def test_not_a_dict(meter: Schema, value: Any) -> None:
    writer = RecordWriter(meter, batch_size=4)
    writer.add(reading(0))
    writer.add(reading(1))
    with pytest.raises(RecordError) as info:
        writer.add(value)  # fastavro cannot encode it: the add() raises
    assert str(info.value).startswith(
        f"record 2 does not fit schema {METER}: a record must be a dict, got "
    )
    with pytest.raises(RecordError):  # the writer stays failed
        writer.add(reading(3))


@pytest.mark.parametrize("value", [None, 5, ["a"], "meter"])
def test_not_a_dict_when_no_field_is_column_checked(value: Any) -> None:
    schema = load_schema(small("strings"))
    message = record_error(schema, [{"a": "x"}, value, {"a": "y"}])
    assert message.startswith("record 1 does not fit schema t.strings: a record must be a dict")


def test_writer_stays_failed(meter: Schema) -> None:
    writer = RecordWriter(meter, batch_size=2)
    writer.add(reading(0))
    with pytest.raises(RecordError):
        writer.add(reading(1, kwh="x"))
    with pytest.raises(RecordError, match="record 1 "):
        writer.finish()


# -- record errors: other types ------------------------------------------------

NESTED = {
    "type": "record",
    "name": "everything",
    "namespace": "t",
    "fields": [
        {"name": "flag", "type": "boolean", "default": False},
        {"name": "small", "type": "int", "default": 0},
        {"name": "single", "type": "float", "default": 0.0},
        {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
        {"name": "counts", "type": {"type": "array", "items": "long"}, "default": []},
        {"name": "weights", "type": {"type": "map", "values": "double"}, "default": {}},
        {
            "name": "point",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "point",
                    "fields": [{"name": "x", "type": "double"}, {"name": "y", "type": "double"}],
                },
            ],
            "default": None,
        },
        {"name": "points", "type": {"type": "array", "items": "point"}, "default": []},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}, "default": 0},
        {"name": "at", "type": {"type": "int", "logicalType": "time-millis"}, "default": 0},
        {
            "name": "seen",
            "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}],
            "default": None,
        },
        {
            "name": "id",
            "type": ["null", {"type": "string", "logicalType": "uuid"}],
            "default": None,
        },
        {
            "name": "price",
            "type": [
                "null",
                {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2},
            ],
            "default": None,
        },
        {
            "name": "kind",
            "type": {"type": "enum", "name": "kind", "symbols": ["A", "B"]},
            "default": "A",
        },
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}


@pytest.fixture(scope="module")
def nested() -> Schema:
    return load_schema(NESTED)


def full_record() -> dict[str, Any]:
    return {
        "flag": True,
        "small": 2**31 - 1,
        "single": 1.5,
        "tags": ["a", "b"],
        "counts": (1, 2),
        "weights": {"a": 0.5, "b": 2},
        "point": {"x": 1.0, "y": 2},
        "points": [{"x": 0.0, "y": 0.0}],
        "day": date(2024, 2, 29),
        "at": time(12, 30, 15, 250_000),
        "seen": T0,
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "price": Decimal("1234.50"),
        "kind": "B",
        "note": "hi",
    }


def test_nested_round_trip(nested: Schema) -> None:
    records = [full_record(), {}, {"id": "12345678123456781234567812345678", "note": None}]
    back = list(read_records(io.BytesIO(write(nested, records))))
    assert back[0] == {**full_record(), "counts": [1, 2], "weights": {"a": 0.5, "b": 2.0}}
    assert back[1]["kind"] == "A" and back[1]["points"] == [] and back[1]["point"] is None
    assert back[2]["id"] == uuid.UUID("12345678-1234-5678-1234-567812345678")


@pytest.mark.parametrize(
    ("changes", "where", "problem"),
    [
        ({"flag": "no"}, "flag", "'no' is not a boolean"),
        ({"flag": None}, "flag", "None is not a boolean"),
        ({"flag": 1}, "flag", "1 is not a boolean"),
        ({"small": 2**31}, "small", "is out of range for int (32-bit)"),
        ({"small": 1.5}, "small", "1.5 is not an int"),
        ({"single": 1e39}, "single", "is out of range for float (32-bit)"),
        ({"tags": "ab"}, "tags", "'ab' is not an array"),
        ({"tags": {"a": 1}}, "tags", "is not an array"),
        ({"tags": ["a", 1]}, "tags[1]", "1 is not a string"),
        ({"counts": [1, 2.5]}, "counts[1]", "2.5 is not a long"),
        ({"weights": {"a": "1"}}, "weights['a']", "'1' is not a double"),
        ({"weights": {1: 1.0}}, "weights", "1 is not a map key"),
        ({"weights": [("a", 1.0)]}, "weights", "is not a map"),
        ({"point": {"x": "1", "y": 2.0}}, "point.x", "'1' is not a double"),
        ({"point": {"x": 1.0, "y": 2.0, "z": 3.0}}, "point.z", "is not in the schema"),
        ({"point": {"x": 1.0}}, "point.y", "missing"),
        ({"point": 5}, "point", "5 is not a record (t.point)"),
        ({"points": [{"x": 0.0, "y": True}]}, "points[0].y", "True is not a double"),
        ({"day": datetime(2024, 1, 1, 12)}, "day", "is a datetime, not a date"),
        ({"day": "2024-13-01"}, "day", "is not a date"),
        ({"day": 10**9}, "day", "is out of range for date"),
        ({"at": 1.5}, "at", "is not a time-millis"),
        ({"at": 86_400_000}, "at", "is out of range for time-millis"),
        ({"seen": datetime(2024, 1, 1)}, "seen", "is a naive datetime"),
        ({"seen": 1.5}, "seen", "is not a timestamp-micros"),
        ({"id": "not-a-uuid"}, "id", "is not a UUID string"),
        ({"id": 5}, "id", "is not a UUID"),
        ({"price": Decimal("1.234")}, "price", "more than 2 decimal places"),
        ({"price": Decimal("99999.00")}, "price", "more than 6 digits"),
        # 5 digits given, 7 at the schema's scale: fastavro wrote it (a helper's find).
        ({"price": Decimal("12345.6")}, "price", "more than 6 digits"),
        # Year 1 at +01:00 is year 0 in UTC, 9999-12-31T23:00-05:00 year 10000:
        # written, and the file could not be read back (a helper's find).
        (
            {"seen": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))},
            "seen",
            "is out of range for timestamp-micros (years 1 to 9999 in UTC)",
        ),
        (
            {"seen": datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5)))},
            "seen",
            "is out of range for timestamp-micros (years 1 to 9999 in UTC)",
        ),
        ({"price": 1.5}, "price", "is not a decimal.Decimal"),
        ({"kind": "C"}, "kind", "'C' is not a symbol of enum t.kind (A, B)"),
        ({"note": 5}, "note", "5 is not a string"),
    ],
)
def test_nested_errors(nested: Schema, changes: dict[str, Any], where: str, problem: str) -> None:
    records = [full_record() for _ in range(6)]
    records[4].update(changes)
    message = record_error(nested, records, batch_size=3)
    assert message.startswith(f"record 4 does not fit schema t.everything: field {where}")
    assert problem in message


@pytest.mark.parametrize(
    "changes",
    [
        {"kwh": "1.5"},
        {"kwh": True},
        {"line": 1.7},
        {"line": True},
        {"read_at": 1.5e12},
        {"read_at": datetime(2024, 1, 1)},
    ],
)
def test_batch_check_catches_what_fastavro_writes_silently(
    meter: Schema, changes: dict[str, Any]
) -> None:
    """The column checks alone (before fastavro sees the batch) flag these."""
    records = [reading(i) for i in range(100)]
    assert meter.checker().batch_ok(records)
    records[50].update(changes)
    assert not meter.checker().batch_ok(records)
    # ...and fastavro without validation would have written the record.
    fastavro.writer(io.BytesIO(), meter.parsed, records)


def test_recursive_schema() -> None:
    schema = load_schema(
        {
            "type": "record",
            "name": "node",
            "fields": [
                {"name": "v", "type": "double"},
                {"name": "next", "type": ["null", "node"], "default": None},
            ],
        }
    )
    good = {"v": 1.0, "next": {"v": 2, "next": {"v": 3.0, "next": None}}}
    bad = {"v": 1.0, "next": {"v": 2.0, "next": {"v": "3"}}}
    [back] = read_records(io.BytesIO(write(schema, [good])))
    assert back["next"]["next"]["v"] == 3.0
    message = record_error(schema, [good, bad])
    assert message == "record 1 does not fit schema node: field next.next.v: '3' is not a double"


def test_batch_check_passes_clean_nested_records(nested: Schema) -> None:
    assert nested.checker().batch_ok([full_record(), {}, {"point": None, "seen": 5}])


# -- JSON-safe ---------------------------------------------------------------------


def test_to_json_safe() -> None:
    record = {
        "at": datetime(2024, 1, 1, 0, 15, tzinfo=UTC),
        "local": datetime(2024, 1, 1, 2, 15, tzinfo=timezone(timedelta(hours=2))),
        "day": date(2024, 2, 29),
        "clock": time(12, 30),
        "price": Decimal("1234.50"),
        "blob": b"\x00\xffhi",
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "nested": {"list": [Decimal("1.5"), {"when": date(2024, 1, 2)}], "tuple": (b"a", 1)},
        "plain": ["s", 1, 2.5, True, None],
        "nan": float("nan"),
        "inf": float("-inf"),
    }
    safe = to_json_safe(record)
    assert safe == {
        "at": "2024-01-01T00:15:00+00:00",
        "local": "2024-01-01T02:15:00+02:00",
        "day": "2024-02-29",
        "clock": "12:30:00",
        "price": "1234.50",
        "blob": base64.b64encode(b"\x00\xffhi").decode(),
        "id": "12345678-1234-5678-1234-567812345678",
        "nested": {"list": ["1.5", {"when": "2024-01-02"}], "tuple": ["YQ==", 1]},
        "plain": ["s", 1, 2.5, True, None],
        "nan": "NaN",
        "inf": "-Infinity",
    }
    json.dumps(safe, allow_nan=False)
    assert record["price"] == Decimal("1234.50")  # the input is not modified


def test_read_back_then_json(meter: Schema) -> None:
    data = write(meter, [reading(0), reading(1)])
    lines = [json.dumps(to_json_safe(r), allow_nan=False) for r in read_records(io.BytesIO(data))]
    first = json.loads(lines[0])
    assert first["read_at"] == "2024-01-01T00:00:00+00:00"
    assert datetime.fromisoformat(first["read_at"]) == T0
    assert first["line"] == 1


def test_a_record_is_written_as_it_was_when_added(meter: Schema) -> None:
    # One dict reused for every row, as a job might: the file held five copies
    # of the last row when records were kept by reference until their batch.
    writer = RecordWriter(meter, batch_size=100)
    record = reading(0)
    for i in range(5):
        record.update(reading(i))
        writer.add(record)
    record["line"] = 99
    record["kwh"] = 123.0
    back = list(read_records(io.BytesIO(writer.finish())))
    assert [(r["line"], r["kwh"]) for r in back] == [
        (reading(i)["line"], reading(i)["kwh"]) for i in range(5)
    ]


def test_a_reused_dict_is_checked_as_it_was_at_each_add(meter: Schema) -> None:
    # The check looked at the dict as it was at the batch's end: a bad value
    # overwritten later passed, and clearing the dict after the last add failed
    # the chunk for records written correctly.
    writer = RecordWriter(meter, batch_size=100)
    row: dict[str, Any] = {}
    for i in range(3):
        row.update(reading(i))
        writer.add(row)
    row.clear()
    assert len(list(read_records(io.BytesIO(writer.finish())))) == 3
    writer = RecordWriter(meter, batch_size=100)
    row = {}
    for i, kwh in enumerate([1.0, True, 3.0]):  # True would be written as 1.0
        row.update(reading(i, kwh=kwh))
        writer.add(row)
    with pytest.raises(RecordError, match=r"record 1 .*True is not a double"):
        writer.finish()


def test_a_file_holding_a_timestamp_python_cannot_hold_is_unreadable_in_one_line() -> None:
    # Written before fanout refused such values (or by another writer): fastavro
    # raised OverflowError reading it, and `fanout cat` printed a traceback.
    import fastavro

    from fanout.avro import read_records
    from fanout.errors import UserError

    raw = {
        "type": "record",
        "name": "r",
        "fields": [{"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}}],
    }
    data = io.BytesIO()
    fastavro.writer(data, fastavro.parse_schema(raw), [{"t": 253_402_300_800_000}])  # year 10000
    data.seek(0)
    with pytest.raises(UserError, match=r"^file x\.avro cannot be read as Avro: OverflowError"):
        list(read_records(data, "x.avro"))
