"""Bad input to the ``fanout`` command line: exit 2 and one line naming the
problem, never a traceback (a missing or broken job file, params that do not
validate, a home that cannot be made or written, an empty run id).

Commands that start worker processes run as real subprocesses; the others go
through click's CliRunner.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fanout.cli import main
from support.cli import assert_user_error, cli, ok
from support.helpers import TREE
from support.lambda_source import checkout_pythonpath
from support.procs import CLI, fanout

#: The example ETL job (its Params check that ``source`` is a directory).
METER = str(Path(__file__).resolve().parents[1] / "jobs" / "meter_readings.py")

WORK = ["-w", "2", "--chunk-timeout", "10"]

# -- bad input: exit 2, one line -------------------------------------------------

SYNTAX_ERROR = "def broken(:\n"
NO_JOB = "x = 1\n"
BAD_SCHEMA = """\
from fanout import Job

job = Job("noschema", schema="no_such_schema")


@job.process
def process(payload, ctx):
    pass
"""

ODD_SCHEMA = """
from fanout import Job
job = Job("odd", schema=42)
"""
ODD_PARAMS = """
from fanout import Job
class Params:
    rows = 1
job = Job("odd", params=Params)
"""
RAISING_VALIDATOR = """
from pydantic import BaseModel, field_validator
from fanout import Job
class Params(BaseModel):
    a: int = 1
    @field_validator("a")
    @classmethod
    def check(cls, value):
        raise RuntimeError("boom")
job = Job("odd", params=Params)
@job.process
def process(chunk, ctx):
    return None
"""

GENERATOR_PROCESS = """
from fanout import Job
job = Job("gen", schema={"type": "record", "name": "r", "fields": [{"name": "n", "type": "long"}]})
@job.process
def process(chunk, ctx):
    for n in range(100):
        yield {"n": n}
"""

#: A job without a Params model or a plan: its params are its one chunk's payload.
DICT_JOB = """
from fanout import Job
job = Job("dict")
@job.process
def process(chunk, ctx):
    return None
"""
FLOAT_JOB = """
from pydantic import BaseModel
from fanout import Job
class Params(BaseModel):
    scale: float = 1.0
job = Job("floaty", params=Params)
@job.process
def process(chunk, ctx):
    return None
"""
_BIG_INT = "9" * 5000  # past Python's 4,300 digits of int-to-text conversion
_DEEP = "[" * 250 + "]" * 250  # deeper than a message may nest (200)
_DEEPER = "[" * 5000 + "]" * 5000  # deeper than Python's JSON decoder goes

#: Params no message can carry: they used to crash `submit` (a ValueError,
#: RecursionError or MessageError traceback), or pass it and fail later.
UNENCODABLE_PARAMS: list[tuple[str, dict[str, str], list[str], list[str]]] = (
    [
        (
            f"params {name} ({job})",
            {"p.json": text, "dict.py": DICT_JOB},
            ["submit", path, "--params-file", "{tmp}/p.json"],
            ["p.json" if name.startswith("file") else "params", *needles],
        )
        for job, path in (("dict job", "{tmp}/dict.py"), ("model job", TREE))
        for name, text, needles in (
            ("file with a huge int", f'{{"rows": {_BIG_INT}}}', ["4300 digits"]),
            ("file nested too deep for JSON", f'{{"rows": {_DEEPER}}}', ["nested too deep"]),
        )
    ]
    + [
        (
            f"params {name}",
            {"p.json": text, "dict.py": DICT_JOB},
            ["submit", "{tmp}/dict.py", "--params-file", "{tmp}/p.json"],
            ["params", *needles],
        )
        for name, text, needles in (
            ("with NaN", '{"x": NaN}', ["x", "NaN"]),
            ("with Infinity", '{"x": [1, -Infinity]}', ["x.1", "NaN"]),
            ("nested too deep", f'{{"x": {_DEEP}}}', ["nested", "deep"]),
            ("with a lone surrogate", '{"x": "\\ud800"}', ["x", "lone surrogate"]),
        )
    ]
    + [
        # validate and schedule add said ok to what submit refuses (a schedule
        # then failed at every tick): one check, in Job.validate_params, for all.
        (
            f"{' '.join(argv[:2])} with an infinite param",
            {"f.py": FLOAT_JOB},
            [*argv, "{tmp}/f.py", "-p", "scale=inf"],
            ["params.scale", "inf is not JSON"],
        )
        for argv in (["validate"], ["schedule", "add", "s", "--cron", "@daily"], ["submit"])
    ]
    + [
        (
            "param with a huge int",
            {"dict.py": DICT_JOB},
            ["submit", "{tmp}/dict.py", "-p", f"x=[{_BIG_INT}]"],
            ["--param 'x'", "4300 digits"],
        ),
        (
            "param nested too deep for JSON",
            {"dict.py": DICT_JOB},
            ["submit", "{tmp}/dict.py", "-p", f"x={_DEEPER}"],
            ["--param 'x'", "nested too deep"],
        ),
    ]
)

#: (name, files to write, argv with {tmp} for the directory, what the message names)
BAD_INPUT: list[tuple[str, dict[str, str], list[str], list[str]]] = [
    ("missing job file", {}, ["validate", "{tmp}/missing.py"], ["missing.py", "does not exist"]),
    (
        "syntax error",
        {"syn.py": SYNTAX_ERROR},
        ["submit", "{tmp}/syn.py"],
        ["syn.py", "SyntaxError", "line 1"],
    ),
    ("no Job", {"nojob.py": NO_JOB}, ["validate", "{tmp}/nojob.py"], ["defines no Job"]),
    ("no such attr in file", {}, ["validate", TREE + ":nope"], ["no Job named 'nope'"]),
    (
        "no such attr in module",
        {},
        ["submit", "fanout.jobs:nope"],
        ["module fanout.jobs", "no Job named 'nope'"],
    ),
    ("no such module", {}, ["validate", "no_such_module_xyz:job"], ["no_such_module_xyz"]),
    ("invalid param", {}, ["submit", TREE, "-p", "rows=abc"], ["rows", "integer"]),
    ("invalid list param", {}, ["validate", TREE, "-p", 'fail_chunks=["x"]'], ["fail_chunks"]),
    ("param without =", {}, ["submit", TREE, "-p", "rows"], ["--param 'rows'", "KEY=VALUE"]),
    # The last one won, silently.
    (
        "param twice",
        {},
        ["submit", TREE, "-p", "rows=1", "-p", "rows=2"],
        ["'rows' is given twice"],
    ),
    (
        "setting twice",
        {},
        ["run", TREE, "-S", "max_attempts=2", "-S", "max_attempts=3"],
        ["--setting 'max_attempts' is given twice"],
    ),
    (
        "params file missing",
        {},
        ["submit", TREE, "--params-file", "{tmp}/nope.json"],
        ["nope.json", "does not exist"],
    ),
    (
        "params file not JSON",
        {"bad.json": "{rows: 1"},
        ["validate", TREE, "--params-file", "{tmp}/bad.json"],
        ["bad.json", "not valid JSON"],
    ),
    (
        "params file not an object",
        {"list.json": "[1, 2]"},
        ["submit", TREE, "--params-file", "{tmp}/list.json"],
        ["list.json", "JSON object"],
    ),
    (
        # The last one won in silence, where a repeated -p key is refused.
        "params file with a key twice",
        {"twice.json": '{"chunks": 2, "opts": {"a": 1}, "chunks": 3}'},
        ["submit", TREE, "--params-file", "{tmp}/twice.json"],
        ["twice.json", "gives key 'chunks' twice"],
    ),
    (
        # click kept the last of two: the first file's params were dropped unseen.
        "params file given twice",
        {"a.json": '{"chunks": 2}', "b.json": '{"rows": 3}'},
        ["validate", TREE, "--params-file", "{tmp}/a.json", "--params-file", "{tmp}/b.json"],
        ["--params-file is given more than once"],
    ),
    ("setting out of range", {}, ["submit", TREE, "-S", "max_attempts=0"], ["max_attempts"]),
    (
        # Taken as given (a black-box helper's find): no count needs more than 10**9.
        "a count past any run",
        {},
        ["submit", TREE, "-S", f"max_concurrency={10**23}"],
        ["max_concurrency", "less than or equal to 1000000000"],
    ),
    ("unknown setting", {}, ["submit", TREE, "-S", "max_attempt=2"], ["max_attempt"]),
    ("setting without =", {}, ["submit", TREE, "-S", "max_attempts"], ["KEY=VALUE"]),
    ("bad setting on validate", {}, ["validate", TREE, "-S", "codec=zstd"], ["codec"]),
    (
        "schema name not found",
        {"noschema.py": BAD_SCHEMA},
        ["submit", "{tmp}/noschema.py"],
        ["no_such_schema", "not found"],
    ),
    (
        "schema name not found on validate",
        {"noschema.py": BAD_SCHEMA},
        ["validate", "{tmp}/noschema.py"],
        ["no_such_schema"],
    ),
    ("status of unknown run", {}, ["status", "tree-nope"], ["unknown run id 'tree-nope'"]),
    ("failed of unknown run", {}, ["failed", "tree-nope"], ["unknown run id 'tree-nope'"]),
    ("replay of unknown run", {}, ["replay", "tree-nope"], ["unknown run id 'tree-nope'"]),
    ("cat of unknown run", {}, ["cat", "tree-nope"], ["unknown run id 'tree-nope'"]),
    # Found by an adversarial pass: each printed a traceback, or said nothing.
    ("runs past any limit", {}, ["runs", "-n", str(2**63)], ["--limit", "1<=x<=1000000"]),
    (
        "a chunk memory past any machine's",
        {},
        ["worker", "--until-idle", "--chunk-memory", "99999999999999999999"],
        ["--chunk-memory", "16<=x<=67108864"],
    ),
    *(
        (f"{command} of a path for a table", {}, [command, name], [repr(name), "no table name"])
        for command, name in (
            ("read", ".."),
            ("schema", ""),
            ("compact", "a/../../b"),
            ("read", "t\n"),  # ($ matched before a final newline)
        )
    ),
    ("a priority of 0", {}, ["submit", TREE, "-S", "priority=0.000"], ["priority", "more than 0"]),
    (
        "deploy to a stage no bucket can be named",
        {},
        ["deploy", "--stage", "Bad_Stage!/../x", "--dry-run", "--root", "{tmp}"],
        ["stage 'Bad_Stage!/../x'", "lowercase"],
    ),
    # Bytes that are not UTF-8 (they arrive as lone surrogates) went to the
    # ledger and came back a UnicodeEncodeError traceback.
    *(
        (f"{command} of an undecodable run id", {}, [command, "ab\udcffcd"], ["no run id", "UTF-8"])
        for command in ("status", "cat", "cancel", "logs", "failed", "replay")
    ),
    *(
        (
            f"schedule {command} of an undecodable name",
            {},
            ["schedule", command, "s\udcff"],
            ["no schedule named"],
        )
        for command in ("show", "remove")
    ),
    ("status without runs", {}, ["status"], ["no runs yet"]),
    ("cat without runs", {}, ["cat"], ["no runs yet"]),
    ("misspelled param", {}, ["submit", TREE, "-p", "row=5"], ["unknown param 'row'", "rows"]),
    # The example's: it planned nothing (an empty source is the current
    # directory) and succeeded, or a dead plan chunk told of the typo.
    ("no such source", {}, ["submit", METER, "-p", "source={tmp}/nope"], ["nope", "directory"]),
    ("empty source", {}, ["validate", METER, "-p", "source="], ["source", "not a directory"]),
    ("missing argument", {}, ["run"], ["Missing argument 'JOB'", "fanout run --help"]),
    ("unknown option", {}, ["--bogus", "runs"], ["No such option '--bogus'"]),
    ("out of range option", {}, ["worker", "--workers", "0"], ["--workers", "0"]),
    ("a storm of workers", {}, ["run", TREE, "-w", "100000"], ["--workers", "1<=x<=256"]),
    # A NaN passes every range check; an endless timeout or back-off never ends.
    ("nan chunk timeout", {}, ["run", TREE, "--chunk-timeout", "nan"], ["not a finite number"]),
    ("endless chunk timeout", {}, ["worker", "--chunk-timeout", "inf"], ["--chunk-timeout"]),
    ("endless back-off", {}, ["submit", TREE, "-S", "backoff_base=1e308"], ["backoff_base"]),
    ("nan back-off cap", {}, ["submit", TREE, "-S", "backoff_cap=nan"], ["backoff_cap", "finite"]),
    ("param not UTF-8", {}, ["submit", TREE, "-p", "rows=\udcff"], ["'rows'", "not valid UTF-8"]),
    ("schema of a wrong type", {"s42.py": ODD_SCHEMA}, ["validate", "{tmp}/s42.py"], ["schema"]),
    (
        "params that are not a model",
        {"pp.py": ODD_PARAMS},
        ["validate", "{tmp}/pp.py"],
        ["params must be a pydantic BaseModel class"],
    ),
    (
        # It ran no code and "succeeded" with 0 records: calling a generator
        # function only makes the generator.
        "a process that is a generator",
        {"gen.py": GENERATOR_PROCESS},
        ["validate", "{tmp}/gen.py"],
        ["process process() is a generator", "ctx.emit"],
    ),
    (
        "a params validator that raises",
        {"pv.py": RAISING_VALIDATOR},
        ["submit", "{tmp}/pv.py", "-p", "a=2"],
        ["the params model raised RuntimeError: boom"],
    ),
    (
        # `submit` exited 0 with no run id and no run made.
        "a params validator that exits",
        {"pv.py": RAISING_VALIDATOR.replace('RuntimeError("boom")', "SystemExit(0)")},
        ["submit", "{tmp}/pv.py", "-p", "a=2"],
        ["the params model raised SystemExit"],
    ),
    (
        # A traceback and exit 1.
        "a params validator that raises a BaseException",
        {"pv.py": RAISING_VALIDATOR.replace('RuntimeError("boom")', "GeneratorExit('odd')")},
        ["validate", "{tmp}/pv.py", "-p", "a=2"],
        ["the params model raised GeneratorExit: odd"],
    ),
    (
        "a rate that never fires",
        {},
        ["schedule", "add", "s", TREE, "--cron", "rate(99999999999999999999 days)"],
        ["never fire"],
    ),
    (
        "a start in year 9999",
        {},
        ["schedule", "add", "s", TREE, "--cron", "*/5 * * * *", "--start", "9999-12-31T23:59Z"],
        ["--start", "1970 to 2099"],
    ),
]


@pytest.mark.parametrize(
    ("files", "argv", "needles"),
    [pytest.param(f, a, n, id=name) for name, f, a, n in BAD_INPUT + UNENCODABLE_PARAMS],
)
def test_bad_input_is_one_line_and_exit_2(
    home: Path, tmp_path: Path, files: dict[str, str], argv: list[str], needles: list[str]
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert_user_error(cli(home, *args), *needles)
    if home.exists():
        # Nothing was submitted.
        assert ok(cli(home, "runs", "--json")) == ""


@pytest.mark.parametrize(
    "make_args",
    [
        pytest.param(lambda tmp: ["run", str(tmp / "missing.py")], id="missing job file"),
        pytest.param(lambda tmp: ["run", TREE, "-p", "chunks=many"], id="invalid param"),
        pytest.param(lambda tmp: ["run", TREE, "-S", "max_attempts=0"], id="bad setting"),
        pytest.param(lambda tmp: ["replay", "tree-nope", "--work"], id="replay unknown run"),
    ],
)
def test_bad_input_to_worker_commands_in_a_real_process(
    home: Path, tmp_path: Path, make_args: Callable[[Path], list[str]]
) -> None:
    result = fanout(home, *make_args(tmp_path), *WORK, timeout=30)
    line = assert_user_error(result)
    assert "\n" not in line
    if home.exists():
        assert ok(cli(home, "runs", "--json")) == ""


def test_a_home_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    assert_user_error(cli(tmp_path / "a-file" / "home", "runs"), "cannot use", "Not a directory")


def test_a_home_on_a_pseudo_file_system_is_not_called_full(tmp_path: Path) -> None:
    # /proc reports no free blocks, having none at all: the reason is what the
    # system said, not "disk is full".
    line = assert_user_error(cli(Path("/proc/fanout-home"), "runs"), "cannot use")
    assert "full" not in line, line


def test_an_empty_home_is_refused_not_taken_for_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    empty = CliRunner().invoke(main, ["--home", "", "runs"], prog_name="fanout")
    assert_user_error(empty, "--home", "is empty")
    assert list(tmp_path.iterdir()) == []  # no database among the user's files


def test_output_that_cannot_be_written_is_one_line(home: Path, tmp_path: Path) -> None:
    # In a process of its own: the supervisor gc.freeze()s the process it runs in.
    assert fanout(home, "run", TREE, "-p", "chunks=1", "-w", "1").returncode == 0
    run_id = json.loads(ok(cli(home, "runs", "--json")).splitlines()[0])["run_id"]
    missing = tmp_path / "no-such-dir" / "report.html"
    result = cli(home, "report", run_id, "-o", str(missing))
    assert_user_error(result, "cannot write", "report.html")


# -- a home that cannot be written -------------------------------------------------

HOME_COMMANDS = [
    ["runs"],
    ["status"],
    ["submit", TREE, "-p", "chunks=1"],
    ["cat"],
    ["failed", "x"],
    ["replay", "x"],
    ["cancel", "x"],
    ["worker", "--until-idle", "-w", "1"],
    ["run", TREE, "-p", "chunks=1", "-w", "1"],
    ["schedule", "list"],
]


@pytest.mark.parametrize(
    ("fault", "named"),
    [("read-only", "read-only file system"), ("full", "no space left")],
)
def test_a_home_that_cannot_be_written_is_one_line_and_exit_2(
    tmp_path: Path, fault: str, named: str
) -> None:
    # Every command opened the ledger's SQLite database, which failed deep
    # inside (sqlite3.OperationalError: unable to open database file / disk
    # I/O error): a traceback and exit 1, naming neither the home nor why.
    from support.small_disk import fanout_on_small_disk, namespaces_available

    if not namespaces_available():
        pytest.skip("needs unshare --user --mount for a file system of the test's own")
    setup = [["submit", TREE, "-p", "chunks=1"]]
    results = fanout_on_small_disk(tmp_path, setup, fault, HOME_COMMANDS)
    for command, result in zip(HOME_COMMANDS, results, strict=True):
        line = assert_user_error(result, named)
        assert "home" in line, (command, line)


def test_a_home_that_fills_up_during_a_command_is_one_line_and_exit_2(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import sqlite3

    from fanout import coordinator

    ok(cli(home, "runs"))  # the home opens fine; the disk fills up later

    def full(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(coordinator, "submit", full)
    assert_user_error(cli(home, "submit", TREE), "cannot use", "as fanout's home")

    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(home / "runs" / "x"))

    monkeypatch.setattr(coordinator, "submit", no_space)
    assert_user_error(cli(home, "submit", TREE), "no space left")

    def bug(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("no such table: runs")

    monkeypatch.setattr(coordinator, "submit", bug)  # not the user's to fix: a traceback
    assert isinstance(cli(home, "submit", TREE).exception, sqlite3.OperationalError)


@pytest.mark.parametrize(
    ("params", "needles"),
    [
        pytest.param({1: "x"}, ["params", "key", "string"], id="int key"),
        pytest.param({(1, 2): "x"}, ["params", "key", "string"], id="tuple key"),
        pytest.param({"x": {1, 2}}, ["params.x", "not a valid JSON value"], id="a set"),
        pytest.param({"x": 10**5000}, ["params.x", "4300 digits"], id="huge int"),
        pytest.param({"x": float("nan")}, ["params.x", "NaN"], id="nan"),
    ],
)
def test_submit_refuses_params_no_message_can_carry(
    tmp_path: Path, params: dict[Any, Any], needles: list[str]
) -> None:
    from fanout import coordinator
    from fanout.backends import open_backend
    from fanout.errors import ParamsError

    (tmp_path / "dict.py").write_text(DICT_JOB)
    backend = open_backend("memory")
    try:
        with pytest.raises(ParamsError) as caught:
            coordinator.submit(backend, str(tmp_path / "dict.py"), params)
        for needle in needles:
            assert needle in str(caught.value), (needle, str(caught.value))
        assert backend.ledger.list_runs() == []
    finally:
        backend.close()


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["cat", ""], id="cat"),
        pytest.param(["status", ""], id="status"),
        pytest.param(["status", "", "--json"], id="status json"),
        pytest.param(["status", " "], id="status blank"),
        pytest.param(["failed", ""], id="failed"),
        pytest.param(["logs", ""], id="logs"),
        pytest.param(["cost", ""], id="cost"),
        pytest.param(["replay", ""], id="replay"),
        pytest.param(["cancel", ""], id="cancel"),
        pytest.param(["pause", ""], id="pause"),
        pytest.param(["resume", ""], id="resume"),
        pytest.param(["report", ""], id="report"),
    ],
)
def test_an_empty_run_id_is_one_line_and_exit_2(home: Path, argv: list[str]) -> None:
    # `fanout cat ''` (a variable that was empty) showed the latest run's
    # records, as if no run id had been given: someone else's output.
    run_id = ok(cli(home, "submit", TREE, "-p", "chunks=1")).strip()
    line = assert_user_error(cli(home, *argv), "run id", "empty")
    assert run_id not in line


# -- AWS that cannot be reached or signed in to from here ---------------------------

FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
AWS_STACK = {
    "FANOUT_AWS_QUEUE": "https://sqs.us-east-1.amazonaws.com/123456789012/q",
    "FANOUT_AWS_BUCKET": "b",
    "FANOUT_AWS_TABLE": "t",
}


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"AWS_DEFAULT_REGION": "", "AWS_REGION": ""}, "no AWS region"),
        (
            {
                "AWS_ACCESS_KEY_ID": "",
                "AWS_SECRET_ACCESS_KEY": "",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                "AWS_CONFIG_FILE": "/nonexistent",
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_DEFAULT_REGION": "us-east-1",
            },
            "no usable AWS credentials",
        ),
        # These were tracebacks: a ValueError, botocore's InvalidRegionError.
        (
            {**FAKE_KEYS, "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": "not-a-url"},
            "Invalid endpoint: not-a-url (check AWS_ENDPOINT_URL",
        ),
        ({**FAKE_KEYS, "AWS_REGION": "bad!region"}, "'bad!region' doesn't match a supported"),
        # botocore's ProfileNotFound: a traceback (a black-box helper's find).
        (
            {**FAKE_KEYS, "AWS_REGION": "us-east-1", "AWS_PROFILE": "nope"},
            "(check AWS_PROFILE and AWS_CONFIG_FILE)",
        ),
    ],
    ids=["no region", "no credentials", "endpoint not a URL", "region not a region", "profile"],
)
def test_aws_that_cannot_be_signed_in_to_is_one_line(
    tmp_path: Path, env: dict[str, str], needle: str
) -> None:
    # These were botocore tracebacks (NoRegionError, NoCredentialsError).
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    clean.update({**AWS_STACK, **{k: v for k, v in env.items() if v}})
    result = subprocess.run(
        [sys.executable, "-m", "fanout.cli", "--backend", "aws", "runs"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "PYTHONPATH": checkout_pythonpath(), "HOME": str(tmp_path)},
    )
    assert_user_error(result, needle)


def test_an_endpoint_that_is_down_is_named_in_one_line_within_seconds(tmp_path: Path) -> None:
    # Nothing listens on port 9 here: connections are refused. With a worker's
    # 10 attempts per call, `fanout status` took ~45 s to say so; a command a
    # person waits on takes botocore's default 3.
    import socket

    with socket.socket() as probe:  # a port surely closed: bound, never listening
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_STACK)
        env.update(
            AWS_ACCESS_KEY_ID="x",
            AWS_SECRET_ACCESS_KEY="y",
            AWS_REGION="us-east-1",
            AWS_ENDPOINT_URL=endpoint,
            PYTHONPATH=checkout_pythonpath(),
            HOME=str(tmp_path),
        )
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "fanout.cli", "--backend", "aws", "status", "abc"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        took = time.monotonic() - started
    assert_user_error(
        result, f'cannot reach AWS: Could not connect to the endpoint URL: "{endpoint}/'
    )
    assert took < 15, f"{took:.1f}s to give up"


def test_errors_that_are_not_the_users_to_fix_are_left_alone() -> None:
    from fanout.cli_common import aws_problem

    assert aws_problem(RuntimeError("a bug")) is None


def test_replay_refuses_a_job_that_still_does_not_load(home: Path, tmp_path: Path) -> None:
    """A replay of a run whose job file is broken was taken: each dead chunk
    spent its attempts on the import error and died again. Now one line, exit
    2, and nothing reopened; after the fix the replay goes through."""
    from fanout import coordinator
    from fanout.backends import open_backend
    from support.helpers import drain

    job = tmp_path / "flaky.py"
    failing = "@job.process\ndef process(chunk, ctx):\n    raise ValueError('bad input')\n"
    header = "from fanout import Job\njob = Job('flaky')\n"
    job.write_text(header + failing)
    backend = open_backend("local", home=home)
    try:
        run_id = coordinator.submit(backend, str(job), settings={"max_attempts": 1}).run_id
        assert drain(backend, run_id).state == "failed"
    finally:
        backend.close()
    job.write_text(header + "def broken(:\n")
    assert_user_error(cli(home, "replay", run_id), run_id, "must load before a replay", "flaky.py")
    assert "dead" in ok(cli(home, "status", run_id))  # nothing was reopened
    job.write_text(header + "@job.process\ndef process(chunk, ctx):\n    return None\n")
    assert "replaying 1 chunk" in cli(home, "replay", run_id).output


def test_a_directory_named_as_a_job_is_told_so(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `fanout run data` (a directory, no .py) was imported as a namespace
    # package and refused as "module data defines no Job".
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m fanout.cli` has the cwd
    assert_user_error(cli(home, "run", "data"), "data is a directory", "name a job file")


@pytest.mark.parametrize("damage", ["truncated", "a damaged block"])
def test_cat_and_read_of_a_damaged_output_file_is_one_line(
    home: Path, tmp_path: Path, damage: str
) -> None:
    # A truncated file: "aborted", exit 130 (fastavro's EOFError, which click
    # takes for Ctrl-D); a damaged deflate block: a zlib.error traceback.
    table_job = str(Path(__file__).parent / "testjobs" / "readings_table.py")
    for job in (METER, table_job):
        done = fanout(home, "run", job, *WORK, timeout=120)
        assert done.returncode == 0, done.stderr
    for path in sorted((home / "store").rglob("*.avro")):
        data = path.read_bytes()
        if damage == "truncated":
            path.write_bytes(data[: len(data) // 2])
        else:  # bytes in the middle of the first block, past the header
            middle = len(data) // 2
            path.write_bytes(data[:middle] + b"\xff" * 64 + data[middle + 64 :])
    meter_run = json.loads(ok(cli(home, "runs", "--json")).splitlines()[-1])["run_id"]
    # cat streams: the records of blocks before the damage may already be out
    # (as zcat does); the error is still one line and exit 2.
    line = assert_user_error(
        fanout(home, "cat", meter_run), "cannot be read as Avro", streamed=True
    )
    assert f"runs/{meter_run}/" in line
    assert_user_error(fanout(home, "read", "readings"), "cannot be read as Avro", streamed=True)
    # A traceback from compact (a black-box helper's table of an unreadable file).
    assert_user_error(fanout(home, "compact", "readings"), "cannot be read as Avro")


def _meter_run_redirected(home: Path, redirection: str) -> subprocess.CompletedProcess[str]:
    """``fanout run`` of the example job through a shell, with ``redirection``."""
    command = f"{shlex.join([*CLI, '--home', str(home), 'run', METER, *WORK])} {redirection}"
    return subprocess.run(
        ["sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "PYTHONPATH": checkout_pythonpath()},
    )


@pytest.mark.parametrize("closed", [">&-", "2>&-", "<&-", ">&- 2>&- <&-"])
def test_fanout_run_with_standard_streams_closed_runs_its_job(home: Path, closed: str) -> None:
    # Cron jobs and daemons may start a command with fd 1 or 2 closed. With
    # stdout closed, each worker child died flushing it and was started again,
    # for ever (tracebacks at 30 a second); with stderr closed, `fanout run`
    # exited 1 in silence after its submit, the run left with no worker.
    done = _meter_run_redirected(home, closed)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads(ok(cli(home, "runs", "--json")).splitlines()[-1])
    assert run["state"] == "succeeded" and run["records"] == 4000, run


def test_fanout_run_into_a_full_stdout_does_not_blame_the_home(home: Path) -> None:
    # `fanout run > /dev/full` said "cannot use HOME as fanout's home: its disk
    # is full" (its home had 77 GB free) of a run that had succeeded.
    done = _meter_run_redirected(home, "> /dev/full")
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot write: no space left on the device of standard output")
    assert "fanout's home" not in line


def test_a_job_module_under_the_current_directory_not_on_the_path_is_named_with_a_hint(
    home: Path, tmp_path: Path
) -> None:
    # The `fanout` script, unlike `python -m`, has no current directory on its
    # module path: `fanout validate jobs.meter_readings:job` from the repository
    # said only "not found" (a black-box helper's find). -P: as the script does.
    (tmp_path / "myjobs").mkdir()
    (tmp_path / "myjobs" / "__init__.py").write_text("")
    (tmp_path / "myjobs" / "j.py").write_text("from fanout import Job\njob = Job('j')\n")
    done = subprocess.run(
        [*CLI[:1], "-P", *CLI[1:], "--home", str(home), "validate", "myjobs.j:job"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": checkout_pythonpath()},
    )
    line = assert_user_error(done, "job module myjobs.j not found")
    assert "under the current directory" in line and "myjobs/j.py" in line, line


def test_a_home_whose_schedules_table_is_another_tools_is_one_line(tmp_path: Path) -> None:
    # Its fanout.db had a `schedules` table of its own: schedule list/add and
    # the scheduler printed sqlite3 tracebacks (a black-box helper's find).
    import sqlite3

    home = tmp_path / "other"
    home.mkdir()
    with sqlite3.connect(home / "fanout.db") as db:
        db.execute("CREATE TABLE schedules (id INTEGER PRIMARY KEY, cron TEXT)")
    for args in (("schedule", "list"), ("scheduler", "--at", "2030-01-01T00:00Z")):
        assert_user_error(cli(home, *args), "cannot use", "schedules table is not fanout's")


def test_a_group_without_its_command_prints_its_help_not_one_squashed_line() -> None:
    for args in ([], ["schedule"]):
        result = CliRunner().invoke(main, args, prog_name="fanout")
        assert result.exit_code == 2, result.output
        assert result.output.startswith("Usage: fanout"), result.output
        assert "\nCommands:\n" in result.output and "Traceback" not in result.output


def test_the_memory_backend_is_not_offered_on_the_command_line(tmp_path: Path) -> None:
    # It is a backend of one process, for tests: `fanout --backend memory run`
    # showed "running 0/1" for ever, its workers each with a memory of their own.
    result = CliRunner().invoke(main, ["--backend", "memory", "runs"], prog_name="fanout")
    assert_user_error(result, "'memory' is not one of 'local', 'aws'")


def test_a_home_a_newer_fanout_made_is_refused_in_one_line(tmp_path: Path) -> None:
    # A home of another layout was used as it was: a task insert that broke a
    # newer column's NOT NULL was skipped without a word (INSERT OR IGNORE),
    # and `fanout run` showed "running 0/1" for ever (a black-box helper's find).
    import sqlite3

    home = tmp_path / "home"
    ok(cli(home, "runs"))
    with sqlite3.connect(home / "fanout.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1  # stamped
        db.execute("PRAGMA user_version = 7")
    assert_user_error(cli(home, "runs"), "a newer fanout made it (home format 7")


def test_https_to_a_plain_http_endpoint_is_one_line(tmp_path: Path) -> None:
    # botocore's SSLError is an OSError too: it was taken for the local home's
    # problem, and re-raised as a traceback (a black-box helper's find).
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            AWS_STACK,
            AWS_ACCESS_KEY_ID="x",
            AWS_SECRET_ACCESS_KEY="y",
            AWS_REGION="us-east-1",
            AWS_ENDPOINT_URL=f"https://127.0.0.1:{server.server_address[1]}",
            PYTHONPATH=checkout_pythonpath(),
            HOME=str(tmp_path),
        )
        result = subprocess.run(
            [sys.executable, "-m", "fanout.cli", "--backend", "aws", "runs"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert_user_error(result, "cannot reach AWS: SSL validation failed")
