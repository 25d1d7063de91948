"""The ``fanout`` command line as a user meets it: happy paths of every command,
exit codes (0 ok, 1 run failed); bad input is in ``test_cli_errors.py``.

Commands that start worker processes (``run``, ``worker``, ``replay --work``)
run as real subprocesses; the others go through click's CliRunner.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from support.cli import assert_user_error, cli, ok, p
from support.helpers import TREE
from support.procs import fanout, run_id_of
from testjobs.tree import Params, expected_items

WORK = ["-w", "2", "--chunk-timeout", "10"]


# -- helpers ---------------------------------------------------------------------


def items(home: Path, run_id: str) -> Counter[str]:
    return Counter(json.loads(line)["item"] for line in ok(cli(home, "cat", run_id)).splitlines())


def assert_exact_output(home: Path, run_id: str, **params: Any) -> None:
    got = items(home, run_id)
    assert sorted(i for i, n in got.items() if n > 1) == []
    assert set(got) == expected_items(Params(**params))


def status(home: Path, run_id: str) -> dict[str, Any]:
    st: dict[str, Any] = json.loads(ok(cli(home, "status", run_id, "--json")))
    return st


def manifest(home: Path, run_id: str) -> dict[str, Any]:
    key = status(home, run_id)["manifest"]
    assert key is not None
    m: dict[str, Any] = json.loads((home / "store" / key).read_text())
    return m


# -- happy paths -----------------------------------------------------------------


def test_run_then_status_runs_cat_failed(home: Path) -> None:
    params = {"chunks": 4, "rows": 25, "step": 10}
    result = fanout(home, "run", TREE, *p(**params), *WORK)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    run_id = run_id_of(result)
    out = result.stdout.splitlines()
    assert out[0].startswith(f"run {run_id} succeeded: 100 records")
    assert out[-1] == f"manifest: {home / 'store' / 'runs' / run_id / '_manifest.json'}"

    st = status(home, run_id)
    # The plan task, then 4 chunks of 3 slices each (10 + 10 + 5 rows).
    assert st["run_id"] == run_id and st["job"] == "tree" and st["state"] == "succeeded"
    assert st["chunks"] == {"queued": 0, "running": 0, "done": 13, "dead": 0, "cancelled": 0}
    assert st["records"] == 100 and st["outstanding"] == 0 and st["retries"] == 0
    assert st["finished_at"] >= st["created_at"]
    m = manifest(home, run_id)
    assert m["state"] == "succeeded" and m["records"] == 100 and m["dead_chunks"] == []
    assert sum(f["records"] for f in m["files"]) == 100

    # Without a run id: the latest run.
    text = ok(cli(home, "status")).splitlines()
    assert text[0].startswith(f"{run_id}  succeeded  chunks 13/13")
    assert text[1] == "chunks: queued 0, running 0, done 13, dead 0, cancelled 0"

    runs = [json.loads(line) for line in ok(cli(home, "runs", "--json")).splitlines()]
    assert [(r["run_id"], r["job"], r["state"], r["records"]) for r in runs] == [
        (run_id, "tree", "succeeded", 100)
    ]
    listing = ok(cli(home, "runs")).splitlines()
    assert len(listing) == 1 and listing[0].split()[:3] == [run_id, "succeeded", "100"]

    assert_exact_output(home, run_id, **params)
    assert ok(cli(home, "cat")) == ok(cli(home, "cat", run_id))  # latest run
    assert len(ok(cli(home, "cat", run_id, "-n", "7")).splitlines()) == 7

    assert ok(cli(home, "failed", run_id)) == f"run {run_id} has no dead chunks\n"
    assert ok(cli(home, "failed", run_id, "--json")) == ""
    assert_user_error(cli(home, "replay", run_id), "has no dead chunks")
    assert_user_error(cli(home, "replay", run_id, "--chunk", "0/1"), "no dead chunk '0/1'")


def test_status_shows_a_job_s_own_counters_as_its_stats(home: Path) -> None:
    result = fanout(home, "run", TREE, *p(chunks=3, rows=2, stat_names=2), *WORK)
    assert result.returncode == 0, result.stderr
    shown = ok(cli(home, "status", run_id_of(result))).splitlines()
    assert "stats: kind/000 3, kind/001 3" in shown, shown
    assert not [line for line in shown if line.startswith("crawl:")], shown  # not a crawl


def test_run_json_prints_one_status_object(home: Path) -> None:
    result = fanout(home, "run", TREE, *p(chunks=2, rows=3), *WORK, "--json")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    st = json.loads(line)
    assert st["state"] == "succeeded" and st["records"] == 6
    assert st["manifest"] == f"runs/{st['run_id']}/_manifest.json"


def test_submit_then_worker_until_idle(home: Path) -> None:
    params = {"chunks": 3, "rows": 5, "children": 2, "depth": 1}
    run_id = ok(cli(home, *["submit", TREE, *p(**params)])).strip()
    assert run_id.startswith("tree-")
    st = status(home, run_id)
    assert st["state"] == "running" and st["chunks"]["queued"] == 1 and st["manifest"] is None
    assert_user_error(cli(home, "cat", run_id), "has not finished", "running")

    result = fanout(home, "worker", "--until-idle", *WORK)
    assert result.returncode == 0, result.stderr
    st = status(home, run_id)
    assert st["state"] == "succeeded" and st["chunks"]["done"] == 1 + 3 + 6
    assert_exact_output(home, run_id, **params)


def test_validate_checks_params_and_settings_without_running(home: Path, tmp_path: Path) -> None:
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps({"chunks": 7, "rows": 1}))
    out = ok(
        cli(
            home,
            "validate",
            TREE,
            "--params-file",
            str(params_file),
            "-p",
            "rows=5",
            "-p",
            "fail_chunks=[1, 2]",
            "-S",
            "max_attempts=2",
        )
    ).splitlines()
    assert out[:3] == ["job tree: ok", "  schema: tests.row", "  plan: yes"]
    assert out[3].startswith("  params: ") and out[4].startswith("  settings: ")
    shown = json.loads(out[3].removeprefix("  params: "))
    # --param wins over --params-file; values are converted by the job's model.
    assert shown["chunks"] == 7 and shown["rows"] == 5 and shown["fail_chunks"] == [1, 2]
    settings = json.loads(out[4].removeprefix("  settings: "))
    assert settings["max_attempts"] == 2 and settings["backoff_base"] == 0.01  # job default
    assert not home.exists()  # nothing was recorded anywhere


# -- failures and replay ---------------------------------------------------------


def test_run_exits_1_when_chunks_die_and_failed_lists_them(home: Path) -> None:
    params = {"chunks": 4, "rows": 3, "fail_chunks": [1, 2], "fail_times": 5}
    result = fanout(home, "run", TREE, *p(**params), "-S", "max_attempts=1", *WORK)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    run_id = run_id_of(result)
    assert f"run {run_id} failed: 6 records" in result.stdout
    assert f"2 dead chunks: see `fanout failed {run_id}`" in result.stdout

    text = ok(cli(home, "failed", run_id))
    assert "0/1 (seq 0, 1 attempt): error: RuntimeError: flaky chunk 1, attempt 1" in text
    assert "0/2 (seq 0, 1 attempt): error: RuntimeError: flaky chunk 2, attempt 1" in text
    assert "Traceback" not in text
    assert "Traceback (most recent call last)" in ok(cli(home, "failed", run_id, "--traceback"))
    dead = [json.loads(line) for line in ok(cli(home, "failed", run_id, "--json")).splitlines()]
    assert [d["chunk_id"] for d in dead] == ["0/1", "0/2"]
    for d in dead:
        assert [e["outcome"] for e in d["history"]] == ["error", "dead"]
        assert "RuntimeError: flaky chunk" in d["error"] and "RuntimeError" in d["traceback"]

    st = status(home, run_id)
    assert st["state"] == "failed" and st["chunks"]["dead"] == 2 and st["chunks"]["done"] == 3
    assert [d["chunk_id"] for d in manifest(home, run_id)["dead_chunks"]] == ["0/1", "0/2"]
    # What did commit is there, exactly once.
    assert items(home, run_id) == Counter(f"{c}:{r}" for c in (0, 3) for r in range(3))


def test_replay_after_fix_rewrites_the_manifest(home: Path, tmp_path: Path) -> None:
    flag = tmp_path / "broken"
    flag.touch()
    params = {"chunks": 3, "rows": 4, "broken_flag": str(flag)}
    result = fanout(home, "run", TREE, *p(**params), "-S", "max_attempts=1", *WORK)
    assert result.returncode == 1, result.stderr
    run_id = run_id_of(result)
    text = ok(cli(home, "failed", run_id))
    assert text.startswith("0/0 (seq 0, 1 attempt): error: RuntimeError: broken until the flag")
    before = manifest(home, run_id)
    assert before["state"] == "failed" and before["records"] == 8
    assert [d["chunk_id"] for d in before["dead_chunks"]] == ["0/0"]

    # Replayed but not yet worked: the old manifest no longer tells the truth.
    assert ok(cli(home, "replay", run_id)) == ""
    assert_user_error(cli(home, "cat", run_id), "has not finished", "running")
    result = fanout(home, "worker", "--until-idle", *WORK)
    assert result.returncode == 0, result.stderr
    assert status(home, run_id)["state"] == "failed"  # not fixed yet: dead again
    flag.unlink()  # the fix
    result = fanout(home, "replay", run_id, "--work", *WORK)
    assert result.returncode == 0, result.stderr
    assert f"replaying 1 chunk of {run_id}" in result.stderr
    assert f"run {run_id} succeeded: 12 records" in result.stdout

    after = manifest(home, run_id)
    assert after["state"] == "succeeded" and after["records"] == 12 and after["dead_chunks"] == []
    assert after["finished_at"] > before["finished_at"]
    assert status(home, run_id)["chunks"]["dead"] == 0
    assert_exact_output(home, run_id, chunks=3, rows=4)
    assert ok(cli(home, "failed", run_id)) == f"run {run_id} has no dead chunks\n"
    assert_user_error(cli(home, "replay", run_id), "no dead chunks")


PRINTING_JOB = """
from fanout import Job
print("module loaded")  # in the CLI's process too, at submit
schema = {"type": "record", "name": "r", "fields": [{"name": "n", "type": "long"}]}
job = Job("printer", schema=schema)
@job.plan
def plan(params, ctx):
    print("planning")
    return [{"n": n} for n in range(3)]
@job.process
def process(chunk, ctx):
    for i in range(2000):
        print("chatty job line", chunk["n"], i)
    ctx.emit({"n": chunk["n"]})
"""


def test_what_a_job_prints_goes_to_stderr_not_into_the_commands_output(
    home: Path, tmp_path: Path
) -> None:
    # The job's prints came before `run --json`'s JSON on stdout, so it did not
    # parse; and `fanout run | head -1` failed the chunk with BrokenPipeError.
    job = tmp_path / "printer.py"
    job.write_text(PRINTING_JOB)
    env = {"PYTHONUNBUFFERED": "1"}  # as in many containers and CI systems
    result = fanout(home, "run", str(job), "-w", "2", "--json", env=env)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)  # the whole of stdout: one JSON object
    assert outcome["state"] == "succeeded" and outcome["records"] == 3
    assert "planning" in result.stderr.splitlines()
    # Every line whole: the workers share stderr, and under PYTHONUNBUFFERED a
    # print was a write per argument, mangled with the other worker's lines.
    lines = Counter(result.stderr.splitlines())
    printed = {f"chatty job line {n} {i}" for n in range(3) for i in range(2000)}
    assert {line for line in printed if lines[line] != 1} == set()
    assert "module loaded" in result.stderr


def test_runs_keeps_its_columns_in_line_whatever_the_states(home: Path) -> None:
    # "succeeded_with_failures" is longer than the 10 characters the state
    # column had: its row's records and time stood out of line.
    ok(cli(home, "run", TREE, *p(chunks=2, rows=2), "-w", "1"))
    tolerated = cli(
        home, "run", TREE, *p(chunks=2, rows=2, fail_chunks=[1], fail_times=9),
        "-S", "max_attempts=1", "-S", "tolerated_failures=1", "-w", "1",
    )  # fmt: skip
    assert tolerated.exit_code == 0, tolerated.output
    lines = ok(cli(home, "runs")).splitlines()
    assert len(lines) == 2
    assert any("succeeded_with_failures" in line for line in lines), lines
    columns = {line.index(" records  ") for line in lines}
    assert len(columns) == 1, lines


def test_runs_shows_a_paused_or_cancelling_run_as_status_does(home: Path) -> None:
    # `fanout runs` printed the ledger's raw state: "running" for a paused run
    # that `fanout status` called paused.
    from fanout import control_ops, coordinator
    from fanout.backends import open_backend
    from fanout.backends.base import TaskKey

    backend = open_backend("local", home=home)
    try:
        paused = coordinator.submit(backend, TREE, {"chunks": 1}).run_id
        cancelling = coordinator.submit(backend, TREE, {"chunks": 1}).run_id
        plain = coordinator.submit(backend, TREE, {"chunks": 1}).run_id
        assert control_ops.pause(backend, paused).changed
        # A chunk in flight keeps a cancelled run cancelling.
        assert backend.ledger.claim(TaskKey(cancelling, "0", 0), "t", 60, 3, 0.0).task
        assert control_ops.cancel(backend, cancelling).changed
    finally:
        backend.close()
    rows = {line.split()[0]: line.split()[1] for line in ok(cli(home, "runs")).splitlines()}
    assert rows == {paused: "paused", cancelling: "cancelling", plain: "running"}
    shown = [json.loads(line) for line in ok(cli(home, "runs", "--json")).splitlines()]
    assert {r["run_id"]: (r["state"], r["shown_state"]) for r in shown} == {
        paused: ("running", "paused"),
        cancelling: ("running", "cancelling"),
        plain: ("running", "running"),
    }


def test_cat_buffers_its_output_in_blocks_even_under_pythonunbuffered(
    monkeypatch: Any,
) -> None:
    # Under PYTHONUNBUFFERED stdout writes through: `fanout cat` into a pipe made
    # a write per record, at half the speed (a black-box helper's 1M records:
    # 21.4 s, 11.8 s without the variable). A terminal keeps its line buffering.
    import io
    import sys

    from fanout.cli_common import bulk_stdout

    piped = io.TextIOWrapper(io.BytesIO(), write_through=True)
    monkeypatch.setattr(sys, "stdout", piped)
    assert bulk_stdout() is piped and not piped.write_through and not piped.line_buffering

    class Terminal(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    tty = Terminal(io.BytesIO(), write_through=True)
    monkeypatch.setattr(sys, "stdout", tty)
    assert bulk_stdout() is tty and tty.write_through
