"""ctx.list / ctx.open on local paths and s3:// URLs (moto, in-process)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from fanout import coordinator
from fanout.backends.base import Backend, RunState
from fanout.inputs import list_inputs, open_input
from support.helpers import drain, fake_aws

ROOT = Path(__file__).resolve().parents[1]
METER_JOB = str(ROOT / "jobs" / "meter_readings.py")
SAMPLE = ROOT / "jobs" / "data" / "readings"


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    fake_aws(monkeypatch)
    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="inputs")
        yield "inputs"


def test_local_listing_is_recursive_sorted_and_skips_dotfiles(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    for name in ("b/2.csv", "a.csv", ".hidden", "b/1.csv"):
        (tmp_path / name).write_text(name)
    assert list_inputs(str(tmp_path)) == [
        str(tmp_path / "a.csv"),
        str(tmp_path / "b" / "1.csv"),
        str(tmp_path / "b" / "2.csv"),
    ]
    assert list_inputs(str(tmp_path / "a.csv")) == [str(tmp_path / "a.csv")]
    with open_input(str(tmp_path / "a.csv")) as f:
        assert f.read() == b"a.csv"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_inputs(str(tmp_path / "nope"))


def test_s3_listing_and_reading(s3_bucket: str) -> None:
    s3 = boto3.client("s3")
    for key in ("in/b.csv", "in/a.csv", "other/c.csv"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    assert list_inputs("s3://inputs/in/") == ["s3://inputs/in/a.csv", "s3://inputs/in/b.csv"]
    assert open_input("s3://inputs/in/b.csv").read() == b"in/b.csv"


def test_meter_readings_from_s3_match_the_local_run(mem: Backend, s3_bucket: str) -> None:
    s3 = boto3.client("s3")
    for path in sorted(SAMPLE.glob("*.csv")):
        s3.upload_file(str(path), s3_bucket, f"readings/{path.name}")
    local = coordinator.submit(mem, METER_JOB, {"scale": 2}).run_id
    remote = coordinator.submit(mem, METER_JOB, {"scale": 2, "source": "s3://inputs/readings/"})
    assert drain(mem, local).state == drain(mem, remote.run_id).state == RunState.SUCCEEDED

    def key(r: dict[str, object]) -> tuple[object, ...]:
        return (Path(str(r["source"])).name, r["line"], r["kwh"], r["adjusted_kwh"], r["read_at"])

    a = sorted(map(key, coordinator.committed_records(mem, local)))
    b = sorted(map(key, coordinator.committed_records(mem, remote.run_id)))
    assert len(a) == 4000 and a == b
    assert all(r[3] == r[2] * 2 for r in a)


def test_an_s3_input_iterates_by_line_inside_with_or_not(s3_bucket: str) -> None:
    """As a local file does: botocore's body alone yields 1 KiB blocks when
    iterated outside ``with`` (issue 10)."""
    lines = [f"line {i},{'x' * (i % 50)}\n".encode() for i in range(300)]
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="lines.csv", Body=b"".join(lines))
    assert list(open_input("s3://inputs/lines.csv")) == lines
    with open_input("s3://inputs/lines.csv") as f:
        assert list(f) == lines
    with open_input("s3://inputs/lines.csv") as f:
        assert f.readline() == lines[0] and f.read(4) == b"line"
