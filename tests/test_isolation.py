"""Runs do not share job modules (issue 10, point 3): one warm worker runs jobs
from two directories that each import their own ``helper.py``, and a replay
after fixing a helper picks up the fix. Process level: a real ``fanout worker``
that stays up across the runs. And, in process, what ``ProcessState`` puts
back of the environment after a chunk (process level: tests/test_worker.py)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from fanout.backends.base import RunState
from fanout.isolation import ProcessState
from support.procs import fanout, get_run, wait_for, worker

JOB = textwrap.dedent(
    """
    from fanout import Job
    import helper

    job = Job("iso", max_attempts=1, schema={
        "type": "record", "name": "iso",
        "fields": [{"name": "top", "type": "string"}, {"name": "lazy", "type": "string"}],
    })

    @job.process
    def process(chunk, ctx):
        import helper as late  # imported while the chunk runs, too
        ctx.emit({"top": helper.WHO, "lazy": late.who()})
    """
)


def helper(who: str, broken: bool = False) -> str:
    body = f"WHO = {who!r}\n\n\ndef who():\n"
    if broken:
        body += "    raise RuntimeError('helper is broken')\n"
    return body + "    return WHO\n"


def make_job(root: Path, name: str, helper_source: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "job.py").write_text(JOB)
    (d / "helper.py").write_text(helper_source)
    return d / "job.py"


def submit(home: Path, job: Path) -> str:
    result = fanout(home, "submit", str(job))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def finished(home: Path, run_id: str) -> RunState:
    from fanout.backends import open_backend

    def state() -> RunState | None:
        backend = open_backend("local", home=home)
        try:
            run = get_run(backend, run_id)
        finally:
            backend.close()
        return run.state if run.state not in (RunState.RUNNING, RunState.FINALIZING) else None

    result: RunState = wait_for(f"run {run_id} to finish", state, 30)
    return result


def records(home: Path, run_id: str) -> list[dict[str, str]]:
    result = fanout(home, "cat", run_id)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_two_job_directories_each_get_their_own_helper_in_one_worker(
    home: Path, tmp_path: Path
) -> None:
    job_a = make_job(tmp_path, "a", helper("a"))
    job_b = make_job(tmp_path, "b", helper("b"))
    with worker(home, tmp_path, "-w", "1"):
        run_a = submit(home, job_a)
        assert finished(home, run_a) is RunState.SUCCEEDED
        run_b = submit(home, job_b)
        assert finished(home, run_b) is RunState.SUCCEEDED
        run_a2 = submit(home, job_a)  # and back: A's helper again, not B's
        assert finished(home, run_a2) is RunState.SUCCEEDED
    assert records(home, run_a) == [{"top": "a", "lazy": "a"}]
    assert records(home, run_b) == [{"top": "b", "lazy": "b"}]
    assert records(home, run_a2) == [{"top": "a", "lazy": "a"}]


def test_a_replay_after_fixing_a_helper_module_uses_the_fix(home: Path, tmp_path: Path) -> None:
    job = make_job(tmp_path, "c", helper("c", broken=True))
    with worker(home, tmp_path, "-w", "1"):
        run_id = submit(home, job)
        assert finished(home, run_id) is RunState.FAILED
        (job.parent / "helper.py").write_text(helper("c, fixed"))  # the job file is unchanged
        replayed = fanout(home, "replay", run_id)
        assert replayed.returncode == 0, replayed.stderr
        assert finished(home, run_id) is RunState.SUCCEEDED
    assert records(home, run_id) == [{"top": "c, fixed", "lazy": "c, fixed"}]


def test_process_state_undoes_only_the_variables_a_chunk_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In process: ProcessState itself. Values that are not UTF-8 go back as they
    # were (os.environ keeps them encoded), and a variable set between chunks
    # (by the Lambda runtime, say) is nobody's change to undo.
    for name in ("ISO_ADDED", "ISO_BETWEEN"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("ISO_CHANGED", "before")
    monkeypatch.setenv("ISO_REMOVED", "before")
    monkeypatch.setenv("ISO_BYTES", os.fsdecode(b"\xff-before"))
    state = ProcessState()
    os.environ["ISO_BETWEEN"] = "set before the chunk"
    state.job_code_starts()
    before = dict(os.environ)
    os.environ["ISO_ADDED"] = "chunk"
    os.environ["ISO_CHANGED"] = "chunk"
    os.environ["ISO_BYTES"] = "chunk"
    del os.environ["ISO_REMOVED"]
    del os.environ["ISO_BETWEEN"]
    state.restore()
    assert dict(os.environ) == before
    assert os.environb[b"ISO_BYTES"] == b"\xff-before"
    # With no job code started (its job failed to load), nothing is undone.
    os.environ["ISO_ADDED"] = "engine"
    state.restore()
    assert os.environ["ISO_ADDED"] == "engine"
