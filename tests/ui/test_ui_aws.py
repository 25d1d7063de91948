"""The dashboard on the AWS backend (moto, in process): the same pages and
the same Replay, read through the same Protocols."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import SCRIPT, drain, submit_broken

from fanout import coordinator
from fanout.backends.base import Backend, RunState, TaskState


def test_pages_and_replay_on_the_aws_backend(
    aws: Backend, make_client: Callable[..., Any], tmp_path: Path
) -> None:
    flag = tmp_path / "broken"
    flag.write_text("")
    run_id = submit_broken(aws, flag, children=0)
    assert drain(aws, run_id).state == RunState.FAILED
    client = make_client(aws)
    runs = client.get("/")
    assert runs.status_code == 200 and run_id in runs.text
    page = client.get(f"/runs/{run_id}")
    assert page.status_code == 200 and SCRIPT not in page.text
    bars = re.findall(r'<rect class="bar" data-outcome="([a-z ]+)"', page.text)
    assert sorted(bars) == ["committed"] * 3 + ["dead"] * 2
    chunk = client.get(f"/runs/{run_id}/chunks/0/2")
    assert chunk.status_code == 200 and "bad row 14" in chunk.text
    assert client.get("/schedules").status_code == 200
    from fanout.ui.report import report_html

    report = report_html(aws, run_id)
    assert report.count('data-outcome="dead"') == 2 and "<script" not in report
    failures = client.get(f"/runs/{run_id}/failures").text
    token = re.search(r'name="csrf" value="([^"]+)"', failures)
    assert token
    flag.unlink()
    res = client.post(f"/runs/{run_id}/replay", data={"csrf": token[1], "chunk": "0/1"})
    assert res.status_code == 303
    dead = aws.ledger.list_tasks(run_id, (TaskState.DEAD,))
    assert [t.chunk_id for t in dead] == ["0/2"]
    assert coordinator.get_run(aws, run_id).state == RunState.RUNNING
