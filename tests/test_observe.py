"""Observability: JSON chunk logs and their levels, EMF metrics, timeouts that
show in ``fanout status`` and ``fanout failed``, ``fanout logs`` and
``fanout status --watch``."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fanout import coordinator
from fanout.backends import open_backend
from fanout.backends.base import Backend, Failure, RunState, TaskKey
from fanout.cli_observe import watch_run
from fanout.dispatch import Dispatcher
from fanout.logs import NOISY_LOGGERS, configure_logging, resolve_level
from fanout.messages import decode
from fanout.metrics import ChunkMetrics, EmfMetrics, emf_document, metrics_for
from fanout.runner import LEASE_GRACE, Attempt, Runner
from support.cli import cli
from support.helpers import TREE, FixedJitter, drain

CHUNK_KEYS = [
    "run_id",
    "chunk_id",
    "seq",
    "attempt",
    "event",
    "duration_s",
    "records",
    "bytes",
    "remaining_s",
]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger (and the noisy libraries' levels) back as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)


@pytest.fixture
def local(home: Path) -> Iterator[Backend]:
    backend = open_backend("local", home=home)
    yield backend
    backend.close()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- JSON logs -----------------------------------------------------------------------


def test_every_chunk_event_is_one_json_line_with_its_fields(
    mem: Backend, restore_logging: None
) -> None:
    out = io.StringIO()
    assert configure_logging(1, fmt="json", stream=out) == logging.INFO
    run_id = coordinator.submit(mem, TREE, {"chunks": 2, "rows": 10, "step": 6}).run_id
    run = drain(mem, run_id)
    assert run.state == RunState.SUCCEEDED
    lines = [d for d in json_lines(out.getvalue()) if d.get("run_id") == run_id]
    assert lines, out.getvalue()
    for d in lines:
        assert list(d)[:4] == ["ts", "level", "logger", "msg"]
        assert d["ts"].endswith("Z") and d["logger"] == "fanout.runner"
        # The chunk fields come next, in their fixed order.
        present = [k for k in list(d)[4:] if k in CHUNK_KEYS]
        assert present == [k for k in CHUNK_KEYS if k in d]
        assert d["remaining_s"] > 0
    by_task: dict[tuple[str, int], list[str]] = {}
    for d in lines:
        by_task.setdefault((d["chunk_id"], d["seq"]), []).append(d["event"])
    # Plan 0, chunks 0/0 and 0/1 in two slices each: claimed, then settled.
    assert by_task == {
        ("0", 0): ["claimed", "committed"],
        ("0/0", 0): ["claimed", "continued"],
        ("0/0", 1): ["claimed", "committed"],
        ("0/1", 0): ["claimed", "continued"],
        ("0/1", 1): ["claimed", "committed"],
    }
    settled = [d for d in lines if d["event"] in ("committed", "continued")]
    assert sum(d["records"] for d in settled) == run.records == 20
    assert sum(d["bytes"] for d in settled) == run.bytes
    for d in settled:
        # Each line says what the ledger recorded for that attempt.
        task = mem.ledger.get_task(TaskKey(run_id, d["chunk_id"], d["seq"]))
        assert task is not None
        (event,) = [e for e in task.history if e["outcome"] == d["event"]]
        assert (d["level"], d["attempt"], d["records"]) == ("INFO", 1, event["records"])
        assert d["duration_s"] == event["duration_s"]
        assert d["msg"] == (
            f"task {task.key} attempt 1 {d['event']}: {d['records']} records"
            f" in {d['duration_s']:.3f}s"
        )


def test_failures_log_at_warning_and_error_with_their_kind(
    mem: Backend, restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    configure_logging(stage="prod", fmt="json", stream=out)  # WARNING: no per-chunk INFO
    run_id = coordinator.submit(
        mem,
        TREE,
        {"chunks": 2, "rows": 2, "fail_chunks": [0, 1], "fail_times": 1},
        {"max_attempts": 1},
    ).run_id
    assert drain(mem, run_id).state == RunState.FAILED
    lines = [d for d in json_lines(out.getvalue()) if d.get("run_id") == run_id]
    assert {d["event"] for d in lines} == {"dead"}  # nothing below WARNING
    assert sorted(d["chunk_id"] for d in lines) == ["0/0", "0/1"]
    for d in lines:
        task = mem.ledger.get_task(TaskKey(run_id, d["chunk_id"], 0))
        assert task is not None
        error = f"RuntimeError: flaky chunk {d['chunk_id'][-1]}, attempt 1"
        assert (d["level"], d["failure"], d["error"]) == ("ERROR", "error", error)
        assert d["duration_s"] == task.history[0]["duration_s"]
        assert d["msg"] == f"task {task.key} is dead after attempt 1: error: {error}"

    out = io.StringIO()
    configure_logging(stage="prod", fmt="json", stream=out)
    # The tree job's back-off: base 0.01 s, so attempt 1's ceiling is 0.01 s;
    # with the jitter fixed at half of it the retry waits 0.005 s.
    monkeypatch.setattr("fanout.retry.JITTER", FixedJitter(0.5))
    run_id = coordinator.submit(
        mem, TREE, {"chunks": 1, "rows": 2, "fail_chunks": [0], "fail_times": 1}
    ).run_id
    assert drain(mem, run_id).state == RunState.SUCCEEDED
    (retried,) = [d for d in json_lines(out.getvalue()) if d.get("run_id") == run_id]
    assert retried["event"] == "retried" and retried["level"] == "WARNING"
    assert retried["attempt"] == 1 and retried["retry_in_s"] == 0.005
    task = mem.ledger.get_task(TaskKey(run_id, "0/0"))
    assert task is not None
    error = "RuntimeError: flaky chunk 0, attempt 1"
    assert (retried["failure"], retried["error"]) == ("error", error)
    assert retried["duration_s"] == task.history[0]["duration_s"]
    assert retried["msg"] == f"task {task.key} attempt 1 error: {error}; retry in 0.0s"


def test_a_jobs_own_log_lines_carry_the_chunk_fields(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging(1, fmt="json", stream=out)
    from fanout.context import ChunkLogger

    ChunkLogger(
        logging.getLogger("fanout.job.x"), {"run_id": "r", "chunk_id": "0/1", "attempt": 2}
    ).info("hello %s", "there", extra={"page": 3, "msg": "not mine"})
    (d,) = json_lines(out.getvalue())
    assert d["msg"] == "hello there" and d["logger"] == "fanout.job.x"
    assert (d["run_id"], d["chunk_id"], d["attempt"], d["page"]) == ("r", "0/1", 2, 3)


def test_log_level_by_stage_env_and_flags(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    monkeypatch.delenv("FANOUT_LOG_LEVEL", raising=False)
    monkeypatch.delenv("AWS_LAMBDA_LOG_LEVEL", raising=False)
    assert resolve_level(0, "dev") == (logging.INFO, None)
    assert resolve_level(0, "prod") == (logging.WARNING, None)
    assert resolve_level(0, None) == (logging.WARNING, None)
    assert resolve_level(2, "prod") == (logging.DEBUG, None)
    monkeypatch.setenv("FANOUT_LOG_LEVEL", "debug")
    assert resolve_level(0, "prod") == (logging.DEBUG, None)
    assert resolve_level(1, "prod") == (logging.INFO, None)  # the flag wins
    monkeypatch.setenv("FANOUT_LOG_LEVEL", "loud")
    level, complaint = resolve_level(0, "dev")
    assert level == logging.INFO and complaint and "FANOUT_LOG_LEVEL" in complaint

    # botocore stays quiet at DEBUG unless -vv asks for it.
    monkeypatch.setenv("FANOUT_LOG_LEVEL", "DEBUG")
    configure_logging(stream=io.StringIO())
    assert logging.getLogger().level == logging.DEBUG
    assert all(logging.getLogger(n).level == logging.WARNING for n in NOISY_LOGGERS)
    assert not logging.getLogger("botocore.endpoint").isEnabledFor(logging.DEBUG)
    configure_logging(2, stream=io.StringIO())
    assert logging.getLogger("botocore.endpoint").isEnabledFor(logging.DEBUG)


def test_json_by_default_on_lambda_and_no_doubled_handler(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    monkeypatch.delenv("FANOUT_LOG_FORMAT", raising=False)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "fanout-dev-worker")
    out = io.StringIO()
    configure_logging(stream=out)
    configure_logging(stream=out)  # a second call replaces, never doubles
    logging.getLogger("fanout.test").warning("once")
    (d,) = json_lines(out.getvalue())
    assert d["msg"] == "once" and d["level"] == "WARNING"
    monkeypatch.setenv("FANOUT_LOG_FORMAT", "text")
    out = io.StringIO()
    configure_logging(stream=out)
    logging.getLogger("fanout.test").warning("plain")
    assert out.getvalue().rstrip().endswith("WARNING fanout.test: plain")


# -- EMF metrics ---------------------------------------------------------------------


def check_emf(doc: dict[str, Any]) -> list[str]:
    """The document's metric names, after checking it against the EMF spec:
    ``_aws`` with an integer millisecond ``Timestamp`` and ``CloudWatchMetrics``
    directives; each names a namespace, dimension sets of root members holding
    strings, and metrics whose root members hold numbers."""
    meta = doc["_aws"]
    assert isinstance(meta["Timestamp"], int)
    assert abs(meta["Timestamp"] / 1000 - time.time()) < 60
    names = []
    for directive in meta["CloudWatchMetrics"]:
        assert isinstance(directive["Namespace"], str) and directive["Namespace"]
        assert len(directive["Dimensions"]) >= 1
        for dimension_set in directive["Dimensions"]:
            assert 1 <= len(dimension_set) <= 30
            for key in dimension_set:
                assert isinstance(doc[key], str) and 0 < len(doc[key]) <= 1024
        assert 1 <= len(directive["Metrics"]) <= 100
        for metric in directive["Metrics"]:
            value = doc[metric["Name"]]
            assert isinstance(value, int | float) and not isinstance(value, bool)
            assert metric["Unit"] in ("Seconds", "Count")
            names.append(metric["Name"])
    return names


def test_emf_document_shape() -> None:
    m = ChunkMetrics("tree", "run-1", "0/3", 2, 1, "committed", 1.23456, 800, False)
    doc = emf_document(m)
    assert check_emf(doc) == ["ChunkDuration", "Records", "Retries"]
    assert doc["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "fanout"
    assert doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["job"]]
    assert (doc["job"], doc["ChunkDuration"], doc["Records"], doc["Retries"]) == (
        "tree",
        1.235,
        800,
        0,
    )
    assert (doc["run_id"], doc["chunk_id"], doc["seq"], doc["outcome"]) == (
        "run-1",
        "0/3",
        2,
        "committed",
    )
    retried = emf_document(ChunkMetrics("", "r", "0", 0, 2, "retried", 0.5, 0, True))
    assert retried["Retries"] == 1 and retried["job"] == "unknown"  # never an empty dimension


def test_runner_prints_one_emf_line_per_settled_attempt(mem: Backend) -> None:
    out = io.StringIO()
    runner = Runner(mem, metrics=EmfMetrics(stream=out))
    run_id = coordinator.submit(
        mem, TREE, {"chunks": 2, "rows": 5, "step": 3, "fail_chunks": [1], "fail_times": 1}
    ).run_id
    run = drain(mem, run_id, runner=runner)
    docs = json_lines(out.getvalue())
    for doc in docs:
        check_emf(doc)
        # The duration is the attempt's, as the ledger recorded it.
        task = mem.ledger.get_task(TaskKey(run_id, doc["chunk_id"], doc["seq"]))
        assert task is not None
        outcome = "error" if doc["outcome"] == "retried" else doc["outcome"]
        (event,) = [e for e in task.history if e["outcome"] == outcome]
        assert doc["ChunkDuration"] == event["duration_s"]
    # plan + 2 chunks x 2 slices + the failed first attempt of each slice of chunk 1
    assert len(docs) == 7
    assert sum(d["Retries"] for d in docs) == run.retries == 2
    assert sum(d["Records"] for d in docs) == run.records == 10
    assert {d["job"] for d in docs} == {"tree"}
    assert sorted(d["outcome"] for d in docs) == [
        "committed",
        "committed",
        "committed",
        "continued",
        "continued",
        "retried",
        "retried",
    ]


def test_metrics_go_to_emf_on_lambda_with_aws_only(
    mem: Backend, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    aws_like = Backend("aws", mem.queue, mem.store, mem.ledger)
    attempt = ChunkMetrics("tree", "run-1", "0/3", 0, 1, "committed", 0.5, 8, False)

    def printed(backend: Backend) -> list[dict[str, Any]]:
        """What the default sink of ``backend`` prints on stdout for one attempt."""
        capsys.readouterr()
        metrics_for(backend).record(attempt)
        return json_lines(capsys.readouterr().out)

    monkeypatch.delenv("FANOUT_METRICS", raising=False)
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    assert printed(aws_like) == []  # `fanout run`'s stdout stays clean
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "fanout-dev-worker")
    (doc,) = printed(aws_like)
    assert check_emf(doc) == ["ChunkDuration", "Records", "Retries"] and doc["Records"] == 8
    assert printed(mem) == []
    monkeypatch.setenv("FANOUT_METRICS", "off")
    assert printed(aws_like) == []
    monkeypatch.setenv("FANOUT_METRICS", "emf")
    (doc,) = printed(mem)
    assert (doc["run_id"], doc["chunk_id"], doc["ChunkDuration"]) == ("run-1", "0/3", 0.5)


# -- timeouts are never silent -------------------------------------------------------


def run_with_a_timeout(backend: Backend, max_attempts: int) -> str:
    """A run whose chunk 0/1 at seq 1 (started from cursor 4) has its first
    attempt killed at the hard timeout, as the worker's supervisor does it:
    the child claimed it, the supervisor fails the attempt it read from the slot."""
    run_id = coordinator.submit(
        backend, TREE, {"chunks": 2, "rows": 10, "step": 4}, {"max_attempts": max_attempts}
    ).run_id
    runner = Runner(backend)
    killed = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for delivery in backend.queue.receive(10, 10 + LEASE_GRACE):
            msg = decode(delivery.body)
            if (msg.chunk_id, msg.seq) == ("0/1", 1) and not killed:
                key, token, now = TaskKey(run_id, "0/1", 1), uuid.uuid4().hex, time.time()
                claim = backend.ledger.claim(key, token, 1 + LEASE_GRACE, max_attempts, now)
                attempt = Attempt(key, token, claim.attempt, delivery.receipt, now + 1, now - 1)
                runner.fail(attempt, Failure("timed out", "chunk exceeded its 1s hard timeout"))
                killed = True
            else:
                Dispatcher(backend, runner).handle(delivery, 10)
        run = backend.ledger.get_run(run_id)
        assert run is not None
        if run.state in (RunState.SUCCEEDED, RunState.FAILED):
            assert killed
            return run_id
        time.sleep(0.005)
    raise AssertionError("the run did not finish")


def test_a_timed_out_attempt_shows_in_status(home: Path, local: Backend) -> None:
    run_id = run_with_a_timeout(local, max_attempts=3)
    st = coordinator.status(local, run_id)
    assert st.run.state == RunState.SUCCEEDED  # retried, and then it worked
    assert (st.timed_out, st.crashed) == (1, 0)
    assert st.last_timeout is not None
    assert (st.last_timeout["chunk_id"], st.last_timeout["seq"]) == ("0/1", 1)
    assert (st.last_timeout["attempt"], st.last_timeout["cursor"]) == (1, 4)
    out = cli(home, "status", run_id)
    assert out.exit_code == 0, out.output
    assert "1 chunk attempt timed out (last: 0/1 seq 1, attempt 1, from cursor 4)" in out.stdout
    d = json.loads(cli(home, "status", run_id, "--json").stdout)
    assert d["timed_out"] == 1 and d["last_timeout"]["cursor"] == 4
    # The ledger kept how long the killed attempt ran.
    task = local.ledger.get_task(TaskKey(run_id, "0/1", 1))
    assert task is not None and task.history[0]["outcome"] == "timed out"
    assert float(task.history[0]["duration_s"]) >= 1.0  # type: ignore[arg-type]


def test_a_chunk_dead_of_a_timeout_says_so_with_its_checkpoint(home: Path, local: Backend) -> None:
    run_id = run_with_a_timeout(local, max_attempts=1)
    assert local.ledger.get_run(run_id).state == RunState.FAILED  # type: ignore[union-attr]
    out = cli(home, "failed", run_id)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0] == ("0/1 (seq 1, 1 attempt): timed out: chunk exceeded its 1s hard timeout")
    assert "    last checkpoint: cursor 4" in lines
    (d,) = json_lines(cli(home, "failed", run_id, "--json").stdout)
    assert d["timed_out"] is True and d["cursor"] == 4
    assert "1 chunk attempt timed out" in cli(home, "status", run_id).stdout


# -- fanout logs ---------------------------------------------------------------------


def test_logs_show_a_runs_chunk_events_in_time_order(home: Path, local: Backend) -> None:
    run_id = coordinator.submit(
        local, TREE, {"chunks": 2, "rows": 3, "fail_chunks": [1], "fail_times": 1}
    ).run_id
    assert drain(local, run_id).state == RunState.SUCCEEDED
    out = cli(home, "logs", run_id)
    assert out.exit_code == 0, out.output
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["time", "(UTC)", "chunk", "seq", "att", "outcome", "details"]
    stamps = [" ".join(r.split()[:2]) for r in rows]
    assert stamps == sorted(stamps) and all(s.endswith("Z") for s in stamps)
    first = datetime.strptime(stamps[0], "%Y-%m-%d %H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(first.timestamp() - coordinator.get_run(local, run_id).created_at) < 60
    events = [(r.split()[2], r.split()[4], r.split()[5]) for r in rows]
    assert [e for e in events if e[0] == "0/1"] == [
        ("0/1", "1", "claimed"),
        ("0/1", "1", "error"),
        ("0/1", "2", "claimed"),
        ("0/1", "2", "committed"),
    ]
    assert len(rows) == 2 * 4  # plan, 0/0 and 0/1 claimed + settled, one failed attempt
    assert any("flaky chunk 1, attempt 1" in r for r in rows)
    assert any("3 records" in r and "bytes" in r for r in rows)

    only = cli(home, "logs", run_id, "--chunk", "0/1", "--json")
    assert only.exit_code == 0, only.output
    docs = json_lines(only.stdout)
    assert [d["outcome"] for d in docs] == ["claimed", "error", "claimed", "committed"]
    for d in docs:
        assert {"run_id", "at", "chunk_id", "seq", "attempt", "outcome"} <= set(d)
        assert d["run_id"] == run_id and d["chunk_id"] == "0/1"
    assert docs[-1]["records"] == 3 and docs[-1]["duration_s"] >= 0


def test_logs_of_an_unknown_run_or_chunk_is_a_one_line_error(home: Path, local: Backend) -> None:
    for args, needle in (
        (("logs", "no-such-run"), "unknown run id"),
        (("cost", "no-such-run"), "unknown run id"),
    ):
        out = cli(home, *args)
        assert out.exit_code == 2 and out.stdout == ""
        assert out.stderr.startswith("error: ") and needle in out.stderr
        assert len(out.stderr.splitlines()) == 1
    run_id = coordinator.submit(local, TREE, {"chunks": 1, "rows": 1}).run_id
    out = cli(home, "logs", run_id, "--chunk", "0/9")
    assert out.exit_code == 2 and "no chunk '0/9'" in out.stderr


# -- fanout status --watch -----------------------------------------------------------


def test_watch_redraws_until_the_run_ends(
    local: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = coordinator.submit(local, TREE, {"chunks": 4, "rows": 5, "step": 2}).run_id
    runner = Runner(local)

    def work_a_little(interval: float) -> None:
        # Stands in for the sleep between redraws: a few deliveries of progress.
        for delivery in local.queue.receive(3, 10 + LEASE_GRACE):
            Dispatcher(local, runner).handle(delivery, 10)

    assert watch_run(local, run_id, 0.1, False, sleep=work_a_little) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 3  # not a terminal: one line per interval
    assert lines[0].startswith("[" + "-" * 24 + "]   0%") and lines[0].endswith("running")
    assert lines[-1].startswith("[" + "#" * 24 + "] 100%") and lines[-1].endswith("succeeded")
    done = [int(line.split("chunks ")[1].split("/")[0].replace(",", "")) for line in lines]
    assert done == sorted(done) and done[-1] == 13  # plan + 4 chunks x 3 slices


def test_status_watch_exit_code_and_json(home: Path, local: Backend) -> None:
    ok = coordinator.submit(local, TREE, {"chunks": 1, "rows": 1}).run_id
    drain(local, ok)
    bad = coordinator.submit(
        local,
        TREE,
        {"chunks": 1, "rows": 1, "fail_chunks": [0], "fail_times": 9},
        {"max_attempts": 1},
    ).run_id
    drain(local, bad)
    out = cli(home, "status", ok, "--watch", "--interval", "0.1")
    assert out.exit_code == 0 and "100%" in out.stdout and "succeeded" in out.stdout
    out = cli(home, "status", bad, "--watch", "--json")
    assert out.exit_code == 1
    (d,) = json_lines(out.stdout)
    assert d["state"] == "failed" and d["finished"] == d["total"] == 2 and d["dead"] == 1
    assert d["eta_s"] is None
    assert cli(home, "status", ok, "--watch", "--interval", "0").exit_code == 2


def test_failed_shortens_a_large_checkpoint_and_json_keeps_it(home: Path, tmp_path: Path) -> None:
    # A chunk that checkpointed a 5 MB cursor and then died made `fanout failed`
    # print all 5 MB of it on one line (a black-box helper's find).
    job = tmp_path / "bigcursor.py"
    job.write_text(
        "from fanout import Job, PermanentError\n"
        "job = Job('bigcursor')\n"
        "@job.process\n"
        "def process(chunk, ctx):\n"
        "    if ctx.cursor is None:\n"
        "        return ctx.resume_at({'blob': 'y' * 300_000})\n"
        "    raise PermanentError('stop here')\n"
    )
    ran = cli(home, "run", str(job), "-w", "1", "--json")
    assert ran.exit_code == 1, ran.output
    run_id = json.loads(ran.stdout.splitlines()[-1])["run_id"]
    out = cli(home, "failed", run_id)
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("    last checkpoint:")]
    assert len(line) < 300 and line.endswith("(300,012 characters)"), line[:400]
    (d,) = json_lines(cli(home, "failed", run_id, "--json").stdout)
    assert d["cursor"] == {"blob": "y" * 300_000}
