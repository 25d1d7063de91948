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


def test_local_listing_follows_directory_links_once_and_lists_regular_files(
    tmp_path: Path,
) -> None:
    # A linked directory under the source was left out in silence (its files
    # never read, the run "succeeded"), and a FIFO named *.csv was listed: its
    # chunk waited out its timeout on every attempt (a black-box helper's finds).
    import os

    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "r.csv").write_text("r")
    (real / "sub" / "s.csv").write_text("s")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_text("a")
    (src / "linked").symlink_to(real)
    (src / "up").symlink_to(src)  # a loop: walked once
    os.mkfifo(src / "pipe.csv")
    assert list_inputs(str(src)) == [
        str(src / "a.csv"),
        str(src / "linked" / "r.csv"),
        str(src / "linked" / "sub" / "s.csv"),
    ]


def test_local_listing_refuses_what_it_cannot_read_or_name(tmp_path: Path) -> None:
    # An unreadable directory was skipped (the run succeeded without its files),
    # and a file named in bytes that are not UTF-8 killed the plan at its spawn
    # naming no file (a black-box helper's finds).
    import os

    from fanout.errors import PermanentError

    named = tmp_path / "named"
    named.mkdir()
    (named / "ok.csv").write_text("x")
    bad = os.fsencode(str(named)) + b"/caf\xe9.csv"
    with open(bad, "w") as f:
        f.write("x")
    with pytest.raises(PermanentError, match=r"caf\\xe9.csv has a name that is not UTF-8"):
        list_inputs(str(named))
    locked = tmp_path / "locked"
    (locked / "inner").mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path: object) -> object:  # (as root, a chmod 000 would not stop us)
        if str(path).endswith("inner"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "scandir", scandir)
        with pytest.raises(PermissionError, match="inner"):
            list_inputs(str(locked))


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
