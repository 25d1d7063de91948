"""ctx.list / ctx.open on local paths and s3:// URLs (moto, in-process)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def test_the_example_job_resumes_a_file_by_its_lines_each_row_once(tmp_path: Path) -> None:
    # Each continuation parsed the rows before its cursor again (islice over the
    # csv reader): slices of a big file slowed until each made a thousand rows
    # (a black-box helper's 54 MB file: 177 slices, 202 s). Continuations now
    # skip the lines read before them; quoted line breaks and CRLF included.
    import json
    import subprocess
    import sys

    from support.lambda_source import checkout_pythonpath

    src = tmp_path / "csv"
    src.mkdir()
    rows = ["meter_id,read_at,kwh"]
    for n in range(1, 4501):
        meter = f'"M{n}\r\nsecond line"' if n % 7 == 0 else f"M{n}"
        rows.append(f"{meter},2024-01-01T00:00:00+00:00,{n}")
    (src / "big.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    home = tmp_path / "home"
    cli = [sys.executable, "-m", "fanout.cli", "--home", str(home)]
    env = {**os.environ, "PYTHONPATH": checkout_pythonpath()}
    job = str(Path(__file__).resolve().parents[1] / "jobs" / "meter_readings.py")
    ran = subprocess.run(
        [*cli, "run", job, "-p", f"source={src}", "-w", "1", "--chunk-timeout", "2", "--json"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    status = json.loads(ran.stdout.splitlines()[-1])
    assert status["chunks"]["done"] >= 5  # the plan and 4+ slices: it did resume
    cat = subprocess.run(
        [*cli, "cat", status["run_id"]], capture_output=True, text=True, timeout=60, env=env
    )
    records = [json.loads(line) for line in cat.stdout.splitlines()]
    assert sorted(r["line"] for r in records) == list(range(1, 4501))
    for r in records:
        n = r["line"]
        assert r["kwh"] == n and r["meter_id"] == (
            f"M{n}\r\nsecond line" if n % 7 == 0 else f"M{n}"
        )


def _example_job() -> Any:
    """The example ETL job's module, loaded here (its process called directly)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "meter_example", Path(__file__).resolve().parents[1] / "jobs" / "meter_readings.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ctx(module: Any, source: Path, cursor: Any, emitted: list[dict[str, Any]]) -> Any:
    """What the example job's process uses of its context."""

    class Ctx:
        params = module.Params(source=str(source))
        emit = staticmethod(emitted.append)

        @staticmethod
        def time_left() -> float:
            return 60.0

        @staticmethod
        def open(path: str) -> Any:
            return open_input(path)

    ctx = Ctx()
    ctx.cursor = cursor  # type: ignore[attr-defined]
    return ctx


def test_the_example_job_names_the_file_and_line_of_bytes_it_cannot_read(
    tmp_path: Path,
) -> None:
    # A Latin-1 file failed with "UnicodeDecodeError: 'utf-8' codec can't decode
    # byte 0xe9 in position 22", naming no file, retried at every attempt.
    from fanout.errors import PermanentError

    data = tmp_path / "latin.csv"
    data.write_bytes(b"meter_id,read_at,kwh\nM1,2024-01-01T00:00:00+00:00,1\nCaf\xe9,x,1\n")
    with pytest.raises(PermanentError, match=r"latin.csv line \d+: UnicodeDecodeError"):
        _example_job().process({"path": str(data)}, _ctx(_example_job(), tmp_path, None, []))


def test_an_example_job_continuation_does_not_parse_the_rows_before_it(tmp_path: Path) -> None:
    # What makes resuming cheap: the lines before the cursor are skipped, not
    # parsed. A row there that the csv module refuses (a field over its size
    # limit) is no concern of a continuation that starts after it; parsed
    # again, as continuations did, it failed every one of them.
    module = _example_job()
    data = tmp_path / "r.csv"
    rows = ["meter_id,read_at,kwh", "M1,2024-01-01T00:00:00+00:00,1"]
    rows += ["M2," + "x" * 200_000 + ",2"]  # more than csv's field limit
    rows += [f"M{n},2024-01-01T00:00:00+00:00,{n}" for n in (3, 4, 5)]
    data.write_text("\n".join(rows) + "\n")
    emitted: list[dict[str, Any]] = []
    # Rows 1 and 2 done: the header and two lines read.
    assert module.process({"path": str(data)}, _ctx(module, tmp_path, [3, 3], emitted)) is None
    assert [(r["line"], r["kwh"]) for r in emitted] == [(3, 3.0), (4, 4.0), (5, 5.0)]


def test_the_example_job_takes_a_relative_source_as_where_it_was_submitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `fanout submit jobs/meter_readings.py -p source=data` from one directory and
    # `fanout worker` from another: every chunk failed, "data does not exist".
    module = _example_job()
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert module.Params(source="data").source == str(tmp_path / "data")
    assert module.Params(source="s3://bucket/in/").source == "s3://bucket/in/"


def test_local_listing_leaves_out_dot_directories_as_it_does_dot_files(tmp_path: Path) -> None:
    # The files of a .git/ or .cache/ among the inputs were listed, each a chunk
    # (a black-box helper's find).
    from fanout.inputs import list_inputs

    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "objects" / "ab.csv").write_text("x")
    (tmp_path / ".hidden.csv").write_text("x")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("a")
    assert list_inputs(str(tmp_path)) == [str(tmp_path / "data" / "a.csv")]
